"""The trust-region control (β controller, line search) and the certificate (gain estimates, bounds, calibration).

Hand-built tensors with the expected values worked out in comments, scripted line-search evaluations, and an EXACT
check of the certificate's claims on tiny enumerable turn-based teams (numpy/torch only, every trajectory listed).
"""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from teamtr_verl import algos
from teamtr_verl.algos import BetaState, StepEval

LN = math.log
NAN = float("nan")

# ================================================================================================ β controller


def test_adapt_beta_hand_values():
    # verl's AdaptiveKLController: β·(1 + clip(kl/δ − 1, ±0.2)·n/h), δ = 0.05:
    #   kl 0.06  -> err  0.2          -> 0.1·1.2 = 0.12
    #   kl 0.04  -> err −0.2          -> 0.1·0.8 = 0.08
    #   kl 0.045 -> err −0.1          -> 0.1·0.9 = 0.09
    #   kl 0.5   -> err 9 -> 0.2      -> 0.12      (overshoot clipped: at most +20 %)
    #   kl 0     -> err −1 -> −0.2    -> 0.08      (at most −20 %)
    assert algos.adapt_beta(0.1, 0.06, 0.05) == pytest.approx(0.12)
    assert algos.adapt_beta(0.1, 0.04, 0.05) == pytest.approx(0.08)
    assert algos.adapt_beta(0.1, 0.045, 0.05) == pytest.approx(0.09)
    assert algos.adapt_beta(0.1, 0.5, 0.05) == pytest.approx(0.12)
    assert algos.adapt_beta(0.1, 0.0, 0.05) == pytest.approx(0.08)
    assert algos.adapt_beta(0.1, 0.05, 0.05) == pytest.approx(0.1)  # on target: unchanged
    # horizon 10: 1 + 0.2/10 = 1.02 ; bounds clip the result
    assert algos.adapt_beta(1.0, 0.05, 0.01, horizon=10) == pytest.approx(1.02)
    assert algos.adapt_beta(1.0, 0.05, 0.01, beta_max=1.1) == 1.1
    assert algos.adapt_beta(1e-6, 0.0, 0.01, beta_min=1e-6) == 1e-6
    # an infinite KL is the largest overshoot: +20 %
    assert algos.adapt_beta(0.1, math.inf, 0.05) == pytest.approx(0.12)
    assert algos.adapt_beta(0.1, np.float64(np.inf), 0.05) == pytest.approx(0.12)


def test_adapt_beta_bad_input():
    with pytest.raises(ValueError, match=r"measured_kl must be a number, got measured_kl=nan"):
        algos.adapt_beta(0.1, NAN, 0.05)
    with pytest.raises(ValueError, match=r"measured_kl must be a number, got measured_kl=None"):
        algos.adapt_beta(0.1, None, 0.05)
    with pytest.raises(ValueError, match=r"target_kl must be > 0, got target_kl=0"):
        algos.adapt_beta(1.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"beta must be > 0, got beta=0"):
        algos.adapt_beta(0, 0.0, 0.05)
    with pytest.raises(ValueError, match=r"beta_min must be <= beta_max"):
        algos.adapt_beta(0.1, 0.0, 0.05, beta_min=2.0, beta_max=1.0)


def test_first_step_fraction_hand_values():
    # α₀ = min(1, 0.9·sqrt(δ/KL)), δ = 0.05:
    #   KL 0.2  -> 0.9·sqrt(0.25) = 0.45 (its KL ≈ 0.45²·0.2 = 0.0405 = 0.81·δ)
    #   KL 0.8  -> 0.9·sqrt(1/16) = 0.225
    #   KL 0.01 -> 0.9·sqrt(5) > 1 -> 1.0 ; KL 0 or negative (k1) -> 1.0
    #   safety 1, KL 0.2 -> sqrt(0.25) = 0.5
    assert algos.first_step_fraction(0.2, 0.05) == pytest.approx(0.45)
    assert algos.first_step_fraction(0.8, 0.05) == pytest.approx(0.225)
    assert algos.first_step_fraction(0.01, 0.05) == 1.0
    assert algos.first_step_fraction(0.0, 0.05) == 1.0
    assert algos.first_step_fraction(-0.003, 0.05) == 1.0
    assert algos.first_step_fraction(0.2, 0.05, safety=1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"kl_full must be finite, got kl_full=nan"):
        algos.first_step_fraction(NAN, 0.05)
    with pytest.raises(ValueError, match=r"kl_full must be finite, got kl_full=inf"):  # line_search tries 0.5 then
        algos.first_step_fraction(math.inf, 0.05)
    with pytest.raises(ValueError, match=r"delta must be > 0, got delta=0"):
        algos.first_step_fraction(0.1, 0)


def test_beta_state_after_update_counters_and_round_trip():
    s0 = BetaState(beta=0.1)
    # a committed update with 2 halvings, then a given-up one with 5
    s1 = s0.after_update(kl_full=0.2, beta=0.12, backtracks=2, committed=True)
    s2 = s1.after_update(kl_full=math.inf, beta=0.144, backtracks=5, committed=False)
    assert (s1.beta, s1.num_updates, s1.num_backtracks, s1.num_give_ups, s1.last_kl) == (0.12, 1, 2, 0, 0.2)
    assert (s2.beta, s2.num_updates, s2.num_backtracks, s2.num_give_ups, s2.last_kl) == (0.144, 2, 7, 1, math.inf)
    assert s0 == BetaState(beta=0.1)  # immutable: after_update returns a new state
    assert BetaState.from_dict(json.loads(json.dumps(s2.to_dict()))) == s2
    assert BetaState.from_dict({}) == BetaState()


def test_beta_state_validation():
    with pytest.raises(ValueError, match=r"unknown keys \['betta'\]"):
        BetaState.from_dict({"betta": 1.0})
    # the old state files carried "tries": refused, not silently dropped
    with pytest.raises(ValueError, match=r"unknown keys \['tries'\]"):
        BetaState.from_dict({"beta": 0.1, "tries": 0})
    with pytest.raises(ValueError, match=r"data must be a mapping"):
        BetaState.from_dict([("beta", 0.1)])
    with pytest.raises(ValueError, match=r"beta must be > 0, got beta=0"):
        BetaState(beta=0)
    with pytest.raises(ValueError, match=r"num_updates must be an integer >= 0, got num_updates=-1"):
        BetaState(num_updates=-1)
    with pytest.raises(ValueError, match=r"num_give_ups must be an integer >= 0, got num_give_ups=True"):
        BetaState(num_give_ups=True)
    with pytest.raises(ValueError, match=r"last_kl must not be NaN"):
        BetaState(last_kl=NAN)


# ================================================================================================ line search


class ScriptedEvaluate:
    """A fake ``evaluate``: records every α it is asked for and answers from a script.

    ``script`` is either a list of (kl, surrogate), one per call in order, or a callable α -> (kl, surrogate).
    """

    def __init__(self, script):
        self.script = script
        self.calls = []

    def __call__(self, alpha):
        self.calls.append(alpha)
        if callable(self.script):
            kl, surrogate = self.script(alpha)
        else:
            kl, surrogate = self.script[len(self.calls) - 1]
        return StepEval(alpha, kl, surrogate)


def quadratic(kl_full, surrogate=0.01):
    """KL(α) = α²·KL_full (second order in the step), a fixed surrogate."""
    return ScriptedEvaluate(lambda a: (a * a * kl_full, surrogate))


def test_line_search_full_step_inside_is_accepted_without_evaluating():
    # KL_full 0.03 <= 0.81·δ = 0.0405 -> α₀ = 1 ; surrogate 0.1 >= 0 -> the full step stands, no call
    full = StepEval(1.0, 0.03, 0.1)
    ev = quadratic(0.03)
    res = algos.line_search(ev, full, delta=0.05, beta=0.1)
    assert ev.calls == []
    assert (res.action, res.alpha, res.backtracks) == ("accept", 1.0, 0)
    assert res.committed is full and res.evaluations == (full,)
    assert res.kl == 0.03
    # β: err 0.03/0.05 − 1 = −0.4 -> −0.2 -> 0.08
    assert res.beta == pytest.approx(0.08)


def test_line_search_full_step_inside_but_surrogate_negative_halves():
    # α₀ = 1 is the full step itself (surrogate −0.1 < 0: rejected), so the calls are 0.5, 0.25, 0.125 (3 =
    # max_backtracks, not max_backtracks + 1); accept at 0.125 (third call): backtracks 3
    full = StepEval(1.0, 0.03, -0.1)
    ev = ScriptedEvaluate([(0.0075, -0.05), (0.002, -0.01), (0.0005, 0.001)])
    res = algos.line_search(ev, full, delta=0.05, beta=0.1, max_backtracks=3)
    assert ev.calls == [0.5, 0.25, 0.125]
    assert (res.action, res.alpha, res.backtracks) == ("accept", 0.125, 3)
    assert res.kl == 0.0005
    # one fewer halving allowed: give up after the 2 calls
    ev = ScriptedEvaluate([(0.0075, -0.05), (0.002, -0.01)])
    res = algos.line_search(ev, full, delta=0.05, beta=0.1, max_backtracks=2)
    assert ev.calls == [0.5, 0.25] and res.action == "give_up"


def test_line_search_first_try_lands_inside():
    # KL_full 0.2, δ 0.05: α₀ = 0.45 ; KL(0.45) = 0.45²·0.2 = 0.0405 <= 0.05 -> accept with one call
    full = StepEval(1.0, 0.2, 0.3)
    ev = quadratic(0.2)
    res = algos.line_search(ev, full, delta=0.05, beta=0.1)
    assert ev.calls == [pytest.approx(0.45)]
    assert res.action == "accept" and res.alpha == pytest.approx(0.45) and res.backtracks == 0
    assert res.kl == pytest.approx(0.0405)
    assert res.committed is res.evaluations[-1] and res.evaluations[0] is full and len(res.evaluations) == 2
    # β: err 0.2/0.05 − 1 = 3 -> 0.2 -> 0.12
    assert res.beta == pytest.approx(0.12)


def test_line_search_negative_surrogate_backtracks_once():
    # α₀ = 0.45: KL 0.0405 inside but L̂ = −0.01 < 0 -> halve ; α = 0.225: KL 0.010125, L̂ = 0.02 -> accept
    full = StepEval(1.0, 0.2, 0.3)
    ev = ScriptedEvaluate(lambda a: (a * a * 0.2, -0.01 if a > 0.3 else 0.02))
    res = algos.line_search(ev, full, delta=0.05, beta=0.1)
    assert ev.calls == [pytest.approx(0.45), pytest.approx(0.225)]
    assert (res.action, res.backtracks) == ("accept", 1)
    assert res.alpha == pytest.approx(0.225) and res.kl == pytest.approx(0.010125)
    # KL above δ at α₀ (not quadratic) is also a reason to halve: 0.06 > 0.05, then 0.02
    ev = ScriptedEvaluate([(0.06, 0.1), (0.02, 0.1)])
    res = algos.line_search(ev, full, delta=0.05, beta=0.1)
    assert res.alpha == pytest.approx(0.225) and res.kl == 0.02 and res.backtracks == 1
    # exactly on the boundary is inside; zero surrogate is "no worse than not moving"
    res = algos.line_search(ScriptedEvaluate([(0.05, 0.0)]), full, delta=0.05, beta=0.1)
    assert res.action == "accept" and res.backtracks == 0


def test_line_search_gives_up_after_max_backtracks_plus_one_calls():
    # nothing is ever acceptable: α₀ = 0.45, then 0.225, 0.1125, 0.05625 -> 4 = max_backtracks + 1 calls
    full = StepEval(1.0, 0.2, 0.3)
    ev = ScriptedEvaluate(lambda a: (1.0, 0.1))
    res = algos.line_search(ev, full, delta=0.05, beta=0.1, max_backtracks=3)
    assert ev.calls == pytest.approx([0.45, 0.225, 0.1125, 0.05625])
    assert (res.action, res.alpha, res.committed, res.backtracks) == ("give_up", 0.0, None, 3)
    assert res.kl == 0.0  # π_cur is kept
    assert len(res.evaluations) == 5 and res.evaluations[0] is full
    assert res.beta == pytest.approx(0.12)
    # max_backtracks = 0: exactly one call
    ev = ScriptedEvaluate(lambda a: (math.inf, 0.1))
    res = algos.line_search(ev, full, delta=0.05, beta=0.1, max_backtracks=0)
    assert len(ev.calls) == 1 and res.action == "give_up"
    # a NaN surrogate is never acceptable either
    ev = ScriptedEvaluate(lambda a: (0.001, NAN))
    assert algos.line_search(ev, full, delta=0.05, beta=0.1, max_backtracks=2).action == "give_up"


def test_line_search_non_finite_full_kl_starts_at_half():
    # KL_full inf or NaN: no scale to aim with -> α₀ = 0.5 ; it counts as an overshoot: β 0.1 -> 0.12
    for kl_full in (math.inf, NAN):
        full = StepEval(1.0, kl_full, 0.3)
        ev = quadratic(0.1)  # KL(0.5) = 0.025 <= 0.05
        res = algos.line_search(ev, full, delta=0.05, beta=0.1)
        assert ev.calls == [0.5]
        assert res.action == "accept" and res.alpha == 0.5 and res.kl == pytest.approx(0.025)
        assert res.beta == pytest.approx(0.12)


def test_line_search_bad_arguments():
    full = StepEval(1.0, 0.2, 0.3)
    with pytest.raises(ValueError, match=r"delta must be > 0, got delta=0"):
        algos.line_search(quadratic(0.2), full, delta=0, beta=0.1)
    with pytest.raises(ValueError, match=r"max_backtracks must be an integer >= 0, got max_backtracks=-1"):
        algos.line_search(quadratic(0.2), full, delta=0.05, beta=0.1, max_backtracks=-1)
    with pytest.raises(ValueError, match=r"max_backtracks must be an integer >= 0, got max_backtracks=True"):
        algos.line_search(quadratic(0.2), full, delta=0.05, beta=0.1, max_backtracks=True)
    with pytest.raises(ValueError, match=r"beta must be > 0"):
        algos.line_search(quadratic(0.2), full, delta=0.05, beta=0.0)


def test_line_search_committed_kl_never_exceeds_delta_property():
    # Random scripted sequences: KL_full from a wide range (and inf / NaN / negative k1 values), per-call KL that is
    # only roughly quadratic (lognormal noise, sometimes inf), surrogates of either sign (sometimes NaN).
    rng = np.random.default_rng(0)
    outcomes = {"accept": 0, "give_up": 0}
    for _ in range(400):
        delta = float(rng.uniform(0.005, 0.1))
        beta = float(rng.uniform(0.01, 1.0))
        kl_full = float(rng.choice([rng.lognormal(math.log(delta), 1.5), math.inf, NAN, -0.001]))
        full = StepEval(1.0, kl_full, float(rng.normal(0.02, 0.05)))
        base = kl_full if math.isfinite(kl_full) and kl_full > 0 else delta * 4

        def script(a, base=base):
            kl = math.inf if rng.random() < 0.1 else a * a * base * float(rng.lognormal(0.0, 0.7))
            s = NAN if rng.random() < 0.05 else float(rng.normal(0.01, 0.03))
            return kl, s

        m = int(rng.integers(0, 7))
        ev = ScriptedEvaluate(script)
        res = algos.line_search(ev, full, delta=delta, beta=beta, max_backtracks=m)
        outcomes[res.action] += 1
        assert res.kl <= delta
        assert res.beta == algos.adapt_beta(beta, kl_full if math.isfinite(kl_full) else math.inf, delta)
        # the α tried: α₀, α₀/2, α₀/4, ... (α₀ = 1 is the full step, not a call)
        a0 = algos.first_step_fraction(kl_full, delta) if math.isfinite(kl_full) else 0.5
        tried = [a0 * 0.5**k for k in range(m + 1)]
        expected_calls = tried[1:] if a0 == 1.0 else tried
        assert ev.calls == expected_calls[: len(ev.calls)]
        assert res.evaluations[0] is full and [e.alpha for e in res.evaluations[1:]] == ev.calls
        if res.action == "accept":
            assert res.committed.acceptable(delta)
            assert res.committed.kl <= delta and res.committed.surrogate >= 0.0
            assert res.alpha == res.committed.alpha == tried[res.backtracks]
            # it stopped at the first acceptable step: nothing before it was acceptable
            assert res.committed is (full if res.alpha == 1.0 else res.evaluations[-1])
            assert not any(e.acceptable(delta) for e in res.evaluations[1:-1])
        else:
            assert (res.alpha, res.committed, res.backtracks) == (0.0, None, m)
            assert len(ev.calls) == len(expected_calls)
            assert not any(e.acceptable(delta) for e in res.evaluations[1:])
    assert min(outcomes.values()) > 20, outcomes  # both outcomes were exercised


def test_line_search_beta_adapts_once_per_update_and_is_not_a_ratchet():
    # The same full step, with 0 and with 4 backtracks: β is adapt_beta(β, KL_full, δ) either way.
    full = StepEval(1.0, 0.2, 0.3)
    quick = algos.line_search(quadratic(0.2), full, delta=0.05, beta=0.1)
    slow = algos.line_search(ScriptedEvaluate([(1.0, 0.1)] * 4 + [(0.01, 0.1)]), full, delta=0.05, beta=0.1)
    assert (quick.backtracks, slow.backtracks) == (0, 4)
    assert quick.beta == slow.beta == algos.adapt_beta(0.1, 0.2, 0.05)
    # 10 updates alternating overshoot (KL_full = 1.2·δ: err +0.2, β·1.2, and 3 halvings before acceptance) and
    # undershoot (KL_full = δ/1.2: err −1/6, β·(5/6)): each pair multiplies β by 1.2·5/6 = 1, so β comes back to its
    # start. (The old rule multiplied β by 1.5 at every backtrack and never lowered it: 1.5^15 ≈ 438 here.)
    delta, state = 0.05, BetaState(beta=0.1)
    for i in range(10):
        if i % 2 == 0:
            full = StepEval(1.0, 1.2 * delta, 0.1)
            ev = ScriptedEvaluate([(0.9, 0.1), (0.8, 0.1), (0.07, 0.1), (0.01, 0.1)])
        else:
            full = StepEval(1.0, delta / 1.2, 0.1)
            ev = ScriptedEvaluate([(0.03, 0.1)])
        res = algos.line_search(ev, full, delta=delta, beta=state.beta)
        assert res.action == "accept"
        assert res.beta == pytest.approx(state.beta * (1.2 if i % 2 == 0 else 5 / 6))
        state = state.after_update(res.full.kl, res.beta, res.backtracks, res.action == "accept")
    assert state.beta == pytest.approx(0.1, rel=1e-12)
    assert (state.num_updates, state.num_backtracks, state.num_give_ups) == (10, 15, 0)
    assert state.last_kl == pytest.approx(delta / 1.2)


# ================================================================================================ certificate


def test_leave_one_out_centered_hand_values():
    # groups [a, a, b, b], returns [1, 0, 0, 1]: c = R − (other one's return) = [1−0, 0−1, 0−1, 1−0]
    c, usable = algos.leave_one_out_centered([1.0, 0.0, 0.0, 1.0], ["a", "a", "b", "b"])
    assert c.tolist() == [1.0, -1.0, -1.0, 1.0] and usable.tolist() == [True] * 4
    assert c.dtype == torch.float64
    # one group of 3, returns [1, 2, 3]: c = [1 − 2.5, 2 − 2, 3 − 1.5] = [−1.5, 0, 1.5]
    c, _ = algos.leave_one_out_centered(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7, 7, 7]))
    assert c.tolist() == [-1.5, 0.0, 1.5]
    # a lone trajectory has no baseline: c = 0 and not usable ; interleaved groups
    c, usable = algos.leave_one_out_centered([1.0, 5.0, 0.0], ["a", "z", "a"])
    assert c.tolist() == [1.0, 0.0, -1.0] and usable.tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"returns must be finite, got returns\[1\]=nan"):
        algos.leave_one_out_centered([1.0, NAN], ["a", "a"])
    with pytest.raises(ValueError, match=r"groups must have one entry per row"):
        algos.leave_one_out_centered([1.0, 0.0], ["a"])



def test_can_bound_needs_two_usable_trajectories_and_a_group_that_is_not_flat():
    # groups [a, a, b, b], returns [1, 0, 1, 1]: c = [1, −1, 0, 0]; group b is flat (c = 0 on both)
    c, usable = algos.leave_one_out_centered([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"])
    assert algos.can_bound(c, usable)
    held_b = usable & torch.tensor([False, False, True, True])
    assert not algos.can_bound(c, held_b)  # only the flat group held out: 0 ± 0 whatever the update did
    assert not algos.can_bound(c, usable & torch.tensor([True, False, False, False]))  # one trajectory: no SE
    assert algos.can_bound(c, usable & torch.tensor([True, False, True, False]))  # c = [1, 0]: informative

def _three_rows():
    # 3 messages of the updated agent (rows), 2 trajectories; padding holds NaN and must not be read.
    #   row 0, trajectory 0: tokens ln 2, ln 1.5 (message ratio 3)
    #   row 1, trajectory 1: token ln 0.5       (ratio 0.5)
    #   row 2, trajectory 0: token ln 0.5       (ratio 0.5)
    old = torch.tensor([[-1.0, -2.0, NAN], [-0.5, NAN, NAN], [-3.0, NAN, NAN]])
    new = old + torch.tensor([[LN(2.0), LN(1.5), NAN], [LN(0.5), NAN, NAN], [LN(0.5), NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    return old, new, mask, torch.tensor([0, 1, 0])


def test_trajectory_log_ratio_and_ratio_excess_hand_values():
    old, new, mask, rows = _three_rows()
    # log W: trajectory 0 = ln 2 + ln 1.5 + ln 0.5 = ln 1.5 ; trajectory 1 = ln 0.5 ; trajectory 2 (silent) = 0
    log_w = algos.trajectory_log_ratio(old, new, mask, rows, 3)
    assert log_w.dtype == torch.float64
    torch.testing.assert_close(log_w, torch.tensor([LN(1.5), LN(0.5), 0.0], dtype=torch.float64))
    # Σ_m (w_m − 1): trajectory 0 = (3 − 1) + (0.5 − 1) = 1.5 (≠ W − 1 = 0.5: two messages) ; trajectory 1 = −0.5
    excess = algos.trajectory_ratio_excess(old, new, mask, rows, 3)
    torch.testing.assert_close(excess, torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64))
    # the clamp acts on log W: ±0.5 -> [ln 1.5 = 0.405, −0.5, 0]
    torch.testing.assert_close(
        algos.trajectory_log_ratio(old, new, mask, rows, 3, log_ratio_clamp=0.5),
        torch.tensor([LN(1.5), -0.5, 0.0], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match=r"row_trajectory must lie in \[0, 1\)"):
        algos.trajectory_log_ratio(old, new, mask, rows, 1)
    bad = new.clone()
    bad[1, 0] = math.inf
    with pytest.raises(ValueError, match=r"new_log_prob must be finite on masked tokens, got new_log_prob\[1, 0\]"):
        algos.trajectory_ratio_excess(old, bad, mask, rows, 2)


def test_paired_gain_hand_values():
    # differences [1, 0, 0, 1]: mean 0.5 ; std (ddof 1) = sqrt(4·0.25/3) = 0.5773503 ; SE = 0.5773503/2 = 0.2886751
    g = algos.paired_gain([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0])
    assert (g.mean, g.n) == (0.5, 4)
    assert g.se == pytest.approx(0.2886751, abs=1e-7)
    assert g.lower(1.645) == pytest.approx(0.5 - 1.645 * 0.2886751, abs=1e-7)
    assert math.isinf(algos.paired_gain([1.0], [0.0]).se)  # one pair: no spread estimate
    with pytest.raises(ValueError, match=r"must be 1-D of one shape"):
        algos.paired_gain([1.0, 0.0], [0.0])
    with pytest.raises(ValueError, match=r"must be finite"):
        algos.paired_gain([NAN], [0.0])


def test_importance_gain_hand_values():
    # W = [1.5, 0.5, 1, 2], c = [1, −1, 2, −0.5] -> (W − 1)·c = [0.5, 0.5, 0, −0.5]: mean 0.125
    #   deviations [0.375, 0.375, −0.125, −0.625], Σ² = 0.6875, /3 -> std 0.4787136 -> SE 0.2393568
    log_w = torch.log(torch.tensor([1.5, 0.5, 1.0, 2.0], dtype=torch.float64))
    c = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64)
    g = algos.importance_gain(log_w, c)
    assert g.mean == pytest.approx(0.125) and g.se == pytest.approx(0.2393568, abs=1e-7) and g.n == 4
    # usable drops the last one: [0.5, 0.5, 0] -> 1/3 ; NaN on an unusable trajectory is not read
    g = algos.importance_gain(
        torch.cat([log_w[:3], torch.tensor([NAN], dtype=torch.float64)]), c, usable=[True, True, True, False]
    )
    assert g.mean == pytest.approx(1 / 3) and g.n == 3
    # prior_log_w multiplies: M = [2, 1, 1, 1] -> [1.0, 0.5, 0, −0.5] -> 0.25
    g = algos.importance_gain(log_w, c, prior_log_w=torch.log(torch.tensor([2.0, 1.0, 1.0, 1.0])))
    assert g.mean == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"no usable terms"):
        algos.importance_gain(log_w, c, usable=[False] * 4)
    with pytest.raises(ValueError, match=r"log_w must be finite on usable trajectories"):
        algos.importance_gain(torch.tensor([NAN, 0.0], dtype=torch.float64), c[:2])


# W both sides of the clip range [0.8, 1.2], c of both signs:
#   τ0  W 1.5, c  1   : min(1.5, 1.2) = 1.2      -> − c -> 0.2   (clipped: the optimism is cut)
#   τ1  W 0.5, c −1   : min(−0.5, −0.8) = −0.8   -> + 1 -> 0.2   (clipped)
#   τ2  W 1,   c  2   : 2 − 2                            -> 0
#   τ3  W 2,   c −0.5 : min(−1, −0.6) = −1       -> +0.5 -> −0.5 (unclipped: the loss is kept in full)
#   τ4  W 0.7, c  1   : min(0.7, 0.8) = 0.7      -> − 1 -> −0.3  (unclipped)
#   point = mean[0.2, 0.2, 0, −0.5, −0.3] = −0.08 ; deviations [0.28, 0.28, 0.08, −0.42, −0.22], Σ² = 0.388,
#   /4 = 0.097 -> std 0.3114482 -> SE 0.3114482/√5 = 0.1392839 ; bound = −0.08 − 1.645·0.1392839 = −0.3091220
#   ĝ = mean (W − 1)·c = mean[0.5, 0.5, 0, −0.5, −0.3] = 0.04
IS_W = [1.5, 0.5, 1.0, 2.0, 0.7]
IS_C = [1.0, -1.0, 2.0, -0.5, 1.0]


def test_is_lower_bound_hand_values():
    log_w = torch.log(torch.tensor(IS_W, dtype=torch.float64))
    c = torch.tensor(IS_C, dtype=torch.float64)
    b = algos.is_lower_bound(log_w, c, clip_ratio=0.2, t=1.645)
    assert (b.form, b.penalty, b.n) == ("is_lcb", 0.0, 5)
    assert b.point == pytest.approx(-0.08)
    assert b.se == pytest.approx(0.1392839, abs=1e-7)
    assert b.bound == pytest.approx(b.point - 1.645 * b.se) and b.bound == pytest.approx(-0.3091220, abs=1e-7)
    assert b.estimate.mean == pytest.approx(0.04)
    json.dumps(b.to_dict())
    # ε = 0: min(W·c, c) − c = min((W − 1)·c, 0) = [0, 0, 0, −0.5, −0.3] -> −0.16 ; t = 0: bound = point
    b0 = algos.is_lower_bound(log_w, c, clip_ratio=0.0, t=0.0)
    assert b0.point == pytest.approx(-0.16) and b0.bound == b0.point
    # a huge ε never clips: point = ĝ
    assert algos.is_lower_bound(log_w, c, clip_ratio=10.0).point == pytest.approx(0.04)
    # prior M = 2 on every trajectory doubles the point
    assert algos.is_lower_bound(log_w, c, prior_log_w=torch.full((5,), LN(2.0))).point == pytest.approx(-0.16)


def test_theorem_constant_and_bound_hand_values():
    # √2·ε·n_j·(n_j − 1): n_j = 1 -> 0 ; (1, 2) -> 2√2 ; (0.5, 3) -> √2·0.5·3·2 = 3√2
    assert algos.theorem_constant(1.0, 1) == 0.0
    assert algos.theorem_constant(1.0, 2) == pytest.approx(2 * math.sqrt(2))
    assert algos.theorem_constant(0.5, 3) == pytest.approx(3 * math.sqrt(2))
    with pytest.raises(ValueError, match=r"agent_turns must be > 0, got agent_turns=0"):
        algos.theorem_constant(1.0, 0)
    with pytest.raises(ValueError, match=r"return_range must be >= 0, got return_range=-1"):
        algos.theorem_constant(-1, 2)
    log_w = torch.log(torch.tensor(IS_W, dtype=torch.float64))
    c = torch.tensor(IS_C, dtype=torch.float64)
    # n_j = 1 (ratio_excess = W − 1): no penalty even with a large d̂; point and SE are ĝ's exactly
    g = algos.importance_gain(log_w, c)
    b1 = algos.theorem_bound(torch.exp(log_w) - 1, log_w, c, kl=0.3, return_range=1.0, agent_turns=1, t=1.645)
    assert (b1.form, b1.penalty) == ("theorem", 0.0)
    assert b1.point == pytest.approx(g.mean, abs=1e-15) and b1.se == pytest.approx(g.se, abs=1e-15)
    assert b1.bound == pytest.approx(g.mean - 1.645 * g.se, abs=1e-15)
    # n_j = 2, d̂ = 0.02: penalty = 2√2·√0.02 = 2·√0.04 = 0.4 ; excess [1, 1, 0, 0, 0] -> point mean(c[:2]·1) = 0
    excess = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    b2 = algos.theorem_bound(excess, log_w, c, kl=0.02, return_range=1.0, agent_turns=2, t=0.0)
    assert b2.penalty == pytest.approx(0.4) and b2.point == pytest.approx(0.0)
    assert b2.bound == pytest.approx(-0.4) and b2.estimate.mean == pytest.approx(0.04)
    # a (k1) negative d̂ counts as 0
    assert algos.theorem_bound(excess, log_w, c, kl=-0.01, return_range=1.0, agent_turns=2).penalty == 0.0


def test_update_bound_dispatches():
    log_w = torch.log(torch.tensor(IS_W, dtype=torch.float64))
    c = torch.tensor(IS_C, dtype=torch.float64)
    kw = dict(
        log_w=log_w,
        centered=c,
        ratio_excess=torch.exp(log_w) - 1,
        kl=0.02,
        return_range=1.0,
        agent_turns=2,
        clip_ratio=0.1,
        t=1.0,
    )
    assert algos.update_bound("is_lcb", **kw) == algos.is_lower_bound(log_w, c, clip_ratio=0.1, t=1.0)
    assert algos.update_bound("theorem", **kw) == algos.theorem_bound(
        torch.exp(log_w) - 1, log_w, c, 0.02, 1.0, 2, t=1.0
    )
    with pytest.raises(ValueError, match=r"form must be one of \['is_lcb', 'theorem'\], got form='kl'"):
        algos.update_bound("kl", **kw)


def test_surrogate_gain_hand_values():
    # row 0: tokens of prob 0.5, 0.5 ; Ã = +1 ; new raises token 0 to 0.55 (ρ = [1.1, 1])
    #   token level:   tokmean[min(1.1, 1.1), 1] − 1 = 1.05 − 1 = 0.05
    #   message level: ρ = 1.1 on both tokens    -> 1.1 − 1 = 0.1
    # row 1: one token 0.5 -> 0.25 (ρ 0.5), Ã = −2, padding NaN: min(−1, 0.8·−2 = −1.6) + 2 = 0.4 (either level)
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, NAN]]))
    new = torch.log(torch.tensor([[0.55, 0.5], [0.25, NAN]]))
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    assert algos.surrogate_gain(old[:1], new[:1], adv[:1], mask[:1]) == pytest.approx(0.05)
    assert algos.surrogate_gain(old[:1], new[:1], adv[:1], mask[:1], ratio_level="message") == pytest.approx(0.1)
    assert algos.surrogate_gain(old, new, adv, mask) == pytest.approx((0.05 + 0.4) / 2)
    assert algos.surrogate_gain(old, new, adv, mask, ratio_level="message") == pytest.approx((0.1 + 0.4) / 2)
    # no move: exactly 0 ; lowering the positive token (ρ 0.9): 0.95 − 1 = −0.05 ; a big raise is capped by the clip
    assert algos.surrogate_gain(old, old.clone(), adv, mask) == 0.0
    lower = torch.log(torch.tensor([[0.45, 0.5]]))
    assert algos.surrogate_gain(old[:1], lower, adv[:1], mask[:1]) == pytest.approx(-0.05)
    big = torch.log(torch.tensor([[1.0, 0.5]]))  # ρ = [2, 1] -> tokmean[1.2, 1] − 1 = 0.1
    assert algos.surrogate_gain(old[:1], big, adv[:1], mask[:1]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"all-False mask"):
        algos.surrogate_gain(old, new, adv, torch.zeros(2, 2, dtype=torch.bool))


# ================================================================================ exact checks on tiny teams
#
# A turn-based team with a secret x ∈ {0, 1} (uniform; it plays the prompt) and binary messages. Each turn is
# (agent, state function of (x, earlier messages)); an agent's policy is a softmax table over its states. Every
# trajectory is enumerated, so J, ΔJ and the expectation of every estimator over τ ~ π_cur are exact sums.


class TinyTeam:
    def __init__(self, turns, reward, n_states):
        self.turns, self.n_states = turns, n_states
        rows = []
        for x in (0, 1):
            for acts in itertools.product((0, 1), repeat=len(turns)):
                rows.append((x, acts))
        self.x = np.array([x for x, _ in rows])
        self.actions = np.array([a for _, a in rows])  # (N, T)
        self.states = np.array([[fn(x, a[:t]) for t, (_, fn) in enumerate(turns)] for x, a in rows])  # (N, T)
        self.R = np.array([reward(x, a) for x, a in rows], dtype=np.float64)
        self.N = len(rows)

    def msg_prob(self, tables, t):
        agent = self.turns[t][0]
        return tables[agent][self.states[:, t], self.actions[:, t]]

    def prob(self, tables):
        p = np.full(self.N, 0.5)
        for t in range(len(self.turns)):
            p = p * self.msg_prob(tables, t)
        return p

    def agent_turns(self, agent):
        return [t for t, (a, _) in enumerate(self.turns) if a == agent]


def softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def chain_team():
    # A sees x, says a ; B sees a, says b ; R = 1[b == x]
    return TinyTeam([("A", lambda x, h: x), ("B", lambda x, h: h[0])], lambda x, h: float(h[1] == x), {"A": 2, "B": 2})


def aba_team():
    # A sees x, says a1 ; B sees a1, says b ; A sees the transcript (x, a1, b), says a2 ;
    # R = (1[b == x] + 1[a2 == x])/2 ∈ [0, 1], so |R − baseline| <= 1 = ε
    return TinyTeam(
        [("A", lambda x, h: x), ("B", lambda x, h: h[0]), ("A", lambda x, h: 2 + 4 * x + 2 * h[0] + h[1])],
        lambda x, h: (float(h[1] == x) + float(h[2] == x)) / 2,
        {"A": 10, "B": 2},
    )


def random_update(team, rng, agent, scale):
    cur_logits = {k: rng.normal(0.0, 1.5, size=(n, 2)) for k, n in team.n_states.items()}
    cur = {k: softmax(v) for k, v in cur_logits.items()}
    new = dict(cur)
    new[agent] = softmax(cur_logits[agent] + rng.normal(0.0, scale, size=(team.n_states[agent], 2)))
    return cur, new


def exact_update(team, cur, new, agent):
    """Everything exact about one update of ``agent``, through the real per-row -> per-trajectory functions.

    The agent's messages become rows (one token each, plus a NaN-padded column); row_trajectory maps them back.
    """
    turns = team.agent_turns(agent)
    p_cur, p_new = team.prob(cur), team.prob(new)
    old_lp = np.concatenate([np.log(team.msg_prob(cur, t)) for t in turns])
    new_lp = np.concatenate([np.log(team.msg_prob(new, t)) for t in turns])
    pad = np.full_like(old_lp, np.nan)
    old_rows = torch.tensor(np.stack([old_lp, pad], 1))
    new_rows = torch.tensor(np.stack([new_lp, pad], 1))
    mask = torch.tensor([[True, False]] * len(old_lp))
    row_traj = torch.arange(team.N).repeat(len(turns))
    log_w = algos.trajectory_log_ratio(old_rows, new_rows, mask, row_traj, team.N)
    excess = algos.trajectory_ratio_excess(old_rows, new_rows, mask, row_traj, team.N)
    # per-prompt baseline b(x) = E_cur[R | x]: what the leave-one-out baseline averages to (see the MC test)
    v = np.array([(p_cur * team.R)[team.x == x].sum() / p_cur[team.x == x].sum() for x in (0, 1)])
    c = torch.tensor(team.R - v[team.x])
    # d = mean over the agent's messages of E_{s ~ π_cur} KL(π_cur(·|s) ‖ π_new(·|s)), exact
    kl_state = (cur[agent] * (np.log(cur[agent]) - np.log(new[agent]))).sum(-1)
    d = float(np.mean([(p_cur * kl_state[team.states[:, t]]).sum() for t in turns]))
    # k1 (−log r) is unbiased for it: the exact expectation of the Eq. 11 monitor equals d
    k1 = -(new_lp - old_lp).reshape(len(turns), team.N)
    assert (p_cur * k1).sum(-1).mean() == pytest.approx(d, abs=1e-12)
    # E_{τ~π_cur}[f(τ)] = mean_τ[N·p_cur(τ)·f(τ)]: pass log(N·p_cur) as prior_log_w (a weight M) to the real
    # estimators, so their "point" is the exact expectation of their per-trajectory term
    weight = torch.tensor(np.log(team.N * p_cur))
    return dict(
        gain=float((p_new * team.R).sum() - (p_cur * team.R).sum()),
        p_cur=p_cur,
        log_w=log_w,
        excess=excess,
        c=c,
        d=d,
        weight=weight,
    )


def test_exact_chain_team_is_lcb_is_a_lower_bound_and_ranks_updates():
    team = chain_team()
    rng = np.random.default_rng(1)
    points, gains, clipped = [], [], 0
    for i in range(60):
        agent = "A" if i % 2 == 0 else "B"
        # small logit perturbations, as a trust region keeps them (σ up to 1 makes the clipped point
        # much more pessimistic on the big steps and its rank correlation drops to ≈ 0.7)
        cur, new = random_update(team, rng, agent, scale=float(rng.uniform(0.02, 0.5)))
        ex = exact_update(team, cur, new, agent)
        w, c, p = torch.exp(ex["log_w"]).numpy(), ex["c"].numpy(), ex["p_cur"]
        # ĝ is unbiased: E[(W − 1)·c] = ΔJ for any baseline constant within a prompt (E[W − 1 | x] = 0)
        g = algos.importance_gain(ex["log_w"], ex["c"], prior_log_w=ex["weight"])
        assert g.mean == pytest.approx(ex["gain"], abs=1e-12)
        # the is_lcb point: E[min(W·c, clip(W)·c) − c], by hand and through is_lower_bound
        by_hand = float((p * (np.minimum(w * c, np.clip(w, 0.8, 1.2) * c) - c)).sum())
        point = algos.is_lower_bound(ex["log_w"], ex["c"], prior_log_w=ex["weight"], clip_ratio=0.2).point
        assert point == pytest.approx(by_hand, abs=1e-12)
        # its expectation is a lower bound on the exact gain, tight when no W leaves [0.8, 1.2]
        assert point <= ex["gain"] + 1e-12
        if np.all((w >= 0.8) & (w <= 1.2)):
            assert point == pytest.approx(ex["gain"], abs=1e-12)
        else:
            clipped += 1
        # theorem form with n_j = 1: the first-order surrogate IS ΔJ, no penalty
        thm = algos.theorem_bound(
            ex["excess"],
            ex["log_w"],
            ex["c"],
            kl=ex["d"],
            return_range=1.0,
            agent_turns=1,
            prior_log_w=ex["weight"],
            t=0.0,
        )
        assert thm.penalty == 0.0 and thm.bound == pytest.approx(ex["gain"], abs=1e-12)
        points.append(point)
        gains.append(ex["gain"])
    assert clipped >= 10 and 60 - clipped >= 10, clipped  # both regimes were exercised
    rho = algos.spearman_rank_correlation(points, gains)
    assert rho > 0.7, rho


def test_exact_aba_team_theorem_bound_holds_and_is_needed():
    # A speaks twice (n_j = 2): ΔJ − first-order point = E[(w1 − 1)(w2 − 1)·c] ≠ 0, of either sign; the penalty
    # √2·ε·n_j·(n_j − 1)·sqrt(d) = 2√2·sqrt(d) must cover it for every update.
    team = aba_team()
    rng = np.random.default_rng(2)
    overshoots, worst = 0, -math.inf
    for _ in range(60):
        cur, new = random_update(team, rng, "A", scale=float(rng.uniform(0.1, 2.0)))
        ex = exact_update(team, cur, new, "A")
        thm = algos.theorem_bound(
            ex["excess"],
            ex["log_w"],
            ex["c"],
            kl=ex["d"],
            return_range=1.0,
            agent_turns=2,
            prior_log_w=ex["weight"],
            t=0.0,
        )
        # the point by hand: E[(w1 + w2 − 2)·c]
        assert thm.point == pytest.approx(
            float((ex["p_cur"] * ex["excess"].numpy() * ex["c"].numpy()).sum()), abs=1e-12
        )
        assert thm.penalty == pytest.approx(2 * math.sqrt(2) * math.sqrt(ex["d"]))
        assert thm.bound <= ex["gain"] + 1e-12, (thm.point, thm.penalty, ex["gain"])
        overshoots += thm.point > ex["gain"] + 1e-9
        worst = max(worst, (thm.point - ex["gain"]) / thm.penalty)
        # is_lcb on the same update: a lower bound in expectation as well
        assert algos.is_lower_bound(ex["log_w"], ex["c"], prior_log_w=ex["weight"]).point <= ex["gain"] + 1e-12
    # without the penalty the first-order point would overstate the gain on a good share of the updates
    assert overshoots >= 10, overshoots
    assert 0.0 < worst < 1.0, worst


def test_monte_carlo_with_leave_one_out_baseline():
    # The real estimator: groups of G = 8 trajectories of one prompt x, leave_one_out_centered, is_lower_bound.
    # The LOO baseline does not depend on τ's own sample, so E[(W − 1)·c] = ΔJ (ĝ unbiased) and, pointwise,
    # min(W·c, clip(W)·c) ≤ W·c gives E[point] ≤ ΔJ. Also min(W·c, clip(W)·c) − c is concave in c and
    # E[LOO baseline | x] = b(x), so by Jensen E[point with LOO] ≤ E[point with b(x)] (the exact value above).
    team = chain_team()
    rng = np.random.default_rng(3)
    G, groups_per_batch, batches = 8, 32, 100
    for k in range(3):
        agent = "AB"[k % 2]
        cur, new = random_update(team, rng, agent, scale=0.8)
        ex = exact_update(team, cur, new, agent)
        exact_point = algos.is_lower_bound(ex["log_w"], ex["c"], prior_log_w=ex["weight"]).point
        p, log_w = ex["p_cur"], ex["log_w"].numpy()
        cond = [np.where(team.x == x, 2 * p, 0.0) for x in (0, 1)]  # p(τ | x)
        points, ests = [], []
        for _ in range(batches):
            xs = rng.integers(0, 2, groups_per_batch)
            idx = np.concatenate([rng.choice(team.N, size=G, p=cond[x]) for x in xs])
            centered, usable = algos.leave_one_out_centered(team.R[idx], np.repeat(np.arange(groups_per_batch), G))
            b = algos.is_lower_bound(torch.tensor(log_w[idx]), centered, usable)
            points.append(b.point)
            ests.append(b.estimate.mean)
        mc_se = np.std(points, ddof=1) / math.sqrt(batches)
        est_se = np.std(ests, ddof=1) / math.sqrt(batches)
        assert np.mean(points) <= ex["gain"] + 3 * mc_se
        assert np.mean(points) <= exact_point + 3 * mc_se
        assert abs(np.mean(ests) - ex["gain"]) <= 4 * est_se


# ================================================================================================ calibration


def test_calibration_fraction():
    # bounds [0, 1, 2], gains [0.5, 0.5, 2] -> [ok, violated, ok (equality counts)] -> 2/3
    assert algos.calibration_fraction([0.0, 1.0, 2.0], [0.5, 0.5, 2.0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"gains must have the shape of bounds"):
        algos.calibration_fraction([0.0, 1.0], [0.5])
    with pytest.raises(ValueError, match=r"gains must be finite, got gains\[0\]=nan"):
        algos.calibration_fraction([0.0], [NAN])
    with pytest.raises(ValueError, match=r"bounds must be non-empty"):
        algos.calibration_fraction([], [])



def test_calibration_fraction_counts_the_gains_own_noise():
    # bounds [0, 1, 2, 0], gains [-0.2, 0.5, 1.0, -0.5], SEs [0.2, 0.2, 0.5, 0.1]:
    #   exact reading: [violated, violated, violated, violated] -> 0
    #   upper limits gain + 1.645 SE = [0.129, 0.829, 1.8225, -0.3355] -> [ok, violated, violated, violated] -> 1/4
    #   with z 2: [0.2, 0.9, 2.0, -0.3] -> [ok, violated, ok (equality counts), violated] -> 2/4
    bounds, gains, se = [0.0, 1.0, 2.0, 0.0], [-0.2, 0.5, 1.0, -0.5], [0.2, 0.2, 0.5, 0.1]
    assert algos.calibration_fraction(bounds, gains) == 0.0
    assert algos.calibration_fraction(bounds, gains, se) == pytest.approx(1 / 4)
    assert algos.calibration_fraction(bounds, gains, se, z=2.0) == pytest.approx(2 / 4)
    # SE 0 is an exact gain: the plain fraction
    assert algos.calibration_fraction(bounds, gains, [0.0] * 4) == 0.0
    with pytest.raises(ValueError, match=r"gain_se must be >= 0, got gain_se\[1\]=-0.1"):
        algos.calibration_fraction([0.0, 0.0], [0.0, 0.0], [0.1, -0.1])
    with pytest.raises(ValueError, match=r"gain_se must have the shape of gains"):
        algos.calibration_fraction([0.0, 0.0], [0.0, 0.0], [0.1])
    with pytest.raises(ValueError, match=r"z must be > 0, got z=0"):
        algos.calibration_fraction([0.0], [0.0], [0.1], z=0)

def test_average_ranks_and_spearman_hand_values():
    # ranks of [10, 20, 20, 30] = [1, 2.5, 2.5, 4]
    assert algos.average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    # no ties: d = [0, 1, 1, 0] -> 1 − 6·2/(4·15) = 0.8
    assert algos.spearman_rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks x [1, 2.5, 2.5, 4], y [1, 3, 2, 4]; centred x [−1.5, 0, 0, 1.5], y [−1.5, .5, −.5, 1.5]
    #   ρ = 4.5 / sqrt(4.5 · 5) = 0.9486833
    assert algos.spearman_rank_correlation([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-7)
    assert algos.spearman_rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(algos.spearman_rank_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match=r"at least 2 values"):
        algos.spearman_rank_correlation([1], [1])
    # cumulative: bounds [1, −1, 2] -> cumsum [1, 0, 2] (ranks [2, 1, 3]) ; gains 0.5 each -> [0.5, 1, 1.5]
    #   (ranks [1, 2, 3]) -> d = [1, 1, 0] -> 1 − 6·2/(3·8) = 0.5
    assert algos.cumulative_spearman([1.0, -1.0, 2.0], [0.5, 0.5, 0.5]) == pytest.approx(0.5)


def _ranks_loop(x):
    return [sum(1 for y in x if y < v) + (sum(1 for y in x if y == v) + 1) / 2 for v in x]


@pytest.mark.parametrize("n,seed", [(5, 0), (40, 1), (200, 2)])
def test_spearman_loop_reference(n, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, n).astype(float), rng.integers(0, 4, n) + 0.1 * rng.integers(0, 3, n)
    rx, ry = np.array(_ranks_loop(list(x))), np.array(_ranks_loop(list(y)))
    assert algos.average_ranks(x).tolist() == rx.tolist()
    ref = np.corrcoef(rx, ry)[0, 1]
    assert algos.spearman_rank_correlation(x, y) == pytest.approx(ref, rel=1e-12, abs=1e-12)


# ================================================================================================ HAPPO factor


def test_happo_factor_hand_values():
    # Σ_{k<i} log W_k = ln [3, 0.8, 0.25] -> M = [3, 0.8, 0.25] ; clipped to (0.5, 2): [2, 0.8, 0.5]
    prior = torch.log(torch.tensor([3.0, 0.8, 0.25]))
    torch.testing.assert_close(algos.happo_factor(prior), torch.tensor([2.0, 0.8, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        algos.happo_factor(prior, clip_range=None), torch.tensor([3.0, 0.8, 0.25], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match=r"clip_range must satisfy 0 < low <= 1 <= high"):
        algos.happo_factor(prior, clip_range=(1.5, 2.0))
    with pytest.raises(ValueError, match=r"prior_log_w must be finite"):
        algos.happo_factor(torch.tensor([math.inf]))


# ================================================================================================ purity


def test_import_algos_pulls_no_ray_vllm_or_verl():
    code = (
        "import sys, teamtr_verl.algos\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'verl'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
