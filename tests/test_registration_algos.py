"""teamtr_verl.algos inside stock verl 0.9.1: registration, dispatch through verl's own compute_advantage, and
equivalence with verl's agg_loss, vanilla PPO loss (β = 0), AdaptiveKLController and kl_penalty.

This file imports verl (a few seconds); the pure-math tests in tests/test_algos_*.py do not.
"""

import functools
import importlib.metadata
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import teamtr_verl.register  # noqa: E402,F401  (also loaded by verl's entry point once the package is installed)
from teamtr_verl import algos  # noqa: E402


def test_registered_functions_are_ours():
    assert core_algos.get_adv_estimator_fn("teamtr") is algos.compute_teamtr_advantage
    assert core_algos.get_policy_loss_fn("teamtr") is algos.compute_teamtr_policy_loss


def test_plain_import_verl_registers_through_entry_point():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    if not any(ep.value == "teamtr_verl.register" for ep in eps):
        pytest.skip("teamtr-verl is not pip-installed here (no verl.plugins entry point)")
    code = (
        "import verl\n"
        "from verl.trainer.ppo import core_algos\n"
        "from teamtr_verl import algos\n"
        "assert core_algos.get_adv_estimator_fn('teamtr') is algos.compute_teamtr_advantage\n"
        "assert core_algos.get_policy_loss_fn('teamtr') is algos.compute_teamtr_policy_loss\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _batch():
    # uid "a": returns [0, 1, 2] -> population std sqrt(2/3): Ã = [−1.2247449, 0, 1.2247449]
    # (verl's GRPO, with the unbiased std, would give [−1, 0, 1]); uid "b": a single trajectory -> 0.
    rewards = torch.zeros(4, 3)
    rewards[0, 1], rewards[1, 1], rewards[2, 2], rewards[3, 0] = 0.0, 1.0, 2.0, 7.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": np.array(["a", "a", "a", "b"], dtype=object)},
    )


def test_stock_compute_advantage_dispatches_to_teamtr():
    data = compute_advantage(_batch(), adv_estimator="teamtr", config=AlgoConfig(adv_estimator="teamtr"))
    z = 1.0 / math.sqrt(2.0 / 3.0 + 1e-6)
    expected = torch.tensor([[-z, -z, 0], [0, 0, 0], [z, z, z], [0, 0, 0]])
    torch.testing.assert_close(data.batch["advantages"], expected)
    torch.testing.assert_close(data.batch["returns"], expected)


def test_stock_compute_advantage_reads_a_clip_from_dictconfig():
    cfg = OmegaConf.create({"adv_estimator": "teamtr", "a_clip": 1.0, "norm_eps": 0.0})
    data = compute_advantage(_batch(), adv_estimator="teamtr", config=cfg)
    assert data.batch["advantages"][2, 0].item() == 1.0  # 1.2247 clipped to A_clip = 1


def _random_loss_batch(seed, bs=6, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(bs, T, generator=g) * 2
    new = (old + 0.5 * torch.randn(bs, T, generator=g)).requires_grad_(True)
    adv = torch.randn(bs, 1, generator=g).expand(bs, T).contiguous()
    mask = torch.rand(bs, T, generator=g) < 0.7
    mask[:, 0] = True
    mask[-1] = False  # one fully masked row
    return old, new, adv, mask


GLOBAL_INFOS = [
    {},
    {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 12, "loss_scale_factor": None},
    {"dp_size": 1, "batch_num_tokens": 20, "global_batch_size": 6, "loss_scale_factor": 5},
]


@pytest.mark.parametrize("mode", algos.LOSS_AGG_MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS)
def test_aggregate_loss_matches_verl_agg_loss(mode, info):
    old, new, _, mask = _random_loss_batch(0)
    loss_mat = new.detach() - old
    ours = algos.aggregate_loss(loss_mat, mask, mode, **info)
    theirs = core_algos.agg_loss(loss_mat, mask, mode, **info)
    torch.testing.assert_close(ours, theirs)


def _actor_config(**kw):
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **kw)


@pytest.mark.parametrize("mode", algos.LOSS_AGG_MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS)
def test_teamtr_loss_with_beta_zero_is_verl_vanilla(mode, info):
    # With β = 0 and the per-token ratio, Eq. 10 is verl's vanilla PPO loss: same value, gradient and metrics.
    old, new, adv, mask = _random_loss_batch(1)
    cfg = _actor_config(clip_ratio_low=0.15, clip_ratio_high=0.25)
    cfg.global_batch_info.update(info)
    isw = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    ours_fn = functools.partial(algos.compute_teamtr_policy_loss, beta=0.0)
    vanilla_fn = core_algos.get_policy_loss_fn("vanilla")
    l1, m1 = ours_fn(old, new, adv, mask, loss_agg_mode=mode, config=cfg, rollout_is_weights=isw)
    (g1,) = torch.autograd.grad(l1, new)
    l2, m2 = vanilla_fn(old, new, adv, mask, loss_agg_mode=mode, config=cfg, rollout_is_weights=isw)
    (g2,) = torch.autograd.grad(l2, new)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-6, abs=1e-9), key
    assert m1["actor/teamtr_beta"] == 0.0 and "actor/teamtr_kl" in m1


def test_teamtr_loss_kl_term_is_verl_kl_penalty_aggregated():
    # loss(β) − loss(0) = β · agg_seq-mean-token-sum(kl_penalty(old, new, "k3")) (verl's k3 with the roles
    # (logprob = π_cur, ref = π_new) gives r − 1 − log r, r = π_new/π_cur).
    old, new, adv, mask = _random_loss_batch(2)
    cfg = _actor_config()
    fn = algos.compute_teamtr_policy_loss
    l0, _ = fn(old, new, adv, mask, config=cfg, beta=0.0)
    l1, m1 = fn(old, new, adv, mask, config=cfg, beta=0.3)
    kld = core_algos.kl_penalty(old, new.detach(), "k3")
    ref = core_algos.agg_loss(kld, mask, "seq-mean-token-sum")
    torch.testing.assert_close(l1 - l0, 0.3 * ref, rtol=1e-5, atol=1e-6)
    assert m1["actor/teamtr_kl"] == pytest.approx(ref.item(), rel=1e-5)
    # and k1 is verl's "k1" = logprob − ref = log π_cur − log π_new
    torch.testing.assert_close(algos.token_kl(old, new.detach(), "k1"), core_algos.kl_penalty(old, new.detach(), "k1"))


def test_adapt_beta_matches_verl_adaptive_kl_controller():
    ctrl = core_algos.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.01, horizon=10)
    beta = 0.1
    for kl, n in [(0.02, 1), (0.005, 3), (0.0101, 2), (0.5, 10), (0.0, 4)]:
        ctrl.update(kl, n)
        beta = algos.adapt_beta(beta, kl, 0.01, n_steps=n, horizon=10)
        assert beta == pytest.approx(ctrl.value, rel=1e-12)


def test_beta_travels_in_verls_policy_loss_config():
    """The trainer sets an agent's β through PolicyLossConfig.ppo_kl_coef (verl's ppo_loss gives the loss nothing
    else); an explicit keyword still wins, and the default is 0.1."""
    from verl.workers.config.actor import PolicyLossConfig

    old, new, adv, mask = _random_loss_batch(4)
    fn = algos.compute_teamtr_policy_loss
    with_beta = _actor_config(policy_loss=PolicyLossConfig(loss_mode="teamtr", ppo_kl_coef=0.37))
    assert fn(old, new, adv, mask, config=with_beta)[1]["actor/teamtr_beta"] == pytest.approx(0.37)
    assert fn(old, new, adv, mask, config=with_beta, beta=0.5)[1]["actor/teamtr_beta"] == pytest.approx(0.5)
    assert fn(old, new, adv, mask, config=None)[1]["actor/teamtr_beta"] == pytest.approx(0.1)
