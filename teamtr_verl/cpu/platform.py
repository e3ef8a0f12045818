"""A ``cpu`` platform for verl 0.9.1's platform registry.

verl asks its platform for the device name, the torch device module, the collective backend and the Ray resource
that workers are placed on. On CPU: device ``cpu``, a ``torch.cpu``-based module with no-op stand-ins for the
``torch.cuda`` calls verl makes, backend ``gloo``, and Ray's *logical* ``GPU`` resource (``ray.init(num_gpus=N)``:
verl's resource pools require an accelerator resource; nothing ever touches CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any, Optional

import torch

from teamtr_verl.cpu import cpu_mode

logger = logging.getLogger(__name__)


def _zero(*args, **kwargs) -> int:
    return 0


def _noop(*args, **kwargs) -> None:
    return None


class CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus no-op versions of the ``torch.cuda`` memory/stream API verl calls on its device module."""

    def __init__(self):
        super().__init__("teamtr_verl_cpu_device")
        for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
            setattr(self, name, _zero)
        for name in ("reset_peak_memory_stats", "empty_cache", "ipc_collect", "set_device", "synchronize",
                     "set_per_process_memory_fraction"):
            setattr(self, name, _noop)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        self.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        self.is_available = lambda: True
        self.device_count = lambda: 1
        self.current_device = lambda: "cpu"
        self.memory_stats = lambda *args, **kwargs: {}
        self.get_device_name = lambda *args, **kwargs: "CPU"
        self.mem_get_info = self._mem_get_info
        self.nvtx = types.SimpleNamespace(
            range=lambda *args, **kwargs: contextlib.nullcontext(), range_push=_noop, range_pop=_noop
        )

    @staticmethod
    def _mem_get_info(*args, **kwargs) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    def __getattr__(self, name):  # everything else (Stream, Event, stream, ...) from torch.cpu
        return getattr(torch.cpu, name)


_REGISTERED = False


def install() -> bool:
    """Register the ``cpu`` platform with verl and apply the CPU patches, in CPU mode only.

    Idempotent. Returns whether CPU mode is on. On a GPU machine (CUDA torch, ``VERL_PLATFORM`` unset) this returns
    False having registered and patched nothing.
    """
    global _REGISTERED
    if not cpu_mode():
        return False
    from teamtr_verl import patches

    if not patches.versions_supported():
        logger.warning("teamtr_verl CPU runtime disabled: %s", patches.version_problem())
        return False
    if not _REGISTERED:
        _register_platform()
        _REGISTERED = True
    patches.apply_verl_patches()
    return True


def _register_platform() -> None:
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    device_module = CpuDeviceModule()

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self):
            return device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            return cpu_mode()

        def current_device(self):
            return "cpu"  # verl does .to(get_device_id()) everywhere

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            return None

        def synchronize(self, device_index: Optional[int] = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"  # logical Ray resource only: ray.init(num_gpus=N)

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None
