"""Server side of a shared-base team (issue #14): one vLLM server serves every agent, each turn with its agent's adapter.

Stock verl 0.9.1 serves one adapter (id 123) with ``max_loras=1`` set after the user's engine kwargs, and silently
serves the base model when that adapter is not loaded. Here a request names its agent's adapter (``lora_name``,
``lora_int_id``, passed through verl's ``LLMServerClient.generate`` keyword arguments), a request whose adapter is not
loaded is an error, and the engine keeps every agent's adapter resident (``max_loras = max_cpu_loras = N``).

The server, replica and client that use these pieces: :mod:`teamtr_verl.multilora_server`.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Optional

from teamtr_verl.multilora_ext import adapter_request_fields

# the adapter of the request being served: set by the server's generate in the request's own asyncio task, so
# concurrent requests of different agents never see each other's
_ADAPTER: ContextVar[Optional[Any]] = ContextVar("teamtr_adapter", default=None)


class AdapterRoutingEngine:
    """vLLM's engine client, as verl's server uses it, except that ``generate`` takes the served request's adapter
    (verl's ``generate`` builds its own id-123 request, or none): everything else is the engine's own."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, lora_request=None, **kwargs):
        routed = _ADAPTER.get()
        return self._engine.generate(*args, lora_request=routed if routed is not None else lora_request, **kwargs)


async def loaded_adapter(engine, lora_int_id: Optional[int], lora_name: Optional[str], where: str = "the server"):
    """The ``LoRARequest`` for agent ``lora_name``'s adapter, which must be loaded on ``engine``: a request for an
    adapter that is not is refused (vLLM would try to read it from its path and fail inside the engine step)."""
    from vllm.lora.request import LoRARequest

    if lora_int_id is None or not lora_name:
        raise ValueError(f"shared-base server {where}: a request must name its agent's adapter (lora_name, lora_int_id)")
    loaded = await engine.list_loras()
    if lora_int_id not in loaded:
        raise LookupError(f"shared-base server {where}: agent {lora_name!r}'s adapter (id {lora_int_id}) is not "
                          f"loaded (loaded: {sorted(loaded)}); sync it before its turns")
    return LoRARequest(**adapter_request_fields(lora_int_id, lora_name))


@contextlib.asynccontextmanager
async def serving_adapter(engine, lora_int_id: Optional[int], lora_name: Optional[str], where: str = "the server"):
    """Around verl's ``generate`` body: every engine call made inside, through :class:`AdapterRoutingEngine`, uses
    agent ``lora_name``'s adapter (:func:`loaded_adapter`: refused if not loaded), in this request's task only."""
    token = _ADAPTER.set(await loaded_adapter(engine, lora_int_id, lora_name, where))
    try:
        yield
    finally:
        _ADAPTER.reset(token)


def max_adapters(rollout_config) -> int:
    """N: the adapters the server keeps resident, from ``engine_kwargs.vllm.max_loras`` (the topology sets it to the
    team's size; stock verl overrides the engine's value with 1 and never reads this one)."""
    from teamtr_verl.topology import configured_max_loras

    value = configured_max_loras(rollout_config)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"shared-base server: engine_kwargs.vllm.max_loras={value!r}: expected the team's size (>= 1)")
    return value
