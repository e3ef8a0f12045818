"""Eq. 11 / Lemma 3.2 KL monitor and Eq. 10 trust-region policy loss (verl's policy loss ``teamtr``).

Loss aggregation follows verl's ``agg_loss`` semantics, reimplemented so that this package does not import verl."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from teamtr_verl.algos.checks import (
    _as_mask,
    _cfg_get,
    _check_choice,
    _check_finite_in_mask,
    _check_finite_scalar,
    _check_nonempty_mask,
    _check_nonneg,
    _check_rows,
    _check_same_shape,
    _check_tensor,
    _first_set,
    factorize,
)
from teamtr_verl.defaults import (
    DEFAULT_BETA,
    DEFAULT_CLIP_RATIO,
    DEFAULT_CLIP_RATIO_C,
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_KL_REDUCTION,
    DEFAULT_RATIO_LEVEL,
    KL_ESTIMATORS,
    KL_REDUCTIONS,
    LOSS_AGG_MODES,
    MESSAGE_LOG_RATIO_CLAMP,
    RATIO_LEVELS,
    TOKEN_LOG_RATIO_CLAMP,
)


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
