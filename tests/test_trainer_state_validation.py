"""What a TeamTR run carries across a checkpoint (``TeamTRState``) and what it refuses before Ray starts
(``validate_teamtr_config`` and its hook in verl's stock ``main_ppo`` entry point)."""

from __future__ import annotations

import copy
import json
import pathlib
import random
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from teamtr_verl.algos import BetaState
from teamtr_verl.config import TeamConfig, TeamConfigError
from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.rollout import CONFIG_DIR, compose
from teamtr_verl.state import STATE_FILE, STATE_VERSION, TeamTRState
from teamtr_verl.validation import validate_teamtr_config

NAMES = ("alice", "bob", "carol")


def team(order="fixed", order_seed=0, names=NAMES, models=None, **extra):
    models = models or [f"/models/{name}" for name in names]
    block = {"agents": [{"name": n, "model": m} for n, m in zip(names, models)], "order": order,
             "order_seed": order_seed, **extra}
    return TeamConfig.from_config(block, check_paths=False)


def shuffles(seed, count, names=NAMES):
    """``count`` successive ``random.Random(seed).shuffle`` draws of the agents: the spec of order=random."""
    rng, out = random.Random(seed), []
    for _ in range(count):
        drawn = list(names)
        rng.shuffle(drawn)
        out.append(drawn)
    return out


def busy_state() -> TeamTRState:
    """A state after some training: every field away from its initial value."""
    t = team(order="random", order_seed=5, beta_init=0.2)
    state = TeamTRState.initial(t)
    state.next_order(t)
    state.next_order(t)
    state.stages_done = 2
    state.set_beta_state("alice", BetaState(beta=0.2025, tries=0, num_updates=2, num_backtracks=2, last_kl=0.009))
    state.set_beta_state("bob", BetaState(beta=0.3375, num_updates=1, num_give_ups=1, last_kl=0.3))
    state.kl_history = {"alice": [0.004, 0.009], "bob": [], "carol": [0.001]}
    state.certificate_sum, state.measured_gain_sum, state.last_return_mean = -0.75, 0.5, 0.625
    state.updates_history = [{"stage": 1, "agent": "alice", "bound": -0.1, "measured_gain": 0.25},
                             {"stage": 2, "agent": "carol", "bound": -0.2, "measured_gain": None}]
    state.gain_pairs = [[-0.1, 0.25], [-0.3, 0.25]]
    return state


# ---------------------------------------------------------------------------------------------------- TeamTRState
def test_initial_state():
    t = TeamConfig.from_config({"agents": [{"name": "alice", "model": "/m/a", "beta_init": 0.5},
                                           {"name": "bob", "model": "/m/b"}], "beta_init": 0.2}, check_paths=False)
    state = TeamTRState.initial(t)
    assert state.agent_names == ["alice", "bob"]
    assert state.agent_models == {"alice": "/m/a", "bob": "/m/b"}
    assert state.stages_done == 0 and state.last_return_mean is None
    assert state.beta_state("alice") == BetaState(beta=0.5)  # its own beta_init
    assert state.beta_state("bob") == BetaState(beta=0.2)  # the team default
    assert state.kl_history == {"alice": [], "bob": []}
    assert state.updates_history == [] and state.gain_pairs == []


@pytest.mark.parametrize("order, expected", [("fixed", list(NAMES)), ("reversed", list(NAMES[::-1]))])
def test_next_order_fixed_and_reversed_do_not_touch_the_rng(order, expected):
    t = team(order=order)
    state = TeamTRState.initial(t)
    rng_before = copy.deepcopy(state.order_rng_state)
    assert [state.next_order(t) for _ in range(3)] == [expected] * 3
    assert state.order_rng_state == rng_before


def test_next_order_random_is_seeded():
    t = team(order="random", order_seed=0)
    state = TeamTRState.initial(t)
    drawn = [state.next_order(t) for _ in range(5)]
    assert drawn == shuffles(0, 5)
    assert ["".join(n[0] for n in order) for order in drawn] == ["acb", "cba", "abc", "acb", "acb"]
    other = TeamTRState.initial(team(order="random", order_seed=1))
    assert [other.next_order(t) for _ in range(5)] != drawn  # seed 1: bca cab acb acb bca


def test_to_dict_from_dict_round_trip_through_json():
    state = busy_state()
    data = json.loads(json.dumps(state.to_dict()))
    assert data["version"] == STATE_VERSION
    assert TeamTRState.from_dict(data) == state


def test_save_load_round_trip_keeps_every_field_and_the_order_rng(tmp_path):
    state = busy_state()
    path = state.save(tmp_path)
    assert path == tmp_path / STATE_FILE
    loaded = TeamTRState.load(tmp_path)
    assert loaded == state
    assert loaded.beta_state("alice") == BetaState(beta=0.2025, num_updates=2, num_backtracks=2, last_kl=0.009)
    assert loaded.kl_history["alice"] == [0.004, 0.009] and loaded.gain_pairs == [[-0.1, 0.25], [-0.3, 0.25]]
    # the orders drawn after the round trip are the ones the run would have drawn without it: stages 3.. of seed 5
    t = team(order="random", order_seed=5)
    after = [loaded.next_order(t) for _ in range(3)]
    assert after == [state.next_order(t) for _ in range(3)] == shuffles(5, 5)[2:]


def test_save_is_atomic(tmp_path, monkeypatch):
    state = busy_state()
    state.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no .tmp left behind
    assert json.loads((tmp_path / STATE_FILE).read_text()) == state.to_dict()  # complete
    # a crash half-way through writing the next state leaves the previous file whole
    previous = (tmp_path / STATE_FILE).read_text()
    real_write_text = pathlib.Path.write_text

    def crash(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", crash)
    state.stages_done = 3
    with pytest.raises(OSError, match="disk full"):
        state.save(tmp_path)
    assert (tmp_path / STATE_FILE).read_text() == previous
    assert TeamTRState.load(tmp_path).stages_done == 2


@pytest.mark.parametrize("configured, what", [
    (team(names=("alice", "bob", "dave")), "another name"),
    (team(names=("alice", "bob")), "fewer agents"),
    (team(models=["/models/alice", "/models/bob-v2", "/models/carol"]), "another model path"),
])
def test_check_matches_lists_both_sides(configured, what):
    state = TeamTRState.initial(team())
    with pytest.raises(ValueError) as error:
        state.check_matches(configured, "/ckpt/global_step_4")
    message = str(error.value)
    assert "/ckpt/global_step_4" in message, what
    saved = [(n, f"/models/{n}") for n in NAMES]
    assert f"checkpoint agents (name, model) = {saved}" in message, what
    assert f"configured teamtr.agents = {[(a.name, a.model) for a in configured.agents]}" in message, what


def test_check_matches_accepts_the_same_team():
    TeamTRState.initial(team()).check_matches(team(order="random", beta_init=0.3), "/ckpt")


def test_from_dict_rejects_unknown_keys_and_other_versions():
    data = busy_state().to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['surprise'\]"):
        TeamTRState.from_dict({**data, "surprise": 1})
    with pytest.raises(ValueError, match=r"version 2; this teamtr-verl reads version 1"):
        TeamTRState.from_dict({**data, "version": 2})
    data.pop("version")
    with pytest.raises(ValueError, match="version None"):
        TeamTRState.from_dict(data)


# ------------------------------------------------------------------------------------------ validate_teamtr_config
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_models")
    return [build_tiny_model(root / name, seed=i, hidden_size=64, vocab_size=300) for i, name in enumerate(NAMES[:2])]


def agents_override(model_dirs):
    return "teamtr.agents=[" + ", ".join(f"{{name: {n}, model: '{d}'}}" for n, d in zip(NAMES, model_dirs)) + "]"


@pytest.fixture(scope="module")
def good_config(model_dirs):
    return compose(str(CONFIG_DIR), "teamtr_tiny_cpu", [agents_override(model_dirs)])


def test_good_config_passes(good_config):
    validated = validate_teamtr_config(good_config)
    assert validated.agent_names == ("alice", "bob") and validated.schedule == "teamtr"


@pytest.mark.parametrize("key, value, expected", [
    ("algorithm.adv_estimator", "grpo", "algorithm.adv_estimator='grpo'"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla", "actor_rollout_ref.actor.policy_loss.loss_mode='vanilla'"),
    ("actor_rollout_ref.rollout.n", 1, "actor_rollout_ref.rollout.n=1 must be > 1"),
    ("trainer.n_gpus_per_node", 1, "teamtr.placement='split' needs 2 devices (alice: 1, bob: 1) but "
                                   "trainer.n_gpus_per_node * trainer.nnodes = 1"),
    ("teamtr.order", "sideways", "teamtr.order='sideways' is not valid: choose one of fixed, reversed, random"),
    ("teamtr.schedule", "async", "teamtr.schedule='async' is not valid: choose one of teamtr, stale, joint, happo"),
    ("trainer.resume_mode", "sometimes", "trainer.resume_mode='sometimes' is not valid"),
    ("critic.enable", True, "critic.enable=True is not supported"),
    ("algorithm.use_kl_in_reward", True, "algorithm.use_kl_in_reward=True is not supported"),
])
def test_bad_config_names_the_dotted_key_and_value(good_config, key, value, expected):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, key, value)
    with pytest.raises(TeamConfigError) as error:
        validate_teamtr_config(config)
    assert expected in str(error.value)


def test_resample_every_needs_schedule_teamtr(good_config):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "teamtr.schedule", "stale")
    OmegaConf.update(config, "teamtr.resample_every", 2)
    with pytest.raises(TeamConfigError, match=r"teamtr.resample_every=2 only applies to teamtr.schedule='teamtr' "
                                              r"\(it is 'stale'\)"):
        validate_teamtr_config(config)


def test_bad_config_through_hydra_overrides(model_dirs):
    """The same check on a config composed with the override on the command line, as main_ppo would see it."""
    config = compose(str(CONFIG_DIR), "teamtr_tiny_cpu", [agents_override(model_dirs), "teamtr.order=sideways"])
    with pytest.raises(TeamConfigError, match="teamtr.order='sideways'"):
        validate_teamtr_config(config)


# ------------------------------------------------------------------------------- the stock main_ppo entry point
MAIN_PPO_CASES = {
    "rollout_n_1": ("actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.n=1"),
    "missing_model": ("teamtr.agents.1.model=/nonexistent/teamtr_model",
                      "teamtr.agents[1].model='/nonexistent/teamtr_model' does not exist"),
}


@pytest.fixture(scope="module")
def main_ppo_runs(model_dirs):
    """Both bad runs of ``python -m verl.trainer.main_ppo``, started together (each spends ~8 s importing verl)."""
    procs = {}
    for case, (override, _) in MAIN_PPO_CASES.items():
        command = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR),
                   "--config-name", "teamtr_tiny_cpu", agents_override(model_dirs), override]
        procs[case] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for case, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            results[case] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("case", list(MAIN_PPO_CASES))
def test_stock_main_ppo_stops_a_bad_teamtr_config_before_ray(main_ppo_runs, case):
    returncode, stdout, stderr = main_ppo_runs[case]
    assert returncode == 2, stderr[-3000:]
    assert f"teamtr-verl: config error: {MAIN_PPO_CASES[case][1]}" in stderr, stderr[-3000:]
    output = stdout + stderr
    assert "ray init kwargs" not in output  # printed by run_ppo right before ray.init
    assert "Started a local Ray instance" not in output and "ray.init" not in output
    assert "Traceback" not in stderr
