"""Per-agent topology arithmetic and the pre-flight checks of the rollout CLI (no Ray)."""

import json
import re
import subprocess
import sys

import pytest

from teamtr_verl.config import TeamConfig
from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.rollout import CONFIG_DIR, compose
from teamtr_verl.topology import (
    AdapterView,
    _check_bundles_fit,
    adapter_ids,
    agent_trainer_config,
    bundle_cpus_per_node,
    expected_server_names,
    replica_rank_offsets,
    shared_base_config,
    stacks_team,
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [build_tiny_model(root / f"m{i}", seed=i, hidden_size=64, vocab_size=300) for i in range(3)]


def compose_team(model_dirs, placement="split", n_devices=(1, 2, 1), gpus=4, tp=1, extra_overrides=()):
    extra = ["", ", actor: {optim: {lr: 0.5}, ppo_micro_batch_size_per_gpu: 2}", ""]  # a1 overrides its actor
    agents = ", ".join(f"{{name: a{i}, model: '{d}', n_devices: {n}{extra[i]}}}"
                       for i, (d, n) in enumerate(zip(model_dirs, n_devices)))
    return compose(str(CONFIG_DIR), "teamtr_tiny_cpu", [
        f"teamtr.agents=[{agents}]", f"teamtr.placement={placement}", f"trainer.n_gpus_per_node={gpus}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}", *extra_overrides,
    ])


def test_split_offsets_and_server_names(model_dirs):
    config = compose_team(model_dirs)
    team = TeamConfig.from_config(config.teamtr)
    # replicas per agent = its devices / tp: 1, 2, 1 -> offsets 0, 1, 3
    assert replica_rank_offsets(config, team) == {"a0": 0, "a1": 1, "a2": 3}
    assert expected_server_names(config, team) == {
        "a0": ["vllm_server_0_0"], "a1": ["vllm_server_1_0", "vllm_server_2_0"], "a2": ["vllm_server_3_0"]}


def test_an_aligned_swap_builds_the_incumbent_in_place_and_the_newcomer_last(model_dirs, tmp_path):
    """While Stage 0 is to be done, the stacks are the checkpoint's team (a1 with its incumbent model and its own
    overrides) plus a1's newcomer as a 4th agent, with a1's devices and overrides, and its own replica ranks."""
    config = compose_team(model_dirs, gpus=6, extra_overrides=[
        f"+teamtr.replace={{agent: a1, model: '{model_dirs[2]}'}}"])
    team = TeamConfig.from_config(config.teamtr)
    assert stacks_team(team, stage0=False) is team
    built = stacks_team(team, stage0=True)
    assert built.agent_names == ("a0", "a1", "a2", "a1-incoming") and built.replace is None
    assert built.agent("a1") == team.replace.incumbent_agent and built.agent("a1").model == str(model_dirs[1])
    incoming = built.agent("a1-incoming")
    assert (incoming.model, incoming.n_devices, incoming.actor) == (str(model_dirs[2]), 2, team.agent("a1").actor)
    assert replica_rank_offsets(config, built) == {"a0": 0, "a1": 1, "a2": 3, "a1-incoming": 4}
    assert expected_server_names(config, built)["a1-incoming"] == ["vllm_server_4_0", "vllm_server_5_0"]


def test_colocate_every_agent_spans_all_devices(model_dirs):
    config = compose_team(model_dirs, placement="colocate", gpus=2, tp=2)
    team = TeamConfig.from_config(config.teamtr)
    # 2 devices / tp 2 = 1 replica per agent, disjoint global ranks all the same
    assert replica_rank_offsets(config, team) == {"a0": 0, "a1": 1, "a2": 2}


def test_agent_config_takes_its_model_and_overrides_only(model_dirs):
    config = compose_team(model_dirs)
    team = TeamConfig.from_config(config.teamtr)
    a0, a1 = (agent_trainer_config(config, team.agent(n)) for n in ("a0", "a1"))
    assert a0.actor_rollout_ref.model.path == str(model_dirs[0])
    assert a1.actor_rollout_ref.model.path == str(model_dirs[1])
    assert a1.actor_rollout_ref.actor.optim.lr == 0.5 and a1.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 2
    assert a0.actor_rollout_ref.actor.optim.lr == config.actor_rollout_ref.actor.optim.lr == 1e-3
    assert a1.actor_rollout_ref.actor.optim.betas == config.actor_rollout_ref.actor.optim.betas  # merged, not replaced
    assert config.actor_rollout_ref.model.path == str(model_dirs[0])  # the base config is untouched


def test_an_agents_temperature_reaches_its_actor_config_only(model_dirs):
    """verl's actor recomputes log-probs at rollout.temperature: an agent sampled at 0.5 must be scored at 0.5."""
    config = compose_team(model_dirs, extra_overrides=["+teamtr.agents.1.sampling={temperature: 0.5, max_new_tokens: 2}"])
    team = TeamConfig.from_config(config.teamtr)
    a0, a1 = (agent_trainer_config(config, team.agent(n)) for n in ("a0", "a1"))
    assert a1.actor_rollout_ref.rollout.temperature == 0.5
    assert a0.actor_rollout_ref.rollout.temperature == config.actor_rollout_ref.rollout.temperature == 1.0
    assert a1.actor_rollout_ref.rollout.response_length == config.actor_rollout_ref.rollout.response_length


def test_a_frozen_agents_servers_load_its_model_from_disk(model_dirs):
    """A trained agent's servers start with dummy weights that its actor's first sync replaces; a frozen agent has
    no actor, so its servers must load the model path (and verl wants rollout.nnodes > 0 without a worker group)."""
    config = compose_team(model_dirs, extra_overrides=["+teamtr.agents.2.train=false"])
    team = TeamConfig.from_config(config.teamtr)
    frozen, trained = agent_trainer_config(config, team.agent("a2")), agent_trainer_config(config, team.agent("a0"))
    assert (frozen.actor_rollout_ref.rollout.load_format, frozen.actor_rollout_ref.rollout.nnodes) == ("auto", 1)
    assert trained.actor_rollout_ref.rollout.load_format == config.actor_rollout_ref.rollout.load_format == "dummy"
    assert team.trained_names == ("a0", "a1")
    assert expected_server_names(config, team)["a2"] == ["vllm_server_3_0"]  # its replica ranks follow a0's and a1's


def test_a_placement_group_no_node_can_hold_is_refused_not_waited_for(model_dirs, monkeypatch):
    """verl asks max_colocate_count logical CPUs per device bundle, a node's bundles packed on it: split 3 per device
    (one agent's worker each), colocate one per agent plus one. Ray would wait for a group that cannot fit forever."""
    from ray._private import state

    split, colocate = compose_team(model_dirs), compose_team(model_dirs, placement="colocate", gpus=4)
    team_split, team_colocate = TeamConfig.from_config(split.teamtr), TeamConfig.from_config(colocate.teamtr)
    assert bundle_cpus_per_node(split, team_split) == 4 * 3  # 4 devices x 3, whatever the team's size
    assert bundle_cpus_per_node(colocate, team_colocate) == 4 * max(3, 3 + 1)
    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"n1": {"CPU": 14.0, "GPU": 4.0}})
    _check_bundles_fit(split, team_split)  # 12 + 1 spare <= 14
    with pytest.raises(RuntimeError, match=r"asks 16 logical CPUs on each of 1 node\(s\) \(trainer.n_gpus_per_node=4 "
                                           r"bundles x 4 for teamtr.placement='colocate'\) and 1 more must stay free to "
                                           r"place the servers, but only 0 node\(s\) have 17 free \(free CPUs per "
                                           r"node: \[14.0\]\)"):
        _check_bundles_fit(colocate, team_colocate)
    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"n1": {"CPU": 12.0}})
    with pytest.raises(RuntimeError, match="only 0 node"):  # exactly the group, no spare: the servers would wait
        _check_bundles_fit(split, team_split)


@pytest.mark.parametrize("override, expected", [
    ("trainer.n_gpus_per_node=2", "teamtr.placement='split' needs 4 devices"),
    ("teamtr.agents.0.name=a1", "teamtr.agents[1].name='a1' is a duplicate"),
    ("teamtr.agents.2.model=/nonexistent/model", "teamtr.agents[2].model='/nonexistent/model'"),
    ("teamtr.router.sequence=[a0,zed] teamtr.router.kind=sequence", "teamtr.router.sequence[1]='zed'"),
])
def test_rollout_cli_rejects_bad_teams_before_ray_starts(model_dirs, override, expected):
    agents = ", ".join(f"{{name: a{i}, model: '{d}', n_devices: {n}}}" for i, (d, n) in enumerate(zip(model_dirs, (1, 2, 1))))
    command = [sys.executable, "-m", "teamtr_verl.rollout", f"teamtr.agents=[{agents}]", "trainer.n_gpus_per_node=4",
               f"--config-dir={CONFIG_DIR}", "--config-name=teamtr_tiny_cpu", *override.split()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "ray" not in result.stderr.lower().split("teamtr-verl:")[0]


def test_a_shared_base_team_is_one_lora_stack_whose_servers_every_agent_uses(model_dirs):
    """Three agents on m0's weights: one replica set (offset 0 for all), the engine's LoRA keys from
    teamtr.shared_base, one resident vLLM adapter per agent, adapter ids 1000 + team index."""
    config = compose_team(model_dirs, extra_overrides=[
        f"teamtr.shared_base={{model: '{model_dirs[0]}', lora: {{rank: 16, alpha: 8}}}}",
        "teamtr.agents=[{name: a0}, {name: a1, actor: {optim: {lr: 0.5}}}, {name: a2}]"])
    team = TeamConfig.from_config(config.teamtr)
    assert replica_rank_offsets(config, team) == {"a0": 0, "a1": 0, "a2": 0}
    # 4 devices, tp 1: the one stack's 4 replicas serve everyone
    servers = [f"vllm_server_{r}_0" for r in range(4)]
    assert expected_server_names(config, team) == {"a0": servers, "a1": servers, "a2": servers}
    shared = shared_base_config(config, team)
    model = shared.actor_rollout_ref.model
    assert (model.path, model.lora_rank, model.lora_alpha, model.target_modules) == (str(model_dirs[0]), 16, 8,
                                                                                     "all-linear")
    assert shared.actor_rollout_ref.rollout.engine_kwargs.vllm.max_loras == 3
    assert config.actor_rollout_ref.model.lora_rank == 0  # the team's config is left as it was
    assert adapter_ids(team) == {"a0": 1000, "a1": 1001, "a2": 1002}
    assert agent_trainer_config(shared, team.agent("a1")).actor_rollout_ref.actor.optim.lr == 0.5


def test_an_agents_view_of_the_shared_workers_activates_its_adapter_before_every_call():
    calls = []

    class Workers:
        world_size = 2

        def activate_adapter(self, name):
            calls.append(("activate", name))

        def update_actor(self, batch):
            calls.append(("update_actor", batch))
            return "done"

    workers = Workers()
    alice, bob = AdapterView(workers, "alice"), AdapterView(workers, "bob")
    assert alice.update_actor("b1") == "done" and alice.world_size == 2
    bob.update_actor("b2")
    assert calls == [("activate", "alice"), ("update_actor", "b1"), ("activate", "bob"), ("update_actor", "b2")]


@pytest.mark.parametrize("override, expected", [
    ("+actor_rollout_ref.rollout.engine_kwargs.vllm.max_loras=2",
     "actor_rollout_ref.rollout.engine_kwargs.vllm.max_loras=2 is not the team's size (3 agents)"),
    ("actor_rollout_ref.model.lora.merge=true", "actor_rollout_ref.model.lora.merge=True is not supported"),
    ("actor_rollout_ref.model.lora_adapter_path=/a", "actor_rollout_ref.model.lora_adapter_path='/a' would start"),
    ("actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.use_kl_loss=True is not supported"),
    ("actor_rollout_ref.model.lora_rank=32", "actor_rollout_ref.model.lora_rank=32 differs"),
])
def test_shared_base_conflicts_with_the_trainer_config_are_refused_before_ray(model_dirs, override, expected):
    from teamtr_verl.config import TeamConfigError
    from teamtr_verl.validation import validate_shared_base

    config = compose_team(model_dirs, extra_overrides=[
        f"teamtr.shared_base={{model: '{model_dirs[0]}'}}", "teamtr.agents=[{name: a0}, {name: a1}, {name: a2}]",
        override])
    with pytest.raises(TeamConfigError, match=re.escape(expected)):
        validate_shared_base(config, TeamConfig.from_config(config.teamtr))


RELEASE_PROBE = r"""
import json, os, subprocess, sys, time
from types import SimpleNamespace
import psutil, ray
from teamtr_verl.topology import release_stack

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
class Proc:
    '''Stands for a vLLM server: an actor process that started others (vLLM's engine core, which starts its
    workers), one of which left the actor's session (it would outlive a kill of the actor's process group).'''
    def start(self):
        nested = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
                  "time.sleep(600)']); time.sleep(600)")
        self.kids = [subprocess.Popen([sys.executable, "-c", nested]),
                     subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)]
        while len(psutil.Process(self.kids[0].pid).children()) < 1:  # the grandchild has started
            time.sleep(0.05)
        return [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]

worker, server = Proc.remote(), Proc.remote()
pids = ray.get(worker.start.remote()) + ray.get(server.start.remote())
replica = SimpleNamespace(workers=[worker], servers=[server])  # the worker appears twice: counted once
stack = SimpleNamespace(worker_group=SimpleNamespace(workers=[worker]),
                        server_manager=SimpleNamespace(rollout_replicas=[replica]))
released = release_stack(stack, timeout_s=60)
released["alive"] = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
ray.shutdown()
print(json.dumps(released))
"""


def test_releasing_a_stack_ends_its_actors_and_every_process_they_started():
    """A real local Ray: two actors (one listed both as a worker and a replica's worker), each with two children and
    a grandchild; after release_stack none of the eight processes is left."""
    result = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    released = json.loads(result.stdout.strip().splitlines()[-1])
    assert released["alive"] == []
    assert (released["actors"], released["processes"], released["left"]) == (2, 8, 0)
    assert released["gib"] > 0
