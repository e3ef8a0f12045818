"""The HAPPO importance factor (the ``happo`` schedule: importance weighting instead of resampling).

HAPPO (Kuba et al. 2022) updates agents in sequence on one batch and weights agent i's clipped surrogate by
M = Π_{k<i} π_new^{(k)}/π_old^{(k)} of the agents updated before it. In a turn-based team with sequence-level returns
the joint action is the whole trajectory, so a trajectory's factor is the product of the trajectory ratios W_k of the
earlier-updated agents (:func:`teamtr_verl.algos.trajectory_log_ratio`), clipped for stability. Since M > 0,
``M·min(ρÃ, clip(ρ)Ã) = min(ρ·(MÃ), clip(ρ)·(MÃ))``: the trainer multiplies the advantages by M.
"""

from __future__ import annotations

import torch

from teamtr_verl.algos.checks import _check_positive, _check_tensor
from teamtr_verl.defaults import DEFAULT_HAPPO_FACTOR_CLIP


def happo_factor(prior_log_w: torch.Tensor,
                 clip_range: tuple[float, float] | None = DEFAULT_HAPPO_FACTOR_CLIP) -> torch.Tensor:
    """M = clip(exp(Σ_{k<i} log W_k), *clip_range) per trajectory.

    Args:
        prior_log_w: `(torch.Tensor)` shape (n_traj,), the summed log trajectory ratios of the earlier updates.
        clip_range: (low, high) with 0 < low <= 1 <= high, or None for no clipping (HARL's default).

    Returns:
        `(torch.Tensor)` float64 shape (n_traj,).
    """
    _check_tensor("prior_log_w", prior_log_w, ndim=1)
    if not bool(torch.isfinite(prior_log_w).all()):
        raise ValueError(f"prior_log_w must be finite, got prior_log_w={prior_log_w.tolist()!r}")
    factor = torch.exp(prior_log_w.detach().to(torch.float64))
    if clip_range is None:
        return factor
    lo, hi = _check_positive("clip_range[0]", clip_range[0]), _check_positive("clip_range[1]", clip_range[1])
    if not lo <= 1.0 <= hi:
        raise ValueError(f"clip_range must satisfy 0 < low <= 1 <= high, got clip_range={tuple(clip_range)!r}")
    return factor.clamp(lo, hi)
