"""Stage-0 alignment of a replacement agent (paper Prop. 3.8, App. D): the math only.

Before a new model takes over agent j of a trained team, it must start inside a δ₀-ball of the incumbent on the team's
occupancy; then the per-update and per-stage bounds keep their form. The paper gives neither the target nor the
stopping rule (docs/paper_map.md). Two pieces here:

* the **geometric-mixture target** of the predecessor SAT code (its eqs. 18-19), per context s:
  π_t(·|s) ∝ π_new(·|s)^(1−t) · π_inc(·|s)^t, t ∈ [0, 1] (SAT writes t = λ/(1+λ)). t = 0 is the newcomer, t = 1 the
  incumbent; the smallest t whose KL to the incumbent is ≤ δ₀ keeps as much of the newcomer as δ₀ allows. The
  divergence is the trust region's direction, KL(π_inc ‖ π_t) (Eq. 11's KL(π_cur ‖ π_new) with the incumbent as the
  current policy); SAT bounds KL(π_t ‖ π_inc). Both are non-increasing in t (the path is an exponential family with
  natural parameter t, and KL(π_inc ‖ π_t) is convex in t and 0 at t = 1), so bisection finds the smallest t exactly;
  either direction can be chosen with ``direction``.
* the **stopping rule** of an alignment: done at the first measured KL ≤ δ₀, refused (with the curve) when the step
  budget is spent first.

Shapes: logits and log-probabilities are ``(..., vocab)``, one distribution per leading index (a context: one token
position of one probe message); t and KL values are ``(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from teamtr_verl.algos.checks import _check_choice, _check_positive, _check_same_shape, _check_tensor

KL_DIRECTIONS = ("incumbent_first", "mixture_first")  # KL(π_inc ‖ π_t) (the trust region's) / KL(π_t ‖ π_inc) (SAT)


def geometric_mixture(new_logits: torch.Tensor, incumbent_logits: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """log π_t = log_softmax((1 − t)·log π_new + t·log π_inc): the normalized geometric mixture.

    Args:
        new_logits, incumbent_logits: `(torch.Tensor)` shape (..., vocab), unnormalized; the same vocabulary.
        t: a float or `(torch.Tensor)` of shape (...) in [0, 1], the incumbent's weight.

    Returns:
        `(torch.Tensor)` float64 shape (..., vocab), the mixture's log-probabilities.
    """
    _check_tensor("new_logits", new_logits)
    _check_same_shape("incumbent_logits", incumbent_logits, "new_logits", new_logits)
    t = torch.as_tensor(t, dtype=torch.float64)
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"t must lie in [0, 1], got t={t.tolist()!r}")
    log_new = torch.log_softmax(new_logits.to(torch.float64), dim=-1)
    log_inc = torch.log_softmax(incumbent_logits.to(torch.float64), dim=-1)
    t = t.unsqueeze(-1) if t.ndim else t
    return torch.log_softmax((1.0 - t) * log_new + t * log_inc, dim=-1)


def exact_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_a p(a)·(log p(a) − log q(a)) over the last dimension, for full log-distributions.

    Args:
        log_p, log_q: `(torch.Tensor)` shape (..., vocab), normalized log-probabilities (−inf allowed where p = 0).

    Returns:
        `(torch.Tensor)` float64 shape (...).
    """
    _check_tensor("log_p", log_p)
    _check_same_shape("log_q", log_q, "log_p", log_p)
    log_p, log_q = log_p.to(torch.float64), log_q.to(torch.float64)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # 0·log 0 = 0
    return terms.sum(dim=-1)


def _mixture_kl(new_logits, incumbent_logits, t, direction: str) -> torch.Tensor:
    log_t = geometric_mixture(new_logits, incumbent_logits, t)
    log_inc = torch.log_softmax(incumbent_logits.to(torch.float64), dim=-1)
    return exact_kl(log_inc, log_t) if direction == "incumbent_first" else exact_kl(log_t, log_inc)


@dataclass(frozen=True)
class MixtureTarget:
    """The per-context target of an alignment: t (..., ), its log-probabilities (..., vocab) and KL (..., )."""

    t: torch.Tensor
    log_probs: torch.Tensor
    kl: torch.Tensor


def mixture_within(new_logits: torch.Tensor, incumbent_logits: torch.Tensor, delta0: float,
                   direction: str = "incumbent_first", iterations: int = 30) -> MixtureTarget:
    """Per context, the smallest t ∈ [0, 1] with KL(π_t to π_inc) ≤ δ₀, by bisection (SAT: 30 iterations).

    A context where the newcomer is already within δ₀ gets t = 0 (the newcomer itself). Otherwise the bracket
    [lo, hi] keeps KL(lo) > δ₀ ≥ KL(hi) and t = hi is returned, so the returned target is always within δ₀; after k
    iterations hi − lo = 2^−k.

    Args:
        new_logits, incumbent_logits: `(torch.Tensor)` shape (..., vocab), the same vocabulary.
        delta0: δ₀ > 0.
        direction: "incumbent_first" for KL(π_inc ‖ π_t) (default, the trust region's), "mixture_first" for
            KL(π_t ‖ π_inc) (SAT's).
        iterations: bisection steps (≥ 1).

    Returns:
        :class:`MixtureTarget`.
    """
    delta0 = _check_positive("delta0", delta0)
    direction = _check_choice("direction", direction, KL_DIRECTIONS)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got iterations={iterations!r}")
    shape = new_logits.shape[:-1]
    lo = torch.zeros(shape, dtype=torch.float64)
    hi = torch.ones(shape, dtype=torch.float64)
    inside = _mixture_kl(new_logits, incumbent_logits, lo, direction) <= delta0
    hi = torch.where(inside, lo, hi)  # already within δ₀: keep the newcomer
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = _mixture_kl(new_logits, incumbent_logits, mid, direction) <= delta0
        hi = torch.where(ok & ~inside, mid, hi)
        lo = torch.where(ok | inside, lo, mid)
    log_probs = geometric_mixture(new_logits, incumbent_logits, hi)
    return MixtureTarget(hi, log_probs, _mixture_kl(new_logits, incumbent_logits, hi, direction))


@dataclass(frozen=True)
class AlignmentVerdict:
    """``status``: "aligned" (the last KL is ≤ δ₀), "continue" or "refused" (budget spent); ``message`` for a person."""

    status: str
    message: str


def alignment_verdict(kl_curve: Sequence[float], delta0: float, max_steps: int) -> AlignmentVerdict:
    """The stopping rule of a Stage-0 alignment, after each measurement of the held-out KL monitor.

    ``kl_curve[k]`` is the monitor after k alignment steps (``kl_curve[0]``: the newcomer as it came). Aligned as soon
    as the last value is ≤ δ₀; refused once ``max_steps`` steps were taken and it is still above (the swap must not
    happen, and the message carries the curve); otherwise continue.
    """
    delta0 = _check_positive("delta0", delta0)
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0, got max_steps={max_steps!r}")
    curve = [float(v) for v in kl_curve]
    if not curve or any(v != v or v < 0 for v in curve):  # v != v: NaN
        raise ValueError(f"kl_curve must be a non-empty list of KL values >= 0, got kl_curve={curve!r}")
    steps, last = len(curve) - 1, curve[-1]
    shown = ", ".join(f"{v:.4g}" for v in curve)
    if last <= delta0:
        return AlignmentVerdict("aligned", f"aligned after {steps} steps: KL {last:.4g} <= delta0 {delta0:g} "
                                           f"(curve {shown})")
    if steps >= max_steps:
        return AlignmentVerdict("refused", f"not aligned within {max_steps} steps: KL {last:.4g} > delta0 "
                                           f"{delta0:g} (curve {shown}); the swap is refused")
    return AlignmentVerdict("continue", f"step {steps}: KL {last:.4g} > delta0 {delta0:g}")
