"""Moved to :mod:`teamtr_verl.patches`. Kept only because a venv installed before the move has vLLM's
``vllm.general_plugins`` entry point pointing here; `make setup` re-installs with the new path (pyproject.toml)."""

from teamtr_verl.patches import patch_vllm_cpu  # noqa: F401
