"""Eq. 9, the bounded group-normalized advantage (teamtr_verl.algos), on hand-built tensors.

Covers: hand-computed values (population std, ε_norm inside the square root, clipping, multi-message trajectories),
the degenerate groups (size 1, equal returns: advantage exactly 0, never NaN), invariance to padding and masked
positions, a plain loop reference against the vectorized code, the verl-signature adapter, and bad input.
"""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from teamtr_verl import algos


def _adv(returns, groups, **kw):
    return algos.bounded_group_advantage(torch.tensor(returns, dtype=torch.float64), np.array(groups), **kw)


# ------------------------------------------------------------------------------------------------ hand values


def test_population_std_not_unbiased():
    # Group of 3 returns [0, 1, 2]: μ = 1, population var = (1 + 0 + 1)/3 = 2/3, σ = sqrt(2/3) = 0.8164966
    # z = [-1, 0, 1]/0.8164966 = [-1.2247449, 0, 1.2247449]  (an unbiased std, as verl's GRPO, would give ±1).
    ga = _adv([0.0, 1.0, 2.0], ["p", "p", "p"], norm_eps=0.0)
    torch.testing.assert_close(ga.advantage, torch.tensor([-1.2247449, 0.0, 1.2247449], dtype=torch.float64))
    assert ga.group_size.tolist() == [3, 3, 3]


def test_eps_inside_square_root():
    # Returns [1, 0]: μ = 0.5, population var = 0.25. With ε_norm = 0.75 inside the root: σ = sqrt(0.25 + 0.75) = 1,
    # so z = [0.5, -0.5] exactly (ε outside the root, σ + ε = 1.25, would give ±0.4).
    ga = _adv([1.0, 0.0], ["a", "a"], norm_eps=0.75)
    torch.testing.assert_close(ga.advantage, torch.tensor([0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(ga.group_std, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_clip_to_a_clip_and_normalized_kept():
    # Nine zeros and one 10: μ = 1, population var = (9·1 + 81)/10 = 9, σ = 3.
    # z = -1/3 for the zeros and (10 - 1)/3 = 3 for the ten; with A_clip = 2 the ten is clipped to 2.
    ga = _adv([0.0] * 9 + [10.0], ["g"] * 10, a_clip=2.0, norm_eps=0.0)
    expected = torch.tensor([-1 / 3] * 9 + [2.0], dtype=torch.float64)
    torch.testing.assert_close(ga.advantage, expected)
    torch.testing.assert_close(ga.normalized[-1], torch.tensor(3.0, dtype=torch.float64))


def test_groups_are_independent():
    # Group a = [1, 3] -> μ 2, σ 1 -> [-1, 1]; group b = [10, 20, 30] -> μ 20, σ sqrt(200/3) = 8.16497 -> ∓1.22474, 0.
    ga = _adv([1.0, 10.0, 3.0, 20.0, 30.0], ["a", "b", "a", "b", "b"], norm_eps=0.0)
    torch.testing.assert_close(ga.advantage, torch.tensor([-1.0, -1.2247449, 1.0, 0.0, 1.2247449], dtype=torch.float64))


@pytest.mark.parametrize("norm_eps", [0.0, 1e-6])
def test_singleton_and_equal_groups_give_exact_zero(norm_eps):
    # group "solo" has one trajectory; group "same" has three equal returns 0.1 (whose float mean is not exactly
    # 0.1: a naive (R - μ)/σ would give ±1e-11 or, with ε_norm = 0, 0/0 = NaN). Both must give exactly 0.
    ga = _adv([5.0, 0.1, 0.1, 0.1], ["solo", "same", "same", "same"], norm_eps=norm_eps)
    assert ga.advantage.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert not torch.isnan(ga.normalized).any()


# ------------------------------------------------------------------------------------------------ rows and trajectories


def test_multi_message_trajectories_share_one_return_and_count_once():
    # One prompt "p", two team trajectories: T0 has 2 messages (rows 0, 1), the verifier's reward 3 on its last row;
    # T1 has 3 messages (rows 2, 3, 4), reward 1 on its last row. Trajectory returns [3, 1]: μ = 2, σ = 1 (ε = 0),
    # Ã = [+1, -1], broadcast to every masked token of every row of the trajectory. (Counting rows instead of
    # trajectories would give μ = 4/5 and different values.)
    T = 3
    rewards = torch.zeros(5, T)
    rewards[1, 1] = 3.0
    rewards[4, 0] = 1.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    adv, ret = algos.compute_teamtr_outcome_advantage(
        rewards,
        mask,
        index=np.array(["p"] * 5),
        trajectory_index=np.array(["T0", "T0", "T1", "T1", "T1"]),
        norm_eps=0.0,
    )
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [-1, 0, 0], [-1, -1, -1], [-1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)


def test_trajectory_return_last_for_replicated_rewards():
    # Every row carries a copy of its trajectory's reward: T0 = 2 (rows 0, 1), T1 = 0 (rows 2, 3).
    # "sum" would give returns [4, 0]; "last" gives [2, 0]. Either way the group of two gives Ã = ±1 (ε = 0), but
    # the returns reported in RowAdvantage differ.
    rewards = torch.tensor([[2.0], [2.0], [0.0], [0.0]])
    mask = torch.ones(4, 1)
    kw = dict(index=np.array([0, 0, 0, 0]), trajectory_index=np.array([7, 7, 9, 9]), norm_eps=0.0)
    last = algos.teamtr_row_advantage(rewards, mask, trajectory_return="last", **kw)
    summed = algos.teamtr_row_advantage(rewards, mask, trajectory_return="sum", **kw)
    assert last.trajectory_return.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert summed.trajectory_return.tolist() == [4.0, 4.0, 0.0, 0.0]
    assert last.advantage.tolist() == [1.0, 1.0, -1.0, -1.0]
    assert last.num_trajectories == 2 and last.trajectory.tolist() == [0, 0, 1, 1]


def test_single_agent_rows_are_their_own_trajectories():
    # Stock verl: no trajectory ids. Rows [1, 0] in group u1 -> ±1 (ε = 0); row 3 alone in u2 -> 0.
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1]])
    adv, _ = algos.compute_teamtr_outcome_advantage(rewards, mask, index=np.array(["u1", "u1", "u2"]), norm_eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ invariance


def test_masked_positions_and_padding_change_nothing():
    # Rewards at masked positions (even NaN) are never read, and extra padding columns only add zeros.
    torch.manual_seed(0)
    rewards = torch.zeros(4, 3)
    rewards[:, 1] = torch.tensor([1.0, 0.0, 2.0, 5.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    index = np.array(["a", "a", "a", "b"])
    base, _ = algos.compute_teamtr_outcome_advantage(rewards, mask, index)

    garbage = rewards.clone()
    garbage[~mask] = float("nan")
    got, _ = algos.compute_teamtr_outcome_advantage(garbage, mask, index)
    torch.testing.assert_close(got, base)

    padded_r = torch.cat([rewards, torch.randn(4, 5)], dim=1)
    padded_m = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    got, _ = algos.compute_teamtr_outcome_advantage(padded_r, padded_m, index)
    torch.testing.assert_close(got[:, :3], base)
    assert (got[:, 3:] == 0).all()


def test_row_order_does_not_matter():
    rewards = torch.tensor([[1.0], [0.0], [4.0], [2.0], [2.0]])
    mask = torch.ones(5, 1)
    index = np.array(["a", "b", "a", "b", "a"])
    adv, _ = algos.compute_teamtr_outcome_advantage(rewards, mask, index)
    perm = torch.tensor([3, 0, 4, 1, 2])
    adv_p, _ = algos.compute_teamtr_outcome_advantage(rewards[perm], mask[perm], index[perm.numpy()])
    torch.testing.assert_close(adv_p, adv[perm])


# ------------------------------------------------------------------------------------------------ loop reference


def _loop_reference(rewards, mask, index, traj, a_clip, eps):
    """Straightforward per-row/per-group loops, float64, as a reader would write Eq. 9."""
    bs, T = rewards.shape
    traj_ret, traj_group = defaultdict(float), {}
    for i in range(bs):
        traj_ret[traj[i]] += sum(float(rewards[i, t]) for t in range(T) if mask[i, t])
        traj_group[traj[i]] = index[i]
    members = defaultdict(list)
    for t, g in traj_group.items():
        members[g].append(traj_ret[t])
    adv_of = {}
    for t, g in traj_group.items():
        rs = members[g]
        mu = sum(rs) / len(rs)
        var = sum((r - mu) ** 2 for r in rs) / len(rs)
        if max(rs) == min(rs):
            adv_of[t] = 0.0
        else:
            adv_of[t] = max(-a_clip, min(a_clip, (traj_ret[t] - mu) / math.sqrt(var + eps)))
    out = torch.zeros(bs, T, dtype=torch.float64)
    for i in range(bs):
        for t in range(T):
            if mask[i, t]:
                out[i, t] = adv_of[traj[i]]
    return out


@pytest.mark.parametrize(
    "bs,T,n_groups,msgs,seed", [(8, 4, 2, 1, 0), (24, 7, 3, 3, 1), (60, 5, 6, 2, 2), (1, 3, 1, 1, 3)]
)
def test_loop_reference_matches_vectorized(bs, T, n_groups, msgs, seed):
    rng = np.random.default_rng(seed)
    rewards = torch.tensor(rng.integers(0, 3, size=(bs, T)).astype(np.float64))
    mask = torch.tensor(rng.random((bs, T)) < 0.7)
    traj = np.array([f"t{i // msgs}" for i in range(bs)])  # consecutive rows = messages of one trajectory
    traj_group = {t: f"g{rng.integers(n_groups)}" for t in set(traj.tolist())}
    index = np.array([traj_group[t] for t in traj])
    a_clip = 1.5
    adv, _ = algos.compute_teamtr_outcome_advantage(
        rewards, mask, index, trajectory_index=traj, a_clip=a_clip, norm_eps=1e-6
    )
    ref = _loop_reference(rewards, mask, index, traj, a_clip, 1e-6)
    torch.testing.assert_close(adv, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ verl adapter


def test_adapter_reads_kwargs_then_config_then_defaults():
    # Returns [0, 10] in one group: z = ±1 (≈, ε = 1e-6). With a_clip = 0.5 from the config: ±0.5;
    # with a_clip = 0.25 passed as a keyword it wins over the config.
    rewards = torch.tensor([[0.0], [10.0]])
    mask = torch.ones(2, 1)
    idx = np.array(["u", "u"])
    adv, ret = algos.compute_teamtr_advantage(rewards, mask, index=idx, config={"a_clip": 0.5})
    assert adv.flatten().tolist() == [-0.5, 0.5] and ret is adv
    adv, _ = algos.compute_teamtr_advantage(rewards, mask, index=idx, config={"a_clip": 0.5}, a_clip=0.25)
    assert adv.flatten().tolist() == [-0.25, 0.25]
    adv, _ = algos.compute_teamtr_advantage(rewards, mask, index=idx, config=None, reward_baselines=torch.zeros(2))
    torch.testing.assert_close(adv.flatten(), torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)


def test_adapter_trajectory_index_kwarg():
    rewards = torch.tensor([[0.0], [2.0], [0.0]])
    mask = torch.ones(3, 1)
    adv, _ = algos.compute_teamtr_advantage(
        rewards, mask, index=np.array(["u"] * 3), trajectory_index=np.array([0, 0, 1]), norm_eps=0.0
    )
    # trajectory 0 = rows 0, 1 (return 2); trajectory 1 = row 2 (return 0) -> [+1, +1, -1]
    assert adv.flatten().tolist() == [1.0, 1.0, -1.0]


def test_adapter_rejects_unknown_keyword():
    with pytest.raises(TypeError, match="a_clp"):
        algos.compute_teamtr_advantage(torch.zeros(1, 1), torch.ones(1, 1), index=np.array([0]), a_clp=1.0)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("a_clip", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_a_clip(a_clip):
    with pytest.raises(ValueError, match=r"a_clip must be .*a_clip="):
        _adv([1.0, 2.0], [0, 0], a_clip=a_clip)


def test_negative_norm_eps():
    with pytest.raises(ValueError, match=r"norm_eps=-1e-06"):
        _adv([1.0, 2.0], [0, 0], norm_eps=-1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_returns(bad):
    with pytest.raises(ValueError, match=r"returns\[1\]="):
        _adv([1.0, bad], [0, 0])
    rewards = torch.tensor([[0.0, bad]])
    with pytest.raises(ValueError, match=r"token_level_rewards.*\[0, 1\]="):
        algos.compute_teamtr_outcome_advantage(rewards, torch.ones(1, 2), index=np.array([0]))


def test_shape_mismatches():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"response_mask must have the shape of token_level_rewards \(2, 3\)"):
        algos.compute_teamtr_outcome_advantage(r, torch.ones(2, 4), index=np.array([0, 0]))
    with pytest.raises(ValueError, match=r"index must have one entry per row \(bs=2\), got index of length 3"):
        algos.compute_teamtr_outcome_advantage(r, torch.ones(2, 3), index=np.array([0, 0, 0]))
    with pytest.raises(ValueError, match=r"trajectory_index must have one entry per row"):
        algos.compute_teamtr_outcome_advantage(r, torch.ones(2, 3), index=np.array([0, 0]), trajectory_index=[1])
    with pytest.raises(ValueError, match=r"index .* is required, got index=None"):
        algos.compute_teamtr_outcome_advantage(r, torch.ones(2, 3), index=None)


def test_trajectory_spanning_two_prompts():
    with pytest.raises(ValueError, match=r"rows of one trajectory must share one index"):
        algos.compute_teamtr_outcome_advantage(
            torch.zeros(2, 1), torch.ones(2, 1), index=np.array(["a", "b"]), trajectory_index=np.array([0, 0])
        )
