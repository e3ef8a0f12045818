"""The tiny fixtures: loadable by transformers and verl's dataset, deterministic, and the reward is informative."""

import hashlib

import pytest
import torch

from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.fixtures.data import ADDITION_SOURCE
from teamtr_verl.fixtures.rewards import addition_score, compute_score


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_loads_and_generates_with_chat_template(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text  # byte-level BPE round-trips exactly

    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert out.shape[1] <= ids.shape[1] + 8
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)


def test_builder_is_deterministic_and_seeds_differ(tmp_path):
    first = build_tiny_model(tmp_path / "a", seed=3, hidden_size=64, vocab_size=300)
    again = build_tiny_model(tmp_path / "b", seed=3, hidden_size=64, vocab_size=300)
    other = build_tiny_model(tmp_path / "c", seed=4, hidden_size=64, vocab_size=300)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _digest(first / name) == _digest(again / name)
    assert _digest(first / "model.safetensors") != _digest(other / "model.safetensors")
    # A different seed trains its tokenizer on different text: heterogeneous tokenizers come for free.
    assert _digest(first / "tokenizer.json") != _digest(other / "tokenizer.json")


def test_shared_tokenizer_option(tmp_path):
    base = build_tiny_model(tmp_path / "a", seed=0, hidden_size=64, vocab_size=300)
    sibling = build_tiny_model(tmp_path / "b", seed=1, hidden_size=64, tokenizer_dir=base)
    from transformers import AutoTokenizer

    base_tok, sibling_tok = AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(sibling))
    assert base_tok.get_vocab() == sibling_tok.get_vocab()
    assert base_tok("What is 12 + 30?").input_ids == sibling_tok("What is 12 + 30?").input_ids
    assert _digest(base / "model.safetensors") != _digest(sibling / "model.safetensors")


def test_dataset_loads_in_verl_rlhf_dataset(tiny_model_dir, tiny_data_dir):
    import pandas as pd
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    frame = pd.read_parquet(tiny_data_dir / "train.parquet")
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(frame) == 64 and len(pd.read_parquet(tiny_data_dir / "test.parquet")) == 16
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = OmegaConf.create({"max_prompt_length": 64, "filter_overlong_prompts": False, "return_raw_chat": True})
    dataset = RLHFDataset(data_files=str(tiny_data_dir / "train.parquet"), tokenizer=tokenizer, config=config)
    assert len(dataset) == 64
    row = dataset[0]
    assert row["data_source"] == ADDITION_SOURCE
    assert row["raw_prompt"][1]["content"].startswith("What is ")


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("#### 42", "42", 1.0),
        ("so #### 42<|im_end|>", "42", 1.0),
        # wrong number: partial credit = digits / characters = 2 / 7
        ("#### 41", "42", 2 / 7),
        ("abcd", "42", 0.0),
        ("", "42", 0.0),
        # no '####': 3 digits of 6 characters
        ("1 2 3 ", "6", 3 / 6),
    ],
)
def test_addition_score_by_hand(answer, truth, expected):
    assert addition_score(answer, truth) == pytest.approx(expected)


def test_reward_is_not_constant_for_a_random_model(tiny_model_dir):
    """With a constant reward every GRPO advantage is 0 and nothing trains: the untrained model must see spread."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.repeat(16, 1)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=16, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    scores = [compute_score(ADDITION_SOURCE, answer, "5") for answer in answers]
    assert max(scores) > min(scores)


def test_unknown_data_source_is_an_error():
    with pytest.raises(ValueError, match="data_source='gsm8k'"):
        compute_score("gsm8k", "#### 1", "1")
