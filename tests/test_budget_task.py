"""The budget-sq task (teamtr_verl/fixtures/budget.py): the dense team reward read from every agent's message, views
that hold only T with the transcript hidden, the dataset, and a warm start that is well-formed but uncoordinated."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from teamtr_verl.config import AgentSpec, HandoffSpec
from teamtr_verl.fixtures import budget
from teamtr_verl.fixtures.rewards import compute_score
from teamtr_verl.team_logic import Message, agent_view, build_agent_messages

NAMES3 = ("alice", "bob", "carol")


def transcript(*contents, names=NAMES3):
    """What the teamtr_handoff loop writes into extra_info["teamtr_transcript"] for a chain episode."""
    return [{"agent": name, "turn": turn, "content": text} for turn, (name, text) in enumerate(zip(names, contents))]


def score(target, *contents, names=NAMES3):
    extra_info = {"agent_views": budget.agent_views(names, target), "teamtr_transcript": transcript(*contents,
                                                                                                    names=names)}
    return compute_score(budget.BUDGET_SOURCE, contents[-1], str(target), extra_info=extra_info)


# ------------------------------------------------------------------------------------------------ reward


@pytest.mark.parametrize("num_agents, expected", [(2, (1, 3)), (3, (1, 5)), (4, (2, 6)), (5, (2, 8)), (8, (4, 12))])
def test_target_range_is_the_research_scripts(num_agents, expected):
    # budget.py's make_cfg: Smax = 2N, T in [Smax // 4, Smax - Smax // 4] = [floor(N/2), ceil(3N/2)]
    assert (min(budget.target_range(num_agents)), max(budget.target_range(num_agents))) == expected
    assert list(budget.target_range(num_agents)) == list(range(expected[0], expected[1] + 1))


def test_a_team_needs_two_agents():
    with pytest.raises(ValueError, match="at least 2 agents"):
        budget.target_range(1)
    with pytest.raises(ValueError, match="at least 2 agents"):
        budget.agent_views(["alice"], 1)


@pytest.mark.parametrize("text, expected", [
    ("share: 0", 0), ("share: 2", 2), ("  share:1 ", 1), ("share:   2\n", 2),
    ("share: 3", None), ("share: 02", None), ("share: -1", None), ("share: 1 2", None), ("Share: 1", None),
    ("share 1", None), ("1", None), ("share: 1 share: 1", None), ("share: one", None), ("", None), (None, None),
])
def test_parse_share(text, expected):
    assert budget.parse_share(text) == expected


@pytest.mark.parametrize("target, shares, expected", [
    (3, (1, 1, 2), -1.0),   # sum 4: (4 - 3)^2 = 1
    (3, (0, 1, 2), 0.0),    # exact
    (3, (2, 2, 2), -9.0),   # sum 6
    (1, (2, 2, 2), -25.0),  # sum 6, T = 1: the worst well-formed outcome for T = 1
    (5, (0, 0, 0), -25.0),
    (3, (0, 0, 0), -9.0),
])
def test_team_reward_by_hand(target, shares, expected):
    assert budget.team_reward(shares, target) == expected
    assert score(target, *(f"share: {d}" for d in shares)) == expected


@pytest.mark.parametrize("target, worst", [(1, -25.0), (2, -16.0), (3, -9.0), (4, -16.0), (5, -25.0)])
def test_a_malformed_message_scores_the_worst_well_formed_value(target, worst):
    """N = 3: the worst well-formed sums are 0 and 6, so the worst reward is -max(T, 6 - T)^2."""
    assert budget.worst_reward(3, target) == worst
    for bad in ("share: 3", "#### 1", "", "share: 1<junk>"):
        for position in range(3):
            contents = ["share: 1"] * 3
            contents[position] = bad
            assert score(target, *contents) == worst
    # a malformed message never beats a well-formed one
    assert worst == min(budget.team_reward((a, b, c), target) for a in range(3) for b in range(3) for c in range(3))


def test_the_reward_reads_every_message_not_only_the_scored_one():
    assert score(3, "share: 1", "share: 1", "share: 2") == -1.0
    assert score(3, "share: 0", "share: 1", "share: 2") == 0.0  # only alice's message changed
    assert score(3, "share: 2", "share: 2", "share: 2") == -9.0
    # the transcript as parquet/numpy may hand it over
    extra_info = {"agent_views": budget.agent_views(NAMES3, 3),
                  "teamtr_transcript": np.array(transcript("share: 0", "share: 0", "share: 1"), dtype=object)}
    assert budget.budget_score("share: 1", "3", extra_info) == -4.0
    # without agent_views the transcript's own speakers are the team
    assert budget.budget_score("share: 2", 3, {"teamtr_transcript": transcript("share: 1", "share: 1", "share: 2")}) \
        == -1.0


def test_the_reward_refuses_transcripts_of_another_game():
    views = budget.agent_views(NAMES3, 3)
    with pytest.raises(ValueError, match="teamtr_transcript"):
        compute_score(budget.BUDGET_SOURCE, "share: 1", "3", extra_info={"agent_views": views})
    with pytest.raises(ValueError, match="one message from each of"):  # carol never spoke
        budget.budget_score("share: 1", "3", {"agent_views": views,
                                              "teamtr_transcript": transcript("share: 1", "share: 1")})
    twice = transcript("share: 1", "share: 1", "share: 1") + [{"agent": "alice", "turn": 3, "content": "share: 0"}]
    with pytest.raises(ValueError, match="one message from each of"):  # a round-robin router
        budget.budget_score("share: 0", "3", {"agent_views": views, "teamtr_transcript": twice})


def test_transcript_key_is_the_one_the_handoff_loop_writes():
    from teamtr_verl.team import TRANSCRIPT_FIELD

    assert budget.TRANSCRIPT_KEY == TRANSCRIPT_FIELD


# ------------------------------------------------------------------------------------------------ views, dataset


def test_each_view_holds_only_t():
    views = budget.agent_views(("alice", "bob", "carol", "dave"), 5)
    assert views == {"alice": "You are agent 1 of 4. Target T = 5. Give your share.",
                     "bob": "You are agent 2 of 4. Target T = 5. Give your share.",
                     "carol": "You are agent 3 of 4. Target T = 5. Give your share.",
                     "dave": "You are agent 4 of 4. Target T = 5. Give your share."}
    for name, text in views.items():  # no other agent is named, and the only numbers are j, N and T
        assert not any(other in text for other in views if other != name)


def test_no_agent_sees_what_the_others_said():
    """The loop builds agent j's input from agent_view(row) + the transcript so far; in this game the row hides the
    transcript, so the input is the agent's view alone, whatever the earlier agents said."""
    row = budget.budget_rows(NAMES3, 1, "train", seed=0)[0]
    target = int(row["reward_model"]["ground_truth"])
    assert row["extra_info"]["show_transcript"] is False
    said = ["share: 2", "share: 0"]
    for position, name in enumerate(NAMES3):
        heard = [Message(speaker=NAMES3[t], turn=t, content=said[t]) for t in range(position)]
        loop_chat = build_agent_messages(AgentSpec(name=name, model=""),
                                         agent_view(row["extra_info"], row["prompt"], name), heard, HandoffSpec())
        assert loop_chat == [{"role": "user", "content": budget.view_text(position, 3, target)}]
        assert budget.agent_input(NAMES3, position, target, said[:position]) == loop_chat
        assert budget.agent_input(NAMES3, position, target) == loop_chat


def test_rows_are_balanced_over_the_target_range():
    rows = budget.budget_rows(NAMES3, 25, "train", seed=4)
    targets = [int(r["reward_model"]["ground_truth"]) for r in rows]
    assert sorted(targets) == sorted(list(range(1, 6)) * 5)  # T in [1, 5] for N = 3, each 5 times
    assert targets != sorted(targets)  # shuffled
    assert [r["extra_info"]["index"] for r in rows] == list(range(25))
    assert rows[0]["extra_info"]["agent_views"] == budget.agent_views(NAMES3, targets[0])
    assert {r["data_source"] for r in rows} == {"teamtr_budget_sq"}


# ------------------------------------------------------------------------------------------------ the built team


@pytest.fixture(scope="module")
def team_dir(tmp_path_factory):
    """A three-agent team built through the CLI (default warm start)."""
    from teamtr_verl.fixtures.__main__ import main

    out = tmp_path_factory.mktemp("budget_team")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["budget", str(out), "--agents", *NAMES3, "--seed", "0"])
    assert printed.getvalue().startswith(f"budget team in {out}: ")
    return out


def _models(team_dir):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(team_dir / NAMES3[0]))
    return tokenizer, [Qwen2ForCausalLM.from_pretrained(str(team_dir / name)).eval() for name in NAMES3]


def test_dataset_is_in_verl_layout_with_the_target_range(team_dir):
    import pandas as pd
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    train = pd.read_parquet(team_dir / "data" / "train.parquet")
    test = pd.read_parquet(team_dir / "data" / "test.parquet")
    assert list(train.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(train) == 320 and len(test) == 10
    targets = [int(r["ground_truth"]) for r in train["reward_model"]]
    assert set(targets) == set(budget.target_range(3)) == {1, 2, 3, 4, 5}
    assert all(targets.count(t) == 64 for t in range(1, 6))
    # what the agent loop gets: verl's dataset row, whose extra_info still hides the transcript
    tokenizer = AutoTokenizer.from_pretrained(str(team_dir / NAMES3[0]))
    config = OmegaConf.create({"max_prompt_length": 48, "filter_overlong_prompts": False, "return_raw_chat": True})
    row = RLHFDataset(data_files=str(team_dir / "data" / "train.parquet"), tokenizer=tokenizer, config=config)[0]
    target = int(row["reward_model"]["ground_truth"])
    heard = [Message(speaker="alice", turn=0, content="share: 2")]
    task = agent_view(row["extra_info"], row["raw_prompt"], "bob")
    chat = build_agent_messages(AgentSpec(name="bob", model=""), task, heard, HandoffSpec())
    assert chat == [{"role": "user", "content": budget.view_text(1, 3, target)}]


def test_warm_started_team_is_well_formed_but_not_coordinated(team_dir):
    """Exact, from the models' probabilities of 'share: d' + eos: every agent is well-formed for every T, undecided
    between the shares, and the team's expected reward is far from the optimum 0."""
    tokenizer, models = _models(team_dir)
    per_agent = [budget.share_probabilities(model, tokenizer, NAMES3, position) for position, model in
                 enumerate(models)]
    for probs_by_target in per_agent:
        for probs in probs_by_target.values():
            assert sum(probs) > 0.95  # well-formed
            assert min(probs) > 0.1 and max(probs) < 0.6  # near uniform: no agent has settled on a share
    expected_reward, accuracy = budget.team_start_values(per_agent)
    # uniform independent shares: -(Var(sum) + E(T - 3)^2) = -(3 * 2/3 + 2) = -4
    assert -8.0 < expected_reward < -2.5
    assert accuracy < 0.35  # the optimum is 1: the shares add up to T with certainty


def test_sampled_shares_parse_and_the_sampled_team_is_far_from_optimal(team_dir):
    tokenizer, models = _models(team_dir)
    torch.manual_seed(0)
    samples = 8
    shares = {}  # (position, T) -> sampled shares
    for position, model in enumerate(models):
        for target in budget.target_range(3):
            chat = budget.agent_input(NAMES3, position, target)
            ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)] * samples)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True,
                                 top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            shares[position, target] = [budget.parse_share(text) for text in texts]
    flat = [share for values in shares.values() for share in values]
    assert sum(share is not None for share in flat) >= 0.9 * len(flat)
    assert {0, 1, 2} <= set(flat)
    rewards = [budget.team_reward([shares[p, target][k] for p in range(3)], target)
               for target in budget.target_range(3) for k in range(samples)]
    assert sum(rewards) / len(rewards) < -1.0
    assert all(math.isfinite(r) and r <= 0 for r in rewards)


def test_budget_config_composes_and_fits_the_prompts(tmp_path, team_dir):
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from teamtr_verl.rollout import CONFIG_DIR
    from teamtr_verl.validation import validate_teamtr_config

    names = ("alice", "bob", "carol", "dave")
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    agents = ", ".join(f"{{name: {name}, model: '{tmp_path / name}'}}" for name in names)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        config = compose(config_name="teamtr_budget_cpu", overrides=[
            f"teamtr.agents=[{agents}]", f"data.train_files={team_dir / 'data' / 'train.parquet'}",
            f"data.val_files={team_dir / 'data' / 'test.parquet'}"])
    team = validate_teamtr_config(config)
    assert team.agent_names == names and team.router.kind == "chain" and team.schedule == "teamtr"
    assert config.reward.custom_reward_function.path == "pkg://teamtr_verl.fixtures.rewards"
    assert config.data.train_batch_size // config.actor_rollout_ref.actor.ppo_mini_batch_size == 4
    # every agent's prompt and reply fit the configured lengths (a 3-agent tokenizer; the views differ only in j, N)
    tokenizer = AutoTokenizer.from_pretrained(str(team_dir / NAMES3[0]))
    longest = max(len(tokenizer.apply_chat_template(budget.agent_input(NAMES3, p, t), add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
                  for p in range(3) for t in budget.target_range(3))
    reply = len(tokenizer.encode("share: 2", add_special_tokens=False)) + 1
    assert longest <= config.data.max_prompt_length and reply <= config.data.max_response_length
    assert longest + config.data.max_response_length <= config.actor_rollout_ref.rollout.max_model_len


# ------------------------------------------------------------------------------------------------ through the loop


class _ScriptedServer:
    """One agent's server (no vLLM): answers every request with a fixed text; records the prompts it was sent."""

    def __init__(self, model_dir, reply):
        from teamtr_verl.team import agent_tokenizer

        self.tokenizer, self.reply, self.prompts = agent_tokenizer(str(model_dir)), reply, []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.prompts.append(list(prompt_ids))
        ids = self.tokenizer.encode(self.reply, add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={})


class _RewardHandle:
    """A reward-worker handle without Ray: verl's own NaiveRewardManager with the fixtures' compute_score."""

    def __init__(self, config, tokenizer):
        self.compute_score = self
        self.config, self.tokenizer = config, tokenizer

    def remote(self, data):
        from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

        return NaiveRewardManager(self.config, self.tokenizer, compute_score).run_single(data)


def test_the_handoff_loop_hides_the_transcript_and_the_reward_sees_every_share(team_dir):
    """The teamtr_handoff agent loop (scripted servers, no Ray or vLLM) on a budget row: each agent is sent its view
    alone, and verl's reward path scores the shares of all three messages."""
    import asyncio

    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from teamtr_verl.rollout import CONFIG_DIR, compose
    from teamtr_verl.team import TeamHandoffAgentLoop, TeamLLMClient, _TeamAgentLoopWorker, agent_tokenizer

    agents = ", ".join(f"{{name: {name}, model: '{team_dir / name}'}}" for name in NAMES3)
    config = compose(str(CONFIG_DIR), "teamtr_budget_cpu", [f"teamtr.agents=[{agents}]", "trainer.n_gpus_per_node=3"])
    row = budget.budget_rows(NAMES3, 1, "train", seed=0)[0]
    target = int(row["reward_model"]["ground_truth"])
    servers = {name: _ScriptedServer(team_dir / name, f"share: {share}") for name, share in zip(NAMES3, (2, 2, 1))}
    tokenizer = agent_tokenizer(str(team_dir / NAMES3[0]))
    loop = TeamHandoffAgentLoop(
        trainer_config=DictConfigWrap(config), server_manager=TeamLLMClient(config, servers, default_agent="alice"),
        tokenizer=tokenizer, processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data))
    outputs = asyncio.run(loop.run({"temperature": 1.0}, uid="u1", session_id=0, raw_prompt=row["prompt"],
                                   extra_info=row["extra_info"]))
    for position, name in enumerate(NAMES3):
        assert tokenizer.decode(servers[name].prompts[0]) == (
            f"<|im_start|>user\n{budget.view_text(position, 3, target)}<|im_end|>\n<|im_start|>assistant\n")

    worker = _TeamAgentLoopWorker.__new__(_TeamAgentLoopWorker)
    worker.config, worker.processor, worker.mm_processor_kwargs = config, None, {}
    worker.tokenizer = tokenizer
    worker.reward_loop_worker_handles = [_RewardHandle(config, tokenizer)]
    kwargs = {key: row[key] for key in ("data_source", "reward_model", "extra_info")}
    asyncio.run(worker._compute_score(outputs, kwargs={**kwargs, "uid": "u1", "session_id": 0}))
    assert outputs[-1].reward_score == budget.team_reward((2, 2, 1), target) == -float((5 - target) ** 2)
