"""The shared-base worker extension's sync logic (teamtr_verl.multilora_ext) on a stand-in for verl's receive loop:
which adapter a sync loads, and that a failed load is raised only after the loop (verl's sender waits for the loop's
last ack, so an error raised inside it would hang the trainer instead of failing it)."""

import pytest
import torch
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from teamtr_verl.multilora_ext import MultiLoRAWorkerExtension

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


class Worker(MultiLoRAWorkerExtension):
    """The extension without a vLLM worker: ``add_lora`` records, verl's loop delivers two buckets then finishes."""

    def __init__(self, fail=False):
        self.loaded, self.base_loaded, self.loop_finished, self.fail = [], [], False, fail

    def add_lora(self, request):
        if self.fail:
            raise ValueError("LoRA rank 8 is greater than max_lora_rank 4")
        self.loaded.append((request.lora_int_id, request.lora_name, request.load_inplace, sorted(request.lora_tensors)))
        return True


@pytest.fixture(autouse=True)
def verls_loop(monkeypatch):
    def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False):
        bucket = [("a.lora_A.weight", torch.ones(2)), ("a.lora_B.weight", torch.zeros(2))]
        self._update_weights(bucket, peft_config=peft_config, base_sync_done=base_sync_done)
        self.loop_finished = True  # the last bucket acked: the sender is released

    monkeypatch.setattr(vLLMColocateWorkerExtension, "update_weights_from_ipc", update_weights_from_ipc)
    monkeypatch.setattr(vLLMColocateWorkerExtension, "_update_weights",
                        lambda self, weights, peft_config, base_sync_done: self.base_loaded.append(len(weights)))


def test_an_adapter_sync_loads_the_named_adapter_in_place():
    worker = Worker()
    worker.update_weights_from_ipc(CONFIG, base_sync_done=True, lora_int_id=1002, lora_name="bob")
    assert worker.loaded == [(1002, "bob", True, ["a.lora_A.weight", "a.lora_B.weight"])] and worker.base_loaded == []
    # the base's stream (peft_config given, base not yet synced) goes to verl's own loader, whatever the names
    worker.update_weights_from_ipc(CONFIG, base_sync_done=False)
    assert worker.base_loaded == [2] and len(worker.loaded) == 1


def test_a_failed_adapter_load_is_raised_after_the_receive_loop_finished():
    worker = Worker(fail=True)
    with pytest.raises(ValueError, match="greater than max_lora_rank"):
        worker.update_weights_from_ipc(CONFIG, base_sync_done=True, lora_int_id=1001, lora_name="alice")
    assert worker.loop_finished and worker._teamtr_target is None


def test_an_adapter_sync_without_a_name_loads_nothing_and_is_refused_after_the_loop():
    worker = Worker()
    with pytest.raises(ValueError, match="must name its adapter"):
        worker.update_weights_from_ipc(CONFIG, base_sync_done=True)
    assert worker.loop_finished and worker.loaded == [] and worker.base_loaded == []
