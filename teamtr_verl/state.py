"""Everything a TeamTR run must carry across a checkpoint, in one explicit, JSON-serialisable dataclass.

Saved as ``teamtr_state.json`` beside the per-agent checkpoints (:mod:`teamtr_verl.checkpoints`). At a stage end
``stages_done`` is the cursor: a resumed run starts the next stage with every agent's weights, β state and the order
RNG exactly as they were. Inside a stage (``teamtr.save_every_update``) ``cursor`` adds the stage's order, how many of
its updates are done, its metrics so far and where each agent's weights are; the resumed run redraws the same prompts
and continues with the next agent of that order.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from teamtr_verl import algos, checkpoints
from teamtr_verl.algos import BetaState
from teamtr_verl.config import TeamConfig

STATE_FILE = "teamtr_state.json"
STATE_VERSION = 2


@dataclass
class TeamTRState:
    """Resumable state of the stage loop.

    Attributes:
        agent_names: the team, in config order (checked against the config on resume).
        agent_models: each agent's model path at the start of the run (checked on resume).
        frozen_agents: the agents with ``train: false`` (checked on resume: a frozen agent has no saved weights).
        shared_base: ``[model, lora rank, lora alpha]`` of a shared-base team, None for full stacks (checked on
            resume: a checkpoint of one layout does not load into the other).
        stages_done: completed stages (= verl's global step of the last completed stage).
        order_rng_state: ``random.Random.getstate()`` of the update-order RNG, JSON-encoded.
        beta: per trained agent, its :class:`~teamtr_verl.algos.BetaState` as a dict.
        kl_history: per trained agent, the measured KL of each committed update, in order.
        ledger: one dict per agent update, in order (stage, agent, committed, kl, alpha, bound, its point/se, the
            importance-sampled gain ``is_gain``/``is_gain_se`` and, once measured, the paired ``crn_gain``/``_se``).
        gain_pairs: [summed bound, paired gain] of the committed updates between two regenerations of the same
            prompts (one update under ``teamtr``; a whole stage under ``stale``/``happo``): the certificate's
            calibration and rank correlation are computed over these.
        replacements: one dict per agent swapped by ``teamtr.replace`` (stage after which it happened, agent, from,
            to, method), in order.
        cursor: None at a stage end; inside stage S: ``{"stage": S, "order": [...], "done": U, "metrics": {...},
            "agent_dirs": {agent: "<folder>/<agent>"}}`` (folders relative to the checkpoint root).
    """

    agent_names: list[str]
    agent_models: dict[str, str]
    frozen_agents: list[str] = field(default_factory=list)
    shared_base: Optional[list] = None
    stages_done: int = 0
    order_rng_state: Any = None
    beta: dict[str, dict] = field(default_factory=dict)
    kl_history: dict[str, list[float]] = field(default_factory=dict)
    ledger: list[dict] = field(default_factory=list)
    gain_pairs: list[list[float]] = field(default_factory=list)
    replacements: list[dict] = field(default_factory=list)
    cursor: Optional[dict] = None

    @classmethod
    def initial(cls, team: TeamConfig) -> "TeamTRState":
        rng = random.Random(team.order_seed)
        return cls(
            agent_names=list(team.agent_names),
            agent_models={agent.name: agent.model for agent in team.agents},
            frozen_agents=[agent.name for agent in team.agents if not agent.train],
            shared_base=_shared_base(team),
            order_rng_state=_encode_rng(rng.getstate()),
            beta={name: BetaState(beta=team.beta_init_of(name)).to_dict() for name in team.trained_names},
            kl_history={name: [] for name in team.trained_names},
        )

    # -- the per-agent β controller --------------------------------------------------------------------------------
    def beta_state(self, name: str) -> BetaState:
        return BetaState.from_dict(self.beta[name])

    def set_beta_state(self, name: str, state: BetaState) -> None:
        self.beta[name] = state.to_dict()

    # -- the certificate ledger ----------------------------------------------------------------------------------------
    def record_update(self, entry: dict) -> None:
        """Log one agent update; its paired gain comes later, from :meth:`record_paired_gain`."""
        self.ledger.append({**entry, "crn_gain": None, "crn_gain_se": None, "measured": False})
        if entry.get("committed"):
            self.kl_history[entry["agent"]].append(entry["kl"])

    def record_paired_gain(self, gain: algos.GainEstimate, stage: int) -> list[dict]:
        """Attribute a paired gain (two regenerations of the same episodes of ``stage``) to the updates made between
        them; returns those updates. Several updates (stale) share one pair: their bounds add up. An update of an
        earlier stage left unmeasured (no closing regeneration) is never paired with another stage's episodes."""
        pending = [u for u in self.ledger if not u["measured"] and u["stage"] == stage]
        for update in pending:
            update["measured"] = True
            update["crn_gain"], update["crn_gain_se"] = gain.mean, gain.se
        bounds = [u["bound"] for u in pending if u.get("committed") and u.get("bound") is not None]
        if bounds and len(bounds) == sum(1 for u in pending if u.get("committed")):
            self.gain_pairs.append([float(sum(bounds)), gain.mean])
        return pending

    def forget_unmeasured(self, stage: int) -> None:
        """A run resumed inside ``stage`` lost the rollout its last updates would be paired against: they stay
        unmeasured (``crn_gain`` None) rather than share the next update's gain."""
        for update in self.ledger:
            if not update["measured"] and update["stage"] == stage:
                update["measured"] = True

    def certificate_stats(self) -> dict[str, float]:
        """Calibration (fraction of pairs with gain >= bound), Spearman per pair and on the cumulative series."""
        if not self.gain_pairs:
            return {}
        bounds, gains = zip(*self.gain_pairs)
        stats = {"calibration": algos.calibration_fraction(bounds, gains), "pairs": float(len(bounds)),
                 "bound_sum": float(sum(bounds)), "gain_sum": float(sum(gains))}
        if len(bounds) >= 3:
            for name, value in (("spearman", algos.spearman_rank_correlation(bounds, gains)),
                                ("spearman_cumulative", algos.cumulative_spearman(bounds, gains))):
                if value == value:  # NaN when a series is constant
                    stats[name] = value
        return stats

    # -- the update order of a stage ----------------------------------------------------------------------------------
    def next_order(self, team: TeamConfig) -> list[str]:
        """The trained agents' update order for the next stage; advances the order RNG only for ``order=random``."""
        names = list(team.trained_names)
        if team.order == "fixed":
            return names
        if team.order == "reversed":
            return names[::-1]
        rng = random.Random()
        rng.setstate(_decode_rng(self.order_rng_state))
        rng.shuffle(names)
        self.order_rng_state = _encode_rng(rng.getstate())
        return names

    # -- plug-and-play replacement ------------------------------------------------------------------------------------
    def apply_replacement(self, team: TeamConfig, **details) -> dict:
        """Record ``team.replace`` as done after stage ``stages_done``: the agent's model becomes the new one and a
        trained agent's β controller starts over (its KL history was another model's); returns the record, which
        also holds ``details`` (Stage 0: δ₀, the KL curve, probe sizes)."""
        swap = team.replace
        record = {"stage": self.stages_done, "agent": swap.agent, "from": self.agent_models[swap.agent],
                  "to": swap.model, "method": swap.method, **details}
        self.agent_models[swap.agent] = swap.model
        if swap.agent in self.beta:
            self.beta[swap.agent] = BetaState(beta=team.beta_init_of(swap.agent)).to_dict()
            self.kl_history[swap.agent] = []
        self.replacements.append(record)
        return record

    # -- persistence ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TeamTRState":
        data = dict(data)
        version = data.pop("version", None)
        if version != STATE_VERSION:
            raise ValueError(f"{STATE_FILE} has version {version!r}; this teamtr-verl reads version {STATE_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{STATE_FILE} has unknown keys {unknown}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # atomic: a state file is complete or absent
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "TeamTRState":
        return cls.from_dict(json.loads((Path(directory) / STATE_FILE).read_text()))

    def check_matches(self, team: TeamConfig, where: str) -> bool:
        """Raise if a checkpoint's team differs from the configured one, listing both sides. Returns whether the
        configured ``teamtr.replace`` is still to be done: the checkpoint has the incumbent (a team already swapped
        matches the configured team as is, so resuming after a swap needs no change to the command line)."""
        if self.shared_base != _shared_base(team):
            raise ValueError(f"the checkpoint at {where} was written by a team with teamtr.shared_base [model, lora rank, "
                             f"lora alpha] = {self.shared_base}; configured: {_shared_base(team)} (null: one full "
                             "stack per agent). Resume with the same layout, or start a new run")
        saved = [(name, self.agent_models.get(name), name not in self.frozen_agents) for name in self.agent_names]
        configured = [(agent.name, agent.model, agent.train) for agent in team.agents]
        if saved == configured:
            return False
        if team.replace is not None:
            before = [(name, team.replace.incumbent if name == team.replace.agent else model, train)
                      for name, model, train in configured]
            if saved == before:
                if self.cursor is not None:
                    raise ValueError(
                        f"teamtr.replace: the checkpoint at {where} is inside stage {self.cursor['stage']} "
                        "(teamtr.save_every_update): an agent is swapped between stages; resume from a global_step_S "
                        "folder (trainer.resume_mode=resume_path, trainer.resume_from_path=.../global_step_S)")
                return True
            configured = before
        if saved != configured:
            raise ValueError(
                f"the checkpoint at {where} was written by another team: checkpoint agents (name, model, train) = "
                f"{saved}; configured teamtr.agents = {configured}. Resume with the same agents, or start a new run "
                "(trainer.resume_mode=disable or another trainer.default_local_dir)."
            )


def resume_state(trainer_config) -> Optional[tuple[str, TeamTRState]]:
    """The checkpoint folder this run resumes from (verl's ``trainer.resume_mode``) and its state, or None when
    there is none or it holds no state file (``trainer_config``: the ``trainer`` block)."""
    folder = checkpoints.resume_folder(trainer_config)
    if folder is None or not (Path(folder) / STATE_FILE).is_file():
        return None
    return folder, TeamTRState.load(folder)


def stage0_pending(trainer_config, team: TeamConfig) -> bool:
    """Whether this run starts with a Stage-0 aligned swap: ``teamtr.replace`` with method ``aligned`` and a
    checkpoint to resume from that still holds the incumbent."""
    if team.replace is None or team.replace.method != "aligned":
        return False
    resumed = resume_state(trainer_config)
    return resumed is not None and resumed[1].check_matches(team, resumed[0])


def _encode_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(encoded) -> tuple:
    version, internal, gauss = encoded
    return version, tuple(internal), gauss


def _shared_base(team: TeamConfig) -> Optional[list]:
    shared = team.shared_base
    return None if shared is None else [shared.model, shared.lora_rank, shared.lora_alpha]
