"""vLLM worker side of a shared-base team (issue #14): one LoRA adapter per agent, each under its own id.

verl 0.9.1's worker extension keeps exactly one adapter (id 123, removed and re-added at every sync). This subclass
lets a sync name the adapter it loads (``lora_int_id``, ``lora_name``), so that syncing agent A replaces A's adapter
in place and never touches B's. vLLM imports it by name inside its worker processes (``worker_extension_cls``), as
verl does its own, so this module imports nothing of teamtr_verl's.

vLLM appends the extension to its worker's bases and refuses an attribute the worker already has: new methods are
``teamtr_``-prefixed; ``update_weights_from_ipc`` and ``_update_weights`` exist on verl's extension only.
"""

from __future__ import annotations

from typing import Optional

from verl.utils.vllm import TensorLoRARequest
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

ADAPTER_PATH = "teamtr://{name}"  # never read from disk: every adapter arrives as tensors (the prefix cache keys on it)


def adapter_request_fields(lora_int_id: int, lora_name: str) -> dict:
    """The fields of the ``LoRARequest`` that names agent ``lora_name``'s adapter (the server builds its own with
    the same fields: vLLM matches requests to loaded adapters by id)."""
    return {"lora_name": lora_name, "lora_int_id": lora_int_id, "lora_path": ADAPTER_PATH.format(name=lora_name)}


class MultiLoRAWorkerExtension(vLLMColocateWorkerExtension):
    _teamtr_target: Optional[tuple[int, str]] = None  # the adapter the sync in progress loads
    _teamtr_error: Optional[BaseException] = None

    def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False,
                                lora_int_id: Optional[int] = None, lora_name: Optional[str] = None):
        # Errors are raised only after verl's receive loop has taken every bucket: raised before or inside it, they
        # would leave verl's sender waiting for an ack forever (a hung sync instead of a failed one).
        adapter_stream = bool(peft_config) and base_sync_done
        self._teamtr_target = (lora_int_id, lora_name) if adapter_stream else None
        self._teamtr_error = None
        if adapter_stream and (lora_int_id is None or not lora_name):  # verl's id 123: an adapter no agent names
            self._teamtr_error = ValueError("shared-base server: an adapter sync must name its adapter "
                                            "(lora_int_id, lora_name)")
        try:
            super().update_weights_from_ipc(peft_config, base_sync_done, use_shm)  # its remove_lora(123): a no-op
        finally:
            self._teamtr_target = None
        if self._teamtr_error is not None:
            raise self._teamtr_error

    def _update_weights(self, weights, peft_config: dict, base_sync_done: bool):
        if self._teamtr_target is None:
            return super()._update_weights(weights, peft_config, base_sync_done)  # the base's stream: verl's path
        if self._teamtr_error is not None:
            return  # refused: the weights are taken and dropped
        try:
            self.teamtr_add_adapter(*self._teamtr_target, peft_config, dict(weights))
        except Exception as error:
            self._teamtr_error = error

    def teamtr_add_adapter(self, lora_int_id: int, lora_name: str, peft_config: dict, tensors: dict) -> bool:
        """Load (or replace in place: the old one stays served until the new one is loaded) one agent's adapter.
        The caller resets the prefix cache afterwards (verl's ``ServerAdapter.update_weights`` does after a sync):
        cached blocks are keyed by the adapter's name and path, which an in-place replacement keeps."""
        tensors = {name: tensor.clone() for name, tensor in tensors.items()}  # vLLM keeps them past this call
        return self.add_lora(TensorLoRARequest(**adapter_request_fields(lora_int_id, lora_name),
                                               peft_config=peft_config, lora_tensors=tensors, load_inplace=True))
