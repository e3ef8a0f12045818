"""The TeamTR stage loop (``TeamTRTrainer.step``) on stubs: no Ray, no vLLM, no TransferQueue.

As in verl's own ``tests/trainer/ppo/v1/test_trainer_base_on_cpu.py``, the trainer is built with
``TeamTRTrainer.__new__`` and given by hand exactly the attributes the stage loop reads: the composed
``teamtr_tiny_cpu`` config, the team, its state, and one fake stack per agent. Every fake (worker group, checkpoint
manager) and every stubbed trainer method writes into ONE shared event log, so a test can assert the exact order of
a stage: who regenerates, who is updated, who is line-searched, who is synced, and that nothing of agent k happens
during agent j's update.

The measured KL is scripted per agent: ``_fresh_log_probs`` returns one masked row per message of the agent, with
``new = old − shift/T`` on each of its T tokens; under the ``k1`` estimator (``−log r`` per token, summed per message,
averaged over messages) the real ``algos.token_kl_monitor`` then measures exactly the mean of the shifts. What stays
real: ``step``, ``_update_agent`` (the δ line search), ``_set_agent_beta``, ``_update_record``, ``_record_update``,
``_advance_happo_factor``, ``_sync``, ``_on_regenerated``, ``_log_stage`` and everything in ``teamtr_verl.algos``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transfer_queue import KVBatchMeta

import teamtr_verl.trainer as trainer_module
from teamtr_verl.config import AgentSpec, TeamConfig
from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.rollout import CONFIG_DIR, compose
from teamtr_verl.rollout_batch import TeamRollout
from teamtr_verl.state import TeamTRState
from teamtr_verl.topology import agent_trainer_config
from teamtr_verl.trainer import NonFiniteUpdateError, TeamTRTrainer
from verl.workers.utils.losses import ppo_loss

NAMES = ("alice", "bob", "carol")
PROMPTS, SESSIONS, TOKENS = 2, 2, 2  # 2 prompts x rollout.n=2 -> 4 team trajectories; 2 tokens per message
# Per trajectory (u0_0, u0_1, u1_0, u1_1): its bounded advantage and its return offset around the regeneration mean.
TRAJ_ADVANTAGE = (1.0, -1.0, 0.5, -0.5)
TRAJ_RETURN_OFFSET = (0.5, -0.5, 0.25, -0.25)
RETURN_STEP = 0.25  # regeneration g has mean team return 0.25·g: every measured gain is exactly 0.25
DEFAULT_SHIFT = 0.004  # an unscripted update moves each message by KL 0.004 < δ = 0.01: accepted at once
LOOP_EVENTS = ("regenerate", "sleep", "old_log_prob", "update", "kl_check", "sync")


# ----------------------------------------------------------------------------------------------------- configs
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("team_models")
    return [build_tiny_model(root / name, seed=i, hidden_size=64, vocab_size=300) for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def base_configs(model_dirs):
    """The real teamtr_tiny_cpu config, composed once per team size (2 and 3 agents), one device per agent."""
    configs = {}
    for size in (2, 3):
        agents = ", ".join(f"{{name: {n}, model: '{d}'}}" for n, d in zip(NAMES[:size], model_dirs[:size]))
        configs[size] = compose(str(CONFIG_DIR), "teamtr_tiny_cpu", [
            f"teamtr.agents=[{agents}]", f"trainer.n_gpus_per_node={size}", "teamtr.kl_estimator=k1"])
    return configs


@pytest.fixture(scope="module")
def agent_configs(base_configs):
    """Each agent's own trainer config (topology.agent_trainer_config), built once: the stage loop only reads it."""
    return {(size, agent.name): agent_trainer_config(config, agent)
            for size, config in base_configs.items()
            for agent in TeamConfig.from_config(config.teamtr).agents}


def team_config(base_configs, size=2, **teamtr):
    """A copy of the composed config with ``teamtr.<key>=<value>`` set (only the teamtr block differs)."""
    config = copy.deepcopy(base_configs[size])
    for key, value in teamtr.items():
        OmegaConf.update(config, f"teamtr.{key}", value)
    return config


# ------------------------------------------------------------------------------------------------------- fakes
class FakeWorkerGroup:
    """One agent's actor worker group: the calls the stage loop makes, recorded into the shared log."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def snapshot_actor_weights(self):
        self.log.append(("snapshot", self.name))

    def blend_actor_weights(self, alpha):
        self.log.append(("blend", self.name, alpha))

    def restore_actor_weights(self):
        self.log.append(("restore", self.name))

    def set_loss_fn(self, loss_fn):
        assert loss_fn.func is ppo_loss
        self.log.append(("set_loss_fn", self.name, loss_fn.keywords["config"].policy_loss.ppo_kl_coef))

    def save_checkpoint(self, local_path, hdfs_path, global_steps, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        self.log.append(("save", self.name, local_path, global_steps))

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.log.append(("load", self.name, local_path))


class FakeCheckpointManager:
    def __init__(self, name, log):
        self.name, self.log = name, log
        self.synced_steps = []

    def update_weights(self, global_steps):
        self.synced_steps.append(global_steps)
        self.log.append(("sync", self.name))

    def sleep_replicas(self):
        self.log.append(("sleep", self.name))


@dataclass
class FakeStack:
    name: str
    config: object
    worker_group: FakeWorkerGroup
    checkpoint_manager: FakeCheckpointManager
    server_manager: object = None


class FakeDataloader:
    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def trajectory_index(key: str) -> int:
    """``u{p}g{g}_{s}_{turn}`` -> p·SESSIONS + s."""
    uid, session, _ = key.split("_")
    return int(uid[1:].split("g")[0]) * SESSIONS + int(session)


def fake_rollout(names, generation) -> TeamRollout:
    """A chain rollout: every trajectory has one message per agent, in config order, keys ``u{p}g{g}_{s}_{turn}``."""
    keys, agents, trajectories = [], [], []
    for p in range(PROMPTS):
        for s in range(SESSIONS):
            for turn, name in enumerate(names):
                keys.append(f"u{p}g{generation}_{s}_{turn}")
                agents.append(name)
                trajectories.append(f"u{p}g{generation}_{s}")
    order = list(dict.fromkeys(trajectories))
    advantage = np.array([TRAJ_ADVANTAGE[order.index(t)] for t in trajectories], dtype=np.float32)
    returns = {t: RETURN_STEP * generation + TRAJ_RETURN_OFFSET[i] for i, t in enumerate(order)}
    return TeamRollout(
        meta=KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys]),
        agent=agents, trajectory=trajectories, advantage=advantage, normalized=advantage.copy(),
        group_size=np.full(len(keys), 2.0), returns=returns, return_mean=float(np.mean(list(returns.values()))),
        group_std_mean=0.5, expected_trajectories=PROMPTS * SESSIONS,
    )


class Script:
    """What each agent's update does: a queue of KL shifts per agent (a float: every message moves by it; a
    callable key -> shift: per message), and a queue of verl update metrics per agent."""

    def __init__(self, kl=None, update_metrics=None):
        self.kl = defaultdict(deque, {k: deque(v) for k, v in (kl or {}).items()})
        self.update_metrics = defaultdict(deque, {k: deque(v) for k, v in (update_metrics or {}).items()})

    def next_shift(self, name):
        return self.kl[name].popleft() if self.kl[name] else DEFAULT_SHIFT


@pytest.fixture
def make_trainer(monkeypatch, agent_configs):
    """``make_trainer(config, log, script=None, global_steps=1)``: a stubbed trainer (see :func:`stub_trainer`)."""
    return functools.partial(stub_trainer, monkeypatch, agent_configs)


def stub_trainer(monkeypatch, agent_configs, config, log, script=None, global_steps=1):
    """``TeamTRTrainer.__new__`` with exactly the attributes and collaborators the stage loop uses."""
    script = script or Script()
    trainer = TeamTRTrainer.__new__(TeamTRTrainer)
    trainer.config = config
    trainer.team = TeamConfig.from_config(config.teamtr)
    trainer.state = TeamTRState.initial(trainer.team)
    trainer.stacks = {
        agent.name: FakeStack(agent.name, agent_configs[len(trainer.team.agents), agent.name],
                              FakeWorkerGroup(agent.name, log),
                              FakeCheckpointManager(agent.name, log))
        for agent in trainer.team.agents
    }
    trainer.global_steps = global_steps
    trainer.use_reference_policy = False
    trainer.written_advantages = []  # (agent, {key: advantage}) per write_advantages call
    generations = iter(range(1, 10_000))

    def bound_agent():
        return trainer.actor_rollout_wg.name  # _bind points actor_rollout_wg at the updated agent's worker group

    def regenerate(prompts, metrics):
        assert prompts == "prompts"
        log.append(("regenerate",))
        rollout = fake_rollout(trainer.team.agent_names, next(generations))
        trainer._on_regenerated(rollout, metrics)  # the real gain bookkeeping of a regeneration
        return rollout

    def compute_old_log_prob(batch, metrics):
        log.append(("old_log_prob", bound_agent()))
        return batch

    def update_actor(batch, update_metrics):
        name = bound_agent()
        log.append(("update", name))
        if script.update_metrics[name]:
            update_metrics.update(script.update_metrics[name].popleft())

    def fresh_log_probs(batch):
        name = bound_agent()
        log.append(("kl_check", name))
        entry = script.next_shift(name)
        shifts = torch.tensor([entry(key) if callable(entry) else entry for key in batch.keys], dtype=torch.float32)
        old = torch.full((len(batch), TOKENS), -1.0)
        new = old - shifts[:, None] / TOKENS
        return {"old": old, "new": new, "mask": torch.ones_like(old, dtype=torch.bool), "real_keys": list(batch.keys)}

    def write_advantages(batch, row_advantage):
        trainer.written_advantages.append((bound_agent(), dict(row_advantage)))
        return batch

    trainer._next_train_batch = lambda: "prompts"
    trainer._regenerate = regenerate
    trainer._balance_batch = lambda batch, metrics=None: batch
    trainer._compute_old_log_prob = compute_old_log_prob
    trainer._update_actor = update_actor
    trainer._fresh_log_probs = fresh_log_probs
    monkeypatch.setattr(trainer_module, "write_advantages", write_advantages)
    return trainer


def loop_events(log):
    return [event for event in log if event[0] in LOOP_EVENTS]


def agent_block(name, sync=True):
    # sleep: the agent's own servers free their memory for its update; the sync wakes them
    return ([("sleep", name), ("old_log_prob", name), ("update", name), ("kl_check", name)]
            + ([("sync", name)] if sync else []))


REGEN = [("regenerate",)]


# ---------------------------------------------------------------------------------------------- stage sequence
@pytest.mark.parametrize("schedule, resample_every, size, expected", [
    ("teamtr", None, 2, REGEN + agent_block("alice") + REGEN + agent_block("bob")),
    ("teamtr", None, 3, REGEN + agent_block("alice") + REGEN + agent_block("bob") + REGEN + agent_block("carol")),
    # every 2nd update: before updates 0 and 2 only
    ("teamtr", 2, 3, REGEN + agent_block("alice") + agent_block("bob") + REGEN + agent_block("carol")),
    ("stale", None, 3, REGEN + agent_block("alice") + agent_block("bob") + agent_block("carol")),
    ("happo", None, 3, REGEN + agent_block("alice") + agent_block("bob") + agent_block("carol")),
    # every agent trained from the pre-stage team; all published together at the end
    ("joint", None, 3, REGEN + agent_block("alice", False) + agent_block("bob", False) + agent_block("carol", False)
     + [("sync", "alice"), ("sync", "bob"), ("sync", "carol")]),
])
def test_one_stage_event_sequence(make_trainer, base_configs, schedule, resample_every, size, expected):
    log = []
    config = team_config(base_configs, size, schedule=schedule, resample_every=resample_every)
    trainer = make_trainer(config, log, global_steps=4)
    metrics = {}
    result = trainer.step(metrics, {})
    assert loop_events(log) == expected
    regenerations = sum(1 for e in log if e == ("regenerate",))
    # the returned meta lists every key of every regeneration exactly once (verl's fit() clears them)
    assert len(result.keys) == len(set(result.keys)) == regenerations * PROMPTS * SESSIONS * size
    assert trainer.state.stages_done == 4
    names = NAMES[:size]
    assert [metrics[f"teamtr/{n}/position"] for n in names] == list(range(size))
    assert all(metrics[f"teamtr/{n}/committed"] == 1.0 for n in names)
    assert "teamtr/stage/certificate" in metrics and math.isfinite(metrics["teamtr/stage/certificate"])


def test_one_agent_step_full_event_sequence(make_trainer, base_configs):
    """Every call of alice's step, in order: snapshot before the update, β pushed before the update."""
    log = []
    trainer = make_trainer(team_config(base_configs, 2), log)
    trainer.step({}, {})
    alice = log[:log.index(("sync", "alice")) + 1]
    assert alice == [("regenerate",), ("sleep", "alice"), ("old_log_prob", "alice"), ("snapshot", "alice"),
                     ("set_loss_fn", "alice", 0.1), ("update", "alice"), ("kl_check", "alice"), ("sync", "alice")]


@pytest.mark.parametrize("schedule", ["teamtr", "stale", "joint", "happo"])
def test_only_the_updated_agent_is_touched_during_its_step(make_trainer, base_configs, schedule):
    """bob's update is line-searched then given up (blend, blend, restore); no call reaches alice or carol then."""
    log = []
    script = Script(kl={"bob": [0.5, 0.4, 0.3]})
    trainer = make_trainer(team_config(base_configs, 3, schedule=schedule, max_backtracks=2), log, script,
                           global_steps=6)
    trainer.step({}, {})
    for name in NAMES:
        # agent `name`'s step: from putting its servers to sleep up to the next regeneration or the next agent's step
        start = log.index(("sleep", name))
        end = next((i for i in range(start + 1, len(log))
                    if log[i] == ("regenerate",) or (log[i][0] == "sleep" and log[i][1] != name)), len(log))
        window = log[start:end]
        if schedule == "joint":  # the trailing syncs of the whole team are not part of the last agent's step
            window = [e for e in window if e[0] != "sync"]
        else:
            assert window[-1] == ("sync", name), f"{name}'s step must end with its own sync: {window}"
        assert all(e[1] == name for e in window), f"{name}'s step touched another agent: {window}"
    assert [e for e in log if e[0] in ("blend", "restore")] == [
        ("blend", "bob", 0.5), ("blend", "bob", 0.25), ("restore", "bob")]
    for name, stack in trainer.stacks.items():
        assert stack.checkpoint_manager.synced_steps == [6], f"{name} is synced exactly once per stage"
        assert [e for e in log if e[1:2] == (name,) and e[0] in ("snapshot", "update")] == [
            ("snapshot", name), ("update", name)]


# --------------------------------------------------------------------------------------------------------- orders
def orders_over_stages(make_trainer, base_configs, stages=5, **teamtr):
    log = []
    trainer = make_trainer(team_config(base_configs, 3, **teamtr), log)
    orders = []
    for stage in range(1, stages + 1):
        trainer.global_steps = stage
        start = len(log)
        trainer.step({}, {})
        orders.append("".join(e[1][0] for e in log[start:] if e[0] == "update"))
    return orders


def test_fixed_and_reversed_orders(make_trainer, base_configs):
    assert orders_over_stages(make_trainer, base_configs, 2, order="fixed") == ["abc", "abc"]
    assert orders_over_stages(make_trainer, base_configs, 2, order="reversed") == ["cba", "cba"]


def test_random_order_is_seeded(make_trainer, base_configs):
    # random.Random(seed).shuffle of [alice, bob, carol], five times in a row (CPython's Mersenne Twister):
    # seed 0 -> acb cba abc acb acb; seed 1 -> bca cab acb acb bca. The two seeds differ from the first stage on.
    seed0 = orders_over_stages(make_trainer, base_configs, order="random", order_seed=0)
    assert seed0 == ["acb", "cba", "abc", "acb", "acb"]
    assert orders_over_stages(make_trainer, base_configs, order="random", order_seed=0) == seed0
    assert orders_over_stages(make_trainer, base_configs, order="random", order_seed=1) == [
        "bca", "cab", "acb", "acb", "bca"]


# ----------------------------------------------------------------------------------------------- the δ line search
def test_backtracking_halves_the_step_until_inside_the_region(make_trainer, base_configs):
    log = []
    script = Script(kl={"alice": [0.5, 0.2, 0.009]})
    trainer = make_trainer(team_config(base_configs, 2, delta=0.01), log, script)
    metrics = {}
    trainer.step(metrics, {})
    alice = [e for e in log if e[1:2] == ("alice",)]
    assert alice == [("sleep", "alice"), ("old_log_prob", "alice"), ("snapshot", "alice"),
                     ("set_loss_fn", "alice", 0.1),
                     ("update", "alice"), ("kl_check", "alice"), ("blend", "alice", 0.5), ("kl_check", "alice"),
                     ("blend", "alice", 0.25), ("kl_check", "alice"), ("sync", "alice")]
    assert metrics["teamtr/alice/backtracks"] == 2
    assert metrics["teamtr/alice/step_fraction"] == 0.25
    assert metrics["teamtr/alice/kl"] == pytest.approx(0.009, rel=1e-5)
    assert metrics["teamtr/alice/kl_proposal"] == pytest.approx(0.5, rel=1e-6)
    assert metrics["teamtr/alice/committed"] == 1.0
    assert metrics["teamtr/alice/out_of_region"] == 1.0  # the full step left the region
    # β: 0.1 ·1.5 (backtrack) ·1.5 (backtrack) = 0.225; accept at kl/δ − 1 = −0.1 -> β·(1 − 0.1) = 0.2025
    assert metrics["teamtr/alice/beta"] == pytest.approx(0.2025, rel=1e-5)
    beta = trainer.state.beta_state("alice")
    assert (beta.tries, beta.num_updates, beta.num_backtracks, beta.num_give_ups) == (0, 1, 2, 0)
    assert beta.beta == pytest.approx(0.2025, rel=1e-5) and beta.last_kl == pytest.approx(0.009, rel=1e-5)
    assert trainer.state.kl_history["alice"] == [pytest.approx(0.009, rel=1e-5)]
    assert [u["agent"] for u in trainer.state.updates_history] == ["alice", "bob"]
    assert "teamtr/alice/surrogate" in metrics and "teamtr/alice/bound" in metrics


def test_backtracking_gives_up_and_restores(make_trainer, base_configs):
    log = []
    script = Script(kl={"alice": [0.5, 0.4, 0.3]})
    trainer = make_trainer(team_config(base_configs, 2, max_backtracks=2), log, script)
    metrics = {}
    trainer.step(metrics, {})
    assert [e for e in log if e[0] in ("blend", "restore")] == [
        ("blend", "alice", 0.5), ("blend", "alice", 0.25), ("restore", "alice")]
    assert metrics["teamtr/alice/committed"] == 0.0
    assert metrics["teamtr/alice/step_fraction"] == 0.0
    assert metrics["teamtr/alice/backtracks"] == 2
    assert metrics["teamtr/alice/give_ups_total"] == 1
    # 0.1 ·1.5 ·1.5 ·1.5: the give-up keeps the raised β for alice's next update
    assert metrics["teamtr/alice/beta"] == pytest.approx(0.3375)
    assert trainer.state.kl_history["alice"] == []
    assert "teamtr/alice/surrogate" not in metrics and "teamtr/alice/bound" not in metrics  # no record
    assert [u["agent"] for u in trainer.state.updates_history] == ["bob"]
    assert ("sync", "alice") in log  # the restored weights are still pushed


def test_enforce_false_keeps_the_update_whatever_its_kl(make_trainer, base_configs):
    log = []
    script = Script(kl={"alice": [0.5]})
    trainer = make_trainer(team_config(base_configs, 2, enforce=False), log, script)
    metrics = {}
    trainer.step(metrics, {})
    assert not [e for e in log if e[0] in ("blend", "restore")]
    assert [e for e in log if e == ("kl_check", "alice")] == [("kl_check", "alice")]
    assert metrics["teamtr/alice/committed"] == 1.0 and metrics["teamtr/alice/step_fraction"] == 1.0
    assert metrics["teamtr/alice/out_of_region"] == 1.0
    assert metrics["teamtr/alice/beta"] == pytest.approx(0.12)  # adapt_beta: kl/δ − 1 = 49, clipped to +0.2
    assert trainer.state.kl_history["alice"] == [pytest.approx(0.5)]


def test_beta_carries_over_to_the_next_stage(make_trainer, base_configs):
    """The β a stage ends with is the β the next stage's update is trained with (pushed via set_loss_fn)."""
    log = []
    script = Script(kl={"alice": [0.5, 0.2, 0.009]})
    trainer = make_trainer(team_config(base_configs, 2), log, script)
    trainer.step({}, {})
    trainer.global_steps = 2
    trainer.step({}, {})
    betas = [e[2] for e in log if e[:2] == ("set_loss_fn", "alice")]
    assert betas == [0.1, pytest.approx(0.2025, rel=1e-5)]


# ------------------------------------------------------------------------------------------------- non-finite
def nan_kl_for(monkeypatch, trainer, name):
    """The KL monitor reports NaN for agent ``name``'s measurements (a diverged update), the real value otherwise."""
    real = trainer_module.algos.token_kl_monitor

    def monitor(*args, **kwargs):
        return torch.tensor(float("nan")) if trainer.actor_rollout_wg.name == name else real(*args, **kwargs)

    monkeypatch.setattr(trainer_module.algos, "token_kl_monitor", monitor)


def test_nonfinite_kl_with_on_nonfinite_error_names_agent_and_stage(monkeypatch, make_trainer, base_configs):
    log = []
    trainer = make_trainer(team_config(base_configs, 2, on_nonfinite="error"), log, global_steps=7)
    nan_kl_for(monkeypatch, trainer, "alice")
    with pytest.raises(NonFiniteUpdateError, match=r"agent 'alice' at stage 7: non-finite KL=nan"):
        trainer.step({}, {})
    assert ("sync", "alice") not in log


@pytest.mark.parametrize("cause", ["kl", "pg_loss", "grad_norm"])
def test_nonfinite_with_on_nonfinite_skip_restores_and_counts(monkeypatch, make_trainer, base_configs, cause):
    log = []
    script = Script(update_metrics={"alice": [{f"actor/{cause}": float("nan")}]} if cause != "kl" else {})
    trainer = make_trainer(team_config(base_configs, 2, on_nonfinite="skip"), log, script)
    if cause == "kl":
        nan_kl_for(monkeypatch, trainer, "alice")
    metrics = {}
    trainer.step(metrics, {})
    assert [e for e in log if e[0] in ("blend", "restore")] == [("restore", "alice")]
    assert metrics["teamtr/alice/nonfinite_skips"] == 1
    assert metrics["teamtr/alice/committed"] == 0.0 and metrics["teamtr/alice/step_fraction"] == 0.0
    assert trainer.state.kl_history["alice"] == []
    assert trainer.state.beta_state("alice").beta == 0.1  # a skipped update leaves β alone
    assert "teamtr/alice/surrogate" not in metrics  # no record
    # bob is updated normally after alice's skip, and alice's restored weights are still synced
    assert metrics["teamtr/bob/committed"] == 1.0 and "teamtr/bob/nonfinite_skips" not in metrics
    assert ("sync", "alice") in log and ("sync", "bob") in log


@pytest.mark.parametrize("on_nonfinite", ["skip", "error"])
def test_nan_log_probs_after_the_update_follow_on_nonfinite(make_trainer, base_configs, on_nonfinite):
    """A diverged update gives NaN log-probs: on_nonfinite must apply (error naming agent, stage and the value, or
    restore + count), not the KL monitor's own ValueError."""
    log = []
    script = Script(kl={"alice": [float("nan")]})  # alice's fresh log-probs are all NaN
    trainer = make_trainer(team_config(base_configs, 2, on_nonfinite=on_nonfinite), log, script, global_steps=3)
    metrics = {}
    try:
        trainer.step(metrics, {})
    except NonFiniteUpdateError as error:
        assert on_nonfinite == "error", f"on_nonfinite=skip must not raise: {error}"
        assert "agent 'alice' at stage 3: non-finite log-prob=nan" in str(error)
        return
    except ValueError as error:  # the KL monitor's own refusal of NaN input must never be what stops the run
        pytest.fail(f"NaN log-probs reached algos.token_kl_monitor (on_nonfinite={on_nonfinite}): {error}")
    assert on_nonfinite == "skip", "on_nonfinite=error must raise NonFiniteUpdateError"
    assert metrics["teamtr/alice/nonfinite_skips"] == 1 and ("restore", "alice") in log
    assert metrics["teamtr/bob/committed"] == 1.0


# -------------------------------------------------------------------------------------------------------- happo
def test_happo_scales_later_agents_advantages_by_earlier_ratios(make_trainer, base_configs):
    """alice moves trajectory t's message by log-ratio −s_t, bob by −r_t: bob's advantages are Ã_t·exp(−s_t), carol's
    Ã_t·exp(−s_t − r_t) (every factor inside HAPPO's clip [0.5, 2]); alice's are unscaled."""
    s = (0.002, 0.004, 0.006, 0.008)  # mean 0.005 <= δ: accepted at once
    r = (0.008, 0.0, 0.004, 0.0)  # mean 0.003
    script = Script(kl={"alice": [lambda key: s[trajectory_index(key)]],
                        "bob": [lambda key: r[trajectory_index(key)]]})
    log = []
    trainer = make_trainer(team_config(base_configs, 3, schedule="happo"), log, script)
    trainer.step({}, {})
    written = dict(trainer.written_advantages)
    assert list(written) == ["alice", "bob", "carol"]
    for name, log_factor in (("alice", (0, 0, 0, 0)), ("bob", s), ("carol", tuple(a + b for a, b in zip(s, r)))):
        for key, value in written[name].items():
            t = trajectory_index(key)
            assert value == pytest.approx(TRAJ_ADVANTAGE[t] * math.exp(-log_factor[t]), rel=1e-6), (name, key)
    assert written["bob"]["u0g1_0_1"] != TRAJ_ADVANTAGE[0]  # the factor moved away from 1


@pytest.mark.parametrize("alice_kl, why", [([0.0], "alice's log-probs did not move"),
                                           ([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "alice's update was given up")])
def test_happo_factor_stays_one_when_the_first_agent_did_not_move(make_trainer, base_configs, alice_kl, why):
    script = Script(kl={"alice": alice_kl})
    trainer = make_trainer(team_config(base_configs, 2, schedule="happo"), [], script)
    trainer.step({}, {})
    written = dict(trainer.written_advantages)
    assert {k: TRAJ_ADVANTAGE[trajectory_index(k)] for k in written["bob"]} == written["bob"], why


def test_teamtr_schedule_writes_unscaled_advantages(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 2), [])
    trainer.step({}, {})
    for name, advantages in trainer.written_advantages:
        assert len(advantages) == PROMPTS * SESSIONS
        assert all(v == TRAJ_ADVANTAGE[trajectory_index(k)] for k, v in advantages.items()), name


# ---------------------------------------------------------------------------------------------- measured gains
def test_measured_gain_pairs_one_per_update_or_per_stage(make_trainer, base_configs):
    """Every regeneration raises the mean return by 0.25. teamtr: each update gets its own (bound, 0.25) pair at the
    next regeneration; stale: one pair per stage with the summed bounds of the stage's updates."""
    for schedule, expected_pairs in (("teamtr", 3), ("stale", 1)):
        trainer = make_trainer(team_config(base_configs, 2, schedule=schedule), [])
        bounds = []
        for stage in (1, 2):
            trainer.global_steps = stage
            metrics = {}
            trainer.step(metrics, {})
            bounds.append([metrics["teamtr/alice/bound"], metrics["teamtr/bob/bound"]])
            regenerations = 2 if schedule == "teamtr" else 1
            assert metrics["teamtr/stage/episodes"] == regenerations * PROMPTS * SESSIONS
            # stage 1's first regeneration has nothing to measure; every later one measures one interval
            assert metrics.get("teamtr/stage/gain_measurements", 0) == regenerations - (stage == 1)
            assert metrics.get("teamtr/stage/negative_gains", 0) == 0  # every regeneration raises the return
        if schedule == "teamtr":  # bob's stage-1 update is measured by stage 2's first regeneration
            assert metrics["teamtr/bob/measured_gain"] == metrics["teamtr/alice/measured_gain"] == RETURN_STEP
        pairs = trainer.state.gain_pairs
        assert len(pairs) == expected_pairs, schedule
        assert all(gain == pytest.approx(RETURN_STEP) for _, gain in pairs)
        if schedule == "teamtr":  # alice@1 (measured by bob's regeneration), bob@1 (by stage 2's), alice@2
            assert [b for b, _ in pairs] == pytest.approx([bounds[0][0], bounds[0][1], bounds[1][0]])
        else:
            assert pairs[0][0] == pytest.approx(sum(bounds[0]))
        assert trainer.state.measured_gain_sum == pytest.approx(RETURN_STEP * expected_pairs)


# ----------------------------------------------------------------------------------------- regenerates_before
@pytest.mark.parametrize("schedule, resample_every, expected", [
    ("teamtr", None, [True, True, True, True, True]),
    ("teamtr", 1, [True, True, True, True, True]),
    ("teamtr", 2, [True, False, True, False, True]),
    ("teamtr", 3, [True, False, False, True, False]),
    ("stale", None, [True, False, False, False, False]),
    ("joint", None, [True, False, False, False, False]),
    ("happo", None, [True, False, False, False, False]),
])
def test_regenerates_before(schedule, resample_every, expected):
    team = TeamConfig(agents=(AgentSpec("a", "/m"),), schedule=schedule, resample_every=resample_every)
    assert [team.regenerates_before(i) for i in range(5)] == expected


# ------------------------------------------------------------------------------------------------- checkpoints
def test_save_then_load_checkpoint_round_trips_the_stage_state(make_trainer, base_configs, tmp_path):
    config = team_config(base_configs, 2, order="random", order_seed=1)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path))
    log = []
    trainer = make_trainer(config, log, Script(kl={"alice": [0.5, 0.2, 0.009]}), global_steps=3)
    trainer.train_dataloader = FakeDataloader(position=11)
    trainer.step({}, {})
    trainer._save_checkpoint()
    step_dir = tmp_path / "global_step_3"
    assert [e[:2] for e in log if e[0] == "save"] == [("save", "alice"), ("save", "bob")]
    assert {e[2] for e in log if e[0] == "save"} == {str(step_dir / "alice"), str(step_dir / "bob")}
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert not list(tmp_path.glob("*.tmp")) and not list(step_dir.glob("*.tmp"))

    OmegaConf.update(config, "trainer.resume_mode", "auto")
    resumed = make_trainer(config, log)
    resumed.train_dataloader = FakeDataloader()
    resumed._load_checkpoint()
    assert resumed.global_steps == 3 and resumed.train_dataloader.position == 11
    assert resumed.state == trainer.state
    assert [e for e in log if e[0] == "load"] == [("load", "alice", str(step_dir / "alice")),
                                                   ("load", "bob", str(step_dir / "bob"))]
    assert resumed.state.next_order(resumed.team) == trainer.state.next_order(trainer.team)
