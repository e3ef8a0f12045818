"""Per-update gain estimates and improvement bounds (the certificate), calibration and rank correlation.

All quantities are in **return units** and per team trajectory τ, on rollouts of the team before the update
(π_cur). For the updated agent j let W(τ) = Π_{messages m of j in τ} π_new(m)/π_cur(m) (:func:`trajectory_log_ratio`)
and c(τ) = R(τ) − (mean return of the other trajectories of τ's prompt group) (:func:`leave_one_out_centered`).
Only agent j changed, so the team's trajectory likelihood ratio is exactly W, and

    ΔJ = J(π_new) − J(π_cur) = E_τ~π_cur[(W − 1)·R] = E[(W − 1)·c]       (E[W − 1 | prompt] = 0, c's baseline
                                                                           does not depend on τ)

is estimated without bias by :func:`importance_gain` on prompt groups that were **held out of the gradient** (on
the trained groups W is fitted to the same samples: optimistic). The certificate's default bound
(:func:`is_lower_bound`) clips W as PPO does, min(W·c, clip(W, 1±ε)·c) ≤ W·c pointwise, so its expectation is ≤ ΔJ,
and subtracts t standard errors: a lower confidence bound. The theorem form (:func:`theorem_bound`) is Thm. 3.4 for a
turn-based team: first-order surrogate Σ_{m of j}(w_m − 1)·c minus √2·ε·n_j·(n_j − 1)·sqrt(d̂), zero penalty when
the agent speaks once per episode (then the surrogate *is* ΔJ). ``docs/paper_map.md`` derives both.

Schedules that update several agents on one rollout (``stale``, ``happo``) pass the earlier updates' ratios as
``prior_log_w``: E_π0[M·(W − 1)·c] with M = Π_{k<i} W_k is exactly the i-th update's gain J(π̂^i) − J(π̂^{i−1}),
so their bounds stay valid; the staleness shows as a larger standard error instead of an imposed O(n²) term.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from teamtr_verl.algos.checks import (
    _as_mask,
    _check_choice,
    _check_finite_in_mask,
    _check_nonneg,
    _check_positive,
    _check_rows,
    _check_same_shape,
    _check_tensor,
    factorize,
)
from teamtr_verl.algos.loss import _ppo_ratio
from teamtr_verl.defaults import (
    CERTIFICATE_BOUNDS,
    DEFAULT_CLIP_RATIO,
    DEFAULT_CONFIDENCE_T,
    MESSAGE_LOG_RATIO_CLAMP,
    RATIO_LEVELS,
)

# ----------------------------------------------------------------------------------------- per-trajectory inputs


def _check_log_ratios(old_log_prob, new_log_prob, response_mask, row_trajectory, num_trajectories):
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("new_log_prob", new_log_prob, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    _check_tensor("row_trajectory", row_trajectory, ndim=1)
    _check_rows("row_trajectory", row_trajectory.shape[0], old_log_prob.shape[0])
    if row_trajectory.numel() and (int(row_trajectory.min()) < 0 or int(row_trajectory.max()) >= num_trajectories):
        raise ValueError(f"row_trajectory must lie in [0, {num_trajectories}), got values in "
                         f"[{int(row_trajectory.min())}, {int(row_trajectory.max())}]")
    _check_finite_in_mask("old_log_prob", old_log_prob, mask)
    _check_finite_in_mask("new_log_prob", new_log_prob, mask)
    zero = torch.zeros((), dtype=torch.float64, device=mask.device)
    diff = torch.where(mask, new_log_prob.detach().to(torch.float64) - old_log_prob.detach().to(torch.float64), zero)
    return diff.sum(-1), mask.any(-1), row_trajectory.to(mask.device).long()


def trajectory_log_ratio(
    old_log_prob: torch.Tensor,
    new_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    row_trajectory: torch.Tensor,
    num_trajectories: int,
    log_ratio_clamp: float = MESSAGE_LOG_RATIO_CLAMP,
) -> torch.Tensor:
    """log W(τ) = Σ over the updated agent's tokens in τ of (log π_new − log π_cur), clamped to ±``log_ratio_clamp``.

    Args:
        old_log_prob, new_log_prob, response_mask: `(torch.Tensor)` shape (bs, response_length): the agent's
            messages (one row each), before and after the update.
        row_trajectory: `(torch.LongTensor)` shape (bs,): each row's trajectory code in [0, num_trajectories).
        num_trajectories: trajectories in the batch; those where the agent did not speak get log W = 0.

    Returns:
        `(torch.Tensor)` float64 shape (num_trajectories,).
    """
    per_row, _, traj = _check_log_ratios(old_log_prob, new_log_prob, response_mask, row_trajectory, num_trajectories)
    clamp = _check_positive("log_ratio_clamp", log_ratio_clamp)
    out = torch.zeros(num_trajectories, dtype=torch.float64, device=per_row.device).index_add_(0, traj, per_row)
    return out.clamp(-clamp, clamp)


def trajectory_ratio_excess(
    old_log_prob: torch.Tensor,
    new_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    row_trajectory: torch.Tensor,
    num_trajectories: int,
    log_ratio_clamp: float = MESSAGE_LOG_RATIO_CLAMP,
) -> torch.Tensor:
    """Σ over the updated agent's messages m in τ of (w_m − 1), w_m the message ratio: the first-order surrogate's
    per-trajectory weight (equal to W − 1 when the agent speaks once). Shapes as :func:`trajectory_log_ratio`."""
    per_row, real, traj = _check_log_ratios(old_log_prob, new_log_prob, response_mask, row_trajectory,
                                            num_trajectories)
    clamp = _check_positive("log_ratio_clamp", log_ratio_clamp)
    excess = torch.where(real, torch.exp(per_row.clamp(-clamp, clamp)) - 1.0, torch.zeros_like(per_row))
    return torch.zeros(num_trajectories, dtype=torch.float64, device=per_row.device).index_add_(0, traj, excess)


def leave_one_out_centered(returns: Any, groups: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """c(τ) = R(τ) − mean of R over the *other* trajectories of τ's group (prompt).

    The baseline does not depend on τ's own sample, so E[(W − 1)·c] = E[(W − 1)·R] = ΔJ. A trajectory alone in its
    group has no baseline: c = 0 and ``usable`` False (it is left out of the means).

    Args:
        returns: shape (n,), finite.
        groups: shape (n,), any hashable labels (or integer codes).

    Returns:
        (centered (n,) float64, usable (n,) bool).
    """
    r = torch.as_tensor(np.asarray(returns, dtype=np.float64))
    if r.dim() != 1:
        raise ValueError(f"returns must be 1-D, got returns with shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        i = int((~torch.isfinite(r)).nonzero()[0])
        raise ValueError(f"returns must be finite, got returns[{i}]={r[i].item()!r}")
    codes, n_groups = factorize(groups, "groups")
    _check_rows("groups", codes.shape[0], r.shape[0])
    size = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, codes, torch.ones_like(r))[codes]
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, codes, r)[codes]
    usable = size >= 2
    centered = torch.where(usable, r - (total - r) / (size - 1).clamp(min=1), torch.zeros_like(r))
    return centered, usable



def can_bound(centered: torch.Tensor, usable: torch.Tensor) -> bool:
    """Whether the usable (held-out) trajectories can bound an update at all: at least two of them, and at least one
    with c ≠ 0. Where every held-out group is flat (all successes, or all failures) every term (W − 1)·c is 0, so a
    bound would read 0 ± 0 whatever the update did: a guess, not a bound (the caller reports none).

    Args:
        centered: shape (n,), c from :func:`leave_one_out_centered`.
        usable: shape (n,) bool, the trajectories the bound may use.
    """
    keep = torch.as_tensor(usable, dtype=torch.bool)
    return int(keep.sum()) >= 2 and bool(torch.as_tensor(centered)[keep].any())

# ------------------------------------------------------------------------------------------- gain estimates


@dataclass(frozen=True)
class GainEstimate:
    """A mean with its standard error, over ``n`` independent-ish terms (trajectories or episode pairs)."""

    mean: float
    se: float
    n: int

    def lower(self, t: float = DEFAULT_CONFIDENCE_T) -> float:
        return self.mean - t * self.se

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _mean_se(x: torch.Tensor) -> GainEstimate:
    n = int(x.numel())
    if n == 0:
        raise ValueError("no usable terms: every trajectory is alone in its group (a group needs >= 2)")
    se = float(x.std(correction=1) / math.sqrt(n)) if n >= 2 else math.inf
    return GainEstimate(float(x.mean()), se, n)


def paired_gain(returns_after: Any, returns_before: Any) -> GainEstimate:
    """ΔJ from two regenerations of the **same** episodes (same prompts, same sampling seeds): the paired mean
    difference and its standard error. With common random numbers the pairs differ only through the updated agent.

    Args:
        returns_after, returns_before: shape (n,), matched by position (episode i of both regenerations).
    """
    a = torch.as_tensor(np.asarray(returns_after, dtype=np.float64))
    b = torch.as_tensor(np.asarray(returns_before, dtype=np.float64))
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"returns_after and returns_before must be 1-D of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("returns_after and returns_before must be finite")
    return _mean_se(a - b)


def _weights(log_w: torch.Tensor, centered: torch.Tensor, usable: Any, prior_log_w: Any):
    _check_tensor("log_w", log_w, ndim=1)
    _check_same_shape("centered", centered, "log_w", log_w)
    keep = torch.ones_like(log_w, dtype=torch.bool) if usable is None else torch.as_tensor(usable, dtype=torch.bool)
    _check_rows("usable", keep.shape[0], log_w.shape[0])
    prior = torch.zeros_like(log_w, dtype=torch.float64) if prior_log_w is None else prior_log_w.to(torch.float64)
    _check_rows("prior_log_w", prior.shape[0], log_w.shape[0])
    for name, v in (("log_w", log_w), ("centered", centered), ("prior_log_w", prior)):
        if not bool(torch.isfinite(v[keep]).all()):
            raise ValueError(f"{name} must be finite on usable trajectories, got {v[keep].tolist()!r}")
    return (torch.exp(log_w.to(torch.float64))[keep], centered.to(torch.float64)[keep],
            torch.exp(prior)[keep])


def importance_gain(log_w: torch.Tensor, centered: torch.Tensor, usable: Any = None,
                    prior_log_w: torch.Tensor | None = None) -> GainEstimate:
    """ĝ = mean_τ[M·(W − 1)·c]: the unbiased importance-sampled gain of one agent update (see the module docstring).

    Args:
        log_w: shape (n,), log W per trajectory (:func:`trajectory_log_ratio`).
        centered: shape (n,), c per trajectory (:func:`leave_one_out_centered`).
        usable: shape (n,) bool, trajectories to average over (default all).
        prior_log_w: shape (n,), log M of the updates made on the same rollout before this one (stale/happo).
    """
    w, c, m = _weights(log_w, centered, usable, prior_log_w)
    return _mean_se(m * (w - 1.0) * c)


@dataclass(frozen=True)
class UpdateBound:
    """One update's certificate: ``bound`` lower-bounds ΔJ (return units); ``estimate`` is the unbiased ĝ beside it.

    Attributes:
        form: ``"is_lcb"`` or ``"theorem"``.
        bound: the lower confidence bound (point − t·se − penalty).
        point: the bound's point estimate before the confidence term (its expectation is ≤ ΔJ).
        se: the standard error of ``point``.
        penalty: the theorem form's √2·ε·n_j·(n_j − 1)·sqrt(d̂) (0 for ``is_lcb``).
        estimate: ĝ (:func:`importance_gain`) on the same trajectories.
        n: trajectories used.
    """

    form: str
    bound: float
    point: float
    se: float
    penalty: float
    estimate: GainEstimate
    n: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimate"] = self.estimate.to_dict()
        return d


def is_lower_bound(log_w: torch.Tensor, centered: torch.Tensor, usable: Any = None,
                   prior_log_w: torch.Tensor | None = None, clip_ratio: float = DEFAULT_CLIP_RATIO,
                   t: float = DEFAULT_CONFIDENCE_T) -> UpdateBound:
    """B = mean[M·(min(W·c, clip(W, 1±ε)·c) − c)] − t·SE: the default certificate (``is_lcb``).

    Pointwise min(W·c, clip(W)·c) ≤ W·c and M ≥ 0, so E[point] ≤ ΔJ; the t·SE term makes it a one-sided
    confidence bound (t = 1.645: 95 % under a normal approximation). Shapes as :func:`importance_gain`.
    """
    eps = _check_nonneg("clip_ratio", clip_ratio)
    t = _check_nonneg("t", t)
    w, c, m = _weights(log_w, centered, usable, prior_log_w)
    point = _mean_se(m * (torch.minimum(w * c, w.clamp(1 - eps, 1 + eps) * c) - c))
    return UpdateBound("is_lcb", point.lower(t), point.mean, point.se, 0.0, _mean_se(m * (w - 1.0) * c), point.n)


def theorem_constant(return_range: float, agent_turns: float) -> float:
    """c_j = √2·ε·n_j·(n_j − 1) of the turn-based Thm. 3.4 (docs/paper_map.md): ε bounds |R − baseline|, n_j is the
    agent's messages per episode. Only the agent's own earlier turns shift the states of its later turns, and the
    gain is zero at the other agents' turns, hence (n_j − 1) and no dependence on the horizon."""
    eps = _check_nonneg("return_range", return_range)
    n_j = _check_positive("agent_turns", agent_turns)
    return math.sqrt(2.0) * eps * n_j * max(n_j - 1.0, 0.0)


def theorem_bound(ratio_excess: torch.Tensor, log_w: torch.Tensor, centered: torch.Tensor, kl: float,
                  return_range: float, agent_turns: float, usable: Any = None,
                  prior_log_w: torch.Tensor | None = None, t: float = DEFAULT_CONFIDENCE_T) -> UpdateBound:
    """B = mean[M·Σ_m(w_m − 1)·c] − t·SE − √2·ε·n_j·(n_j − 1)·sqrt(max(d̂, 0)) (``theorem``).

    Args:
        ratio_excess: shape (n,), Σ_m (w_m − 1) per trajectory (:func:`trajectory_ratio_excess`).
        log_w, centered, usable, prior_log_w: as :func:`importance_gain` (log_w gives the ĝ reported beside it).
        kl: d̂, the Eq. 11 monitor of the update (mean per-message KL).
        return_range: ε.
        agent_turns: n_j.
    """
    t = _check_nonneg("t", t)
    _check_same_shape("ratio_excess", ratio_excess, "log_w", log_w)
    w, c, m = _weights(log_w, centered, usable, prior_log_w)
    keep = torch.ones_like(log_w, dtype=torch.bool) if usable is None else torch.as_tensor(usable, dtype=torch.bool)
    point = _mean_se(m * ratio_excess.to(torch.float64)[keep] * c)
    penalty = theorem_constant(return_range, agent_turns) * math.sqrt(max(float(kl), 0.0))
    return UpdateBound("theorem", point.lower(t) - penalty, point.mean, point.se, penalty,
                       _mean_se(m * (w - 1.0) * c), point.n)


def update_bound(form: str, **kwargs: Any) -> UpdateBound:
    """Dispatch on ``teamtr.certificate.bound`` (``is_lcb`` | ``theorem``); theorem-only keywords are ignored by
    ``is_lcb`` and the clip ratio by ``theorem``."""
    _check_choice("form", form, CERTIFICATE_BOUNDS)
    if form == "is_lcb":
        return is_lower_bound(kwargs["log_w"], kwargs["centered"], kwargs.get("usable"), kwargs.get("prior_log_w"),
                              kwargs.get("clip_ratio", DEFAULT_CLIP_RATIO), kwargs.get("t", DEFAULT_CONFIDENCE_T))
    return theorem_bound(kwargs["ratio_excess"], kwargs["log_w"], kwargs["centered"], kwargs["kl"],
                         kwargs["return_range"], kwargs["agent_turns"], kwargs.get("usable"),
                         kwargs.get("prior_log_w"), kwargs.get("t", DEFAULT_CONFIDENCE_T))


# ------------------------------------------------------------------------- the line search's surrogate (adv units)


def surrogate_gain(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = DEFAULT_CLIP_RATIO,
    clip_ratio_high: float = DEFAULT_CLIP_RATIO,
    ratio_level: str = "token",
) -> float:
    """L̂ = mean over messages of the clipped surrogate of Eq. 10 minus its value at π_new = π_cur (0 there):
    mean_m tokmean_u[min(ρ_u·Ã_m, clip(ρ_u)·Ã_m)] − Ã_m, on the batch the update trained on (advantage units).

    The line search accepts a step only if L̂ ≥ 0: the step did not make the objective it optimised worse.

    Args:
        old_log_prob, log_prob, response_mask: `(torch.Tensor)` shape (bs, response_length).
        advantages: `(torch.Tensor)` shape (bs,), Ã per message.
        ratio_level: ``"token"`` (per-token ρ_u, verl's vanilla) or ``"message"`` (ρ = exp(Σ_u log r_u)).
    """
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("log_prob", log_prob, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    _check_finite_in_mask("old_log_prob", old_log_prob, mask)
    _check_finite_in_mask("log_prob", log_prob, mask)
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_tensor("advantages", advantages, ndim=1)
    _check_rows("advantages", advantages.shape[0], mask.shape[0])
    lo, hi = _check_nonneg("clip_ratio_low", clip_ratio_low), _check_nonneg("clip_ratio_high", clip_ratio_high)
    rows = mask.any(-1)
    if not bool(rows.any()):
        raise ValueError("response_mask must select at least one token, got an all-False mask")
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64, device=mask.device)
        old = torch.where(mask, old_log_prob.to(torch.float64), zero)
        new = torch.where(mask, log_prob.to(torch.float64), zero)
        rho, _ = _ppo_ratio(old, new, mask, ratio_level)  # the loss's own ratio (same clamps), without a gradient
        a = advantages.to(torch.float64)[:, None]
        per_token = torch.minimum(rho * a, rho.clamp(1 - lo, 1 + hi) * a)
        per_msg = torch.where(mask, per_token, zero).sum(-1) / mask.sum(-1).clamp(min=1)
        return float((per_msg - advantages.to(torch.float64))[rows].mean())


# -------------------------------------------------------------------------------- calibration and rank correlation


def _as_1d_finite(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {name} with shape {arr.shape}")
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite, got {name}[{i}]={float(arr[i])!r}")
    return arr


def calibration_fraction(bounds: Any, gains: Any, gain_se: Any = None, z: float = 1.645) -> float:
    """Fraction of updates (or stages) whose measured gain ΔJ_i is >= its lower bound.

    With ``gain_se`` the measured gain is treated as the estimate it is (a paired gain from sampled episodes): a pair
    counts when its upper limit ``gain + z·gain_se`` reaches the bound. If the bound holds with probability >= 1 − α
    and the gain's upper limit holds with >= 1 − α′, both hold with >= 1 − α − α′ (union bound, whatever their
    dependence), so a 95 % bound against a one-sided 95 % limit (z 1.645) should score >= 0.90. Without it a noisy
    yardstick alone pulls a calibrated bound below its level (an exact gain, as in the simulator, has no such noise).

    Args:
        bounds: shape (n,), the bounds (e.g. ``UpdateBound.bound`` or ``StageCertificate.certificate``).
        gains: shape (n,), the measured ΔJ_i.
        gain_se: shape (n,), the standard errors of the measured gains (>= 0), or None (the gains are exact).
        z: the gain's one-sided normal quantile (1.645: 95 %); used only with ``gain_se``.

    Returns:
        float in [0, 1].
    """
    b = _as_1d_finite("bounds", bounds)
    g = _as_1d_finite("gains", gains)
    if b.shape != g.shape:
        raise ValueError(f"gains must have the shape of bounds {b.shape}, got gains with shape {g.shape}")
    if b.size == 0:
        raise ValueError("bounds must be non-empty, got bounds=[]")
    if gain_se is not None:
        se = _as_1d_finite("gain_se", gain_se)
        if se.shape != g.shape:
            raise ValueError(f"gain_se must have the shape of gains {g.shape}, got gain_se with shape {se.shape}")
        if (se < 0).any():
            i = int(np.flatnonzero(se < 0)[0])
            raise ValueError(f"gain_se must be >= 0, got gain_se[{i}]={float(se[i])!r}")
        g = g + _check_positive("z", z) * se
    return float(np.mean(g >= b))


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (as scipy.stats.rankdata 'average'), vectorized.

    Args:
        x: shape (n,), finite values.

    Returns:
        `(np.ndarray)` float64 shape (n,).
    """
    a = _as_1d_finite("x", x)
    order = np.argsort(a, kind="mergesort")
    _, inv, counts = np.unique(a[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based last position of each tie block
    avg = ends - (counts - 1) / 2.0
    ranks = np.empty_like(a)
    ranks[order] = avg[inv.reshape(-1)]
    return ranks


def spearman_rank_correlation(x: Any, y: Any) -> float:
    """Spearman's ρ between per-update bounds and measured gains (paper Fig. 4b: ≈ 0.73), numpy only.

    Pearson correlation of the average ranks (ties handled as in scipy.stats.spearmanr). Returns NaN when either
    input is constant (the correlation is undefined), as scipy does.

    Args:
        x, y: shape (n,), n >= 2, finite.

    Returns:
        float in [−1, 1], or NaN.
    """
    a = _as_1d_finite("x", x)
    b = _as_1d_finite("y", y)
    if a.shape != b.shape:
        raise ValueError(f"y must have the shape of x {a.shape}, got y with shape {b.shape}")
    if a.size < 2:
        raise ValueError(f"x must hold at least 2 values, got x of length {a.size}")
    ra = average_ranks(a) - (a.size + 1) / 2.0
    rb = average_ranks(b) - (b.size + 1) / 2.0
    den = math.sqrt(float(np.dot(ra, ra)) * float(np.dot(rb, rb)))
    if den == 0.0:
        return float("nan")
    return float(np.clip(np.dot(ra, rb) / den, -1.0, 1.0))


def cumulative_spearman(bounds: Any, gains: Any) -> float:
    """Spearman's ρ between the cumulative sums of bounds and of gains (the paper's Fig. 4b plots these series)."""
    b = _as_1d_finite("bounds", bounds)
    g = _as_1d_finite("gains", gains)
    return spearman_rank_correlation(np.cumsum(b), np.cumsum(g))


__all__ = [
    "trajectory_log_ratio",
    "trajectory_ratio_excess",
    "leave_one_out_centered",
    "can_bound",
    "GainEstimate",
    "paired_gain",
    "importance_gain",
    "UpdateBound",
    "is_lower_bound",
    "theorem_constant",
    "theorem_bound",
    "update_bound",
    "surrogate_gain",
    "calibration_fraction",
    "average_ranks",
    "spearman_rank_correlation",
    "cumulative_spearman",
]
