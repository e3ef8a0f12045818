"""The pure logic of a team episode (teamtr_verl.team_logic): schedules, private views, chat messages, the answer.

Expected values are written out by hand. The view tests use the relay10 shape of research/toy_task.md: A holds a
secret in its private view, B must never see it except through A's message.
"""

import os
import subprocess
import sys

import pytest

from teamtr_verl.config import AgentSpec, HandoffSpec, RouterSpec, SamplingSpec, ValSamplingSpec
from teamtr_verl.team_logic import (
    Message,
    agent_view,
    agent_views_of,
    answer_turn,
    build_agent_messages,
    check_agent_views,
    episode_key,
    format_transcript,
    heldout_prompts,
    prompt_seeds,
    render_prompt,
    router_schedule,
    transcript_visible,
    turn_sampling_params,
    turn_seed,
)

HANDOFF = HandoffSpec()  # "{name}: {content}" under "Conversation so far:", answer last
PLANNER = AgentSpec(name="planner", model="/m/p", role_prompt="You are the planner.")
SOLVER = AgentSpec(name="solver", model="/m/s", role_prompt="You are the solver.")


# ------------------------------------------------------------------------------------------------ router


def test_chain_speaks_each_agent_once_in_order():
    assert router_schedule(RouterSpec("chain"), ["a", "b", "c"], "u/0") == ["a", "b", "c"]


def test_round_robin_cycles():
    assert router_schedule(RouterSpec("round_robin", turns=5), ["a", "b"], "u/0") == ["a", "b", "a", "b", "a"]


def test_sequence_is_taken_as_given():
    router = RouterSpec("sequence", sequence=("planner", "solver", "planner"))
    assert router_schedule(router, ["planner", "solver"], "u/0") == ["planner", "solver", "planner"]


def test_sequence_with_unknown_name_raises():
    with pytest.raises(ValueError, match="'critic'"):
        router_schedule(RouterSpec("sequence", sequence=("critic",)), ["planner"], "u/0")


def test_random_is_a_pure_function_of_seed_and_key():
    router = RouterSpec("random", turns=8, seed=0)
    names = ["a", "b", "c"]
    keys = [episode_key(f"uid{i}", s) for i in range(5) for s in range(2)]
    schedules = {key: router_schedule(router, names, key) for key in keys}
    for key, schedule in schedules.items():
        assert len(schedule) == 8 and set(schedule) <= set(names)
        assert router_schedule(router, names, key) == schedule  # same key, same schedule
    # 3**8 = 6561 possible schedules; ten keys drawing fewer than 5 distinct ones would mean the key is ignored.
    assert len({tuple(s) for s in schedules.values()}) >= 5
    reseeded = RouterSpec("random", turns=8, seed=1)
    assert any(router_schedule(reseeded, names, key) != schedules[key] for key in keys)


def test_random_is_stable_across_processes():
    # Pinned values: the draw is SHA-256 of (seed, key, turn), so it never depends on PYTHONHASHSEED or the
    # interpreter's RNG. If these change, a resumed run would draw different schedules from the ones it started with.
    code = (
        "from teamtr_verl.config import RouterSpec; from teamtr_verl.team_logic import router_schedule;"
        "print(router_schedule(RouterSpec('random', turns=6, seed=0), ['a', 'b', 'c'], 'uid0/0'))"
    )
    names = ["a", "b", "c"]
    assert router_schedule(RouterSpec("random", turns=6, seed=0), names, "uid0/0") == ["a", "a", "b", "c", "c", "c"]
    assert router_schedule(RouterSpec("random", turns=6, seed=1), names, "uid0/0") == ["b", "c", "c", "b", "b", "a"]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
        assert out.strip() == "['a', 'a', 'b', 'c', 'c', 'c']"


def test_random_draws_every_agent_roughly_uniformly():
    router = RouterSpec("random", turns=1, seed=3)
    counts = {"a": 0, "b": 0}
    for i in range(400):
        counts[router_schedule(router, ["a", "b"], f"k{i}")[0]] += 1
    assert 150 < counts["a"] < 250  # binomial(400, 1/2): mean 200, sd 10


def test_round_robin_needs_turns():
    with pytest.raises(ValueError, match="router.turns=None"):
        router_schedule(RouterSpec("round_robin"), ["a"], "k")


def test_episode_key():
    assert episode_key("abc", 3) == "abc/3"


# ------------------------------------------------------------------------------------------------ answer


@pytest.mark.parametrize(
    "schedule, answer, expected",
    [
        (["a", "b", "a"], "last", 2),
        (["a", "b", "a"], "a", 2),  # a's LAST message
        (["a", "b", "a"], "b", 1),
        (["solo"], "last", 0),
    ],
)
def test_answer_turn(schedule, answer, expected):
    assert answer_turn(schedule, HandoffSpec(answer=answer)) == expected


def test_answer_agent_that_never_speaks():
    with pytest.raises(ValueError, match=r"handoff.answer='c' never speaks in this episode's schedule \['a', 'b'\]"):
        answer_turn(["a", "b"], HandoffSpec(answer="c"))


def test_answer_of_empty_schedule():
    with pytest.raises(ValueError, match="schedule is empty"):
        answer_turn([], HANDOFF)


# ------------------------------------------------------------------------------------------------ transcript


def test_format_transcript():
    transcript = [Message("planner", 0, "x is 7"), Message("solver", 1, "#### 7")]
    assert format_transcript(transcript, HANDOFF) == "Conversation so far:\nplanner: x is 7\nsolver: #### 7"
    custom = HandoffSpec(message_format="[{turn}] <{name}> {content}", transcript_header="")
    assert format_transcript(transcript, custom) == "[0] <planner> x is 7\n[1] <solver> #### 7"
    assert format_transcript([], HANDOFF) == ""


# ------------------------------------------------------------------------------------------------ chat messages


SHARED_PROMPT = [
    {"role": "system", "content": "Answer with #### followed by the number."},
    {"role": "user", "content": "What is 3 + 4?"},
]


def test_two_agent_chain_messages_written_out():
    # Turn 0, planner: role prompt + dataset system text in one system message, then the task; no transcript yet.
    planner_task = agent_view({}, SHARED_PROMPT, "planner")
    assert build_agent_messages(PLANNER, planner_task, [], HANDOFF) == [
        {"role": "system", "content": "You are the planner.\n\nAnswer with #### followed by the number."},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    # Turn 1, solver: same task, planner's message appended to the same user message after a blank line.
    solver_task = agent_view({}, SHARED_PROMPT, "solver")
    transcript = [Message("planner", 0, "Add the units: 3 + 4 = 7.")]
    assert build_agent_messages(SOLVER, solver_task, transcript, HANDOFF) == [
        {"role": "system", "content": "You are the solver.\n\nAnswer with #### followed by the number."},
        {
            "role": "user",
            "content": "What is 3 + 4?\n\nConversation so far:\nplanner: Add the units: 3 + 4 = 7.",
        },
    ]


def test_no_role_prompt_and_no_dataset_system_gives_no_system_message():
    bare = AgentSpec(name="a", model="/m")
    assert build_agent_messages(bare, [{"role": "user", "content": "hi"}], [], HANDOFF) == [
        {"role": "user", "content": "hi"}
    ]


def test_role_prompt_alone_and_several_dataset_system_messages():
    task = [{"role": "system", "content": "S1"}, {"role": "system", "content": ""}, {"role": "system", "content": "S2"}]
    assert build_agent_messages(PLANNER, task, [], HANDOFF) == [
        {"role": "system", "content": "You are the planner.\n\nS1\n\nS2"}
    ]
    assert build_agent_messages(PLANNER, [{"role": "user", "content": "q"}], [], HANDOFF)[0] == {
        "role": "system",
        "content": "You are the planner.",
    }


def test_transcript_after_an_assistant_message_is_a_new_user_message():
    # A few-shot task ending in an assistant turn: the transcript cannot be merged, so it gets its own user message.
    task = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "example"}]
    out = build_agent_messages(SOLVER, task, [Message("planner", 0, "hint")], HANDOFF)
    assert out == [
        {"role": "system", "content": "You are the solver."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "example"},
        {"role": "user", "content": "Conversation so far:\nplanner: hint"},
    ]


def test_transcript_with_no_task_messages():
    out = build_agent_messages(SOLVER, [], [Message("planner", 0, "hint")], HANDOFF)
    assert out == [
        {"role": "system", "content": "You are the solver."},
        {"role": "user", "content": "Conversation so far:\nplanner: hint"},
    ]


def test_round_robin_speaker_sees_its_own_earlier_message_as_transcript():
    transcript = [Message("planner", 0, "p0"), Message("solver", 1, "s1")]
    out = build_agent_messages(PLANNER, [{"role": "user", "content": "q"}], transcript, HANDOFF)
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[1]["content"] == "q\n\nConversation so far:\nplanner: p0\nsolver: s1"


def test_build_does_not_mutate_its_inputs():
    task = [{"role": "user", "content": "q"}]
    build_agent_messages(SOLVER, task, [Message("planner", 0, "hint")], HANDOFF)
    assert task == [{"role": "user", "content": "q"}]


def test_non_text_content_is_rejected_where_it_must_be_joined():
    with pytest.raises(TypeError, match="text messages only"):
        task = [{"role": "user", "content": [{"type": "image"}]}]
        build_agent_messages(SOLVER, task, [Message("a", 0, "m")], HANDOFF)


# ------------------------------------------------------------------------------------------------ private views


def _relay_row(x):
    return {
        "agent_views": {
            "planner": f"You are agent A. Secret x = {x}. Send B a short message.",
            "solver": "You are agent B. Reply #### x.",
        }
    }


def test_view_replaces_the_shared_prompt():
    extra_info = _relay_row(7)
    assert agent_view(extra_info, SHARED_PROMPT, "planner") == [
        {"role": "user", "content": "You are agent A. Secret x = 7. Send B a short message."}
    ]
    # An agent without a view sees the shared prompt (a copy, so editing it leaves the row intact).
    shared = agent_view(extra_info, SHARED_PROMPT, "critic")
    assert shared == SHARED_PROMPT and shared[0] is not SHARED_PROMPT[0]


def test_private_views_never_leak():
    for x in range(10):
        extra_info = _relay_row(x)
        secret = extra_info["agent_views"]["planner"]
        solver_task = agent_view(extra_info, SHARED_PROMPT, "solver")
        transcript = [Message("planner", 0, f"msg {x}")]
        messages = build_agent_messages(SOLVER, solver_task, transcript, HANDOFF)
        text = "\n".join(m["content"] for m in messages)
        assert secret not in text and f"x = {x}" not in text
        assert f"msg {x}" in text  # what A chose to say does reach B
        # and the planner never sees the solver's view
        planner_task = agent_view(extra_info, SHARED_PROMPT, "planner")
        planner_text = "\n".join(m["content"] for m in build_agent_messages(PLANNER, planner_task, [], HANDOFF))
        assert "You are agent B" not in planner_text


def test_views_from_parquet_struct_with_none_values():
    # A parquet dict column becomes a struct over the union of keys: missing views read back as None.
    extra_info = {"agent_views": {"planner": "secret 3", "solver": None}}
    assert agent_views_of(extra_info) == {"planner": "secret 3"}
    assert agent_view(extra_info, SHARED_PROMPT, "solver") == SHARED_PROMPT


@pytest.mark.parametrize("extra_info", [None, {}, {"agent_views": None}, {"index": 3}])
def test_rows_without_views(extra_info):
    assert agent_views_of(extra_info) == {}
    assert agent_view(extra_info, SHARED_PROMPT, "planner") == SHARED_PROMPT


def test_bad_view_types():
    with pytest.raises(TypeError, match="must map agent names"):
        agent_views_of({"agent_views": ["a"]})
    with pytest.raises(TypeError, match=r"\['planner'\] must be a string"):
        agent_views_of({"agent_views": {"planner": 3}})


def test_check_agent_views_catches_misspelt_names():
    check_agent_views(_relay_row(1), ["planner", "solver"])
    check_agent_views(None, ["planner"])
    expected = r"views for \['plnner'\], which are no agents: agents are \['planner', 'solver'\]"
    with pytest.raises(ValueError, match=expected):
        check_agent_views({"agent_views": {"plnner": "s"}}, ["planner", "solver"])


# ------------------------------------------------------------------------------------------------ hidden transcript


def _text_of(messages):
    return "\n".join(m["content"] for m in messages)


@pytest.mark.parametrize("extra_info", [None, {}, {"index": 3}, {"show_transcript": None}, {"show_transcript": True}])
def test_transcript_is_shown_by_default(extra_info):
    assert transcript_visible(extra_info) is True
    task = agent_view(extra_info, SHARED_PROMPT, "solver")
    assert task.show_transcript is True
    messages = build_agent_messages(SOLVER, task, [Message("planner", 0, "msg 4")], HANDOFF)
    assert messages == build_agent_messages(SOLVER, list(task), [Message("planner", 0, "msg 4")], HANDOFF)
    assert "Conversation so far:\nplanner: msg 4" in _text_of(messages)


def test_a_row_can_hide_the_transcript_from_every_speaker():
    """A simultaneous-move game: agents speak in turn, but each sees only its own view (or the shared prompt)."""
    extra_info = {**_relay_row(7), "show_transcript": False}
    transcript = [Message("planner", 0, "msg 7"), Message("critic", 1, "looks fine")]
    with_view = build_agent_messages(SOLVER, agent_view(extra_info, SHARED_PROMPT, "solver"), transcript, HANDOFF)
    assert with_view == [{"role": "system", "content": "You are the solver."},
                         {"role": "user", "content": "You are agent B. Reply #### x."}]
    # an agent without a view sees the shared prompt, and no transcript either
    shared = agent_view(extra_info, SHARED_PROMPT, "critic")
    critic = build_agent_messages(AgentSpec(name="critic", model="/m/c"), shared, transcript, HANDOFF)
    assert critic == build_agent_messages(AgentSpec(name="critic", model="/m/c"), SHARED_PROMPT, [], HANDOFF)
    assert "msg 7" not in _text_of(with_view) + _text_of(critic)


def test_show_transcript_argument_overrides_the_row():
    transcript = [Message("planner", 0, "msg 7")]
    hidden = agent_view({"show_transcript": False}, SHARED_PROMPT, "solver")
    assert "msg 7" in _text_of(build_agent_messages(SOLVER, hidden, transcript, HANDOFF, show_transcript=True))
    plain = [{"role": "user", "content": "Solve it."}]  # a plain list shows the transcript unless told otherwise
    assert "msg 7" in _text_of(build_agent_messages(SOLVER, plain, transcript, HANDOFF))
    assert build_agent_messages(SOLVER, plain, transcript, HANDOFF, show_transcript=False) == [
        {"role": "system", "content": "You are the solver."}, {"role": "user", "content": "Solve it."}]


def test_show_transcript_from_parquet_and_bad_values():
    import numpy as np

    assert transcript_visible({"show_transcript": np.bool_(False)}) is False
    assert transcript_visible({"show_transcript": np.bool_(True)}) is True
    for bad in ("false", 0, [False]):
        with pytest.raises(TypeError, match="must be true or false"):
            transcript_visible({"show_transcript": bad})


# ------------------------------------------------------------------------------- common random numbers, held-out


def test_prompt_seeds_are_fixed_for_a_stage_and_differ_across_stages_and_prompts():
    seeds = prompt_seeds(stage=3, num_prompts=16, base=0)
    assert len(seeds) == 16 and len(set(seeds)) == 16  # one distinct seed per prompt
    assert prompt_seeds(3, 16, 0) == seeds  # every regeneration of the stage draws the same numbers
    assert prompt_seeds(3, 4, 0) == seeds[:4]  # a prompt's seed does not depend on the batch size
    assert set(prompt_seeds(4, 16, 0)).isdisjoint(seeds)  # the next stage samples afresh
    assert set(prompt_seeds(3, 16, 1)).isdisjoint(seeds)  # another run (base) too
    assert all(isinstance(s, int) and 0 <= s < 2**31 - 1 for s in seeds)  # an int32 seed for every backend
    assert prompt_seeds(0, 0) == []


def test_turn_seeds_are_distinct_per_session_and_turn_and_reproducible():
    base = prompt_seeds(1, 1)[0]
    grid = {(session, turn): turn_seed(base, session, turn) for session in range(8) for turn in range(6)}
    assert len(set(grid.values())) == len(grid)
    assert all(turn_seed(base, s, t) == seed for (s, t), seed in grid.items())
    assert turn_seed(base + 1, 0, 0) != grid[0, 0]
    assert all(0 <= seed < 2**31 - 1 for seed in grid.values())


def test_seeds_do_not_depend_on_the_process():
    """blake2b of the values, never Python's salted hash(): the same in every process whatever PYTHONHASHSEED."""
    code = ("from teamtr_verl.team_logic import prompt_seeds, turn_seed, heldout_prompts;"
            "print(prompt_seeds(5, 3, 2), turn_seed(123, 1, 2), sorted(heldout_prompts(10, 0.3, 5, 2)))")
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outputs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env=env).stdout)
    assert outputs == {f"{prompt_seeds(5, 3, 2)} {turn_seed(123, 1, 2)} {sorted(heldout_prompts(10, 0.3, 5, 2))}\n"}


@pytest.mark.parametrize("num_prompts, fraction, count", [
    (4, 0.25, 1), (8, 0.25, 2), (10, 0.25, 2), (10, 0.35, 4), (16, 0.5, 8),
    (4, 0.01, 1),  # round(0.04) = 0, raised to 1: some prompt must measure the update
    (4, 0.9, 3), (2, 0.99, 1),  # at most P − 1: some prompt must be trained on
    (4, 0.0, 0), (1, 0.5, 0),  # nothing held out: no fraction, or a single prompt
])
def test_heldout_prompt_counts(num_prompts, fraction, count):
    heldout = heldout_prompts(num_prompts, fraction, stage=1)
    assert isinstance(heldout, frozenset) and len(heldout) == count
    assert heldout <= set(range(num_prompts))


def test_heldout_prompts_are_deterministic_per_stage_and_vary_across_stages():
    first = heldout_prompts(32, 0.25, stage=7, seed=3)
    assert heldout_prompts(32, 0.25, stage=7, seed=3) == first  # a resumed run holds out the same prompts
    assert len({heldout_prompts(32, 0.25, stage=s, seed=3) for s in range(10)}) > 1
    assert len({heldout_prompts(32, 0.25, stage=7, seed=s) for s in range(10)}) > 1
    assert heldout_prompts(32, 0.0, stage=7, seed=3) == frozenset()


@pytest.mark.parametrize("schedule, changed, keep", [
    (["alice", "bob", "carol"], {"carol"}, 2),  # chain, the last speaker updated: two turns stand
    (["alice", "bob", "carol"], {"alice"}, 0),
    (["alice", "bob", "carol"], set(), 3),  # nobody changed (a given-up update): the whole episode stands
    (["alice", "bob", "alice", "bob"], {"bob"}, 1),  # round robin: bob's first turn is turn 1
    (["bob", "alice", "alice"], {"alice", "carol"}, 1),  # several changed (resample_every): the earliest counts
])
def test_reusable_turns(schedule, changed, keep):
    from teamtr_verl.team_logic import reusable_turns

    assert reusable_turns(schedule, changed) == keep


def test_prefix_reuse_is_exact_for_every_router_but_random():
    from teamtr_verl.config import RouterSpec
    from teamtr_verl.team_logic import prefix_reuse_is_exact

    assert [prefix_reuse_is_exact(RouterSpec(kind=k)) for k in ("chain", "round_robin", "sequence", "random")] == [
        True, True, True, False]


# ------------------------------------------------------------------------------------------------ per-agent sampling
LOOP_PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


def test_an_agent_without_sampling_keys_gets_the_loops_params():
    assert turn_sampling_params(LOOP_PARAMS, SamplingSpec(), validate=False) == LOOP_PARAMS
    assert turn_sampling_params(LOOP_PARAMS, SamplingSpec(), validate=True) == LOOP_PARAMS
    assert turn_sampling_params(LOOP_PARAMS, SamplingSpec(), validate=False, seed=9) == {**LOOP_PARAMS, "seed": 9}


def test_an_agents_values_replace_the_loops_and_validation_takes_its_val_kwargs():
    spec = SamplingSpec(temperature=0.7, top_k=5, max_new_tokens=3, stop=("\n\n", "END"),
                        val_kwargs=ValSamplingSpec(temperature=0.0))
    params = dict(LOOP_PARAMS)
    # training: the agent's temperature and top_k, the loop's top_p; its token cap (vLLM's max_tokens) and stops
    assert turn_sampling_params(params, spec, validate=False, seed=4) == {
        "temperature": 0.7, "top_p": 1.0, "top_k": 5, "repetition_penalty": 1.0, "logprobs": True,
        "max_tokens": 3, "stop": ["\n\n", "END"], "seed": 4}
    # validation: verl already put val_kwargs in the loop's params; the agent's val_kwargs go over them, and the
    # training-only temperature/top_k do not apply; cap and stops hold in both
    val_params = {**LOOP_PARAMS, "temperature": 0.3, "top_k": 2}
    assert turn_sampling_params(val_params, spec, validate=True) == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 2, "repetition_penalty": 1.0, "logprobs": True,
        "max_tokens": 3, "stop": ["\n\n", "END"]}
    assert params == LOOP_PARAMS  # not modified


# ------------------------------------------------------------------------------------------------ chat templates
# A template of the team's own protocol: "[role] content" lines, a thinking switch, the assistant cue last.
TEAM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if enable_thinking is defined and not enable_thinking %}/no_think\n{% endif %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
CHAT = [{"role": "system", "content": "You are the planner."}, {"role": "user", "content": "Plan it."}]


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from teamtr_verl.fixtures.model import build_tokenizer

    return build_tokenizer(vocab_size=300)


def test_an_agent_renders_with_its_tokenizers_template_unless_it_brings_its_own(chatml_tokenizer):
    no_data_kwargs = {}
    own = render_prompt(chatml_tokenizer, PLANNER, CHAT, no_data_kwargs)
    assert chatml_tokenizer.decode(own) == ("<|im_start|>system\nYou are the planner.<|im_end|>\n"
                                            "<|im_start|>user\nPlan it.<|im_end|>\n<|im_start|>assistant\n")
    team_format = AgentSpec(name="planner", model="/m/p", chat_template=TEAM_TEMPLATE)
    assert chatml_tokenizer.decode(render_prompt(chatml_tokenizer, team_format, CHAT, no_data_kwargs)) == (
        "[system] You are the planner.\n[user] Plan it.\n[assistant] ")


def test_an_agents_template_kwargs_override_verls_data_kwargs(chatml_tokenizer):
    thinking_on = {"apply_chat_template_kwargs": {"enable_thinking": True}}
    team_format = AgentSpec(name="planner", model="/m/p", chat_template=TEAM_TEMPLATE)
    assert "/no_think" not in chatml_tokenizer.decode(render_prompt(chatml_tokenizer, team_format, CHAT, thinking_on))
    quiet = AgentSpec(name="planner", model="/m/p", chat_template=TEAM_TEMPLATE,
                      chat_template_kwargs={"enable_thinking": False})
    assert chatml_tokenizer.decode(render_prompt(chatml_tokenizer, quiet, CHAT, thinking_on)) == (
        "[system] You are the planner.\n[user] Plan it.\n/no_think\n[assistant] ")
