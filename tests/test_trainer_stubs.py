"""The TeamTR stage loop (``TeamTRTrainer.step``) on stubs: no Ray, no vLLM, no TransferQueue.

As in verl's own ``tests/trainer/ppo/v1/test_trainer_base_on_cpu.py``, the trainer is built with
``TeamTRTrainer.__new__`` and given by hand exactly the attributes the stage loop reads: the composed
``teamtr_tiny_cpu`` config, the team, its state, and one fake stack per agent. Every fake (worker group, checkpoint
manager) and every stubbed trainer method writes into ONE shared event log, so a test can assert the exact order of
a stage: who regenerates, who is updated, which step fractions the line search tries, who is measured, who is synced,
and that nothing of agent k happens during agent j's update.

What is stubbed is only what needs Ray, TransferQueue or vLLM: submitting prompts (``_submit_batch_to_rollout``,
which records the batch it receives: uids and CRN seeds), ``replay_buffer.sample``, ``read_team_rollout`` (a chain
rollout with scripted per-episode returns, optionally with dropped trajectories), ``_balance_batch`` (records the
tokenizer it pads with), ``_compute_old_log_prob``, ``_update_actor``, ``_fresh_log_probs`` and ``write_advantages``.
Everything else is real: ``step``, ``_regenerate`` (uids, seeds, the paired-gain bookkeeping), ``_update_agent``,
``_prepare_batches``, ``_line_search``, ``_evaluate_step``, ``_measure_update``, ``_push_loss``, ``_sync``,
``_log_stage``, ``TeamTRState`` and everything in ``teamtr_verl.algos``.

The measured KL is scripted per agent: ``_fresh_log_probs`` returns one masked row per message, with
``new = old − shift/T`` on each of its T tokens; under the ``k1`` estimator (``−log r`` per token, summed per message,
averaged over messages) the real ``algos.token_kl_monitor`` then measures exactly the mean of the shifts. Advantages
are +0.5 (session 0) and −1.0 (session 1): their mean is negative, so a positive shift (every ratio below 1) has a
positive surrogate and a negative shift (ratios above 1; k1 KL < 0) a negative one.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss

import teamtr_verl.trainer as trainer_module
from teamtr_verl import algos, summary
from teamtr_verl.algos import BetaState
from teamtr_verl.config import AgentSpec, TeamConfig
from teamtr_verl.defaults import PREFIX_FIELD
from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.fixtures.model import build_tokenizer
from teamtr_verl.rollout import CONFIG_DIR, compose
from teamtr_verl.rollout_batch import TeamRollout
from teamtr_verl.state import TeamTRState
from teamtr_verl.team import SEED_FIELD, agent_tokenizer
from teamtr_verl.team_logic import heldout_prompts, prompt_seeds
from teamtr_verl.topology import agent_trainer_config
from teamtr_verl.trainer import NonFiniteUpdateError, TeamTRPolicyLossConfig, TeamTRTrainer
from teamtr_verl.watchdog import AgentWatch

NAMES = ("alice", "bob", "carol")
PROMPTS, SESSIONS, TOKENS = 4, 2, 2  # 4 prompts x rollout.n=2 -> 8 team trajectories; 2 tokens per message
ADVANTAGE = (0.5, -1.0)  # per session: the bounded advantage of every message of the trajectory
RETURN_STEP = 0.25  # regeneration g has returns 0.25·g + offset: every measured gain is exactly 0.25 by default
DEFAULT_SHIFT = 0.004  # an unscripted update moves each message by KL 0.004: α0 = min(1, 0.9·sqrt(δ/0.004)) = 1
DELTA, BETA0 = 0.01, 0.1  # the teamtr_tiny_cpu team's δ and β_init
TEAM_TOKENIZER = object()  # what self.tokenizer is outside an agent's context


def default_return(generation, prompt, session):
    return RETURN_STEP * generation + 0.1 * prompt + (0.5 if session == 0 else -0.5)


# ----------------------------------------------------------------------------------------------------- configs
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Three tiny agents whose tokenizers end a turn with three different EOS ids (alice 2, bob 300, carol 0)."""
    root = tmp_path_factory.mktemp("team_models")
    bob_tokenizer = build_tokenizer(vocab_size=300, seed=1)
    bob_tokenizer.add_special_tokens({"eos_token": "<|eot|>"})
    bob_tokenizer.save_pretrained(root / "bob_tokenizer")
    carol_tokenizer = build_tokenizer(vocab_size=300, seed=2)
    carol_tokenizer.eos_token = "<|endoftext|>"
    carol_tokenizer.save_pretrained(root / "carol_tokenizer")
    return [build_tiny_model(root / "alice", seed=0, hidden_size=64, vocab_size=300),
            build_tiny_model(root / "bob", seed=1, hidden_size=64, vocab_size=300,
                             tokenizer_dir=root / "bob_tokenizer"),
            build_tiny_model(root / "carol", seed=2, hidden_size=64, vocab_size=300,
                             tokenizer_dir=root / "carol_tokenizer")]


@pytest.fixture(scope="module")
def bob_v2(model_dirs):
    """Another model with bob's tokenizer: the newcomer of an aligned swap distilled token by token (top-k)."""
    return build_tiny_model(model_dirs[1].parent / "bob_v2", seed=5, hidden_size=64, vocab_size=300,
                            tokenizer_dir=model_dirs[1].parent / "bob_tokenizer")


@pytest.fixture(scope="module")
def base_configs(model_dirs):
    """The real teamtr_tiny_cpu config, composed once per team size (2 and 3 agents), one device per agent."""
    configs = {}
    for size in (2, 3):
        agents = ", ".join(f"{{name: {n}, model: '{d}'}}" for n, d in zip(NAMES[:size], model_dirs[:size]))
        configs[size] = compose(str(CONFIG_DIR), "teamtr_tiny_cpu", [
            f"teamtr.agents=[{agents}]", f"trainer.n_gpus_per_node={size}", "teamtr.kl_estimator=k1"])
        assert configs[size].actor_rollout_ref.rollout.n == SESSIONS
        assert (configs[size].teamtr.delta, configs[size].teamtr.beta_init) == (DELTA, BETA0)
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
        self.loss_configs = []  # the actor config of every set_loss_fn call

    def snapshot_actor_weights(self):
        self.log.append(("snapshot", self.name))

    def blend_actor_weights(self, alpha):
        self.log.append(("blend", self.name, alpha))

    def restore_actor_weights(self):
        self.log.append(("restore", self.name))

    def scale_optimizer_momentum(self, alpha):
        self.log.append(("momentum", self.name, alpha))

    def reset_optimizer_state(self):
        self.log.append(("reset_optimizer", self.name))

    def stage0_teacher_topk(self, sequences, k, temperature, micro_rows, vocab_limit):
        self.log.append(("teacher_topk", self.name, k))
        self.scored, self.teacher_args = sequences["keys"], (temperature, micro_rows, vocab_limit)
        # one result per rank (ONE_TO_ALL); scripted tensors where a test needs them
        return [getattr(self, "topk_result", None) or {"teacher": self.name, "vocab_limit": vocab_limit}]

    def stage0_logprobs_at(self, sequences, ids, temperature, micro_rows):
        self.log.append(("logprobs_at", self.name, tuple(ids.shape)))
        return [self.logprobs_at_result]

    def stage0_distill_epoch(self, sequences, teacher, temperature, mini_rows, micro_rows, lr):
        self.log.append(("distill", self.name, teacher.get("teacher", "tensors"), mini_rows, lr))
        self.teacher = teacher
        self.distill_args = (temperature, micro_rows)
        self.distilled = sequences["keys"] if "keys" in sequences else (sequences, teacher)
        return [{"loss": 0.25, "grad_norm": 1.0, "steps": 1}]

    def stage0_message_logp(self, sequences, temperature, micro_rows):
        """log π(message) of each packed row: −1 for the incumbent; the newcomer's is lower by its next scripted
        shift (``message_shifts``), so the message-level k1 KL is that shift exactly (standard error 0)."""
        rows = len(sequences["input_ids"])
        self.log.append(("message_logp", self.name, rows))
        self.message_args = (temperature, micro_rows)
        self.scored_sequences = sequences
        shift = self.message_shifts.popleft() if getattr(self, "message_shifts", None) else 0.0
        return [torch.full((rows,), -1.0 - shift, dtype=torch.float64)]

    def set_loss_fn(self, loss_fn):
        assert loss_fn.func is ppo_loss
        config = loss_fn.keywords["config"]
        self.loss_configs.append(config)
        self.log.append(("set_loss_fn", self.name, config.policy_loss.ppo_kl_coef))

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


def episode_of(key: str) -> tuple[int, int]:
    """``p{prompt}x{hex}_{session}_{turn}`` (the trainer's uid, verl's key) -> (prompt, session)."""
    uid, session, _ = key.split("_")
    return int(uid.split("x", 1)[0][1:]), int(session)


def trajectory_index(key: str) -> int:
    prompt, session = episode_of(key)
    return prompt * SESSIONS + session


class Script:
    """What each agent's update does and what each regeneration returns.

    ``kl``: per agent, a queue of KL shifts, one per evaluation of its trained rows (the full step first, then each
    line-search step; a float: every message moves by it; a callable key -> shift: per message). The held-out rows
    measured after the commit move like the last evaluation. ``update_metrics``: per agent, verl update metrics.
    ``returns(generation, prompt, session)``: the scripted return of an episode; ``drop``: generation -> episodes
    whose trajectory verl dropped (a failed reward); ``monitor``: per worker group of an incoming model, the shift of
    each Stage-0 KL measurement on the held-out probe messages."""

    def __init__(self, kl=None, update_metrics=None, returns=default_return, drop=None, monitor=None):
        self.kl = defaultdict(deque, {k: deque(v) for k, v in (kl or {}).items()})
        self.monitor = {k: deque(v) for k, v in (monitor or {}).items()}  # Stage 0: per incoming worker group
        self.update_metrics = defaultdict(deque, {k: deque(v) for k, v in (update_metrics or {}).items()})
        self.returns = returns
        self.drop = drop or {}
        self.last = {}

    def next_shift(self, name):
        self.last[name] = self.kl[name].popleft() if self.kl[name] else DEFAULT_SHIFT
        return self.last[name]


class FakeRollouts:
    """The TransferQueue/vLLM side of ``_regenerate``: what it submits, what the replay buffer hands back, and the
    chain rollout (one message per agent, config order) read from it."""

    def __init__(self, trainer, log, script):
        self.trainer, self.log, self.script = trainer, log, script
        self.submitted = []  # per regeneration: {"uid": [...], "seed": [...] | None, "stage": int}
        self.rollouts = []

    def submit(self, batch):
        self.log.append(("regenerate",))
        seeds = list(batch[SEED_FIELD]) if SEED_FIELD in batch.keys() else None
        prefix = [json.loads(p) if p else {} for p in batch[PREFIX_FIELD]] if PREFIX_FIELD in batch.keys() else None
        self.submitted.append({"uid": list(batch["uid"]), "seed": seeds, "stage": self.trainer.global_steps,
                               "prefix": prefix})
        return len(batch)

    def sample(self, global_steps, partition_id, batch_size):
        assert (global_steps, partition_id, batch_size) == (self.trainer.global_steps, "train",
                                                            len(self.submitted[-1]["uid"]))
        generation = len(self.submitted)
        dropped = self.script.drop.get(generation, set())
        keys = [f"{uid}_{s}_{turn}" for p, uid in enumerate(self.submitted[-1]["uid"]) for s in range(SESSIONS)
                if (p, s) not in dropped for turn in range(len(self.trainer.team.agent_names))]
        return KVBatchMeta(partition_id="train", keys=keys, tags=[{} for _ in keys]), {"fake/sampled": 1.0}

    def read(self, meta, expected_trajectories, a_clip, norm_eps, prompt_of):
        generation = len(self.submitted)
        uids = self.submitted[-1]["uid"]
        assert prompt_of == {uid: episode_of(f"{uid}_0_0")[0] for uid in uids}  # each prompt's index in the stage
        assert expected_trajectories == len(uids) * SESSIONS
        names = self.trainer.team.agent_names
        agents = [names[int(key.rsplit("_", 1)[1])] for key in meta.keys]
        trajectories = [key.rsplit("_", 1)[0] for key in meta.keys]
        advantage = np.array([ADVANTAGE[episode_of(key)[1]] for key in meta.keys], dtype=np.float32)
        returns = {}
        for t in dict.fromkeys(trajectories):
            uid, session = t.rsplit("_", 1)
            returns[t] = float(self.script.returns(generation, prompt_of[uid], int(session)))
        rollout = TeamRollout(
            meta=meta, agent=agents, trajectory=trajectories, advantage=advantage, normalized=advantage.copy(),
            group_size=np.full(len(meta.keys), float(SESSIONS)), returns=returns,
            return_mean=float(np.mean(list(returns.values()))), group_std_mean=0.5,
            expected_trajectories=expected_trajectories, prompt_of=prompt_of,
            turn=[int(key.rsplit("_", 1)[1]) for key in meta.keys],
        )
        self.rollouts.append(rollout)
        return rollout


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
    trainer.stacks = {  # a frozen agent's stack has servers only, as topology.build_team_stacks builds it
        agent.name: FakeStack(agent.name, agent_configs[len(trainer.team.agents), agent.name],
                              FakeWorkerGroup(agent.name, log) if agent.train else None,
                              FakeCheckpointManager(agent.name, log) if agent.train else None)
        for agent in trainer.team.agents
    }
    trainer.global_steps = global_steps
    trainer.use_reference_policy = False
    trainer.tokenizer = TEAM_TOKENIZER
    trainer.written_advantages = []  # (agent, {key: advantage}) per write_advantages call
    trainer.trained_keys = []  # (agent, keys) per _update_actor call
    trainer.measured_keys = []  # (agent, keys) per _fresh_log_probs call on other rows than the trained ones
    trainer.balance_tokenizers = []  # (agent, tokenizer) per _balance_batch call
    trainer.rollouts = rollouts = FakeRollouts(trainer, log, script)
    trainer._saved_at, trainer._stage_data_state, trainer._stage_saved = {}, None, False  # as __init__ sets them
    trainer._swap_metrics, trainer._stage0, trainer._incoming = {}, False, None

    def bound_agent():
        return trainer.actor_rollout_wg.name  # _bind points actor_rollout_wg at the updated agent's worker group

    def next_train_batch():
        batch = TensorDict({"input_ids": torch.arange(PROMPTS * 3).view(PROMPTS, 3)}, batch_size=PROMPTS)
        return batch

    def balance_batch(batch, metrics=None):
        log.append(("balance", bound_agent()))
        trainer.balance_tokenizers.append((bound_agent(), trainer.tokenizer))
        return batch

    def compute_old_log_prob(batch, metrics):
        log.append(("old_log_prob", bound_agent()))
        return batch

    def update_actor(batch, update_metrics):
        name = bound_agent()
        log.append(("update", name))
        trainer.trained_keys.append((name, list(batch.keys)))
        if script.update_metrics[name]:
            update_metrics.update(script.update_metrics[name].popleft())

    def fresh_log_probs(batch):
        name = bound_agent()
        trained = trainer.trained_keys[-1] if trainer.trained_keys else None
        if script.monitor.get(name):  # Stage 0: the incoming model against the incumbent's held-out probe messages
            log.append(("monitor", name))
            entry = script.monitor[name].popleft()
        elif trained == (name, list(batch.keys)):
            log.append(("kl_check", name))
            entry = script.next_shift(name)
        else:  # the held-out rows, measured after the commit: they move as the committed step did
            log.append(("measure", name))
            trainer.measured_keys.append((name, list(batch.keys)))
            entry = script.last[name]
        shifts = torch.tensor([entry(key) if callable(entry) else entry for key in batch.keys], dtype=torch.float32)
        old = torch.full((len(batch), TOKENS), -1.0)
        new = old - shifts[:, None] / TOKENS
        return {"old": old, "new": new, "mask": torch.ones_like(old, dtype=torch.bool), "real_keys": list(batch.keys)}

    def write_advantages(batch, row_advantage):
        trainer.written_advantages.append((bound_agent(), dict(row_advantage)))
        return batch

    trainer._next_train_batch = next_train_batch
    trainer._submit_batch_to_rollout = rollouts.submit
    trainer.replay_buffer = type("FakeReplayBuffer", (), {"sample": staticmethod(rollouts.sample)})()
    monkeypatch.setattr(trainer_module, "read_team_rollout", rollouts.read)
    trainer._balance_batch = balance_batch
    trainer._compute_old_log_prob = compute_old_log_prob
    trainer._update_actor = update_actor
    trainer._fresh_log_probs = fresh_log_probs
    monkeypatch.setattr(trainer_module, "write_advantages", write_advantages)
    monkeypatch.setattr(trainer_module, "read_sequences", lambda batch: {"keys": list(batch.keys)})
    monkeypatch.setattr(trainer_module, "read_turn_records", read_turn_records)
    return trainer


def read_turn_records(meta, keys, with_log_probs):
    """The stub rollout's rows as turn records: key ``{uid}_{session}_{turn}``; the ids name the row."""
    records = {}
    for key in keys:
        turn = int(key.rsplit("_", 1)[1])
        records[key] = ([7, turn], [100 + turn], [-0.5] if with_log_probs else None, {"global_steps": 1})
    return records


def agent_events(log, name):
    return [e for e in log if e[1:2] == (name,)]


def agent_block(name, beta=BETA0, measure=True):
    """An agent's update accepted at α = 1: its servers sleep, its trained then its held-out rows are balanced and
    get old log-probs, snapshot, β pushed, one optimizer step, KL of the full step, the held-out measurement, sync."""
    prepare = [("balance", name), ("old_log_prob", name)] * (2 if measure else 1)
    return ([("sleep", name), *prepare, ("snapshot", name), ("set_loss_fn", name, beta), ("update", name),
             ("kl_check", name)] + ([("measure", name)] if measure else []) + [("sync", name)])


REGEN = [("regenerate",)]


def heldout_of(trainer, stage):
    return heldout_prompts(PROMPTS, trainer.team.certificate.heldout_fraction, stage, trainer.team.order_seed)


# ---------------------------------------------------------------------------------------------- stage sequence
@pytest.mark.parametrize("schedule, resample_every, size, expected", [
    # teamtr: regenerate before every update, and once more after the last (its gain)
    ("teamtr", None, 2, REGEN + agent_block("alice") + REGEN + agent_block("bob") + REGEN),
    ("teamtr", None, 3, REGEN + agent_block("alice") + REGEN + agent_block("bob") + REGEN + agent_block("carol")
     + REGEN),
    # every 2nd update: before updates 0 and 2 only, then the closing regeneration
    ("teamtr", 2, 3, REGEN + agent_block("alice") + agent_block("bob") + REGEN + agent_block("carol") + REGEN),
    # one rollout per stage, then the closing regeneration
    ("stale", None, 3, REGEN + agent_block("alice") + agent_block("bob") + agent_block("carol") + REGEN),
    ("happo", None, 3, REGEN + agent_block("alice") + agent_block("bob") + agent_block("carol") + REGEN),
])
def test_one_stage_event_sequence(make_trainer, base_configs, schedule, resample_every, size, expected):
    log = []
    config = team_config(base_configs, size, schedule=schedule, resample_every=resample_every)
    trainer = make_trainer(config, log, global_steps=4)
    metrics = {}
    result = trainer.step(metrics, {})
    assert log == expected
    regenerations = sum(1 for e in log if e == ("regenerate",))
    # the returned meta lists every key of every regeneration exactly once (verl's fit() clears them)
    assert len(result.keys) == len(set(result.keys)) == regenerations * PROMPTS * SESSIONS * size
    assert trainer.state.stages_done == 4
    names = NAMES[:size]
    assert [metrics[f"teamtr/{n}/position"] for n in names] == list(range(size))
    assert all(metrics[f"teamtr/{n}/committed"] == 1.0 and metrics[f"teamtr/{n}/step_fraction"] == 1.0
               for n in names)
    assert [u["agent"] for u in trainer.state.ledger] == list(names)
    assert "teamtr/stage/certificate" in metrics and math.isfinite(metrics["teamtr/stage/certificate"])
    assert metrics["teamtr/stage/certificate"] == pytest.approx(sum(u["bound"] for u in trainer.state.ledger))
    assert metrics["teamtr/stage/episodes"] == regenerations * PROMPTS * SESSIONS


def test_closing_regeneration_off_leaves_the_last_update_unmeasured(make_trainer, base_configs):
    log = []
    trainer = make_trainer(team_config(base_configs, 2, **{"certificate.closing_regeneration": False}), log)
    trainer.step({}, {})
    assert log == REGEN + agent_block("alice") + REGEN + agent_block("bob")
    trainer.global_steps = 2
    trainer.step({}, {})  # stage 2's regenerations never measure stage 1's bob
    measured = [(u["stage"], u["agent"], u["crn_gain"]) for u in trainer.state.ledger]
    assert measured == [(1, "alice", pytest.approx(RETURN_STEP)), (1, "bob", None),
                        (2, "alice", pytest.approx(RETURN_STEP)), (2, "bob", None)]
    assert len(trainer.state.gain_pairs) == 2


@pytest.mark.parametrize("schedule", ["teamtr", "stale", "happo"])
def test_only_the_updated_agent_is_touched_during_its_step(make_trainer, base_configs, schedule):
    """bob's update is line-searched then given up (blend, blend, restore); no call reaches alice or carol then."""
    log = []
    script = Script(kl={"bob": [0.5, 0.4, 0.3]})
    trainer = make_trainer(team_config(base_configs, 3, schedule=schedule, max_backtracks=1), log, script,
                           global_steps=6)
    trainer.step({}, {})
    for name in NAMES:
        # agent `name`'s step: from putting its servers to sleep up to the next regeneration or the next agent's step
        start = log.index(("sleep", name))
        end = next((i for i in range(start + 1, len(log))
                    if log[i] == ("regenerate",) or (log[i][0] == "sleep" and log[i][1] != name)), len(log))
        window = log[start:end]
        assert window[-1] == ("sync", name), f"{name}'s step must end with its own sync: {window}"
        assert all(e[1] == name for e in window), f"{name}'s step touched another agent: {window}"
    alpha0 = 0.9 * math.sqrt(DELTA / 0.5)
    assert [e for e in log if e[0] in ("blend", "restore", "momentum")] == [
        ("blend", "bob", pytest.approx(alpha0)), ("blend", "bob", pytest.approx(alpha0 / 2)), ("restore", "bob")]
    for name, stack in trainer.stacks.items():
        assert stack.checkpoint_manager.synced_steps == [6], f"{name} is synced exactly once per stage"
        assert [e for e in agent_events(log, name) if e[0] in ("snapshot", "update")] == [
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
def alice_search(log):
    """alice's line-search calls after her full step: blends, KL checks, momentum, restore, measurement."""
    return [e for e in agent_events(log, "alice") if e[0] in ("blend", "kl_check", "momentum", "restore", "measure")]


def test_first_try_is_scaled_to_the_region_then_halved(make_trainer, base_configs):
    """KL_full 0.2 with δ 0.01: α0 = 0.9·sqrt(0.05); its KL 0.02 > δ -> α0/2, KL 0.009 <= δ: committed."""
    log = []
    script = Script(kl={"alice": [0.2, 0.02, 0.009]})
    trainer = make_trainer(team_config(base_configs, 2), log, script)
    metrics = {}
    trainer.step(metrics, {})
    alpha0 = 0.9 * math.sqrt(0.05)
    assert alpha0 == pytest.approx(0.2012461)
    assert alice_search(log) == [
        ("kl_check", "alice"),  # the full step
        ("blend", "alice", pytest.approx(alpha0)), ("kl_check", "alice"),
        ("blend", "alice", pytest.approx(alpha0 / 2)), ("kl_check", "alice"),
        ("momentum", "alice", pytest.approx(alpha0 / 2)),  # Adam's momentum scaled to the committed step
        ("measure", "alice")]
    assert metrics["teamtr/alice/backtracks"] == 1
    assert metrics["teamtr/alice/step_fraction"] == pytest.approx(alpha0 / 2)
    assert metrics["teamtr/alice/kl"] == pytest.approx(0.009, rel=1e-4) and metrics["teamtr/alice/kl"] <= DELTA
    assert metrics["teamtr/alice/kl_proposal"] == pytest.approx(0.2, rel=1e-6)
    assert metrics["teamtr/alice/committed"] == 1.0
    assert metrics["teamtr/alice/out_of_region"] == 1.0  # the full step left the region
    assert metrics["teamtr/alice/surrogate"] > 0
    # β adapts once, from the full step's KL (verl's adaptive rule): 0.2/0.01 − 1 = 19, clipped to +0.2
    beta = algos.adapt_beta(BETA0, 0.2, DELTA)
    assert beta == pytest.approx(0.12)
    assert metrics["teamtr/alice/beta"] == pytest.approx(beta)
    state = trainer.state.beta_state("alice")
    assert (state.num_updates, state.num_backtracks, state.num_give_ups) == (1, 1, 0)
    assert state.beta == pytest.approx(beta) and state.last_kl == pytest.approx(0.2, rel=1e-6)
    assert trainer.state.kl_history["alice"] == [pytest.approx(0.009, rel=1e-4)]
    entry = trainer.state.ledger[0]
    assert (entry["agent"], entry["committed"], entry["backtracks"]) == ("alice", True, 1)
    assert entry["alpha"] == pytest.approx(alpha0 / 2) and entry["kl_full"] == pytest.approx(0.2, rel=1e-6)
    assert entry["bound"] is not None and "teamtr/alice/bound" in metrics


def test_a_step_inside_the_region_with_a_lower_surrogate_is_refused(make_trainer, base_configs):
    """At α0 the KL is −0.001 <= δ, but every ratio rose on messages of mean negative advantage: L̂ < 0, refused."""
    log = []
    script = Script(kl={"alice": [0.2, -0.001, 0.002]})
    trainer = make_trainer(team_config(base_configs, 2), log, script)
    metrics = {}
    trainer.step(metrics, {})
    alpha0 = 0.9 * math.sqrt(0.05)
    assert [e for e in alice_search(log) if e[0] in ("blend", "momentum")] == [
        ("blend", "alice", pytest.approx(alpha0)), ("blend", "alice", pytest.approx(alpha0 / 2)),
        ("momentum", "alice", pytest.approx(alpha0 / 2))]
    assert metrics["teamtr/alice/kl"] == pytest.approx(0.002, rel=1e-4)
    assert metrics["teamtr/alice/backtracks"] == 1


def test_a_full_step_with_a_lower_surrogate_is_halved(make_trainer, base_configs):
    """A non-positive full-step KL gives α0 = 1 (no blend); its L̂ < 0 refuses it, so α = 0.5 is tried."""
    log = []
    script = Script(kl={"alice": [-0.002, 0.003]})
    trainer = make_trainer(team_config(base_configs, 2), log, script)
    metrics = {}
    trainer.step(metrics, {})
    assert alice_search(log) == [("kl_check", "alice"), ("blend", "alice", 0.5), ("kl_check", "alice"),
                                 ("momentum", "alice", 0.5), ("measure", "alice")]
    assert trainer.state.beta_state("alice").beta == pytest.approx(algos.adapt_beta(BETA0, -0.002, DELTA))


def test_a_full_step_inside_the_region_is_kept_without_touching_the_momentum(make_trainer, base_configs):
    log = []
    script = Script(kl={"alice": [0.007]})  # α0 = min(1, 0.9·sqrt(0.01/0.007)) = 1
    trainer = make_trainer(team_config(base_configs, 2), log, script)
    metrics = {}
    trainer.step(metrics, {})
    assert alice_search(log) == [("kl_check", "alice"), ("measure", "alice")]
    assert metrics["teamtr/alice/step_fraction"] == 1.0 and metrics["teamtr/alice/backtracks"] == 0
    # β lowered: 0.007/0.01 − 1 = −0.3, clipped to −0.2
    assert trainer.state.beta_state("alice").beta == pytest.approx(algos.adapt_beta(BETA0, 0.007, DELTA)) \
        == pytest.approx(0.08)


def test_line_search_gives_up_and_restores(make_trainer, base_configs):
    log = []
    script = Script(kl={"alice": [0.5, 0.4, 0.3]})
    trainer = make_trainer(team_config(base_configs, 2, max_backtracks=1), log, script)
    metrics = {}
    trainer.step(metrics, {})
    alpha0 = 0.9 * math.sqrt(DELTA / 0.5)
    assert alice_search(log) == [("kl_check", "alice"), ("blend", "alice", pytest.approx(alpha0)),
                                 ("kl_check", "alice"), ("blend", "alice", pytest.approx(alpha0 / 2)),
                                 ("kl_check", "alice"), ("restore", "alice")]  # no momentum scaling, no measurement
    assert metrics["teamtr/alice/committed"] == 0.0
    assert metrics["teamtr/alice/step_fraction"] == 0.0 and metrics["teamtr/alice/kl"] == 0.0
    assert metrics["teamtr/alice/backtracks"] == 1
    assert metrics["teamtr/alice/give_ups_total"] == 1
    assert metrics["teamtr/alice/beta"] == pytest.approx(algos.adapt_beta(BETA0, 0.5, DELTA))
    assert trainer.state.kl_history["alice"] == []
    entry = trainer.state.ledger[0]
    assert (entry["agent"], entry["committed"], entry["kl"], entry["surrogate"]) == ("alice", False, 0.0, 0.0)
    assert "bound" not in entry and "teamtr/alice/bound" not in metrics
    assert ("sync", "alice") in log  # the restored weights are still pushed
    assert metrics["teamtr/bob/committed"] == 1.0


@pytest.mark.parametrize("kls, delta", [
    ([0.2, 0.02, 0.009], 0.01), ([0.011, 0.0101, 0.004], 0.01), ([1.0, 0.05, 0.01], 0.01),
    ([0.06, 0.051, 0.02], 0.05), ([0.3, 0.2, 0.1, 0.05, 0.011, 0.0099], 0.01),
])
def test_every_committed_update_is_inside_its_region(make_trainer, base_configs, kls, delta):
    log = []
    trainer = make_trainer(team_config(base_configs, 2, delta=delta), log, Script(kl={"alice": kls, "bob": kls}))
    trainer.step({}, {})
    blends = [e[2] for e in log if e[:2] == ("blend", "alice")]
    alpha0 = min(1.0, 0.9 * math.sqrt(delta / kls[0]))
    assert blends == pytest.approx([alpha0 / 2 ** i for i in range(len(kls) - 1)], rel=1e-4)  # KL is float32
    for entry in trainer.state.ledger:
        assert entry["committed"] and entry["kl"] <= delta, entry
        assert entry["kl"] == pytest.approx(kls[-1], rel=1e-4)
        beta = algos.adapt_beta(BETA0, kls[0], delta)
        assert trainer.state.beta_state(entry["agent"]).beta == pytest.approx(beta, rel=1e-4)


def test_step_safety_scales_the_first_try(make_trainer, base_configs):
    log = []
    trainer = make_trainer(team_config(base_configs, 2, step_safety=0.5), log, Script(kl={"alice": [0.04, 0.002]}))
    trainer.step({}, {})
    assert [e[2] for e in log if e[:2] == ("blend", "alice")] == pytest.approx([0.5 * math.sqrt(0.01 / 0.04)])


def test_enforce_false_keeps_the_update_whatever_its_kl(make_trainer, base_configs):
    log = []
    script = Script(kl={"alice": [0.5]})
    trainer = make_trainer(team_config(base_configs, 2, enforce=False), log, script)
    metrics = {}
    trainer.step(metrics, {})
    assert not [e for e in log if e[0] in ("blend", "restore", "momentum")]
    assert [e for e in log if e == ("kl_check", "alice")] == [("kl_check", "alice")]
    assert metrics["teamtr/alice/committed"] == 1.0 and metrics["teamtr/alice/step_fraction"] == 1.0
    assert metrics["teamtr/alice/out_of_region"] == 1.0
    assert metrics["teamtr/alice/beta"] == pytest.approx(0.12)  # adapt_beta: kl/δ − 1 = 49, clipped to +0.2
    assert trainer.state.kl_history["alice"] == [pytest.approx(0.5)]


def test_beta_carries_over_to_the_next_stage(make_trainer, base_configs):
    """The β a stage ends with is the β the next stage's update is trained with (pushed via set_loss_fn)."""
    log = []
    script = Script(kl={"alice": [0.2, 0.02, 0.009, 0.001]})
    trainer = make_trainer(team_config(base_configs, 2), log, script)
    trainer.step({}, {})
    trainer.global_steps = 2
    trainer.step({}, {})
    betas = [e[2] for e in log if e[:2] == ("set_loss_fn", "alice")]
    first = algos.adapt_beta(BETA0, 0.2, DELTA)
    assert betas == [BETA0, pytest.approx(first)]
    assert trainer.state.beta_state("alice").beta == pytest.approx(algos.adapt_beta(first, 0.001, DELTA))


# ---------------------------------------------------------------------------------------------- the loss config
def test_the_pushed_loss_config_carries_beta_and_the_teams_loss_options(make_trainer, base_configs):
    """A k1 + message-ratio + token_mean team: the config set_loss_fn receives carries them (and β as
    ppo_kl_coef), and the real teamtr loss computed with that config is the loss of those options."""
    log = []
    config = team_config(base_configs, 2, kl_estimator="k1", ratio_level="message", kl_reduction="token_mean")
    trainer = make_trainer(config, log, Script(kl={"alice": [0.2, 0.02, 0.009]}))
    trainer.step({}, {})
    trainer.global_steps = 2
    trainer.step({}, {})
    pushed = trainer.stacks["alice"].worker_group.loss_configs
    assert len(pushed) == 2
    for config, beta in zip(pushed, (BETA0, algos.adapt_beta(BETA0, 0.2, DELTA))):
        assert isinstance(config.policy_loss, TeamTRPolicyLossConfig)
        assert config.policy_loss.ppo_kl_coef == pytest.approx(beta)
        assert (config.policy_loss.kl_estimator, config.policy_loss.ratio_level, config.policy_loss.kl_reduction) \
            == ("k1", "message", "token_mean")
        assert config.policy_loss.loss_mode == "teamtr"

    generator = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=generator) - 0.5
    new = old + 0.3 * torch.randn(4, 5, generator=generator)
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])[:, None].expand(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    pushed_loss, _ = algos.compute_teamtr_policy_loss(old, new, advantages, mask, config=pushed[1])
    explicit, _ = algos.compute_teamtr_policy_loss(old, new, advantages, mask, beta=pushed[1].policy_loss.ppo_kl_coef,
                                                   kl_estimator="k1", ratio_level="message",
                                                   kl_reduction="token_mean")
    default, _ = algos.compute_teamtr_policy_loss(old, new, advantages, mask, beta=pushed[1].policy_loss.ppo_kl_coef)
    assert float(pushed_loss) == pytest.approx(float(explicit), rel=1e-6)
    assert abs(float(pushed_loss) - float(default)) > 1e-3
    for option, value in (("kl_estimator", "k1"), ("ratio_level", "message"), ("kl_reduction", "token_mean")):
        alone, _ = algos.compute_teamtr_policy_loss(old, new, advantages, mask, beta=0.12, **{option: value})
        assert abs(float(alone) - float(default)) > 1e-4, f"{option}={value} must change the loss"


def test_default_team_pushes_the_default_loss_options(make_trainer, base_configs):
    config = team_config(base_configs, 2)
    OmegaConf.update(config, "teamtr.kl_estimator", "k3")
    trainer = make_trainer(config, [])
    trainer.step({}, {})
    pushed = trainer.stacks["bob"].worker_group.loss_configs[0].policy_loss
    assert (pushed.kl_estimator, pushed.ratio_level, pushed.kl_reduction) == ("k3", "token", "message_sum")


# ------------------------------------------------------------------------------------------- each agent's EOS id
def test_each_agents_rows_are_padded_with_its_own_eos(make_trainer, base_configs, model_dirs):
    trainer = make_trainer(team_config(base_configs, 3), [])
    trainer.step({}, {})
    eos = {name: agent_tokenizer(str(d)).eos_token_id for name, d in zip(NAMES, model_dirs)}
    assert len(set(eos.values())) == 3, eos  # the fixture's three tokenizers differ
    seen = [(name, tokenizer.eos_token_id) for name, tokenizer in trainer.balance_tokenizers]
    assert seen == [(name, eos[name]) for name in NAMES for _ in range(2)]  # trained rows, then held-out rows
    assert all(tokenizer is agent_tokenizer(str(dict(zip(NAMES, model_dirs))[name]))
               for name, tokenizer in trainer.balance_tokenizers)
    assert trainer.tokenizer is TEAM_TOKENIZER  # restored after each agent's context


# ----------------------------------------------------------------------------------------------- held-out prompts
@pytest.mark.parametrize("schedule", ["teamtr", "stale"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_heldout_prompts_never_reach_the_gradient_and_measure_the_update(make_trainer, base_configs, schedule,
                                                                         fraction):
    log = []
    config = team_config(base_configs, 3, schedule=schedule, **{"certificate.heldout_fraction": fraction})
    trainer = make_trainer(config, log, Script(kl={"bob": [0.2, 0.02, 0.009]}), global_steps=3)
    metrics = {}
    trainer.step(metrics, {})
    heldout = heldout_of(trainer, 3)
    assert len(heldout) == round(fraction * PROMPTS)
    assert [name for name, _ in trainer.trained_keys] == list(NAMES)
    assert [name for name, _ in trainer.measured_keys] == list(NAMES)
    for (name, trained), (_, measured) in zip(trainer.trained_keys, trainer.measured_keys):
        assert trained and all(episode_of(k)[0] not in heldout for k in trained), name
        turn = NAMES.index(name)
        # exactly the agent's held-out messages of the rollout it was updated on
        rollout = trainer.rollouts.rollouts[turn if schedule == "teamtr" else 0]
        expected = [k for k in rollout.meta.keys if episode_of(k)[0] in heldout and int(k.rsplit("_", 1)[1]) == turn]
        assert measured == expected and len(measured) == len(heldout) * SESSIONS
        assert sorted(trained + measured) == sorted(rollout.keys_of(name))
        written = dict(trainer.written_advantages)[name]
        assert set(written) == set(trained)  # no advantage is written on a held-out row
    # measured after the commit: after bob's last line-search evaluation and momentum scaling
    bob = agent_events(log, "bob")
    assert bob.index(("measure", "bob")) > max(i for i, e in enumerate(bob) if e[0] in ("kl_check", "momentum"))
    for entry in trainer.state.ledger:
        assert entry["heldout_trajectories"] == len(heldout) * SESSIONS
        assert entry["bound"] == pytest.approx(metrics[f"teamtr/{entry['agent']}/bound"])


def test_the_bound_is_the_importance_sampled_bound_on_the_heldout_trajectories(make_trainer, base_configs):
    """alice's held-out messages move by a per-trajectory shift: her bound is algos.update_bound on exactly those."""
    shifts = [0.001 * (1 + t) for t in range(PROMPTS * SESSIONS)]
    log = []
    trainer = make_trainer(team_config(base_configs, 2), log,
                           Script(kl={"alice": [lambda key: shifts[trajectory_index(key)]]}))
    metrics = {}
    trainer.step(metrics, {})
    heldout = heldout_of(trainer, 1)
    rollout = trainer.rollouts.rollouts[0]
    returns = [rollout.returns[t] for t in rollout.trajectories]
    groups = [rollout.episode(t)[0] for t in rollout.trajectories]
    centered, _ = algos.leave_one_out_centered(returns, groups)
    log_w = torch.tensor([-shifts[p * SESSIONS + s] if p in heldout else 0.0
                          for p, s in map(rollout.episode, rollout.trajectories)], dtype=torch.float64)
    usable = torch.tensor([rollout.episode(t)[0] in heldout for t in rollout.trajectories])
    expected = algos.is_lower_bound(log_w, centered, usable, clip_ratio=0.2)
    entry = trainer.state.ledger[0]
    close = functools.partial(pytest.approx, rel=1e-4)  # the trainer's log-probs are float32
    assert entry["bound"] == close(expected.bound) and entry["is_gain"] == close(expected.estimate.mean)
    assert entry["bound_se"] == close(expected.se) and entry["heldout_trajectories"] == usable.sum().item()


def test_heldout_fraction_zero_trains_on_every_prompt_and_gives_no_bound(make_trainer, base_configs):
    log = []
    trainer = make_trainer(team_config(base_configs, 2, **{"certificate.heldout_fraction": 0.0}), log)
    metrics = {}
    trainer.step(metrics, {})
    assert log == REGEN + agent_block("alice", measure=False) + REGEN + agent_block("bob", measure=False) + REGEN
    assert all(len(keys) == PROMPTS * SESSIONS for _, keys in trainer.trained_keys)
    assert all(u["bound"] is None for u in trainer.state.ledger)
    assert "teamtr/stage/certificate" not in metrics and "teamtr/alice/bound" not in metrics
    assert trainer.state.gain_pairs == []  # a gain without a bound is no calibration pair
    assert [u["crn_gain"] for u in trainer.state.ledger] == [pytest.approx(RETURN_STEP)] * 2


# ------------------------------------------------------------------------------------------ common random numbers
def test_every_regeneration_of_a_stage_gets_the_same_seeds_and_fresh_uids(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 3, order_seed=4), [])
    for stage in (1, 2):
        trainer.global_steps = stage
        trainer.step({}, {})
    submitted = trainer.rollouts.submitted
    assert [s["stage"] for s in submitted] == [1] * 4 + [2] * 4  # 3 updates + closing, per stage
    for stage in (1, 2):
        seeds = [s["seed"] for s in submitted if s["stage"] == stage]
        assert seeds == [prompt_seeds(stage, PROMPTS, 4)] * 4
        assert len(set(seeds[0])) == PROMPTS  # one seed per prompt
    assert set(submitted[0]["seed"]).isdisjoint(submitted[4]["seed"])  # other stage, other seeds
    uids = [uid for s in submitted for uid in s["uid"]]
    assert len(set(uids)) == len(uids)  # every regeneration gets fresh uids
    assert all(uid.startswith(f"p{i}x") and "_" not in uid for s in submitted for i, uid in enumerate(s["uid"]))


def test_crn_off_submits_no_seeds(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 2, **{"certificate.crn": False}), [])
    trainer.step({}, {})
    assert [s["seed"] for s in trainer.rollouts.submitted] == [None] * 3


# ----------------------------------------------------------------------------------------------- paired gains
RETURN_TABLE = {  # generation -> [(prompt, session) -> return]; irregular, so every pair has its own mean
    g: {(p, s): ((g * 7 + p * 3 + s * 5 + p * s * g) % 11) / 10.0 for p in range(PROMPTS) for s in range(SESSIONS)}
    for g in range(1, 8)
}


def hand_gain(after, before, only=None, dropped=()):
    diffs = [after[e] - before[e] for e in sorted(before) if (only is None or e in only) and e not in dropped]
    return sum(diffs) / len(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def test_paired_gain_of_each_update_is_the_mean_difference_of_its_heldout_episodes(make_trainer, base_configs):
    """teamtr, 3 agents: regenerations 1..4; update k's gain = mean over the held-out prompts' episodes (no update
    trained on them) of R_{k+1} − R_k; ``crn_gain_train`` the same over the trained prompts' episodes, where verl
    dropped one trajectory in regeneration 2: it is left out of both pairs it belongs to."""
    trainer = make_trainer(team_config(base_configs, 3), [])
    heldout = heldout_of(trainer, 1)
    held = {(p, s) for p in heldout for s in range(SESSIONS)}
    trained = {(p, s) for p in range(PROMPTS) for s in range(SESSIONS)} - held
    dropped = (min(p for p in range(PROMPTS) if p not in heldout), 1)
    trainer.rollouts.script.returns = lambda g, p, s: RETURN_TABLE[g][(p, s)]
    trainer.rollouts.script.drop = {2: {dropped}}
    metrics = {}
    trainer.step(metrics, {})
    assert metrics["teamtr/rollout/dropped_trajectories"] == 1
    assert metrics["teamtr/stage/episodes"] == 4 * PROMPTS * SESSIONS - 1
    expected = [hand_gain(RETURN_TABLE[g + 1], RETURN_TABLE[g], held) for g in (1, 2, 3)]
    in_sample = [hand_gain(RETURN_TABLE[2], RETURN_TABLE[1], trained, {dropped}),
                 hand_gain(RETURN_TABLE[3], RETURN_TABLE[2], trained, {dropped}),
                 hand_gain(RETURN_TABLE[4], RETURN_TABLE[3], trained)]
    assert len({round(m, 9) for m, _ in expected}) > 1  # not one number for every update
    for entry, (mean, se), train in zip(trainer.state.ledger, expected, in_sample):
        assert entry["measured"]
        assert entry["crn_gain"] == pytest.approx(mean) and entry["crn_gain_se"] == pytest.approx(se)
        assert metrics[f"teamtr/{entry['agent']}/crn_gain"] == pytest.approx(mean)
        assert metrics[f"teamtr/{entry['agent']}/crn_gain_se"] == pytest.approx(se)
        assert metrics[f"teamtr/{entry['agent']}/crn_gain_train"] == pytest.approx(train[0])
        assert metrics[f"teamtr/{entry['agent']}/crn_gain_train_se"] == pytest.approx(train[1])
    # an update whose held-out groups were all flat has no bound (0 ± 0 would be a guess), hence no pair
    assert trainer.state.gain_pairs == [[pytest.approx(u["bound"]), pytest.approx(mean)]
                                        for u, (mean, _) in zip(trainer.state.ledger, expected) if u["bound"] is not None]
    assert len(trainer.state.gain_pairs) >= 1
    assert metrics["teamtr/stage/gain_measurements"] == 3
    # each update its own measurement; the summary, from the logged metrics alone, forms the ledger's pairs
    assert [metrics[f"teamtr/{u['agent']}/crn_pair"] for u in trainer.state.ledger] == [0, 1, 2]
    report = summary.certificate_report([{1: metrics}])
    assert report["updates"] == len(trainer.state.gain_pairs)
    assert report["bound_sum"] == pytest.approx(sum(b for b, _ in trainer.state.gain_pairs))
    assert metrics["teamtr/stage/negative_gains"] == sum(mean < 0 for mean, _ in expected)
    # neither the in-sample episodes nor the dropped pair may leak into a number: each would change it
    assert hand_gain(RETURN_TABLE[2], RETURN_TABLE[1])[0] != pytest.approx(expected[0][0])
    assert hand_gain(RETURN_TABLE[2], RETURN_TABLE[1], trained)[0] != pytest.approx(in_sample[0][0])


def test_without_heldout_groups_the_gain_is_taken_over_all_episodes(make_trainer, base_configs):
    """certificate.heldout_fraction = 0: nothing is out of sample, so the gain is the all-episode one (as documented)
    and there is no separate in-sample gain."""
    trainer = make_trainer(team_config(base_configs, 2, **{"certificate.heldout_fraction": 0.0}), [])
    trainer.rollouts.script.returns = lambda g, p, s: RETURN_TABLE[g][(p, s)]
    metrics = {}
    trainer.step(metrics, {})
    expected = [hand_gain(RETURN_TABLE[2], RETURN_TABLE[1]), hand_gain(RETURN_TABLE[3], RETURN_TABLE[2])]
    assert [(u["crn_gain"], u["crn_gain_se"]) for u in trainer.state.ledger] == [
        (pytest.approx(mean), pytest.approx(se)) for mean, se in expected]
    assert not [key for key in metrics if "crn_gain_train" in key]


def test_stale_schedule_measures_the_whole_stage_with_one_pair(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 3, schedule="stale"), [])
    trainer.rollouts.script.returns = lambda g, p, s: RETURN_TABLE[g][(p, s)]
    metrics = {}
    trainer.step(metrics, {})
    mean, se = hand_gain(RETURN_TABLE[2], RETURN_TABLE[1], {(p, s) for p in heldout_of(trainer, 1) for s in range(SESSIONS)})
    assert [u["crn_gain"] for u in trainer.state.ledger] == [pytest.approx(mean)] * 3
    assert trainer.state.gain_pairs == [[pytest.approx(sum(u["bound"] for u in trainer.state.ledger)),
                                         pytest.approx(mean)]]
    assert all(metrics[f"teamtr/{n}/crn_gain"] == pytest.approx(mean) for n in NAMES)
    assert metrics["teamtr/stage/gain_measurements"] == 1
    # one measurement under three names: the summary reads it as the ledger's one pair (not three)
    assert [metrics[f"teamtr/{n}/crn_pair"] for n in NAMES] == [0, 0, 0]
    report = summary.certificate_report([{1: metrics}])
    assert report["updates"] == 1 and report["bound_sum"] == pytest.approx(trainer.state.gain_pairs[0][0])


def test_certificate_stats_are_logged_over_the_gain_pairs(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 2), [])
    trainer.rollouts.script.returns = lambda g, p, s: RETURN_TABLE[g][(p, s)]
    for stage in (1, 2):
        trainer.global_steps = stage
        metrics = {}
        trainer.step(metrics, {})
    pairs = trainer.state.gain_pairs
    assert len(pairs) == 4
    bounds, gains = zip(*pairs)
    assert metrics["teamtr/stage/pairs"] == 4.0
    assert metrics["teamtr/stage/calibration"] == sum(g >= b for b, g in pairs) / 4
    assert metrics["teamtr/stage/spearman"] == pytest.approx(algos.spearman_rank_correlation(bounds, gains))


def test_a_dropped_heldout_trajectory_does_not_stop_the_stage(make_trainer, base_configs):
    """rollout.n = 2 and one held-out prompt: a failed reward there leaves the held-out group with one trajectory
    (no leave-one-out baseline) and one held-out pair (no standard error). The update is kept, unmeasured: no bound,
    no paired gain (the trained episodes' in-sample gain is no stand-in); the next update is measured as usual."""
    trainer = make_trainer(team_config(base_configs, 2), [])
    (held,) = heldout_of(trainer, 1)
    trainer.rollouts.script.drop = {1: {(held, 0)}}
    metrics = {}
    trainer.step(metrics, {})
    alice, bob = trainer.state.ledger
    assert alice["committed"] and alice["bound"] is None and alice["measured"] and alice["crn_gain"] is None
    assert "teamtr/alice/crn_gain" not in metrics and metrics["teamtr/bob/crn_gain"] == pytest.approx(RETURN_STEP)
    assert bob["committed"] and bob["bound"] is not None and bob["crn_gain"] == pytest.approx(RETURN_STEP)
    assert trainer.state.gain_pairs == [[pytest.approx(bob["bound"]), pytest.approx(RETURN_STEP)]]


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


@pytest.mark.parametrize("bob_died", [True, False])
def test_a_stage_that_fails_because_an_agents_server_died_names_the_agent(monkeypatch, make_trainer, base_configs,
                                                                           bob_died):
    """bob's vLLM server is killed: the rollout's episodes fail and verl's replay buffer raises before the watch has
    polled. The stage asks Ray's table (again, for a few seconds) and names bob; with nobody dead, verl's error stays."""
    trainer = make_trainer(team_config(base_configs, 2), [], global_steps=3)

    def sample(*args, **kwargs):
        raise RuntimeError("Sync replay buffer selected terminal groups with no materializable trajectories.")

    trainer.replay_buffer = type("FailingReplayBuffer", (), {"sample": staticmethod(sample)})()
    trainer.watch = AgentWatch({"alice": ["vllm_server_0_0"], "bob": ["vllm_server_1_0"]}, job_id="j")
    table = [{"Name": "vllm_server_0_0", "State": "ALIVE", "JobID": "j", "DeathCause": ""},
             {"Name": "vllm_server_1_0", "State": "DEAD" if bob_died else "ALIVE", "JobID": "j", "DeathCause": "SIGKILL"}]
    monkeypatch.setattr(AgentWatch, "_table", staticmethod(lambda: table))
    monkeypatch.setattr(trainer_module.AgentWatch, "dead_within",
                        functools.partialmethod(AgentWatch.dead_within, grace_s=0.05, poll_s=0.01))
    if bob_died:
        with pytest.raises(trainer_module.AgentDiedError,
                           match=r"stage 3: agent 'bob': its actor vllm_server_1_0 died \(SIGKILL\)") as raised:
            trainer.step({}, {})
        assert "no materializable trajectories" in str(raised.value.__cause__)
    else:
        with pytest.raises(RuntimeError, match="no materializable trajectories") as raised:
            trainer.step({}, {})
        assert type(raised.value) is RuntimeError


@pytest.mark.parametrize("cause", ["kl", "pg_loss", "grad_norm"])
def test_nonfinite_with_on_nonfinite_skip_restores_and_counts(monkeypatch, make_trainer, base_configs, cause):
    log = []
    script = Script(update_metrics={"alice": [{f"actor/{cause}": float("nan")}]} if cause != "kl" else {})
    trainer = make_trainer(team_config(base_configs, 2, on_nonfinite="skip"), log, script)
    if cause == "kl":
        nan_kl_for(monkeypatch, trainer, "alice")
    metrics = {}
    trainer.step(metrics, {})
    assert [e for e in log if e[0] in ("blend", "restore", "momentum", "measure")] == [
        ("restore", "alice"), ("measure", "bob")]
    assert metrics["teamtr/alice/nonfinite_skips"] == 1
    assert metrics["teamtr/alice/committed"] == 0.0 and metrics["teamtr/alice/step_fraction"] == 0.0
    assert trainer.state.kl_history["alice"] == []
    assert trainer.state.beta_state("alice").beta == BETA0  # a skipped update leaves β alone
    assert trainer.state.beta_state("alice").num_give_ups == 1
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


def test_a_nonfinite_line_search_step_is_refused_and_halved(monkeypatch, make_trainer, base_configs):
    """skip: a NaN at a line-search step counts as an infinite KL there (refused), the next halving is tried."""
    log = []
    script = Script(kl={"alice": [0.2, float("nan"), 0.005]})
    trainer = make_trainer(team_config(base_configs, 2, on_nonfinite="skip"), log, script)
    metrics = {}
    trainer.step(metrics, {})
    alpha0 = 0.9 * math.sqrt(0.05)
    assert [e for e in alice_search(log) if e[0] in ("blend", "momentum")] == [
        ("blend", "alice", pytest.approx(alpha0)), ("blend", "alice", pytest.approx(alpha0 / 2)),
        ("momentum", "alice", pytest.approx(alpha0 / 2))]
    assert metrics["teamtr/alice/nonfinite_skips"] == 1 and metrics["teamtr/alice/committed"] == 1.0


# -------------------------------------------------------------------------------------------------------- happo
def test_happo_scales_later_agents_advantages_by_earlier_ratios(make_trainer, base_configs):
    """alice moves trajectory t's message by log-ratio −s_t, bob by −r_t: bob's advantages are Ã_t·exp(−s_t), carol's
    Ã_t·exp(−s_t − r_t) (every factor inside HAPPO's clip [0.5, 2]); alice's are unscaled. Every session-1 shift is
    at least the session-0 one of its prompt, so each surrogate is positive and every full step is kept."""
    s = (0.002, 0.006, 0.004, 0.008, 0.001, 0.003, 0.005, 0.009)
    r = (0.0, 0.008, 0.004, 0.004, 0.002, 0.006, 0.0, 0.002)
    script = Script(kl={"alice": [lambda key: s[trajectory_index(key)]],
                        "bob": [lambda key: r[trajectory_index(key)]]})
    log = []
    trainer = make_trainer(team_config(base_configs, 3, schedule="happo"), log, script)
    metrics = {}
    trainer.step(metrics, {})
    assert all(metrics[f"teamtr/{n}/committed"] == 1.0 for n in NAMES)
    written = dict(trainer.written_advantages)
    assert list(written) == ["alice", "bob", "carol"]
    for name, log_factor in (("alice", (0,) * 8), ("bob", s), ("carol", tuple(a + b for a, b in zip(s, r)))):
        for key, value in written[name].items():
            t = trajectory_index(key)
            assert value == pytest.approx(ADVANTAGE[t % SESSIONS] * math.exp(-log_factor[t]), rel=1e-6), (name, key)
    assert any(value != ADVANTAGE[trajectory_index(k) % SESSIONS] for k, value in written["bob"].items())


@pytest.mark.parametrize("alice_kl, why", [([0.0], "alice's log-probs did not move"),
                                           ([0.5] * 7, "alice's update was given up")])
def test_happo_factor_stays_one_when_the_first_agent_did_not_move(make_trainer, base_configs, alice_kl, why):
    script = Script(kl={"alice": alice_kl})
    trainer = make_trainer(team_config(base_configs, 2, schedule="happo"), [], script)
    trainer.step({}, {})
    written = dict(trainer.written_advantages)
    assert {k: ADVANTAGE[episode_of(k)[1]] for k in written["bob"]} == pytest.approx(written["bob"]), why


def test_teamtr_schedule_writes_unscaled_advantages(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 2), [])
    trainer.step({}, {})
    heldout = heldout_of(trainer, 1)
    for name, advantages in trainer.written_advantages:
        assert len(advantages) == (PROMPTS - len(heldout)) * SESSIONS
        assert all(v == ADVANTAGE[episode_of(k)[1]] for k, v in advantages.items()), name


# ----------------------------------------------------------------------------------------- regenerates_before
@pytest.mark.parametrize("schedule, resample_every, expected", [
    ("teamtr", None, [True, True, True, True, True]),
    ("teamtr", 1, [True, True, True, True, True]),
    ("teamtr", 2, [True, False, True, False, True]),
    ("teamtr", 3, [True, False, False, True, False]),
    ("stale", None, [True, False, False, False, False]),
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
    trainer = make_trainer(config, log, Script(kl={"alice": [0.2, 0.02, 0.009]}), global_steps=3)
    trainer.train_dataloader = FakeDataloader(position=11)
    trainer.step({}, {})
    trainer._save_checkpoint()
    step_dir = tmp_path / "global_step_3"
    assert [e[:2] for e in log if e[0] == "save"] == [("save", "alice"), ("save", "bob")]
    # written into a scratch folder that becomes global_step_3 in one rename, once complete
    assert {e[2] for e in log if e[0] == "save"} == {str(tmp_path / ".tmp_global_step_3" / n) for n in ("alice", "bob")}
    assert sorted(p.name for p in step_dir.iterdir()) == ["alice", "bob", "data.pt", "teamtr_state.json"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (tmp_path / "teamtr_latest.txt").read_text() == "global_step_3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_3", "latest_checkpointed_iteration.txt",
                                                          "teamtr_latest.txt"]  # no scratch or .tmp file left

    OmegaConf.update(config, "trainer.resume_mode", "auto")
    resumed = make_trainer(config, log)
    resumed.train_dataloader = FakeDataloader()
    resumed._load_checkpoint()
    assert resumed.global_steps == 3 and resumed.train_dataloader.position == 11
    assert resumed.state == trainer.state
    assert resumed.state.ledger and resumed.state.gain_pairs  # the certificate ledger survives the round trip
    assert [e for e in log if e[0] == "load"] == [("load", "alice", str(step_dir / "alice")),
                                                   ("load", "bob", str(step_dir / "bob"))]
    assert resumed.state.next_order(resumed.team) == trainer.state.next_order(trainer.team)


def test_a_frozen_agent_speaks_but_is_never_updated_synced_or_saved(make_trainer, base_configs, tmp_path):
    """bob is frozen (train: false; his stack has no worker group or checkpoint manager, so any call would fail):
    his turns are in every regeneration, but the stage updates alice then carol only, regenerating before each and
    once after, and a checkpoint saves and loads alice and carol only."""
    config = team_config(base_configs, 3)
    OmegaConf.update(config, "teamtr.agents.1.train", False, force_add=True)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path))
    log = []
    trainer = make_trainer(config, log, global_steps=2)
    metrics = {}
    result = trainer.step(metrics, {})
    assert log == REGEN + agent_block("alice") + REGEN + agent_block("carol") + REGEN
    assert len(result.keys) == 3 * PROMPTS * SESSIONS * 3  # bob's turns were generated (and are cleared)
    assert (metrics["teamtr/alice/position"], metrics["teamtr/carol/position"]) == (0, 1)
    assert not [key for key in metrics if key.startswith("teamtr/bob/")]
    assert [u["agent"] for u in trainer.state.ledger] == ["alice", "carol"]
    assert "bob" not in trainer.state.beta and trainer.state.frozen_agents == ["bob"]

    trainer.train_dataloader = FakeDataloader(position=5)
    trainer._save_checkpoint()
    assert [e[:2] for e in log if e[0] == "save"] == [("save", "alice"), ("save", "carol")]
    assert sorted(p.name for p in (tmp_path / "global_step_2").iterdir()) == [
        "alice", "carol", "data.pt", "teamtr_state.json"]
    OmegaConf.update(config, "trainer.resume_mode", "auto")
    resumed = make_trainer(config, log)
    resumed.train_dataloader = FakeDataloader()
    resumed._load_checkpoint()
    assert [e[:2] for e in log if e[0] == "load"] == [("load", "alice"), ("load", "carol")]
    assert resumed.state == trainer.state


def test_a_resumed_run_swaps_one_agent_and_carries_the_rest_of_the_team_over(make_trainer, base_configs, model_dirs,
                                                                              tmp_path):
    """teamtr.replace on resume (direct): bob's checkpoint is not loaded (his new model starts from its own
    directory, with a fresh optimizer and β), alice's is; the loader position, ledger and alice's β carry over; the
    next stage reports the swap and trains both; resuming the swapped team loads both and records no second swap."""
    config = team_config(base_configs, 2)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path))
    log = []
    trainer = make_trainer(config, log, global_steps=3)
    trainer.step({}, {})
    trainer.train_dataloader = FakeDataloader(position=11)
    trainer._save_checkpoint()
    assert trainer.state.beta_state("bob") != BetaState(beta=BETA0)  # bob's update moved his β controller

    swapped = copy.deepcopy(config)
    OmegaConf.update(swapped, "trainer.resume_mode", "auto")
    OmegaConf.update(swapped, "teamtr.replace", {"agent": "bob", "model": str(model_dirs[2]), "method": "direct"},
                     force_add=True)
    resumed = make_trainer(swapped, log)
    resumed.train_dataloader = FakeDataloader()
    resumed._load_checkpoint()
    assert [e for e in log if e[0] == "load"] == [("load", "alice", str(tmp_path / "global_step_3" / "alice"))]
    assert resumed.global_steps == 3 and resumed.train_dataloader.position == 11
    state = resumed.state
    assert state.agent_models == {"alice": str(model_dirs[0]), "bob": str(model_dirs[2])}
    assert state.replacements == [{"stage": 3, "agent": "bob", "from": str(model_dirs[1]), "to": str(model_dirs[2]),
                                   "method": "direct"}]
    assert state.beta_state("bob") == BetaState(beta=BETA0)
    assert state.beta["alice"] == trainer.state.beta["alice"] and state.ledger == trainer.state.ledger
    assert "bob" not in resumed._saved_at  # the next in-stage checkpoint must save the new bob

    metrics = {}
    resumed.global_steps = 4
    resumed.step(metrics, {})
    assert metrics["teamtr/bob/replaced"] == 1.0
    assert [u["agent"] for u in resumed.state.ledger if u["stage"] == 4] == ["alice", "bob"]
    resumed._save_checkpoint()
    log.clear()
    again = make_trainer(swapped, log)
    again.train_dataloader = FakeDataloader()
    again._load_checkpoint()
    assert [e[:2] for e in log if e[0] == "load"] == [("load", "alice"), ("load", "bob")]
    assert again.state.replacements == state.replacements and again.state == resumed.state
    again.global_steps = 5
    metrics = {}
    again.step(metrics, {})
    assert "teamtr/bob/replaced" not in metrics


def k3_message(shift):
    """The k3 KL of one stub message whose TOKENS tokens each have log π_new = log π_cur − shift/TOKENS."""
    return TOKENS * (math.exp(-shift / TOKENS) - 1 + shift / TOKENS)


def aligned_swap_trainer(make_trainer, base_configs, newcomer, tmp_path, log, monitor, monkeypatch, **replace):
    config = team_config(base_configs, 2)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path))
    OmegaConf.update(config, "teamtr.replace", {"agent": "bob", "model": str(newcomer), **replace},
                     force_add=True)
    trainer = make_trainer(config, log, Script(monitor={"bob-new": monitor}), global_steps=4)
    trainer.state.stages_done = 3
    # as _setup builds it while the swap is pending: bob's stack holds the incumbent, the newcomer has its own
    trainer._stage0 = True
    trainer._incoming = FakeStack("bob-incoming", trainer.stacks["bob"].config, FakeWorkerGroup("bob-new", log),
                                  FakeCheckpointManager("bob-new", log))
    trainer._route_turns = lambda old, new: log.append(("route", old.worker_group.name, new.worker_group.name))
    # the agent watch as _setup leaves it while the swap is pending; release_stack ends a stack's Ray actors
    trainer.watch = AgentWatch({"alice": ["alice_w"], "bob": ["bob_w"], "bob-incoming": ["new_w"]}, job_id="j")

    def release_stack(stack):
        log.append(("release", stack.worker_group.name, dict(trainer.watch.actors_of)))
        return {"actors": 2, "processes": 5, "gib": 1.5, "left": 0}

    monkeypatch.setattr(trainer_module, "release_stack", release_stack)
    return trainer


# after a committed swap: bob's actors are the newcomer's (no longer watched under the old name), then the
# incumbent's stack is released
RELEASE = ("release", "bob", {"alice": ["alice_w"], "bob": ["new_w"]})


def test_an_aligned_swap_distils_the_newcomer_into_delta0_then_it_takes_the_agents_place(
        make_trainer, base_configs, bob_v2, tmp_path, monkeypatch):
    """Stage 0 before the stage's first update: one probe regeneration with the incumbent; the incumbent scores its
    own training and held-out messages and gives its top-k (16) on the training ones; the newcomer is distilled toward
    it at lr 1e-4, one epoch at a time (mini-batches of 4 messages), while the held-out KL (k3) is above δ₀ = δ = 0.01 (curve
    0.213, 0.0576, 0.00246: two epochs); its weights go into its servers, the agent's turns are routed to them and
    the incumbent's stack is released (after the watch stopped watching it). Then the stage runs as usual with the
    newcomer as bob; its first regeneration pairs with the probe (the swap's gain) and reuses alice's turns."""
    log = []
    trainer = aligned_swap_trainer(make_trainer, base_configs, bob_v2, tmp_path, log, [1.0, 0.5, 0.1], monkeypatch,
                                   topk=16,
                                   mini_batch=4, lr=1e-4)
    incumbent_models, incumbent = dict(trainer.state.agent_models), trainer.stacks["bob"].worker_group
    metrics = {}
    trainer.step(metrics, {})
    stage0 = (REGEN + [("balance", "bob"), ("old_log_prob", "bob")] * 2 + [("sleep", "bob"), ("teacher_topk", "bob", 16)]
              + [("sleep", "bob-new"), ("monitor", "bob-new"), ("distill", "bob-new", "bob", 4, 1e-4),
                 ("monitor", "bob-new"), ("distill", "bob-new", "bob", 4, 1e-4), ("monitor", "bob-new"),
                 ("reset_optimizer", "bob-new"), ("sync", "bob-new"), ("route", "bob", "bob-new"), RELEASE])
    assert log == stage0 + REGEN + agent_block("alice") + REGEN + agent_block("bob-new") + REGEN
    held = heldout_prompts(PROMPTS, 0.25, 4, 0)
    # the incumbent's top-k is taken on bob's training messages of the probe, the newcomer distilled on the same
    assert incumbent.scored == trainer.stacks["bob"].worker_group.distilled
    assert incumbent.scored and all(episode_of(key)[0] not in held for key in incumbent.scored)
    assert len(incumbent.scored) == (PROMPTS - len(held)) * SESSIONS
    assert metrics["teamtr/stage0/distill_loss"] == 0.25
    # the agent's sampling temperature and actor micro-batch, the shared tokenizer's size
    config = trainer.stacks["bob"].config.actor_rollout_ref
    micro = config.actor.ppo_micro_batch_size_per_gpu
    vocab = len(agent_tokenizer(trainer.team.agent("bob").model))
    assert incumbent.teacher_args == (config.rollout.temperature, micro, vocab) and vocab > 0
    assert trainer.stacks["bob"].worker_group.distill_args == (config.rollout.temperature, micro)
    curve = [k3_message(1.0), k3_message(0.5), k3_message(0.1)]
    assert (metrics["teamtr/stage0/kl"], metrics["teamtr/stage0/kl_initial"]) == (
        pytest.approx(curve[2], rel=1e-5), pytest.approx(curve[0], rel=1e-5))  # float32 log-probs
    assert (metrics["teamtr/stage0/epochs"], metrics["teamtr/stage0/delta0"], metrics["teamtr/bob/replaced"]) == (
        2, DELTA, 1.0)
    assert (metrics["teamtr/stage0/probe_messages"], metrics["teamtr/stage0/heldout_messages"]) == (
        (PROMPTS - len(held)) * SESSIONS, len(held) * SESSIONS)
    # the probe and the stage's first regeneration: same prompts and seeds, alice's turns reused, gain 0.25 exactly
    probe, first = trainer.rollouts.submitted[:2]
    assert probe["seed"] == first["seed"] and probe["prefix"] is None
    assert all(set(p) == {"0", "1"} and all(len(turns) == 1 for turns in p.values()) for p in first["prefix"])
    assert metrics["teamtr/stage0/crn_gain"] == pytest.approx(RETURN_STEP)
    assert {key: metrics[f"teamtr/stage0/released_{key}"] for key in ("actors", "processes", "gib", "left")} == {
        "actors": 2, "processes": 5, "gib": 1.5, "left": 0}
    state = trainer.state
    assert state.agent_models == {**incumbent_models, "bob": str(bob_v2)}
    record = state.replacements[0]
    assert {k: record[k] for k in ("stage", "agent", "from", "to", "method", "epochs")} == {
        "stage": 3, "agent": "bob", "from": incumbent_models["bob"], "to": str(bob_v2), "method": "aligned",
        "epochs": 2}
    assert record["kl_curve"] == pytest.approx(curve, rel=1e-5)
    stage0_entry = state.ledger[0]
    assert (stage0_entry["agent"], stage0_entry["stage0"], stage0_entry["surrogate"], stage0_entry["bound"]) == (
        "bob", True, 0.0, None)
    assert stage0_entry["kl"] == pytest.approx(curve[2], rel=1e-5)
    assert [u["agent"] for u in state.ledger] == ["bob", "alice", "bob"]
    assert trainer.stacks["bob"].worker_group.name == "bob-new" and trainer.stacks["bob"].name == "bob"
    trainer.train_dataloader = FakeDataloader(position=3)
    trainer._save_checkpoint()
    assert [e[:2] for e in log if e[0] == "save"] == [("save", "alice"), ("save", "bob-new")]
    assert sorted(p.name for p in (tmp_path / "global_step_4").iterdir()) == ["alice", "bob", "data.pt",
                                                                             "teamtr_state.json"]


def test_an_aligned_swap_across_tokenizers_trains_on_the_translated_messages_likelihood(
        make_trainer, base_configs, model_dirs, tmp_path, monkeypatch):
    """carol's tokenizer is another vocabulary (and ends turns with id 0, bob's with 300): Stage 0 reads bob's probe
    rows, translates them into carol's tokens, scores the held-out ones with the incumbent (log π = −1 each) and the
    newcomer (lower by 0.5, then 0.2, then 0.004: the k1 KL, standard error 0), and distils on the training ones'
    likelihood until 0.004 <= δ₀ = 0.01; then the swap as with a shared vocabulary."""
    from collections import deque

    from transformers import AutoTokenizer

    bob_tokenizer, carol_tokenizer = (AutoTokenizer.from_pretrained(model_dirs[i]) for i in (1, 2))
    texts = {}

    def read_rows(batch):  # bob's rows as his agent loop wrote them: his rendering, his message + his EOS
        prompts, responses = [], []
        for key in batch.keys:
            texts[key] = f"#### {len(texts)}"
            chat = [{"role": "user", "content": f"probe {key}"}]
            prompts.append(torch.tensor(list(bob_tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False))))
            responses.append(torch.tensor(bob_tokenizer.encode(texts[key], add_special_tokens=False)
                                          + [bob_tokenizer.eos_token_id]))
        return prompts, responses, [torch.ones(len(r)) for r in responses]

    monkeypatch.setattr(trainer_module, "read_rows", read_rows)
    log = []
    trainer = aligned_swap_trainer(make_trainer, base_configs, model_dirs[2], tmp_path, log, [], monkeypatch)
    incumbent, newcomer = trainer.stacks["bob"].worker_group, trainer._incoming.worker_group
    newcomer.message_shifts = deque([0.5, 0.2, 0.004])
    metrics = {}
    trainer.step(metrics, {})
    held = heldout_prompts(PROMPTS, 0.25, 4, 0)
    train_rows, held_rows = (PROMPTS - len(held)) * SESSIONS, len(held) * SESSIONS
    config = trainer.stacks["bob"].config.actor_rollout_ref
    distill = ("distill", "bob-new", "tensors", 8, None)
    stage0 = REGEN + [("balance", "bob"), ("old_log_prob", "bob")] * 2 + [
        ("sleep", "bob"), ("message_logp", "bob", held_rows), ("sleep", "bob-new"),
        ("message_logp", "bob-new", held_rows), distill, ("message_logp", "bob-new", held_rows), distill,
        ("message_logp", "bob-new", held_rows), ("reset_optimizer", "bob-new"), ("sync", "bob-new"),
        ("route", "bob", "bob-new"), RELEASE]
    assert log == stage0 + REGEN + agent_block("alice") + REGEN + agent_block("bob-new") + REGEN
    assert ("teacher_topk", "bob", 64) not in log  # no top-k across vocabularies
    assert incumbent.message_args == newcomer.message_args == (config.rollout.temperature,
                                                               config.actor.ppo_micro_batch_size_per_gpu)
    assert (metrics["teamtr/stage0/kl_initial"], metrics["teamtr/stage0/kl"], metrics["teamtr/stage0/epochs"]) == (
        pytest.approx(0.5), pytest.approx(0.004), 2)
    assert metrics["teamtr/stage0/retokenized"] == 1.0 and metrics["teamtr/stage0/untranslated_messages"] == 0
    # what the newcomer trained on: bob's training messages in carol's tokens, each ended by carol's EOS (id 0)
    sequences, teacher = newcomer.distilled
    length = sequences["response_mask"].shape[1]
    responses = sequences["input_ids"][:, -length:]
    assert len(responses) == train_rows
    decoded = sorted(carol_tokenizer.decode(row[mask > 0].tolist()) for row, mask in
                     zip(responses, sequences["response_mask"]))
    assert carol_tokenizer.eos_token_id == 0 != bob_tokenizer.eos_token_id
    assert all(text.endswith(carol_tokenizer.eos_token) for text in decoded)
    assert teacher["ids"][..., 0].long().tolist() == responses.tolist()  # the likelihood of its own tokens
    assert float(teacher["log_probs"].abs().sum()) == 0.0
    # the held-out ones, scored by the newcomer, are the same texts
    scored = newcomer.scored_sequences
    held_texts = sorted(carol_tokenizer.decode(row[mask > 0].tolist(), skip_special_tokens=True) for row, mask in
                        zip(scored["input_ids"][:, -scored["response_mask"].shape[1]:], scored["response_mask"]))
    train_texts = sorted(text[:-len(carol_tokenizer.eos_token)] for text in decoded)
    assert sorted(held_texts + train_texts) == sorted(texts.values())


def test_an_aligned_swap_toward_the_mixture_keeps_the_newcomer_where_it_is_already_close(
        make_trainer, base_configs, bob_v2, tmp_path, monkeypatch):
    """target=mixture: the newcomer, as it came, scores the incumbent's top-2 tokens (ids 2, 0) of the 6 training
    messages; the teacher becomes, per position, the geometric mixture closest to the newcomer within the budget
    δ₀ / (2 × mean tokens per message) = 0.01 / (2 × 14/6) = 0.0021429. Row 0's newcomer already equals the incumbent
    there (t = 0, its own distribution); elsewhere π_inc = [0.6, 0.3 | rest 0.1] and π_new = [0.2, 0.3 | 0.5] (KL
    0.498 per position), so the target sits on the budget's edge, between the two."""
    held = heldout_prompts(PROMPTS, 0.25, 4, 0)
    rows = (PROMPTS - len(held)) * SESSIONS
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 1, 1]] * 2)  # 4 x 2 + 2 x 3 = 14 real tokens over 6 messages
    assert rows == len(mask)
    log = []
    trainer = aligned_swap_trainer(make_trainer, base_configs, bob_v2, tmp_path, log, [1.0, 0.1], monkeypatch,
                                   topk=2, target="mixture")
    monkeypatch.setattr(trainer_module, "read_sequences", lambda batch: {"keys": list(batch.keys),
                                                                         "response_mask": mask})
    inc, new = torch.tensor([0.6, 0.3]).log(), torch.tensor([0.2, 0.3]).log()
    ids = torch.tensor([2, 0], dtype=torch.int32).expand(rows, 3, 2)
    trainer.stacks["bob"].worker_group.topk_result = {"log_probs": inc.expand(rows, 3, 2), "ids": ids}
    newcomer = trainer._incoming.worker_group
    newcomer.logprobs_at_result = torch.stack([inc.expand(3, 2)] + [new.expand(3, 2)] * (rows - 1))
    metrics = {}
    trainer.step(metrics, {})
    assert [e for e in log if e[0] in ("logprobs_at", "distill")] == [
        ("logprobs_at", "bob-new", (rows, 3, 2)), ("distill", "bob-new", "tensors", 8, None)]
    budget = DELTA / (2 * 14 / 6)
    teacher = newcomer.teacher
    assert torch.equal(teacher["ids"], ids) and teacher["log_probs"].dtype == torch.float32
    target = teacher["log_probs"].double()
    assert torch.allclose(target[0], inc.double().expand(3, 2))  # t = 0: the newcomer, here the incumbent
    coarse = algos.with_rest(target)
    kl = algos.exact_kl(algos.with_rest(inc).expand_as(coarse), coarse)
    real = mask[1:] > 0
    assert kl[1:][real].tolist() == pytest.approx([budget] * 12, rel=1e-4)
    assert kl[1:][~real].tolist() == [0.0] * 3  # padding, out of the loss: left as the incumbent's
    p = target[1:][real].exp()  # between the two: less of token 2 than the incumbent, more than the newcomer
    assert bool(((p[..., 0] > 0.2) & (p[..., 0] < 0.6)).all())
    t = algos.topk_mixture_target(inc, new, budget).t.item()
    assert 0 < t < 1 and metrics["teamtr/stage0/mixture_t"] == pytest.approx(12 / 14 * t)  # row 0's 2 tokens: t = 0


def test_a_release_that_fails_leaves_the_committed_swap_in_place(make_trainer, base_configs, bob_v2, tmp_path,
                                                                  monkeypatch):
    """Ending the incumbent's actors comes after the swap: Ray's actor table failing then is reported (metric −1), not
    a reason to lose an aligned newcomer."""
    log = []
    trainer = aligned_swap_trainer(make_trainer, base_configs, bob_v2, tmp_path, log, [1.0, 0.1], monkeypatch)

    def broken(stack):
        raise RuntimeError("GCS unavailable")

    monkeypatch.setattr(trainer_module, "release_stack", broken)
    metrics = {}
    trainer.step(metrics, {})
    assert metrics["teamtr/stage0/released_left"] == -1 and metrics["teamtr/bob/replaced"] == 1.0
    assert trainer.state.replacements[0]["target"] == "incumbent"
    assert trainer.stacks["bob"].worker_group.name == "bob-new"


def test_an_aligned_swap_that_misses_delta0_is_refused_and_saves_nothing(make_trainer, base_configs, bob_v2,
                                                                         tmp_path, monkeypatch):
    log = []
    trainer = aligned_swap_trainer(make_trainer, base_configs, bob_v2, tmp_path, log, [1.0, 0.5], monkeypatch,
                                   max_epochs=1)
    before = copy.deepcopy(trainer.state)
    with pytest.raises(trainer_module.Stage0RefusedError,
                       match=r"teamtr.replace: agent 'bob' -> .*: not aligned within 1 steps: KL 0.0576 > delta0 0.01 "
                             r"\(curve 0.2131, 0.0576\); the swap is refused. Nothing was saved"):
        trainer.step({}, {})
    assert [e for e in log if e[0] in ("save", "sync", "route", "release")] == []
    assert trainer.state == before and not list(tmp_path.iterdir())


class Killed(Exception):
    """Stands for a kill -9 of the driver right after a checkpoint was committed."""


def test_a_run_killed_inside_a_stage_resumes_with_the_next_agent_and_loses_nothing(make_trainer, base_configs,
                                                                                  tmp_path):
    config = team_config(base_configs, 3, save_every_update=True)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path / "ckpt"))
    OmegaConf.update(config, "trainer.resume_mode", "auto")
    kl = {"alice": [0.2, 0.009], "bob": [0.004], "carol": [0.02, 0.003]}  # alice and carol backtrack once
    # the reference: the same stage, uninterrupted
    reference = make_trainer(team_config(base_configs, 3), [], Script(kl=kl))
    reference_metrics = {}
    reference.step(reference_metrics, {})

    log = []
    trainer = make_trainer(config, log, Script(kl=kl))
    trainer.train_dataloader = FakeDataloader(position=7)  # where the loader stood before stage 1's prompts
    save = trainer._save_checkpoint

    def save_then_die(cursor=None):
        save(cursor)
        if cursor and cursor["done"] == 2:
            raise Killed
    trainer._save_checkpoint = save_then_die
    trainer.train_dataloader.position = 7
    with pytest.raises(Killed):
        trainer.step({}, {})
    root = tmp_path / "ckpt"
    # after update 1 every agent was saved (nothing was before); after update 2 only bob, who changed since
    saves = [(e[1], Path(e[2]).parent.name.removeprefix(".tmp_")) for e in log if e[0] == "save"]
    assert saves == [("alice", "stage_1_update_1"), ("bob", "stage_1_update_1"), ("carol", "stage_1_update_1"),
                     ("bob", "stage_1_update_2")]
    assert (root / "teamtr_latest.txt").read_text() == "stage_1_update_2"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["stage_1_update_1", "stage_1_update_2"]

    log.clear()
    resumed = make_trainer(config, log, Script(kl={"carol": kl["carol"]}), global_steps=0)
    resumed.train_dataloader = FakeDataloader(position=99)
    resumed._load_checkpoint()
    assert resumed.global_steps == 0 and resumed.train_dataloader.position == 7  # stage 1's prompts are redrawn
    assert [e for e in log if e[0] == "load"] == [
        ("load", "alice", str(root / "stage_1_update_1" / "alice")), ("load", "bob", str(root / "stage_1_update_2" / "bob")),
        ("load", "carol", str(root / "stage_1_update_1" / "carol"))]
    resumed.global_steps = 1  # verl's fit: the next step
    metrics = {}
    resumed.step(metrics, {})
    resumed.on_step_end()
    # only carol is updated, after one regeneration of the same stage; the stage's metrics are whole again
    assert [e[1] for e in log if e[0] == "update"] == ["carol"]
    assert [r["stage"] for r in resumed.rollouts.submitted] == [1, 1]  # its regeneration and the closing one
    for agent in ("alice", "bob", "carol"):
        for key in ("kl", "committed", "backtracks", "messages"):
            assert metrics[f"teamtr/{agent}/{key}"] == reference_metrics[f"teamtr/{agent}/{key}"], (agent, key)
    strip = ("measured", "crn_gain", "crn_gain_se")  # bob's gain was to be measured on the rollout the kill lost
    assert [{k: v for k, v in u.items() if k not in strip} for u in resumed.state.ledger] == [
        {k: v for k, v in u.items() if k not in strip} for u in reference.state.ledger]
    assert resumed.state.ledger[1]["crn_gain"] is None and resumed.state.ledger[2]["crn_gain"] is not None
    assert resumed.state.beta == reference.state.beta and resumed.state.cursor is None
    # the stage end is saved whole; the in-stage folders are no longer needed
    assert (root / "teamtr_latest.txt").read_text() == "global_step_1"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["global_step_1"]
    assert [e[1] for e in log if e[0] == "save"] == ["alice", "bob", "carol"]


def test_stale_saves_only_at_stage_ends_under_save_every_update(make_trainer, base_configs, tmp_path):
    config = team_config(base_configs, 3, save_every_update=True, schedule="stale")
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path))
    log = []
    trainer = make_trainer(config, log)
    trainer.train_dataloader = FakeDataloader()
    trainer.step({}, {})
    assert not [e for e in log if e[0] == "save"]  # the cached rollout cannot be resumed from: no in-stage point
    trainer.on_step_end()
    assert (tmp_path / "teamtr_latest.txt").read_text() == "global_step_1"


# ------------------------------------------------------------------------------------------- batch multiples
def verl_micro_batches_accept(rows: int, micro_batch_size_per_gpu: int) -> bool:
    """verl's own fixed-micro-batch split (engine.utils.prepare_micro_batches) on one rank's ``rows``."""
    from verl.workers.engine.utils import prepare_micro_batches

    data = TensorDict({"x": torch.zeros(rows, 1)}, batch_size=[rows])
    tu.assign_non_tensor(data, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size_per_gpu)
    try:
        prepare_micro_batches(data)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("config_name, router, turns_of", [
    # budget-sq: 16 prompts, 4 held out -> 12 x 8 = 96 trained rows per agent, 32 held-out
    ("teamtr_budget_cpu", "{kind: chain}", {"alice": 1, "bob": 1}),
    # three agents, round robin over 4 turns: alice speaks twice -> twice bob's and carol's rows
    ("teamtr_relay_cpu", "{kind: round_robin, turns: 4}", {"alice": 2, "bob": 1, "carol": 1}),
])
def test_every_agents_rows_fill_whole_micro_batches_once_the_config_validates(model_dirs, config_name, router,
                                                                              turns_of):
    """verl pads each agent's rows to its mini-batch multiple; the validated configs' micro-batches divide it, so
    verl's own micro-batch split accepts every agent's trained and held-out rows, for any router."""
    from teamtr_verl.validation import validate_micro_batches

    agents = ", ".join(f"{{name: {n}, model: '{d}'}}" for n, d in zip(turns_of, model_dirs))
    config = compose(str(CONFIG_DIR), config_name, [f"teamtr.agents=[{agents}]", f"teamtr.router={router}",
                                                    f"trainer.n_gpus_per_node={len(turns_of)}"])
    team = TeamConfig.from_config(config.teamtr)
    validate_micro_batches(config, team)
    trainer = TeamTRTrainer.__new__(TeamTRTrainer)
    trainer.config, trainer.global_steps, trainer.use_critic = config, 1, False
    dp = 1  # one device per agent in split placement
    rollout = config.actor_rollout_ref.rollout
    prompts = config.data.train_batch_size
    heldout = len(heldout_prompts(prompts, team.certificate.heldout_fraction, 1))
    multiple = trainer._get_required_batch_multiple(dp)  # verl's: lcm(dp, mini-batch rows)
    for name, turns in turns_of.items():
        for groups in (prompts - heldout, heldout):  # the trained rows and the held-out (measured) rows
            padded = math.ceil(groups * rollout.n * turns / multiple) * multiple
            for micro in (rollout.log_prob_micro_batch_size_per_gpu,
                          config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu):
                assert verl_micro_batches_accept(padded // dp, micro), (name, padded, micro)


def test_a_micro_batch_that_does_not_divide_the_mini_batch_is_refused_before_ray(model_dirs):
    from teamtr_verl.config import TeamConfigError
    from teamtr_verl.validation import validate_micro_batches

    agents = ", ".join(f"{{name: {n}, model: '{d}'}}" for n, d in zip(("alice", "bob"), model_dirs))
    # the budget config's earlier setting: 64-row micro-batches, mini-batches of 4 prompts x 8 samples = 32 rows.
    # verl padded 96 trained rows to 128 for the micro-batches: a fourth mini-batch of padding only.
    config = compose(str(CONFIG_DIR), "teamtr_budget_cpu", [f"teamtr.agents=[{agents}]", "trainer.n_gpus_per_node=2",
                                                             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64"])
    with pytest.raises(TeamConfigError, match=r"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64 does "
                                              r"not divide the mini-batch of agent 'alice': .* = 32 rows over 1 device"):
        validate_micro_batches(config, TeamConfig.from_config(config.teamtr))
    assert verl_micro_batches_accept(128, 64) and not verl_micro_batches_accept(96, 64)


def test_each_stage_prints_one_console_line(make_trainer, base_configs, capsys):
    trainer = make_trainer(team_config(base_configs, 2), [], Script(kl={"bob": [0.5] * 7}))  # bob is given up
    trainer.total_training_steps = 15
    trainer.step(metrics := {}, {})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teamtr stage")]
    assert len(lines) == 1
    assert lines[0].startswith(f"teamtr stage 1/15 | return {metrics['teamtr/stage/return_mean']:.3f} | "
                               f"alice KL {metrics['teamtr/alice/kl']:.4f}/0.01 | bob KL 0.0000/0.01 given up | ")
    assert lines[0].endswith(" s")


def test_split_prompts_give_each_update_its_own_part_with_the_stages_seeds(make_trainer, base_configs):
    trainer = make_trainer(team_config(base_configs, 2, prompts_per_update="split"), [])
    metrics = {}
    trainer.step(metrics, {})
    submitted = trainer.rollouts.submitted
    prompts_of = [sorted(episode_of(f"{uid}_0_0")[0] for uid in s["uid"]) for s in submitted]
    # alice regenerates prompts 0-1, bob 2-3, and the closing regeneration measures bob's update on bob's part
    assert prompts_of == [[0, 1], [2, 3], [2, 3]]
    seeds = prompt_seeds(1, PROMPTS)
    for regeneration, prompts in zip(submitted, prompts_of):
        assert regeneration["seed"] == [seeds[p] for p in prompts]  # the same per-prompt seeds as an `all` stage
    # each update trains on its part minus one held-out prompt of it, and is measured on that held-out prompt
    for name, part in (("alice", {0, 1}), ("bob", {2, 3})):
        trained = {episode_of(k)[0] for agent, keys in trainer.trained_keys if agent == name for k in keys}
        measured = {episode_of(k)[0] for agent, keys in trainer.measured_keys if agent == name for k in keys}
        assert len(trained) == len(measured) == 1 and trained | measured == part
    assert metrics["teamtr/stage/episodes"] == 3 * 2 * SESSIONS  # an `all` stage: 3 x 4 x SESSIONS
    # alice's update is never paired (the next regeneration covers other prompts); bob's is, by the closing one
    alice, bob = trainer.state.ledger
    assert alice["crn_gain"] is None and bob["crn_gain"] == pytest.approx(RETURN_STEP)
    assert metrics["teamtr/stage/gain_measurements"] == 1


def test_split_measures_the_last_update_on_its_parts_heldout_prompt_or_on_a_one_prompt_part_whole(make_trainer,
                                                                                                    base_configs):
    """split, 2 agents: parts [0, 1], [2, 3]; the closing regeneration (3) repeats bob's (2), and bob's gain is taken
    on the held-out prompt of his part, the in-sample one on the other. 3 agents over 4 prompts: the last part has one
    prompt, none held out: the gain is the all-episode one and, without a bound, no calibration pair."""
    trainer = make_trainer(team_config(base_configs, 2, prompts_per_update="split"), [])
    trainer.rollouts.script.returns = lambda g, p, s: RETURN_TABLE[g][(p, s)]
    metrics = {}
    trainer.step(metrics, {})
    (held,) = {episode_of(k)[0] for agent, keys in trainer.measured_keys if agent == "bob" for k in keys}
    (other,) = {2, 3} - {held}  # held-out prompts under split are drawn within each part
    bob = trainer.state.ledger[1]
    mean, se = hand_gain(RETURN_TABLE[3], RETURN_TABLE[2], {(held, s) for s in range(SESSIONS)})
    assert (bob["crn_gain"], bob["crn_gain_se"]) == (pytest.approx(mean), pytest.approx(se))
    train = hand_gain(RETURN_TABLE[3], RETURN_TABLE[2], {(other, s) for s in range(SESSIONS)})[0]
    assert metrics["teamtr/bob/crn_gain_train"] == pytest.approx(train) and train != pytest.approx(mean)

    trainer = make_trainer(team_config(base_configs, 3, prompts_per_update="split"), [])
    trainer.rollouts.script.returns = lambda g, p, s: RETURN_TABLE[g][(p, s)]
    metrics = {}
    trainer.step(metrics, {})
    last = sorted(episode_of(f"{uid}_0_0")[0] for uid in trainer.rollouts.submitted[-1]["uid"])
    assert len(last) == 1  # a one-prompt part
    carol = trainer.state.ledger[2]
    mean, se = hand_gain(RETURN_TABLE[4], RETURN_TABLE[3], {(last[0], s) for s in range(SESSIONS)})
    assert (carol["crn_gain"], carol["crn_gain_se"]) == (pytest.approx(mean), pytest.approx(se))
    assert carol["bound"] is None and trainer.state.gain_pairs == []
    assert "teamtr/carol/crn_gain_train" not in metrics


# ------------------------------------------------------------------------------------------------ prefix reuse
def reused_turns(regeneration) -> set[int]:
    """How many leading turns each episode of a regeneration got from the previous one (one value, or empty)."""
    if regeneration["prefix"] is None:
        return set()
    return {len(turns) for sessions in regeneration["prefix"] for turns in sessions.values()}


@pytest.mark.parametrize("order, teamtr, kl, expected", [
    # chain alice -> bob -> carol. Reversed order: before bob's update only carol changed, so every episode keeps
    # alice's and bob's turns (2); before alice's, bob changed (1); the closing regeneration follows alice (0)
    ("reversed", {}, {}, [set(), {2}, {1}, set()]),
    # fixed order: the agent updated last speaks later each time: 0, 1, then 2 turns kept
    ("fixed", {}, {}, [set(), set(), {1}, {2}]),
    # bob's update is given up (his every try exceeds δ): nothing changed before carol's regeneration: all 3 turns
    ("fixed", {}, {"bob": [0.5] * 7}, [set(), set(), {3}, {2}]),
    ("reversed", {"reuse_prefix": False}, {}, [set(), set(), set(), set()]),
    ("reversed", {"router": {"kind": "random", "turns": 3}}, {}, [set(), set(), set(), set()]),  # not exact
])
def test_each_regeneration_reuses_the_turns_before_the_first_changed_speaker(make_trainer, base_configs, order, teamtr,
                                                                            kl, expected):
    trainer = make_trainer(team_config(base_configs, 3, order=order, **teamtr), [], Script(kl=kl))
    trainer.step({}, {})
    submitted = trainer.rollouts.submitted
    assert [reused_turns(r) for r in submitted] == expected
    for regeneration in submitted[1:]:
        if regeneration["prefix"] is None:
            continue
        # every prompt and session of the previous rollout, turns in order, exactly the earlier rows' ids
        assert len(regeneration["prefix"]) == PROMPTS
        for sessions in regeneration["prefix"]:
            assert sorted(sessions) == [str(s) for s in range(SESSIONS)]
            for turns in sessions.values():
                assert [t[1] for t in turns] == [[100 + turn] for turn in range(len(turns))]
                assert all(t[2] == [-0.5] and t[3] == {"global_steps": 1} for t in turns)


def test_a_dropped_trajectory_is_regenerated_whole(make_trainer, base_configs):
    # regeneration 1 (before carol, reversed order) lost prompt 2's session 1: regeneration 2 regenerates that episode
    trainer = make_trainer(team_config(base_configs, 3, order="reversed"), [], Script(drop={1: {(2, 1)}}))
    trainer.step({}, {})
    prefix = trainer.rollouts.submitted[1]["prefix"]
    assert [sorted(sessions) for sessions in prefix] == [["0", "1"], ["0", "1"], ["0"], ["0", "1"]]


def test_split_prompts_reuse_only_in_the_closing_regeneration(make_trainer, base_configs):
    # each update regenerates another part: nothing to reuse; the closing one repeats the last part after carol
    trainer = make_trainer(team_config(base_configs, 3, order="reversed", prompts_per_update="split"), [])
    trainer.step({}, {})
    assert [reused_turns(r) for r in trainer.rollouts.submitted] == [set(), set(), set(), set()]
    trainer = make_trainer(team_config(base_configs, 3, prompts_per_update="split"), [])
    trainer.step({}, {})
    assert [reused_turns(r) for r in trainer.rollouts.submitted] == [set(), set(), set(), {2}]
