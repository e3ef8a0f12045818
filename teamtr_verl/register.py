"""The single registration point of teamtr-verl, loaded by verl's ``verl.plugins`` entry point.

verl imports this module on every ``import verl`` -- in the driver, the TaskRunner actor and every Ray worker --
and swallows any exception it raises at DEBUG level. So this module must stay cheap and must not fail; the tests
assert after a plain ``import verl`` that every name below is registered, in the driver and in a Ray actor.

Registered here (each only once it exists, never a placeholder):
  * the ``cpu`` platform for verl (and its CPU patches), active only on a machine without a GPU.
"""

from teamtr_verl.cpu import platform as _cpu_platform

_cpu_platform.install()
