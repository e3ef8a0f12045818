"""Stage-0 alignment math (teamtr_verl.algos.stage0) on hand-made distributions."""

import math

import pytest
import torch

from teamtr_verl.algos.stage0 import alignment_verdict, exact_kl, geometric_mixture, mixture_within


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
