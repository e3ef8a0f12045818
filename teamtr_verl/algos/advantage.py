"""Eq. 9: the bounded group-normalized advantage of team trajectories, and verl's estimator ``teamtr``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from teamtr_verl.algos.checks import (
    _as_mask,
    _cfg_get,
    _check_choice,
    _check_finite_in_mask,
    _check_nonneg,
    _check_positive,
    _check_rows,
    _check_tensor,
    _first_set,
    factorize,
)
from teamtr_verl.defaults import (
    DEFAULT_A_CLIP,
    DEFAULT_NORM_EPS,
    TRAJECTORY_RETURN_MODES,
)


@dataclass(frozen=True)
class GroupAdvantage:
    """Result of :func:`bounded_group_advantage`, one entry per trajectory.

    Attributes:
        advantage: (n,) Ã = clip(z, −A_clip, A_clip), the bounded advantage of Eq. 9.
        normalized: (n,) z = (R − μ_g)/σ_g before clipping (used for ζ_clip).
        group_size: (n,) number of trajectories G in each trajectory's group.
        group_std: (n,) σ_g = sqrt(pop_var_g + ε_norm) of each trajectory's group.
    """

    advantage: torch.Tensor
    normalized: torch.Tensor
    group_size: torch.Tensor
    group_std: torch.Tensor


def bounded_group_advantage(
    returns: torch.Tensor,
    group_index: Any,
    a_clip: float = DEFAULT_A_CLIP,
    norm_eps: float = DEFAULT_NORM_EPS,
) -> GroupAdvantage:
    """Bounded group-normalized advantage of team trajectories (Eq. 9), vectorized over groups.

    ``Ã_g = clip((R_g − μ)/σ, −A_clip, A_clip)`` with ``μ = mean_g R_g`` and ``σ = sqrt(mean_g (R_g − μ)² + ε_norm)``
    over the trajectories of one group (one prompt): the *population* std, ε_norm inside the square root.
    A group of one trajectory, or a group whose returns are all equal, gets advantage exactly 0.

    Args:
        returns: `(torch.Tensor)`
            shape (n,), the sequence-level return R(τ) of each team trajectory.
        group_index: `(np.ndarray | list | torch.Tensor)`
            shape (n,), group (prompt) id of each trajectory.
        a_clip: `(float)` A_clip > 0.
        norm_eps: `(float)` ε_norm >= 0.

    Returns:
        :class:`GroupAdvantage` with (n,) tensors in the dtype of ``returns`` (float32 for integer returns).
    """
    a_clip = _check_positive("a_clip", a_clip)
    norm_eps = _check_nonneg("norm_eps", norm_eps)
    _check_tensor("returns", returns, ndim=1)
    n = returns.shape[0]
    codes, n_groups = factorize(group_index, "group_index")
    _check_rows("group_index", codes.shape[0], n)
    if n == 0:
        raise ValueError("returns must hold at least one trajectory, got returns with shape (0,)")
    if not bool(torch.isfinite(returns).all()):
        i = int((~torch.isfinite(returns)).nonzero()[0])
        raise ValueError(f"returns must be finite, got returns[{i}]={returns[i].item()!r}")
    out_dtype = returns.dtype if returns.is_floating_point() else torch.float32
    codes = codes.to(returns.device)
    r = returns.to(torch.float64)  # float64 statistics: exact zeros for equal returns, stable two-pass variance
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, codes, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, codes, r) / count
    centered = r - mean[codes]
    var = torch.zeros_like(count).index_add_(0, codes, centered * centered) / count
    std = torch.sqrt(var + norm_eps)
    # A group whose returns are all equal (including a singleton) has no signal: advantage exactly 0, never NaN
    # (with ε_norm = 0 the division would be 0/0; with ε_norm > 0 float rounding could leave ±1e-13 residues).
    gmax = torch.full_like(count, -math.inf).scatter_reduce(0, codes, r, reduce="amax")
    gmin = torch.full_like(count, math.inf).scatter_reduce(0, codes, r, reduce="amin")
    flat = (gmax == gmin)[codes]
    z = torch.where(flat, torch.zeros_like(r), centered / torch.where(flat, torch.ones_like(r), std[codes]))
    adv = z.clamp(-a_clip, a_clip)
    return GroupAdvantage(
        advantage=adv.to(out_dtype),
        normalized=z.to(out_dtype),
        group_size=count[codes].to(torch.long),
        group_std=std[codes].to(out_dtype),
    )


@dataclass(frozen=True)
class RowAdvantage:
    """Result of :func:`teamtr_row_advantage`, one entry per row (message).

    Attributes:
        advantage: (bs,) Ã of the row's trajectory (Eq. 9).
        normalized: (bs,) z of the row's trajectory, unclipped.
        group_size: (bs,) number of trajectories G in the row's group.
        group_std: (bs,) σ of the row's group, in return units.
        trajectory_return: (bs,) R(τ) of the row's trajectory.
        trajectory: (bs,) contiguous trajectory code of the row (for :func:`happo_factor_update`).
        num_trajectories: number of distinct trajectories.
    """

    advantage: torch.Tensor
    normalized: torch.Tensor
    group_size: torch.Tensor
    group_std: torch.Tensor
    trajectory_return: torch.Tensor
    trajectory: torch.Tensor
    num_trajectories: int


def teamtr_row_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    trajectory_index: Any = None,
    a_clip: float = DEFAULT_A_CLIP,
    norm_eps: float = DEFAULT_NORM_EPS,
    trajectory_return: str = "sum",
) -> RowAdvantage:
    """Eq. 9 on verl rows: rows are messages, several rows of one trajectory share that trajectory's advantage.

    The return of a trajectory is computed from its rows' rewards on masked tokens: ``"sum"`` (default; right when
    the verifier's reward sits on one row, e.g. the last message, or is split over rows) or ``"last"`` (the reward of
    the trajectory's last row in batch order; use it when every row carries a copy of the trajectory reward).
    Groups are formed over *trajectories*, not rows: a trajectory with 3 messages counts once in μ and σ.

    Args:
        token_level_rewards: `(torch.Tensor)`
            shape (bs, response_length).
        response_mask: `(torch.Tensor)`
            shape (bs, response_length); rewards outside it are ignored.
        index: `(np.ndarray)`
            shape (bs,), prompt uid of each row (the group key).
        trajectory_index: `(np.ndarray | None)`
            shape (bs,), team-trajectory id of each row. None: every row is its own trajectory (stock single-agent verl:
            one agent = one message per trajectory).
        a_clip, norm_eps: see :func:`bounded_group_advantage`.
        trajectory_return: ``"sum"`` or ``"last"``.

    Returns:
        :class:`RowAdvantage`.
    """
    _check_tensor("token_level_rewards", token_level_rewards, ndim=2)
    mask = _as_mask("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    _check_choice("trajectory_return", trajectory_return, TRAJECTORY_RETURN_MODES)
    bs = token_level_rewards.shape[0]
    if index is None:
        raise ValueError(
            "index (the prompt uid of each row, verl's non_tensor_batch['uid']) is required, got index=None"
        )
    g_codes, _ = factorize(index, "index")
    _check_rows("index", g_codes.shape[0], bs)
    _check_finite_in_mask("token_level_rewards", token_level_rewards, mask)
    device = token_level_rewards.device
    row_score = torch.where(mask, token_level_rewards, 0.0).sum(-1)  # (bs,)
    if trajectory_index is None:
        t_codes, n_traj = torch.arange(bs), bs
    else:
        t_codes, n_traj = factorize(trajectory_index, "trajectory_index")
        _check_rows("trajectory_index", t_codes.shape[0], bs)
    t_codes = t_codes.to(device)
    g_codes = g_codes.to(device)
    # the group of a trajectory: every row of one trajectory must carry the same prompt uid
    traj_group = torch.zeros(n_traj, dtype=torch.long, device=device).scatter_(0, t_codes, g_codes)
    mismatch = traj_group[t_codes] != g_codes
    if bool(mismatch.any()):
        i = int(mismatch.nonzero()[0])
        t_label = np.asarray(trajectory_index, dtype=object)[i]
        raise ValueError(
            f"rows of one trajectory must share one index (prompt uid), got trajectory_index[{i}]={t_label!r} with "
            f"index[{i}]={np.asarray(index, dtype=object)[i]!r} while another row of that trajectory has another index"
        )
    if trajectory_return == "sum":
        traj_ret = torch.zeros(n_traj, dtype=torch.float64, device=device).index_add_(
            0, t_codes, row_score.to(torch.float64)
        )
    else:  # "last": the row with the largest batch position of each trajectory
        pos = torch.arange(bs, device=device)
        last = torch.full((n_traj,), -1, dtype=torch.long, device=device).scatter_reduce(0, t_codes, pos, "amax")
        traj_ret = row_score.to(torch.float64)[last]
    ga = bounded_group_advantage(traj_ret, traj_group, a_clip=a_clip, norm_eps=norm_eps)
    dtype = token_level_rewards.dtype if token_level_rewards.is_floating_point() else torch.float32
    return RowAdvantage(
        advantage=ga.advantage[t_codes].to(dtype),
        normalized=ga.normalized[t_codes].to(dtype),
        group_size=ga.group_size[t_codes],
        group_std=ga.group_std[t_codes].to(dtype),
        trajectory_return=traj_ret[t_codes].to(dtype),
        trajectory=t_codes,
        num_trajectories=n_traj,
    )


def broadcast_to_tokens(row_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per row to every masked token of the row; 0 elsewhere.

    Args:
        row_values: `(torch.Tensor)` shape (bs,).
        response_mask: `(torch.Tensor)` shape (bs, response_length).

    Returns:
        `(torch.Tensor)` shape (bs, response_length), dtype of ``row_values``.
    """
    _check_tensor("row_values", row_values, ndim=1)
    _check_tensor("response_mask", response_mask, ndim=2)
    _check_rows("row_values", row_values.shape[0], response_mask.shape[0])
    return torch.where(response_mask.bool(), row_values.unsqueeze(-1), torch.zeros((), dtype=row_values.dtype))


def compute_teamtr_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    trajectory_index: Any = None,
    a_clip: float = DEFAULT_A_CLIP,
    norm_eps: float = DEFAULT_NORM_EPS,
    trajectory_return: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 broadcast to tokens: the trajectory's Ã on every token of every message of that trajectory.

    Args: see :func:`teamtr_row_advantage`.

    Returns:
        advantages: `(torch.Tensor)` shape (bs, response_length).
        returns: `(torch.Tensor)` shape (bs, response_length); equal to ``advantages``, as verl's outcome-only
            estimators (GRPO, RLOO) return.
    """
    with torch.no_grad():
        ra = teamtr_row_advantage(
            token_level_rewards,
            response_mask,
            index,
            trajectory_index=trajectory_index,
            a_clip=a_clip,
            norm_eps=norm_eps,
            trajectory_return=trajectory_return,
        )
        adv = broadcast_to_tokens(ra.advantage, response_mask)
    return adv, adv


# keyword arguments verl's compute_advantage may pass to any registered estimator, and which we do not use
_VERL_ADV_EXTRAS = frozenset(
    {"reward_baselines", "non_tensor_batch", "batch", "sum_pi_squared", "old_log_probs", "rollout_is_weights"}
)
_TEAMTR_ADV_OPTIONS = ("a_clip", "norm_eps", "trajectory_return", "trajectory_index")


def compute_teamtr_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``teamtr`` (``algorithm.adv_estimator=teamtr``): Eq. 9, see
    :func:`compute_teamtr_outcome_advantage`.

    Called by ``verl.trainer.ppo.ray_trainer.compute_advantage`` as ``fn(token_level_rewards=..., response_mask=...,
    config=algorithm_config, index=uid[, reward_baselines=...])``. Options are read from keyword arguments first,
    then from ``config`` (an ``AlgoConfig``, DictConfig or dict; ``AlgoConfig`` rejects unknown keys, so a DictConfig
    ``+algorithm.a_clip=...`` or a ``functools.partial`` is the way to set them), then the defaults:

        a_clip (5.0), norm_eps (1e-6), trajectory_return ("sum"), trajectory_index (None: one row per trajectory).

    Args:
        token_level_rewards: `(torch.Tensor)` shape (bs, response_length).
        response_mask: `(torch.Tensor)` shape (bs, response_length).
        index: `(np.ndarray)` shape (bs,), prompt uids.
        config: `(AlgoConfig | DictConfig | dict | None)` the ``algorithm`` config.

    Returns:
        advantages, returns: `(torch.Tensor)` shape (bs, response_length) each.
    """
    unknown = sorted(set(kwargs) - _VERL_ADV_EXTRAS - set(_TEAMTR_ADV_OPTIONS))
    if unknown:
        raise TypeError(f"compute_teamtr_advantage got unexpected keyword arguments {unknown}")
    opts = {k: _first_set(kwargs.get(k), _cfg_get(config, k), default=None) for k in _TEAMTR_ADV_OPTIONS}
    return compute_teamtr_outcome_advantage(
        token_level_rewards,
        response_mask,
        index,
        trajectory_index=opts["trajectory_index"],
        a_clip=_first_set(opts["a_clip"], default=DEFAULT_A_CLIP),
        norm_eps=_first_set(opts["norm_eps"], default=DEFAULT_NORM_EPS),
        trajectory_return=_first_set(opts["trajectory_return"], default="sum"),
    )
