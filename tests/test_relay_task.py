"""The relay task (the demo's coordination task): private views, the reward, the warm start's inputs match what the
teamtr_handoff loop builds, and the warm start leaves the team where RL can improve it."""

import random

import pytest
import torch
from hydra import compose, initialize_config_dir

from teamtr_verl.config import AgentSpec, HandoffSpec
from teamtr_verl.fixtures import relay
from teamtr_verl.fixtures.rewards import compute_score
from teamtr_verl.team_logic import Message, agent_view, build_agent_messages
from teamtr_verl.validation import validate_teamtr_config

NAMES3 = ("alice", "bob", "carol")


def test_only_the_sender_sees_the_secret():
    views = relay.agent_views(NAMES3, 7)
    assert views == {"alice": "Secret x = 7. Send bob a short message.",
                     "bob": "Pass alice's message to carol.", "carol": "Reply #### x."}
    for secret in range(10):  # no digit reaches anyone but the sender
        views = relay.agent_views(NAMES3, secret)
        assert str(secret) in views["alice"]
        assert not any(ch.isdigit() for name in ("bob", "carol") for ch in views[name])
    with pytest.raises(ValueError, match="at least 2 agents"):
        relay.agent_views(["alice"], 3)


@pytest.mark.parametrize("text, expected", [
    ("#### 7", 1.0), ("  ####7 ", 1.0), ("#### 07", 0.0),  # 07 != 7 as written: the answer is the digit itself
    ("#### 77", 0.0), ("#### 3", 0.0), ("msg 7", 0.0), ("7", 0.0), ("#### 7 #### 7", 0.0), ("", 0.0), (None, 0.0),
])
def test_relay_score_by_hand(text, expected):
    assert relay.relay_score(text, "7") == expected


def test_rows_are_balanced_and_scored_by_the_shared_reward():
    rows = relay.relay_rows(("alice", "bob"), 30, "train", seed=4)
    secrets = [int(r["reward_model"]["ground_truth"]) for r in rows]
    assert sorted(secrets) == sorted(list(range(10)) * 3)  # every digit exactly 3 times
    assert rows[0]["extra_info"]["agent_views"] == relay.agent_views(("alice", "bob"), secrets[0])
    assert compute_score(relay.RELAY_SOURCE, f"#### {secrets[0]}", str(secrets[0])) == 1.0
    assert compute_score(relay.RELAY_SOURCE, f"#### {(secrets[0] + 1) % 10}", str(secrets[0])) == 0.0


def test_warm_start_inputs_are_what_the_handoff_loop_builds():
    """The loop builds an agent's chat from agent_view(row) + the transcript; the warm start must train on the same."""
    row = relay.relay_rows(NAMES3, 1, "train", seed=0)[0]
    secret = int(row["reward_model"]["ground_truth"])
    handoff = HandoffSpec()
    said = ["msg 4", "msg 4"]
    for position, name in enumerate(NAMES3):
        transcript = [Message(speaker=NAMES3[t], turn=t, content=said[t]) for t in range(position)]
        loop_chat = build_agent_messages(AgentSpec(name=name, model=""),
                                         agent_view(row["extra_info"], row["prompt"], name), transcript, handoff)
        assert relay.agent_input(NAMES3, position, secret, said[:position], handoff) == loop_chat
    assert loop_chat[-1]["content"] == "Reply #### x.\n\nConversation so far:\nalice: msg 4\nbob: msg 4"


def test_training_pairs_pass_on_the_heard_digit():
    rng = random.Random(0)
    for position in range(3):
        for _ in range(50):
            chat, reply = relay.sample_training_pair(NAMES3, position, 1.0, rng)
            text = chat[-1]["content"]
            heard = text.split("x = ")[1][0] if position == 0 else text.rsplit("msg ", 1)[1][0]
            assert reply == ("#### " if position == 2 else "msg ") + heard
    # p_correct = 0: the reply digit is uniform, so it matches the heard digit ~1 time in 10
    hits = 0
    for _ in range(2000):
        chat, reply = relay.sample_training_pair(NAMES3, 1, 0.0, rng)
        hits += reply[-1] == chat[-1]["content"].rsplit("msg ", 1)[1][0]
    assert 0.07 < hits / 2000 < 0.13


def _reply(model, tokenizer, chat, sample):
    ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=sample,
                         top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_warm_started_team_is_right_at_the_mode_but_not_when_sampled(tmp_path):
    """The demo's premise (../shared/research/toy_task.md): greedy replies are correct, sampled team success is low
    (each agent samples the right digit ~37% of the time: 0.3 + 0.7/10), so RL has something to sharpen."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    report = relay.build_relay_team(tmp_path, ("alice", "bob"), seed=0, n_train=20, n_val=10)
    assert 300_000 < report["params"] < 400_000
    for losses in report["agents"].values():
        assert losses["loss_last"] < losses["loss_first"] / 4
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "alice"))
    models = {name: Qwen2ForCausalLM.from_pretrained(str(tmp_path / name)).eval() for name in ("alice", "bob")}
    torch.manual_seed(0)
    results = {"greedy": [], "sampled": []}
    for mode in results:
        for secret in list(range(10)) * (1 if mode == "greedy" else 6):
            message = _reply(models["alice"], tokenizer, relay.agent_input(("alice", "bob"), 0, secret, []),
                             mode == "sampled")
            answer = _reply(models["bob"], tokenizer, relay.agent_input(("alice", "bob"), 1, secret, [message]),
                            mode == "sampled")
            results[mode].append(relay.relay_score(answer, str(secret)))
    assert sum(results["greedy"]) >= 9  # the correct reply is each agent's mode
    assert sum(results["sampled"]) / 60 < 0.45  # 0.37² + chance ≈ 0.2; far from solved
    assert (tmp_path / "data" / "train.parquet").is_file() and (tmp_path / "data" / "test.parquet").is_file()


def test_demo_config_composes_and_validates(tmp_path, tiny_data_dir):
    from teamtr_verl.rollout import CONFIG_DIR

    for name in ("alice", "bob"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        config = compose(config_name="teamtr_relay_cpu", overrides=[
            f"teamtr.agents=[{{name: alice, model: '{tmp_path / 'alice'}'}}, {{name: bob, model: '{tmp_path / 'bob'}'}}]",
            f"data.train_files={tiny_data_dir / 'train.parquet'}", f"data.val_files={tiny_data_dir / 'test.parquet'}"])
    team = validate_teamtr_config(config)
    assert team.agent_names == ("alice", "bob") and team.schedule == "teamtr" and team.delta_of("bob") == 0.05
    # 32 prompts / mini-batches of 8 -> 4 gradient steps per agent update, as in the toy study
    assert config.data.train_batch_size // config.actor_rollout_ref.actor.ppo_mini_batch_size == 4
