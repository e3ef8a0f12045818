"""Stage 0's distillation as the worker runs it (``TeamActorRolloutRefWorker.stage0_*``), on two real tiny models
on CPU: only verl's engine is stood in for (its module, optimizer and mode contexts are what the methods use)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from teamtr_verl.algos import exact_kl, message_kl
from teamtr_verl.rollout_batch import likelihood_teacher, pack_sequences, retokenize_rows
from teamtr_verl.workers import TeamActorRolloutRefWorker


def test_pack_sequences_left_pads_prompts_and_right_pads_responses():
    # rows: prompt [5, 6] + response [7, 8, 9] (last token masked out); prompt [4] + response [3]
    packed = pack_sequences([torch.tensor([5, 6]), torch.tensor([4])], [torch.tensor([7, 8, 9]), torch.tensor([3])],
                            [torch.tensor([1, 1, 0]), torch.tensor([1])])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 4, 3, 0, 0]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert packed["response_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]


class Engine:
    """What the Stage-0 methods use of verl's FSDP engine: the module, the optimizer step, the mode contexts."""

    def __init__(self, module, lr):
        self.module = module
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        self.optimizer_config = SimpleNamespace(lr=lr)  # actor.optim.lr
        self.scaler = None  # fp32

    def eval_mode(self):
        self.module.eval()
        return contextlib.nullcontext()

    def train_mode(self):
        self.module.train()
        return contextlib.nullcontext()

    def optimizer_zero_grad(self):
        self.optimizer.zero_grad()

    def optimizer_step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        return norm


def worker(model_dir, lr=0.0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    instance = object.__new__(TeamActorRolloutRefWorker)
    instance.actor = SimpleNamespace(engine=Engine(AutoModelForCausalLM.from_pretrained(model_dir).float(), lr))
    return instance


@pytest.fixture(scope="module")
def probe():
    """Four messages of different prompt and response lengths (left/right padding in play), one token masked."""
    generator = torch.Generator().manual_seed(0)
    lengths = [(3, 4), (6, 2), (1, 5), (4, 4)]
    prompts = [torch.randint(5, 1000, (p,), generator=generator) for p, _ in lengths]
    responses = [torch.randint(5, 1000, (r,), generator=generator) for _, r in lengths]
    masks = [torch.ones(r) for _, r in lengths]
    masks[3][-1] = 0
    return prompts, responses, pack_sequences(prompts, responses, masks)


def row_log_probs(model, prompt, response, temperature):
    """Reference: one row alone, unpadded: log π(·| prompt, response[:t]) for every response position t."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(response)] / temperature, dim=-1)


def test_teacher_topk_is_the_models_own_next_token_distribution_at_every_response_position(tiny_team, probe):
    """Padded batch vs each row alone: the same distributions (left padding and position ids handled), and the
    top-k is sorted, normalized over the whole vocabulary, below vocab_limit."""
    prompts, responses, sequences = probe
    teacher = worker(tiny_team[1])
    model = teacher.actor.engine.module
    top = TeamActorRolloutRefWorker.stage0_teacher_topk(teacher, sequences, 5, 0.7, 3, 1000)
    assert top["log_probs"].shape == top["ids"].shape == (4, 5, 5)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        expected = row_log_probs(model, prompt, response, 0.7)[:, :1000].topk(5, dim=-1)
        assert torch.allclose(top["log_probs"][i, :len(response)], expected.values, atol=1e-5)
        assert torch.equal(top["ids"][i, :len(response)], expected.indices)
    whole = TeamActorRolloutRefWorker.stage0_teacher_topk(teacher, sequences, 5000, 0.7, 8, 1024)  # k > vocabulary
    assert whole["ids"].shape[-1] == 1024
    assert torch.allclose(whole["log_probs"].exp().sum(-1), torch.ones(4, 5), atol=1e-4)


def exact_token_kl(teacher, student, prompts, responses, sequences, temperature):
    """Reference: KL(π_teacher ‖ π_student) over the whole vocabulary, averaged over the unmasked response tokens."""
    total = 0.0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        kl = exact_kl(row_log_probs(teacher, prompt, response, temperature),
                      row_log_probs(student, prompt, response, temperature))
        total += float((kl * sequences["response_mask"][i, :len(response)]).sum())
    return total / float(sequences["response_mask"].sum())


def test_distillation_at_the_whole_vocabulary_minimizes_the_exact_kl(tiny_team, probe):
    """With k = the vocabulary the loss is the exact token-mean KL(π_incumbent ‖ π_new) (one step per epoch: the
    first epoch's loss is measured before any step); epochs of it bring that KL down."""
    prompts, responses, sequences = probe
    incumbent, newcomer = worker(tiny_team[1]), worker(tiny_team[0], lr=3e-3)
    teacher = TeamActorRolloutRefWorker.stage0_teacher_topk(incumbent, sequences, 1024, 1.0, 4, 1024)
    models = incumbent.actor.engine.module, newcomer.actor.engine.module
    before = exact_token_kl(*models, prompts, responses, sequences, 1.0)
    first = TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 4, 2)
    assert first["steps"] == 1 and first["loss"] == pytest.approx(before, rel=1e-4)
    for _ in range(15):
        TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 4, 2)
    after = exact_token_kl(*models, prompts, responses, sequences, 1.0)
    assert after < 0.5 * before, (before, after)


def test_a_distillation_epoch_takes_one_step_per_mini_batch(tiny_team, probe):
    _, _, sequences = probe
    incumbent, newcomer = worker(tiny_team[1]), worker(tiny_team[0], lr=1e-3)
    teacher = TeamActorRolloutRefWorker.stage0_teacher_topk(incumbent, sequences, 16, 1.0, 4, 1024)
    weights = [p.detach().clone() for p in newcomer.actor.engine.module.parameters()]
    out = TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 3, 1)  # rows 0-2, 3
    assert out["steps"] == 2 and out["loss"] > 0 and out["grad_norm"] > 0
    assert int(newcomer.actor.engine.optimizer.state_dict()["state"][0]["step"]) == 2
    assert any(not torch.equal(w, p) for w, p in zip(weights, newcomer.actor.engine.module.parameters()))


def test_a_stage0_lr_holds_for_the_epoch_only(tiny_team, probe):
    """lr=0 for the epoch: a step that moves nothing (Adam's update is lr-scaled), and the optimizer's own lr back
    afterwards."""
    _, _, sequences = probe
    incumbent, newcomer = worker(tiny_team[1]), worker(tiny_team[0], lr=1e-3)
    teacher = TeamActorRolloutRefWorker.stage0_teacher_topk(incumbent, sequences, 16, 1.0, 4, 1024)
    weights = [p.detach().clone() for p in newcomer.actor.engine.module.parameters()]
    TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 4, 4, lr=0.0)
    assert all(torch.equal(w, p) for w, p in zip(weights, newcomer.actor.engine.module.parameters()))
    assert newcomer.actor.engine.optimizer.param_groups[0]["lr"] == 1e-3


def test_without_a_stage0_lr_the_configured_lr_holds_not_the_schedules_current_one(tiny_team, probe):
    """At the start of a warm-up the schedule's lr is 0: Stage 0 would never move. It uses actor.optim.lr, and
    afterwards the schedule's value is back; reset_optimizer_state forgets Adam's moments."""
    _, _, sequences = probe
    incumbent, newcomer = worker(tiny_team[1]), worker(tiny_team[0], lr=1e-3)
    engine = newcomer.actor.engine
    engine.optimizer.param_groups[0]["lr"] = 0.0  # warm-up, step 0
    teacher = TeamActorRolloutRefWorker.stage0_teacher_topk(incumbent, sequences, 16, 1.0, 4, 1024)
    weights = [p.detach().clone() for p in engine.module.parameters()]
    TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 4, 4)
    assert any(not torch.equal(w, p) for w, p in zip(weights, engine.module.parameters()))
    assert engine.optimizer.param_groups[0]["lr"] == 0.0
    assert TeamActorRolloutRefWorker.reset_optimizer_state(newcomer) == len(weights) and not engine.optimizer.state


# ----------------------------------------------------------------------------- across tokenizers (re-tokenization)
TEXTS = [("What is 12 + 30?", "The answer is 42."), ("send the secret number", "agents cooperate to solve it"),
         ("think", "#### 99")]


def text_rows(tokenizer, cut_last: bool = True):
    """The incumbent's rows as its agent loop writes them: the chat rendered by its template, each message + EOS;
    the last message cut at a length limit (no EOS)."""
    prompts, responses = [], []
    for i, (question, reply) in enumerate(TEXTS):
        chat = [{"role": "system", "content": "you are bob"}, {"role": "user", "content": question}]
        prompts.append(torch.tensor(list(tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                                       tokenize=True, return_dict=False))))
        ids = tokenizer.encode(reply, add_special_tokens=False)
        ended = not (cut_last and i == len(TEXTS) - 1)
        responses.append(torch.tensor(ids + [tokenizer.eos_token_id] if ended else ids))
    return prompts, responses


def test_retokenized_rows_are_the_same_texts_in_the_targets_tokens(tiny_team):
    """alice's and bob's tokenizers were trained on different text: each of bob's rows is the same text in alice's
    tokens: the context as her own template renders the chat; the message by token strings where she has them all
    (bob's sampled segmentation kept), else her encoding of its text; it keeps its end exactly when it had one."""
    from transformers import AutoTokenizer

    source, target = (AutoTokenizer.from_pretrained(path) for path in (tiny_team[1], tiny_team[0]))
    prompts, responses = text_rows(source)
    new_prompts, new_responses, masks, kept = retokenize_rows(prompts, responses, source, target)
    assert kept == [0, 1, 2]
    vocab = target.get_vocab()

    def by_strings(ids):  # the rule's first branch, by hand (None: a token alice does not have)
        tokens = source.convert_ids_to_tokens(ids)
        return [vocab[t] for t in tokens] if all(t in vocab for t in tokens) else None

    for i, (question, reply) in enumerate(TEXTS):
        chat = [{"role": "system", "content": "you are bob"}, {"role": "user", "content": question}]
        own = list(target.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
        assert new_prompts[i].tolist() == own  # a context is text: the target's own rendering
        ended = i < len(TEXTS) - 1
        message = source.encode(reply, add_special_tokens=False)
        mapped_message = by_strings(message)
        assert new_responses[i].tolist() == (mapped_message if mapped_message is not None else target.encode(
            reply, add_special_tokens=False)) + ([target.eos_token_id] if ended else [])
        assert target.decode(new_responses[i].tolist(), skip_special_tokens=True) == reply
        assert masks[i].tolist() == [1.0] * len(new_responses[i])
    assert any(a.tolist() != b.tolist() for a, b in zip(responses, new_responses))  # other ids
    # a sampled token alice does not have (bob's merge ' 624', which his own encoder never produces): her encoding
    # of the text
    token = next(token for token in sorted(source.get_vocab()) if token not in vocab
                 and "\ufffd" not in source.convert_tokens_to_string([token]))
    text = source.convert_tokens_to_string([token])
    message = torch.tensor([source.convert_tokens_to_ids(token), source.eos_token_id])
    _, (translated,), _, kept = retokenize_rows([prompts[0]], [message], source, target)
    assert kept == [0] and translated.tolist() == target.encode(text, add_special_tokens=False) + [target.eos_token_id]
    assert len(translated) > 2  # another segmentation of the same text


def test_a_message_that_is_not_whole_text_keeps_its_bytes_or_is_left_out(tiny_team):
    """A sampled byte-level token can stop inside a UTF-8 character ('Ã' is the byte 0xC3 alone, the start of a
    two-byte character): decoding turns it into U+FFFD and loses the byte. Such a message is carried over token string
    by token string where the target has every one of them (the same bytes), and left out where it has not; so is
    a message with an id past the tokenizer (a padded embedding row), which has no text at all."""
    from transformers import AutoTokenizer

    source, target = (AutoTokenizer.from_pretrained(path) for path in (tiny_team[1], tiny_team[0]))
    source_vocab, target_vocab = source.get_vocab(), target.get_vocab()
    lone_byte = "Ã"  # byte-level BPE's character for the byte 0xC3: in every byte-level vocabulary
    only_source = next(token for token in sorted(source_vocab) if token not in target_vocab and len(token) > 1)
    # a rendered context holding a U+FFFD character (a transcript decoded with replacement): text all the same
    prompt = torch.tensor(source.encode("think \ufffd", add_special_tokens=False))
    eos = source.eos_token_id
    responses = [torch.tensor(source.encode("#### 99", add_special_tokens=False) + [eos]),
                 torch.tensor([source_vocab[lone_byte], source_vocab[only_source], eos]),
                 torch.tensor([source_vocab[lone_byte], source_vocab["a"], eos]),
                 torch.tensor([source_vocab["a"], len(source) + 5, eos])]  # an id in the embedding's padding rows
    assert "\ufffd" in source.decode(responses[2].tolist())  # the lost byte
    new_prompts, new_responses, _, kept = retokenize_rows([prompt] * 4, responses, source, target)
    # the second one's merged token does not exist in the target's vocabulary; the fourth has an id with no token
    assert kept == [0, 2]
    assert new_responses[0].tolist() == target.encode("#### 99", add_special_tokens=False) + [target.eos_token_id]
    assert new_responses[1].tolist() == [target_vocab[lone_byte], target_vocab["a"], target.eos_token_id]
    assert new_prompts[1].tolist() == target.encode("think \ufffd", add_special_tokens=False)


def test_message_logp_is_the_sum_of_each_rows_own_token_log_probs(tiny_team, probe):
    prompts, responses, sequences = probe
    scorer = worker(tiny_team[1])
    got = TeamActorRolloutRefWorker.stage0_message_logp(scorer, sequences, 0.7, 3)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens = row_log_probs(scorer.actor.engine.module, prompt, response, 0.7).gather(-1, response[:, None])[:, 0]
        expected = float((tokens * sequences["response_mask"][i, :len(response)]).sum())  # row 3: last token masked
        assert float(got[i]) == pytest.approx(expected, abs=1e-4)


def test_a_permuted_vocabulary_copy_gives_the_incumbents_texts_the_same_probability(tiny_team, tmp_path):
    """The fixture the cross-tokenizer e2e swap uses: another vocabulary (every ordinary id moved), the same model
    of text, so the message-level KL of the re-tokenized messages is 0 up to float rounding."""
    from transformers import AutoTokenizer

    from teamtr_verl.fixtures import permuted_vocabulary_copy

    copy_dir = permuted_vocabulary_copy(tiny_team[1], tmp_path / "bob_permuted", seed=1)
    source, target = (AutoTokenizer.from_pretrained(path) for path in (tiny_team[1], copy_dir))
    assert source.get_vocab() != target.get_vocab() and source.eos_token_id == target.eos_token_id
    prompts, responses = text_rows(source)
    *rows, kept = retokenize_rows(prompts, responses, source, target)
    assert kept == [0, 1, 2] and all(a.tolist() != b.tolist() for a, b in zip(responses, rows[1]))
    incumbent = TeamActorRolloutRefWorker.stage0_message_logp(
        worker(tiny_team[1]), pack_sequences(prompts, responses, [torch.ones(len(r)) for r in responses]), 1.0, 2)
    newcomer = TeamActorRolloutRefWorker.stage0_message_logp(worker(copy_dir), pack_sequences(*rows), 1.0, 2)
    assert torch.allclose(incumbent, newcomer, atol=1e-4)
    assert abs(message_kl(incumbent, newcomer)[0]) < 1e-4


def test_the_likelihood_teacher_makes_the_loss_the_negative_log_likelihood(tiny_team):
    """Across tokenizers the teacher is each message's own token with log-probability 1: the top-k forward KL is
    then −log π_new(token), so the first epoch's loss is the token-mean negative log-likelihood (worked out from
    stage0_message_logp), and epochs raise the messages' likelihood."""
    from transformers import AutoTokenizer

    source, target = (AutoTokenizer.from_pretrained(path) for path in (tiny_team[1], tiny_team[0]))
    sequences = pack_sequences(*retokenize_rows(*text_rows(source), source, target)[:3])
    teacher = likelihood_teacher(sequences)
    assert teacher["ids"].shape == teacher["log_probs"].shape == (*sequences["response_mask"].shape, 1)
    newcomer = worker(tiny_team[0], lr=3e-3)
    before = TeamActorRolloutRefWorker.stage0_message_logp(newcomer, sequences, 1.0, 2)
    first = TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 8, 2)
    assert first["steps"] == 1
    assert first["loss"] == pytest.approx(-float(before.sum()) / float(sequences["response_mask"].sum()), rel=1e-5)
    for _ in range(10):
        TeamActorRolloutRefWorker.stage0_distill_epoch(newcomer, sequences, teacher, 1.0, 8, 2)
    after = TeamActorRolloutRefWorker.stage0_message_logp(newcomer, sequences, 1.0, 2)
    assert bool((after > before).all()), (before, after)
