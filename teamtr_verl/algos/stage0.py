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
* the **alignment losses and monitor**: with a shared vocabulary, the forward KL from the incumbent's top-k
  log-probabilities (its actor's, in the trainer; a vLLM server returns the same form), plus the mass outside them,
  to the newcomer's logits, per token
  position (:func:`topk_forward_kl`; a lower bound on KL(π_inc ‖ π_new), exact when k is the whole vocabulary); across vocabularies, the
  message-level k1 estimate of KL(π_inc ‖ π_new) on messages the incumbent sampled, scored by both models in their
  own tokens (:func:`message_kl`, a monitor; the matching loss is the newcomer's negative log-likelihood of the
  incumbent's re-tokenized messages, −mean(new_logp), whose minimizer is the same);
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


def with_rest(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """k tokens' log-probabilities plus one bucket for the mass outside them: the coarse-grained distribution on
    K ∪ {rest} that :func:`topk_forward_kl` compares. The rest's mass is floored at 1e-30 (rounding can leave the k
    tokens' sum at or above 1), so that a geometric mixture never multiplies 0 by −inf.

    Args:
        topk_logprobs: `(torch.Tensor)` shape (..., k), normalized over the whole vocabulary.

    Returns:
        `(torch.Tensor)` float64 shape (..., k + 1), the rest last.
    """
    _check_tensor("topk_logprobs", topk_logprobs)
    log_top = topk_logprobs.to(torch.float64)
    rest = (1.0 - log_top.exp().sum(-1, keepdim=True)).clamp(min=1e-30)
    return torch.cat([log_top, rest.log()], dim=-1)


def topk_mixture_target(incumbent_topk_logprobs: torch.Tensor, new_logprobs: torch.Tensor,
                        budget: float) -> MixtureTarget:
    """The geometric-mixture target on the incumbent's top-k tokens plus the rest (what the top-k loss sees): per
    position the smallest t with KL(π_inc ‖ π_t) ≤ ``budget`` on K ∪ {rest} (:func:`mixture_within`), t = 0 where
    the newcomer is already that close. The teacher that keeps as much of the newcomer as the budget allows.

    Args:
        incumbent_topk_logprobs: `(torch.Tensor)` shape (..., k), the incumbent's top-k log-probabilities.
        new_logprobs: `(torch.Tensor)` shape (..., k), the newcomer's log-probabilities of the same tokens (before
            its alignment: the model whose behaviour the target keeps).
        budget: the KL allowed per position (> 0).

    Returns:
        :class:`MixtureTarget` on K ∪ {rest}: ``log_probs`` (..., k + 1), whose first k are the teacher's log-probs
        for :func:`topk_forward_kl` (which puts the remaining mass in its rest bucket).
    """
    _check_same_shape("new_logprobs", new_logprobs, "incumbent_topk_logprobs", incumbent_topk_logprobs)
    return mixture_within(with_rest(new_logprobs), with_rest(incumbent_topk_logprobs), budget)


def topk_forward_kl(incumbent_topk_logprobs: torch.Tensor, incumbent_topk_ids: torch.Tensor,
                    new_logits: torch.Tensor) -> torch.Tensor:
    """Per position, the forward KL from the incumbent to the newcomer over the incumbent's top-k tokens plus one
    "rest" bucket: Σ_{a∈K} π_inc(a)·(log π_inc(a) − log π_new(a)) + r_inc·(log r_inc − log r_new), with r the mass
    each puts outside K. The top-k distillation loss.

    It is the KL of the two distributions coarse-grained to K ∪ {rest}: never above KL(π_inc ‖ π_new) (the
    data-processing inequality), equal to it when K is the whole vocabulary, and differentiable in ``new_logits``. A
    server returns only the top-k; the rest bucket makes the newcomer keep the incumbent's tail mass instead of
    driving it to zero, which renormalizing the top-k would do (and which makes the true forward KL grow without
    bound on the tail).

    Args:
        incumbent_topk_logprobs: `(torch.Tensor)` shape (..., k), the incumbent's log-probabilities of its top k
            tokens at each position, normalized over the whole vocabulary (as vLLM returns them).
        incumbent_topk_ids: `(torch.Tensor)` int shape (..., k), those tokens' distinct ids in the shared vocabulary.
        new_logits: `(torch.Tensor)` shape (..., vocab), the newcomer's logits at the same positions.

    Returns:
        `(torch.Tensor)` shape (...), in ``new_logits``' dtype (float32 at least).
    """
    _check_tensor("incumbent_topk_logprobs", incumbent_topk_logprobs)
    _check_same_shape("incumbent_topk_ids", incumbent_topk_ids, "incumbent_topk_logprobs", incumbent_topk_logprobs)
    ordered = incumbent_topk_ids.long().sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("incumbent_topk_ids repeats a token at some position: the top-k ids must be distinct")
    if new_logits.shape[:-1] != incumbent_topk_logprobs.shape[:-1]:
        raise ValueError(f"new_logits has positions {tuple(new_logits.shape[:-1])}, the incumbent's top-k "
                         f"{tuple(incumbent_topk_logprobs.shape[:-1])}")
    dtype = torch.promote_types(new_logits.dtype, torch.float32)
    ids = incumbent_topk_ids.long()
    log_inc = incumbent_topk_logprobs.to(dtype)
    log_new_all = torch.log_softmax(new_logits.to(dtype), dim=-1)
    log_new = log_new_all.gather(-1, ids)
    in_top = torch.zeros_like(log_new_all, dtype=torch.bool).scatter(-1, ids, True)
    log_rest_new = torch.logsumexp(log_new_all.masked_fill(in_top, float("-inf")), dim=-1)
    rest_inc = (1.0 - log_inc.exp().sum(-1)).clamp(min=0.0)
    p_inc = log_inc.exp()
    top_terms = torch.where(p_inc > 0, p_inc * (log_inc - log_new), torch.zeros_like(p_inc)).sum(-1)  # 0·log 0 = 0
    # no rest bucket when K is the whole vocabulary (whatever the rounding left in rest_inc); 0·log 0 = 0
    has_rest = (~in_top).any(dim=-1) & (rest_inc > 0)
    rest_term = torch.where(has_rest, rest_inc * (rest_inc.clamp(min=1e-30).log() - log_rest_new),
                            torch.zeros_like(rest_inc))
    return top_terms + rest_term


def message_kl(incumbent_logp: torch.Tensor, new_logp: torch.Tensor) -> tuple[float, float]:
    """The k1 estimate of KL(π_inc ‖ π_new) over whole messages, and its standard error.

    Each message m was sampled by the incumbent; ``incumbent_logp`` is log π_inc(m|s) summed over the incumbent's
    tokens (its end-of-message token included), ``new_logp`` log π_new(m|s) summed over the newcomer's tokens of the
    same text, its own end-of-message token included. The mean of the differences is unbiased for the message-level
    KL (Eq. 11 with the k1 estimator) when both are the texts' probabilities. Across tokenizers each side is the
    probability of one segmentation of the text, a lower bound on the text's: the bias has no fixed sign (it
    depends on which model's segmentation is the likelier), and the trainer adds two standard errors. A monitor
    (floats, no gradient): the loss that moves the newcomer toward the incumbent is −mean(new_logp).

    Args:
        incumbent_logp, new_logp: `(torch.Tensor)` shape (messages,).

    Returns:
        (estimate, standard error) as floats (the error is 0 for a single message).
    """
    _check_tensor("incumbent_logp", incumbent_logp)
    _check_same_shape("new_logp", new_logp, "incumbent_logp", incumbent_logp)
    if incumbent_logp.ndim != 1 or incumbent_logp.numel() == 0:
        raise ValueError(f"incumbent_logp must have shape (messages,) with at least one message, got "
                         f"{tuple(incumbent_logp.shape)}")
    diff = incumbent_logp.to(torch.float64) - new_logp.to(torch.float64)
    se = float(diff.std(unbiased=True) / diff.numel() ** 0.5) if diff.numel() > 1 else 0.0
    return float(diff.mean()), se


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
