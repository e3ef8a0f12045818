"""Everything a TeamTR run must carry across a checkpoint, in one explicit, JSON-serialisable dataclass.

Saved as ``teamtr_state.json`` beside the per-agent checkpoints of ``global_step_N/``. Checkpoints are taken at stage
boundaries only (after the whole stage's updates and syncs), so ``stages_done`` is the cursor: a resumed run starts
the next stage with every agent's weights, β state and the order RNG exactly as they were.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from teamtr_verl.algos import BetaState
from teamtr_verl.config import TeamConfig

STATE_FILE = "teamtr_state.json"
STATE_VERSION = 1


@dataclass
class TeamTRState:
    """Resumable state of the stage loop.

    Attributes:
        agent_names: the team, in config order (checked against the config on resume).
        agent_models: each agent's model path at the start of the run (checked on resume).
        stages_done: completed stages (= verl's global step of the last completed stage).
        order_rng_state: ``random.Random.getstate()`` of the update-order RNG, JSON-encoded.
        beta: per agent, its :class:`~teamtr_verl.algos.BetaState` as a dict.
        kl_history: per agent, the measured KL of each committed update, in order.
        certificate_sum: Σ over stages of the stage certificate.
        measured_gain_sum: Σ over stages of the measured gain (change of the mean team return).
        last_return_mean: mean team return of the last regeneration (the baseline of the next measured gain).
        updates_history: per update: stage, agent, its bound, and its measured gain once the next regeneration
            measured it.
        gain_pairs: [summed bound, measured gain] of the updates between two consecutive regenerations (one update
            under ``teamtr``, a whole stage under ``stale``): the calibration and rank correlation are over these.
    """

    agent_names: list[str]
    agent_models: dict[str, str]
    stages_done: int = 0
    order_rng_state: Any = None
    beta: dict[str, dict] = field(default_factory=dict)
    kl_history: dict[str, list[float]] = field(default_factory=dict)
    certificate_sum: float = 0.0
    measured_gain_sum: float = 0.0
    last_return_mean: Optional[float] = None
    updates_history: list[dict] = field(default_factory=list)
    gain_pairs: list[list[float]] = field(default_factory=list)

    @classmethod
    def initial(cls, team: TeamConfig) -> "TeamTRState":
        rng = random.Random(team.order_seed)
        return cls(
            agent_names=list(team.agent_names),
            agent_models={agent.name: agent.model for agent in team.agents},
            order_rng_state=_encode_rng(rng.getstate()),
            beta={name: BetaState(beta=team.beta_init_of(name)).to_dict() for name in team.agent_names},
            kl_history={name: [] for name in team.agent_names},
        )

    # -- the per-agent β controller --------------------------------------------------------------------------------
    def beta_state(self, name: str) -> BetaState:
        return BetaState.from_dict(self.beta[name])

    def set_beta_state(self, name: str, state: BetaState) -> None:
        self.beta[name] = state.to_dict()

    # -- the update order of a stage ----------------------------------------------------------------------------------
    def next_order(self, team: TeamConfig) -> list[str]:
        """The agents' update order for the next stage; advances the order RNG only for ``order=random``."""
        names = list(team.agent_names)
        if team.order == "fixed":
            return names
        if team.order == "reversed":
            return names[::-1]
        rng = random.Random()
        rng.setstate(_decode_rng(self.order_rng_state))
        rng.shuffle(names)
        self.order_rng_state = _encode_rng(rng.getstate())
        return names

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

    def check_matches(self, team: TeamConfig, where: str) -> None:
        """Raise if a checkpoint's team differs from the configured one, listing both sides."""
        saved = [(name, self.agent_models.get(name)) for name in self.agent_names]
        configured = [(agent.name, agent.model) for agent in team.agents]
        if saved != configured:
            raise ValueError(
                f"the checkpoint at {where} was written by another team: checkpoint agents (name, model) = {saved}; "
                f"configured teamtr.agents = {configured}. Resume with the same agents, or start a new run "
                "(trainer.resume_mode=disable or another trainer.default_local_dir)."
            )


def _encode_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(encoded) -> tuple:
    version, internal, gauss = encoded
    return version, tuple(internal), gauss
