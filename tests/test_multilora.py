"""The shared-base server's routing (teamtr_verl.multilora) on a fake engine: each request is generated with its own
agent's adapter, concurrent requests included, and a request whose adapter is not loaded is refused."""

import asyncio

import pytest
from omegaconf import OmegaConf

from teamtr_verl.multilora import _ADAPTER, AdapterRoutingEngine, max_adapters, serving_adapter


class FakeEngine:
    """vLLM's engine client as verl's server calls it: ``generate`` starts a request, ``list_loras`` lists ids."""

    def __init__(self, loaded):
        self.loaded, self.started = set(loaded), []

    async def list_loras(self):
        return set(self.loaded)

    def generate(self, prompt, lora_request=None, **kwargs):
        self.started.append((prompt, lora_request and lora_request.lora_int_id))
        return prompt

    def sleep(self):
        return "the engine's own"


async def serve(engine, prompt, agent):
    """A request: verl's generate body (which passes lora_request=None) inside the agent's adapter context."""
    async with serving_adapter(engine, *agent):
        await asyncio.sleep(0)  # other requests run here, in their own tasks
        return AdapterRoutingEngine(engine).generate(prompt=prompt, lora_request=None)


def test_concurrent_requests_each_get_their_agents_adapter():
    engine = FakeEngine({1001, 1002})

    async def main():
        return await asyncio.gather(*(serve(engine, f"p{i}", agent)
                                      for i, agent in enumerate([(1001, "alice"), (1002, "bob")] * 3)))

    assert asyncio.run(main()) == [f"p{i}" for i in range(6)]
    assert sorted(engine.started) == [(f"p{i}", 1001 if i % 2 == 0 else 1002) for i in range(6)]
    assert _ADAPTER.get() is None and AdapterRoutingEngine(engine).sleep() == "the engine's own"


def test_a_request_for_an_adapter_that_is_not_loaded_is_refused_not_served_by_the_base():
    engine = FakeEngine({1001})
    with pytest.raises(LookupError, match=r"agent 'bob'.s adapter \(id 1002\) is not loaded \(loaded: \[1001\]\)"):
        asyncio.run(serve(engine, "p", (1002, "bob")))
    with pytest.raises(ValueError, match="must name its agent's adapter"):
        asyncio.run(serve(engine, "p", (None, None)))
    assert engine.started == []


@pytest.mark.parametrize("vllm, expected", [({"max_loras": 4}, 4), ({}, None), ({"max_loras": 0}, None)])
def test_the_servers_adapter_count_comes_from_the_rollout_config(vllm, expected):
    config = OmegaConf.create({"engine_kwargs": {"vllm": vllm}})
    if expected is None:
        with pytest.raises(ValueError, match=r"engine_kwargs.vllm.max_loras="):
            max_adapters(config)
    else:
        assert max_adapters(config) == expected
