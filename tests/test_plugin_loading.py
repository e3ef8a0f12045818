"""verl swallows plugin import errors at DEBUG level, so registration is asserted, never assumed:
after a plain ``import verl`` -- in a fresh interpreter and inside a Ray actor -- our names are registered."""

import json
import subprocess
import sys

EXPECTED = {
    "register_loaded": True,
    "adv_estimator_is_ours": True,
    "policy_loss_is_ours": True,
    "agent_loop": {"_target_": "teamtr_verl.team.TeamHandoffAgentLoop"},
    "device": "cpu",
}

PROBE = r"""
import json, sys
import verl  # nothing of teamtr_verl is imported explicitly: the verl.plugins entry point must do it
from verl.trainer.ppo import core_algos
from verl.utils.device import get_device_name
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

def probe():
    import teamtr_verl.algos as algos
    return {
        "register_loaded": "teamtr_verl.register" in sys.modules,
        "adv_estimator_is_ours": core_algos.get_adv_estimator_fn("teamtr") is algos.compute_teamtr_advantage,
        "policy_loss_is_ours": core_algos.get_policy_loss_fn("teamtr") is algos.compute_teamtr_policy_loss,
        "agent_loop": _agent_loop_registry.get("teamtr_handoff"),
        "device": get_device_name(),
    }
"""


def _run(code: str, env_extra=None) -> dict:
    import os

    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_entry_point_registers_in_a_fresh_interpreter():
    found = _run(PROBE + "print(json.dumps(probe()))")
    assert found == EXPECTED


def test_entry_point_registers_inside_a_ray_actor():
    code = PROBE + r"""
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=1)
class Probe:
    def run(self):
        import verl  # the worker process imports verl itself, as verl's workers do
        return probe()

found = ray.get(Probe.remote().run.remote())
ray.shutdown()
print(json.dumps(found))
"""
    assert _run(code) == EXPECTED


def test_plugins_policy_none_really_turns_loading_off():
    """The probe is not vacuous: with verl's plugin loading switched off, nothing of ours is there."""
    code = r"""
import json, sys
import verl
from verl.trainer.ppo import core_algos
print(json.dumps({"register_loaded": "teamtr_verl.register" in sys.modules,
                  "estimator": "teamtr" in core_algos.ADV_ESTIMATOR_REGISTRY}))
"""
    assert _run(code, {"VERL_USE_EXTERNAL_PLUGINS": "none"}) == {"register_loaded": False, "estimator": False}
