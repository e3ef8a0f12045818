"""Stage-0 alignment math (teamtr_verl.algos.stage0) on hand-made distributions."""

import math

import pytest
import torch

from teamtr_verl.algos.stage0 import (
    alignment_verdict,
    exact_kl,
    geometric_mixture,
    message_kl,
    mixture_within,
    topk_forward_kl,
    topk_mixture_target,
    with_rest,
)


def logits(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_geometric_mixture_hand_values_and_endpoints():
    new, inc = logits(0.8, 0.2), logits(0.2, 0.8)
    # t = 1/2: sqrt(0.8 * 0.2) = 0.4 for both tokens -> normalized [0.5, 0.5]
    assert geometric_mixture(new, inc, 0.5).exp().tolist() == pytest.approx([0.5, 0.5])
    assert geometric_mixture(new, inc, 0.0).exp().tolist() == pytest.approx([0.8, 0.2])  # the newcomer
    assert geometric_mixture(new, inc, 1.0).exp().tolist() == pytest.approx([0.2, 0.8])  # the incumbent
    # t = 1/4: 0.8^0.75 * 0.2^0.25 = 0.5657, 0.2^0.75 * 0.8^0.25 = 0.2828 -> [2/3, 1/3]
    assert geometric_mixture(new, inc, 0.25).exp().tolist() == pytest.approx([2 / 3, 1 / 3])
    # logits need not be normalized: a constant shift changes nothing
    assert torch.allclose(geometric_mixture(new + 3.0, inc - 1.0, 0.25), geometric_mixture(new, inc, 0.25))


def test_exact_kl_hand_value_and_zero_probabilities():
    # KL([0.2, 0.8] || [0.5, 0.5]) = 0.2 ln 0.4 + 0.8 ln 1.6 = -0.18326 + 0.37601 = 0.19275
    assert exact_kl(logits(0.2, 0.8).log_softmax(-1), logits(0.5, 0.5)).item() == pytest.approx(0.192745, abs=1e-6)
    # p(a) = 0 contributes 0, whatever q(a)
    p = torch.tensor([0.0, 1.0], dtype=torch.float64).log()
    assert exact_kl(p, logits(0.5, 0.5)).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("direction", ["incumbent_first", "mixture_first"])
def test_mixture_within_finds_the_smallest_t_a_dense_grid_finds(direction):
    torch.manual_seed(0)
    new, inc = torch.randn(5, 7, dtype=torch.float64) * 2, torch.randn(5, 7, dtype=torch.float64) * 2
    delta0 = 0.05
    target = mixture_within(new, inc, delta0, direction=direction, iterations=30)
    log_inc = inc.log_softmax(-1)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for row in range(5):  # reference, one context at a time: the first point of a 2001-point grid with KL <= delta0
        mix = geometric_mixture(new[row].expand(2001, 7), inc[row].expand(2001, 7), grid)
        kls = (exact_kl(log_inc[row].expand(2001, 7), mix) if direction == "incumbent_first"
               else exact_kl(mix, log_inc[row].expand(2001, 7))).tolist()
        assert all(a >= b - 1e-12 for a, b in zip(kls, kls[1:]))  # non-increasing in t, as the docstring argues
        first = next(i for i, kl in enumerate(kls) if kl <= delta0)
        assert grid[first - 1].item() <= target.t[row].item() <= grid[first].item() + 1e-9
        assert target.kl[row].item() <= delta0
    assert torch.allclose(target.log_probs, geometric_mixture(new, inc, target.t))


def test_a_newcomer_already_within_delta0_is_kept_whole():
    new, inc = logits(0.5, 0.5), logits(0.52, 0.48)  # KL(inc || new) = 0.0008
    target = mixture_within(new, inc, delta0=0.01)
    assert target.t.item() == 0.0 and target.log_probs.exp().tolist() == pytest.approx([0.5, 0.5])


def test_with_rest_appends_the_mass_outside_the_k_tokens():
    # 0.5 + 0.3 on the two tokens: 0.2 outside
    assert with_rest(logits(0.5, 0.3)).exp().tolist() == pytest.approx([0.5, 0.3, 0.2])
    # rounding put the two at 1 or more: the rest is floored at 1e-30, never log 0
    assert with_rest(logits(0.6, 0.4 + 1e-9))[-1].item() == pytest.approx(math.log(1e-30))


def test_the_topk_mixture_target_keeps_the_newcomer_within_the_budget_on_k_and_the_rest():
    """A 4-token vocabulary, the incumbent's top 2 (ids 2, 0): π_inc = [0.3, 0.05, 0.6, 0.05] -> K ∪ {rest} =
    [0.6, 0.3, 0.1]; the newcomer π_new = [0.3, 0.25, 0.2, 0.25] -> [0.2, 0.3, 0.5]. KL(inc ‖ new) on the buckets
    = 0.6 ln 3 + 0.3 ln 1 + 0.1 ln 0.2 = 0.659167 − 0.160944 = 0.498223."""
    inc, new = logits(0.3, 0.05, 0.6, 0.05), logits(0.3, 0.25, 0.2, 0.25)
    ids = torch.tensor([2, 0])
    inc_top, new_at = inc[ids], new[ids]
    far = topk_mixture_target(inc_top, new_at, budget=0.5)  # already within 0.5: the newcomer itself
    assert far.t.item() == 0.0 and far.log_probs.exp().tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert far.kl.item() == pytest.approx(0.498223, abs=1e-6)
    near = topk_mixture_target(inc_top, new_at, budget=0.05)
    assert 0 < near.t.item() < 1 and near.kl.item() <= 0.05
    assert near.kl.item() == pytest.approx(0.05, abs=1e-6)  # the smallest t: on the ball's edge (bisection, 2^-30)
    # the same target as the full-vocabulary mixture of the coarse-grained distributions
    assert torch.allclose(near.log_probs, geometric_mixture(with_rest(new_at), with_rest(inc_top), near.t))
    # as the teacher of the top-k loss: a newcomer with the target's mass on K and on the rest has loss 0, however it
    # splits the rest between tokens 1 and 3
    target = near.log_probs.exp()
    student = torch.tensor([target[1], target[2] * 0.3, target[0], target[2] * 0.7], dtype=torch.float64).log()
    assert topk_forward_kl(near.log_probs[:2], ids, student).item() == pytest.approx(0.0, abs=1e-12)


def test_mixture_within_rejects_bad_arguments():
    new = logits(0.5, 0.5)
    with pytest.raises(ValueError, match="delta0"):
        mixture_within(new, new, delta0=0.0)
    with pytest.raises(ValueError, match="direction"):
        mixture_within(new, new, delta0=0.1, direction="forward")
    with pytest.raises(ValueError, match="incumbent_logits"):
        mixture_within(new, logits(0.2, 0.3, 0.5), delta0=0.1)  # another vocabulary: not a mixture
    with pytest.raises(ValueError, match="t must lie in"):
        geometric_mixture(new, new, 1.5)


def test_alignment_verdict_aligned_continue_refused():
    assert alignment_verdict([0.3, 0.12, 0.04], delta0=0.05, max_steps=10).status == "aligned"
    assert alignment_verdict([0.3, 0.12], delta0=0.05, max_steps=10).status == "continue"
    refused = alignment_verdict([0.3, 0.2, 0.11], delta0=0.05, max_steps=2)
    assert refused.status == "refused"
    assert refused.message == ("not aligned within 2 steps: KL 0.11 > delta0 0.05 (curve 0.3, 0.2, 0.11); "
                               "the swap is refused")
    assert alignment_verdict([0.01], delta0=0.05, max_steps=0).status == "aligned"  # in already: no step needed
    with pytest.raises(ValueError, match="kl_curve"):
        alignment_verdict([0.1, float("nan")], delta0=0.05, max_steps=3)


# ------------------------------------------------------------------------------------------------ alignment losses
def test_topk_forward_kl_hand_value():
    # incumbent (0.5, 0.3, 0.2), top-2 = tokens 0, 1, rest 0.2; newcomer uniform: 1/3, 1/3, rest 1/3:
    # 0.5 ln 1.5 + 0.3 ln 0.9 + 0.2 ln 0.6 = 0.202733 - 0.031608 - 0.102165 = 0.068959
    top = torch.tensor([[0.5, 0.3]]).log()
    value = topk_forward_kl(top, torch.tensor([[0, 1]]), torch.zeros(1, 3))
    assert value.tolist() == pytest.approx([0.068959], abs=1e-5)


def test_topk_forward_kl_edge_cases():
    # a top-k entry of probability 0 (log-prob -inf) contributes 0, not NaN: (0.5, 0.5, 0) vs uniform = ln 1.5
    top = torch.tensor([[0.5, 0.5, 0.0]]).log()
    assert topk_forward_kl(top, torch.tensor([[0, 1, 2]]), torch.zeros(1, 3)).tolist() == pytest.approx(
        [math.log(1.5)], abs=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        topk_forward_kl(torch.tensor([[0.5, 0.3]]).log(), torch.tensor([[1, 1]]), torch.zeros(1, 3))


def test_topk_forward_kl_is_exact_over_the_whole_vocabulary_and_a_lower_bound_below_it():
    generator = torch.Generator().manual_seed(0)
    inc, new = (torch.randn(4, 7, 11, generator=generator, dtype=torch.float64) for _ in range(2))
    log_inc = inc.log_softmax(-1)
    exact = exact_kl(log_inc, new.log_softmax(-1))
    order = torch.argsort(torch.rand(4, 7, 11, generator=generator), dim=-1)  # any order of the k = V entries
    assert torch.allclose(topk_forward_kl(log_inc.gather(-1, order), order, new.double()), exact, atol=1e-6)
    for k in (1, 3, 10):  # coarse-graining to top-k + rest never raises a KL (data-processing inequality)
        top_logp, top_ids = log_inc.topk(k, dim=-1)
        assert bool((topk_forward_kl(top_logp, top_ids, new.double()) <= exact + 1e-9).all()), k


def test_distilling_on_the_topk_loss_leaves_only_the_tails_shape_unmatched():
    """Adam on the top-k loss (k = 4 of 8) drives the loss itself to ~0 and the exact KL(π_inc ‖ π_new) from 1.87 to 0.12.
    What remains is exactly the part the server never showed: by the chain rule of KL, exact = top-k loss +
    r_inc·KL(π_inc's tail shape ‖ π_new's tail shape) at every position."""
    generator = torch.Generator().manual_seed(1)
    inc = (3.0 * torch.randn(5, 8, generator=generator, dtype=torch.float64)).log_softmax(-1)  # peaked
    top_logp, top_ids = inc.topk(4, dim=-1)
    new = torch.randn(5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    before = exact_kl(inc, new.detach().log_softmax(-1)).mean().item()
    optimizer = torch.optim.Adam([new], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        topk_forward_kl(top_logp, top_ids, new).mean().backward()
        optimizer.step()
    log_new = new.detach().log_softmax(-1)
    loss, exact = topk_forward_kl(top_logp, top_ids, log_new), exact_kl(inc, log_new)
    assert before > 1.0 and loss.max().item() < 1e-6 and exact.mean().item() < before / 10, (before, exact.mean())
    tail = torch.ones_like(inc, dtype=torch.bool).scatter(-1, top_ids, False)
    tail_inc = inc.masked_fill(~tail, float("-inf")).log_softmax(-1)  # π_inc's tail, renormalized
    tail_new = log_new.masked_fill(~tail, float("-inf")).log_softmax(-1)
    rest_inc = inc.masked_fill(~tail, float("-inf")).logsumexp(-1).exp()
    assert torch.allclose(exact, loss + rest_inc * exact_kl(tail_inc, tail_new), atol=1e-10)


def test_message_kl_is_the_exact_kl_in_expectation():
    """Three possible messages: p = π_inc, q = π_new. The k1 mean over messages drawn from p converges to
    KL(p ‖ q) = Σ p ln(p/q); its standard error covers the gap."""
    p, q = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # 0.6 ln 3 + 0.3 ln 0.6 + 0.1 ln(1/3) = 0.659167 - 0.153248 - 0.109861
    assert exact == pytest.approx(0.396058, abs=1e-6)
    draws = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(2))
    estimate, se = message_kl(p.log()[draws], q.log()[draws])
    assert abs(estimate - exact) < 3 * se and 0 < se < 0.01
    assert message_kl(torch.tensor([-1.0]), torch.tensor([-3.5])) == (2.5, 0.0)  # one message: no error bar
    with pytest.raises(ValueError, match="shape"):
        message_kl(torch.zeros(2), torch.zeros(3))
