"""Eq. 11 (token-decomposed reverse-KL monitor), Eq. 10 (trust-region loss) and verl-style loss aggregation.

Hand-computed values, invariance to masked positions and to other agents' tokens, loop references against the
vectorized code, analytic gradients, and "the KL term's gradient pushes π_new toward π_cur".
"""

import math

import numpy as np
import pytest
import torch

from teamtr_verl import algos

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------ aggregation


def test_aggregate_loss_hand_values():
    # loss = [[1, 2, 9], [3, 9, 9]], mask = [[1, 1, 0], [1, 0, 0]] (the 9s are masked out)
    #   token-mean               = (1 + 2 + 3)/3 = 2
    #   token-sum                = 6
    #   seq-mean-token-sum       = ((1 + 2) + 3)/2 = 3
    #   seq-mean-token-mean      = ((1 + 2)/2 + 3/1)/2 = 2.25
    #   seq-mean-token-sum-norm  = 3 / T(=3) = 1
    loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    expected = {
        "token-mean": 2.0,
        "token-sum": 6.0,
        "seq-mean-token-sum": 3.0,
        "seq-mean-token-mean": 2.25,
        "seq-mean-token-sum-norm": 1.0,
    }
    for mode, value in expected.items():
        assert algos.aggregate_loss(loss, mask, mode).item() == pytest.approx(value, rel=1e-6), mode
    # global normalisation: dp_size 2, 10 tokens and 4 sequences in the global batch:
    #   token-mean = 6/10·2 = 1.2 ; seq-mean-token-sum = 6/4·2 = 3 ; ...-norm with loss_scale_factor 6 -> 0.5
    assert algos.aggregate_loss(loss, mask, "token-mean", dp_size=2, batch_num_tokens=10).item() == pytest.approx(1.2)
    assert algos.aggregate_loss(loss, mask, "seq-mean-token-sum", dp_size=2, global_batch_size=4).item() == 3.0
    assert (
        algos.aggregate_loss(
            loss, mask, "seq-mean-token-sum-norm", dp_size=2, global_batch_size=4, loss_scale_factor=6
        ).item()
        == 0.5
    )
    with pytest.raises(ValueError, match="loss_agg_mode="):
        algos.aggregate_loss(loss, mask, "mean")


# ------------------------------------------------------------------------------------------------ KL monitor


def _two_messages():
    # Row 0 (message 0): log r = [ln 2, -ln 2, pad]; row 1 (message 1): log r = [ln 2, pad, pad].  old = 0.
    #   k3(ln 2)  = 2 - 1 - ln 2   = 0.3068528 ;  k3(-ln 2) = 0.5 - 1 + ln 2 = 0.1931472
    #   k1(ln 2)  = -ln 2 = -0.6931472 ;          k1(-ln 2) = +0.6931472
    old = torch.zeros(2, 3)
    new = torch.tensor([[LN2, -LN2, 123.0], [LN2, -7.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    return old, new, mask


def test_token_kl_values():
    log_r = torch.tensor([LN2, -LN2, 0.0])
    torch.testing.assert_close(algos.token_kl(torch.zeros(3), log_r, "k3"), torch.tensor([0.3068528, 0.1931472, 0.0]))
    torch.testing.assert_close(algos.token_kl(torch.zeros(3), log_r, "k1"), torch.tensor([-LN2, LN2, 0.0]))


def test_monitor_hand_values():
    old, new, mask = _two_messages()
    # k3, message_sum: message sums [0.3068528 + 0.1931472, 0.3068528] = [0.5, 0.3068528], mean = 0.4034264
    assert algos.token_kl_monitor(old, new, mask).item() == pytest.approx(0.4034264, abs=1e-6)
    # k3, token_mean: (0.5 + 0.3068528)/3 tokens = 0.2689509
    assert algos.token_kl_monitor(old, new, mask, reduction="token_mean").item() == pytest.approx(0.2689509, abs=1e-6)
    # k1, message_sum: message sums [-ln2 + ln2, -ln2] = [0, -0.6931472], mean = -0.3465736: raw, negative, unclamped
    assert algos.token_kl_monitor(old, new, mask, estimator="k1").item() == pytest.approx(-0.3465736, abs=1e-6)
    # reduction "none": the per-message sums
    torch.testing.assert_close(
        algos.token_kl_monitor(old, new, mask, reduction="none"),
        torch.tensor([0.5, 0.3068528], dtype=torch.float64),
    )
    assert algos.token_kl_monitor(old, new, mask).dtype == torch.float64


def test_monitor_groups_rows_by_message_index_and_skips_other_rows():
    # Rows 0 and 1 are two chunks of one message "m" -> one message of KL 0.8068528; row 2 has no token of this
    # agent and is not one of its messages. Mean over the agent's 1 message = 0.8068528.
    old, new, mask = _two_messages()
    old = torch.cat([old, torch.zeros(1, 3)])
    new = torch.cat([new, torch.ones(1, 3)])
    mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    got = algos.token_kl_monitor(old, new, mask, message_index=np.array(["m", "m", "x"]))
    assert got.item() == pytest.approx(0.8068528, abs=1e-6)
    # with one row = one message, row 2 is skipped: (0.5 + 0.3068528)/2
    assert algos.token_kl_monitor(old, new, mask).item() == pytest.approx(0.4034264, abs=1e-6)


def test_monitor_is_raw_not_clamped():
    # log r = 30 on one token: k3 = e^30 - 1 - 30 = 1.0686e13; verl's kl_penalty would clamp it to 10.
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), 30.0)
    got = algos.token_kl_monitor(old, new, torch.ones(1, 1))
    assert got.item() == pytest.approx(math.exp(30) - 31, rel=1e-9)


def test_monitor_invariance_to_masked_values_and_other_agents():
    # Agent A owns tokens (0,0), (0,1), (1,0); agent B owns (0,2), (1,1); (1,2) is padding.
    # Changing B's log-probs or writing NaN into the padding leaves A's monitor unchanged.
    torch.manual_seed(0)
    old = torch.randn(2, 3)
    new = old + 0.3 * torch.randn(2, 3)
    mask_a = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    base = algos.token_kl_monitor(old, new, mask_a)
    new2, old2 = new.clone(), old.clone()
    new2[0, 2], new2[1, 1] = 50.0, -50.0  # agent B's tokens
    new2[1, 2], old2[1, 2] = float("nan"), float("inf")  # padding
    assert algos.token_kl_monitor(old2, new2, mask_a).item() == base.item()


def _monitor_loop(old, new, mask, estimator, reduction, message_index=None):
    bs, T = old.shape
    ids = list(range(bs)) if message_index is None else list(message_index)
    sums, counts, total, n_tok = {}, {}, 0.0, 0
    for i in range(bs):
        for t in range(T):
            if mask[i, t]:
                lr = float(new[i, t]) - float(old[i, t])
                k = -lr if estimator == "k1" else math.exp(lr) - 1 - lr
                sums[ids[i]] = sums.get(ids[i], 0.0) + k
                counts[ids[i]] = counts.get(ids[i], 0) + 1
                total += k
                n_tok += 1
    if reduction == "token_mean":
        return total / n_tok
    return sum(sums.values()) / len(sums)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("reduction", ["message_sum", "token_mean"])
@pytest.mark.parametrize("bs,T,seed,grouped", [(5, 4, 0, False), (16, 9, 1, True), (3, 17, 2, False), (32, 3, 3, True)])
def test_monitor_loop_reference(estimator, reduction, bs, T, seed, grouped):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(bs, T, generator=g) * 3
    new = old + 0.5 * torch.randn(bs, T, generator=g)
    mask = torch.rand(bs, T, generator=g) < 0.6
    mask[0, 0] = True
    mi = np.array([i // 2 for i in range(bs)]) if grouped else None
    got = algos.token_kl_monitor(old, new, mask, message_index=mi, estimator=estimator, reduction=reduction)
    assert got.item() == pytest.approx(_monitor_loop(old, new, mask, estimator, reduction, mi), rel=1e-9, abs=1e-12)


def test_k3_is_non_negative():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    assert (algos.token_kl(old, new, "k3") >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_gradient_pushes_new_toward_cur(estimator):
    # Exact expectation over a 4-token vocabulary of the per-token estimator, tokens sampled from π_cur:
    #   f(θ) = Σ_x π_cur(x) k(x; θ)  whose value is KL(π_cur ‖ π_θ) for both k1 and k3.
    # One gradient step on f must reduce the true KL(π_cur ‖ π_θ).
    cur_logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    logp_cur = torch.log_softmax(cur_logits, -1)
    theta = torch.tensor([0.0, 1.0, 1.0, -0.5], requires_grad=True)
    logp_new = torch.log_softmax(theta, -1)
    per_token = algos.token_kl(logp_cur, logp_new, estimator)
    f = (logp_cur.exp() * per_token).sum()
    true_kl = (logp_cur.exp() * (logp_cur - logp_new)).sum()
    assert f.item() == pytest.approx(true_kl.item(), rel=1e-6)
    f.backward()
    with torch.no_grad():
        stepped = torch.log_softmax(theta - 0.5 * theta.grad, -1)
        kl_after = (logp_cur.exp() * (logp_cur - stepped)).sum()
    assert kl_after < true_kl


def test_k3_token_gradient_sign():
    # d k3/d log π_new = r - 1: negative where π_new < π_cur (descent raises log π_new), positive where it is larger.
    old = torch.zeros(1, 2)
    new = torch.tensor([[-0.5, 0.5]], requires_grad=True)
    algos.token_kl_monitor(old, new, torch.ones(1, 2)).backward()
    torch.testing.assert_close(new.grad, torch.tensor([[math.exp(-0.5) - 1, math.exp(0.5) - 1]]))
    assert new.grad[0, 0] < 0 < new.grad[0, 1]


def test_monitor_bad_input():
    old, new, mask = _two_messages()
    with pytest.raises(ValueError, match=r"response_mask selects no token"):
        algos.token_kl_monitor(old, new, torch.zeros_like(mask))
    bad = new.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"new_log_prob must be finite on masked tokens, got new_log_prob\[0, 1\]=nan"):
        algos.token_kl_monitor(old, bad, mask)
    bad = old.clone()
    bad[1, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"old_log_prob\[1, 0\]=-inf"):
        algos.token_kl_monitor(bad, new, mask)
    with pytest.raises(ValueError, match=r"new_log_prob must have the shape of old_log_prob \(2, 3\)"):
        algos.token_kl_monitor(old, new[:, :2], mask)
    with pytest.raises(ValueError, match=r"estimator=.k2."):
        algos.token_kl_monitor(old, new, mask, estimator="k2")
    with pytest.raises(ValueError, match=r"message_index must have one entry per row"):
        algos.token_kl_monitor(old, new, mask, message_index=[0])


def test_message_log_ratio():
    # message sums of log r: row 0: ln2 - ln2 = 0 ; row 1: ln2 ; tokens [2, 1]
    old, new, mask = _two_messages()
    log_w, tokens = algos.message_log_ratio(old, new, mask)
    torch.testing.assert_close(log_w, torch.tensor([0.0, LN2]))
    assert tokens.tolist() == [2, 1]


# ------------------------------------------------------------------------------------------------ policy loss


def _hand_batch():
    # Row 0, Ã = +1: ratios r = [1.5, 0.5, 1.0]; row 1, Ã = -1: r = [1.5, 0.5, 4.0]; ε = 0.2, dual clip c = 3.
    # Token losses (verl vanilla, −min(rA, clip(r)A) then dual clip for A < 0):
    #   row 0: r=1.5 -> −min(1.5, 1.2) = −1.2 (clipped, zero grad); r=0.5 -> −min(0.5, 0.8) = −0.5; r=1 -> −1.0
    #   row 1: r=1.5 -> max(1.5, 1.2) = 1.5; r=0.5 -> max(0.5, 0.8) = 0.8 (clipped); r=4 -> min(3, max(4, 1.2)) = 3
    #   token-mean = (−1.2 − 0.5 − 1.0 + 1.5 + 0.8 + 3)/6 = 2.6/6 = 0.4333333
    #   pg_clipfrac = 2/6 (row0 r=1.5, row1 r=0.5); pg_clipfrac_lower = 1/6 (row1 r=4)
    #   ppo_kl = mean(−log r) = −(2 ln 0.75 + ln 4)/6 = −0.1351550
    # k3 per token: r=1.5: 0.5 − ln1.5 = 0.0945349; r=0.5: ln2 − 0.5 = 0.1931472; r=1: 0; r=4: 3 − ln4 = 1.6137056
    #   message sums: row 0 = 0.2876821, row 1 = 1.9013877; mean (message_sum) = 1.0945349
    r = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 4.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], dtype=torch.float64)
    new = (old + r.log()).clone().requires_grad_(True)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    return old, new, adv, mask, r


def test_policy_loss_hand_values_and_metrics():
    old, new, adv, mask, r = _hand_batch()
    loss, m = algos.teamtr_policy_loss(old, new, adv, mask, beta=0.5)
    # loss = 0.4333333 + 0.5 · 1.0945349 = 0.9806008
    assert loss.item() == pytest.approx(0.9806008, abs=1e-6)
    assert m["actor/pg_loss_teamtr"] == pytest.approx(0.4333333, abs=1e-6)
    assert m["actor/teamtr_kl"] == pytest.approx(1.0945349, abs=1e-6)
    assert m["actor/teamtr_kl_loss"] == pytest.approx(1.0945349, abs=1e-6)
    assert m["actor/teamtr_beta"] == 0.5
    assert m["actor/pg_clipfrac"] == pytest.approx(2 / 6)
    assert m["actor/pg_clipfrac_lower"] == pytest.approx(1 / 6)
    assert m["actor/ppo_kl"] == pytest.approx(-0.1351550, abs=1e-6)


def test_policy_loss_analytic_gradient():
    # d loss / d log π_new, token-mean over N = 6 tokens, message_sum KL over M = 2 messages:
    #   PPO part: −A·r/N on unclipped tokens, 0 on clipped ones -> row 0: [0, −0.5/6, −1/6]; row 1: [1.5/6, 0, 0]
    #   KL part (k3): β·(r − 1)/M -> with β = 0.5: row 0: [0.125, −0.125, 0]; row 1: [0.125, −0.125, 0.75]
    old, new, adv, mask, r = _hand_batch()
    loss, _ = algos.teamtr_policy_loss(old, new, adv, mask, beta=0.5)
    loss.backward()
    unclipped = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    expected = -adv * r * unclipped / 6 + 0.5 * (r - 1) / 2
    torch.testing.assert_close(new.grad, expected)


def test_policy_loss_k1_token_mean_gradient():
    # k1 with token_mean: KL term = mean(−log r) -> gradient −β/N per token (N = 6), whatever r.
    old, new, adv, mask, r = _hand_batch()
    loss, _ = algos.teamtr_policy_loss(old, new, adv, mask, beta=0.3, kl_estimator="k1", kl_reduction="token_mean")
    loss.backward()
    unclipped = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(new.grad, -adv * r * unclipped / 6 - 0.3 / 6)


def test_policy_loss_message_ratio():
    # Row 0: log r = [ln 1.1, 0] -> w = 1.1, Ã = +1, inside [0.8, 1.2]: row loss −1.1, d/d log r_u = −Ã·w = −1.1.
    # Row 1: log r = [ln 2, 0] -> w = 2 > 1.2, Ã = +1: clipped, row loss −1.2, zero gradient.
    # seq-mean-token-mean: loss = (−1.1 − 1.2)/2 = −1.15; grad row 0 = −1.1/2 per token, row 1 = 0.
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.tensor([[math.log(1.1), 0.0], [LN2, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.ones(2, 2, dtype=torch.float64)
    loss, m = algos.teamtr_policy_loss(
        old, new, adv, torch.ones(2, 2), beta=0.0, ratio_level="message", loss_agg_mode="seq-mean-token-mean"
    )
    assert loss.item() == pytest.approx(-1.15)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.55, -0.55], [0.0, 0.0]], dtype=torch.float64))
    assert m["actor/pg_clipfrac"] == pytest.approx(0.5)  # the 2 tokens of the clipped message out of 4


def test_message_ratio_log_clamp():
    # Summed log-ratio 15 is clamped to 10 (numerical stability, as verl's gspo): with Ã = −1 and no dual clip in
    # effect (c = 1e9) the loss is −Ã·e^10 and the gradient is 0 (the clamp is flat there).
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.full((1, 3), 5.0, dtype=torch.float64, requires_grad=True)
    loss, _ = algos.teamtr_policy_loss(
        old,
        new,
        -torch.ones(1, 3, dtype=torch.float64),
        torch.ones(1, 3),
        beta=0.0,
        ratio_level="message",
        clip_ratio_c=1e9,
    )
    assert loss.item() == pytest.approx(math.exp(10.0))
    loss.backward()
    assert (new.grad == 0).all()


def test_policy_loss_invariance_masked_nan_and_other_agents():
    # Agent A's tokens are in mask_a; B's tokens and padding hold other values, even NaN: the loss, the metrics and
    # the gradient on A's tokens are unchanged, and the gradient on the other positions is exactly 0 (not NaN).
    torch.manual_seed(1)
    old = -torch.rand(3, 5)
    new_vals = old + 0.2 * torch.randn(3, 5)
    adv = torch.randn(3, 1).expand(3, 5).contiguous()
    mask_a = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)

    def run(o, n, a):
        n = n.clone().requires_grad_(True)
        loss, metrics = algos.teamtr_policy_loss(o, n, a, mask_a, beta=0.7)
        loss.backward()
        return loss.detach(), metrics, n.grad

    l0, m0, g0 = run(old, new_vals, adv)
    o2, n2, a2 = old.clone(), new_vals.clone(), adv.clone()
    o2[~mask_a], n2[~mask_a], a2[~mask_a] = float("nan"), 99.0, float("inf")
    l1, m1, g1 = run(o2, n2, a2)
    assert l1.item() == l0.item() and m1 == m0
    torch.testing.assert_close(g1, g0)
    assert (g1[~mask_a] == 0).all()


def _loss_loop(old, new, adv, mask, beta, eps, c):
    """token-mean PPO (dual clip) + β·(message-sum k3 KL), with loops."""
    bs, T = old.shape
    pg, n, kl_sum, n_msg = 0.0, 0, 0.0, 0
    for i in range(bs):
        row_kl, has = 0.0, False
        for t in range(T):
            if not mask[i, t]:
                continue
            lr = float(new[i, t] - old[i, t])
            rr, a = math.exp(lr), float(adv[i, t])
            tok = max(-a * rr, -a * min(max(rr, 1 - eps), 1 + eps))
            if a < 0:
                tok = min(tok, -a * c)
            pg += tok
            n += 1
            row_kl += rr - 1 - lr
            has = True
        if has:
            kl_sum += row_kl
            n_msg += 1
    return pg / n + beta * kl_sum / n_msg


@pytest.mark.parametrize("bs,T,seed", [(4, 6, 0), (9, 3, 1), (2, 20, 2), (16, 8, 3)])
def test_policy_loss_loop_reference(bs, T, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(bs, T, generator=g, dtype=torch.float64) * 2
    new = old + 0.4 * torch.randn(bs, T, generator=g, dtype=torch.float64)
    adv = torch.randn(bs, 1, generator=g, dtype=torch.float64).expand(bs, T)
    mask = torch.rand(bs, T, generator=g) < 0.7
    mask[0, 0] = True
    loss, _ = algos.teamtr_policy_loss(old, new, adv, mask, beta=0.25, clip_ratio_low=0.2, clip_ratio_high=0.2)
    assert loss.item() == pytest.approx(_loss_loop(old, new, adv, mask, 0.25, 0.2, 3.0), rel=1e-10)


def test_rollout_is_weights_scale_pg_only():
    # Doubling every IS weight doubles the PPO part and leaves the KL term alone.
    old, new, adv, mask, _ = _hand_batch()
    _, m1 = algos.teamtr_policy_loss(old, new, adv, mask, beta=1.0)
    _, m2 = algos.teamtr_policy_loss(old, new, adv, mask, beta=1.0, rollout_is_weights=torch.full((2, 3), 2.0))
    assert m2["actor/pg_loss_teamtr"] == pytest.approx(2 * m1["actor/pg_loss_teamtr"])
    assert m2["actor/teamtr_kl_loss"] == pytest.approx(m1["actor/teamtr_kl_loss"])


def test_global_batch_info_micro_batches_add_up():
    # Split a batch of 4 rows into 2 micro-batches with verl's global batch info (dp_size 1, global token count and
    # row count of the whole batch): the micro-batch losses add up to the full-batch loss, for both terms.
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    new = old + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 5)
    mask = torch.rand(4, 5, generator=g) < 0.7
    mask[:, 0] = True
    for mode in algos.LOSS_AGG_MODES:
        full, _ = algos.teamtr_policy_loss(old, new, adv, mask, beta=0.4, loss_agg_mode=mode)
        info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 4, "loss_scale_factor": None}
        parts = [
            algos.teamtr_policy_loss(
                old[s], new[s], adv[s], mask[s], beta=0.4, loss_agg_mode=mode, global_batch_info=info
            )[0]
            for s in (slice(0, 2), slice(2, 4))
        ]
        assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-10), mode


class _Cfg(dict):
    """A dict with attribute access, standing in for an ActorConfig / DictConfig."""

    __getattr__ = dict.get


def test_adapter_option_precedence():
    old, new, adv, mask, _ = _hand_batch()
    # actor config only: ε from clip_ratio (0.1) as verl's vanilla; β from the default 0.1
    cfg = _Cfg(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, policy_loss=_Cfg())
    _, m = algos.compute_teamtr_policy_loss(old, new, adv, mask, config=cfg)
    assert m["actor/teamtr_beta"] == algos.DEFAULT_BETA
    ref, _ = algos.teamtr_policy_loss(old, new, adv, mask, beta=0.1, clip_ratio_low=0.1, clip_ratio_high=0.1)
    got, _ = algos.compute_teamtr_policy_loss(old, new, adv, mask, config=cfg)
    assert got.item() == ref.item()
    # policy_loss sub-config beats the default; a keyword beats both
    cfg = _Cfg(clip_ratio=0.2, policy_loss=_Cfg(beta=0.7, kl_estimator="k1"))
    _, m = algos.compute_teamtr_policy_loss(old, new, adv, mask, config=cfg)
    assert m["actor/teamtr_beta"] == 0.7
    assert m["actor/teamtr_kl"] == pytest.approx(-(2 * math.log(0.75) + math.log(4)) / 2)  # k1 message sums, mean
    _, m = algos.compute_teamtr_policy_loss(old, new, adv, mask, config=cfg, beta=2.0)
    assert m["actor/teamtr_beta"] == 2.0
    # no config at all: defaults
    _, m = algos.compute_teamtr_policy_loss(old, new, adv, mask)
    assert m["actor/teamtr_beta"] == algos.DEFAULT_BETA
    with pytest.raises(TypeError, match="bta"):
        algos.compute_teamtr_policy_loss(old, new, adv, mask, bta=1.0)


def test_policy_loss_bad_input():
    old, new, adv, mask, _ = _hand_batch()
    with pytest.raises(ValueError, match=r"response_mask selects no token"):
        algos.teamtr_policy_loss(old, new, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"beta must be >= 0, got beta=-1"):
        algos.teamtr_policy_loss(old, new, adv, mask, beta=-1)
    with pytest.raises(ValueError, match=r"clip_ratio_c must be > 1, got clip_ratio_c=1.0"):
        algos.teamtr_policy_loss(old, new, adv, mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match=r"advantages must have the shape of old_log_prob \(2, 3\)"):
        algos.teamtr_policy_loss(old, new, adv[:, :2], mask)
    with pytest.raises(ValueError, match=r"ratio_level="):
        algos.teamtr_policy_loss(old, new, adv, mask, ratio_level="seq")
    bad = new.detach().clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"log_prob must be finite on masked tokens, got log_prob\[1, 2\]=nan"):
        algos.teamtr_policy_loss(old, bad, adv, mask)
    # check_finite=False: the NaN is not silently turned into a number, it propagates
    loss, m = algos.teamtr_policy_loss(old, bad, adv, mask, check_finite=False)
    assert math.isnan(loss.item()) and math.isnan(m["actor/teamtr_kl"])
