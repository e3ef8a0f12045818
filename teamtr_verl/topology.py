"""One actor/rollout worker group, one vLLM replica set and one weight-sync manager per agent, in one Ray cluster.

Stock verl 0.9.1 builds exactly one of each (``PPOTrainer._setup``). A team needs one per agent, keyed by the agent's
name, and two verl internals collide when that is done naively:

* vLLM server actors are named ``vllm_server_{replica_rank}_{node_rank}`` and every worker group starts at replica
  rank 0, so the second agent's servers cannot be created ("name ... is already taken");
* verl's ``name_suffix`` (used by its teacher models) fixes the name but not the worker-side lookup: the actor's
  ``ServerAdapter`` still resolves ``vllm_server_{replica_rank}_...`` without the suffix, so a weight sync fails --
  or, for an agent whose replica rank happens to match another agent's, silently goes into the wrong server.

The fix (research/two_agent_topology.md): give each agent a disjoint range of *global* replica ranks, on both sides:
the server manager launches agent k's replicas at ``start_rank = offset_k``, and agent k's workers shift their
``ServerAdapter.replica_rank`` (and the ZMQ weight socket named after it) by the same offset.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from teamtr_verl.config import INCOMING_SUFFIX, AgentSpec, TeamConfig
from teamtr_verl.watchdog import SHARED_BASE_PREFIX

logger = logging.getLogger(__name__)


def agent_trainer_config(base: DictConfig, agent: AgentSpec) -> DictConfig:
    """The whole trainer config as agent ``agent`` sees it: its own model path, its actor overrides merged in, its
    sampling temperature (verl's actor divides the logits by ``rollout.temperature`` to recompute the log-probs of
    what vLLM sampled). A frozen agent's servers load its weights from the model path (no actor ever syncs them).

    Every other key (rollout settings, data, reward) is the team's; the base config is left untouched.
    """
    config = copy.deepcopy(base)
    with open_dict(config):
        config.actor_rollout_ref.model.path = agent.model
        if agent.actor:
            config.actor_rollout_ref.actor = OmegaConf.merge(config.actor_rollout_ref.actor, dict(agent.actor))
        if agent.sampling.temperature is not None:
            config.actor_rollout_ref.rollout.temperature = agent.sampling.temperature
        if not agent.train:
            config.actor_rollout_ref.rollout.load_format = "auto"
            config.actor_rollout_ref.rollout.nnodes = config.trainer.nnodes  # verl asserts it without a worker group
    return config


def shared_base_config(base: DictConfig, team: TeamConfig) -> DictConfig:
    """The trainer config of a shared-base team's one stack: the base model with a LoRA adapter of the team's rank
    (the engine reads ``model.lora_rank``, vLLM's server too), and one resident vLLM adapter per agent."""
    shared = team.shared_base
    config = copy.deepcopy(base)
    with open_dict(config):
        model = config.actor_rollout_ref.model
        model.path = shared.model
        model.lora_rank, model.lora_alpha = shared.lora_rank, shared.lora_alpha
        model.target_modules = shared.target_modules
        rollout = config.actor_rollout_ref.rollout
        rollout.engine_kwargs = OmegaConf.merge(rollout.get("engine_kwargs") or {},
                                                {"vllm": {"max_loras": len(team.agents)}})
    return config


ADAPTER_ID_BASE = 1000  # verl's own sync removes adapter id 123 first: agents stay clear of it


def adapter_ids(team: TeamConfig) -> dict[str, int]:
    """Each agent's vLLM adapter id, in team order."""
    return {agent.name: ADAPTER_ID_BASE + index for index, agent in enumerate(team.agents)}


def configured_max_loras(rollout_config):
    """``engine_kwargs.vllm.max_loras`` of a rollout config, or None (stock verl ignores it and serves one adapter)."""
    return ((rollout_config.get("engine_kwargs") or {}).get("vllm") or {}).get("max_loras")


def stacks_team(team: TeamConfig, stage0: bool) -> TeamConfig:
    """The agents a run builds stacks for: the team, or, while a Stage-0 aligned swap is to be done, the team as the
    checkpoint holds it (the incumbent in its place) plus the incoming model as one more agent, last, named
    ``<agent>-incoming`` (its own workers, servers and replica ranks)."""
    if not stage0:
        return team
    swap = team.replace
    agents = [swap.incumbent_agent if agent.name == swap.agent else agent for agent in team.agents]
    incoming = dataclasses.replace(team.agent(swap.agent), name=f"{swap.agent}{INCOMING_SUFFIX}")
    return dataclasses.replace(team, agents=(*agents, incoming), replace=None)


def replicas_per_agent(config: DictConfig, n_devices: int) -> int:
    """How many vLLM replicas ``n_devices`` devices of one agent hold (tensor x data x pipeline parallel each)."""
    rollout = config.actor_rollout_ref.rollout
    per_replica = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
    return n_devices // per_replica


def colocate_count(team: TeamConfig) -> int:
    """Processes a device bundle may host (verl's ``max_colocate_count``): one agent's worker in ``split`` (verl's
    default slack of 3), every agent's worker plus one in ``colocate``; the one worker of a shared base."""
    return 3 if team.placement == "split" or team.shared_base is not None else max(3, len(team.agents) + 1)


def bundle_cpus_per_node(config: DictConfig, team: TeamConfig) -> int:
    """Logical CPUs verl's placement group asks of each node: ``max_colocate_count`` per device bundle, and a node's
    bundles packed on that node (STRICT_PACK). Ray waits forever, without a message, for a group that cannot fit."""
    return config.trainer.n_gpus_per_node * colocate_count(team)


def replica_rank_offsets(config: DictConfig, team: TeamConfig) -> dict[str, int]:
    """First global replica rank of each agent: the replica counts of the agents before it, in team order."""
    if team.shared_base is not None:  # one replica set, every agent's
        return {agent.name: 0 for agent in team.agents}
    offsets, next_rank = {}, 0
    for agent in team.agents:
        offsets[agent.name] = next_rank
        next_rank += replicas_per_agent(config, agent_devices(config, team, agent))
    return offsets


def agent_devices(config: DictConfig, team: TeamConfig, agent: AgentSpec) -> int:
    """Devices an agent's workers span: its own share in ``split``, every device in ``colocate`` (and with a shared
    base, where the one stack is every agent's)."""
    if team.placement == "split" and team.shared_base is None:
        return agent.n_devices
    return config.trainer.n_gpus_per_node * config.trainer.nnodes


def expected_server_names(config: DictConfig, team: TeamConfig) -> dict[str, list[str]]:
    """The Ray actor names of each agent's vLLM servers (single-node replicas), for the post-set-up check."""
    offsets = replica_rank_offsets(config, team)
    return {
        agent.name: [
            f"vllm_server_{offsets[agent.name] + r}_0"
            for r in range(replicas_per_agent(config, agent_devices(config, team, agent)))
        ]
        for agent in team.agents
    }


class AdapterView:
    """Agent ``name``'s view of a shared-base team's one worker group: every call first makes that agent's adapter
    slot the live one (``activate_adapter``, a no-op when it already is), so whatever verl or the stage loop asks of
    an agent's workers -- log-probs, an update, a snapshot, a sync, a checkpoint -- runs on that agent's adapter and
    optimizer state, never on whichever agent happened to be live."""

    def __init__(self, worker_group, name: str):
        self._worker_group, self.agent = worker_group, name

    def __getattr__(self, attribute):
        value = getattr(self._worker_group, attribute)
        if not callable(value) or attribute.startswith("_") or attribute == "activate_adapter":
            return value

        def on_this_agents_adapter(*args, **kwargs):
            self._worker_group.activate_adapter(self.agent)  # blocking: the call below runs after the swap
            return value(*args, **kwargs)

        return on_this_agents_adapter


@dataclass
class AgentStack:
    """Everything that serves and trains one agent."""

    name: str
    config: DictConfig  # the whole trainer config as this agent sees it (agent_trainer_config)
    worker_group: object  # RayWorkerGroup of TeamActorRolloutRefWorker; None for a frozen agent
    server_manager: object  # AgentLLMServerManager (FrozenLLMServerManager for a frozen agent)
    checkpoint_manager: object  # CheckpointEngineManager: pushes the actor's weights into its own replicas; or None
    replica_rank_offset: int
    adapter_id: Optional[int] = None  # shared base: the vLLM adapter id of this agent (its requests and syncs)

    @property
    def trained(self) -> bool:
        return self.worker_group is not None

    def client(self):
        """An ``LLMServerClient`` whose load balancer knows only this agent's servers (shared base: the team's, every
        request naming this agent's adapter)."""
        if self.adapter_id is None:
            return self.server_manager.get_client()
        from teamtr_verl.multilora_server import AdapterLLMServerClient

        return self.server_manager.get_client(AdapterLLMServerClient, lora_name=self.name, lora_int_id=self.adapter_id)


def _resource_pool(config: DictConfig, team: TeamConfig):
    """Every device of the cluster, as verl's pool of bundles; refuses one no node can hold (before Ray's silent
    wait). A bundle hosts up to :func:`colocate_count` worker processes."""
    from verl.single_controller.ray import RayResourcePool

    pool = RayResourcePool([config.trainer.n_gpus_per_node] * config.trainer.nnodes, use_gpu=True,
                           name_prefix="teamtr_", max_colocate_count=colocate_count(team))
    _check_bundles_fit(config, team)
    return pool


def _spawn_workers(pool, config: DictConfig, role: str, name_prefix: str, device: str):
    """A worker group of the project's actor/rollout worker on ``pool`` (``config``: its whole trainer config), with
    its model built."""
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup
    from verl.single_controller.ray.base import create_colocated_worker_cls

    from teamtr_verl.workers import TeamActorRolloutRefWorker

    worker_cls = RayClassWithInitArgs(cls=ray.remote(TeamActorRolloutRefWorker), config=config.actor_rollout_ref,
                                      distillation_config=None, role=role)
    worker_group = RayWorkerGroup(resource_pool=pool,
                                  ray_cls_with_init=create_colocated_worker_cls(class_dict={role: worker_cls}),
                                  device_name=device, name_prefix=name_prefix).spawn(prefix_set={role})[role]
    worker_group.init_model()
    return worker_group


def _sync_manager(config: DictConfig, worker_group, server_manager):
    """verl's checkpoint-engine manager that pushes ``worker_group``'s weights into ``server_manager``'s replicas."""
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.utils.config import omega_conf_to_dataclass

    engine_config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine)
    engine_config.backend = "naive"  # colocated actor and rollout, as verl's v1 trainer forces
    return CheckpointEngineManager(config=engine_config, actor_wg=worker_group, replicas=server_manager.get_replicas())


def build_team_stacks(config: DictConfig, team: TeamConfig, role: str = "actor_rollout") -> dict[str, AgentStack]:
    """Create every agent's worker group, vLLM replicas and checkpoint-engine manager, in team order.

    Needs a running Ray cluster with enough logical devices (the caller validated placement). ``role`` is the
    worker role verl would use: ``actor_rollout``, or ``actor_rollout_ref`` when a reference model is needed.
    """
    from verl.single_controller.ray.base import split_resource_pool

    from teamtr_verl.workers import AgentLLMServerManager, FrozenLLMServerManager

    if team.shared_base is not None:
        return build_shared_stacks(config, team, role)
    global_pool = _resource_pool(config, team)
    if team.placement == "split":
        pools = dict(zip(team.agent_names, split_resource_pool(global_pool, [a.n_devices for a in team.agents])))
    else:
        pools = {name: global_pool for name in team.agent_names}
    logger.info("teamtr: %s placement over %d devices", team.placement,
                config.trainer.n_gpus_per_node * config.trainer.nnodes)

    offsets = replica_rank_offsets(config, team)
    stacks: dict[str, AgentStack] = {}
    for agent in team.agents:
        agent_config = agent_trainer_config(config, agent)
        offset = offsets[agent.name]
        if not agent.train:  # vLLM servers only: no actor, no optimizer, nothing to sync
            server_manager = FrozenLLMServerManager.create(config=agent_config, worker_group=None,
                                                           rollout_resource_pool=pools[agent.name], rank_offset=offset)
            stacks[agent.name] = AgentStack(agent.name, agent_config, None, server_manager, None, offset)
            continue
        worker_group = _spawn_workers(pools[agent.name], agent_config, role, f"teamtr_{agent.name}_",
                                      config.trainer.device)
        # Before the first sync: the ServerAdapter looks its server up by this rank, lazily.
        worker_group.set_replica_rank_offset(offset)
        server_manager = AgentLLMServerManager.create(
            config=agent_config, worker_group=worker_group, rollout_resource_pool=pools[agent.name], rank_offset=offset
        )
        stacks[agent.name] = AgentStack(agent.name, agent_config, worker_group, server_manager,
                                        _sync_manager(agent_config, worker_group, server_manager), offset)
    check_server_names(config, team)
    return stacks


def build_shared_stacks(config: DictConfig, team: TeamConfig, role: str = "actor_rollout") -> dict[str, AgentStack]:
    """A shared-base team: one worker group (the base, one live LoRA adapter, a parked slot per agent), one vLLM
    replica set holding every agent's adapter, and per agent an :class:`AgentStack` of views on them: its calls run on
    its adapter (:class:`AdapterView`), its client's requests name its adapter, its syncs push only its adapter."""
    from teamtr_verl.multilora_server import MultiLoRAVLLMReplica
    from teamtr_verl.workers import AgentLLMServerManager

    shared_config = shared_base_config(config, team)
    pool = _resource_pool(config, team)
    worker_group = _spawn_workers(pool, shared_config, role, SHARED_BASE_PREFIX, config.trainer.device)
    ids = adapter_ids(team)
    lrs = {agent.name: agent.actor["optim"]["lr"] for agent in team.agents if "lr" in (agent.actor.get("optim") or {})}
    paths = {agent.name: agent.adapter_path for agent in team.agents if agent.adapter_path}
    worker_group.init_adapter_slots(ids, lrs, paths)
    server_manager = AgentLLMServerManager.create(config=shared_config, worker_group=worker_group,
                                                  rollout_resource_pool=pool, rank_offset=0,
                                                  replica_cls=MultiLoRAVLLMReplica)
    stacks = {}
    for agent in team.agents:
        view = AdapterView(worker_group, agent.name)
        stacks[agent.name] = AgentStack(agent.name, agent_trainer_config(shared_config, agent), view, server_manager,
                                        _sync_manager(shared_config, view, server_manager), 0,
                                        adapter_id=ids[agent.name])
    logger.info("teamtr: shared base %s, adapters %s", team.shared_base.model, ids)
    check_server_names(config, team)
    for stack in stacks.values():  # every adapter resident before any turn (the first sync also sends the base)
        stack.checkpoint_manager.update_weights()
    return stacks


def _layout(team: TeamConfig) -> str:
    return "teamtr.shared_base" if team.shared_base is not None else f"teamtr.placement={team.placement!r}"


def _check_bundles_fit(config: DictConfig, team: TeamConfig) -> None:
    """Refuse, naming the numbers, a placement group that no node can hold (instead of Ray's silent wait)."""
    from ray._private import state  # DeveloperAPI (ray 2.x), as the watchdog's actor table

    from teamtr_verl.validation import RAY_SPARE_CPUS

    # one spare: the vLLM servers and verl's loop workers need a free CPU to be placed after the group
    need = bundle_cpus_per_node(config, team) + RAY_SPARE_CPUS
    free = [resources.get("CPU", 0.0) for resources in state.available_resources_per_node().values()]
    fitting = sum(1 for cpus in free if cpus >= need)
    if fitting < config.trainer.nnodes:
        raise RuntimeError(
            f"teamtr: verl's placement group asks {need - RAY_SPARE_CPUS} logical CPUs on each of "
            f"{config.trainer.nnodes} node(s) (trainer.n_gpus_per_node={config.trainer.n_gpus_per_node} bundles x "
            f"{colocate_count(team)} for {_layout(team)}) and {RAY_SPARE_CPUS} more must stay "
            f"free to place the servers, but only {fitting} node(s) have {need} free (free CPUs per node: "
            f"{sorted(free, reverse=True)}): raise ray_kwargs.ray_init.num_cpus, or use fewer devices per node")


def check_server_names(config: DictConfig, team: TeamConfig) -> None:
    """After set-up: each agent's servers exist under the names its workers will look up, and no others."""
    import ray

    expected = expected_server_names(config, team)
    live = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if isinstance(actor, dict) and actor.get("name", "").startswith("vllm_server_")}
    wanted = {name for names in expected.values() for name in names}
    if live != wanted:
        raise RuntimeError(f"teamtr: vLLM server actors {sorted(live)} differ from the expected {expected}")


def sync_agent_weights(stacks: dict[str, AgentStack], name: str, global_steps: Optional[int] = None) -> None:
    """Push agent ``name``'s actor weights into agent ``name``'s replicas, and only those."""
    stacks[name].checkpoint_manager.update_weights(global_steps)


async def _greedy_probe(stack: AgentStack, prompt_ids: list[list[int]], max_tokens: int):
    """Greedy tokens and log-probs of one agent's servers on fixed prompts (deterministic on a fixed model)."""
    import asyncio
    from uuid import uuid4

    client = stack.client()
    params = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": max_tokens}
    outputs = await asyncio.gather(
        *[client.generate(uuid4().hex, prompt_ids=ids, sampling_params=dict(params)) for ids in prompt_ids]
    )
    return [(list(o.token_ids), list(o.log_probs or [])) for o in outputs]


def check_sync_isolation(stacks: dict[str, AgentStack], probe_prompt_ids: dict[str, list[list[int]]],
                         moved_agent: str, max_tokens: int = 8, scale: float = 0.05) -> dict[str, bool]:
    """Prove that a weight sync reaches exactly one agent's servers, then put everything back.

    Perturbs ``moved_agent``'s actor weights and syncs them. Returns, per agent, whether its greedy probe outputs
    changed: True for the moved agent (the sync arrived), False for every other (bit-identical tokens and
    log-probs). Finally restores and re-syncs the moved agent and checks its outputs are back as before.
    """
    import asyncio

    async def probe_all():
        names = list(stacks)
        results = await asyncio.gather(*[_greedy_probe(stacks[n], probe_prompt_ids[n], max_tokens) for n in names])
        return dict(zip(names, results))

    # Baseline after a sync of the unchanged actor: servers loaded from disk can differ in the last bits from
    # weights pushed by the actor (verl's trainer, too, syncs once at start-up before the first rollout).
    sync_agent_weights(stacks, moved_agent)
    before = asyncio.run(probe_all())
    workers = stacks[moved_agent].worker_group
    workers.snapshot_actor_weights()
    workers.perturb_actor_weights(scale, 0)
    sync_agent_weights(stacks, moved_agent)
    after = asyncio.run(probe_all())
    workers.restore_actor_weights()
    sync_agent_weights(stacks, moved_agent)
    restored = asyncio.run(probe_all())
    if restored != before:
        raise RuntimeError(f"teamtr: restoring {moved_agent!r}'s weights did not restore its servers' outputs")
    return {name: after[name] != before[name] for name in stacks}


def stack_actors(stack: AgentStack) -> list:
    """Every Ray actor of one agent's stack, once each: its worker group's workers and each vLLM replica's servers and
    workers (a trained agent's replica workers are its worker group's; a frozen agent's, small checkpoint-engine
    ones)."""
    handles = list(stack.worker_group.workers) if stack.worker_group is not None else []
    for replica in stack.server_manager.rollout_replicas:
        handles += list(replica.workers) + list(replica.servers)
    return list({handle._actor_id.hex(): handle for handle in handles}.values())


def release_stack(stack: AgentStack, timeout_s: float = 60.0) -> dict:
    """End one agent's stack for good: kill its Ray actors, then wait until their processes and every process they
    started (vLLM's engine core and its workers; Ray 2.60 ends an actor's whole process tree) have exited. Returns
    ``actors``, ``processes`` (those on this node, where they can be watched), ``gib`` (their unique memory before the
    kill) and ``left`` (processes still running after ``timeout_s``, named in a warning: the run goes on).

    Afterwards nothing may call the stack: the caller routes its turns elsewhere and stops watching its actors first.
    """
    import psutil
    import ray
    from ray._private import state  # DeveloperAPI (ray 2.x), as the watchdog's actor table

    handles = stack_actors(stack)
    ids = {handle._actor_id.hex() for handle in handles}
    node = ray.get_runtime_context().get_node_id()
    pids = [row["Pid"] for row in state.actors().values()
            if row["ActorID"] in ids and row["State"] == "ALIVE" and row["Address"]["NodeID"] == node]
    tree = _process_tree(pids)
    gib = sum(_uss(process) for process in tree) / 2**30
    for handle in handles:
        ray.kill(handle, no_restart=True)
    _, left = psutil.wait_procs(tree, timeout=timeout_s)
    if left:
        logger.warning("teamtr: processes %s of %s's released stack still run %.0f s after its actors were killed",
                       [process.pid for process in left], stack.name, timeout_s)
    return {"actors": len(handles), "processes": len(tree), "gib": gib, "left": len(left)}


def _process_tree(pids: list[int]) -> list:
    import psutil

    tree = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                tree[process.pid] = process
        except psutil.NoSuchProcess:
            continue
    return list(tree.values())


def _uss(process) -> int:
    import psutil

    try:
        return process.memory_full_info().uss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0
