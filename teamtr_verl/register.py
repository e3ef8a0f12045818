"""The single registration point of teamtr-verl, loaded by verl's ``verl.plugins`` entry point.

verl imports this module on every ``import verl`` -- in the driver, the TaskRunner actor and every Ray worker --
and swallows any exception it raises at DEBUG level. So this module must not fail quietly in ways nobody sees; the
tests assert after a plain ``import verl`` that every name below is registered, in the driver and in a Ray actor.

Registered here (each only once it exists, never a placeholder):
  * the ``cpu`` platform for verl (and its CPU patches), active only on a machine without a GPU;
  * on every platform, verl's file logger appends (a resumed run keeps the earlier metrics);
  * advantage estimator ``teamtr``  (``algorithm.adv_estimator=teamtr``);
  * policy loss ``teamtr``          (``actor_rollout_ref.actor.policy_loss.loss_mode=teamtr``);
  * agent loop ``teamtr_handoff``   (router-based text handoff between the agents of a team);
  * trainer ``teamtr``              (``trainer.v1.trainer_mode=teamtr``), with its config validated before Ray.
"""

from verl.trainer.ppo import core_algos

from teamtr_verl import algos
from teamtr_verl import patches as _patches
from teamtr_verl.cpu import platform as _cpu_platform

_cpu_platform.install()  # before the imports below: its patches quiet what they print on import
_patches.install_config_validation_hook()
_patches.patch_file_logger_append()

from teamtr_verl.defaults import ADV_ESTIMATOR_NAME, POLICY_LOSS_NAME  # noqa: E402

# register_adv_est raises if a *different* function already holds the name; re-registering ours is a no-op.
core_algos.register_adv_est(ADV_ESTIMATOR_NAME)(algos.compute_teamtr_advantage)
core_algos.register_policy_loss(POLICY_LOSS_NAME)(algos.compute_teamtr_policy_loss)

# Importing the module runs verl's @register("teamtr_handoff") on the agent loop class.
from teamtr_verl import team as _team  # noqa: E402,F401

# Importing the module runs verl's @register_trainer("teamtr").
from teamtr_verl import trainer as _trainer  # noqa: E402,F401
