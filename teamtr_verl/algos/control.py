"""Per-agent trust-region control, pure: the β controller and the line-search step rule.

One agent update (Algorithm 1, line 7: "update until d̂ ≤ δ") is driven as follows:

  1. the optimizer proposes a full step θ_cur → θ_new; measure its KL d̂_full (Eq. 11) and surrogate L̂_full;
  2. β adapts **once**, from d̂_full against δ, with verl's ``AdaptiveKLController`` rule (:func:`adapt_beta`);
  3. the line search (:func:`line_search`) tries θ_cur + α·(θ_new − θ_cur) with
     α₀ = min(1, safety·sqrt(δ/d̂_full)) (KL grows about like α², so α₀ lands just inside δ instead of a blind
     halving landing near δ/4), then α₀/2, α₀/4, …; it accepts the first α whose KL is ≤ δ **and** whose surrogate
     did not decrease (L̂(α) ≥ 0 = L̂ at α = 0); after ``max_backtracks`` halvings it gives up (θ_cur is restored).

The committed KL is therefore always ≤ δ: acceptance is decided on the KL measured at the committed step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from teamtr_verl.algos.checks import (
    _check_nonneg,
    _check_positive,
)
from teamtr_verl.defaults import (
    DEFAULT_BETA,
    DEFAULT_BETA_MAX_STEP,
    DEFAULT_MAX_BACKTRACKS,
    DEFAULT_STEP_SAFETY,
)


@dataclass(frozen=True)
class BetaState:
    """The trust-region state of one agent; immutable, serialises to a dict (``teamtr_state.json``).

    Attributes:
        beta: current KL coefficient β > 0 of the teamtr loss.
        num_updates: updates finished (committed or given up).
        num_backtracks: line-search halvings taken in total.
        num_give_ups: updates given up in total.
        last_kl: the KL of the last full step (what β adapted from), or None.
    """

    beta: float = DEFAULT_BETA
    num_updates: int = 0
    num_backtracks: int = 0
    num_give_ups: int = 0
    last_kl: float | None = None

    def __post_init__(self) -> None:
        _check_positive("beta", self.beta)
        for name in ("num_updates", "num_backtracks", "num_give_ups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {name}={v!r}")
        if self.last_kl is not None and math.isnan(float(self.last_kl)):
            raise ValueError(f"last_kl must not be NaN, got last_kl={self.last_kl!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BetaState:
        if not isinstance(data, Mapping):
            raise ValueError(f"data must be a mapping, got data of type {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"BetaState.from_dict got unknown keys {unknown}, expected a subset of {sorted(names)}")
        return cls(**dict(data))

    def after_update(self, kl_full: float, beta: float, backtracks: int, committed: bool) -> BetaState:
        """The state after one update: the adapted β, the counters advanced."""
        return dataclasses.replace(
            self, beta=beta, num_updates=self.num_updates + 1, num_backtracks=self.num_backtracks + backtracks,
            num_give_ups=self.num_give_ups + (0 if committed else 1), last_kl=kl_full,
        )


def adapt_beta(
    beta: float,
    measured_kl: float,
    target_kl: float,
    n_steps: int = 1,
    horizon: float = 1.0,
    max_step: float = DEFAULT_BETA_MAX_STEP,
    beta_min: float = 1e-6,
    beta_max: float = 1e3,
) -> float:
    """Proportional β update of verl's ``AdaptiveKLController`` (Ziegler et al. 2019), then clipped to bounds:

        β ← clip( β · (1 + clip(kl/target − 1, −max_step, max_step) · n_steps / horizon), beta_min, beta_max )

    Applied once per update to the full step's KL with target δ, it raises β when the optimizer overshoots the
    region and lowers it when the step stays well inside: symmetric, at most ±20 % per update. An infinite KL
    counts as the largest overshoot.

    Returns:
        the new β (float).
    """
    beta = _check_positive("beta", beta)
    if isinstance(measured_kl, (int, float)) and measured_kl == math.inf:
        measured_kl = math.inf
    elif measured_kl is None or math.isnan(float(measured_kl)):
        raise ValueError(f"measured_kl must be a number, got measured_kl={measured_kl!r}")
    target_kl = _check_positive("target_kl", target_kl)
    horizon = _check_positive("horizon", horizon)
    max_step = _check_nonneg("max_step", max_step)
    n_steps = _check_nonneg("n_steps", n_steps)
    beta_min = _check_positive("beta_min", beta_min)
    beta_max = _check_positive("beta_max", beta_max)
    if beta_min > beta_max:
        raise ValueError(f"beta_min must be <= beta_max, got beta_min={beta_min!r}, beta_max={beta_max!r}")
    err = float(np.clip(float(measured_kl) / target_kl - 1.0, -max_step, max_step))
    return float(min(max(beta * (1.0 + err * n_steps / horizon), beta_min), beta_max))


def first_step_fraction(kl_full: float, delta: float, safety: float = DEFAULT_STEP_SAFETY) -> float:
    """α₀ = min(1, safety·sqrt(δ/d̂_full)): the first step fraction the line search tries.

    KL(π_cur ‖ π_α) is second order in the step, ≈ α²·d̂_full for small steps, so α₀ aims at safety²·δ (0.81·δ by
    default). A full step that is already inside ``safety²·δ`` (or a non-positive KL, possible with k1) gives 1.
    """
    delta = _check_positive("delta", delta)
    safety = _check_positive("safety", safety)
    if not math.isfinite(kl_full):  # line_search tries 0.5 after a non-finite full step
        raise ValueError(f"kl_full must be finite, got kl_full={kl_full!r}")
    if kl_full <= 0.0:
        return 1.0
    return float(min(1.0, safety * math.sqrt(delta / kl_full)))


@dataclass(frozen=True)
class StepEval:
    """What the trainer (or simulator) measured at one step fraction α: KL (Eq. 11) and surrogate L̂ (≥ 0 wanted)."""

    alpha: float
    kl: float
    surrogate: float

    def acceptable(self, delta: float) -> bool:
        """Inside the region and no worse than not moving (L̂ = 0 at α = 0)."""
        return math.isfinite(self.kl) and self.kl <= delta and math.isfinite(self.surrogate) and self.surrogate >= 0.0


@dataclass(frozen=True)
class LineSearchResult:
    """The outcome of one agent update's line search.

    Attributes:
        action: ``"accept"`` (commit θ_cur + α·(θ_new − θ_cur)) or ``"give_up"`` (restore θ_cur).
        alpha: the committed step fraction (0.0 on give-up).
        full: the full step's evaluation (α = 1).
        committed: the evaluation at the committed α, or None on give-up.
        backtracks: halvings taken after the first try α₀.
        evaluations: every evaluation, in order (the full step first).
        beta: β after adapting once to the full step's KL.
    """

    action: str
    alpha: float
    full: StepEval
    committed: StepEval | None
    backtracks: int
    evaluations: tuple[StepEval, ...]
    beta: float

    @property
    def kl(self) -> float:
        """KL of the update as committed (0 on give-up: π_cur is kept)."""
        return self.committed.kl if self.committed is not None else 0.0


def line_search(
    evaluate: Callable[[float], StepEval],
    full: StepEval,
    delta: float,
    beta: float,
    max_backtracks: int = DEFAULT_MAX_BACKTRACKS,
    safety: float = DEFAULT_STEP_SAFETY,
) -> LineSearchResult:
    """Run the step rule of one agent update (see the module docstring); pure but for ``evaluate``.

    Args:
        evaluate: sets the agent's weights to θ_cur + α·(θ_new − θ_cur) and returns its :class:`StepEval`.
        full: the evaluation of the full step (α = 1), already measured.
        delta: δ > 0.
        beta: the β the full step was trained with; adapted once from ``full.kl`` (an infinite/NaN KL counts as an
            overshoot).
        max_backtracks: halvings allowed after α₀ (>= 0).
        safety: see :func:`first_step_fraction`.

    Returns:
        :class:`LineSearchResult`. The caller restores θ_cur on ``give_up``; on ``accept`` the weights are those of
        the last ``evaluate`` call unless α₀ = 1 (then no call was made: the full step stands).
    """
    delta = _check_positive("delta", delta)
    if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, (int, np.integer)) or max_backtracks < 0:
        raise ValueError(f"max_backtracks must be an integer >= 0, got max_backtracks={max_backtracks!r}")
    kl_full = full.kl if math.isfinite(full.kl) else math.inf
    new_beta = adapt_beta(beta, kl_full, delta)
    evaluations = [full]
    alpha = first_step_fraction(kl_full, delta, safety) if math.isfinite(kl_full) else 0.5
    for halvings in range(max_backtracks + 1):
        step = full if alpha == 1.0 else evaluate(alpha)
        if step is not full:
            evaluations.append(step)
        if step.acceptable(delta):
            return LineSearchResult("accept", alpha, full, step, halvings, tuple(evaluations), new_beta)
        alpha *= 0.5
    return LineSearchResult("give_up", 0.0, full, None, max_backtracks, tuple(evaluations), new_beta)


__all__ = [
    "BetaState",
    "adapt_beta",
    "first_step_fraction",
    "StepEval",
    "LineSearchResult",
    "line_search",
]
