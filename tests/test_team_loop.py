"""The team's verl-facing rollout code without vLLM: the routing client, the teamtr_handoff agent loop driven by a
scripted fake server per agent, and the reward path through verl's own NaiveRewardManager."""

import asyncio
import math

import pytest
from verl.workers.rollout.replica import TokenOutput

from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.rollout import CONFIG_DIR, compose
from teamtr_verl.team import (
    AGENT_FIELD,
    ANSWER_FIELD,
    TRANSCRIPT_FIELD,
    TURN_FIELD,
    TeamHandoffAgentLoop,
    TeamLLMClient,
    TeamRewardError,
    _TeamAgentLoopWorker,
    agent_tokenizer,
)


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    # different seeds -> different tokenizers: the loop must tokenize each turn with its speaker's own
    return build_tiny_model(root / "alice", seed=0, hidden_size=64), build_tiny_model(root / "bob", seed=1, hidden_size=64)


def team_config(alice, bob, alice_extra="", **teamtr):
    overrides = [f"teamtr.agents=[{{name: alice, model: '{alice}', role_prompt: 'You are alice.'{alice_extra}}}, "
                 f"{{name: bob, model: '{bob}', role_prompt: 'You are bob.'}}]"]
    overrides += [f"teamtr.{key}={value}" for key, value in teamtr.items()]
    return compose(str(CONFIG_DIR), "teamtr_tiny_cpu", overrides)


class ScriptedServer:
    """One agent's server: answers every request with a fixed text in that agent's tokens; records prompts."""

    def __init__(self, name, model_dir, reply):
        self.name, self.tokenizer, self.reply = name, agent_tokenizer(str(model_dir)), reply
        self.prompts, self.seeds, self.params = [], [], []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        assert "teamtr_agent" not in kwargs  # the routing kwarg never reaches a real server
        self.prompts.append(list(prompt_ids))
        self.seeds.append(sampling_params.get("seed"))
        self.params.append(dict(sampling_params))
        ids = self.tokenizer.encode(self.reply, add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={"global_steps": 3})


def make_loop(config, servers):
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    client = TeamLLMClient(config, servers, default_agent="alice")
    return TeamHandoffAgentLoop(
        trainer_config=DictConfigWrap(config), server_manager=client,
        tokenizer=AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.path), processor=None,
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
    )


def run_episode(config, servers, session_id=0, loop=None, **row):
    loop = loop or make_loop(config, servers)
    return asyncio.run(loop.run({"temperature": 1.0}, uid="u1", session_id=session_id, **row))


ROW = {
    "raw_prompt": [{"role": "user", "content": "What is 2 + 3?"}],
    "extra_info": {"agent_views": {"alice": "Secret x = 7. Tell bob.", "bob": None}},
}


def test_chain_episode_turns_masks_and_routing(two_agents):
    alice, bob = two_agents
    config = team_config(alice, bob)
    servers = {"alice": ScriptedServer("alice", alice, "msg 7"), "bob": ScriptedServer("bob", bob, "#### 7")}
    outputs = run_episode(config, servers, **ROW)

    assert [o.extra_fields[AGENT_FIELD] for o in outputs] == ["alice", "bob"]
    assert [o.extra_fields[TURN_FIELD] for o in outputs] == [0, 1]
    assert [o.extra_fields[ANSWER_FIELD] for o in outputs] == [False, True]
    for output, server in zip(outputs, servers.values()):
        assert output.response_mask == [1] * len(output.response_ids)  # every response token is the speaker's
        assert output.response_logprobs == [-0.5] * len(output.response_ids)
        assert output.prompt_ids == server.prompts[0]  # the row's prompt is exactly what that server was sent
        assert output.extra_fields["global_steps"] == 3  # the server's own fields are kept
        assert output.num_turns == 2
    alice_prompt = servers["alice"].tokenizer.decode(servers["alice"].prompts[0])
    bob_prompt = servers["bob"].tokenizer.decode(servers["bob"].prompts[0])
    assert alice_prompt == ("<|im_start|>system\nYou are alice.<|im_end|>\n"
                            "<|im_start|>user\nSecret x = 7. Tell bob.<|im_end|>\n<|im_start|>assistant\n")
    # bob has no view: he sees the shared prompt and alice's message, never alice's private view
    assert bob_prompt == ("<|im_start|>system\nYou are bob.<|im_end|>\n"
                          "<|im_start|>user\nWhat is 2 + 3?\n\nConversation so far:\nalice: msg 7<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert outputs[-1].extra_fields[TRANSCRIPT_FIELD] == [
        {"agent": "alice", "turn": 0, "content": "msg 7"}, {"agent": "bob", "turn": 1, "content": "#### 7"}]


def test_answer_turn_is_placed_last_for_verls_reward(two_agents):
    """verl scores the last output of a trajectory: with answer=alice in a round-robin of 3 turns (alice, bob, alice),
    alice's turn 2 must come last, and each turn keeps its index."""
    alice, bob = two_agents
    config = team_config(alice, bob, **{"router.kind": "round_robin", "router.turns": 3, "handoff.answer": "alice"})
    servers = {"alice": ScriptedServer("alice", alice, "a"), "bob": ScriptedServer("bob", bob, "b")}
    outputs = run_episode(config, servers, **ROW)
    assert [(o.extra_fields[AGENT_FIELD], o.extra_fields[TURN_FIELD]) for o in outputs] == [
        ("alice", 0), ("bob", 1), ("alice", 2)]
    config = team_config(alice, bob, **{"router.kind": "round_robin", "router.turns": 4, "handoff.answer": "alice"})
    outputs = run_episode(config, servers, **ROW)
    # turns alice0 bob1 alice2 bob3: the answer is alice's last message (turn 2), moved to the end
    assert [(o.extra_fields[AGENT_FIELD], o.extra_fields[TURN_FIELD]) for o in outputs] == [
        ("alice", 0), ("bob", 1), ("bob", 3), ("alice", 2)]
    assert outputs[-1].extra_fields[ANSWER_FIELD] and not any(o.extra_fields[ANSWER_FIELD] for o in outputs[:-1])


def test_a_view_for_an_unknown_agent_is_an_error(two_agents):
    alice, bob = two_agents
    servers = {"alice": ScriptedServer("alice", alice, "a"), "bob": ScriptedServer("bob", bob, "b")}
    with pytest.raises(ValueError, match="carol"):
        run_episode(team_config(alice, bob), servers, raw_prompt=ROW["raw_prompt"],
                    extra_info={"agent_views": {"carol": "hi"}})


def test_routing_client_errors_name_the_agent(two_agents):
    alice, bob = two_agents
    config = team_config(alice, bob)
    client = TeamLLMClient(config, {"alice": ScriptedServer("alice", alice, "x")}, default_agent="alice")
    with pytest.raises(KeyError, match="'carol'"):
        asyncio.run(client.generate("r", prompt_ids=[1], sampling_params={}, teamtr_agent="carol"))
    out = asyncio.run(client.generate("r", prompt_ids=[1], sampling_params={}))  # no kwarg: the default agent
    assert out.token_ids
    with pytest.raises(ValueError, match="default_agent='zed'"):
        TeamLLMClient(config, {"alice": None}, default_agent="zed")


# -- the reward path: verl's own NaiveRewardManager behind a fake reward-worker handle ---------------------------
class _RemoteCall:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, data):
        return self.fn(data)  # a coroutine: `await handle.compute_score.remote(data)` works as with Ray


class FakeRewardWorker:
    def __init__(self, config, tokenizer, score_fn):
        self.compute_score = _RemoteCall(lambda data: self._score(config, tokenizer, score_fn, data))

    @staticmethod
    async def _score(config, tokenizer, score_fn, data):
        from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

        # built inside the running event loop: the manager runs the reward function in that loop's executor
        return await NaiveRewardManager(config, tokenizer, score_fn).run_single(data)


def make_worker(config, score_fn):
    worker = _TeamAgentLoopWorker.__new__(_TeamAgentLoopWorker)
    worker.config, worker.processor, worker.mm_processor_kwargs = config, None, {}
    worker.tokenizer = agent_tokenizer(config.actor_rollout_ref.model.path)  # the default (alice's) tokenizer
    worker.reward_loop_worker_handles = [FakeRewardWorker(config, worker.tokenizer, score_fn)]
    return worker


def scored_episode(two_agents, score_fn):
    alice, bob = two_agents
    config = team_config(alice, bob)
    servers = {"alice": ScriptedServer("alice", alice, "msg 7"), "bob": ScriptedServer("bob", bob, "#### 7")}
    outputs = run_episode(config, servers, **ROW)
    worker = make_worker(config, score_fn)
    row = {"data_source": "teamtr_tiny_add", "reward_model": {"ground_truth": "7"}, "extra_info": {"index": 0},
           "uid": "u1", "session_id": 0}
    asyncio.run(worker._compute_score(outputs, kwargs=row))
    return outputs


def test_a_stage0_probe_lets_the_incumbent_speak_in_its_own_tokens_then_the_newcomer_takes_over(two_agents, tmp_path):
    """A pending aligned swap of bob for a model with another tokenizer: the team config already names the newcomer,
    but a probe episode (PROBE_FIELD) is the incumbent's: his turn is rendered and decoded with the incumbent's
    tokenizer, the row names the model whose tokens it holds, and the reward reads the answer in them. Without the
    flag the same episode is the newcomer's."""
    from teamtr_verl.defaults import MODEL_FIELD, PROBE_FIELD

    alice, bob = two_agents
    newcomer = build_tiny_model(tmp_path / "bob_v2", seed=2, hidden_size=64)
    config = team_config(alice, bob, replace=f"{{agent: bob, model: '{newcomer}'}}")
    row = {"data_source": "teamtr_tiny_add", "reward_model": {"ground_truth": "7"}, "extra_info": {"index": 0},
           "uid": "u1", "session_id": 0}
    seen = []

    def score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        seen.append(solution_str)
        return 1.0

    for probe, speaker_model in ((True, bob), (False, newcomer)):
        servers = {"alice": ScriptedServer("alice", alice, "msg 7"),
                   "bob": ScriptedServer("bob", speaker_model, "#### 7")}
        outputs = run_episode(config, servers, **ROW, **({PROBE_FIELD: True} if probe else {}))
        assert [o.extra_fields[MODEL_FIELD] for o in outputs] == [str(alice), str(speaker_model)]
        assert servers["bob"].tokenizer.decode(outputs[-1].prompt_ids) == (
            "<|im_start|>system\nYou are bob.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n\nConversation so far:\n"
            "alice: msg 7<|im_end|>\n<|im_start|>assistant\n")  # rendered in the tokens of the model that spoke
        assert outputs[-1].extra_fields[TRANSCRIPT_FIELD][-1]["content"] == "#### 7"
        asyncio.run(make_worker(config, score)._compute_score(outputs, kwargs=dict(row)))
        assert seen[-1] == "#### 7"
    assert agent_tokenizer(str(bob)).get_vocab() != agent_tokenizer(str(newcomer)).get_vocab()


def test_reward_scores_the_answer_text_of_another_tokenizer_with_the_transcript(two_agents):
    seen = {}

    def score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        seen.update(solution=solution_str, truth=ground_truth, transcript=extra_info.get(TRANSCRIPT_FIELD))
        return 1.0 if solution_str == "#### 7" else 0.25

    outputs = scored_episode(two_agents, score)
    # bob's answer, in bob's tokens, reached the reward as the exact text, although the default tokenizer is alice's
    assert seen["solution"] == "#### 7" and seen["truth"] == "7"
    assert [m["agent"] for m in seen["transcript"]] == ["alice", "bob"]
    assert outputs[-1].reward_score == 1.0
    assert outputs[-1].extra_fields["reward_extra_info"] == {"acc": 1.0}
    assert outputs[-1].response_ids == agent_tokenizer(str(two_agents[1])).encode("#### 7", add_special_tokens=False)


@pytest.mark.parametrize("bad", [float("nan"), math.inf])
def test_non_finite_reward_drops_the_trajectory(two_agents, bad):
    with pytest.raises(TeamRewardError, match=r"reward returned (nan|inf) for uid=u1 session=0"):
        scored_episode(two_agents, lambda **kwargs: bad)


def test_raising_reward_drops_the_trajectory(two_agents):
    def broken(**kwargs):
        raise KeyError("no such field")

    with pytest.raises(TeamRewardError, match="reward raised for uid=u1 session=0: KeyError"):
        scored_episode(two_agents, broken)


def test_each_turn_is_sampled_with_the_episodes_common_random_numbers(two_agents):
    """With the trainer's per-prompt seed on the row, every turn asks vLLM for turn_seed(prompt seed, session, turn):
    the same numbers in every regeneration of a stage (only the updated agent then changes an episode); without it,
    no seed is sent (vLLM's own randomness, e.g. validation)."""
    from teamtr_verl.team import SEED_FIELD
    from teamtr_verl.team_logic import turn_seed

    alice, bob = two_agents
    config = team_config(alice, bob)
    servers = {"alice": ScriptedServer("alice", alice, "msg 7"), "bob": ScriptedServer("bob", bob, "#### 7")}
    for _ in range(2):  # two regenerations of the same episode
        run_episode(config, servers, session_id=3, **ROW, **{SEED_FIELD: 1234})
    run_episode(config, servers, session_id=4, **ROW, **{SEED_FIELD: 1234})
    expected = [turn_seed(1234, 3, 0), turn_seed(1234, 3, 0), turn_seed(1234, 4, 0)]
    assert servers["alice"].seeds == expected
    assert servers["bob"].seeds == [turn_seed(1234, 3, 1), turn_seed(1234, 3, 1), turn_seed(1234, 4, 1)]
    assert len(set(servers["alice"].seeds + servers["bob"].seeds)) == 4  # per session and turn, never shared
    run_episode(config, servers, **ROW)
    assert servers["alice"].seeds[-1] is None and servers["bob"].seeds[-1] is None


def test_each_turn_is_sampled_with_its_speakers_own_params_in_training_and_validation(two_agents):
    """alice samples at temperature 0.5 with a 2-token cap and a stop string, greedily in validation; bob has no
    sampling block and gets the loop's params unchanged in both."""
    from teamtr_verl.team import VALIDATE_KWARG

    alice, bob = two_agents
    config = team_config(alice, bob, alice_extra=", sampling: {temperature: 0.5, max_new_tokens: 2, stop: [END], "
                                                 "val_kwargs: {temperature: 0}}")
    servers = {"alice": ScriptedServer("alice", alice, "msg 7"), "bob": ScriptedServer("bob", bob, "#### 7")}
    run_episode(config, servers, **ROW)
    run_episode(config, servers, **ROW, **{VALIDATE_KWARG: True})
    assert servers["alice"].params == [{"temperature": 0.5, "max_tokens": 2, "stop": ["END"]},
                                       {"temperature": 0.0, "max_tokens": 2, "stop": ["END"]}]
    assert servers["bob"].params == [{"temperature": 1.0}, {"temperature": 1.0}]


def test_a_turn_is_rendered_with_its_speakers_own_chat_template(two_agents):
    """alice brings the team's own format (a plain-text template, thinking off through her template kwargs); bob
    keeps his tokenizer's ChatML. Each server receives exactly its speaker's rendering."""
    from omegaconf import OmegaConf

    alice, bob = two_agents
    config = team_config(alice, bob)
    OmegaConf.update(config, "teamtr.agents.0.chat_template",
                     "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                     "{% if not enable_thinking %}/no_think\n{% endif %}[assistant] ", force_add=True)
    OmegaConf.update(config, "teamtr.agents.0.chat_template_kwargs", {"enable_thinking": False}, force_add=True)
    servers = {"alice": ScriptedServer("alice", alice, "msg 7"), "bob": ScriptedServer("bob", bob, "#### 7")}
    run_episode(config, servers, **ROW)
    assert servers["alice"].tokenizer.decode(servers["alice"].prompts[0]) == (
        "[system] You are alice.\n[user] Secret x = 7. Tell bob.\n/no_think\n[assistant] ")
    assert servers["bob"].tokenizer.decode(servers["bob"].prompts[0]).startswith("<|im_start|>system\nYou are bob.")


def test_the_worker_tells_the_loop_whether_it_validates_and_keeps_the_flag_out_of_the_rows(two_agents, monkeypatch):
    from teamtr_verl.defaults import PREFIX_FIELD
    from teamtr_verl.team import VALIDATE_KWARG

    base = _TeamAgentLoopWorker.__mro__[1]  # verl's TransferQueue agent-loop worker
    seen = {}

    async def record_run(self, sampling_params, trajectory, **kwargs):
        seen["run"] = kwargs

    async def record_postprocess(self, output, validate, **kwargs):
        seen["postprocess"] = kwargs

    monkeypatch.setattr(base, "_run_agent_loop", record_run)
    monkeypatch.setattr(base, "_agent_loop_postprocess", record_postprocess)
    worker = _TeamAgentLoopWorker.__new__(_TeamAgentLoopWorker)
    for validate in (True, False):
        asyncio.run(worker._run_agent_loop({}, {"validate": validate}, agent_name="teamtr_handoff", uid="u"))
        assert seen["run"] == {"agent_name": "teamtr_handoff", "uid": "u", VALIDATE_KWARG: validate}
    asyncio.run(worker._agent_loop_postprocess([], True, uid="u", **{VALIDATE_KWARG: True, PREFIX_FIELD: "{}"}))
    assert seen["postprocess"] == {"uid": "u"}


# -- prefix reuse: an episode continued from the previous regeneration's first turns --------------------------------
class SampledServer:
    """A stochastic agent: replies ``choices[k]`` with probability ``probs(prompt text)[k]``, from the request's seed
    when one is given (vLLM's seeded sampling), else from its own RNG. Log-prob of the reply, one token."""

    def __init__(self, model_dir, choices, probs, rng_seed=0):
        import random

        self.tokenizer, self.choices, self.probs = agent_tokenizer(str(model_dir)), choices, probs
        self.rng, self.calls = random.Random(rng_seed), 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        import random

        self.calls += 1
        probs = self.probs(self.tokenizer.decode(prompt_ids))
        rng = self.rng if sampling_params.get("seed") is None else random.Random(sampling_params["seed"])
        k = rng.choices(range(len(self.choices)), weights=probs)[0]
        ids = self.tokenizer.encode(self.choices[k], add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[math.log(probs[k])] * len(ids), extra_fields={"global_steps": 5})


def chisquare_pvalue_3dof(observed, expected) -> float:
    """Pearson's chi-square test on 4 cells (3 degrees of freedom): P(chi2_3 >= x) = erfc(sqrt(x/2)) +
    sqrt(2x/pi) exp(-x/2) (the closed form for 3 degrees of freedom)."""
    x = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2)


def test_the_chi_square_closed_form():
    # the 95th and 99.9th percentiles of chi2 with 3 degrees of freedom (tables): 7.815 and 16.266
    assert chisquare_pvalue_3dof([7.815 ** 0.5 * 10 + 100, 100, 100, 100], [100] * 4) == pytest.approx(0.05, abs=1e-4)
    assert chisquare_pvalue_3dof([16.266 ** 0.5 * 10 + 100, 100, 100, 100], [100] * 4) == pytest.approx(0.001, abs=1e-5)


def prefix_of(outputs, keep):
    """What the trainer passes for one session: the first ``keep`` turns of an earlier episode, in turn order."""
    by_turn = sorted(outputs, key=lambda o: o.extra_fields[TURN_FIELD])
    return [[o.prompt_ids, o.response_ids, o.response_logprobs, {"global_steps": o.extra_fields["global_steps"]}]
            for o in by_turn[:keep]]


ALICE_SAYS = (0.3, 0.7)  # alice: "msg 0" / "msg 1"


def bob_old(prompt):
    return (0.5, 0.5)


def bob_new(prompt):  # bob after his update: copies alice's digit with probability 0.9
    return (0.9, 0.1) if "alice: msg 0" in prompt else (0.1, 0.9)


def test_a_reused_prefix_is_kept_verbatim_and_only_later_turns_are_sampled(two_agents):
    import json

    from teamtr_verl.defaults import PREFIX_FIELD, REUSED_FIELD

    alice, bob = two_agents
    config = team_config(alice, bob)
    old = {"alice": SampledServer(alice, ["msg 0", "msg 1"], lambda p: ALICE_SAYS),
           "bob": SampledServer(bob, ["#### 0", "#### 1"], bob_old)}
    before = run_episode(config, old, session_id=2, teamtr_seed=99, **ROW)
    new = {"alice": SampledServer(alice, ["msg 0", "msg 1"], lambda p: ALICE_SAYS),
           "bob": SampledServer(bob, ["#### 0", "#### 1"], bob_new)}
    prefix = json.dumps({"2": prefix_of(before, 1), "5": []})
    after = run_episode(config, new, session_id=2, teamtr_seed=99, **ROW, **{PREFIX_FIELD: prefix})
    assert (new["alice"].calls, new["bob"].calls) == (0, 1)  # alice's turn was not generated again
    assert after[0].prompt_ids == before[0].prompt_ids and after[0].response_ids == before[0].response_ids
    assert after[0].response_logprobs == before[0].response_logprobs
    assert [o.extra_fields[REUSED_FIELD] for o in after] == [True, False]
    assert after[0].extra_fields["global_steps"] == 5 and after[0].extra_fields[AGENT_FIELD] == "alice"
    # with the same seeds a full regeneration of the new team is the very same episode (alice unchanged)
    full = run_episode(config, new, session_id=2, teamtr_seed=99, **ROW)
    assert [(o.prompt_ids, o.response_ids, o.response_logprobs) for o in full] == [
        (o.prompt_ids, o.response_ids, o.response_logprobs) for o in after]
    assert after[-1].extra_fields[TRANSCRIPT_FIELD] == full[-1].extra_fields[TRANSCRIPT_FIELD]


def test_reused_prefix_rollouts_have_the_distribution_of_a_full_regeneration(two_agents):
    """Unseeded sampling, 400 episodes each: (alice's digit, bob's digit) under reuse -- alice's turn from a rollout
    of the *old* team, bob's from the new one -- against the exact distribution of the new team, by a chi-square
    test; a full regeneration passes the same test, and reusing bob's old turn too (a wrong prefix) fails it."""
    import json

    from teamtr_verl.defaults import PREFIX_FIELD

    alice, bob = two_agents
    config = team_config(alice, bob)

    def servers(bob_probs, seed):
        return {"alice": SampledServer(alice, ["msg 0", "msg 1"], lambda p: ALICE_SAYS, rng_seed=seed),
                "bob": SampledServer(bob, ["#### 0", "#### 1"], bob_probs, rng_seed=seed + 1)}

    def digits(outputs):
        return tuple(int(m["content"][-1]) for m in outputs[-1].extra_fields[TRANSCRIPT_FIELD])

    n = 400
    exact = {(a, b): ALICE_SAYS[a] * bob_new(f"alice: msg {a}")[b] for a in (0, 1) for b in (0, 1)}
    old_loop, new_loop, full_loop = (make_loop(config, servers(bob_old, 10)), make_loop(config, servers(bob_new, 20)),
                                     make_loop(config, servers(bob_new, 30)))
    previous = [run_episode(config, None, loop=old_loop, **ROW) for _ in range(n)]

    def counts(episodes):
        observed = {pair: 0 for pair in exact}
        for outputs in episodes:
            observed[digits(outputs)] += 1
        return [observed[pair] for pair in exact]

    expected = [n * p for p in exact.values()]
    reused = [run_episode(config, None, loop=new_loop, **ROW, **{PREFIX_FIELD: json.dumps({"0": prefix_of(e, 1)})})
              for e in previous]
    full = [run_episode(config, None, loop=full_loop, **ROW) for _ in range(n)]
    assert chisquare_pvalue_3dof(counts(reused), expected) > 1e-3
    assert chisquare_pvalue_3dof(counts(full), expected) > 1e-3
    wrong = [run_episode(config, None, loop=new_loop, **ROW, **{PREFIX_FIELD: json.dumps({"0": prefix_of(e, 2)})})
             for e in previous]  # bob's old turn kept as well: the old team's distribution, far from the new one
    assert chisquare_pvalue_3dof(counts(wrong), expected) < 1e-6
