"""Stage 0's distillation as the worker runs it (``TeamActorRolloutRefWorker.stage0_*``), on two real tiny models
on CPU: only verl's engine is stood in for (its module, optimizer and mode contexts are what the methods use)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from teamtr_verl.algos import exact_kl
from teamtr_verl.rollout_batch import pack_sequences
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
