"""``TeamTRTrainer``: verl's v1 trainer mode ``teamtr`` (``trainer.v1.trainer_mode=teamtr``).

One verl training step is one TeamTR *stage*::

    order σ of the agents (fixed | reversed | random, seeded); the stage's prompts (all, or N parts: split)
    for i, k in enumerate(σ):
        if the schedule says so: regenerate the team's rollouts of the prompts (part i) through the agents' servers,
            keeping each episode's turns before the first turn of an agent changed since (prefix reuse)
        agent k's old log-probs on its own messages; Eq. 9 advantages of the team trajectories
        update agent k only, with the teamtr loss at its β_k; a line search commits a fraction of the step whose
            KL(π_cur ‖ π_new) ≤ δ_k, or restores the pre-update weights and optimizer state (give up)
        measure the committed update on held-out prompt groups (the certificate's bound)
        push agent k's weights into agent k's replicas only; save_every_update: checkpoint with the stage cursor
    closing regeneration (the last update's paired gain); log per-agent diagnostics and the stage certificate

The trainer only orchestrates: the math is in :mod:`teamtr_verl.algos`, the team topology in
:mod:`teamtr_verl.topology`, TransferQueue reads/writes in :mod:`teamtr_verl.rollout_batch`, and everything that
survives a checkpoint in :class:`teamtr_verl.state.TeamTRState`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from functools import partial
from typing import Optional

import torch
from omegaconf import DictConfig
from transfer_queue import KVBatchMeta
from verl.experimental.reward_loop import RewardLoopManager
from verl.trainer.ppo.utils import need_reference_policy
from verl.trainer.ppo.v1.trainer_base import PPOTrainer, register_trainer
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from teamtr_verl import algos, checkpoints, patches
from teamtr_verl.config import INCOMING_SUFFIX, TeamConfig, TeamConfigError
from teamtr_verl.defaults import PREFIX_FIELD, PROBE_FIELD, TRAINER_MODE
from teamtr_verl.rollout_batch import (
    TeamRollout,
    likelihood_teacher,
    pack_sequences,
    read_log_probs,
    read_rows,
    read_sequences,
    read_team_rollout,
    read_turn_records,
    retokenize_rows,
    write_advantages,
)
from teamtr_verl.state import TeamTRState, stage0_pending
from teamtr_verl.team import SEED_FIELD, TeamLLMClient, agent_tokenizer
from teamtr_verl.team_logic import (
    heldout_prompts,
    prefix_reuse_is_exact,
    prompt_seeds,
    reusable_turns,
    router_schedule,
    same_vocabulary,
)
from teamtr_verl.topology import build_team_stacks, expected_server_names, release_stack, stacks_team
from teamtr_verl.watchdog import AgentWatch, describe

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))



class AgentDiedError(RuntimeError):
    """A Ray actor (FSDP worker, vLLM server) of an agent died during a stage."""


class NonFiniteUpdateError(RuntimeError):
    """A non-finite loss, KL or grad norm in one agent's update (``teamtr.on_nonfinite=error``)."""


class Stage0RefusedError(RuntimeError):
    """The incoming model of a ``teamtr.replace`` did not reach δ₀ within its epochs: the swap is refused."""


@dataclasses.dataclass
class TeamTRPolicyLossConfig(PolicyLossConfig):
    """verl's policy-loss config plus the teamtr loss's own options: verl 0.9.1's PolicyLossConfig has no field for
    them, so without this they would never reach :func:`teamtr_verl.algos.compute_teamtr_policy_loss`."""

    kl_estimator: str = algos.DEFAULT_KL_ESTIMATOR
    ratio_level: str = algos.DEFAULT_RATIO_LEVEL
    kl_reduction: str = algos.DEFAULT_KL_REDUCTION


def agent_loss_config(actor: DictConfig, beta: float, team: TeamConfig):
    """The actor config verl's ``ppo_loss`` gets for one agent update: β as ``policy_loss.ppo_kl_coef`` and the
    team's KL estimator, ratio level and KL reduction (the monitor that checks δ uses the same estimator)."""
    config = omega_conf_to_dataclass(actor)
    fields = {f.name: getattr(config.policy_loss, f.name) for f in dataclasses.fields(PolicyLossConfig)}
    fields.update(ppo_kl_coef=float(beta), kl_estimator=team.kl_estimator, ratio_level=team.ratio_level,
                  kl_reduction=team.kl_reduction)
    return dataclasses.replace(config, policy_loss=TeamTRPolicyLossConfig(**fields))


def stage_line(stage: int, total: Optional[int], order: list[str], metrics: dict, seconds: float) -> str:
    """The one console line of a stage (``make demo`` shows only these; verl's full log goes to a file)."""
    parts = [f"teamtr stage {stage}/{total or '?'}", f"return {metrics.get('teamtr/stage/return_mean', math.nan):.3f}"]
    for name in order:
        kl, delta = metrics.get(f"teamtr/{name}/kl", math.nan), metrics.get(f"teamtr/{name}/delta", math.nan)
        given_up = metrics.get(f"teamtr/{name}/committed", 1.0) == 0.0
        parts.append(f"{name} KL {kl:.4f}/{delta:g}" + (" given up" if given_up else ""))
    if "teamtr/stage/calibration" in metrics:
        parts.append(f"certificate held {metrics['teamtr/stage/calibration']:.0%}")
    parts.append(f"{seconds:.0f} s")
    return " | ".join(parts)


def _plain_numbers(metrics: dict) -> dict:
    """The JSON-serialisable (numeric) part of a stage's metrics, for an in-stage checkpoint."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


@register_trainer(TRAINER_MODE)
class TeamTRTrainer(PPOTrainer):
    """Sequential per-agent trust-region updates of a team, regenerating rollouts after every agent update."""

    def __init__(self, config: DictConfig):
        super().__init__(config)
        # verl branches on the literal "sync" (replay buffer, dataloader, TransferQueue persistence); a stage is
        # synchronous: every regeneration is consumed before the next one starts.
        self.trainer_mode = "sync"
        self.replay_buffer = self._build_replay_buffer()
        patches.poll_with_backoff(self.replay_buffer)  # a stage waits on N + 1 rollouts: not in steps of 2 s
        self.team = TeamConfig.from_config(config.teamtr, check_paths=False)
        self.state = TeamTRState.initial(self.team)
        self.stacks = {}
        self._saved_at: dict[str, str] = {}  # agent -> "<folder>/<agent>" holding its current weights (unchanged since)
        self._stage_data_state = None  # the train loader before this stage's prompts (in-stage checkpoints)
        self._stage_saved = False
        self._swap_metrics: dict = {}  # teamtr.replace done at resume: reported with the next stage
        self._stage0 = False  # a Stage-0 aligned swap runs before the first stage's first update
        self._incoming = None  # its incoming model's stack, until the swap

    # ---------------------------------------------------------------------------------------------------- set-up
    def _setup(self):
        self._init_tokenizer()
        self._init_dataloader()
        self._init_dump_executor()
        self.use_critic = False  # outcome rewards + group baselines: no critic (validated before Ray starts)
        self.ref_in_actor = False
        role = "actor_rollout_ref" if need_reference_policy(self.config) else "actor_rollout"
        self._stage0 = stage0_pending(self.config.trainer, self.team)
        built = stacks_team(self.team, self._stage0)  # + the incoming model's stack while a Stage 0 is to be done
        self.stacks = build_team_stacks(self.config, built, role=role)
        if self._stage0:
            self._incoming = self.stacks.pop(built.agents[-1].name)
        self._bind(self.team.trained_names[0])  # verl's helpers (validation, metrics) see one agent at a time
        self.reward_loop_manager = RewardLoopManager(config=self.config, rm_resource_pool=None)
        self.teacher_model_manager, self.distillation_config = None, None
        for stack in self._trained_stacks(with_incoming=True):
            stack.checkpoint_manager.sleep_replicas()
        # a dead worker or vLLM server stops the run naming its agent, instead of a stage waiting forever
        self.watch = AgentWatch.of_team(built.agent_names, expected_server_names(self.config, built))
        for line in self.watch.summary():
            print(line, flush=True)
        self.watch.start()
        self._load_checkpoint()

    def fit(self, agent_loop_manager):
        # verl creates its agent-loop workers between _setup and fit: watch them too (a dead one hangs a rollout)
        known = len(self.watch.actors_of)
        self.watch.watch_shared_workers()
        for line in self.watch.summary()[known:]:
            print(line, flush=True)
        try:
            return super().fit(agent_loop_manager)
        finally:
            self.watch.stop()

    def on_init_end(self):
        # As verl's sync trainer: push the (possibly just loaded) weights into every trained agent's replicas once
        # (a frozen agent's servers loaded theirs from its model path).
        for stack in self._trained_stacks(with_incoming=True):
            stack.checkpoint_manager.update_weights(self.global_steps)

    def get_llm_client(self):
        clients = {name: stack.client() for name, stack in self.stacks.items()}
        return TeamLLMClient(self.config, clients, default_agent=self.team.agent_names[0])

    def on_step_end(self):
        # each agent's weights were pushed right after its own update; save_every_update also saves every stage end
        if self.team.save_every_update and not self._stage_saved:
            self._save_checkpoint()
        self._stage_saved = False

    def on_sample_end(self):
        return None  # replicas sleep per agent, only around that agent's own update (see _update_agent)

    def _get_n_gpus_for_throughput(self) -> int:
        return self.config.trainer.n_gpus_per_node * self.config.trainer.nnodes

    def _trained_stacks(self, with_incoming: bool = False) -> list:
        """The stacks of the trained agents, in team order (a frozen agent has no actor, optimizer or weights to
        save, load or sync); ``with_incoming``: and the incoming model's of a Stage 0 still to be done."""
        incoming = [self._incoming] if with_incoming and self._incoming is not None else []
        return [self.stacks[name] for name in self.team.trained_names] + incoming

    def _bind(self, name: str) -> None:
        """Point verl's single-agent attributes at agent ``name``'s stack."""
        stack = self.stacks[name]
        self.actor_rollout_wg = self.ref_policy_wg = stack.worker_group
        self.llm_server_manager = stack.server_manager
        self.checkpoint_manager = stack.checkpoint_manager

    @contextlib.contextmanager
    def _agent_context(self, name: str, model: Optional[str] = None):
        """verl's helpers read ``self.config`` and ``self.actor_rollout_wg``: show them agent ``name``'s (``model``:
        the model its stack holds where that is not the team's, the incumbent of a Stage 0)."""
        team_config, team_tokenizer = self.config, self.tokenizer
        self._bind(name)
        self.config = self.stacks[name].config
        # verl pads the agent's rows with its EOS id
        self.tokenizer = agent_tokenizer(model or self.team.agent(name).model)
        try:
            yield self.stacks[name]
        finally:
            self.config, self.tokenizer = team_config, team_tokenizer

    # ----------------------------------------------------------------------------------------------------- stage
    def step(self, metrics: dict, timing_raw: dict) -> KVBatchMeta:
        """One TeamTR stage; returns every TransferQueue key it created (verl's fit() clears them)."""
        try:
            return self._stage(metrics)
        except (AgentDiedError, NonFiniteUpdateError, Stage0RefusedError, TeamConfigError):
            raise  # the run's own verdicts: no actor to look for
        except Exception as error:
            # a dead actor surfaces as whatever fails first (RayActorError, or verl's replay buffer finding only
            # failed episodes): name the agent whose actor died, if one did (the watch may not have polled yet)
            watch = getattr(self, "watch", None)
            dead = watch.dead_within() if watch is not None else []
            if dead:
                raise AgentDiedError(f"teamtr: stage {self.global_steps}: {describe(dead)}") from error
            raise

    def _stage(self, metrics: dict) -> KVBatchMeta:
        stage, stage_start = self.global_steps, time.perf_counter()
        cursor = self.state.cursor if self.state.cursor and self.state.cursor["stage"] == stage else None
        if self.team.save_every_update and cursor is None:  # an in-stage checkpoint redraws these same prompts
            self._stage_data_state = self.train_dataloader.state_dict()
        prompts = self._next_train_batch()
        order = cursor["order"] if cursor else self.state.next_order(self.team)
        done = cursor["done"] if cursor else 0
        metrics.update(self._swap_metrics)
        self._swap_metrics = {}
        if cursor:  # resumed inside this stage: its earlier updates' metrics, then the next agent of the same order
            metrics.update(cursor["metrics"])
            logger.info("teamtr: stage %d resumes after %d of its updates (%s)", stage, done, order[:done])
        parts = self.team.prompt_parts(len(prompts), len(order))
        heldout = self._heldout(parts, stage)
        self._created: list[KVBatchMeta] = []
        self._nonfinite: dict[str, int] = {}
        self._trained_batches: list[KVBatchMeta] = []
        rollout: Optional[TeamRollout] = None
        prior_log_w: Optional[torch.Tensor] = None  # stale/happo: log of the earlier updates' trajectory ratios
        changed: set[str] = set()  # agents whose update was committed since the last regeneration
        untrained = heldout  # prompts no update since the last regeneration trained on: its gain is measured there
        if self._stage0:  # the swap's probe pairs with (and lends its prefixes to) the stage's first regeneration
            rollout, changed, untrained = self._align_incoming(prompts, stage, metrics)
        for index, name in enumerate(order):
            if index < done:
                continue
            if self.team.regenerates_before(index):
                print(f"teamtr: stage {stage}: regenerating before {name}'s update", flush=True)  # progress in the log
                start = time.perf_counter()
                rollout = self._regenerate(prompts, parts[index], stage, rollout, metrics, changed, untrained)
                changed, untrained = set(), heldout
                metrics[f"teamtr/{name}/gen_s"] = time.perf_counter() - start
                prior_log_w = torch.zeros(len(rollout.trajectories), dtype=torch.float64)
            else:
                metrics[f"teamtr/{name}/gen_s"] = 0.0
            print(f"teamtr: stage {stage}: updating {name}", flush=True)
            log_w = self._update_agent(name, rollout, heldout, prior_log_w, stage, index, metrics)
            if log_w is not None:  # a later update on this same rollout (stale, happo, resample_every) weights by it
                prior_log_w = prior_log_w + log_w
                changed.add(name)
            self._sync(name, metrics)
            if self.team.checkpoints_after(index, len(order)):
                self._save_checkpoint(cursor={"stage": stage, "order": list(order), "done": index + 1,
                                              "metrics": _plain_numbers(metrics)})
        self.state.cursor = None
        if self.team.certificate.closing_regeneration:  # the last update's gain, on this stage's episodes
            start = time.perf_counter()
            self._regenerate(prompts, parts[-1], stage, rollout, metrics, changed, untrained)
            metrics["teamtr/stage/closing_gen_s"] = time.perf_counter() - start
        self._log_stage(order, metrics)
        self.state.stages_done = stage
        print(stage_line(stage, getattr(self, "total_training_steps", None), order, metrics,
                         time.perf_counter() - stage_start), flush=True)
        tag_of = {}  # every key once (an agent's batch repeats its rollout's keys, plus its padding rows)
        for batch in self._created:
            tag_of.update({key: tag for key, tag in zip(batch.keys, batch.tags) if key not in tag_of})
        return KVBatchMeta(partition_id="train", keys=list(tag_of), tags=list(tag_of.values()))

    def _heldout(self, parts: list[list[int]], stage: int) -> frozenset[int]:
        """The stage's held-out prompt indices, drawn within each distinct part (so every update trains on some)."""
        fraction, seed = self.team.certificate.heldout_fraction, self.team.order_seed
        held = set()
        for number, part in enumerate(dict.fromkeys(map(tuple, parts))):
            held |= {part[j] for j in heldout_prompts(len(part), fraction, stage, seed + number)}
        return frozenset(held)

    def _regenerate(self, prompts, part: list[int], stage: int, previous: Optional[TeamRollout],
                    metrics: dict, changed: frozenset[str] | set[str] = frozenset(),
                    untrained: frozenset[int] = frozenset(), probe: bool = False) -> TeamRollout:
        """Team rollouts of the current team on the stage's prompts ``part`` (indices): fresh uids that keep each
        prompt's index, existing servers, and (``certificate.crn``) the stage's sampling seeds, so that it pairs
        episode by episode with ``previous`` where both cover the same prompts. With ``reuse_prefix``, each episode's
        turns before the first turn of a ``changed`` agent are taken from ``previous`` instead of generated.
        ``untrained``: the prompts no update since ``previous`` trained on, where the paired gain is measured.
        ``probe``: a Stage-0 probe, where the swapped agent is still the incumbent (its tokenizer, its servers)."""
        batch = tu.index_select_tensor_dict(prompts, list(part))
        uids = [f"p{index}x{uuid.uuid4().hex}" for index in part]  # no "_": verl splits keys on it
        tu.assign_non_tensor_stack(batch, "uid", uids)
        if self.team.certificate.crn:
            seeds = prompt_seeds(stage, len(prompts), self.team.order_seed)
            tu.assign_non_tensor_stack(batch, SEED_FIELD, [seeds[index] for index in part])
        if probe:
            tu.assign_non_tensor_stack(batch, PROBE_FIELD, [True] * len(part))
        prefix = self._reusable_prefix(previous, part, changed)
        if prefix:
            tu.assign_non_tensor_stack(batch, PREFIX_FIELD, [prefix.get(index, "") for index in part])
        self._submit_batch_to_rollout(batch)
        meta, sample_metrics = self.replay_buffer.sample(
            global_steps=self.global_steps, partition_id="train", batch_size=len(part)
        )
        meta.extra_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        rollout = read_team_rollout(meta, len(part) * self.config.actor_rollout_ref.rollout.n,
                                    self.team.a_clip, self.team.norm_eps, dict(zip(uids, part)))
        self._created.append(rollout.meta)
        metrics["teamtr/rollout/dropped_trajectories"] = (
            metrics.get("teamtr/rollout/dropped_trajectories", 0) + rollout.dropped_trajectories
        )
        metrics["teamtr/stage/episodes"] = metrics.get("teamtr/stage/episodes", 0) + len(rollout.returns)
        if rollout.reused is not None:  # what this regeneration sampled, and what it took from the previous one
            generated = [not reused for reused in rollout.reused]
            for key, value in (("turns_generated", sum(generated)), ("turns_reused", len(generated) - sum(generated)),
                               ("tokens_generated", int(rollout.response_len[generated].sum()))):
                metrics[f"teamtr/stage/{key}"] = metrics.get(f"teamtr/stage/{key}", 0) + value
        metrics.update({k: v for k, v in sample_metrics.items() if isinstance(v, (int, float))})
        metrics.setdefault("teamtr/stage/return_mean", rollout.return_mean)  # the stage's first regeneration
        if previous is not None:
            self._record_paired_gain(previous, rollout, metrics, untrained)
        return rollout

    def _reusable_prefix(self, previous: Optional[TeamRollout], part: list[int],
                         changed: frozenset[str] | set[str]) -> dict[int, str]:
        """Per prompt index, the JSON prefix (``PREFIX_FIELD``) of its episodes: their turns in ``previous`` before
        the first turn of a changed agent. Empty when reuse is off or not exact (another prompt part, a random
        router), or when the first turn already belongs to a changed agent."""
        if not self.team.reuse_prefix or previous is None or not prefix_reuse_is_exact(self.team.router):
            return {}
        if sorted(set(previous.prompt_of.values())) != sorted(part):
            return {}
        schedule = router_schedule(self.team.router, self.team.agent_names, "")  # the same for every episode
        keep = reusable_turns(schedule, changed)
        if keep == 0:
            return {}
        rows = [i for i, turn in enumerate(previous.turn) if turn < keep]  # only those rows are read
        records = read_turn_records(previous.meta, [previous.meta.keys[i] for i in rows],
                                    self.config.actor_rollout_ref.rollout.calculate_log_probs)
        turns: dict[tuple[int, int], dict[int, list]] = {}
        for i in rows:
            episode = previous.episode(previous.trajectory[i])
            turns.setdefault(episode, {})[previous.turn[i]] = list(records[previous.meta.keys[i]])
        prefix: dict[int, dict[str, list]] = {}
        for (prompt, session), by_turn in turns.items():
            if len(by_turn) == keep:  # a trajectory verl dropped (failed reward) is regenerated whole
                prefix.setdefault(prompt, {})[str(session)] = [by_turn[t] for t in range(keep)]
        return {prompt: json.dumps(sessions) for prompt, sessions in prefix.items()}

    def _record_paired_gain(self, before: TeamRollout, after: TeamRollout, metrics: dict,
                            untrained: frozenset[int]) -> None:
        """The gain of the updates made between two regenerations of the same episodes (paired: same prompts, same
        sampling seeds), measured on the ``untrained`` prompts (held out of those updates). On the episodes an update
        trained on, the seeds replay the very samples it was fitted to: an in-sample gain, logged beside it as
        ``crn_gain_train`` and never used by the certificate. Where none of the regenerated prompts is held out
        (``heldout_fraction`` 0, a one-prompt part under ``split``) the gain is the all-episode one, and such an
        update has no bound either, so it never makes a calibration pair."""
        old, new = before.episode_returns(), after.episode_returns()
        both = sorted(set(old) & set(new))  # a dropped trajectory (failed reward) leaves its pair out
        held = untrained & set(after.prompt_of.values())  # the held-out prompts of these regenerations
        trained = [e for e in both if e[0] not in held]
        measured = [e for e in both if e[0] in held] if held else trained
        if len(measured) < 2:  # other prompts (split) or too few pairs: these updates stay unmeasured, never misattributed
            self.state.forget_unmeasured(self.global_steps)
            return

        def gain_on(episodes):
            return algos.paired_gain([new[e] for e in episodes], [old[e] for e in episodes])

        gain = gain_on(measured)
        gain_train = gain_on(trained) if held and len(trained) > 1 else None
        updates = self.state.record_paired_gain(gain, self.global_steps)
        if updates and all(update.get("stage0") for update in updates):
            return  # the swap's own gain: teamtr/stage0/crn_gain (_log_stage), never the agent's or the stage's
        for update in updates:  # crn_pair: which of the stage's measurements; updates that share one (stale) share it
            metrics[f"teamtr/{update['agent']}/crn_pair"] = metrics.get("teamtr/stage/gain_measurements", 0)
            metrics[f"teamtr/{update['agent']}/crn_gain"] = gain.mean
            metrics[f"teamtr/{update['agent']}/crn_gain_se"] = gain.se
            if gain_train is not None:
                metrics[f"teamtr/{update['agent']}/crn_gain_train"] = gain_train.mean
                metrics[f"teamtr/{update['agent']}/crn_gain_train_se"] = gain_train.se
        metrics["teamtr/stage/negative_gains"] = metrics.get("teamtr/stage/negative_gains", 0) + int(gain.mean < 0)
        metrics["teamtr/stage/gain_measurements"] = metrics.get("teamtr/stage/gain_measurements", 0) + 1

    # --------------------------------------------------------------------------------- Stage 0 (teamtr.replace)
    def _align_incoming(self, prompts, stage: int, metrics: dict) -> tuple[TeamRollout, set[str]]:
        """Stage 0 of an aligned ``teamtr.replace`` (paper Prop. 3.8), before the stage's first update.

        One regeneration of the stage's prompts with the incumbent in place and nobody updated is the probe: each
        message of the replaced agent with the exact context it saw (the team's own occupancy). The incumbent's actor
        scores them (π_cur of Eq. 11) and gives its top-k next-token distribution at every position of the training
        groups' messages; the newcomer is distilled toward it (top-k forward KL(π_incumbent ‖ π_new)), or toward the
        geometric mixture of the two within the budget (``target=mixture``), one epoch at a time, until the KL monitor
        on the held-out groups is ≤ δ₀. Across tokenizers the messages are re-tokenized for the newcomer, its loss is
        their likelihood and the monitor the message-level KL, each model scoring the texts in its own tokens. Then its
        weights go into its own servers, which take over the agent's turns, the incumbent's stack is ended and the swap
        is recorded; otherwise the run stops before anything is saved. Returns the probe, {agent} and the probe's held-out
        prompts: the stage's first regeneration pairs with it there (the swap's paired gain)."""
        swap, name = self.team.replace, self.team.replace.agent
        delta0, start = self.team.stage0_delta(), time.perf_counter()
        print(f"teamtr: stage {stage}: Stage 0: probing the team's contexts for {name}'s incoming model", flush=True)
        probe = self._regenerate(prompts, list(range(len(prompts))), stage, None, {}, probe=True)
        held = frozenset(heldout_prompts(len(prompts), swap.heldout_fraction, stage, self.team.order_seed))
        shared = same_vocabulary(agent_tokenizer(swap.incumbent), agent_tokenizer(swap.model))
        reference = None  # across tokenizers: the incumbent's log-probabilities of the held-out messages
        with self._agent_context(name, swap.incumbent) as stack:  # the incumbent scores its messages, gives its top-k
            train, monitor = self._agent_rows(name, probe, held, {})
            if train is None or monitor is None:
                raise ValueError(f"teamtr.replace: the probe has no {'training' if train is None else 'held-out'} "
                                 f"message of {name!r} (data.train_batch_size={len(prompts)} prompts, "
                                 f"teamtr.replace.heldout_fraction={swap.heldout_fraction})")
            stack.checkpoint_manager.sleep_replicas()  # its servers serve no turn any more (the probe was the last)
            temperature = self.config.actor_rollout_ref.rollout.temperature  # the agent's, as _fresh_log_probs
            if shared:
                sequences = read_sequences(train)
                teacher = stack.worker_group.stage0_teacher_topk(sequences, swap.topk, temperature,
                                                                 self._micro_rows(swap), len(self.tokenizer))[0]
            else:  # the messages that translate exactly into the newcomer's tokens (rollout_batch._translate)
                source, target = self.tokenizer, agent_tokenizer(swap.model)
                train_rows, held_rows = read_rows(train), read_rows(monitor)
                *translated, kept = retokenize_rows(*train_rows[:2], source, target)
                *translated_held, kept_held = retokenize_rows(*held_rows[:2], source, target)
                untranslated = len(train_rows[0]) + len(held_rows[0]) - len(kept) - len(kept_held)
                if not kept or not kept_held:
                    raise ValueError(f"teamtr.replace: no {'training' if not kept else 'held-out'} message of {name!r} "
                                     f"in the probe translates exactly into {swap.model}'s tokens ({untranslated} "
                                     "do not); use method=direct")
                sequences = pack_sequences(*translated)
                teacher = likelihood_teacher(sequences)
                reference = stack.worker_group.stage0_message_logp(
                    pack_sequences(*([rows[i] for i in kept_held] for rows in held_rows)), temperature,
                    self._micro_rows(swap))[0]
                monitor = pack_sequences(*translated_held)
                metrics["teamtr/stage0/untranslated_messages"] = untranslated
        incumbent, incoming = self.stacks[name], self._incoming
        incoming.name = name  # from now on it is the agent: its checkpoints, syncs and metrics
        self.stacks[name] = incoming
        incoming.checkpoint_manager.sleep_replicas()  # its servers' memory for its training (the sync wakes them)
        with self._agent_context(name):
            if swap.target == "mixture":  # shared vocabulary only (checked before Ray)
                teacher = self._mixture_teacher(sequences, teacher, delta0, temperature, metrics)
            curve = [self._stage0_kl(monitor, reference)]
            verdict = algos.alignment_verdict(curve, delta0, swap.max_epochs)
            while verdict.status == "continue":
                epoch = incoming.worker_group.stage0_distill_epoch(sequences, teacher, temperature, swap.mini_batch,
                                                                   self._micro_rows(swap), swap.lr)[0]
                # the last epoch's, per token: top-k KL, or across tokenizers the negative log-likelihood
                metrics["teamtr/stage0/distill_loss"] = epoch["loss"]
                curve.append(self._stage0_kl(monitor, reference))
                verdict = algos.alignment_verdict(curve, delta0, swap.max_epochs)
                print(f"teamtr: stage {stage}: Stage 0: {verdict.message} (training loss {epoch['loss']:.4g})",
                      flush=True)
        if verdict.status == "refused":
            raise Stage0RefusedError(
                f"teamtr.replace: agent {name!r} -> {swap.model}: {verdict.message}. Nothing was saved: the "
                "checkpoint still holds the incumbent; raise teamtr.replace.max_epochs or delta0, or use method=direct")
        incoming.worker_group.reset_optimizer_state()  # its TeamTR updates start from a fresh optimizer
        self._sync(name, metrics)
        self._route_turns(incumbent, incoming)
        self._release(name, incumbent, metrics)
        self._incoming, self._stage0 = None, False
        self._saved_at.pop(name, None)
        sizes = {"probe_messages": len(probe.keys_of(name, held, heldout=False)),
                 "heldout_messages": len(probe.keys_of(name, held, heldout=True))}
        self.state.apply_replacement(self.team, delta0=delta0, kl=curve[-1], kl_curve=curve, epochs=len(curve) - 1,
                                     target=swap.target, **sizes)
        # the certificate counts the alignment as one update with zero surrogate gain and KL d̂
        self.state.record_update({"stage": stage, "agent": name, "position": -1, "committed": True,
                                  "kl": curve[-1], "kl_full": curve[-1], "alpha": 1.0, "backtracks": 0,
                                  "surrogate": 0.0, "delta": delta0, "bound": None, "stage0": True})
        metrics.update({f"teamtr/{name}/replaced": 1.0, "teamtr/stage0/kl": curve[-1], "teamtr/stage0/kl_initial":
                        curve[0], "teamtr/stage0/delta0": delta0, "teamtr/stage0/epochs": len(curve) - 1,
                        "teamtr/stage0/return_incumbent": probe.return_mean,
                        "teamtr/stage0/episodes": len(probe.returns),
                        "teamtr/stage0/seconds": time.perf_counter() - start,
                        "teamtr/stage0/retokenized": float(not shared),
                        **{f"teamtr/stage0/{key}": value for key, value in sizes.items()}})
        return probe, {name}, held

    def _mixture_teacher(self, sequences: dict, teacher: dict, delta0: float, temperature: float,
                         metrics: dict) -> dict:
        """``teamtr.replace.target=mixture``: at every position the geometric mixture of the newcomer as it came and
        the incumbent (on the incumbent's top-k plus the rest) closest to the newcomer within a per-position budget:
        half of δ₀ over the training messages' mean token count (the monitor is a KL per message; the other half is
        left for the fit, which never lands exactly on the target)."""
        real = sequences["response_mask"] > 0
        budget = delta0 / (2.0 * float(real.sum()) / len(real))
        new = self.actor_rollout_wg.stage0_logprobs_at(sequences, teacher["ids"], temperature,
                                                       self._micro_rows(self.team.replace))[0]
        # at the messages' tokens only (padding is out of the loss): a float64 bisection over the whole padded block
        # would cost several times its size
        target = algos.topk_mixture_target(teacher["log_probs"][real], new[real], budget)
        metrics["teamtr/stage0/mixture_t"] = float(target.t.mean())  # 0: the newcomer kept, 1: the incumbent
        log_probs = teacher["log_probs"].clone()
        log_probs[real] = target.log_probs[..., :-1].to(log_probs.dtype)
        return {"ids": teacher["ids"], "log_probs": log_probs}

    def _micro_rows(self, swap) -> int:
        """Rows per forward of a Stage-0 call: the bound agent's actor micro-batch (its mini-batch under dynamic
        batch sizes, which set none)."""
        return self.config.actor_rollout_ref.actor.get("ppo_micro_batch_size_per_gpu") or swap.mini_batch

    def _stage0_kl(self, monitor, reference: Optional[torch.Tensor] = None) -> float:
        """KL(π_incumbent ‖ π_new) per message on the held-out probe messages (Eq. 11), with the k3 estimator: each
        term is >= 0, so a noisy probe cannot pass δ₀ on a negative estimate (k1 can go below 0).

        Across tokenizers (``reference``: the incumbent's log π(message | context), ``monitor`` the translated
        messages) there are no per-token ratios: the message-level k1 estimate (:func:`teamtr_verl.algos.message_kl`)
        plus two standard errors, floored at 0. k1 can go below 0 on a small probe; its upper end cannot pass δ₀ on
        noise alone."""
        if reference is not None:
            new = self.actor_rollout_wg.stage0_message_logp(monitor, self.config.actor_rollout_ref.rollout.temperature,
                                                            self._micro_rows(self.team.replace))[0]
            estimate, se = algos.message_kl(reference, new)
            return max(0.0, estimate + 2.0 * se)
        logps = self._fresh_log_probs(monitor)
        return float(algos.token_kl_monitor(logps["old"], logps["new"], logps["mask"], estimator="k3"))

    def _release(self, name: str, incumbent, metrics: dict) -> None:
        """After a committed swap the incumbent serves no turn and trains no more: stop watching its actors (the
        newcomer's are the agent's now), then end them and every process they started, so that the host and device
        memory they held is free (their placement-group bundles stay reserved until the run ends). A release that
        fails is reported, not fatal: the swap itself is done."""
        self.watch.hand_over(name, f"{name}{INCOMING_SUFFIX}")
        try:
            released = release_stack(incumbent)
        except Exception as error:  # Ray's actor table (a DeveloperAPI) or psutil: the swap must not be lost to it
            logger.warning("teamtr: Stage 0: %s's incumbent could not be released: %r", name, error)
            metrics["teamtr/stage0/released_left"] = -1
            return
        print(f"teamtr: Stage 0: released {name}'s incumbent: {released['actors']} Ray actors, "
              f"{released['processes']} processes on this node, {released['gib']:.2f} GiB", flush=True)
        metrics.update({f"teamtr/stage0/released_{key}": value for key, value in released.items()})

    @staticmethod
    def _route_turns(old, new) -> None:
        """The team's agent loop reaches an agent through the load balancer its first stack came with: give that
        balancer ``new``'s servers and take ``old``'s away (verl's balancer supports both at run time)."""
        import ray

        balancer = old.server_manager.global_load_balancer
        servers = dict(zip(new.server_manager.server_addresses, new.server_manager.server_handles, strict=True))
        ray.get(balancer.add_servers.remote(servers))
        ray.get(balancer.remove_servers.remote(list(old.server_manager.server_addresses)))

    # ------------------------------------------------------------------------------------------ one agent update
    def _update_agent(self, name: str, rollout: TeamRollout, heldout: frozenset[int],
                      prior_log_w: torch.Tensor, stage: int, position: int, metrics: dict) -> Optional[torch.Tensor]:
        """Update agent ``name`` on its own trained messages of ``rollout``, inside its trust region; measure the
        update on the held-out groups. Returns the update's log W per trajectory (None if not committed)."""
        prefix = f"teamtr/{name}"
        if not rollout.keys_of(name):  # a random router gave this agent no turn in any episode
            metrics[f"{prefix}/messages"] = 0
            return None
        start = time.perf_counter()
        delta = self.team.delta_of(name)
        # Free this agent's rollout memory for training, as verl's sync trainer does after sampling (a no-op unless
        # rollout.free_cache_engine); its sync afterwards wakes it. Other agents' servers stay up.
        self.stacks[name].checkpoint_manager.sleep_replicas()
        with self._agent_context(name) as stack:
            agent_metrics: dict = {}
            train, measure = self._prepare_batches(name, rollout, heldout, prior_log_w, agent_metrics)
            stack.worker_group.snapshot_actor_weights()
            beta_state = self.state.beta_state(name)
            update_metrics: dict = {}
            self._push_loss(name, beta_state.beta)
            self._update_actor(train, update_metrics)
            outcome = self._line_search(name, train, delta, beta_state.beta, update_metrics, stage)
            log_w, bound = None, None
            if outcome.action == "accept":
                if outcome.alpha < 1.0:  # Adam's momentum should remember the step taken, not the one proposed
                    stack.worker_group.scale_optimizer_momentum(outcome.alpha)
                if measure is not None:
                    log_w, bound = self._measure_update(name, rollout, measure, outcome, prior_log_w, heldout)
                trained = self._trajectory_log_w(rollout, self._last_logps)  # and on the trained groups
                log_w = trained if log_w is None else log_w + trained
            else:
                stack.worker_group.restore_actor_weights()  # weights and optimizer state back to π_cur exactly
        committed = outcome.action == "accept"
        if committed:  # its weights differ from the last checkpoint's now
            self._saved_at.pop(name, None)
        # A non-finite full step (on_nonfinite=skip) adapted nothing: BetaState refuses a NaN last_kl, keep the old one.
        last_kl = beta_state.last_kl if math.isnan(outcome.full.kl) else outcome.full.kl
        self.state.set_beta_state(name, beta_state.after_update(
            last_kl, outcome.beta, outcome.backtracks, committed))
        entry = {"stage": stage, "agent": name, "position": position, "committed": committed, "kl": outcome.kl,
                 "kl_full": outcome.full.kl, "alpha": outcome.alpha, "backtracks": outcome.backtracks,
                 "surrogate": outcome.committed.surrogate if committed else 0.0, "delta": delta}
        if bound is not None:
            entry.update(bound=bound.bound, bound_point=bound.point, bound_se=bound.se, bound_penalty=bound.penalty,
                         is_gain=bound.estimate.mean, is_gain_se=bound.estimate.se, heldout_trajectories=bound.n)
        elif committed:
            entry["bound"] = None
        self.state.record_update(entry)
        if committed:  # verl's data metrics count the rows that were trained on
            self._trained_batches.append(train)
        metrics.update(self._update_metrics(name, entry, outcome, update_metrics, agent_metrics, len(self._advantage),
                                            start))
        return log_w

    def _agent_rows(self, name: str, rollout: TeamRollout, heldout: frozenset[int], metrics: dict):
        """The agent's rows of ``rollout`` outside and inside the ``heldout`` prompt groups (None where there are
        none), each balanced, padded with this agent's own EOS id and scored by the bound agent's actor
        (``old_log_probs``)."""
        batches = []
        for keys in (rollout.keys_of(name, heldout, heldout=False), rollout.keys_of(name, heldout, heldout=True)):
            if not keys:
                batches.append(None)
                continue
            batch = self._balance_batch(rollout.meta.select_keys(keys), metrics=metrics)
            batch = self._compute_old_log_prob(batch, metrics)
            self._created.append(batch)
            batches.append(batch)
        return batches[0], batches[1]

    def _prepare_batches(self, name: str, rollout: TeamRollout, heldout: frozenset[int], prior_log_w, metrics: dict):
        """The agent's trained rows (balanced, old log-probs, Eq. 9 advantages; HAPPO-weighted under ``happo``) and
        its held-out rows (old log-probs only), each padded with this agent's own EOS id."""
        train, measure = self._agent_rows(name, rollout, heldout, metrics)
        if train is None:
            raise ValueError(f"teamtr: agent {name!r} has no trained messages: every prompt group is held out "
                             f"(teamtr.certificate.heldout_fraction={self.team.certificate.heldout_fraction})")
        if self.use_reference_policy:
            train = self._compute_ref_log_prob(train, metrics)
        factor = None
        if self.team.schedule == "happo":  # HAPPO: the earlier updates' (clipped) ratio product weights the advantage
            factor = algos.happo_factor(prior_log_w)
        self._advantage = {}  # per trained row: what the loss sees (the line search's surrogate uses the same)
        for i in rollout.rows_of(name, heldout, heldout=False):
            scale = 1.0 if factor is None else float(factor[rollout.trajectory_code[rollout.trajectory[i]]])
            self._advantage[rollout.meta.keys[i]] = float(rollout.advantage[i]) * scale
        return write_advantages(train, self._advantage), measure

    def _line_search(self, name: str, train: KVBatchMeta, delta: float, beta: float, update_metrics: dict,
                     stage: int) -> algos.LineSearchResult:
        """Measure the optimizer's full step, then let :func:`teamtr_verl.algos.line_search` pick the committed
        fraction of it (or give up). ``teamtr.enforce=false`` keeps the full step whatever its KL."""
        stack = self.stacks[name]
        full = self._evaluate_step(name, train, 1.0, update_metrics, stage)
        if full is None:  # non-finite with on_nonfinite=skip: counted, the update is given up
            nan = algos.StepEval(1.0, math.nan, math.nan)
            return algos.LineSearchResult("give_up", 0.0, nan, None, 0, (nan,), beta)
        if not self.team.enforce:
            new_beta = algos.adapt_beta(beta, full.kl, delta)
            return algos.LineSearchResult("accept", 1.0, full, full, 0, (full,), new_beta)

        def evaluate(alpha: float) -> algos.StepEval:
            stack.worker_group.blend_actor_weights(alpha)
            step = self._evaluate_step(name, train, alpha, update_metrics, stage)
            return step if step is not None else algos.StepEval(alpha, math.inf, math.nan)

        return algos.line_search(evaluate, full, delta, beta, self.team.max_backtracks, self.team.step_safety)

    def _evaluate_step(self, name: str, train: KVBatchMeta, alpha: float, update_metrics: dict,
                       stage: int) -> Optional[algos.StepEval]:
        """KL (Eq. 11 monitor) and surrogate of the agent's current weights on its trained rows; None when something
        is non-finite and ``on_nonfinite=skip`` (with ``error`` it raises, naming the agent and stage)."""
        logps = self._fresh_log_probs(train)
        bad = self._first_non_finite(update_metrics if alpha == 1.0 else {}, logps)
        kl = math.nan
        if bad is None:
            kl = float(algos.token_kl_monitor(logps["old"], logps["new"], logps["mask"],
                                              estimator=self.team.kl_estimator))
            bad = self._first_non_finite({}, logps, kl)
        if bad is not None:
            if self.team.on_nonfinite == "error":
                raise NonFiniteUpdateError(f"teamtr: agent {name!r} at stage {stage}: non-finite {bad}")
            key = f"teamtr/{name}/nonfinite_skips"
            self._nonfinite[key] = self._nonfinite.get(key, 0) + 1
            return None
        self._last_logps = logps
        advantage = torch.tensor([self._advantage[key] for key in logps["real_keys"]], dtype=torch.float64)
        surrogate = algos.surrogate_gain(logps["old"], logps["new"], advantage, logps["mask"],
                                         ratio_level=self.team.ratio_level)
        return algos.StepEval(alpha, kl, surrogate)

    def _measure_update(self, name: str, rollout: TeamRollout, measure: KVBatchMeta, outcome, prior_log_w,
                        heldout: frozenset[int]):
        """The committed update on the held-out groups: log W per trajectory (all trajectories of the rollout: 0
        where the agent's rows were trained on, so only held-out entries are used), the bound and ĝ."""
        logps = self._fresh_log_probs(measure)
        codes = self._trajectory_codes(rollout, logps)
        n = len(rollout.trajectories)
        log_w = self._trajectory_log_w(rollout, logps)
        returns = [rollout.returns[t] for t in rollout.trajectories]
        groups = [rollout.episode(t)[0] for t in rollout.trajectories]
        centered, usable = algos.leave_one_out_centered(returns, groups)
        # every held-out episode counts, also one where the agent did not speak (a random router): there W = 1
        in_heldout = torch.tensor([rollout.is_heldout(t, heldout) for t in rollout.trajectories], dtype=torch.bool)
        usable = usable & in_heldout
        if not algos.can_bound(centered, usable):  # too few held-out trajectories, or every held-out group flat
            return log_w, None
        cert = self.team.certificate
        return_range = cert.return_range or (max(returns) - min(returns)) or 1.0
        bound = algos.update_bound(
            cert.bound, log_w=log_w, centered=centered, usable=usable, prior_log_w=prior_log_w,
            clip_ratio=self._clip_ratio(name), t=cert.confidence_t, kl=outcome.kl, return_range=return_range,
            agent_turns=len(rollout.rows_of(name)) / max(len(rollout.trajectories), 1),
            ratio_excess=algos.trajectory_ratio_excess(logps["old"], logps["new"], logps["mask"], codes, n),
        )
        return log_w, bound

    @staticmethod
    def _trajectory_codes(rollout: TeamRollout, logps: dict) -> torch.Tensor:
        return torch.tensor([rollout.trajectory_code[rollout.trajectory[rollout.row_of_key[key]]]
                             for key in logps["real_keys"]], dtype=torch.long)

    def _trajectory_log_w(self, rollout: TeamRollout, logps: dict) -> torch.Tensor:
        """log W per trajectory of ``rollout`` from the rows in ``logps`` (0 for trajectories not among them)."""
        return algos.trajectory_log_ratio(logps["old"], logps["new"], logps["mask"],
                                          self._trajectory_codes(rollout, logps), len(rollout.trajectories))

    def _clip_ratio(self, name: str) -> float:
        actor = self.stacks[name].config.actor_rollout_ref.actor
        return float(actor.get("clip_ratio_low") or actor.get("clip_ratio") or algos.DEFAULT_CLIP_RATIO)

    def _update_metrics(self, name: str, entry: dict, outcome, update_metrics: dict, agent_metrics: dict,
                        rows: int, start: float) -> dict:
        prefix = f"teamtr/{name}"
        beta_state = self.state.beta_state(name)
        out = {
            f"{prefix}/kl": entry["kl"],  # of the update as committed (0 when given up)
            f"{prefix}/kl_proposal": outcome.full.kl,  # of the optimizer's full step
            f"{prefix}/delta_used": entry["kl"] / entry["delta"],
            f"{prefix}/step_fraction": outcome.alpha,
            f"{prefix}/beta": beta_state.beta,
            f"{prefix}/delta": entry["delta"],
            f"{prefix}/out_of_region": float(outcome.full.kl > entry["delta"]),  # the full step left the region
            f"{prefix}/backtracks": outcome.backtracks,
            f"{prefix}/give_ups_total": beta_state.num_give_ups,
            f"{prefix}/committed": float(entry["committed"]),
            f"{prefix}/messages": rows,  # trained messages (held-out and padding rows excluded)
            f"{prefix}/surrogate": entry["surrogate"],
            f"{prefix}/update_s": time.perf_counter() - start,
            **self._nonfinite,
        }
        for key in ("bound", "bound_se", "is_gain", "is_gain_se"):
            if entry.get(key) is not None:
                out[f"{prefix}/{key}"] = entry[key]
        for src, dst in (("actor/pg_clipfrac", "clipfrac"), ("actor/grad_norm", "grad_norm"),
                         ("actor/pg_loss", "pg_loss"), ("actor/teamtr_kl", "loss_kl")):
            if src in update_metrics:
                out[f"{prefix}/{dst}"] = update_metrics[src]
        for src, dst in (("actor/entropy", "entropy"), ("training/rollout_probs_diff_max", "rollout_probs_diff_max")):
            if src in agent_metrics:  # the second: rollout (vLLM) vs actor log-probs, proof the last sync landed
                out[f"{prefix}/{dst}"] = agent_metrics[src]
        return out

    def _push_loss(self, name: str, beta: float) -> None:
        """Push agent ``name``'s loss: its current β and the team's loss options (verl's ppo_loss reads them)."""
        config = agent_loss_config(self.stacks[name].config.actor_rollout_ref.actor, beta, self.team)
        self.stacks[name].worker_group.set_loss_fn(partial(ppo_loss, config=config))

    def _fresh_log_probs(self, batch: KVBatchMeta) -> dict:
        """Agent's log-probs of its own tokens after the update, beside the old ones (no gradient, no entropy)."""
        batch.extra_info.update({"calculate_entropy": False, "compute_loss": False,
                                 "temperature": self.config.actor_rollout_ref.rollout.temperature})
        self.actor_rollout_wg.compute_log_prob(batch)
        return read_log_probs(batch)

    @staticmethod
    def _first_non_finite(update_metrics: dict, logps: dict, kl: float = 0.0) -> Optional[str]:
        """What went non-finite in an update (loss, grad norm, the new log-probs, KL), or None."""
        checks = {"loss": update_metrics.get("actor/pg_loss", 0.0),
                  "grad norm": update_metrics.get("actor/grad_norm", 0.0), "KL": kl}
        for what, value in checks.items():
            if not math.isfinite(float(value)):
                return f"{what}={value}"
        new = logps["new"][logps["mask"]]
        if not bool(torch.isfinite(new).all()):
            return f"log-prob={new[~torch.isfinite(new)][0].item()}"
        return None

    def _sync(self, name: str, metrics: dict) -> None:
        """Push agent ``name``'s weights into its own replicas (and only those)."""
        start = time.perf_counter()
        self.stacks[name].checkpoint_manager.update_weights(self.global_steps)
        metrics[f"teamtr/{name}/sync_s"] = metrics.get(f"teamtr/{name}/sync_s", 0.0) + time.perf_counter() - start

    def _log_stage(self, order: list[str], metrics: dict) -> None:
        for position, name in enumerate(order):
            metrics[f"teamtr/{name}/position"] = position
        updates = [u for u in self.state.ledger if u["stage"] == self.global_steps]
        bounds = [u["bound"] for u in updates if u.get("bound") is not None]
        if bounds:
            metrics["teamtr/stage/certificate"] = float(sum(bounds))
        metrics["teamtr/stage/out_of_region"] = sum(1 for u in updates if u["kl_full"] > u["delta"])
        for update in updates:  # the swap's paired gain: the team with the newcomer vs with the incumbent
            if update.get("stage0") and update.get("crn_gain") is not None:
                metrics["teamtr/stage0/crn_gain"] = update["crn_gain"]
                metrics["teamtr/stage0/crn_gain_se"] = update["crn_gain_se"]
        for key, value in self.state.certificate_stats().items():
            metrics[f"teamtr/stage/{key}"] = value


    # ------------------------------------------------------------------------------------------------ metrics
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        # verl's data metrics over the rows that were trained (each row's advantages exist only once its agent ran).
        trained = [b for b in getattr(self, "_trained_batches", []) if len(b)]
        if not trained:
            return
        keys, tags = [], []
        for part in trained:
            keys += part.keys
            tags += part.tags
        super()._compute_metrics(KVBatchMeta(partition_id=batch.partition_id, keys=keys, tags=tags), metrics,
                                 timing_raw, global_steps, epoch)

    # --------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, cursor: Optional[dict] = None):
        """A stage end (``cursor`` None: ``global_step_S/``, every agent) or a point inside a stage
        (``stage_S_update_U/``: the agents changed since the last checkpoint; the others by reference). Written
        atomically (:mod:`teamtr_verl.checkpoints`), then older folders nothing needs are removed."""
        root = self.config.trainer.default_local_dir
        name = (checkpoints.stage_folder(self.global_steps) if cursor is None
                else checkpoints.update_folder(cursor["stage"], cursor["done"]))
        agent_dirs = {}
        with checkpoints.writing(root, name) as scratch:
            for stack in self._trained_stacks():
                agent = stack.name
                if cursor is None or agent not in self._saved_at:
                    # retention is ours (collect_garbage): verl's per-worker one does not know about references
                    stack.worker_group.save_checkpoint(os.path.join(scratch, agent), None, self.global_steps,
                                                       max_ckpt_to_keep=None)
                    agent_dirs[agent] = f"{name}/{agent}"
                else:
                    agent_dirs[agent] = self._saved_at[agent]
            data_state = self.train_dataloader.state_dict() if cursor is None else self._stage_data_state
            torch.save(data_state, os.path.join(scratch, "data.pt"))
            self.state.cursor = None if cursor is None else {**cursor, "agent_dirs": agent_dirs}
            self.state.save(scratch)
        checkpoints.commit(root, name, stage_end=self.global_steps if cursor is None else None)
        self._saved_at = agent_dirs
        self._stage_saved = cursor is None
        keep = self.config.trainer.get("max_actor_ckpt_to_keep", None)
        checkpoints.collect_garbage(root, keep, [name, *agent_dirs.values()])

    def _load_checkpoint(self):
        self.global_steps = 0
        folder = checkpoints.resume_folder(self.config.trainer)
        if folder is None:
            return
        state = TeamTRState.load(folder)
        swap = state.check_matches(self.team, folder)  # True: teamtr.replace is still to be done
        root = os.path.dirname(folder.rstrip("/"))
        name = os.path.basename(folder.rstrip("/"))
        agent_dirs = (state.cursor["agent_dirs"] if state.cursor
                      else {agent: f"{name}/{agent}" for agent in self.team.trained_names})
        direct = swap and self.team.replace.method == "direct"
        if direct:  # the incoming model starts from its own directory, with a fresh optimizer
            agent_dirs.pop(self.team.replace.agent, None)
        for stack in self._trained_stacks():
            if stack.name not in agent_dirs:
                continue
            stack.worker_group.load_checkpoint(local_path=os.path.join(root, agent_dirs[stack.name]),
                                               del_local_after_load=self.config.trainer.del_local_ckpt_after_load)
        data_path = os.path.join(folder, "data.pt")
        if os.path.exists(data_path):
            data_state = torch.load(data_path, weights_only=False)
            self.train_dataloader.load_state_dict(data_state)
            self._stage_data_state = data_state
        if state.cursor:
            state.forget_unmeasured(state.cursor["stage"])
        self.state = state
        same_root = os.path.abspath(root) == os.path.abspath(self.config.trainer.default_local_dir)
        # references are relative to the save root and must survive: else the next checkpoint saves every agent
        keep = same_root and not self.config.trainer.del_local_ckpt_after_load
        self._saved_at = dict(agent_dirs) if keep else {}
        self.global_steps = checkpoints.stages_done(folder)
        if direct:  # (an aligned swap is recorded once its Stage 0 passes: _align_incoming)
            record = state.apply_replacement(self.team)
            self._swap_metrics = {f"teamtr/{record['agent']}/replaced": 1.0}
            print(f"teamtr: after stage {record['stage']}, agent {record['agent']!r} is now {record['to']} "
                  f"(was {record['from']}; {record['method']} swap)", flush=True)
        logger.info("teamtr: resumed from %s after stage %d%s", folder, self.global_steps,
                    f" and {state.cursor['done']} update(s) of stage {state.cursor['stage']}" if state.cursor else "")

