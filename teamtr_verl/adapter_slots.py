"""Per-agent adapter slots for shared-base teams (issue #14): one live adapter, the others parked, swapped exactly.

TeamTR trains one agent at a time, so a team of N LoRA adapters on one base needs only one live adapter in the
training engine: before agent k's update its adapter weights, optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``,
``step``), learning rate and scheduler state are copied in, and the previous agent's are copied out into its slot.
Copies are ``copy_`` into the live tensors (the optimizer keeps its parameter objects) and clones out of them, so a
swap is bit-identical: training A, parking it, training B and bringing A back continues A exactly as if B had never
run (tests/test_adapter_slots.py checks this against unswapped runs).

Pure torch: the FSDP worker (``teamtr_verl.workers``, ``init_adapter_slots``/``activate_adapter``) holds one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Slot:
    """One agent's parked training state (tensors on the slot's device, detached clones)."""

    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]] = field(default_factory=dict)  # by parameter name
    lrs: list[float] = field(default_factory=list)  # per param group
    scheduler_state: Optional[dict] = None


class AdapterSlots:
    """The trainable parameters of ``module`` (``requires_grad``, e.g. a PEFT model's LoRA weights) and ``optimizer``
    (its param groups hold them; they may also hold the frozen base, as verl's FSDP engine builds its optimizer over
    every parameter, as long as the frozen ones never get optimizer state) as one live agent plus parked slots."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Optional[Any] = None, slot_device: str | torch.device = "cpu"):
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the module has no trainable parameters (requires_grad): nothing to keep per agent")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"the optimizer does not hold the trainable parameters {missing[:3]} "
                             f"({len(missing)} of {len(self.params)})")
        self.optimizer, self.scheduler, self.slot_device = optimizer, scheduler, torch.device(slot_device)
        self.name_of = {id(p): name for name, p in self.params.items()}
        self.slots: dict[str, Slot] = {}
        self.active: Optional[str] = None

    # --------------------------------------------------------------------------------------------------- slots
    def add(self, agent: str, params: Optional[dict[str, torch.Tensor]] = None, lr: Optional[float] = None) -> None:
        """A new slot: ``params`` (by name; e.g. a loaded adapter or a seeded init), or a copy of the live weights;
        no optimizer state (a fresh Adam), the optimizer's current learning rates and the scheduler's state, or the
        agent's own base learning rate ``lr`` in their place (scaled as the schedule scales the optimizer's now)."""
        if agent in self.slots:
            raise ValueError(f"agent {agent!r} already has a slot")
        source = params if params is not None else {name: p.detach() for name, p in self.params.items()}
        missing = sorted(set(self.params) - set(source))
        if missing:
            raise ValueError(f"agent {agent!r}: no value for trainable parameters {missing[:3]}")
        for name, value in source.items():
            if name not in self.params or value.shape != self.params[name].shape:
                raise ValueError(f"agent {agent!r}: parameter {name!r} of shape {tuple(value.shape)} does not fit "
                                 f"the live adapter {tuple(self.params[name].shape) if name in self.params else '(none)'}")
        slot = self._slot({name: source[name] for name in self.params}, {})
        if lr is not None:
            scheduler = slot.scheduler_state or {}
            bases = scheduler.get("base_lrs") or [group.get("initial_lr", group["lr"])
                                                  for group in self.optimizer.param_groups]
            # the schedule's factor now (e.g. mid warm-up) applies to the agent's lr as it does to the team's
            slot.lrs = [lr * (now / base if base else 1.0) for now, base in zip(slot.lrs, bases)]
            if "base_lrs" in scheduler:
                scheduler["base_lrs"], scheduler["_last_lr"] = [lr] * len(bases), list(slot.lrs)
        self.slots[agent] = slot

    def activate(self, agent: str) -> None:
        """Park the live agent (if any) in its slot, then load ``agent``'s weights, optimizer and scheduler state."""
        if agent not in self.slots:
            raise KeyError(f"no adapter slot for agent {agent!r}; slots: {sorted(self.slots)}")
        if agent == self.active:
            return
        if self.active is not None:
            self.slots[self.active] = self._capture()
        slot = self.slots[agent]
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(slot.params[name])
                p.grad = None
        self.optimizer.state.clear()
        for name, state in slot.optimizer_state.items():
            p = self.params[name]
            self.optimizer.state[p] = {key: value.to(p.device).clone() if torch.is_tensor(value) else copy.deepcopy(value)
                                       for key, value in state.items()}
        for group, lr in zip(self.optimizer.param_groups, slot.lrs):
            group["lr"] = lr
        if self.scheduler is not None and slot.scheduler_state is not None:
            self.scheduler.load_state_dict(copy.deepcopy(slot.scheduler_state))
        self.active = agent

    def state_of(self, agent: str) -> Slot:
        """``agent``'s current state (the live one captured now, a parked one as parked): what a checkpoint saves."""
        return self._capture() if agent == self.active else self.slots[agent]

    # --------------------------------------------------------------------------------------------------- helpers
    def _park(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.slot_device, copy=True)

    def _capture(self) -> Slot:
        # an empty entry is no state: optimizer.state is a defaultdict, and verl's optimizer offload reads every key
        frozen = [p for p, state in self.optimizer.state.items() if state and id(p) not in self.name_of]
        if frozen:  # a parked agent would leave them behind for the next one: not per agent, not exact
            raise RuntimeError(f"{len(frozen)} frozen (requires_grad=False) parameters have optimizer state")
        state = {self.name_of[id(p)]: {key: self._park(value) if torch.is_tensor(value) else copy.deepcopy(value)
                                       for key, value in s.items()}
                 for p, s in self.optimizer.state.items() if id(p) in self.name_of}
        return self._slot(self.params, state)

    def _slot(self, params: dict[str, torch.Tensor], optimizer_state: dict) -> Slot:
        """A slot of ``params`` parked, ``optimizer_state`` as given, the optimizer's and scheduler's current state."""
        return Slot(params={name: self._park(p) for name, p in params.items()}, optimizer_state=optimizer_state,
                    lrs=[group["lr"] for group in self.optimizer.param_groups],
                    scheduler_state=copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None)


def load_peft_adapter(path: str, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory's weights keyed and placed as the live adapter's parameters ``live`` (PEFT saves
    ``...q_proj.lora_A.weight``; the live module names the adapter: ``...q_proj.lora_A.default.weight``; an FSDP2
    parameter is a DTensor: the saved full tensor is sharded like it)."""
    import os

    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    saved = load_file(file) if os.path.isfile(file) else torch.load(os.path.join(path, "adapter_model.bin"),
                                                                     weights_only=True)
    by_live_name = {}
    for key, tensor in saved.items():
        stem, _, leaf = key.rpartition(".")
        by_live_name[f"{stem}.default.{leaf}"] = tensor
    missing = sorted(set(live) - set(by_live_name))
    extra = sorted(set(by_live_name) - set(live))
    if missing or extra:
        raise ValueError(f"adapter {path}: its modules differ from the team's LoRA adapter (missing {missing[:2]}, "
                         f"not in the team's {extra[:2]}): save it with the same target_modules")
    params = {}
    for name, parameter in live.items():
        tensor = by_live_name[name].to(parameter.dtype)
        if hasattr(parameter, "device_mesh"):  # DTensor
            from torch.distributed.tensor import distribute_tensor

            tensor = distribute_tensor(tensor.to(parameter.device), parameter.device_mesh, parameter.placements)
        params[name] = tensor
    return params
