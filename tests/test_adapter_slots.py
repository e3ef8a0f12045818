"""Per-agent adapter slots (teamtr_verl.adapter_slots) on a tiny PEFT LoRA model: a swap is bit-identical."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from teamtr_verl.adapter_slots import AdapterSlots


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def lora_model(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(TwoLayers(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False))
    return model


def training_setup(model, lr=0.05):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))  # lr changes every step
    return optimizer, scheduler


def batch(agent, step):
    g = torch.Generator().manual_seed(1000 * len(agent) + step)  # each agent its own data stream
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def train_step(model, optimizer, scheduler, agent, step):
    x, y = batch(agent, step)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    scheduler.step()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference(agent, steps, start):
    """``agent`` trained alone for ``steps`` steps from the adapter weights ``start``: no swaps."""
    model = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[name])
    optimizer, scheduler = training_setup(model)
    for step in range(steps):
        train_step(model, optimizer, scheduler, agent, step)
    return trainable(model), optimizer


def test_interleaved_training_equals_each_agent_trained_alone_bit_for_bit():
    model = lora_model()
    optimizer, scheduler = training_setup(model)
    slots = AdapterSlots(model, optimizer, scheduler)
    start = trainable(model)
    bob_start = {name: value + 0.01 for name, value in start.items()}  # bob: another adapter, same base
    slots.add("alice")
    slots.add("bob", bob_start)
    steps = {"alice": 0, "bob": 0}
    for agent, n in (("alice", 2), ("bob", 3), ("alice", 1), ("bob", 1), ("alice", 2)):
        slots.activate(agent)
        for _ in range(n):
            train_step(model, optimizer, scheduler, agent, steps[agent])
            steps[agent] += 1
    for agent, begin in (("alice", start), ("bob", bob_start)):
        expected, ref_optimizer = reference(agent, steps[agent], begin)
        state = slots.state_of(agent)
        for name in expected:
            assert torch.equal(state.params[name], expected[name]), (agent, name)
        ref_state = {n: ref_optimizer.state[p] for n, p in
                     zip([n for n, p in lora_model().named_parameters() if p.requires_grad],
                         ref_optimizer.param_groups[0]["params"])}
        for name, moments in state.optimizer_state.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(moments[key], ref_state[name][key]), (agent, name, key)
        assert state.lrs == pytest.approx([ref_optimizer.param_groups[0]["lr"]], rel=0, abs=0)
    # the base weights never moved
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen[n], p) for n, p in lora_model().named_parameters() if not p.requires_grad)


def test_a_round_trip_without_training_is_bit_identical():
    model = lora_model()
    optimizer, scheduler = training_setup(model)
    slots = AdapterSlots(model, optimizer, scheduler)
    slots.add("alice")
    slots.add("bob", {n: torch.zeros_like(p) for n, p in trainable(model).items()})
    slots.activate("alice")
    train_step(model, optimizer, scheduler, "alice", 0)
    before, moments = trainable(model), copy.deepcopy(optimizer.state_dict())
    slots.activate("bob")
    assert all(torch.equal(p, torch.zeros_like(p)) for p in trainable(model).values())
    assert optimizer.state_dict()["state"] == {}  # bob has a fresh optimizer
    slots.activate("alice")
    after = trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    restored = optimizer.state_dict()
    for index, state in moments["state"].items():
        assert all(torch.equal(state[k], restored["state"][index][k]) for k in state)
    assert restored["param_groups"][0]["lr"] == moments["param_groups"][0]["lr"]


def test_bad_slots_are_refused():
    model = lora_model()
    optimizer, _ = training_setup(model)
    slots = AdapterSlots(model, optimizer)
    with pytest.raises(KeyError, match="no adapter slot for agent 'carol'"):
        slots.activate("carol")
    first = next(iter(trainable(model)))
    with pytest.raises(ValueError, match="does not fit"):
        slots.add("bob", {**trainable(model), first: torch.zeros(1)})
    with pytest.raises(ValueError, match="no value for trainable parameters"):
        slots.add("bob", {})
    frozen = torch.optim.AdamW([p for p in model.parameters() if not p.requires_grad])
    with pytest.raises(ValueError, match=r"does not hold the trainable parameters .* \(4 of 4\)"):
        AdapterSlots(model, frozen)


def test_an_optimizer_over_every_parameter_as_verls_engine_builds_it_swaps_the_same():
    """verl's FSDP engine gives AdamW all of the module's parameters, the frozen base too: it never gets state (no
    grad), so slots over it train each agent exactly as slots over the adapter alone do."""
    runs = {}
    for over in ("adapter", "every"):
        model = lora_model()
        params = model.parameters() if over == "every" else [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.05)
        slots = AdapterSlots(model, optimizer)
        slots.add("alice"), slots.add("bob")
        for step, agent in enumerate(["alice", "bob", "alice", "bob", "alice"]):
            slots.activate(agent)
            x, y = batch(agent, step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        runs[over] = {agent: slots.state_of(agent).params for agent in ("alice", "bob")}
    assert all(torch.equal(runs["every"][a][n], runs["adapter"][a][n]) for a in runs["every"] for n in runs["every"][a])
    # a frozen parameter looked up in the state (as verl's optimizer offload does for every parameter) has none
    base = next(p for p in model.parameters() if not p.requires_grad)
    assert optimizer.state[base] == {}
    slots.activate("bob"), slots.activate("alice")
    # one that somehow has state (here: written by hand) is refused at the next swap, not carried over
    optimizer.state[base] = {"exp_avg": torch.zeros_like(base)}
    with pytest.raises(RuntimeError, match="1 frozen .* parameters have optimizer state"):
        slots.activate("bob")


def test_an_agents_own_lr_is_used_on_its_slot_and_follows_the_schedule():
    """Slots added with lr=0.01 and lr=None: a's steps run at 0.01 × the schedule's factor, b's at the team's 0.05 ×
    the same factor; LambdaLR(1/(1+step)) after one step has factor 1/2 (worked out: a 0.005, b 0.025)."""
    model = lora_model()
    optimizer, scheduler = training_setup(model, lr=0.05)
    train_step(model, optimizer, scheduler, "warm", 0)  # the schedule is at factor 1/2 now: lr 0.025
    slots = AdapterSlots(model, optimizer, scheduler)
    slots.add("a", lr=0.01)
    slots.add("b")
    slots.activate("a")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    train_step(model, optimizer, scheduler, "a", 1)  # factor 1/3 after this step: 0.01 / 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 3)
    slots.activate("b")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    train_step(model, optimizer, scheduler, "b", 1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 3)
    slots.activate("a")  # a's schedule went on from its own step, at its own base lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 3)


def test_a_saved_peft_adapter_loads_into_a_slot_under_the_live_names(tmp_path):
    """save_pretrained writes ``...fc1.lora_A.weight``; the live parameters are ``...fc1.lora_A.default.weight``."""
    from teamtr_verl.adapter_slots import load_peft_adapter

    saved_model = lora_model(seed=1)
    saved_model.save_pretrained(tmp_path / "adapter")
    live_model = lora_model(seed=1)  # the same base; its adapter zeroed so that only the load can bring it back
    with torch.no_grad():
        for p in live_model.parameters():
            if p.requires_grad:
                p.zero_()
    slots = AdapterSlots(live_model, training_setup(live_model)[0])
    params = load_peft_adapter(str(tmp_path / "adapter"), slots.params)
    assert params.keys() == slots.params.keys()
    expected = trainable(saved_model)
    assert all(torch.equal(params[name], expected[name]) for name in params)
    slots.add("a", params)
    slots.activate("a")
    assert all(torch.equal(p, expected[n]) for n, p in live_model.named_parameters() if p.requires_grad)
    x = torch.randn(5, 6)
    assert torch.equal(live_model(x), saved_model(x))

    one_module = get_peft_model(TwoLayers(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    one_module.save_pretrained(tmp_path / "fc1_only")
    with pytest.raises(ValueError, match="its modules differ from the team's LoRA adapter"):
        load_peft_adapter(str(tmp_path / "fc1_only"), slots.params)


def stub_worker():
    """The project's FSDP worker class with its rank-local helpers bound to a stand-in whose engine holds a tiny PEFT
    model and its AdamW: (model, optimizer, stand-in, worker class)."""
    from types import SimpleNamespace

    from teamtr_verl.workers import TeamActorRolloutRefWorker as Worker

    model = lora_model()
    optimizer, _ = training_setup(model)
    worker = SimpleNamespace(actor=SimpleNamespace(engine=SimpleNamespace(module=model, optimizer=optimizer,
                                                                          lr_scheduler=None)), rank=0)
    for name in ("_local_actor_tensors", "_local_optimizer_states", "_live_adapter", "_check_snapshot_owner"):
        setattr(worker, name, getattr(Worker, name).__get__(worker))
    return model, optimizer, worker, Worker


def test_the_workers_trust_region_snapshot_holds_the_adapter_only_and_restores_it_exactly():
    """The worker's snapshot / perturb / restore (teamtr_verl.workers, the helpers every update uses) on a tiny PEFT
    model standing for the FSDP engine's module: they hold and move the LoRA weights only, never the frozen base."""
    model, optimizer, worker, Worker = stub_worker()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = trainable(model)
    assert Worker.snapshot_actor_weights(worker) == sum(p.numel() for p in adapter.values())
    assert set(worker._teamtr_snapshot) == set(adapter)  # 4 LoRA matrices, no base weight
    Worker.perturb_actor_weights(worker, 0.1, 0)
    assert all(not torch.equal(p, adapter[n]) for n, p in trainable(model).items())
    Worker.restore_actor_weights(worker)
    assert all(torch.equal(p, adapter[n]) for n, p in trainable(model).items())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_a_snapshot_taken_for_one_agent_is_never_blended_into_another():
    """Shared base: the snapshot holds the live agent's adapter; once another agent's slot is live, blend and
    restore refuse (they would write agent a's weights into agent b's adapter)."""
    model, optimizer, worker, Worker = stub_worker()
    worker._teamtr_slots = AdapterSlots(model, optimizer)
    worker._teamtr_slots.add("a")
    worker._teamtr_slots.add("b")
    worker._teamtr_slots.activate("a")
    Worker.snapshot_actor_weights(worker)
    Worker.blend_actor_weights(worker, 0.5)  # a's own snapshot: fine
    worker._teamtr_slots.activate("b")
    for step in (lambda: Worker.blend_actor_weights(worker, 0.5), lambda: Worker.restore_actor_weights(worker)):
        with pytest.raises(RuntimeError, match="snapshot is agent 'a'.*agent 'b'"):
            step()
