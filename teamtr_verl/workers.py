"""Small subclasses of verl 0.9.1 worker/server classes that let several agents share one Ray cluster.

Why each exists is explained in :mod:`teamtr_verl.topology`: every agent gets a disjoint range of global vLLM
replica ranks, and both the server side (replicas, their Ray actor names) and the worker side (the actor's
``ServerAdapter`` that finds its server by name, and the ZMQ weight socket) must agree on it.
"""

from __future__ import annotations

import asyncio
import copy
import functools

import torch
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.rollout.llm_server import LLMServerManager
from verl.workers.rollout.replica import RolloutMode
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica


class TeamActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker, plus the replica-rank offset of its agent."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def set_replica_rank_offset(self, offset: int) -> int:
        """Shift this rank's ServerAdapter to global replica rank ``rank + offset``; returns the new rank.

        The adapter resolves its server as ``vllm_server_{replica_rank}_{node}`` on first use and names its weight
        socket after the same rank, so both move; the cached server handle is dropped to force the new lookup.
        """
        adapter = self.rollout
        old_rank = adapter.replica_rank
        new_rank = old_rank + offset
        if offset:
            adapter.replica_rank = new_rank
            adapter.zmq_handle = adapter.zmq_handle.replace(f"-replica-{old_rank}-", f"-replica-{new_rank}-")
            adapter.server_handle = None
        return new_rank

    # -- shared-base teams (teamtr.shared_base): one LoRA adapter per agent on this one engine --------------------
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_adapter_slots(self, adapter_ids: dict[str, int], lrs: dict[str, float] | None = None,
                           adapter_paths: dict[str, str] | None = None) -> str:
        """One adapter slot per agent (``{agent: vLLM adapter id}``, team order): the PEFT adapter saved at the agent's
        ``adapter_paths`` entry, else a copy of the fresh adapter (``lora_B = 0``: the base model); the agent's own
        learning rate where ``lrs`` gives one. The first agent's is live. From now on a weight sync pushes the live
        adapter under its agent's id and name (and the base once, as verl does). Returns the live agent."""
        from teamtr_verl.adapter_slots import AdapterSlots, load_peft_adapter

        engine = self.actor.engine
        self._teamtr_slots = AdapterSlots(engine.module, engine.optimizer, engine.lr_scheduler)
        for name in adapter_ids:
            path = (adapter_paths or {}).get(name)
            params = load_peft_adapter(path, self._teamtr_slots.params) if path else None
            self._teamtr_slots.add(name, params, lr=(lrs or {}).get(name))
        self._teamtr_adapter_ids = dict(adapter_ids)
        self._teamtr_slots.activate(next(iter(adapter_ids)))
        send = self.rollout.update_weights

        async def update_weights(weights, global_steps=None, **kwargs):
            # verl's ServerAdapter passes extra keywords on to the vLLM workers' update_weights_from_ipc
            name = self._teamtr_slots.active
            return await send(weights, global_steps=global_steps, lora_int_id=self._teamtr_adapter_ids[name],
                              lora_name=name, **kwargs)

        self.rollout.update_weights = update_weights  # this instance's: verl's update_weights calls it unchanged
        return self._teamtr_slots.active

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def activate_adapter(self, name: str) -> str:
        """Make agent ``name``'s adapter, optimizer and lr-scheduler state the live ones (a no-op if they are);
        the previous agent's are parked exactly. Every call of an agent's worker-group view comes after this one."""
        self._teamtr_slots.activate(name)
        return name

    # -- the actor's weights, rank-locally (each FSDP rank keeps its own shard) -------------------------------------
    def _local_actor_tensors(self):
        # the trainable ones: all of them in full fine-tuning; a LoRA actor's adapter, not its frozen base (#14)
        for name, parameter in self.actor.engine.module.named_parameters():
            if parameter.requires_grad:
                yield name, parameter.to_local() if hasattr(parameter, "to_local") else parameter.data

    def _local_optimizer_states(self):
        """(parameter name, {state key: rank-local tensor}) of the actor's optimizer (Adam: exp_avg, exp_avg_sq,
        step)."""
        optimizer = self.actor.engine.optimizer
        for name, parameter in self.actor.engine.module.named_parameters():
            state = optimizer.state.get(parameter)
            if state:
                yield name, {key: value.to_local() if hasattr(value, "to_local") else value
                             for key, value in state.items() if isinstance(value, torch.Tensor)}

    def _live_adapter(self):
        slots = getattr(self, "_teamtr_slots", None)
        return slots.active if slots is not None else None

    def _check_snapshot_owner(self) -> None:
        # shared base: a snapshot holds one agent's adapter; blending it into another's would mix two agents
        if self._teamtr_snapshot_of != self._live_adapter():
            raise RuntimeError(f"the trust-region snapshot is agent {self._teamtr_snapshot_of!r}'s, but agent "
                               f"{self._live_adapter()!r}'s adapter is live")

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def scale_optimizer_momentum(self, alpha: float) -> int:
        """Scale Adam's first moment by α after a shortened step: the momentum carries the step taken, not the
        proposal the line search cut back. Returns #elements scaled."""
        scaled = 0
        with torch.no_grad():
            for _, state in self._local_optimizer_states():
                if "exp_avg" in state:
                    state["exp_avg"].mul_(alpha)
                    scaled += state["exp_avg"].numel()
        return scaled

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def snapshot_actor_weights(self) -> int:
        """Keep a CPU copy of this rank's actor weights θ_cur (the pre-update policy); returns #elements.

        Also forgets the proposal of the previous update (see :meth:`blend_actor_weights`).
        """
        self._teamtr_snapshot = {name: t.detach().to("cpu", copy=True) for name, t in self._local_actor_tensors()}
        self._teamtr_snapshot_of = self._live_adapter()
        self._teamtr_proposal = None
        # the optimizer too: a given-up update must leave no trace in Adam's moments or the lr schedule
        self._teamtr_optim_snapshot = {name: {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
                                       for name, state in self._local_optimizer_states()}
        scheduler = self.actor.engine.lr_scheduler
        self._teamtr_sched_snapshot = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        return sum(t.numel() for t in self._teamtr_snapshot.values())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def blend_actor_weights(self, alpha: float) -> int:
        """Set the actor's weights to θ_cur + α·(θ_new − θ_cur), in place; returns #elements.

        θ_new is the proposal the optimizer produced: the weights at the first call after a snapshot. α = 0 restores
        the pre-update policy exactly, α = 1 the full update; a backtracking line search halves α until the
        measured KL is inside the trust region.
        """
        snapshot = getattr(self, "_teamtr_snapshot", None)
        if snapshot is None:
            raise RuntimeError("blend_actor_weights called before snapshot_actor_weights")
        self._check_snapshot_owner()
        if self._teamtr_proposal is None:
            self._teamtr_proposal = {name: t.detach().to("cpu", copy=True) for name, t in self._local_actor_tensors()}
        blended = 0
        with torch.no_grad():
            for name, tensor in self._local_actor_tensors():
                cur, new = snapshot[name].float(), self._teamtr_proposal[name].float()
                tensor.copy_((cur + alpha * (new - cur)).to(tensor.device, tensor.dtype))
                blended += tensor.numel()
        return blended

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def restore_actor_weights(self) -> int:
        """Put the pre-update weights θ_cur back, bit-exact (a plain copy, no arithmetic), with the optimizer state and
        the lr scheduler as they were at the snapshot."""
        snapshot = getattr(self, "_teamtr_snapshot", None)
        if snapshot is None:
            raise RuntimeError("restore_actor_weights called before snapshot_actor_weights")
        self._check_snapshot_owner()
        restored = 0
        with torch.no_grad():
            for name, tensor in self._local_actor_tensors():
                tensor.copy_(snapshot[name].to(tensor.device, tensor.dtype))
                restored += tensor.numel()
            saved = self._teamtr_optim_snapshot
            optimizer = self.actor.engine.optimizer
            for name, parameter in self.actor.engine.module.named_parameters():
                if name not in saved:  # no state before this update (the agent's first step): drop the new one
                    optimizer.state.pop(parameter, None)
            for name, state in self._local_optimizer_states():
                for key, value in state.items():
                    value.copy_(saved[name][key].to(value.device, value.dtype))
        if self._teamtr_sched_snapshot is not None:
            self.actor.engine.lr_scheduler.load_state_dict(copy.deepcopy(self._teamtr_sched_snapshot))
        return restored

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def perturb_actor_weights(self, scale: float, seed: int) -> int:
        """Add N(0, scale²) noise to the actor's weights: the sync-isolation self-test moves one agent with it."""
        generator = torch.Generator().manual_seed(seed + self.rank)
        perturbed = 0
        with torch.no_grad():
            for _, tensor in self._local_actor_tensors():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * scale
                tensor.add_(noise.to(tensor.device, tensor.dtype))
                perturbed += tensor.numel()
        return perturbed

    # -- Stage 0 of an aligned swap (teamtr.replace): distillation from the incumbent ---------------------------------
    # Both run the actor's module directly on a padded batch (rollout_batch.pack_sequences): verl's engine path returns
    # one value per token, and the teacher's top-k is a k-vector per token. Each rank runs the whole batch
    # (ONE_TO_ALL): FSDP averages identical gradients, so the step is the single-rank one.
    def _response_logits(self, sequences: dict, rows: slice, temperature: float) -> torch.Tensor:
        """The actor's logits / T at the positions that predict the response tokens: (rows, R, vocab), float32."""
        from contextlib import nullcontext

        from verl.utils.device import get_device_id, get_device_name

        engine = self.actor.engine
        input_ids = sequences["input_ids"][rows].to(get_device_id())
        attention_mask = sequences["attention_mask"][rows].to(input_ids.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        dtype = getattr(engine, "_autocast_dtype", torch.float32)  # as the engine's own forward_step
        autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=get_device_name(),
                                                                                 dtype=dtype)
        length = sequences["response_mask"].shape[1]
        with autocast:  # the responses end the padded block: the last R + 1 positions hold the R predicting ones
            logits = engine.module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False, logits_to_keep=length + 1).logits
        return logits[:, :length].float() / temperature

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def reset_optimizer_state(self) -> int:
        """Forget Adam's moments (after Stage 0: they describe the distillation, not the team's objective, and the
        swapped agent's TeamTR updates start from a fresh optimizer). Returns #parameters that had state."""
        optimizer = self.actor.engine.optimizer
        had = len(optimizer.state)
        optimizer.state.clear()
        return had

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage0_teacher_topk(self, sequences: dict, k: int, temperature: float, micro_rows: int,
                            vocab_limit: int) -> dict:
        """The incumbent's k most likely next tokens at every response position, with their log-probabilities
        (normalized over its whole vocabulary; ids below ``vocab_limit``, the tokenizer both models share):
        ``log_probs`` float32 and ``ids`` int32, (rows, R, k)."""
        log_probs, ids = [], []
        with self.actor.engine.eval_mode(), torch.no_grad():
            for start in range(0, len(sequences["input_ids"]), micro_rows):
                logits = self._response_logits(sequences, slice(start, start + micro_rows), temperature)
                limit = min(vocab_limit, logits.shape[-1])
                top = torch.log_softmax(logits, dim=-1)[..., :limit].topk(min(k, limit), dim=-1)
                log_probs.append(top.values.cpu())
                ids.append(top.indices.int().cpu())  # int32: half the bytes sent back to every rank each epoch
        return {"log_probs": torch.cat(log_probs), "ids": torch.cat(ids)}

    def _logprobs_at(self, sequences: dict, ids: torch.Tensor, temperature: float, micro_rows: int) -> torch.Tensor:
        """log π of the given tokens at every response position: ``ids`` (rows, R, k) -> (rows, R, k) float32."""
        out = []
        with self.actor.engine.eval_mode(), torch.no_grad():
            for start in range(0, len(sequences["input_ids"]), micro_rows):
                part = slice(start, start + micro_rows)
                logits = self._response_logits(sequences, part, temperature)
                out.append(torch.log_softmax(logits, dim=-1).gather(-1, ids[part].to(logits.device).long()).cpu())
        return torch.cat(out)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage0_logprobs_at(self, sequences: dict, ids: torch.Tensor, temperature: float,
                           micro_rows: int) -> torch.Tensor:
        """This model's log-probabilities of the given tokens at every response position (the newcomer's, as it came,
        at the incumbent's top-k: the other end of the geometric-mixture target): (rows, R, k) float32."""
        return self._logprobs_at(sequences, ids, temperature, micro_rows)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage0_message_logp(self, sequences: dict, temperature: float, micro_rows: int) -> torch.Tensor:
        """log π(message | context) of every row: the sum of its response tokens' log-probabilities at
        ``temperature`` (the cross-tokenizer monitor scores each model in its own tokens): (rows,) float64."""
        from teamtr_verl.rollout_batch import packed_responses

        token = self._logprobs_at(sequences, packed_responses(sequences)[..., None], temperature, micro_rows)[..., 0]
        real = sequences["response_mask"] > 0
        return torch.where(real, token, torch.zeros_like(token)).double().sum(-1)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def stage0_distill_epoch(self, sequences: dict, teacher: dict, temperature: float, mini_rows: int,
                             micro_rows: int, lr: float | None = None) -> dict:
        """One pass over the probe's training messages, one optimizer step per ``mini_rows`` of them: the loss is the
        top-k forward KL(π_incumbent ‖ π_new) (:func:`teamtr_verl.algos.topk_forward_kl`) averaged over response
        tokens. ``lr`` (None: the configured ``actor.optim.lr``, not the schedule's current value, which is 0 at the
        start of a warm-up) holds for these steps only; the lr schedule does not advance (Stage 0 is not part of the
        newcomer's training schedule)."""
        from teamtr_verl.algos import topk_forward_kl

        engine, mask = self.actor.engine, sequences["response_mask"]
        rows, losses, grad_norms = len(mask), [], []
        scaler = getattr(engine, "scaler", None)  # fp16: optimizer_step unscales, so the loss must be scaled
        saved_lrs = [group["lr"] for group in engine.optimizer.param_groups]
        for group in engine.optimizer.param_groups:
            group["lr"] = lr if lr is not None else engine.optimizer_config.lr
        try:
            with engine.train_mode():
                for start in range(0, rows, mini_rows):
                    stop = min(start + mini_rows, rows)
                    tokens = mask[start:stop].sum().clamp(min=1.0)
                    engine.optimizer_zero_grad()
                    loss_sum = 0.0
                    for micro in range(start, stop, micro_rows):
                        part = slice(micro, min(micro + micro_rows, stop))
                        logits = self._response_logits(sequences, part, temperature)
                        kl = topk_forward_kl(teacher["log_probs"][part].to(logits.device),
                                             teacher["ids"][part].to(logits.device), logits)
                        real = mask[part].to(kl.device) > 0  # where, not a product: a padded position's NaN stays out
                        loss = torch.where(real, kl, torch.zeros_like(kl)).sum() / tokens
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                        loss_sum += float(loss.detach())
                    grad_norms.append(float(engine.optimizer_step()))
                    losses.append(loss_sum)
        finally:
            for group, saved in zip(engine.optimizer.param_groups, saved_lrs):
                group["lr"] = saved
        return {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
                "steps": len(losses)}


class OffsetVLLMReplica(vLLMReplica):
    """A vLLM replica with a global ``replica_rank`` of ``offset + local rank`` that still takes its workers from its
    own agent's worker group (stock ``init_hybrid`` slices the group by the global rank, which would be empty)."""

    def __init__(self, *args, rank_offset: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank_offset = rank_offset

    async def init_hybrid(self, worker_group):
        self.rollout_mode = RolloutMode.HYBRID
        local_rank = self.replica_rank - self.rank_offset
        self.workers = worker_group.workers[self.world_size * local_rank : self.world_size * (local_rank + 1)]
        await self.launch_servers()


class AgentLLMServerManager(LLMServerManager):
    """verl's server manager for one agent: replicas start at global rank ``rank_offset``.

    Uses verl's own hook for recipes: ``rollout_replica_class`` set before ``LLMServerManager.__init__``.
    """

    def __init__(self, *args, rank_offset: int = 0, replica_cls=OffsetVLLMReplica, **kwargs):
        self.rollout_replica_class = functools.partial(replica_cls, rank_offset=rank_offset)
        super().__init__(*args, start_rank=rank_offset, **kwargs)


class FrozenLLMServerManager(AgentLLMServerManager):
    """The vLLM replicas of a frozen agent (``train: false``): no actor worker group behind them.

    Each replica is launched in verl's colocated mode, as verl launches its teacher models: on its own
    ``tensor x data x pipeline``-device slice of the agent's resource pool, with small checkpoint-engine workers
    instead of FSDP ones, and vLLM loading the weights from the agent's model path (``rollout.load_format=auto``,
    set by :func:`teamtr_verl.topology.agent_trainer_config`). Replica ranks start at the agent's offset as for a
    trained agent, so the server names are the expected ones.
    """

    async def _initialize_llm_servers(self, start_rank: int = None):
        from verl.single_controller.ray.base import split_resource_pool

        rollout = self.rollout_config
        world_size = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
        pools = split_resource_pool(self.rollout_resource_pool, world_size)
        first = self.start_rank if start_rank is None else start_rank
        self.rollout_replicas = [
            self.rollout_replica_class(replica_rank=first + index, config=rollout, model_config=self.model_config,
                                       gpus_per_node=rollout.n_gpus_per_node)
            for index in range(len(pools))
        ]
        await asyncio.gather(*[replica.init_colocated(pool) for replica, pool in zip(self.rollout_replicas, pools)])
        self.server_handles = [replica._server_handle for replica in self.rollout_replicas]
        self.server_addresses = [replica._server_address for replica in self.rollout_replicas]
