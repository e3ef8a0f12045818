"""TeamTR algorithm core: pure tensor math, torch/numpy only (no verl, Ray or vLLM import).

Equation numbers follow the TeamTR paper (ICML 2026) as summarised in ``docs/paper_map.md``, which also records every
choice made where the paper is silent. Shapes follow verl's ``core_algos`` conventions: ``(bs, response_length)``
tensors hold one row per *message* (one agent's response in one turn of one team trajectory).

Contents
  * loss aggregation with verl's ``loss_agg_mode`` semantics ........ :func:`aggregate_loss`
  * Eq. 9  bounded group-normalized advantage ...................... :func:`bounded_group_advantage`,
    :func:`teamtr_row_advantage`, :func:`compute_teamtr_outcome_advantage`, verl adapter
    :func:`compute_teamtr_advantage` (estimator ``teamtr``)
  * Eq. 11 token-decomposed reverse-KL monitor ..................... :func:`token_kl`, :func:`token_kl_monitor`
  * Eq. 10 trust-region policy loss ................................ :func:`teamtr_policy_loss`, verl adapter
    :func:`compute_teamtr_policy_loss` (policy loss ``teamtr``)
  * per-agent β controller and δ enforcement ....................... :class:`BetaState`, :func:`adapt_beta`,
    :func:`trust_region_decision`
  * Thm. 3.4/3.6 certificate proxy ................................. :func:`surrogate_terms`, :class:`UpdateRecord`,
    :func:`update_bound`, :func:`stage_certificate`, :func:`calibration_fraction`,
    :func:`spearman_rank_correlation`, :func:`calibration_report`
  * HAPPO importance factor (``happo`` baseline schedule) .......... :func:`happo_factor_update`

Bad input (mismatched shapes, an empty agent mask, δ ≤ 0, A_clip ≤ 0, NaN/inf in returns or log-probs) raises a
``ValueError`` that names the argument and the offending value. Values at masked positions are never read: padding
may hold anything, including NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_A_CLIP",
    "DEFAULT_NORM_EPS",
    "DEFAULT_BETA",
    "DEFAULT_CLIP_RATIO",
    "DEFAULT_CLIP_RATIO_C",
    "DEFAULT_KL_ESTIMATOR",
    "DEFAULT_KL_REDUCTION",
    "DEFAULT_RATIO_LEVEL",
    "LOSS_AGG_MODES",
    "factorize",
    "aggregate_loss",
    "GroupAdvantage",
    "bounded_group_advantage",
    "RowAdvantage",
    "teamtr_row_advantage",
    "broadcast_to_tokens",
    "compute_teamtr_outcome_advantage",
    "compute_teamtr_advantage",
    "token_kl",
    "message_log_ratio",
    "token_kl_monitor",
    "teamtr_policy_loss",
    "compute_teamtr_policy_loss",
    "BetaState",
    "adapt_beta",
    "TrustRegionDecision",
    "trust_region_decision",
    "SurrogateTerms",
    "surrogate_terms",
    "UpdateRecord",
    "certificate_constant",
    "horizon_multiplier",
    "UpdateBound",
    "update_bound",
    "StageCertificate",
    "stage_certificate",
    "calibration_fraction",
    "average_ranks",
    "spearman_rank_correlation",
    "calibration_report",
    "happo_factor_update",
]

# ----------------------------------------------------------------------------------------------------------------
# Defaults where the paper is silent (each is an option; the reasons are in docs/paper_map.md)
# ----------------------------------------------------------------------------------------------------------------
DEFAULT_A_CLIP = 5.0  # advantage clip A_clip of Eq. 9 (the predecessor SAT code uses 5.0)
DEFAULT_NORM_EPS = 1e-6  # ε_norm inside the square root of Eq. 9
DEFAULT_BETA = 0.1  # initial β of Eq. 10
DEFAULT_CLIP_RATIO = 0.2  # PPO ε when no actor config is given (verl's default)
DEFAULT_CLIP_RATIO_C = 3.0  # dual-clip bound, as verl's vanilla loss
DEFAULT_KL_ESTIMATOR = "k3"  # non-negative, low variance; "k1" is Eq. 11 verbatim
DEFAULT_KL_REDUCTION = "message_sum"  # Eq. 11: sum over a message's tokens, mean over messages
DEFAULT_RATIO_LEVEL = "token"  # per-token ratio as verl's vanilla loss; "message" is the paper's product ratio
DEFAULT_MAX_BACKTRACKS = 5
DEFAULT_BACKTRACK_FACTOR = 1.5
DEFAULT_HAPPO_FACTOR_CLIP = (0.5, 2.0)

# Log-ratio clamps, for numerical stability only (documented where used):
TOKEN_LOG_RATIO_CLAMP = 20.0  # verl's vanilla loss and k3 clamp the per-token log-ratio to ±20
MESSAGE_LOG_RATIO_CLAMP = 10.0  # verl's gspo clamps the sequence log-ratio at 10; we clamp to ±10

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k3")
KL_REDUCTIONS = ("message_sum", "token_mean", "none")
RATIO_LEVELS = ("token", "message")
TRAJECTORY_RETURN_MODES = ("sum", "last")
CERTIFICATE_FORMS = ("finite_horizon", "discounted")
OCCUPANCY_MODES = ("intermediate", "stale")

# ----------------------------------------------------------------------------------------------------------------
# Validation helpers: every error names the argument and the offending value
# ----------------------------------------------------------------------------------------------------------------


def _as_float(name: str, value: Any, expected: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {expected}, got {name}={value!r}") from None


def _check_positive(name: str, value: Any) -> float:
    v = _as_float(name, value, "a number > 0")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be > 0, got {name}={value!r}")
    return v


def _check_nonneg(name: str, value: Any) -> float:
    v = _as_float(name, value, "a number >= 0")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value!r}")
    return v


def _check_finite_scalar(name: str, value: Any) -> float:
    v = _as_float(name, value, "a finite number")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {name}={value!r}")
    return v


def _check_kl_value(name: str, value: Any) -> float:
    """A measured KL: any number but NaN or −inf (+inf is a legitimate, far out-of-region measurement)."""
    v = _as_float(name, value, "a number")
    if math.isnan(v) or v == -math.inf:
        raise ValueError(f"{name} must not be NaN or -inf, got {name}={value!r}")
    return v


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")
    return value


def _check_tensor(name: str, value: Any, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {name} of type {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {name} with shape {tuple(value.shape)}")
    return value


def _check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _check_tensor(name, value)
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {name} with shape {tuple(value.shape)}"
        )


def _as_mask(name: str, mask: Any, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Boolean copy of a 0/1 (or bool) mask with the shape of ``ref``."""
    _check_same_shape(name, mask, ref_name, ref)
    return mask.bool()


def _check_nonempty_mask(name: str, mask: torch.Tensor) -> None:
    if not bool(mask.any()):
        raise ValueError(
            f"{name} selects no token (empty agent mask), got {name}.sum()=0 over shape {tuple(mask.shape)}"
        )


def _check_finite_in_mask(name: str, value: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN/inf at a position selected by ``mask`` (positions outside are never read).

    Fast path: the masked sum is finite iff no masked entry is NaN/inf (barring a float overflow of the sum, which
    the exact element-wise check below then clears); only a non-finite sum pays for locating the culprit.
    """
    if bool(torch.isfinite(torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device)).sum())):
        return
    bad = mask & ~torch.isfinite(value)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite on masked tokens, got {name}{idx}={value[tuple(idx)].item()!r}")


def _check_rows(name: str, n: int, bs: int) -> None:
    if n != bs:
        raise ValueError(f"{name} must have one entry per row (bs={bs}), got {name} of length {n}")


def factorize(labels: Any, name: str = "labels") -> tuple[torch.Tensor, int]:
    """Map arbitrary labels to contiguous integer codes, vectorized.

    Args:
        labels: `(np.ndarray | list | torch.Tensor)`
            shape (n,). Any hashable, sortable labels (verl's ``uid`` strings, ints...).
        name: argument name used in error messages.

    Returns:
        codes: `(torch.LongTensor)`
            shape (n,), values in ``[0, n_unique)``; equal labels get equal codes.
        n_unique: `(int)`
    """
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got {name} with shape {tuple(labels.shape)}")
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{name} must not contain NaN/inf, got {name}={labels.tolist()!r}")
        uniq, codes = torch.unique(labels, return_inverse=True)
        return codes.long(), int(uniq.numel())
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {name} with shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} must not contain NaN/inf, got {name}={arr.tolist()!r}")
    try:
        uniq, codes = np.unique(arr, return_inverse=True)
        n_unique = len(uniq)
    except TypeError:  # unorderable mixture of label types: fall back to first-seen order
        table: dict[Any, int] = {}
        codes = np.fromiter((table.setdefault(x, len(table)) for x in arr.tolist()), dtype=np.int64, count=len(arr))
        n_unique = len(table)
    return torch.as_tensor(np.asarray(codes, dtype=np.int64).reshape(-1)), int(n_unique)


def _cfg_get(cfg: Any, key: str) -> Any:
    """Duck-typed config lookup (dict, DictConfig, verl BaseConfig, plain object); None when absent."""
    if cfg is None:
        return None
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - e.g. a struct DictConfig refusing an unknown key
            return None
    return getattr(cfg, key, None)


def _first_set(*values: Any, default: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return default


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregation: verl's agg_loss semantics, reimplemented so that this module does not import verl
# ----------------------------------------------------------------------------------------------------------------


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    # as verl.utils.torch_functional.masked_sum: values outside the mask (even NaN) do not contaminate the sum
    valid = torch.where(mask.bool(), values, 0.0)
    return (valid * mask).sum(dim=axis) if axis is not None else (valid * mask).sum()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_sum(values, mask) / (mask.sum() + 1e-8)


def aggregate_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """Aggregate a token loss matrix into a scalar, exactly as ``verl.trainer.ppo.core_algos.agg_loss`` (0.9.1).

    Args:
        loss_mat: `(torch.Tensor)`
            shape (bs, response_length), micro-batch loss matrix.
        loss_mask: `(torch.Tensor)`
            shape (bs, response_length), 0/1 or bool.
        loss_agg_mode: `(str)`
            one of ``token-mean`` (Σ masked / batch_num_tokens), ``token-sum``, ``seq-mean-token-sum`` (per-row
            token sum, mean over non-empty rows or over ``global_batch_size``), ``seq-mean-token-mean`` (per-row token
            mean, then row mean), ``seq-mean-token-sum-norm`` (``seq-mean-token-sum`` / ``loss_scale_factor``,
            default response_length).
        dp_size: data-parallel size; the result is multiplied by it (ranks' gradients are averaged).
        batch_num_tokens: valid tokens in the *global* batch (required for ``token-mean`` when dp_size > 1).
        global_batch_size: rows in the *global* batch (required for the ``seq-mean-*`` modes when dp_size > 1).
        loss_scale_factor: divisor of ``seq-mean-token-sum-norm``.

    Returns:
        loss: `(torch.Tensor)` scalar.
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError(f"batch_num_tokens is required when dp_size > 1, got dp_size={dp_size}")
            batch_num_tokens = loss_mask.sum()
        loss = _masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    elif loss_agg_mode == "token-sum":
        loss = _masked_sum(loss_mat, loss_mask) * dp_size
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(torch.where(loss_mask.bool(), loss_mat, 0.0) * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError(f"global_batch_size is required when dp_size > 1, got dp_size={dp_size}")
            global_batch_size = seq_mask.sum()
        loss = _masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            if loss_scale_factor is None:
                loss_scale_factor = loss_mask.shape[-1]
            loss = loss / loss_scale_factor
    elif loss_agg_mode == "seq-mean-token-mean":
        tokens = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(torch.where(loss_mask.bool(), loss_mat, 0.0) * loss_mask, dim=-1) / (tokens + 1e-8)
        seq_mask = (tokens > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError(f"global_batch_size is required when dp_size > 1, got dp_size={dp_size}")
            global_batch_size = seq_mask.sum()
        loss = _masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    else:
        raise ValueError(f"loss_agg_mode must be one of {list(LOSS_AGG_MODES)}, got loss_agg_mode={loss_agg_mode!r}")
    return loss


# ----------------------------------------------------------------------------------------------------------------
# Eq. 9: bounded group-normalized advantage
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Eq. 11 / Lemma 3.2: token-decomposed reverse-KL monitor KL(π_cur ‖ π_new) on rollouts sampled from π_cur
# ----------------------------------------------------------------------------------------------------------------


def token_kl(
    old_log_prob: torch.Tensor, new_log_prob: torch.Tensor, estimator: str = DEFAULT_KL_ESTIMATOR
) -> torch.Tensor:
    """Per-token estimate of KL(π_cur ‖ π_new) at tokens sampled from π_cur; no masking, no clamping.

    With ``log r = new_log_prob − old_log_prob`` (r = π_new/π_cur):
      * ``k1``: ``−log r`` (Eq. 11 verbatim; unbiased, can be negative per token);
      * ``k3``: ``r − 1 − log r`` (unbiased, >= 0 per token, lower variance; Schulman's k3, verl's ``low_var_kl``
        with the roles of the two policies as in KL(π_cur ‖ π_new)).
    Both have expectation KL(π_cur ‖ π_new) under π_cur, and, since the samples come from the fixed π_cur, both
    have the expected gradient ∇_θ KL(π_cur ‖ π_θ) w.r.t. the new policy's parameters.

    Args:
        old_log_prob: `(torch.Tensor)` shape (bs, response_length), log π_cur of the sampled tokens.
        new_log_prob: `(torch.Tensor)` shape (bs, response_length), log π_new of the same tokens.
        estimator: ``"k1"`` or ``"k3"``.

    Returns:
        `(torch.Tensor)` shape (bs, response_length).
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    log_r = new_log_prob - old_log_prob
    if estimator == "k1":
        return -log_r
    return torch.expm1(log_r) - log_r


def _message_codes(message_index: Any, bs: int, device: torch.device) -> tuple[torch.Tensor, int]:
    if message_index is None:
        return torch.arange(bs, device=device), bs
    codes, n = factorize(message_index, "message_index")
    _check_rows("message_index", codes.shape[0], bs)
    return codes.to(device), n


def message_log_ratio(
    old_log_prob: torch.Tensor,
    new_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    message_index: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Message-level log importance ratio ``log w(m) = Σ_{u∈m} (log π_new − log π_cur)``, unclamped.

    Args:
        old_log_prob, new_log_prob, response_mask: `(torch.Tensor)` shape (bs, response_length).
        message_index: `(array | None)` shape (bs,); rows with equal ids form one message. None: one row = one message.

    Returns:
        log_w: `(torch.Tensor)` shape (n_messages,), in the dtype of ``new_log_prob``.
        tokens: `(torch.Tensor)` shape (n_messages,), number of masked tokens of each message.
    """
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("new_log_prob", new_log_prob, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    codes, n = _message_codes(message_index, old_log_prob.shape[0], old_log_prob.device)
    row = _masked_sum(new_log_prob - old_log_prob, mask, axis=-1)
    log_w = torch.zeros(n, dtype=row.dtype, device=row.device).index_add(0, codes, row)
    tokens = torch.zeros(n, dtype=torch.long, device=row.device).index_add_(0, codes, mask.sum(-1))
    return log_w, tokens


def token_kl_monitor(
    old_log_prob: torch.Tensor,
    new_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    message_index: Any = None,
    estimator: str = DEFAULT_KL_ESTIMATOR,
    reduction: str = DEFAULT_KL_REDUCTION,
) -> torch.Tensor:
    """Token-decomposed reverse-KL monitor d̂ = KL(π_cur ‖ π_new) of one agent (Lemma 3.2, Eq. 11).

    Computed on the agent's own tokens (``response_mask``) in rollouts sampled from π_cur, in float64, raw: no
    clamping (a negative k1 value is reported as is).

      * ``reduction="message_sum"`` (Eq. 11): per message, the sum of the per-token estimates over its tokens
        (Lemma 3.2: a message-level KL is exactly the sum of per-token KLs); then the mean over the agent's messages
        (messages with no masked token are not the agent's and are skipped).
      * ``reduction="token_mean"``: the mean over all the agent's tokens (a per-token KL; δ then means something
        else entirely for long messages).
      * ``reduction="none"``: the per-message sums, shape (n_messages,) (empty messages included as 0).

    Args:
        old_log_prob: `(torch.Tensor)` shape (bs, response_length), log π_cur of the sampled tokens.
        new_log_prob: `(torch.Tensor)` shape (bs, response_length), log π_new of the same tokens.
        response_mask: `(torch.Tensor)` shape (bs, response_length), the agent's tokens only.
        message_index: `(array | None)` shape (bs,): rows with equal ids are one message. None: one row = one message.
        estimator: ``"k3"`` (default) or ``"k1"``, see :func:`token_kl`.
        reduction: ``"message_sum"`` (default), ``"token_mean"`` or ``"none"``.

    Returns:
        `(torch.Tensor)` float64 scalar (differentiable w.r.t. ``new_log_prob``), or (n_messages,) for ``"none"``.
    """
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("new_log_prob", new_log_prob, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_choice("reduction", reduction, KL_REDUCTIONS)
    _check_nonempty_mask("response_mask", mask)
    _check_finite_in_mask("old_log_prob", old_log_prob, mask)
    _check_finite_in_mask("new_log_prob", new_log_prob, mask)
    return _kl_monitor_unchecked(old_log_prob, new_log_prob, mask, message_index, estimator, reduction)


def _kl_monitor_unchecked(
    old_log_prob: torch.Tensor,
    new_log_prob: torch.Tensor,
    mask: torch.Tensor,
    message_index: Any,
    estimator: str,
    reduction: str,
) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float64, device=old_log_prob.device)
    log_r = torch.where(mask, new_log_prob.to(torch.float64) - old_log_prob.to(torch.float64), zero)
    k = token_kl(torch.zeros((), dtype=torch.float64, device=log_r.device), log_r, estimator)  # 0 where masked
    if reduction == "token_mean":
        return k.sum() / mask.sum()
    codes, n = _message_codes(message_index, k.shape[0], k.device)
    per_msg = torch.zeros(n, dtype=torch.float64, device=k.device).index_add(0, codes, k.sum(-1))
    if reduction == "none":
        return per_msg
    tokens = torch.zeros(n, dtype=torch.long, device=k.device).index_add_(0, codes, mask.sum(-1))
    is_msg = tokens > 0
    return per_msg[is_msg].sum() / is_msg.sum()


# ----------------------------------------------------------------------------------------------------------------
# Eq. 10: trust-region policy loss
# ----------------------------------------------------------------------------------------------------------------


def _ppo_ratio(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor, ratio_level: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio (bs, T), clamped per-token negative approx KL (bs, T)) for the given ratio level; inputs pre-masked."""
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-TOKEN_LOG_RATIO_CLAMP, max=TOKEN_LOG_RATIO_CLAMP)
    if ratio_level == "token":
        return torch.exp(neg_kl), neg_kl
    # message level: w(m) = Π_u π_new/π_cur = exp(Σ_u log r_u); the summed log-ratio is clamped to ±10 for numerical
    # stability (as verl's gspo clamps its sequence log-ratio), which zeroes the gradient of messages beyond it.
    log_w = _masked_sum(log_prob - old_log_prob, mask, axis=-1)
    log_w = torch.clamp(log_w, min=-MESSAGE_LOG_RATIO_CLAMP, max=MESSAGE_LOG_RATIO_CLAMP)
    return torch.exp(log_w).unsqueeze(-1).expand_as(log_prob), neg_kl


def teamtr_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float = DEFAULT_BETA,
    clip_ratio_low: float = DEFAULT_CLIP_RATIO,
    clip_ratio_high: float = DEFAULT_CLIP_RATIO,
    clip_ratio_c: float = DEFAULT_CLIP_RATIO_C,
    ratio_level: str = DEFAULT_RATIO_LEVEL,
    kl_estimator: str = DEFAULT_KL_ESTIMATOR,
    kl_reduction: str = DEFAULT_KL_REDUCTION,
    loss_agg_mode: str = "token-mean",
    global_batch_info: Mapping[str, Any] | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """TeamTR trust-region loss of the active agent (Eq. 10), to be minimised:

        loss = agg( −min(ρ·Ã, clip(ρ, 1−ε_low, 1+ε_high)·Ã) )  +  β · KL_term

    * The PPO part is verl's vanilla loss (dual clip ``clip_ratio_c`` for Ã < 0, rollout-IS weights, ``loss_agg_mode``
      aggregation with the global batch info), with ratio ρ per token (``ratio_level="token"``, verl vanilla) or the
      paper's message ratio ρ = w(m) = exp(clamp(Σ_u log r_u, ±10)) broadcast to the message's tokens
      (``"message"``; ``loss_agg_mode="seq-mean-token-mean"`` then gives exactly the paper's mean over messages).
    * KL_term is the Eq. 11 monitor as a differentiable loss: per-token ``kl_estimator`` values aggregated as
      ``seq-mean-token-sum`` (``kl_reduction="message_sum"``: sum over each message, mean over messages) or
      ``token-mean`` (``"token_mean"``), with the same global batch info, so gradient accumulation over micro-batches
      and data-parallel ranks is exact. Inside the loss only, the per-token log-ratio is clamped to ±20 (as verl's
      vanilla ratio and k3) so that exp cannot overflow; the reported monitor is unclamped.
    Only tokens in ``response_mask`` (the active agent's) are read; other positions may hold anything, even NaN.
    With ``global_batch_info``, the ``seq-mean`` modes divide by ``global_batch_size`` (rows, not messages): give
    the loss only the active agent's rows so that the KL term is the mean over that agent's messages.

    Args:
        old_log_prob: `(torch.Tensor)` shape (bs, response_length), log π_cur (before this agent's update).
        log_prob: `(torch.Tensor)` shape (bs, response_length), log π_new (current parameters).
        advantages: `(torch.Tensor)` shape (bs, response_length), Ã broadcast to tokens.
        response_mask: `(torch.Tensor)` shape (bs, response_length), the active agent's tokens.
        beta: β >= 0, the KL coefficient.
        clip_ratio_low, clip_ratio_high: PPO ε (>= 0).
        clip_ratio_c: dual-clip bound (> 1).
        ratio_level: ``"token"`` or ``"message"``.
        kl_estimator: ``"k3"`` or ``"k1"``; kl_reduction: ``"message_sum"`` or ``"token_mean"``.
        loss_agg_mode: verl's loss aggregation mode.
        global_batch_info: verl's ``config.global_batch_info`` (dp_size, batch_num_tokens, global_batch_size,
            loss_scale_factor); None for a single local batch.
        rollout_is_weights: `(torch.Tensor | None)` shape (bs, response_length), multiplies the PPO token losses.
        check_finite: raise ``ValueError`` on NaN/inf log-probs or advantages inside the mask.

    Returns:
        loss: scalar tensor.
        metrics: ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (as verl's vanilla),
            ``actor/pg_loss_teamtr`` (PPO part), ``actor/teamtr_kl`` (raw float64 Eq. 11 monitor on this batch),
            ``actor/teamtr_kl_loss`` (the aggregated KL term), ``actor/teamtr_beta``.
    """
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("log_prob", log_prob, "old_log_prob", old_log_prob)
    _check_same_shape("advantages", advantages, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    if rollout_is_weights is not None:
        _check_same_shape("rollout_is_weights", rollout_is_weights, "old_log_prob", old_log_prob)
    beta = _check_nonneg("beta", beta)
    clip_ratio_low = _check_nonneg("clip_ratio_low", clip_ratio_low)
    clip_ratio_high = _check_nonneg("clip_ratio_high", clip_ratio_high)
    clip_ratio_c = _check_finite_scalar("clip_ratio_c", clip_ratio_c)
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got clip_ratio_c={clip_ratio_c!r}")
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("kl_reduction", kl_reduction, ("message_sum", "token_mean"))
    _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    _check_nonempty_mask("response_mask", mask)
    if check_finite:
        _check_finite_in_mask("old_log_prob", old_log_prob, mask)
        _check_finite_in_mask("log_prob", log_prob, mask)
        _check_finite_in_mask("advantages", advantages, mask)
    gbi = {k: v for k, v in dict(global_batch_info or {}).items() if v is not None}
    unknown = sorted(set(gbi) - {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"})
    if unknown:
        raise ValueError(f"global_batch_info has unknown keys {unknown}, got global_batch_info={dict(gbi)!r}")

    # Read nothing outside the mask: masked positions become 0 with a zero (never NaN) gradient.
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    old = torch.where(mask, old_log_prob.detach(), zero)
    new = torch.where(mask, log_prob, zero)
    adv = torch.where(mask, advantages.detach(), torch.zeros((), dtype=advantages.dtype, device=advantages.device))

    ratio, neg_kl = _ppo_ratio(old, new, mask, ratio_level)
    ppo_kl = _masked_mean(-neg_kl, mask)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    pg_losses3 = -adv * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = _masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (adv < 0).float(), mask)
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * torch.where(mask, rollout_is_weights.detach(), zero)
    pg_loss = aggregate_loss(pg_losses, response_mask, loss_agg_mode, **gbi)

    # KL term: the k3 log-ratio is clamped to ±20 here (as verl's kl_penalty) so that exp cannot overflow.
    log_r = torch.clamp(new - old, min=-TOKEN_LOG_RATIO_CLAMP, max=TOKEN_LOG_RATIO_CLAMP)
    kl_tok = token_kl(torch.zeros_like(log_r), log_r, kl_estimator)
    kl_mode = "seq-mean-token-sum" if kl_reduction == "message_sum" else "token-mean"
    kl_gbi = {k: v for k, v in gbi.items() if k != "loss_scale_factor"}
    kl_term = aggregate_loss(kl_tok, response_mask, kl_mode, **kl_gbi)
    loss = pg_loss + beta * kl_term

    with torch.no_grad():  # the raw (unclamped, float64) Eq. 11 monitor of this batch; NaN stays NaN
        monitor = _kl_monitor_unchecked(old.detach(), new.detach(), mask, None, kl_estimator, kl_reduction)
    metrics = {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
        "actor/pg_loss_teamtr": pg_loss.detach().item(),
        "actor/teamtr_kl": monitor.item(),
        "actor/teamtr_kl_loss": kl_term.detach().item(),
        "actor/teamtr_beta": beta,
    }
    return loss, metrics


_TEAMTR_LOSS_OPTIONS = (
    "beta",
    "clip_ratio_low",
    "clip_ratio_high",
    "clip_ratio_c",
    "ratio_level",
    "kl_estimator",
    "kl_reduction",
    "check_finite",
)


def compute_teamtr_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``teamtr`` (``actor.policy_loss.loss_mode=teamtr``): Eq. 10, see :func:`teamtr_policy_loss`.

    Same calling convention as ``core_algos.compute_policy_loss_vanilla``. Each option is read from keyword arguments
    first, then from ``config.policy_loss`` (a DictConfig/dict that allows them; for β also verl's
    ``policy_loss.ppo_kl_coef``, which is how the TeamTR trainer sets each agent's β), then, for the
    clip ratios only, from the actor config (``clip_ratio_low``/``clip_ratio_high``, falling back to ``clip_ratio``,
    and ``clip_ratio_c``), then the defaults:

        beta 0.1, clip_ratio_low/high 0.2, clip_ratio_c 3.0, ratio_level "token", kl_estimator "k3",
        kl_reduction "message_sum", check_finite True.

    ``config.global_batch_info`` (set by verl's ``ppo_loss``) is passed to the aggregation, as vanilla does.

    Args:
        old_log_prob, log_prob, advantages, response_mask: `(torch.Tensor)` shape (bs, response_length).
        loss_agg_mode: verl's aggregation mode.
        config: `(ActorConfig | DictConfig | dict | None)`.
        rollout_is_weights: `(torch.Tensor | None)` shape (bs, response_length).

    Returns:
        loss (scalar tensor), metrics (dict of floats), see :func:`teamtr_policy_loss`.
    """
    unknown = sorted(set(kwargs) - set(_TEAMTR_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"compute_teamtr_policy_loss got unexpected keyword arguments {unknown}")
    pl = _cfg_get(config, "policy_loss")

    def opt(key: str, default: Any, actor_keys: Sequence[str] = ()) -> Any:
        actor_values = [_cfg_get(config, k) for k in actor_keys]
        return _first_set(kwargs.get(key), _cfg_get(pl, key), *actor_values, default=default)

    gbi = _cfg_get(config, "global_batch_info")
    return teamtr_policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        # β: verl's own PolicyLossConfig field for a KL penalty coefficient carries it, so the trainer can push a
        # per-agent β with the loss config (ppo_loss looks the loss up by name; a partial would never reach it).
        beta=_first_set(kwargs.get("beta"), _cfg_get(pl, "beta"), _cfg_get(pl, "ppo_kl_coef"), default=DEFAULT_BETA),
        clip_ratio_low=opt("clip_ratio_low", DEFAULT_CLIP_RATIO, ("clip_ratio_low", "clip_ratio")),
        clip_ratio_high=opt("clip_ratio_high", DEFAULT_CLIP_RATIO, ("clip_ratio_high", "clip_ratio")),
        clip_ratio_c=opt("clip_ratio_c", DEFAULT_CLIP_RATIO_C, ("clip_ratio_c",)),
        ratio_level=opt("ratio_level", DEFAULT_RATIO_LEVEL),
        kl_estimator=opt("kl_estimator", DEFAULT_KL_ESTIMATOR),
        kl_reduction=opt("kl_reduction", DEFAULT_KL_REDUCTION),
        loss_agg_mode=loss_agg_mode,
        global_batch_info=dict(gbi) if gbi else None,
        rollout_is_weights=rollout_is_weights,
        check_finite=bool(opt("check_finite", True)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Per-agent β controller and δ enforcement
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetaState:
    """The β controller state of one agent; immutable, serialises to a dict (checkpoints, ``teamtr_state.json``).

    Attributes:
        beta: current KL coefficient β > 0.
        tries: backtracks already taken within the current update (0 at the start of an update).
        num_updates: updates finished (accepted or given up).
        num_backtracks: backtracks taken in total.
        num_give_ups: updates given up in total.
        last_kl: the last measured KL, or None.
    """

    beta: float = DEFAULT_BETA
    tries: int = 0
    num_updates: int = 0
    num_backtracks: int = 0
    num_give_ups: int = 0
    last_kl: float | None = None

    def __post_init__(self) -> None:
        _check_positive("beta", self.beta)
        for name in ("tries", "num_updates", "num_backtracks", "num_give_ups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {name}={v!r}")
        if self.last_kl is not None:
            _check_kl_value("last_kl", self.last_kl)

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


def adapt_beta(
    beta: float,
    measured_kl: float,
    target_kl: float,
    n_steps: int = 1,
    horizon: float = 1.0,
    max_step: float = 0.2,
    beta_min: float = 1e-6,
    beta_max: float = 1e3,
) -> float:
    """Proportional β update of verl's ``AdaptiveKLController`` (Ziegler et al. 2019), then clipped to bounds:

        β ← clip( β · (1 + clip(kl/target − 1, −max_step, max_step) · n_steps / horizon), beta_min, beta_max )

    With the defaults (n_steps = horizon = 1) one update moves β by at most ±20 %.

    Returns:
        the new β (float).
    """
    beta = _check_positive("beta", beta)
    measured_kl = _check_finite_scalar("measured_kl", measured_kl)
    target_kl = _check_positive("target_kl", target_kl)
    horizon = _check_positive("horizon", horizon)
    max_step = _check_nonneg("max_step", max_step)
    n_steps = _check_nonneg("n_steps", n_steps)
    beta_min = _check_positive("beta_min", beta_min)
    beta_max = _check_positive("beta_max", beta_max)
    if beta_min > beta_max:
        raise ValueError(f"beta_min must be <= beta_max, got beta_min={beta_min!r}, beta_max={beta_max!r}")
    err = float(np.clip(measured_kl / target_kl - 1.0, -max_step, max_step))
    return float(min(max(beta * (1.0 + err * n_steps / horizon), beta_min), beta_max))


@dataclass(frozen=True)
class TrustRegionDecision:
    """What to do with an update after measuring its KL (see :func:`trust_region_decision`).

    Attributes:
        action: ``"accept"`` (commit π_new), ``"backtrack"`` (restore π_cur, redo the update with ``beta``) or
            ``"give_up"`` (restore π_cur and keep it for this step: the agent is not updated).
        beta: the β to use next (for the retry, or for the agent's next update).
        tries: backtracks taken in this update, including this decision's.
        measured_kl, delta: the inputs.
        state: the agent's next :class:`BetaState`.
    """

    action: str
    beta: float
    tries: int
    measured_kl: float
    delta: float
    state: BetaState

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.to_dict()
        return d


def trust_region_decision(
    state: BetaState,
    measured_kl: float,
    delta: float,
    max_backtracks: int = DEFAULT_MAX_BACKTRACKS,
    backtrack_factor: float = DEFAULT_BACKTRACK_FACTOR,
    target_fraction: float = 1.0,
    horizon: float = 1.0,
    max_step: float = 0.2,
    beta_min: float = 1e-6,
    beta_max: float = 1e3,
) -> TrustRegionDecision:
    """δ enforcement for one agent update ("update until d̂ ≤ δ_i", Algorithm 1 line 7), pure.

      * ``measured_kl <= delta``: **accept**; β is adapted proportionally toward the target ``target_fraction·δ``
        (:func:`adapt_beta`), ``tries`` resets.
      * ``measured_kl > delta`` and fewer than ``max_backtracks`` backtracks so far: **backtrack**; the caller
        restores π_cur and redoes the update with β ← β·``backtrack_factor``.
      * otherwise: **give_up**; the caller restores π_cur and moves on; β keeps the raised value for the agent's next
        update, ``tries`` resets.

    Args:
        state: the agent's :class:`BetaState` (``state.beta`` is the β the measured update used).
        measured_kl: d̂ of the update (Eq. 11) on the rollouts of this step; NaN raises, +inf is out of region.
        delta: trust-region radius δ_i > 0.
        max_backtracks: M >= 0, retries allowed per update.
        backtrack_factor: > 1.
        target_fraction: in (0, 1], the controller's target KL as a fraction of δ.
        horizon, max_step, beta_min, beta_max: see :func:`adapt_beta`.

    Returns:
        :class:`TrustRegionDecision`.
    """
    if not isinstance(state, BetaState):
        raise ValueError(f"state must be a BetaState, got state of type {type(state).__name__}")
    measured_kl = _check_kl_value("measured_kl", measured_kl)
    delta = _check_positive("delta", delta)
    if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, (int, np.integer)) or max_backtracks < 0:
        raise ValueError(f"max_backtracks must be an integer >= 0, got max_backtracks={max_backtracks!r}")
    backtrack_factor = _check_finite_scalar("backtrack_factor", backtrack_factor)
    if backtrack_factor <= 1.0:
        raise ValueError(f"backtrack_factor must be > 1, got backtrack_factor={backtrack_factor!r}")
    target_fraction = _check_positive("target_fraction", target_fraction)
    if target_fraction > 1.0:
        raise ValueError(f"target_fraction must be in (0, 1], got target_fraction={target_fraction!r}")

    if measured_kl <= delta:
        beta = adapt_beta(
            state.beta,
            measured_kl,
            target_fraction * delta,
            horizon=horizon,
            max_step=max_step,
            beta_min=beta_min,
            beta_max=beta_max,
        )
        nxt = dataclasses.replace(state, beta=beta, tries=0, num_updates=state.num_updates + 1, last_kl=measured_kl)
        return TrustRegionDecision("accept", beta, state.tries, measured_kl, delta, nxt)
    beta = float(min(max(state.beta * backtrack_factor, beta_min), beta_max))
    if state.tries < max_backtracks:
        nxt = dataclasses.replace(
            state, beta=beta, tries=state.tries + 1, num_backtracks=state.num_backtracks + 1, last_kl=measured_kl
        )
        return TrustRegionDecision("backtrack", beta, state.tries + 1, measured_kl, delta, nxt)
    nxt = dataclasses.replace(
        state,
        beta=beta,
        tries=0,
        num_updates=state.num_updates + 1,
        num_give_ups=state.num_give_ups + 1,
        last_kl=measured_kl,
    )
    return TrustRegionDecision("give_up", beta, state.tries, measured_kl, delta, nxt)


# ----------------------------------------------------------------------------------------------------------------
# Certificate proxy (Thm. 3.4 per update, Thm. 3.6 per stage; finite-horizon form by default)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateTerms:
    """Per-update surrogate gain and estimable error terms (see :func:`surrogate_terms`); all in advantage units."""

    surrogate_gain: float
    zeta_clip: float
    zeta_ratio: float
    zeta_norm: float
    num_messages: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _row_scalar(name: str, value: Any, mask: torch.Tensor) -> torch.Tensor:
    """(bs,) float64 per-row value from a (bs,) tensor, a (bs, T) token tensor (masked token mean) or a number."""
    bs = mask.shape[0]
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return torch.full((bs,), float(value), dtype=torch.float64, device=mask.device)
    _check_tensor(name, value)
    if value.dim() == 2:
        _check_same_shape(name, value, "response_mask", mask)
        _check_finite_in_mask(name, value, mask)
        v = torch.where(mask, value.to(torch.float64), torch.zeros((), dtype=torch.float64, device=mask.device))
        return v.sum(-1) / mask.sum(-1).clamp(min=1)
    if value.dim() != 1:
        raise ValueError(f"{name} must be (bs,) or (bs, response_length), got {name} with shape {tuple(value.shape)}")
    _check_rows(name, value.shape[0], bs)
    v = value.to(device=mask.device, dtype=torch.float64)
    rows = mask.any(-1)
    if not bool(torch.isfinite(v[rows]).all()):
        i = int((rows & ~torch.isfinite(v)).nonzero()[0])
        raise ValueError(f"{name} must be finite, got {name}[{i}]={v[i].item()!r}")
    return v


def surrogate_terms(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: Any,
    normalized_advantages: Any,
    group_size: Any,
    response_mask: torch.Tensor,
    clip_ratio_low: float = DEFAULT_CLIP_RATIO,
    clip_ratio_high: float = DEFAULT_CLIP_RATIO,
    ratio_level: str = "message",
) -> SurrogateTerms:
    """Surrogate gain L̂_i and the estimable ζ terms of one agent update, on the fresh rollouts of step i.

    Rows are the agent's messages m ∈ M (rows with no masked token are skipped). Let ρ be the importance ratio of
    π_new to π_cur (message ratio w(m) = exp(clamp(Σ_u log r_u, ±10)) for ``ratio_level="message"``, the default and
    the paper's; per-token r_u for ``"token"``, then every per-message quantity below is a token mean over m),
    ρ̄ = clip(ρ, 1−ε_low, 1+ε_high), Ã_m the bounded advantage and z_m the unclipped normalized one (Eq. 9).

      * **L̂_i** (surrogate gain) = mean_m g_m with g_m = min(ρ·Ã_m, ρ̄·Ã_m) − Ã_m: the clipped surrogate of Eq. 10
        minus its value at π_new = π_cur (so L̂_i = 0 before any update; under π_cur, E[Ã] is the finite-sample
        offset that Eq. 9 removes only in expectation).
      * **ζ_clip** (advantage clipping, Eq. 9) = mean_m max(ρ, ρ̄)·|z_m − Ã_m|: an exact bound on how much the
        surrogate changes when the unclipped z replaces Ã (min(ρa, ρ̄a) is Lipschitz in a with constant max(ρ, ρ̄)).
      * **ζ_ratio** (importance-ratio sampling error) = std_m(g_m)/sqrt(|M|) (unbiased std; 0 for |M| < 2): the
        standard error of L̂_i as an importance-weighted Monte-Carlo estimate; it vanishes at ρ ≡ 1.
      * **ζ_norm** (group normalization) = mean_m |ρ − 1|/sqrt(G_m − 1) + |L̂_i|·mean_m 1/sqrt(2(G_m − 1)), terms
        with G_m < 2 counted as 0: the first is the effect on the gain of the group-baseline error (standard error
        of μ̂ in σ̂ units ≈ 1/sqrt(G−1); a baseline shift b changes g_m by b·(slope − 1), |slope − 1| <= |ρ − 1|),
        the second the relative standard error of σ̂ (≈ 1/sqrt(2(G−1))) times the gain it rescales.

    Args:
        old_log_prob, log_prob: `(torch.Tensor)` shape (bs, response_length), log π_cur and log π_new (after the
            update) of the agent's sampled tokens.
        advantages: Ã per row, shape (bs,) or (bs, response_length) (masked token mean is taken).
        normalized_advantages: z per row, same shapes (``RowAdvantage.normalized``).
        group_size: G per row, shape (bs,), or one int.
        response_mask: `(torch.Tensor)` shape (bs, response_length), the agent's tokens.
        clip_ratio_low, clip_ratio_high: PPO ε.
        ratio_level: ``"message"`` (default) or ``"token"``.

    Returns:
        :class:`SurrogateTerms` (floats).
    """
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("log_prob", log_prob, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    _check_nonempty_mask("response_mask", mask)
    _check_finite_in_mask("old_log_prob", old_log_prob, mask)
    _check_finite_in_mask("log_prob", log_prob, mask)
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    eps_lo = _check_nonneg("clip_ratio_low", clip_ratio_low)
    eps_hi = _check_nonneg("clip_ratio_high", clip_ratio_high)
    a = _row_scalar("advantages", advantages, mask)
    z = _row_scalar("normalized_advantages", normalized_advantages, mask)
    g = _row_scalar("group_size", group_size, mask)

    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64, device=mask.device)
        old = torch.where(mask, old_log_prob.detach().to(torch.float64), zero)
        new = torch.where(mask, log_prob.detach().to(torch.float64), zero)
        if ratio_level == "message":
            log_w = torch.clamp((new - old).sum(-1), -MESSAGE_LOG_RATIO_CLAMP, MESSAGE_LOG_RATIO_CLAMP)
            rho = torch.exp(log_w).unsqueeze(-1).expand_as(new)
        else:
            rho = torch.exp(torch.clamp(new - old, -TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP))
        rho_c = rho.clamp(1 - eps_lo, 1 + eps_hi)
        ntok = mask.sum(-1).clamp(min=1).to(torch.float64)

        def tok_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, zero).sum(-1) / ntok

        rows = mask.any(-1)
        A = a.unsqueeze(-1)
        surr = tok_mean(torch.minimum(rho * A, rho_c * A))[rows]
        gain = surr - a[rows]
        n_msg = int(rows.sum())
        L_hat = gain.mean()
        zeta_clip = (tok_mean(torch.maximum(rho, rho_c))[rows] * (z[rows] - a[rows]).abs()).mean()
        zeta_ratio = gain.std(correction=1) / math.sqrt(n_msg) if n_msg >= 2 else torch.zeros((), dtype=torch.float64)
        gr = g[rows]
        ok = gr >= 2
        inv_se_mu = torch.where(ok, 1.0 / torch.sqrt((gr - 1).clamp(min=1)), zero)
        inv_se_sigma = torch.where(ok, 1.0 / torch.sqrt(2 * (gr - 1).clamp(min=1)), zero)
        zeta_norm = (tok_mean((rho - 1).abs())[rows] * inv_se_mu).mean() + L_hat.abs() * inv_se_sigma.mean()
    return SurrogateTerms(
        surrogate_gain=float(L_hat),
        zeta_clip=float(zeta_clip),
        zeta_ratio=float(zeta_ratio),
        zeta_norm=float(zeta_norm),
        num_messages=n_msg,
    )


@dataclass(frozen=True)
class UpdateRecord:
    """Logged quantities of one agent update i of a stage (the input of the certificate).

    Attributes:
        agent: the updated agent's name.
        surrogate_gain: L̂_i, the per-message surrogate gain (:func:`surrogate_terms`), advantage units.
        kl: d̂_i, the raw Eq. 11 monitor (may be slightly negative with k1; the certificate uses max(d̂_i, 0)).
        zeta_clip, zeta_ratio, zeta_norm: ζ̂ terms (:func:`surrogate_terms`).
        delta: the radius δ_i, or None (for the out-of-region flag).
        agent_turns: n_j, messages of this agent per trajectory (finite-horizon form); None: the horizon H (the
            conservative choice).
        advantage_scale: multiplies the bound to express it in return units (e.g. the mean group std σ̄ of the
            returns, since Ã ≈ A/σ); 1.0 keeps advantage units.
        measured_gain: ΔJ_i measured after the update (mean return of the next regeneration minus this one), or None.
    """

    agent: str
    surrogate_gain: float
    kl: float
    zeta_clip: float = 0.0
    zeta_ratio: float = 0.0
    zeta_norm: float = 0.0
    delta: float | None = None
    agent_turns: float | None = None
    advantage_scale: float = 1.0
    measured_gain: float | None = None
    num_messages: int | None = None

    def __post_init__(self) -> None:
        _check_finite_scalar("surrogate_gain", self.surrogate_gain)
        _check_finite_scalar("kl", self.kl)
        for name in ("zeta_clip", "zeta_ratio", "zeta_norm"):
            _check_nonneg(name, getattr(self, name))
        if self.delta is not None:
            _check_positive("delta", self.delta)
        if self.agent_turns is not None:
            _check_positive("agent_turns", self.agent_turns)
        _check_positive("advantage_scale", self.advantage_scale)
        if self.measured_gain is not None:
            _check_finite_scalar("measured_gain", self.measured_gain)

    @property
    def zeta(self) -> float:
        """ζ̂_i = ζ_clip + ζ_ratio + ζ_norm."""
        return self.zeta_clip + self.zeta_ratio + self.zeta_norm

    @property
    def sqrt_kl(self) -> float:
        """sqrt(max(d̂_i, 0))."""
        return math.sqrt(max(self.kl, 0.0))

    @property
    def out_of_region(self) -> bool | None:
        """d̂_i > δ_i, or None when δ_i is unknown."""
        return None if self.delta is None else self.kl > self.delta

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdateRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"UpdateRecord.from_dict got unknown keys {unknown}, expected a subset of {sorted(names)}")
        return cls(**dict(data))


def _check_horizon(horizon: Any) -> int:
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1 (turns per episode), got horizon={horizon!r}")
    return int(horizon)


def _check_gamma(gamma: Any) -> float:
    g = _check_finite_scalar("gamma", gamma)
    if not 0.0 < g < 1.0:
        raise ValueError(f"gamma must be in (0, 1) for form='discounted', got gamma={gamma!r}")
    return g


def certificate_constant(
    a_max: float,
    form: str = "finite_horizon",
    horizon: int | None = None,
    agent_turns: float | None = None,
    gamma: float | None = None,
) -> float:
    """The KL-penalty constant c of the improvement bound (docs/paper_map.md derives both forms).

      * ``"discounted"`` (the paper): c = sqrt(2)·γ·A_max/(1−γ)².
      * ``"finite_horizon"`` (default): c = sqrt(2)·A_max·(H−1)·n_j for an episode of H turns in which the agent
        writes n_j messages (``agent_turns``, default H). H = 1 (one message per episode, stock single-agent verl)
        gives c = 0: without a later state there is no occupancy shift.

    Returns:
        c (float).
    """
    a_max = _check_positive("a_max", a_max)
    _check_choice("form", form, CERTIFICATE_FORMS)
    if form == "discounted":
        g = _check_gamma(gamma)
        return math.sqrt(2.0) * g * a_max / (1.0 - g) ** 2
    h = _check_horizon(horizon)
    n_j = float(h) if agent_turns is None else _check_positive("agent_turns", agent_turns)
    if n_j > h:
        raise ValueError(f"agent_turns must be <= horizon={h}, got agent_turns={agent_turns!r}")
    return math.sqrt(2.0) * a_max * (h - 1) * n_j


def horizon_multiplier(
    form: str = "finite_horizon",
    horizon: int | None = None,
    agent_turns: float | None = None,
    gamma: float | None = None,
) -> float:
    """κ, the factor on the per-message surrogate gain and ζ: 1/(1−γ) (discounted) or n_j (finite horizon)."""
    _check_choice("form", form, CERTIFICATE_FORMS)
    if form == "discounted":
        return 1.0 / (1.0 - _check_gamma(gamma))
    h = _check_horizon(horizon)
    n_j = float(h) if agent_turns is None else _check_positive("agent_turns", agent_turns)
    if n_j > h:
        raise ValueError(f"agent_turns must be <= horizon={h}, got agent_turns={agent_turns!r}")
    return n_j


@dataclass(frozen=True)
class UpdateBound:
    """Thm. 3.4 lower bound of one update: bound = scale·(κ·L̂ − c·sqrt(d̂) − κ·ζ̂)."""

    agent: str
    gain_term: float
    kl_term: float
    zeta_term: float
    bound: float
    c: float
    kappa: float
    out_of_region: bool | None
    measured_gain: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def update_bound(
    record: UpdateRecord,
    a_max: float = DEFAULT_A_CLIP,
    form: str = "finite_horizon",
    horizon: int | None = None,
    gamma: float | None = None,
) -> UpdateBound:
    """Per-update improvement lower bound (Thm. 3.4): J(π̂^i) − J(π̂^{i−1}) ≥ κ·L̂_i − c·sqrt(d̂_i) − κ·ζ̂_i.

    Args:
        record: :class:`UpdateRecord`.
        a_max: A_max = A_clip of Eq. 9.
        form, horizon, gamma: see :func:`certificate_constant`.

    Returns:
        :class:`UpdateBound`; all terms are multiplied by ``record.advantage_scale``.
    """
    if not isinstance(record, UpdateRecord):
        raise ValueError(f"record must be an UpdateRecord, got record of type {type(record).__name__}")
    c = certificate_constant(a_max, form=form, horizon=horizon, agent_turns=record.agent_turns, gamma=gamma)
    kappa = horizon_multiplier(form=form, horizon=horizon, agent_turns=record.agent_turns, gamma=gamma)
    s = record.advantage_scale
    gain_term = s * kappa * record.surrogate_gain
    kl_term = s * c * record.sqrt_kl
    zeta_term = s * kappa * record.zeta
    return UpdateBound(
        agent=record.agent,
        gain_term=gain_term,
        kl_term=kl_term,
        zeta_term=zeta_term,
        bound=gain_term - kl_term - zeta_term,
        c=c,
        kappa=kappa,
        out_of_region=record.out_of_region,
        measured_gain=record.measured_gain,
    )


@dataclass(frozen=True)
class StageCertificate:
    """Stage-level certificate (Thm. 3.6; Thm. 3.7 with ``occupancy="stale"``).

    certificate = Σ_i gain_term_i − Σ_i kl_term_i − Σ_i zeta_term_i − stale_penalty.
    """

    surrogate_sum: float
    kl_penalty_sum: float
    zeta_sum: float
    stale_penalty: float
    certificate: float
    num_updates: int
    num_out_of_region: int
    measured_gain_sum: float | None
    updates: tuple[UpdateBound, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["updates"] = [u.to_dict() for u in self.updates]
        return d


def stage_certificate(
    records: Sequence[UpdateRecord],
    a_max: float = DEFAULT_A_CLIP,
    form: str = "finite_horizon",
    horizon: int | None = None,
    gamma: float | None = None,
    occupancy: str = "intermediate",
) -> StageCertificate:
    """Certificate proxy of one stage, a pure function of its per-update records (in update order).

    ``Σ_i κ·L̂_i − Σ_i c_i·sqrt(d̂_i) − Σ_i κ·ζ̂_i`` (Thm. 3.6, intermediate occupancy: each update evaluated on fresh
    rollouts). With ``occupancy="stale"`` (all updates evaluated on the stage-start rollouts, Prop. 3.3/Thm. 3.7)
    the occupancy shift of the earlier updates is added: ``stale_penalty = Σ_i Σ_{k<i} c_k·sqrt(d̂_k)``, the O(n²)
    term. ``measured_gain_sum`` is Σ ΔJ_i when every record carries one.

    Args:
        records: non-empty sequence of :class:`UpdateRecord`.
        a_max, form, horizon, gamma: see :func:`certificate_constant`.
        occupancy: ``"intermediate"`` (default) or ``"stale"``.

    Returns:
        :class:`StageCertificate`.
    """
    _check_choice("occupancy", occupancy, OCCUPANCY_MODES)
    records = list(records)
    if not records:
        raise ValueError("records must hold at least one UpdateRecord, got records=[]")
    bounds = tuple(update_bound(r, a_max=a_max, form=form, horizon=horizon, gamma=gamma) for r in records)
    stale = 0.0
    if occupancy == "stale":
        kl_terms = [b.kl_term for b in bounds]
        stale = float(sum(sum(kl_terms[:i]) for i in range(len(kl_terms))))
    gains = [r.measured_gain for r in records]
    surrogate_sum = float(sum(b.gain_term for b in bounds))
    kl_sum = float(sum(b.kl_term for b in bounds))
    zeta_sum = float(sum(b.zeta_term for b in bounds))
    return StageCertificate(
        surrogate_sum=surrogate_sum,
        kl_penalty_sum=kl_sum,
        zeta_sum=zeta_sum,
        stale_penalty=stale,
        certificate=surrogate_sum - kl_sum - zeta_sum - stale,
        num_updates=len(bounds),
        num_out_of_region=sum(1 for b in bounds if b.out_of_region),
        measured_gain_sum=None if any(g is None for g in gains) else float(sum(gains)),
        updates=bounds,
    )


def _as_1d_finite(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {name} with shape {arr.shape}")
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite, got {name}[{i}]={float(arr[i])!r}")
    return arr


def calibration_fraction(bounds: Any, gains: Any) -> float:
    """Fraction of updates (or stages) whose measured gain ΔJ_i is >= its lower bound.

    Args:
        bounds: shape (n,), the bounds (e.g. ``UpdateBound.bound`` or ``StageCertificate.certificate``).
        gains: shape (n,), the measured ΔJ_i.

    Returns:
        float in [0, 1].
    """
    b = _as_1d_finite("bounds", bounds)
    g = _as_1d_finite("gains", gains)
    if b.shape != g.shape:
        raise ValueError(f"gains must have the shape of bounds {b.shape}, got gains with shape {g.shape}")
    if b.size == 0:
        raise ValueError("bounds must be non-empty, got bounds=[]")
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


def calibration_report(
    records: Sequence[UpdateRecord],
    a_max: float = DEFAULT_A_CLIP,
    form: str = "finite_horizon",
    horizon: int | None = None,
    gamma: float | None = None,
) -> dict[str, Any]:
    """How informative the per-update bound is, over the records that carry a measured gain.

    Returns:
        dict with ``n`` (records used), ``calibration`` (fraction with ΔJ_i >= bound_i), ``spearman`` (rank
        correlation of bound_i and ΔJ_i; NaN when undefined or n < 2), ``mean_bound``, ``mean_gain``.
    """
    used = [r for r in records if r.measured_gain is not None]
    if not used:
        raise ValueError("records must contain at least one UpdateRecord with measured_gain, got none")
    bounds = np.array([update_bound(r, a_max=a_max, form=form, horizon=horizon, gamma=gamma).bound for r in used])
    gains = np.array([r.measured_gain for r in used], dtype=np.float64)
    return {
        "n": len(used),
        "calibration": calibration_fraction(bounds, gains),
        "spearman": spearman_rank_correlation(bounds, gains) if len(used) >= 2 else float("nan"),
        "mean_bound": float(bounds.mean()),
        "mean_gain": float(gains.mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# HAPPO importance factor (the ``happo`` baseline schedule)
# ----------------------------------------------------------------------------------------------------------------


def happo_factor_update(
    factor: torch.Tensor,
    old_log_prob: torch.Tensor,
    new_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    row_trajectory: torch.Tensor,
    clip_range: tuple[float, float] | None = DEFAULT_HAPPO_FACTOR_CLIP,
    log_ratio_clamp: float = MESSAGE_LOG_RATIO_CLAMP,
) -> torch.Tensor:
    """Multiply the running HAPPO factor by the just-updated agent's new/old message ratios, then clip.

    HAPPO (Kuba et al. 2022) updates agents in sequence on one batch and weights agent i's clipped surrogate by
    M = Π_{k<i} π_new^{(k)}/π_old^{(k)} of the agents updated before it. In a turn-based team with sequence-level
    returns the joint action is the whole trajectory, so a trajectory's factor is the product of the message ratios
    w(m) = exp(Σ_u log r_u) of all messages the earlier-updated agents wrote in it. After each agent update:

        factor[τ] ← clip( factor[τ] · exp(clamp(Σ_{m∈τ of this agent} log w(m), ±log_ratio_clamp)), *clip_range )

    Start from ``torch.ones(num_trajectories)``. For the next agent use ``factor[row_trajectory]`` as M: since
    M > 0, ``M·min(ρÃ, clip(ρ)Ã) = min(ρ·(MÃ), clip(ρ)·(MÃ))``, so pass ``broadcast_to_tokens(M * Ã_row, mask)``
    as the advantages of :func:`teamtr_policy_loss` (with β = 0 for plain HAPPO).

    Args:
        factor: `(torch.Tensor)` shape (n_traj,), the running factor (> 0).
        old_log_prob, new_log_prob: `(torch.Tensor)` shape (bs, response_length), the updated agent's log-probs
            before and after its update, on the stage batch.
        response_mask: `(torch.Tensor)` shape (bs, response_length), that agent's tokens.
        row_trajectory: `(torch.LongTensor)` shape (bs,), trajectory code of each row in [0, n_traj)
            (``RowAdvantage.trajectory``).
        clip_range: (low, high) with 0 < low <= 1 <= high, or None for no clipping (HARL's default).
        log_ratio_clamp: clamp on the summed log-ratio per trajectory (numerical stability).

    Returns:
        `(torch.Tensor)` shape (n_traj,), the new factor (no gradient).
    """
    _check_tensor("factor", factor, ndim=1)
    _check_tensor("old_log_prob", old_log_prob, ndim=2)
    _check_same_shape("new_log_prob", new_log_prob, "old_log_prob", old_log_prob)
    mask = _as_mask("response_mask", response_mask, "old_log_prob", old_log_prob)
    _check_tensor("row_trajectory", row_trajectory, ndim=1)
    _check_rows("row_trajectory", row_trajectory.shape[0], old_log_prob.shape[0])
    n_traj = factor.shape[0]
    if row_trajectory.numel() and (int(row_trajectory.min()) < 0 or int(row_trajectory.max()) >= n_traj):
        raise ValueError(
            f"row_trajectory must lie in [0, {n_traj}), got values in "
            f"[{int(row_trajectory.min())}, {int(row_trajectory.max())}]"
        )
    if not bool(torch.isfinite(factor).all()) or not bool((factor > 0).all()):
        raise ValueError(f"factor must be finite and > 0, got factor={factor.tolist()!r}")
    _check_finite_in_mask("old_log_prob", old_log_prob, mask)
    _check_finite_in_mask("new_log_prob", new_log_prob, mask)
    clamp = _check_positive("log_ratio_clamp", log_ratio_clamp)
    if clip_range is not None:
        lo, hi = (_check_positive("clip_range[0]", clip_range[0]), _check_positive("clip_range[1]", clip_range[1]))
        if not lo <= 1.0 <= hi:
            raise ValueError(f"clip_range must satisfy 0 < low <= 1 <= high, got clip_range={tuple(clip_range)!r}")
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64, device=factor.device)
        diff = torch.where(mask, new_log_prob.to(torch.float64) - old_log_prob.to(torch.float64), zero)
        traj_log = torch.zeros(n_traj, dtype=torch.float64, device=factor.device).index_add_(
            0, row_trajectory.to(factor.device).long(), diff.sum(-1)
        )
        out = factor.detach().to(torch.float64) * torch.exp(traj_log.clamp(-clamp, clamp))
        if clip_range is not None:
            out = out.clamp(lo, hi)
    return out.to(factor.dtype)
