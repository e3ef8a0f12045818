"""The exact tabular team simulator of benchmarks/occupancy_shift.py: exact J, the exact surrogate, the stale error."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "occupancy_shift.py"


@pytest.fixture(scope="module")
def osim():
    spec = importlib.util.spec_from_file_location("occupancy_shift_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    return mod


@pytest.mark.parametrize("task_name,router", [("budget_sq", "chain"), ("chaincode", "round_robin")])
def test_exact_J_matches_monte_carlo(osim, task_name, router):
    task = osim.make_task(task_name, 3, router)
    rng = np.random.default_rng(0)
    probs = [osim.softmax(z) for z in osim.init_tables(task, rng, init="mis", fid=0.9, noise=0.8)]
    prompts = np.repeat(np.arange(task.n_prompts), 20_000)  # J is the mean over prompts
    _, _, returns, success = task.sample(probs, prompts, rng)
    se = returns.std(ddof=1) / math.sqrt(returns.size)
    assert abs(task.J(probs) - returns.mean()) < 4 * se
    assert abs(task.accuracy(probs) - success.mean()) < 4 * success.std(ddof=1) / math.sqrt(success.size)


@pytest.mark.parametrize("task_name,router", [("budget_sq", "chain"), ("budget_sq", "round_robin"),
                                              ("chaincode", "round_robin")])
def test_first_order_surrogate_equals_gain_for_small_steps(osim, task_name, router):
    task = osim.make_task(task_name, 3, router)
    rng = np.random.default_rng(1)
    tables = osim.init_tables(task, rng, init="mis", fid=0.9, noise=0.8)
    probs = [osim.softmax(z) for z in tables]
    F = task.forward(probs)
    _, Q = task.backward(probs)
    for j in range(3):
        new = [z.copy() for z in tables]
        new[j] = tables[j] + 1e-6 * rng.standard_normal(tables[j].shape)
        probs_new = [osim.softmax(z) for z in new]
        gain = task.J(probs_new) - task.J(probs)
        surrogate = task.surrogate(j, probs_new[j] - probs[j], F, Q)
        assert abs(surrogate - gain) < 1e-3 * abs(gain)


def test_budget_sq_reward_by_hand(osim):
    task = osim.make_task("budget_sq", 2)  # sums 0..4, targets T in {1, 2, 3}
    assert list(task.prompt_values) == [1, 2, 3]
    x = list(task.prompt_values).index(3)
    assert task.reward[x, 0] == -9.0 and task.reward[x, 3] == 0.0 and task.reward[x, 4] == -1.0
    # a deterministic team that always writes 1: Σd = 2, J = mean_T −(2 − T)² = −(1 + 0 + 1)/3, accuracy 1/3
    tables = [np.tile([0.0, 60.0, 0.0], (task.n_inputs, 1)) for _ in range(2)]
    probs = [osim.softmax(z) for z in tables]
    assert abs(task.J(probs) - (-2.0 / 3.0)) < 1e-9
    assert abs(task.accuracy(probs) - 1.0 / 3.0) < 1e-9
    _, act, returns, _ = task.sample(probs, np.array([0, 1, 2]), np.random.default_rng(0))
    assert (act == 1).all() and list(returns) == [-1.0, 0.0, -1.0]


def _short_run(osim, schedule, n=3, stages=2):
    cfg = osim.Config(delta=0.2, lr=0.5, epochs=4)
    return osim.run("budget_sq", n, schedule, 0, stages, cfg)


@pytest.mark.parametrize("schedule", ["teamtr", "matched"])
def test_regenerated_updates_in_a_one_turn_chain_have_zero_error(osim, schedule):
    run = _short_run(osim, schedule)
    assert len(run["updates"]) == 6
    assert any(abs(u["exact_gain"]) > 1e-4 for u in run["updates"])
    for u in run["updates"]:
        assert abs(u["S_used"] - u["exact_gain"]) < 1e-9 * max(1.0, abs(u["exact_gain"]))
    assert max(run["stale_error"]) < 1e-9


def test_stale_error_is_zero_for_the_first_update_of_a_stage(osim):
    run = _short_run(osim, "stale")
    first = [u for u in run["updates"] if u["position"] == 0]
    later = [u for u in run["updates"] if u["position"] > 0]
    assert len(first) == 2
    for u in first:
        assert abs(u["S_used"] - u["exact_gain"]) < 1e-9 * max(1.0, abs(u["exact_gain"]))
    assert max(abs(u["S_used"] - u["exact_gain"]) for u in later) > 1e-6  # the later ones see a shifted occupancy
    assert run["episodes"] == 2 * 16 * 8
    for u in run["updates"]:  # the trainer's step rule: committed KL inside δ, certificate on held-out groups
        assert u["kl"] <= 0.2 + 1e-12
        assert u["bound"] is None or u["bound"] <= u["is_gain"] + 1e-12


def test_onestage_schedules_start_from_the_same_team(osim):
    cfg = osim.Config(delta=0.2, lr=0.5, epochs=4)
    recs = osim.onestage("budget_sq", [2], [0], ["teamtr", "stale"], cfg, "chain", 2, "mis", 0.8, warm=0)
    rec = recs[0]
    # the first update sees the same team and the same batch under both schedules: identical gain and KL
    assert rec["teamtr"]["dJ"][0] == rec["stale"]["dJ"][0]
    assert rec["teamtr"]["kl"][0] == rec["stale"]["kl"][0]
    assert rec["teamtr"]["err_pos"][0] == 0.0 or abs(rec["teamtr"]["err_pos"][0]) < 1e-12
