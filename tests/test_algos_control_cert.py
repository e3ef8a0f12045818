"""β controller and δ enforcement, the certificate proxy (Thm. 3.4/3.6, finite-horizon and discounted forms),
its calibration helpers, the HAPPO importance factor, and the purity of ``import teamtr_verl.algos``."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from teamtr_verl import algos
from teamtr_verl.algos import BetaState, UpdateRecord

# ------------------------------------------------------------------------------------------------ β controller


def test_beta_state_round_trip_and_validation():
    s = BetaState(beta=0.25, tries=1, num_updates=3, num_backtracks=4, num_give_ups=1, last_kl=0.02)
    assert BetaState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match=r"unknown keys \['betta'\]"):
        BetaState.from_dict({"betta": 1.0})
    with pytest.raises(ValueError, match=r"beta must be > 0, got beta=0"):
        BetaState(beta=0)
    with pytest.raises(ValueError, match=r"tries must be an integer >= 0, got tries=-1"):
        BetaState(tries=-1)


def test_adapt_beta_hand_values():
    # β·(1 + clip(kl/target − 1, ±0.2)·n/h):
    #   kl 0.015, target 0.01 -> err 0.5 -> 0.2 -> 1.2 ; kl 0.009 -> −0.1 -> 0.9 ; kl 0 -> −1 -> −0.2 -> 0.8
    #   horizon 10: 1 + 0.2/10 = 1.02
    assert algos.adapt_beta(1.0, 0.015, 0.01) == pytest.approx(1.2)
    assert algos.adapt_beta(1.0, 0.009, 0.01) == pytest.approx(0.9)
    assert algos.adapt_beta(1.0, 0.0, 0.01) == pytest.approx(0.8)
    assert algos.adapt_beta(1.0, 0.05, 0.01, horizon=10) == pytest.approx(1.02)
    assert algos.adapt_beta(1.0, 0.05, 0.01, beta_max=1.1) == 1.1
    with pytest.raises(ValueError, match=r"target_kl must be > 0, got target_kl=0"):
        algos.adapt_beta(1.0, 0.0, 0)


def test_decision_accept_adapts_beta():
    # kl 0.005 <= δ 0.01: accept; err = 0.005/0.01 − 1 = −0.5 -> −0.2: β 0.1 -> 0.08; tries reset, update counted.
    d = algos.trust_region_decision(BetaState(beta=0.1, tries=2), 0.005, 0.01)
    assert (d.action, d.tries) == ("accept", 2)
    assert d.beta == pytest.approx(0.08) and d.state.beta == d.beta
    assert (d.state.tries, d.state.num_updates, d.state.last_kl) == (0, 1, 0.005)
    # exactly on the boundary is inside the region; a negative raw k1 value is inside too
    assert algos.trust_region_decision(BetaState(), 0.01, 0.01).action == "accept"
    assert algos.trust_region_decision(BetaState(), -0.003, 0.01).action == "accept"


def test_decision_backtrack_then_give_up():
    # M = 2, factor 1.5, kl always 0.05 > δ 0.01:
    #   backtrack β 0.1 -> 0.15 (tries 1) ; backtrack 0.15 -> 0.225 (tries 2) ; give up 0.225 -> 0.3375, tries reset.
    s = BetaState(beta=0.1)
    actions = []
    for _ in range(3):
        d = algos.trust_region_decision(s, 0.05, 0.01, max_backtracks=2)
        actions.append((d.action, d.tries, round(d.beta, 6)))
        s = d.state
    assert actions == [("backtrack", 1, 0.15), ("backtrack", 2, 0.225), ("give_up", 2, 0.3375)]
    assert (s.tries, s.num_updates, s.num_backtracks, s.num_give_ups) == (0, 1, 2, 1)
    assert algos.trust_region_decision(BetaState(), 1.0, 0.01, max_backtracks=0).action == "give_up"
    assert algos.trust_region_decision(BetaState(), math.inf, 0.01).action == "backtrack"
    json.dumps(d.to_dict())  # serialisable


@pytest.mark.parametrize("delta", [0.0, -0.1])
def test_decision_bad_delta(delta):
    with pytest.raises(ValueError, match=rf"delta must be > 0, got delta={delta}"):
        algos.trust_region_decision(BetaState(), 0.001, delta)


def test_decision_bad_kl_and_options():
    with pytest.raises(ValueError, match=r"measured_kl must not be NaN"):
        algos.trust_region_decision(BetaState(), float("nan"), 0.01)
    with pytest.raises(ValueError, match=r"backtrack_factor must be > 1, got backtrack_factor=1.0"):
        algos.trust_region_decision(BetaState(), 0.1, 0.01, backtrack_factor=1.0)
    with pytest.raises(ValueError, match=r"max_backtracks must be an integer >= 0"):
        algos.trust_region_decision(BetaState(), 0.1, 0.01, max_backtracks=-1)
    with pytest.raises(ValueError, match=r"state must be a BetaState"):
        algos.trust_region_decision({"beta": 0.1}, 0.1, 0.01)


# ------------------------------------------------------------------------------------------------ surrogate terms


def test_surrogate_terms_hand_values():
    # Two messages (one row each), message ratio, ε = 0.2, G = 5 trajectories per group:
    #   m0: log w = ln 1.1 (over 2 tokens) -> ρ = 1.1, ρ̄ = 1.1; Ã = 1, z = 1.5 (clipped by A_clip = 1)
    #       surrogate min(1.1, 1.1) = 1.1 -> gain g0 = 0.1 ; clip term max(ρ, ρ̄)·|z − Ã| = 1.1·0.5 = 0.55
    #   m1: log w = ln 0.5 -> ρ = 0.5, ρ̄ = 0.8; Ã = −1, z = −1
    #       surrogate min(−0.5, −0.8) = −0.8 -> gain g1 = −0.8 + 1 = 0.2 ; clip term 0
    #   L̂ = 0.15 ; ζ_clip = 0.275 ; ζ_ratio = std([0.1, 0.2], ddof 1)/sqrt(2) = 0.0707107/1.4142136 = 0.05
    #   ζ_norm = mean(|1.1−1|, |0.5−1|)/sqrt(4) + |L̂|/sqrt(2·4) = 0.15 + 0.15·0.3535534 = 0.2030330
    old = torch.zeros(2, 3)
    new = torch.tensor([[math.log(1.1), 0.0, 9.0], [math.log(0.5), 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    t = algos.surrogate_terms(old, new, torch.tensor([1.0, -1.0]), torch.tensor([1.5, -1.0]), 5, mask)
    assert t.surrogate_gain == pytest.approx(0.15, abs=1e-6)
    assert t.zeta_clip == pytest.approx(0.275, abs=1e-6)
    assert t.zeta_ratio == pytest.approx(0.05, abs=1e-6)
    assert t.zeta_norm == pytest.approx(0.2030330, abs=1e-6)
    assert t.num_messages == 2
    # Token-level advantages (bs, T) give the same result (masked token mean per row).
    t2 = algos.surrogate_terms(
        old,
        new,
        torch.tensor([[1.0, 1, 0], [-1, 0, 0]]),
        torch.tensor([[1.5, 1.5, 0], [-1, 0, 0]]),
        torch.tensor([5, 5]),
        mask,
    )
    assert t2 == t


def test_surrogate_terms_zero_at_no_update():
    # π_new = π_cur: ρ = 1 -> gain 0, ζ_ratio 0, ζ_norm 0; only the advantage clipping remains: mean |z − Ã| = 0.25
    old = -torch.rand(2, 4)
    t = algos.surrogate_terms(
        old, old.clone(), torch.tensor([2.0, -1.0]), torch.tensor([2.5, -1.0]), 4, torch.ones(2, 4), ratio_level="token"
    )
    assert (t.surrogate_gain, t.zeta_ratio, t.zeta_norm) == (0.0, 0.0, 0.0)
    assert t.zeta_clip == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ certificate


def test_certificate_constants():
    # discounted, γ = 0.5, A_max = 1: sqrt(2)·0.5·1/0.25 = 2.8284271 ; κ = 1/(1 − 0.5) = 2
    assert algos.certificate_constant(1.0, form="discounted", gamma=0.5) == pytest.approx(2 * math.sqrt(2))
    assert algos.horizon_multiplier(form="discounted", gamma=0.5) == pytest.approx(2.0)
    # finite horizon, H = 3, agent writes n_j = 1 message, A_max = 5: sqrt(2)·5·(3 − 1)·1 = 14.1421356 ; κ = 1
    assert algos.certificate_constant(5.0, horizon=3, agent_turns=1) == pytest.approx(10 * math.sqrt(2))
    assert algos.horizon_multiplier(horizon=3, agent_turns=1) == 1.0
    # default n_j = H (every turn could be the agent's): sqrt(2)·5·2·3
    assert algos.certificate_constant(5.0, horizon=3) == pytest.approx(30 * math.sqrt(2))
    # one message per episode (stock single-agent verl): no later state, no occupancy shift, c = 0
    assert algos.certificate_constant(5.0, horizon=1) == 0.0
    with pytest.raises(ValueError, match=r"horizon must be an integer >= 1 .*horizon=None"):
        algos.certificate_constant(5.0)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\).*gamma=1.0"):
        algos.certificate_constant(5.0, form="discounted", gamma=1.0)
    with pytest.raises(ValueError, match=r"a_max must be > 0, got a_max=0"):
        algos.certificate_constant(0, horizon=2)
    with pytest.raises(ValueError, match=r"agent_turns must be <= horizon=2"):
        algos.certificate_constant(1.0, horizon=2, agent_turns=3)


def _rec(agent, gain, kl, zc=0.0, zr=0.0, zn=0.0, **kw):
    return UpdateRecord(agent=agent, surrogate_gain=gain, kl=kl, zeta_clip=zc, zeta_ratio=zr, zeta_norm=zn, **kw)


def test_update_bound_hand_value():
    # L̂ = 0.15, d̂ = 0.04 (sqrt 0.2), ζ̂ = 0.1 + 0.05 + 0.05 = 0.2, n_j = 1, H = 2, A_max = 1:
    #   c = sqrt(2)·1·1·1 = 1.4142136, κ = 1 -> bound = 0.15 − 0.2828427 − 0.2 = −0.3328427
    #   advantage_scale 2 doubles every term: −0.6656854
    r = _rec("a", 0.15, 0.04, 0.1, 0.05, 0.05, agent_turns=1, delta=0.01)
    b = algos.update_bound(r, a_max=1.0, horizon=2)
    assert b.bound == pytest.approx(-0.3328427, abs=1e-6)
    assert b.out_of_region is True  # 0.04 > δ = 0.01
    r2 = UpdateRecord.from_dict({**r.to_dict(), "advantage_scale": 2.0})
    assert algos.update_bound(r2, a_max=1.0, horizon=2).bound == pytest.approx(-0.6656854, abs=1e-6)
    # k1 can give a slightly negative d̂: the certificate uses max(d̂, 0)
    assert algos.update_bound(_rec("a", 0.1, -0.001), a_max=1.0, horizon=2).kl_term == 0.0


def test_stage_certificate_intermediate_and_stale():
    # H = 2, A_max = 1, n_j = 1 -> c = sqrt(2), κ = 1. Three updates, ζ = 0:
    #   gains [0.3, 0.2, 0.1] -> Σ = 0.6 ; d̂ [0.01, 0.04, 0.09] -> sqrt [0.1, 0.2, 0.3]
    #   -> Σ c·sqrt = 0.6·sqrt2 = 0.8485281
    #   intermediate: 0.6 − 0.8485281 = −0.2485281
    #   stale adds Σ_i Σ_{k<i} c·sqrt(d̂_k) = c·(0 + 0.1 + (0.1 + 0.2)) = 0.4·sqrt2 = 0.5656854 -> −0.8142136
    recs = [
        _rec(n, g, d, agent_turns=1, measured_gain=m, delta=0.05)
        for n, g, d, m in [("a", 0.3, 0.01, 0.2), ("b", 0.2, 0.04, 0.0), ("c", 0.1, 0.09, -0.1)]
    ]
    cert = algos.stage_certificate(recs, a_max=1.0, horizon=2)
    assert cert.certificate == pytest.approx(-0.2485281, abs=1e-6)
    assert cert.surrogate_sum == pytest.approx(0.6) and cert.num_updates == 3
    assert cert.num_out_of_region == 1 and cert.measured_gain_sum == pytest.approx(0.1)
    stale = algos.stage_certificate(recs, a_max=1.0, horizon=2, occupancy="stale")
    assert stale.stale_penalty == pytest.approx(0.5656854, abs=1e-6)
    assert stale.certificate == pytest.approx(-0.8142136, abs=1e-6)
    json.dumps(cert.to_dict())
    with pytest.raises(ValueError, match=r"records must hold at least one"):
        algos.stage_certificate([], horizon=2)


def test_discounted_form_is_uninformative_at_gamma_099():
    # The design's point: with γ = 0.99 and A_max = 5, c = sqrt(2)·0.99·5/1e-4 ≈ 7.0e4, so a typical update
    # (L̂ = 0.05, d̂ = 0.01) gets a bound of ≈ −7000: "never violated", tells nothing. The finite-horizon form for a
    # 2-turn episode in which the agent speaks once gives 0.05 − sqrt(2)·5·0.1 = −0.657, of the order of ΔJ.
    r = _rec("a", 0.05, 0.01, agent_turns=1)
    disc = algos.update_bound(r, a_max=5.0, form="discounted", gamma=0.99).bound
    fin = algos.update_bound(r, a_max=5.0, horizon=2).bound
    assert disc < -5000
    assert fin == pytest.approx(0.05 - math.sqrt(2) * 0.5, abs=1e-9)


def test_update_record_validation():
    with pytest.raises(ValueError, match=r"kl must be finite, got kl=nan"):
        _rec("a", 0.1, float("nan"))
    with pytest.raises(ValueError, match=r"zeta_clip must be >= 0, got zeta_clip=-0.1"):
        _rec("a", 0.1, 0.0, zc=-0.1)
    with pytest.raises(ValueError, match=r"delta must be > 0, got delta=0"):
        _rec("a", 0.1, 0.0, delta=0)
    with pytest.raises(ValueError, match=r"unknown keys \['gain'\]"):
        UpdateRecord.from_dict({"agent": "a", "gain": 1.0, "kl": 0.0, "surrogate_gain": 0.1})


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_fraction():
    # bounds [0, 1, 2], gains [0.5, 0.5, 2] -> [ok, violated, ok (equality counts)] -> 2/3
    assert algos.calibration_fraction([0.0, 1.0, 2.0], [0.5, 0.5, 2.0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"gains must have the shape of bounds"):
        algos.calibration_fraction([0.0, 1.0], [0.5])
    with pytest.raises(ValueError, match=r"gains must be finite, got gains\[0\]=nan"):
        algos.calibration_fraction([0.0], [float("nan")])


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


def test_calibration_report():
    # H = 2, A_max = 1, n_j = 1: bounds = gain − sqrt(2)·sqrt(d̂) = [0.3 − 0.1414214, 0.2 − 0.2828427, 0.1 − 0.4242641]
    #   = [0.1585786, −0.0828427, −0.3242641]; measured [0.2, 0.0, −0.5] -> [ok, ok, violated] -> 2/3 ;
    #   ranks of bounds [3, 2, 1] and gains [3, 2, 1] -> Spearman 1
    recs = [
        _rec(n, g, d, agent_turns=1, measured_gain=m)
        for n, g, d, m in [("a", 0.3, 0.01, 0.2), ("b", 0.2, 0.04, 0.0), ("c", 0.1, 0.09, -0.5)]
    ]
    rep = algos.calibration_report(recs + [_rec("d", 0.0, 0.0)], a_max=1.0, horizon=2)
    assert rep["n"] == 3
    assert rep["calibration"] == pytest.approx(2 / 3)
    assert rep["spearman"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ HAPPO factor


def test_happo_factor_hand_values():
    # Two trajectories. The agent just updated wrote rows 0, 1 (trajectory 0) and row 2 (trajectory 1):
    #   trajectory 0: Σ log r = ln 1.5 + ln 2 -> product 3.0 ; trajectory 1: ln 0.8 -> 0.8
    #   clip (0.5, 2): [2.0, 0.8] ; no clip: [3.0, 0.8]. Row 3 (padding, NaN) is not read.
    old = torch.zeros(4, 2)
    new = torch.tensor([[math.log(1.5), 0.0], [math.log(2.0), 7.0], [math.log(0.8), 0.0], [float("nan")] * 2])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    rows = torch.tensor([0, 0, 1, 1])
    f = algos.happo_factor_update(torch.ones(2), old, new, mask, rows)
    torch.testing.assert_close(f, torch.tensor([2.0, 0.8]))
    f = algos.happo_factor_update(torch.ones(2), old, new, mask, rows, clip_range=None)
    torch.testing.assert_close(f, torch.tensor([3.0, 0.8]))
    # running product: a second agent with ratio 0.5 on trajectory 0 -> 2.0·0.5 = 1.0 ; trajectory 1 untouched
    f2 = algos.happo_factor_update(
        torch.tensor([2.0, 0.8]),
        torch.zeros(1, 1),
        torch.tensor([[math.log(0.5)]]),
        torch.ones(1, 1),
        torch.tensor([0]),
    )
    torch.testing.assert_close(f2, torch.tensor([1.0, 0.8]))


def test_happo_factor_bad_input():
    with pytest.raises(ValueError, match=r"row_trajectory must lie in \[0, 2\)"):
        algos.happo_factor_update(
            torch.ones(2), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([2])
        )
    with pytest.raises(ValueError, match=r"clip_range must satisfy"):
        algos.happo_factor_update(
            torch.ones(1),
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.ones(1, 1),
            torch.tensor([0]),
            clip_range=(1.5, 2.0),
        )
    with pytest.raises(ValueError, match=r"new_log_prob must be finite on masked tokens"):
        algos.happo_factor_update(
            torch.ones(1), torch.zeros(1, 1), torch.full((1, 1), float("inf")), torch.ones(1, 1), torch.tensor([0])
        )


# ------------------------------------------------------------------------------------------------ purity


def test_import_algos_pulls_no_ray_vllm_or_verl():
    code = (
        "import sys, teamtr_verl.algos\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'verl'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
