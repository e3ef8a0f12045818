"""The vLLM server, replica and client of a shared-base team (``teamtr.shared_base``, issue #14).

One replica set serves every agent: each request names its agent's adapter, which must be loaded (never a silent
fall-back to the base model, as stock verl 0.9.1 does), and the engine keeps one adapter per agent resident. The
pieces they wrap are in :mod:`teamtr_verl.multilora` (routing, pure) and :mod:`teamtr_verl.multilora_ext` (the vLLM
worker side); this module only plugs them into verl's classes.
"""

from __future__ import annotations

import ray
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

from teamtr_verl.multilora import AdapterRoutingEngine, max_adapters, serving_adapter
from teamtr_verl.workers import OffsetVLLMReplica

WORKER_EXTENSION = "teamtr_verl.multilora_ext.MultiLoRAWorkerExtension"


class MultiLoRAvLLMHttpServer(vLLMHttpServer):
    """verl's vLLM server with one resident adapter per agent, each request served with its own agent's."""

    def _get_worker_extension_cls(self) -> str:
        return WORKER_EXTENSION

    def _resident_adapters(self, args) -> None:
        # verl's launch_server forces max_loras=1 after merging the user's engine kwargs: N agents need N
        args.max_loras = args.max_cpu_loras = max_adapters(self.config)

    async def run_server(self, args):
        self._resident_adapters(args)
        await super().run_server(args)
        self.engine = AdapterRoutingEngine(self.engine)

    async def run_headless(self, args):  # the other nodes of a multi-node replica
        self._resident_adapters(args)
        await super().run_headless(args)

    async def generate(self, prompt_ids, sampling_params, request_id, *args, lora_name=None, lora_int_id=None,
                       **kwargs):
        async with serving_adapter(self.engine, lora_int_id, lora_name, where=f"replica {self.replica_rank}"):
            return await super().generate(prompt_ids, sampling_params, request_id, *args, **kwargs)


class MultiLoRAVLLMReplica(OffsetVLLMReplica):
    """A replica (at its agent's rank offset) whose servers are :class:`MultiLoRAvLLMHttpServer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(MultiLoRAvLLMHttpServer)


class AdapterLLMServerClient(LLMServerClient):
    """verl's client for one agent of a shared-base team: every request carries that agent's adapter."""

    def __init__(self, config, load_balancer_handle=None, *, lora_name: str, lora_int_id: int, **kwargs):
        super().__init__(config, load_balancer_handle, **kwargs)
        self.adapter = {"lora_name": lora_name, "lora_int_id": lora_int_id}

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params,
                                      **self.adapter, **kwargs)
