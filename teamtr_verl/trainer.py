"""``TeamTRTrainer``: verl's v1 trainer mode ``teamtr`` (``trainer.v1.trainer_mode=teamtr``).

One verl training step is one TeamTR *stage*::

    order σ of the agents (fixed | reversed | random, seeded)
    for i, k in enumerate(σ):
        if the schedule says so: regenerate the team's rollouts of the stage's prompts through the agents' servers
        agent k's old log-probs on its own messages; Eq. 9 advantages of the team trajectories
        update agent k only, with the teamtr loss at its β_k; measure KL(π_cur ‖ π_new) on these rollouts
        enforce δ_k: accept, or restore the pre-update weights and retry with a larger β_k, or give up
        push agent k's weights into agent k's replicas only
    log per-agent diagnostics, the stage certificate and (one stage late) the measured gain

The trainer only orchestrates: the math is in :mod:`teamtr_verl.algos`, the team topology in
:mod:`teamtr_verl.topology`, TransferQueue reads/writes in :mod:`teamtr_verl.rollout_batch`, and everything that
survives a checkpoint in :class:`teamtr_verl.state.TeamTRState`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
import uuid
from functools import partial
from typing import Optional

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from transfer_queue import KVBatchMeta

from verl.experimental.reward_loop import RewardLoopManager
from verl.trainer.ppo.utils import need_reference_policy
from verl.trainer.ppo.v1.trainer_base import PPOTrainer, register_trainer
from verl.utils import tensordict_utils as tu
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.fs import local_mkdir_safe
from verl.workers.utils.losses import ppo_loss

from teamtr_verl import algos
from teamtr_verl.config import TeamConfig
from teamtr_verl.rollout_batch import TeamRollout, read_log_probs, read_team_rollout, write_advantages
from teamtr_verl.state import TeamTRState
from teamtr_verl.team import TeamLLMClient

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

TRAINER_MODE = "teamtr"


class NonFiniteUpdateError(RuntimeError):
    """A non-finite loss, KL or grad norm in one agent's update (``teamtr.on_nonfinite=error``)."""


@register_trainer(TRAINER_MODE)
class TeamTRTrainer(PPOTrainer):
    """Sequential per-agent trust-region updates of a team, regenerating rollouts after every agent update."""

    def __init__(self, config: DictConfig):
        super().__init__(config)
        # verl branches on the literal "sync" (replay buffer, dataloader, TransferQueue persistence); a stage is
        # synchronous: every regeneration is consumed before the next one starts.
        self.trainer_mode = "sync"
        self.replay_buffer = self._build_replay_buffer()
        self.team = TeamConfig.from_config(config.teamtr, check_paths=False)
        self.state = TeamTRState.initial(self.team)
        self.stacks = {}

    # ---------------------------------------------------------------------------------------------------- set-up
    def _setup(self):
        from teamtr_verl.topology import build_team_stacks

        self._init_tokenizer()
        self._init_dataloader()
        self._init_dump_executor()
        self.use_critic = False  # outcome rewards + group baselines: no critic (validated before Ray starts)
        self.ref_in_actor = False
        role = "actor_rollout_ref" if need_reference_policy(self.config) else "actor_rollout"
        self.stacks = build_team_stacks(self.config, self.team, role=role)
        self._bind(self.team.agent_names[0])  # verl's helpers (validation, metrics) see one agent at a time
        self.reward_loop_manager = RewardLoopManager(config=self.config, rm_resource_pool=None)
        self.teacher_model_manager, self.distillation_config = None, None
        for stack in self.stacks.values():
            stack.checkpoint_manager.sleep_replicas()
        self._load_checkpoint()

    def on_init_end(self):
        # As verl's sync trainer: push the (possibly just loaded) weights into every agent's replicas once.
        for stack in self.stacks.values():
            stack.checkpoint_manager.update_weights(self.global_steps)

    def get_llm_client(self):
        clients = {name: stack.client() for name, stack in self.stacks.items()}
        return TeamLLMClient(self.config, clients, default_agent=self.team.agent_names[0])

    def on_step_end(self):
        return None  # each agent's weights were pushed right after its own update

    def on_sample_end(self):
        return None  # replicas sleep per agent, only around that agent's own update (see _update_agent)

    def _get_n_gpus_for_throughput(self) -> int:
        return self.config.trainer.n_gpus_per_node * self.config.trainer.nnodes

    def _bind(self, name: str) -> None:
        """Point verl's single-agent attributes at agent ``name``'s stack."""
        stack = self.stacks[name]
        self.actor_rollout_wg = self.ref_policy_wg = stack.worker_group
        self.llm_server_manager = stack.server_manager
        self.checkpoint_manager = stack.checkpoint_manager

    @contextlib.contextmanager
    def _agent_context(self, name: str):
        """verl's helpers read ``self.config`` and ``self.actor_rollout_wg``: show them agent ``name``'s."""
        team_config = self.config
        self._bind(name)
        self.config = self.stacks[name].config
        try:
            yield self.stacks[name]
        finally:
            self.config = team_config

    # ----------------------------------------------------------------------------------------------------- stage
    def step(self, metrics: dict, timing_raw: dict) -> KVBatchMeta:
        """One TeamTR stage; returns every TransferQueue key it created (verl's fit() clears them)."""
        stage = self.global_steps
        prompts = self._next_train_batch()
        order = self.state.next_order(self.team)
        created: list[KVBatchMeta] = []
        self._trained_batches: list[KVBatchMeta] = []
        records: list[algos.UpdateRecord] = []
        happo_factor: Optional[dict[str, float]] = None
        rollout: Optional[TeamRollout] = None
        for index, name in enumerate(order):
            if self.team.regenerates_before(index):
                start = time.perf_counter()
                rollout = self._regenerate(prompts, metrics)
                metrics[f"teamtr/{name}/gen_s"] = time.perf_counter() - start
                created.append(rollout.meta)
                happo_factor = {t: 1.0 for t in rollout.returns} if self.team.schedule == "happo" else None
            else:
                metrics[f"teamtr/{name}/gen_s"] = 0.0
            record, batch, logps = self._update_agent(name, rollout, stage, metrics, happo_factor)
            created.append(batch)
            self._trained_batches.append(batch)
            if record is not None:
                records.append(record)
                self._record_update(record, stage, metrics)
            if happo_factor is not None and logps is not None:
                self._advance_happo_factor(happo_factor, rollout, logps)
            if self.team.schedule != "joint":
                self._sync(name, metrics)
        if self.team.schedule == "joint":  # every agent was updated from the pre-stage team; now publish all
            for name in order:
                self._sync(name, metrics)
        self._log_stage(records, order, metrics)
        self.state.stages_done = stage
        tag_of = {}  # every key once (an agent's batch repeats its rollout's keys, plus its padding rows)
        for batch in created:
            tag_of.update({key: tag for key, tag in zip(batch.keys, batch.tags) if key not in tag_of})
        return KVBatchMeta(partition_id="train", keys=list(tag_of), tags=list(tag_of.values()))

    def _regenerate(self, prompts, metrics: dict) -> TeamRollout:
        """Team rollouts of the current team on the stage's prompts: same prompts, fresh uids, existing servers."""
        batch = tu.index_select_tensor_dict(prompts, list(range(len(prompts))))
        tu.assign_non_tensor_stack(batch, "uid", [str(uuid.uuid4()) for _ in range(len(prompts))])
        self._submit_batch_to_rollout(batch)
        meta, sample_metrics = self.replay_buffer.sample(
            global_steps=self.global_steps, partition_id="train", batch_size=len(prompts)
        )
        meta.extra_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        rollout = read_team_rollout(meta, len(prompts) * self.config.actor_rollout_ref.rollout.n,
                                    self.team.a_clip, self.team.norm_eps)
        metrics["teamtr/rollout/dropped_trajectories"] = (
            metrics.get("teamtr/rollout/dropped_trajectories", 0) + rollout.dropped_trajectories
        )
        metrics.update({k: v for k, v in sample_metrics.items() if isinstance(v, (int, float))})
        self._on_regenerated(rollout, metrics)
        return rollout

    def _update_agent(self, name: str, rollout: TeamRollout, stage: int, metrics: dict,
                      happo_factor: Optional[dict[str, float]]):
        """Update agent ``name`` on its own messages of ``rollout``, inside its trust region."""
        keys = rollout.keys_of(name)
        prefix = f"teamtr/{name}"
        if not keys:  # a random router gave this agent no turn in any episode
            metrics[f"{prefix}/messages"] = 0
            return None, KVBatchMeta(partition_id=rollout.meta.partition_id, keys=[], tags=[]), None
        start = time.perf_counter()
        delta = self.team.delta_of(name)
        # Free this agent's rollout memory for training, as verl's sync trainer does after sampling (a no-op unless
        # rollout.free_cache_engine); its sync afterwards wakes it. Other agents' servers stay up.
        self.stacks[name].checkpoint_manager.sleep_replicas()
        with self._agent_context(name) as stack:
            agent_metrics: dict = {}
            batch = self._balance_batch(rollout.meta.select_keys(keys), metrics=agent_metrics)
            batch = self._compute_old_log_prob(batch, agent_metrics)
            if self.use_reference_policy:
                batch = self._compute_ref_log_prob(batch, agent_metrics)
            rows = rollout.rows_of(name)
            scale = [happo_factor[rollout.trajectory[i]] if happo_factor else 1.0 for i in rows]
            batch = write_advantages(batch, {rollout.meta.keys[i]: float(rollout.advantage[i]) * s
                                             for i, s in zip(rows, scale)})
            stack.worker_group.snapshot_actor_weights()
            beta_state = self.state.beta_state(name)
            update_metrics: dict = {}
            self._set_agent_beta(name, beta_state.beta)
            self._update_actor(batch, update_metrics)
            step_fraction, halvings, proposal_kl = 1.0, 0, None
            while True:
                logps = self._fresh_log_probs(batch)
                bad = self._first_non_finite(update_metrics, logps)
                kl = math.nan if bad else float(algos.token_kl_monitor(logps["old"], logps["new"], logps["mask"],
                                                                         estimator=self.team.kl_estimator))
                proposal_kl = kl if proposal_kl is None else proposal_kl
                bad = bad or self._first_non_finite(update_metrics, logps, kl)
                if bad is not None:
                    if self.team.on_nonfinite == "error":
                        raise NonFiniteUpdateError(f"teamtr: agent {name!r} at stage {stage}: non-finite {bad}")
                    stack.worker_group.restore_actor_weights()
                    metrics[f"{prefix}/nonfinite_skips"] = metrics.get(f"{prefix}/nonfinite_skips", 0) + 1
                    action = "skip"
                    break
                if not self.team.enforce:  # monitor only: adapt β toward δ, keep the update whatever its KL
                    beta_state = dataclasses.replace(beta_state, beta=algos.adapt_beta(beta_state.beta, kl, delta))
                    action = "accept"
                    break
                decision = algos.trust_region_decision(beta_state, kl, delta, self.team.max_backtracks,
                                                       self.team.backtrack_factor)
                beta_state, action = decision.state, decision.action
                if action == "accept":
                    break
                if action == "give_up":
                    stack.worker_group.restore_actor_weights()  # back to π_cur exactly
                    break
                # Backtrack: halve the step θ_cur → θ_new (a TRPO line search). Re-running the update with the
                # raised β alone cannot help a one-step update: the KL term and its gradient vanish at π_new = π_cur.
                step_fraction, halvings = step_fraction * 0.5, halvings + 1
                stack.worker_group.blend_actor_weights(step_fraction)
            metrics[f"{prefix}/step_fraction"] = step_fraction if action == "accept" else 0.0
        self.state.set_beta_state(name, beta_state)
        committed = action == "accept"
        if committed:
            self.state.kl_history[name].append(kl)
        metrics.update({
            f"{prefix}/kl": kl,  # of the update as committed (after any backtracking)
            f"{prefix}/kl_proposal": proposal_kl,  # of the optimizer's full step
            f"{prefix}/beta": beta_state.beta,
            f"{prefix}/delta": delta,
            f"{prefix}/out_of_region": float(proposal_kl > delta),  # the full step left the region
            f"{prefix}/backtracks": halvings,
            f"{prefix}/give_ups_total": beta_state.num_give_ups,
            f"{prefix}/committed": float(committed),
            f"{prefix}/messages": len(keys),
            f"{prefix}/update_s": time.perf_counter() - start,
        })
        for src, dst in (("actor/pg_clipfrac", "clipfrac"), ("actor/grad_norm", "grad_norm"),
                         ("actor/pg_loss", "pg_loss"), ("actor/teamtr_kl", "loss_kl")):
            if src in update_metrics:
                metrics[f"{prefix}/{dst}"] = update_metrics[src]
        for src, dst in (("actor/entropy", "entropy"), ("training/rollout_probs_diff_max", "rollout_probs_diff_max")):
            if src in agent_metrics:  # the second: rollout (vLLM) vs actor log-probs, proof the last sync landed
                metrics[f"{prefix}/{dst}"] = agent_metrics[src]
        record = None
        if committed:
            record = self._update_record(name, rollout, logps, kl, delta)
            metrics[f"{prefix}/surrogate"] = record.surrogate_gain
        return record, batch, (logps if committed else None)

    def _set_agent_beta(self, name: str, beta: float) -> None:
        """Push agent ``name``'s loss with its current β (verl's ppo_loss reads it from policy_loss.ppo_kl_coef)."""
        actor = copy.deepcopy(self.stacks[name].config.actor_rollout_ref.actor)
        with open_dict(actor):
            actor.policy_loss.ppo_kl_coef = float(beta)
        self.stacks[name].worker_group.set_loss_fn(partial(ppo_loss, config=omega_conf_to_dataclass(actor)))

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

    def _update_record(self, name, rollout: TeamRollout, logps: dict, kl: float, delta: float) -> algos.UpdateRecord:
        rows_by_key = {rollout.meta.keys[i]: i for i in rollout.rows_of(name)}
        rows = [rows_by_key[key] for key in logps["real_keys"]]
        terms = algos.surrogate_terms(
            logps["old"], logps["new"], torch.tensor(rollout.advantage[rows]), torch.tensor(rollout.normalized[rows]),
            torch.tensor(rollout.group_size[rows]), logps["mask"],
        )
        turns = len(rows) / max(len(rollout.returns), 1)  # this agent's messages per trajectory
        return algos.UpdateRecord(
            agent=name, surrogate_gain=terms.surrogate_gain, kl=kl, zeta_clip=terms.zeta_clip,
            zeta_ratio=terms.zeta_ratio, zeta_norm=terms.zeta_norm, delta=delta, agent_turns=turns,
            advantage_scale=max(rollout.group_std_mean, 1e-12), num_messages=terms.num_messages,
        )

    def _advance_happo_factor(self, factor: dict[str, float], rollout: TeamRollout, logps: dict) -> None:
        trajectories = sorted(set(rollout.trajectory))
        code = {t: i for i, t in enumerate(trajectories)}
        rows_by_key = {key: i for i, key in enumerate(rollout.meta.keys)}
        row_traj = torch.tensor([code[rollout.trajectory[rows_by_key[key]]] for key in logps["real_keys"]])
        current = torch.tensor([factor[t] for t in trajectories], dtype=torch.float64)
        updated = algos.happo_factor_update(current, logps["old"], logps["new"], logps["mask"], row_traj)
        factor.update({t: float(v) for t, v in zip(trajectories, updated.tolist())})

    def _sync(self, name: str, metrics: dict) -> None:
        """Push agent ``name``'s weights into its own replicas (and only those)."""
        start = time.perf_counter()
        self.stacks[name].checkpoint_manager.update_weights(self.global_steps)
        metrics[f"teamtr/{name}/sync_s"] = metrics.get(f"teamtr/{name}/sync_s", 0.0) + time.perf_counter() - start

    # --------------------------------------------------------------------------------------- gains and certificate
    def _on_regenerated(self, rollout: TeamRollout, metrics: dict) -> None:
        """A regeneration measures J of the current team. The updates made since the previous regeneration get
        their measured gain: one update (teamtr) -> a per-update pair; several (stale, joint, happo) -> one pair
        for their summed bounds."""
        metrics["teamtr/stage/episodes"] = metrics.get("teamtr/stage/episodes", 0) + len(rollout.returns)
        pending = [u for u in self.state.updates_history if u["measured_gain"] is None]
        if pending and self.state.last_return_mean is not None:
            gain = rollout.return_mean - self.state.last_return_mean
            self.state.gain_pairs.append([sum(u["bound"] for u in pending), gain])
            for update in pending:
                update["measured_gain"] = gain
                metrics[f"teamtr/{update['agent']}/measured_gain"] = gain
            self.state.measured_gain_sum += gain
            metrics["teamtr/stage/measured_gain"] = gain
            # a coordination regression: the team got worse over an interval of updates (noise included)
            metrics["teamtr/stage/negative_gains"] = metrics.get("teamtr/stage/negative_gains", 0) + int(gain < 0)
            metrics["teamtr/stage/gain_measurements"] = metrics.get("teamtr/stage/gain_measurements", 0) + 1
        self.state.last_return_mean = rollout.return_mean
        metrics.setdefault("teamtr/stage/return_mean", rollout.return_mean)  # the stage's first regeneration

    def _record_update(self, record: algos.UpdateRecord, stage: int, metrics: dict) -> None:
        bound = algos.update_bound(record, a_max=self.team.a_clip, form=self.team.certificate_form,
                                   horizon=episode_horizon(self.team), gamma=self.team.gamma)
        metrics[f"teamtr/{record.agent}/bound"] = bound.bound
        self.state.updates_history.append({"stage": stage, "agent": record.agent, "bound": bound.bound,
                                           "measured_gain": None})

    def _log_stage(self, records: list[algos.UpdateRecord], order: list[str], metrics: dict) -> None:
        for position, name in enumerate(order):
            metrics[f"teamtr/{name}/position"] = position
        if records:
            # intermediate occupancy only when every update had fresh rollouts; otherwise the stale penalty applies
            fresh = self.team.schedule == "teamtr" and (self.team.resample_every or 1) == 1
            occupancy = "intermediate" if fresh else "stale"
            cert = algos.stage_certificate(records, a_max=self.team.a_clip, form=self.team.certificate_form,
                                           horizon=episode_horizon(self.team), gamma=self.team.gamma,
                                           occupancy=occupancy)
            metrics["teamtr/stage/certificate"] = cert.certificate
            metrics["teamtr/stage/out_of_region"] = cert.num_out_of_region
            self.state.certificate_sum += cert.certificate
        if self.state.gain_pairs:
            bounds, gains = zip(*self.state.gain_pairs)
            metrics["teamtr/stage/calibration"] = algos.calibration_fraction(bounds, gains)
            if len(bounds) >= 3:
                rho = algos.spearman_rank_correlation(bounds, gains)
                if math.isfinite(rho):
                    metrics["teamtr/stage/rank_correlation"] = rho
        metrics["teamtr/stage/certificate_sum"] = self.state.certificate_sum
        metrics["teamtr/stage/measured_gain_sum"] = self.state.measured_gain_sum

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
    def _save_checkpoint(self):
        """``global_step_N/<agent>/`` per agent, ``data.pt``, ``teamtr_state.json``; the tracker file last."""
        step_dir = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        keep = self.config.trainer.get("max_actor_ckpt_to_keep", None)
        for name, stack in self.stacks.items():
            stack.worker_group.save_checkpoint(os.path.join(step_dir, name), None, self.global_steps,
                                               max_ckpt_to_keep=keep)
        local_mkdir_safe(step_dir)
        torch.save(self.train_dataloader.state_dict(), os.path.join(step_dir, "data.pt"))
        self.state.save(step_dir)
        tracker = os.path.join(self.config.trainer.default_local_dir, "latest_checkpointed_iteration.txt")
        tmp = tracker + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(str(self.global_steps))
        os.replace(tmp, tracker)  # only now does the checkpoint count as complete

    def _load_checkpoint(self):
        self.global_steps = 0
        folder = find_resume_folder(self.config)
        if folder is None:
            return
        state = TeamTRState.load(folder)
        state.check_matches(self.team, folder)
        for name, stack in self.stacks.items():
            stack.worker_group.load_checkpoint(local_path=os.path.join(folder, name),
                                               del_local_after_load=self.config.trainer.del_local_ckpt_after_load)
        data_path = os.path.join(folder, "data.pt")
        if os.path.exists(data_path):
            self.train_dataloader.load_state_dict(torch.load(data_path, weights_only=False))
        self.state = state
        self.global_steps = int(folder.rstrip("/").split("global_step_")[-1])
        logger.info("teamtr: resumed from %s after stage %d", folder, self.global_steps)


def episode_horizon(team: TeamConfig) -> int:
    """Turns per episode: the horizon H of the finite-horizon certificate."""
    from teamtr_verl.team_logic import router_schedule

    return len(router_schedule(team.router, team.agent_names, "horizon"))


def find_resume_folder(config: DictConfig) -> Optional[str]:
    """The ``global_step_N`` folder to resume from, or None (verl's resume_mode semantics)."""
    mode = config.trainer.resume_mode
    if mode == "disable":
        return None
    if mode == "auto":
        root = config.trainer.default_local_dir
        root = root if os.path.isabs(root) else os.path.join(os.getcwd(), root)
        return find_latest_ckpt_path(root)
    if mode == "resume_path":
        path = config.trainer.resume_from_path
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    raise ValueError(f"trainer.resume_mode={mode!r} is not valid: choose one of auto, disable, resume_path")
