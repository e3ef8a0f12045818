"""What a TeamTR run carries across a checkpoint (``TeamTRState``) and what it refuses before Ray starts
(``validate_teamtr_config`` and its hook in verl's stock ``main_ppo`` entry point)."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from teamtr_verl import algos
from teamtr_verl.algos import BetaState
from teamtr_verl.config import TeamConfig, TeamConfigError
from teamtr_verl.fixtures import build_tiny_model
from teamtr_verl.rollout import CONFIG_DIR, compose
from teamtr_verl.state import STATE_FILE, STATE_VERSION, TeamTRState
from teamtr_verl.validation import validate_teamtr_config

NAMES = ("alice", "bob", "carol")


def team(order="fixed", order_seed=0, names=NAMES, models=None, frozen=(), **extra):
    models = models or [f"/models/{name}" for name in names]
    block = {"agents": [{"name": n, "model": m, "train": n not in frozen} for n, m in zip(names, models)],
             "order": order, "order_seed": order_seed, **extra}
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
    state.set_beta_state("alice", BetaState(beta=0.144, num_updates=2, num_backtracks=2, last_kl=0.2))
    state.set_beta_state("bob", BetaState(beta=0.24, num_updates=1, num_give_ups=1, last_kl=0.5))
    state.record_update(update(1, "alice", kl=0.009, kl_full=0.2, alpha=0.1, bound=-0.1))
    state.record_paired_gain(algos.GainEstimate(0.25, 0.05, 8), stage=1)
    state.record_update(update(2, "bob", committed=False, kl=0.0, kl_full=0.5, alpha=0.0))
    state.record_update(update(2, "carol", kl=0.001, kl_full=0.001, alpha=1.0, bound=-0.2))
    return state


def update(stage, agent, committed=True, **extra):
    """A ledger entry as the trainer records it (only the keys the state reads are required)."""
    return {"stage": stage, "agent": agent, "position": 0, "committed": committed, "delta": 0.01, **extra}


def pairs_state(bounds, gains):
    """One committed update per stage, each measured by its own paired gain."""
    state = TeamTRState.initial(team())
    for stage, (bound, gain) in enumerate(zip(bounds, gains), start=1):
        state.record_update(update(stage, "alice", kl=0.005, bound=bound))
        state.record_paired_gain(algos.GainEstimate(gain, 0.1, 8), stage=stage)
    return state


# ---------------------------------------------------------------------------------------------------- TeamTRState
def test_initial_state():
    t = TeamConfig.from_config({"agents": [{"name": "alice", "model": "/m/a", "beta_init": 0.5},
                                           {"name": "bob", "model": "/m/b"}], "beta_init": 0.2}, check_paths=False)
    state = TeamTRState.initial(t)
    assert state.agent_names == ["alice", "bob"]
    assert state.agent_models == {"alice": "/m/a", "bob": "/m/b"}
    assert state.stages_done == 0
    assert state.beta_state("alice") == BetaState(beta=0.5)  # its own beta_init
    assert state.beta_state("bob") == BetaState(beta=0.2)  # the team default
    assert state.kl_history == {"alice": [], "bob": []}
    assert state.ledger == [] and state.gain_pairs == []
    assert state.certificate_stats() == {}


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
    assert loaded.beta_state("alice") == BetaState(beta=0.144, num_updates=2, num_backtracks=2, last_kl=0.2)
    assert loaded.kl_history == {"alice": [0.009], "bob": [], "carol": [0.001]}
    assert loaded.gain_pairs == [[-0.1, 0.25]]
    assert [(u["stage"], u["agent"], u["measured"], u["crn_gain"]) for u in loaded.ledger] == [
        (1, "alice", True, 0.25), (2, "bob", False, None), (2, "carol", False, None)]
    # the unmeasured updates of stage 2 are still paired by the resumed run (e.g. its closing regeneration)
    paired = loaded.record_paired_gain(algos.GainEstimate(0.5, 0.1, 8), stage=2)
    assert [u["agent"] for u in paired] == ["bob", "carol"]
    assert loaded.gain_pairs == [[-0.1, 0.25], [-0.2, 0.5]]
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
    (team(frozen=("bob",)), "an agent frozen since"),
])
def test_check_matches_lists_both_sides(configured, what):
    state = TeamTRState.initial(team())
    with pytest.raises(ValueError) as error:
        state.check_matches(configured, "/ckpt/global_step_4")
    message = str(error.value)
    assert "/ckpt/global_step_4" in message, what
    saved = [(n, f"/models/{n}", True) for n in NAMES]
    assert f"checkpoint agents (name, model, train) = {saved}" in message, what
    assert f"configured teamtr.agents = {[(a.name, a.model, a.train) for a in configured.agents]}" in message, what


def test_a_frozen_agent_has_no_beta_and_no_place_in_the_order():
    """carol is frozen: the orders (every kind) hold alice and bob only; the random order draws from the RNG as a
    team of two would; carol has no β state; the state records her as frozen and a resume with her frozen matches."""
    frozen = team(frozen=("carol",), order="random", order_seed=7)
    state = TeamTRState.initial(frozen)
    assert state.frozen_agents == ["carol"] and sorted(state.beta) == sorted(state.kl_history) == ["alice", "bob"]
    assert [state.next_order(frozen) for _ in range(3)] == shuffles(7, 3, names=("alice", "bob"))
    assert TeamTRState.initial(team(frozen=("carol",))).next_order(team(frozen=("carol",))) == ["alice", "bob"]
    assert TeamTRState.initial(team(frozen=("alice",), order="reversed")).next_order(
        team(frozen=("alice",), order="reversed")) == ["carol", "bob"]
    state.check_matches(team(frozen=("carol",)), "/ckpt")
    # a state file written before frozen agents existed (no key) reads as a team without any
    data = TeamTRState.initial(team()).to_dict()
    del data["frozen_agents"]
    assert TeamTRState.from_dict(data).frozen_agents == []


def test_a_checkpoint_of_one_layout_is_refused_by_the_other():
    """Full stacks and a shared base (or another LoRA rank) save different weights: resuming across is refused
    before Ray starts, both sides listed. The agents' names and models are the same in all three."""
    shared = team(models=["/models/base"] * len(NAMES), shared_base={"model": "/models/base"})
    rank16 = team(models=["/models/base"] * len(NAMES), shared_base={"model": "/models/base", "lora": {"rank": 16}})
    full = team(models=["/models/base"] * len(NAMES))
    for saved, configured, shown in [(full, shared, "= None; configured: ['/models/base', 8, 16]"),
                                     (shared, full, "= ['/models/base', 8, 16]; configured: None"),
                                     (shared, rank16, "configured: ['/models/base', 16, 16]")]:
        with pytest.raises(ValueError, match=re.escape(shown)):
            TeamTRState.initial(saved).check_matches(configured, "/ckpt")
    TeamTRState.initial(shared).check_matches(shared, "/ckpt")
    data = TeamTRState.initial(full).to_dict()
    del data["shared_base"]  # a state file written before shared-base teams existed: full stacks
    TeamTRState.from_dict(data).check_matches(full, "/ckpt")


def test_check_matches_accepts_the_same_team():
    TeamTRState.initial(team()).check_matches(team(order="random", beta_init=0.3), "/ckpt")


def swap_bob(model="/models/bob-v2", frozen=()):
    return team(frozen=frozen, replace={"agent": "bob", "model": model, "method": "direct"})


def test_check_matches_tells_a_pending_swap_from_a_done_one():
    """The checkpoint holds the incumbent: the swap is to be done (True). It holds the new model: the swap was done
    before this resume (False, no change to the command line needed). Anything else is another team, listed with
    the agents as configured (the incumbent's side)."""
    assert TeamTRState.initial(team()).check_matches(swap_bob(), "/ckpt") is True
    assert TeamTRState.initial(team(frozen=("bob",))).check_matches(swap_bob(frozen=("bob",)), "/ckpt") is True
    swapped = TeamTRState.initial(team(models=["/models/alice", "/models/bob-v2", "/models/carol"]))
    assert swapped.check_matches(swap_bob(), "/ckpt") is False
    assert TeamTRState.initial(team()).check_matches(team(), "/ckpt") is False
    with pytest.raises(ValueError) as error:
        TeamTRState.initial(team(models=["/models/alice", "/models/bob-v1", "/models/carol"])).check_matches(
            swap_bob(), "/ckpt")
    assert "configured teamtr.agents = [('alice', '/models/alice', True), ('bob', '/models/bob', True)" in str(
        error.value)


def test_a_swap_is_refused_inside_a_stage():
    state = TeamTRState.initial(team())
    state.cursor = {"stage": 3, "order": list(NAMES), "done": 1, "metrics": {}, "agent_dirs": {}}
    with pytest.raises(ValueError, match=r"teamtr.replace: the checkpoint at /ckpt/stage_3_update_1 is inside stage 3 "
                                         r"\(teamtr.save_every_update\): an agent is swapped between stages"):
        state.check_matches(swap_bob(), "/ckpt/stage_3_update_1")


def test_apply_replacement_records_the_swap_and_restarts_only_that_agents_beta():
    state = busy_state()
    before = copy.deepcopy(state)
    t = team(order="random", order_seed=5, beta_init=0.2,
             replace={"agent": "bob", "model": "/models/bob-v2", "method": "direct"})
    record = state.apply_replacement(t)
    assert record == {"stage": 2, "agent": "bob", "from": "/models/bob", "to": "/models/bob-v2", "method": "direct"}
    assert state.replacements == [record]
    assert state.agent_models == {"alice": "/models/alice", "bob": "/models/bob-v2", "carol": "/models/carol"}
    assert state.beta_state("bob") == BetaState(beta=0.2)  # was 0.24 with a give-up: another model's history
    assert state.beta["alice"] == before.beta["alice"] and state.beta["carol"] == before.beta["carol"]
    # the ledger, the pairs, the order RNG and the stage count carry over
    for key in ("ledger", "gain_pairs", "order_rng_state", "stages_done", "kl_history"):
        assert getattr(state, key) == getattr(before, key), key
    assert TeamTRState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert state.check_matches(t, "/ckpt") is False  # resuming the swapped team again is no second swap


def test_from_dict_rejects_unknown_keys_and_other_versions():
    data = busy_state().to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['surprise'\]"):
        TeamTRState.from_dict({**data, "surprise": 1})
    assert STATE_VERSION == 2
    with pytest.raises(ValueError, match=r"version 1; this teamtr-verl reads version 2"):
        TeamTRState.from_dict({**data, "version": 1})  # a v1 state (updates_history, certificate_sum...) is refused
    v1 = {key: value for key, value in data.items() if key not in ("ledger",)}
    v1.update(version=2, updates_history=[], certificate_sum=0.0, measured_gain_sum=0.0, last_return_mean=None)
    with pytest.raises(ValueError, match=r"unknown keys \['certificate_sum', 'last_return_mean', 'measured_gain_sum', "
                                         r"'updates_history'\]"):
        TeamTRState.from_dict(v1)
    data.pop("version")
    with pytest.raises(ValueError, match="version None"):
        TeamTRState.from_dict(data)


# ------------------------------------------------------------------------------------- the certificate ledger
def test_record_update_appends_to_the_ledger_and_the_kl_history_of_committed_updates():
    state = TeamTRState.initial(team())
    entry = update(1, "alice", kl=0.009, bound=-0.1)
    state.record_update(entry)
    state.record_update(update(1, "bob", committed=False, kl=0.0))
    assert state.ledger == [{**entry, "crn_gain": None, "crn_gain_se": None, "measured": False},
                            {**update(1, "bob", committed=False, kl=0.0), "crn_gain": None, "crn_gain_se": None,
                             "measured": False}]
    assert "measured" not in entry  # the caller's dict is not modified
    assert state.kl_history == {"alice": [0.009], "bob": [], "carol": []}


def test_record_paired_gain_measures_each_update_once_teamtr():
    """teamtr: a regeneration after each update pairs with the one before it: one update, one pair."""
    state = TeamTRState.initial(team())
    state.record_update(update(3, "alice", kl=0.009, bound=-0.1))
    measured = state.record_paired_gain(algos.GainEstimate(0.25, 0.05, 8), stage=3)
    assert [u["agent"] for u in measured] == ["alice"]
    state.record_update(update(3, "bob", kl=0.004, bound=0.02))
    assert [u["agent"] for u in state.record_paired_gain(algos.GainEstimate(-0.1, 0.02, 7), stage=3)] == ["bob"]
    assert [(u["crn_gain"], u["crn_gain_se"], u["measured"]) for u in state.ledger] == [
        (0.25, 0.05, True), (-0.1, 0.02, True)]
    assert state.gain_pairs == [[-0.1, 0.25], [0.02, -0.1]]
    assert state.record_paired_gain(algos.GainEstimate(1.0, 0.1, 8), stage=3) == []  # nothing left to measure
    assert len(state.gain_pairs) == 2


def test_record_paired_gain_shares_one_pair_between_the_updates_of_a_stale_stage():
    state = TeamTRState.initial(team())
    state.record_update(update(2, "alice", kl=0.009, bound=-0.1))
    state.record_update(update(2, "bob", committed=False, kl=0.0))  # given up: no bound, still measured
    state.record_update(update(2, "carol", kl=0.002, bound=-0.25))
    measured = state.record_paired_gain(algos.GainEstimate(0.4, 0.1, 8), stage=2)
    assert [u["agent"] for u in measured] == ["alice", "bob", "carol"]
    assert all(u["crn_gain"] == 0.4 and u["measured"] for u in state.ledger)
    assert state.gain_pairs == [[pytest.approx(-0.35), 0.4]]  # the bounds of the committed updates add up


def test_record_paired_gain_needs_a_bound_on_every_committed_update_to_make_a_pair():
    state = TeamTRState.initial(team())
    state.record_update(update(1, "alice", kl=0.009, bound=None))  # e.g. heldout_fraction=0
    state.record_update(update(1, "bob", kl=0.009, bound=-0.1))
    assert len(state.record_paired_gain(algos.GainEstimate(0.2, 0.1, 8), stage=1)) == 2
    assert state.gain_pairs == []  # a pair with half the bound would be miscalibrated
    state.record_update(update(2, "alice", committed=False, kl=0.0))  # nothing committed: no pair
    assert len(state.record_paired_gain(algos.GainEstimate(0.0, 0.1, 8), stage=2)) == 1
    assert state.gain_pairs == []


def test_record_paired_gain_never_pairs_an_earlier_stage():
    """An update left unmeasured (no closing regeneration) is not measured by another stage's episodes."""
    state = TeamTRState.initial(team())
    state.record_update(update(1, "bob", kl=0.009, bound=-0.1))
    state.record_update(update(2, "alice", kl=0.004, bound=-0.2))
    assert [u["agent"] for u in state.record_paired_gain(algos.GainEstimate(0.3, 0.1, 8), stage=2)] == ["alice"]
    assert [(u["agent"], u["measured"], u["crn_gain"]) for u in state.ledger] == [
        ("bob", False, None), ("alice", True, 0.3)]
    assert state.gain_pairs == [[-0.2, 0.3]]


def test_certificate_stats_by_hand():
    """bounds −0.1 −0.3 0.2 0.05, gains 0.25 −0.4 0.1 0.35:
    calibration: 0.25 ≥ −0.1, −0.4 < −0.3, 0.1 < 0.2, 0.35 ≥ 0.05 -> 2/4;
    Spearman: ranks (2 1 4 3) vs (3 1 2 4), Σd² = 1 + 0 + 4 + 1 = 6 -> 1 − 6·6/(4·15) = 0.4;
    cumulative: bounds −0.1 −0.4 −0.2 −0.15 (ranks 4 1 2 3), gains 0.25 −0.15 −0.05 0.30 (ranks 3 1 2 4),
    Σd² = 2 -> 1 − 6·2/60 = 0.8."""
    state = pairs_state([-0.1, -0.3, 0.2, 0.05], [0.25, -0.4, 0.1, 0.35])
    assert state.gain_pairs == [[-0.1, 0.25], [-0.3, -0.4], [0.2, 0.1], [0.05, 0.35]]
    stats = state.certificate_stats()
    assert stats == {"calibration": 0.5, "pairs": 4.0, "bound_sum": pytest.approx(-0.15),
                     "gain_sum": pytest.approx(0.30), "spearman": pytest.approx(0.4),
                     "spearman_cumulative": pytest.approx(0.8)}


def test_certificate_stats_need_three_pairs_and_a_varying_series_for_a_correlation():
    assert TeamTRState.initial(team()).certificate_stats() == {}
    two = pairs_state([-0.1, 0.3], [0.2, 0.1]).certificate_stats()
    assert two == {"calibration": 0.5, "pairs": 2.0, "bound_sum": pytest.approx(0.2), "gain_sum": pytest.approx(0.3)}
    flat = pairs_state([-0.1, 0.2, 0.05], [0.1, 0.1, 0.1]).certificate_stats()  # constant gains: ρ undefined
    assert flat["calibration"] == pytest.approx(2 / 3) and "spearman" not in flat
    assert flat["spearman_cumulative"] == pytest.approx(1.0)  # the cumulative gains still rise


# ------------------------------------------------------------------------------------------ validate_teamtr_config
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_models")
    return [build_tiny_model(root / name, seed=i, hidden_size=64, vocab_size=300) for i, name in enumerate(NAMES[:2])]


def agents_override(model_dirs):
    return "teamtr.agents=[" + ", ".join(f"{{name: {n}, model: '{d}'}}" for n, d in zip(NAMES, model_dirs)) + "]"


def data_overrides(data_dir):
    """The validation checks that the data files exist: the tiny fixture dataset's."""
    return [f"data.train_files={data_dir / 'train.parquet'}", f"data.val_files={data_dir / 'test.parquet'}"]


@pytest.fixture(scope="module")
def good_config(model_dirs, tiny_data_dir):
    return compose(str(CONFIG_DIR), "teamtr_tiny_cpu", [agents_override(model_dirs), *data_overrides(tiny_data_dir)])


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
    ("teamtr.schedule", "async", "teamtr.schedule='async' is not valid: choose one of teamtr, stale, happo"),
    ("teamtr.schedule", "joint", "teamtr.schedule='joint' is not valid: choose one of teamtr, stale, happo"),
    ("teamtr.certificate.heldout_fraction", 1.0, "teamtr.certificate.heldout_fraction=1.0 must be < 1"),
    ("trainer.resume_mode", "sometimes", "trainer.resume_mode='sometimes' is not valid"),
    ("critic.enable", True, "critic.enable=True is not supported"),
    ("teamtr.prompts_per_update", "half", "teamtr.prompts_per_update='half' is not valid: choose one of all, split"),
    ("data.train_batch_size", 1, "data.train_batch_size=1 is smaller than the number of trained agents (2): "
                                 "teamtr.prompts_per_update=split needs a prompt per update"),
    ("algorithm.use_kl_in_reward", True, "algorithm.use_kl_in_reward=True is not supported"),
])
def test_bad_config_names_the_dotted_key_and_value(good_config, key, value, expected):
    config = copy.deepcopy(good_config)
    if key == "data.train_batch_size":
        OmegaConf.update(config, "teamtr.prompts_per_update", "split")
    OmegaConf.update(config, key, value)
    with pytest.raises(TeamConfigError) as error:
        validate_teamtr_config(config)
    assert expected in str(error.value)


def test_an_agents_token_cap_must_fit_the_padded_response(good_config):
    config = copy.deepcopy(good_config)
    length = config.actor_rollout_ref.rollout.response_length
    OmegaConf.update(config, "teamtr.agents.1.sampling", {"max_new_tokens": length}, force_add=True)
    validate_teamtr_config(config)  # equal is fine
    OmegaConf.update(config, "teamtr.agents.1.sampling.max_new_tokens", length + 1)
    with pytest.raises(TeamConfigError, match=rf"teamtr.agents\[1\].sampling.max_new_tokens={length + 1} exceeds "
                                              rf"actor_rollout_ref.rollout.response_length={length}"):
        validate_teamtr_config(config)


@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ("{{ raise_exception('this template wants a tool list') }}", "this template wants a tool list"),
])
def test_an_agents_chat_template_must_render_before_ray_starts(good_config, template, expected):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "teamtr.agents.1.chat_template", template, force_add=True)
    with pytest.raises(TeamConfigError) as error:
        validate_teamtr_config(config)
    assert str(error.value).startswith(f"teamtr.agents[1].chat_template={template!r} does not render a probe chat "
                                       "with agent 'bob''s tokenizer: ")
    assert expected in str(error.value)
    OmegaConf.update(config, "teamtr.agents.1.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    validate_teamtr_config(config)


def test_verls_data_template_kwargs_are_probed_for_every_agent(good_config):
    """data.apply_chat_template_kwargs apply to every agent's turns: a template given there is rendered for each agent
    before Ray starts; a template that refuses system messages is fine for an agent without a role prompt."""
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "data.apply_chat_template_kwargs", {"chat_template": "{{ messages[0].content }"},
                     force_add=True)
    with pytest.raises(TeamConfigError, match=r"^data.apply_chat_template_kwargs=\{'chat_template': .* does not render "
                                              r"a probe chat with agent 'alice''s tokenizer: TemplateSyntaxError"):
        validate_teamtr_config(config)
    no_system = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                 "{% endif %}{{ m.content }}{% endfor %}")
    OmegaConf.update(config, "data.apply_chat_template_kwargs", {"chat_template": no_system})
    validate_teamtr_config(config)  # alice and bob have no role prompt here
    OmegaConf.update(config, "teamtr.agents.1.role_prompt", "You check.", force_add=True)
    with pytest.raises(TeamConfigError, match="agent 'bob''s tokenizer: TemplateError: no system role"):
        validate_teamtr_config(config)


def test_the_team_must_fit_the_cpu_runtimes_logical_cpus(good_config):
    """teamtr_tiny_cpu fixes ray_init.num_cpus=16 and one TransferQueue storage unit: 4 split devices (2 per agent)
    ask 4 x 3 = 12, + 2 for TransferQueue (controller, storage unit), + 1 spare to place the servers = 15, and fit;
    6 ask 18 + 3 = 21 and would leave verl's placement group or the servers waiting forever."""
    config = copy.deepcopy(good_config)
    assert config.ray_kwargs.ray_init.num_cpus == 16
    assert config.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    for key in ("actor.ppo_micro_batch_size_per_gpu", "rollout.log_prob_micro_batch_size_per_gpu"):
        OmegaConf.update(config, f"actor_rollout_ref.{key}", 1)  # divides every share
    OmegaConf.update(config, "teamtr.agents.0.n_devices", 2, force_add=True)
    OmegaConf.update(config, "teamtr.agents.1.n_devices", 2, force_add=True)
    OmegaConf.update(config, "trainer.n_gpus_per_node", 4)
    validate_teamtr_config(config)
    OmegaConf.update(config, "trainer.n_gpus_per_node", 6)
    OmegaConf.update(config, "teamtr.agents.1.n_devices", 4)
    with pytest.raises(TeamConfigError, match=r"^ray_kwargs.ray_init.num_cpus=16 is too few for this team: verl's "
                                              r"placement group asks trainer.n_gpus_per_node=6 x 3 logical CPUs "
                                              r"\(teamtr.placement='split'\), plus 2 for TransferQueue and 1 to place "
                                              r"the servers and loop workers: set it to at least 21$"):
        validate_teamtr_config(config)
    OmegaConf.update(config, "ray_kwargs.ray_init.num_cpus", 20)
    with pytest.raises(TeamConfigError, match="at least 21"):
        validate_teamtr_config(config)
    OmegaConf.update(config, "ray_kwargs.ray_init.num_cpus", 21)
    validate_teamtr_config(config)
    # TransferQueue's default of 8 storage units holds 9 CPUs before the team is placed
    OmegaConf.update(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units", 8)
    with pytest.raises(TeamConfigError, match="plus 9 for TransferQueue .* at least 28"):
        validate_teamtr_config(config)


def test_resample_every_needs_schedule_teamtr(good_config):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "teamtr.schedule", "stale")
    OmegaConf.update(config, "teamtr.resample_every", 2)
    with pytest.raises(TeamConfigError, match=r"teamtr.resample_every=2 only applies to teamtr.schedule='teamtr' "
                                              r"\(it is 'stale'\)"):
        validate_teamtr_config(config)


def test_bad_config_through_hydra_overrides(model_dirs, tiny_data_dir):
    """The same check on a config composed with the override on the command line, as main_ppo would see it."""
    config = compose(str(CONFIG_DIR), "teamtr_tiny_cpu",
                     [agents_override(model_dirs), *data_overrides(tiny_data_dir), "teamtr.order=sideways"])
    with pytest.raises(TeamConfigError, match="teamtr.order='sideways'"):
        validate_teamtr_config(config)


VALID_DATA = "set {key} to an existing parquet/json file, a glob or a list of them, or a hdfs://, s3:// or gs:// URL"


@pytest.mark.parametrize("key, value, expected", [
    ("data.train_files", "/nonexistent/train.parquet", "data.train_files='/nonexistent/train.parquet' does not exist"),
    ("data.val_files", None, "data.val_files=None is not set"),
    ("data.val_files", [], "data.val_files=[] is not set"),
    ("data.train_files", "", "data.train_files='' is not a path"),
    ("data.val_files", "/nonexistent/*.parquet", "data.val_files='/nonexistent/*.parquet' does not exist"),
    ("data.train_files", "~/data/rlhf/gsm8k/train.parquet",  # verl's own default, and its loader keeps the ~
     "data.train_files='~/data/rlhf/gsm8k/train.parquet' does not exist (verl does not expand ~: write the full path)"),
])
def test_missing_data_files_name_the_key_the_value_and_what_is_valid(good_config, key, value, expected):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, key, value, merge=False)
    with pytest.raises(TeamConfigError) as error:
        validate_teamtr_config(config)
    assert str(error.value) == f"{expected}: {VALID_DATA.format(key=key)}"


def test_a_missing_file_in_a_list_is_named_by_its_index(good_config, tiny_data_dir):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "data.val_files", [str(tiny_data_dir / "test.parquet"), "/nonexistent/aime.parquet"],
                     merge=False)
    with pytest.raises(TeamConfigError, match=r"^data.val_files\[1\]='/nonexistent/aime.parquet' does not exist: "):
        validate_teamtr_config(config)


def test_remote_globbed_and_relative_data_files_pass(good_config, tiny_data_dir, monkeypatch):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "data.train_files", ["hdfs://cluster/data/train.parquet", "s3://bucket/train.parquet",
                                                  str(tiny_data_dir / "train.parquet")], merge=False)
    OmegaConf.update(config, "data.val_files", "gs://bucket/test.parquet")
    validate_teamtr_config(config)  # URLs are not checked: their clients fetch them at load time
    OmegaConf.update(config, "data.train_files", str(tiny_data_dir / "*.parquet"))
    monkeypatch.chdir(tiny_data_dir)
    OmegaConf.update(config, "data.val_files", "test.parquet")  # relative to the working directory, as verl opens it
    validate_teamtr_config(config)
    OmegaConf.update(config, "data.val_files", "file:///nonexistent/test.parquet")  # a local file, not a remote one
    with pytest.raises(TeamConfigError, match="data.val_files='file:///nonexistent/test.parquet' does not exist"):
        validate_teamtr_config(config)


# ------------------------------------------------------------------------------- the stock main_ppo entry point
MAIN_PPO_CASES = {
    "rollout_n_1": ("actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.n=1"),
    "missing_model": ("teamtr.agents.1.model=/nonexistent/teamtr_model",
                      "teamtr.agents[1].model='/nonexistent/teamtr_model' does not exist"),
    "missing_data": ("data.train_files=/nonexistent/train.parquet",
                     "data.train_files='/nonexistent/train.parquet' does not exist"),
}


@pytest.fixture(scope="module")
def main_ppo_runs(model_dirs, tiny_data_dir):
    """The bad runs of ``python -m verl.trainer.main_ppo``, started together (each spends ~8 s importing verl)."""
    # Should a check fail to stop a run, ray.init must fail at once rather than start a cluster: point it at nothing.
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1")
    procs = {}
    for case, (override, _) in MAIN_PPO_CASES.items():
        command = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR),
                   "--config-name", "teamtr_tiny_cpu", agents_override(model_dirs), *data_overrides(tiny_data_dir),
                   override]
        procs[case] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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


def test_replace_needs_a_checkpoint_and_a_checkpoint_must_match_before_ray(good_config, model_dirs, tmp_path):
    """Checked in the driver: teamtr.replace without a checkpoint to resume from; a resume_path folder without a
    state file; a checkpoint written by another team. A checkpoint of the incumbent team passes with the swap."""
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path / "ckpt"))
    OmegaConf.update(config, "trainer.resume_mode", "auto")
    OmegaConf.update(config, "teamtr.replace", {"agent": "bob", "model": str(model_dirs[0]), "method": "direct"},
                     force_add=True)
    with pytest.raises(TeamConfigError, match=r"^teamtr.replace.agent='bob' needs a checkpoint to resume from, but "
                                              r"trainer.resume_mode='auto' finds none"):
        validate_teamtr_config(config)
    folder = tmp_path / "ckpt" / "global_step_2"
    folder.mkdir(parents=True)
    (tmp_path / "ckpt" / "teamtr_latest.txt").write_text("global_step_2")
    incumbent = copy.deepcopy(good_config)
    TeamTRState.initial(validate_teamtr_config(incumbent)).save(folder)
    assert validate_teamtr_config(config).agent("bob").model == str(model_dirs[0])
    other = TeamTRState.initial(validate_teamtr_config(incumbent))
    other.agent_models["alice"] = "/elsewhere"
    other.save(folder)
    with pytest.raises(TeamConfigError, match=f"the checkpoint at {folder} was written by another team"):
        validate_teamtr_config(config)
    OmegaConf.update(config, "trainer.resume_mode", "resume_path")
    OmegaConf.update(config, "trainer.resume_from_path", str(tmp_path / "global_step_7"))
    with pytest.raises(TeamConfigError, match="global_step_7' holds no teamtr_state.json: it is not a committed"):
        validate_teamtr_config(config)


def _with(tokenizer, **changes):
    """A copy of ``tokenizer`` with attributes changed."""
    changed = copy.deepcopy(tokenizer)
    for key, value in changes.items():
        setattr(changed, key, value)
    return changed


def test_an_aligned_swap_is_checked_before_ray(good_config, model_dirs, tmp_path):
    """Only while it is pending (the checkpoint holds the incumbent): the newcomer must render the incumbent's
    contexts alike (its chat template) and end messages (an EOS token), another vocabulary being fine, and the team
    plus the newcomer's stack must fit the devices (split: one more agent's share)."""
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "trainer.default_local_dir", str(tmp_path / "ckpt"))
    OmegaConf.update(config, "trainer.resume_mode", "auto")
    folder = tmp_path / "ckpt" / "global_step_2"
    folder.mkdir(parents=True)
    (tmp_path / "ckpt" / "teamtr_latest.txt").write_text("global_step_2")
    TeamTRState.initial(validate_teamtr_config(copy.deepcopy(good_config))).save(folder)
    same_tokenizer = build_tiny_model(tmp_path / "bob_v2", seed=5, hidden_size=64, vocab_size=300, num_layers=3,
                                      tokenizer_dir=model_dirs[1])
    devices = (r"^teamtr.replace.method=aligned runs the incoming model beside the team until it is aligned: "
               r"teamtr.placement='split' needs 3 devices \(alice: 1, bob: 1, bob-incoming: 1\) but "
               r"trainer.n_gpus_per_node \* trainer.nnodes = 2")
    from transformers import AutoTokenizer

    other_vocabulary = AutoTokenizer.from_pretrained(model_dirs[0])  # alice's: another vocabulary, same template
    assert other_vocabulary.get_vocab() != AutoTokenizer.from_pretrained(model_dirs[1]).get_vocab()
    OmegaConf.update(config, "trainer.val_before_train", True)
    other = tmp_path / "bob_other_vocabulary"
    build_tiny_model(other, seed=6, hidden_size=64, vocab_size=300, num_layers=1, tokenizer_dir=model_dirs[0])
    OmegaConf.update(config, "teamtr.replace", {"agent": "bob", "model": str(other)}, force_add=True)
    # validating before training would run before Stage 0, the incumbent's servers answering bob's turns
    with pytest.raises(TeamConfigError, match=r"^trainer.val_before_train=True cannot be used with teamtr.replace."
                                              r"model='.*', whose tokenizer is not the incumbent's"):
        validate_teamtr_config(config)
    OmegaConf.update(config, "trainer.val_before_train", False)
    # a geometric mixture of two distributions needs one vocabulary
    OmegaConf.update(config, "teamtr.replace", {"agent": "bob", "model": str(other), "target": "mixture"},
                     force_add=True)
    with pytest.raises(TeamConfigError, match=r"^teamtr.replace.target=mixture cannot be used with teamtr.replace."
                                              r"model='.*', whose tokenizer is not the incumbent's"):
        validate_teamtr_config(config)
    OmegaConf.update(config, "teamtr.replace.target", "incumbent")
    for tokenizer, expected in (
            (other_vocabulary, devices),  # Stage 0 re-tokenizes: past the tokenizer checks, to the next one
            (_with(other_vocabulary, chat_template="{{ messages[0]['content'] }}"),
             r"^teamtr.replace.model='.*' has another chat template than the incumbent"),
            (_with(other_vocabulary, eos_token=None), r"^teamtr.replace.model='.*': its tokenizer has no EOS token")):
        newcomer = tmp_path / f"bob_other_{len(list(tmp_path.glob('bob_other_*')))}"
        build_tiny_model(newcomer, seed=6, hidden_size=64, vocab_size=300, num_layers=1, tokenizer_dir=model_dirs[0])
        tokenizer.save_pretrained(str(newcomer))
        OmegaConf.update(config, "teamtr.replace", {"agent": "bob", "model": str(newcomer)}, force_add=True)
        with pytest.raises(TeamConfigError, match=expected):
            validate_teamtr_config(config)
    OmegaConf.update(config, "teamtr.replace.model", str(same_tokenizer))
    OmegaConf.update(config, "trainer.val_before_train", True)  # the same tokenizer: validation sees the same ids
    with pytest.raises(TeamConfigError, match=devices):
        validate_teamtr_config(config)
    OmegaConf.update(config, "trainer.n_gpus_per_node", 3)
    OmegaConf.update(config, "ray_kwargs.ray_init.num_cpus", 64)
    assert validate_teamtr_config(config).agent("bob").model == str(same_tokenizer)
    # Stage 0 runs the actors' modules whole on each rank, for the logits: no fused kernels, no sequence parallelism
    sp = r"ulysses_sequence_parallel_size=2 \(agent 'bob'\) cannot be used with teamtr.replace method=aligned"
    for key, value, expected in (
            ("actor_rollout_ref.model.use_fused_kernels", True, r"^actor_rollout_ref.model.use_fused_kernels=True "
                                                                r"cannot be used with teamtr.replace method=aligned"),
            ("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 2, r"^actor_rollout_ref.actor." + sp),
            ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size", 2,
             r"^actor_rollout_ref.actor.fsdp_config." + sp),
            # the swapped agent's own actor override (teamtr.agents[1] is bob)
            ("teamtr.agents.1.actor", {"fsdp_config": {"ulysses_sequence_parallel_size": 2}},
             r"^actor_rollout_ref.actor.fsdp_config." + sp)):
        bad = copy.deepcopy(config)
        OmegaConf.update(bad, key, value, force_add=True)
        with pytest.raises(TeamConfigError, match=expected):
            validate_teamtr_config(bad)
    # once the swap is done, the checkpoint holds the newcomer: nothing more is checked (two devices are enough)
    done = TeamTRState.initial(validate_teamtr_config(copy.deepcopy(config)))
    done.save(folder)
    OmegaConf.update(config, "trainer.n_gpus_per_node", 2)
    validate_teamtr_config(config)


@pytest.mark.parametrize("path, ok", [("/ckpt/global_step_3", True), ("/ckpt/stage_4_update_1", True),
                                      ("/ckpt/step_3", False), (None, False)])
def test_resume_path_names_a_stage_end_or_an_in_stage_checkpoint(good_config, path, ok):
    config = copy.deepcopy(good_config)
    OmegaConf.update(config, "trainer.resume_mode", "resume_path")
    OmegaConf.update(config, "trainer.resume_from_path", path)
    if ok:  # the name is right; the folder holds no checkpoint
        with pytest.raises(TeamConfigError, match="holds no teamtr_state.json"):
            validate_teamtr_config(config)
    else:
        with pytest.raises(TeamConfigError, match=f"trainer.resume_from_path={path!r} must name a global_step_S or "
                                                  "stage_S_update_U folder"):
            validate_teamtr_config(config)
