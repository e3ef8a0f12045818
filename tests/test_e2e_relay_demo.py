"""End to end: the demo's own config (`make demo`: teamtr_relay_cpu, 32 prompts x 8 per regeneration, delta 0.05) on
the warm-started relay team still learns under the reworked trust region and certificate, for 2 stages (4 updates).

Asserted from the run's metrics: every committed update's KL is <= its delta; every update got a paired gain on its
own stage's held-out episodes (closing regeneration included), and an in-sample one on the episodes it trained on:
the in-sample gains add up to an improvement above their noise, the held-out ones show no loss; every bound is finite
and the held-out measurement exists.
"""

import math

import pytest

from teamtr_verl.fixtures.relay import build_relay_team
from teamtr_verl.runs import run_main_ppo, team_override

pytestmark = pytest.mark.e2e

STAGES, DELTA = 2, 0.05


def test_the_demo_config_learns_inside_the_trust_region(tmp_path):
    team = tmp_path / "team"
    build_relay_team(team, ("alice", "bob"), seed=0)
    result, rows = run_main_ppo("teamtr_relay_cpu", [
        team_override({"alice": team / "alice", "bob": team / "bob"}),
        f"data.train_files={team / 'data' / 'train.parquet'}", f"data.val_files={team / 'data' / 'test.parquet'}",
        f"trainer.total_training_steps={STAGES}", f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        "trainer.resume_mode=disable",
    ], tmp_path, timeout=1500)
    assert result.returncode == 0, f"see {tmp_path}/stderr.log\n{result.stderr[-4000:]}"
    stages = {step: data for step, data in rows.items() if "teamtr/stage/return_mean" in data}
    assert sorted(stages) == list(range(1, STAGES + 1))
    gains, variances, in_sample, in_sample_variances = [], [], [], []
    for metrics in stages.values():
        assert metrics["teamtr/stage/gain_measurements"] == 2  # one paired gain per update, on the stage's prompts
        for agent in ("alice", "bob"):
            assert metrics[f"teamtr/{agent}/delta"] == DELTA
            if metrics[f"teamtr/{agent}/committed"] == 1.0:
                assert metrics[f"teamtr/{agent}/kl"] <= DELTA
                assert math.isfinite(metrics[f"teamtr/{agent}/is_gain_se"])
            gains.append(metrics[f"teamtr/{agent}/crn_gain"])
            variances.append(metrics[f"teamtr/{agent}/crn_gain_se"] ** 2)
            in_sample.append(metrics[f"teamtr/{agent}/crn_gain_train"])
            in_sample_variances.append(metrics[f"teamtr/{agent}/crn_gain_train_se"] ** 2)
    # the warm-started team sits at ~0.15-0.2. On the episodes they trained on (their seeds replayed), the four
    # updates must gain, summed, clearly: the whole stack trains, in the rewarded direction (lr 0 gives 0 here)
    assert sum(in_sample) > 2 * math.sqrt(sum(in_sample_variances)), (in_sample, in_sample_variances)
    # on the held-out groups (out of sample, a quarter of the episodes: SE ~0.02 per update) no loss is measured;
    # what the team learns over 15 stages is `make demo`'s
    assert sum(gains) > -2 * math.sqrt(sum(variances)), (gains, variances)
