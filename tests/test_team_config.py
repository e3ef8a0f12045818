"""The ``teamtr:`` config block (teamtr_verl.config): parsing, defaults, per-agent resolution, and every error.

Each error test asserts that the message names the dotted key and the offending value, as verl's config tests do.
Model directories are fakes under ``tmp_path`` holding only a config.json, which is all validation looks at.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from teamtr_verl.config import (
    AgentSpec,
    CertificateSpec,
    HandoffSpec,
    RouterSpec,
    TeamConfig,
    TeamConfigError,
    validate_placement,
)


@pytest.fixture
def models(tmp_path):
    """Three fake model directories: planner, solver, critic -> path."""
    paths = {}
    for name in ("planner", "solver", "critic"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        paths[name] = str(directory)
    return paths


def _block(models, *names, **top):
    block = {"agents": [{"name": name, "model": models[name]} for name in (names or ("planner", "solver"))]}
    block.update(top)
    return block


def _error(block, **kw):
    with pytest.raises(TeamConfigError) as info:
        TeamConfig.from_config(block, **kw)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ good configs


def test_minimal_block_gets_the_documented_defaults(models):
    team = TeamConfig.from_config(_block(models))
    assert team.agent_names == ("planner", "solver")
    assert team.agents == (
        AgentSpec(name="planner", model=models["planner"]),
        AgentSpec(name="solver", model=models["solver"]),
    )
    assert team.router == RouterSpec(kind="chain", turns=None, seed=0, sequence=None)
    assert team.handoff == HandoffSpec("{name}: {content}", "Conversation so far:", "last")
    assert (team.placement, team.delta, team.beta_init) == ("split", 0.01, 0.1)
    assert team.agent("solver").n_devices == 1 and team.agent("solver").actor == {}


def test_full_block_from_omegaconf(models):
    yaml = f"""
    agents:
      - name: planner
        model: {models['planner']}
        role_prompt: You are the planner.
        delta: 0.05
        actor: {{optim: {{lr: 1.0e-5}}, ppo_micro_batch_size_per_gpu: 2}}
      - name: solver
        model: {models['solver']}
        beta_init: 0.05
        n_devices: 2
    router: {{kind: sequence, sequence: [planner, solver, planner]}}
    handoff: {{message_format: "[{{turn}}] {{name}} said: {{content}}", transcript_header: "", answer: solver}}
    placement: colocate
    delta: 0.02
    beta_init: 0.3
    """
    team = TeamConfig.from_config(OmegaConf.create(yaml))
    planner, solver = team.agents
    assert planner.role_prompt == "You are the planner."
    # actor overrides come back as plain dicts, not DictConfig
    assert type(planner.actor) is dict and type(planner.actor["optim"]) is dict
    assert planner.actor == {"optim": {"lr": 1e-5}, "ppo_micro_batch_size_per_gpu": 2}
    assert team.router.sequence == ("planner", "solver", "planner")
    assert team.handoff == HandoffSpec("[{turn}] {name} said: {content}", "", "solver")
    assert team.placement == "colocate"
    # Per-agent values win; None falls back to the team default.
    assert (team.delta_of("planner"), team.delta_of("solver")) == (0.05, 0.02)
    assert (team.beta_init_of("planner"), team.beta_init_of("solver")) == (0.3, 0.05)
    assert solver.n_devices == 2


def test_agent_lookup_by_unknown_name_lists_the_agents(models):
    team = TeamConfig.from_config(_block(models))
    with pytest.raises(KeyError, match=r"'critic'.*\['planner', 'solver'\]"):
        team.agent("critic")


def test_actor_overrides_are_never_aliased(models):
    shared = {"optim": {"lr": 1e-5}}
    block = _block(models)
    for entry in block["agents"]:
        entry["actor"] = shared  # the same dict object for both agents
    team = TeamConfig.from_config(block)
    planner, solver = team.agents
    assert planner.actor is not solver.actor and planner.actor["optim"] is not solver.actor["optim"]
    planner.actor["optim"]["lr"] = 1.0
    assert solver.actor["optim"]["lr"] == 1e-5 and shared["optim"]["lr"] == 1e-5


def test_config_is_frozen_and_hashable(models):
    team = TeamConfig.from_config(_block(models))
    with pytest.raises(dataclasses.FrozenInstanceError):
        team.delta = 1.0
    hash(team)


def test_check_paths_false_accepts_missing_directories():
    team = TeamConfig.from_config({"agents": [{"name": "a", "model": "/nowhere"}]}, check_paths=False)
    assert team.agent("a").model == "/nowhere"


def test_round_robin_and_random_routers(models):
    team = TeamConfig.from_config(_block(models, router={"kind": "round_robin", "turns": 5}))
    assert team.router == RouterSpec(kind="round_robin", turns=5, seed=0, sequence=None)
    team = TeamConfig.from_config(_block(models, router={"kind": "random", "turns": 1, "seed": 7}))
    assert team.router == RouterSpec(kind="random", turns=1, seed=7, sequence=None)


def test_importing_config_pulls_in_nothing_heavy():
    code = (
        "import sys, teamtr_verl.config, teamtr_verl.team_logic;"
        "heavy = [m for m in ('torch', 'ray', 'vllm', 'verl', 'transformers') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------ errors: block and agents


def test_missing_block():
    assert "teamtr is missing" in _error(None)


def test_block_not_a_mapping():
    assert "teamtr=[1, 2] must be a mapping" in _error([1, 2])


def test_unknown_top_level_key(models):
    message = _error(_block(models, detla=0.1))
    assert message.startswith("teamtr.detla is not a known key: known keys are agents, router, handoff, placement")


def test_unknown_agent_key_catches_typos(models):
    block = {"agents": [{"name": "planner", "modle": models["planner"]}]}
    message = _error(block)
    assert message.startswith("teamtr.agents[0].modle is not a known key: known keys are name, model, role_prompt")


@pytest.mark.parametrize("agents", [[], None])
def test_empty_agent_list(agents):
    assert f"teamtr.agents={agents!r} is empty" in _error({"agents": agents})


def test_agents_not_a_list(models):
    assert "teamtr.agents={'name': 'a'} must be a list of agents" in _error({"agents": {"name": "a"}})


def test_agent_entry_not_a_mapping():
    assert "teamtr.agents[0]='planner' must be a mapping" in _error({"agents": ["planner"]})


def test_duplicate_agent_name(models):
    block = {
        "agents": [{"name": "planner", "model": models["planner"]}, {"name": "planner", "model": models["solver"]}]
    }
    assert _error(block) == (
        "teamtr.agents[1].name='planner' is a duplicate: agent names must be unique (got ['planner', 'planner'])"
    )


def test_missing_agent_name(models):
    assert "teamtr.agents[0].name is missing" in _error({"agents": [{"model": models["planner"]}]})


@pytest.mark.parametrize("name", ["", "2nd", "plan ner", "a/b", "_x", 7])
def test_invalid_agent_name(models, name):
    message = _error({"agents": [{"name": name, "model": models["planner"]}]})
    assert message.startswith(f"teamtr.agents[0].name={name!r} is not a valid agent name")
    assert "^[A-Za-z][A-Za-z0-9_-]*$" in message


@pytest.mark.parametrize("name", ["stage", "last"])
def test_reserved_agent_name(models, name):
    message = _error({"agents": [{"name": name, "model": models["planner"]}]})
    assert message.startswith(f"teamtr.agents[0].name={name!r} is reserved")


def test_missing_model():
    assert "teamtr.agents[0].model is missing" in _error({"agents": [{"name": "a"}]})


def test_model_does_not_exist(tmp_path):
    missing = str(tmp_path / "nope")
    message = _error({"agents": [{"name": "a", "model": missing}]})
    assert message.startswith(f"teamtr.agents[0].model={missing!r} does not exist")


def test_model_is_a_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_text("")
    message = _error({"agents": [{"name": "a", "model": str(path)}]})
    assert f"teamtr.agents[0].model={str(path)!r} is not a directory" in message


def test_model_without_config_json(tmp_path):
    message = _error({"agents": [{"name": "a", "model": str(tmp_path)}]})
    assert message.startswith(f"teamtr.agents[0].model={str(tmp_path)!r} holds no config.json")


def test_model_not_a_string():
    message = _error({"agents": [{"name": "a", "model": 3}]}, check_paths=False)
    assert "teamtr.agents[0].model=3 must be a string" in message


def test_role_prompt_not_a_string(models):
    block = {"agents": [{"name": "a", "model": models["planner"], "role_prompt": ["x"]}]}
    assert "teamtr.agents[0].role_prompt=['x'] must be a string" in _error(block)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("delta", 0.0, "teamtr.agents[0].delta=0.0 must be > 0"),
        ("delta", float("nan"), "teamtr.agents[0].delta=nan must be a finite number > 0"),
        ("delta", True, "teamtr.agents[0].delta=True must be a finite number > 0"),
        ("beta_init", -1, "teamtr.agents[0].beta_init=-1 must be > 0"),
        ("n_devices", 0, "teamtr.agents[0].n_devices=0 must be >= 1"),
        ("n_devices", 1.5, "teamtr.agents[0].n_devices=1.5 must be an integer >= 1"),
        ("actor", [1], "teamtr.agents[0].actor=[1] must be a mapping"),
    ],
)
def test_bad_agent_numbers_and_actor(models, key, value, expected):
    assert expected in _error({"agents": [{"name": "a", "model": models["planner"], key: value}]})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("delta", -0.1, "teamtr.delta=-0.1 must be > 0"),
        ("delta", "1e-2", "teamtr.delta='1e-2' must be a finite number > 0"),
        ("beta_init", -0.5, "teamtr.beta_init=-0.5 must be > 0"),
        ("placement", "spread", "teamtr.placement='spread' is not valid: choose one of split, colocate"),
    ],
)
def test_bad_team_values(models, key, value, expected):
    assert expected in _error(_block(models, **{key: value}))


def test_prefix_is_used_in_every_key(models):
    assert "cfg.teamtr.delta=-0.1 must be > 0" in _error(_block(models, delta=-0.1), prefix="cfg.teamtr")


def test_missing_mandatory_omegaconf_value():
    # As in teamtr_trainer.yaml (`agents: ???`) when the launch command forgets the agents override.
    config = OmegaConf.create({"teamtr": {"agents": "???"}})
    assert _error(config.teamtr).startswith("teamtr.agents is ??? (mandatory)")
    block = OmegaConf.create({"agents": [{"name": "a", "model": "???"}]})
    assert _error(block).startswith("teamtr.agents[0].model is ??? (mandatory)")


# ------------------------------------------------------------------------------------------------ errors: router


def test_unknown_router_kind(models):
    assert _error(_block(models, router={"kind": "star"})) == (
        "teamtr.router.kind='star' is not valid: choose one of chain, round_robin, random, sequence"
    )


def test_unknown_router_key(models):
    assert "teamtr.router.turn is not a known key: known keys are kind, turns, seed, sequence" in _error(
        _block(models, router={"turn": 3})
    )


@pytest.mark.parametrize("kind", ["round_robin", "random"])
def test_turns_required(models, kind):
    message = _error(_block(models, router={"kind": kind}))
    assert f"teamtr.router.turns is missing: teamtr.router.kind={kind!r} needs" in message


def test_turns_at_least_one(models):
    assert "teamtr.router.turns=0 must be >= 1" in _error(_block(models, router={"kind": "random", "turns": 0}))


def test_chain_turns_must_be_null(models):
    message = _error(_block(models, router={"kind": "chain", "turns": 3}))
    assert message.startswith("teamtr.router.turns=3 must be null with teamtr.router.kind='chain'")


def test_round_robin_too_few_turns_leaves_an_agent_silent(models):
    message = _error(_block(models, "planner", "solver", "critic", router={"kind": "round_robin", "turns": 2}))
    assert message == (
        "teamtr.router.turns=2 gives no turn to 'critic': round_robin needs turns >= 3 (the number of agents)"
    )


def test_sequence_names_unknown_agent(models):
    message = _error(_block(models, router={"kind": "sequence", "sequence": ["planner", "solver", "critic"]}))
    assert message == "teamtr.router.sequence[2]='critic' names no agent: agents are ['planner', 'solver']"


def test_sequence_missing_or_empty(models):
    assert "teamtr.router.sequence=None must be a list" in _error(_block(models, router={"kind": "sequence"}))
    assert "teamtr.router.sequence=[] is empty" in _error(_block(models, router={"kind": "sequence", "sequence": []}))


def test_sequence_that_skips_an_agent(models):
    message = _error(_block(models, router={"kind": "sequence", "sequence": ["planner", "planner"]}))
    assert message.startswith("teamtr.router.sequence=['planner', 'planner'] never schedules 'solver'")


def test_sequence_given_to_another_kind(models):
    message = _error(_block(models, router={"kind": "chain", "sequence": ["planner"]}))
    assert message.startswith("teamtr.router.sequence=['planner'] must be null unless teamtr.router.kind='sequence'")


def test_seed_must_be_an_integer(models):
    message = _error(_block(models, router={"kind": "random", "turns": 2, "seed": "x"}))
    assert "teamtr.router.seed='x' must be an integer" in message


# ------------------------------------------------------------------------------------------------ errors: handoff


def test_answer_names_no_agent(models):
    assert _error(_block(models, handoff={"answer": "x"})) == (
        "teamtr.handoff.answer='x' names no agent: use 'last' or one of ['planner', 'solver']"
    )


def test_answer_agent_with_scheduling_routers(models):
    # chain, round_robin and sequence routers are checked to give every agent a turn, so any agent may be the answer.
    routers = [
        {"kind": "chain"},
        {"kind": "round_robin", "turns": 2},
        {"kind": "sequence", "sequence": ["solver", "planner"]},
    ]
    for router in routers:
        team = TeamConfig.from_config(_block(models, router=router, handoff={"answer": "planner"}))
        assert team.handoff.answer == "planner"


def test_answer_agent_with_random_router(models):
    message = _error(_block(models, router={"kind": "random", "turns": 3}, handoff={"answer": "solver"}))
    assert message.startswith("teamtr.handoff.answer='solver' cannot be used with a random router")


@pytest.mark.parametrize(
    "message_format, expected",
    [
        (
            "{speaker}: {content}",
            "uses the unknown placeholder {speaker}: valid placeholders are {name}, {content}, {turn}",
        ),
        ("{}: {content}", "uses the unknown placeholder {}"),
        ("{name}", "never shows {content}"),
        ("{name: {content}", "is not a valid format string"),
        ("{name}: {content} }", "is not a valid format string"),
        ("{turn:q} {content}", "cannot be formatted"),
    ],
)
def test_bad_message_format(models, message_format, expected):
    message = _error(_block(models, handoff={"message_format": message_format}))
    assert message.startswith(f"teamtr.handoff.message_format={message_format!r}")
    assert expected in message


def test_message_format_with_literal_braces_is_fine(models):
    team = TeamConfig.from_config(_block(models, handoff={"message_format": "{{{name}}} {content}"}))
    assert team.handoff.message_format.format(name="a", content="b", turn=0) == "{a} b"


def test_unknown_handoff_key(models):
    assert "teamtr.handoff.header is not a known key" in _error(_block(models, handoff={"header": "x"}))


# ------------------------------------------------------------------------------------------------ placement


def test_split_placement_must_fit(models):
    block = _block(models)
    block["agents"][1]["n_devices"] = 2
    team = TeamConfig.from_config(block)
    with pytest.raises(TeamConfigError) as info:
        validate_placement(team, 2)
    assert str(info.value) == (
        "teamtr.placement='split' needs 3 devices (planner: 1, solver: 2) "
        "but trainer.n_gpus_per_node * trainer.nnodes = 2"
    )
    validate_placement(team, 3)  # exactly enough
    with pytest.raises(TeamConfigError, match=r"^teamtr.placement='split' uses 3 devices \(planner: 1, solver: 2\) "
                                              r"but trainer.n_gpus_per_node \* trainer.nnodes = 4: verl's split gives "
                                              r"every device to an agent"):
        validate_placement(team, 4)  # verl's split_resource_pool asserts the slices add up to the world size


def test_colocate_ignores_n_devices(models):
    block = _block(models, placement="colocate")
    block["agents"][1]["n_devices"] = 8
    validate_placement(TeamConfig.from_config(block), 1)


# ------------------------------------------------------------------------------------ the stage loop and certificate


def test_stage_loop_and_certificate_defaults(models):
    team = TeamConfig.from_config(_block(models))
    assert (team.schedule, team.resample_every, team.order, team.order_seed) == ("teamtr", None, "fixed", 0)
    assert (team.enforce, team.max_backtracks, team.step_safety) == (True, 5, 0.9)
    assert (team.kl_estimator, team.kl_reduction, team.ratio_level) == ("k3", "message_sum", "token")
    assert (team.a_clip, team.norm_eps, team.on_nonfinite) == (5.0, 1e-6, "error")
    assert team.certificate == CertificateSpec()
    assert team.certificate == CertificateSpec(bound="is_lcb", heldout_fraction=0.25, confidence_t=1.645,
                                               return_range=None, crn=True, closing_regeneration=True)


def test_stage_loop_and_certificate_from_omegaconf(models):
    yaml = f"""
    agents: [{{name: planner, model: {models['planner']}}}, {{name: solver, model: {models['solver']}}}]
    schedule: happo
    step_safety: 0.5
    max_backtracks: 0
    kl_estimator: k1
    kl_reduction: token_mean
    ratio_level: message
    on_nonfinite: skip
    certificate: {{bound: theorem, heldout_fraction: 0, confidence_t: 0, return_range: 2, crn: false,
                   closing_regeneration: false}}
    """
    team = TeamConfig.from_config(OmegaConf.create(yaml))
    assert (team.schedule, team.step_safety, team.max_backtracks) == ("happo", 0.5, 0)
    assert (team.kl_estimator, team.kl_reduction, team.ratio_level, team.on_nonfinite) == (
        "k1", "token_mean", "message", "skip")
    assert team.certificate == CertificateSpec(bound="theorem", heldout_fraction=0.0, confidence_t=0.0,
                                               return_range=2.0, crn=False, closing_regeneration=False)
    assert TeamConfig.from_config(_block(models, certificate=None)).certificate == CertificateSpec()
    assert TeamConfig.from_config(_block(models, step_safety=1)).step_safety == 1.0  # (0, 1]: 1 is allowed


@pytest.mark.parametrize(
    "top, expected",
    [
        ({"schedule": "joint"}, "teamtr.schedule='joint' is not valid: choose one of teamtr, stale, happo"),
        ({"schedule": "async"}, "teamtr.schedule='async' is not valid: choose one of teamtr, stale, happo"),
        ({"schedule": "stale", "resample_every": 2},
         "teamtr.resample_every=2 only applies to teamtr.schedule='teamtr' (it is 'stale'); set it to null"),
        ({"resample_every": 0}, "teamtr.resample_every=0 must be >= 1"),
        ({"schedule": "stale", "prompts_per_update": "split"},
         "teamtr.prompts_per_update='split' needs teamtr.schedule='teamtr' with a regeneration before every update "
         "(schedule is 'stale', resample_every None): each update regenerates its own part"),
        ({"resample_every": 2, "prompts_per_update": "split"},
         "teamtr.prompts_per_update='split' needs teamtr.schedule='teamtr' with a regeneration before every update "
         "(schedule is 'teamtr', resample_every 2): each update regenerates its own part"),
        ({"order": "sideways"}, "teamtr.order='sideways' is not valid: choose one of fixed, reversed, random"),
        ({"enforce": "yes"}, "teamtr.enforce='yes' must be true or false"),
        ({"max_backtracks": -1}, "teamtr.max_backtracks=-1 must be >= 0"),
        ({"step_safety": 0}, "teamtr.step_safety=0 must be > 0"),
        ({"step_safety": 1.5}, "teamtr.step_safety=1.5 must be in (0, 1]: the first try aims at step_safety²·δ"),
        ({"step_safety": "0.9"}, "teamtr.step_safety='0.9' must be a finite number > 0"),
        ({"kl_estimator": "k2"}, "teamtr.kl_estimator='k2' is not valid: choose one of k1, k3"),
        ({"kl_reduction": "none"}, "teamtr.kl_reduction='none' is not valid: choose one of message_sum, token_mean"),
        ({"kl_reduction": "sum"}, "teamtr.kl_reduction='sum' is not valid: choose one of message_sum, token_mean"),
        ({"ratio_level": "sequence"}, "teamtr.ratio_level='sequence' is not valid: choose one of token, message"),
        ({"on_nonfinite": "ignore"}, "teamtr.on_nonfinite='ignore' is not valid: choose one of error, skip"),
        ({"certificate": [1]}, "teamtr.certificate=[1] must be a mapping"),
        ({"certificate": {"bound": "ucb"}},
         "teamtr.certificate.bound='ucb' is not valid: choose one of is_lcb, theorem"),
        ({"certificate": {"heldout_fraction": 1.0}},
         "teamtr.certificate.heldout_fraction=1.0 must be < 1: some prompt groups must be trained on"),
        ({"certificate": {"heldout_fraction": -0.1}}, "teamtr.certificate.heldout_fraction=-0.1 must be >= 0"),
        ({"certificate": {"heldout_fraction": "0.25"}},
         "teamtr.certificate.heldout_fraction='0.25' must be a finite number >= 0"),
        ({"certificate": {"confidence_t": -1}}, "teamtr.certificate.confidence_t=-1 must be >= 0"),
        ({"certificate": {"return_range": 0}}, "teamtr.certificate.return_range=0 must be > 0"),
        ({"certificate": {"crn": "yes"}}, "teamtr.certificate.crn='yes' must be true or false"),
        ({"certificate": {"closing_regeneration": 1}},
         "teamtr.certificate.closing_regeneration=1 must be true or false"),
        ({"certificate": {"form": "theorem"}},
         "teamtr.certificate.form is not a known key: known keys are bound, heldout_fraction, confidence_t, "
         "return_range, crn, closing_regeneration"),
    ],
)
def test_bad_stage_loop_and_certificate_values(models, top, expected):
    message = _error(_block(models, **top))
    assert message == expected
    assert "\n" not in message


@pytest.mark.parametrize("key", ["backtrack_factor", "certificate_form", "gamma"])  # removed with the line search
def test_removed_stage_loop_keys_are_unknown(models, key):
    message = _error(_block(models, **{key: 0.5}))
    assert message.startswith(f"teamtr.{key} is not a known key: known keys are agents, router, handoff, placement")
    assert "step_safety" in message and "certificate" in message and "kl_reduction" in message
    assert "\n" not in message


def test_per_agent_sampling_is_parsed_with_nones_for_the_teams_values(models):
    from teamtr_verl.config import SamplingSpec, ValSamplingSpec

    block = {"agents": [{"name": "a", "model": models["planner"],
                         "sampling": {"temperature": 0.7, "stop": ["\n"], "max_new_tokens": 4,
                                      "val_kwargs": {"temperature": 0}}},
                        {"name": "b", "model": models["planner"]}]}
    team = TeamConfig.from_config(block)
    assert team.agent("a").sampling == SamplingSpec(temperature=0.7, top_p=None, top_k=None, max_new_tokens=4,
                                                    stop=("\n",), val_kwargs=ValSamplingSpec(temperature=0.0))
    assert team.agent("b").sampling == SamplingSpec()


@pytest.mark.parametrize(
    "sampling, expected",
    [
        ({"temperature": 0}, "teamtr.agents[0].sampling.temperature=0 must be > 0"),
        ({"top_p": 1.5}, "teamtr.agents[0].sampling.top_p=1.5 must be in (0, 1]"),
        ({"top_p": 0}, "teamtr.agents[0].sampling.top_p=0 must be > 0"),
        ({"top_k": 0}, "teamtr.agents[0].sampling.top_k=0 must be -1 (no top-k) or >= 1"),
        ({"max_new_tokens": 0}, "teamtr.agents[0].sampling.max_new_tokens=0 must be >= 1"),
        ({"stop": "END"}, "teamtr.agents[0].sampling.stop='END' must be a list of non-empty strings"),
        ({"stop": ["END", ""]}, "teamtr.agents[0].sampling.stop=['END', ''] must be a list of non-empty strings"),
        ({"temprature": 0.5}, "teamtr.agents[0].sampling.temprature is not a known key"),
        ({"val_kwargs": {"temperature": -1}}, "teamtr.agents[0].sampling.val_kwargs.temperature=-1 must be >= 0"),
        ({"val_kwargs": {"n": 2}}, "teamtr.agents[0].sampling.val_kwargs.n is not a known key"),
        ([0.5], "teamtr.agents[0].sampling=[0.5] must be a mapping"),
    ],
)
def test_bad_per_agent_sampling(models, sampling, expected):
    assert expected in _error({"agents": [{"name": "a", "model": models["planner"], "sampling": sampling}]})


def test_a_frozen_agent_is_listed_apart_and_may_sample_greedily(models):
    block = {"agents": [{"name": "judge", "model": models["planner"], "train": False,
                         "sampling": {"temperature": 0}},
                        {"name": "solver", "model": models["solver"]}]}
    team = TeamConfig.from_config(block)
    assert team.agent_names == ("judge", "solver") and team.trained_names == ("solver",)
    assert team.agent("judge").sampling.temperature == 0.0 and team.agent("solver").train


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"delta": 0.1}, "teamtr.agents[0].delta=0.1 does nothing for a frozen agent (teamtr.agents[0].train=false)"),
        ({"beta_init": 0.5}, "teamtr.agents[0].beta_init=0.5 does nothing for a frozen agent"),
        ({"actor": {"optim": {"lr": 1e-3}}}, "teamtr.agents[0].actor={'optim': {'lr': 0.001}} does nothing for a frozen"),
        ({"train": "no"}, "teamtr.agents[0].train='no' must be true or false"),
    ],
)
def test_bad_frozen_agents(models, extra, expected):
    block = {"agents": [{"name": "a", "model": models["planner"], "train": False, **extra},
                        {"name": "b", "model": models["solver"]}]}
    assert expected in _error(block)


def test_a_team_needs_a_trained_agent(models):
    block = {"agents": [{"name": "a", "model": models["planner"], "train": False}]}
    assert _error(block) == "teamtr.agents: every agent has train: false; at least one agent must be trained"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"chat_template": ["{{ x }}"]}, "teamtr.agents[0].chat_template=['{{ x }}'] must be a string"),
        ({"chat_template_kwargs": "enable_thinking=False"},
         "teamtr.agents[0].chat_template_kwargs='enable_thinking=False' must be a mapping"),
    ],
)
def test_bad_chat_template_keys(models, extra, expected):
    assert expected in _error({"agents": [{"name": "a", "model": models["planner"], **extra}]})


# ------------------------------------------------------------------------------------------- teamtr.replace
def test_replace_shows_the_team_after_the_swap_and_keeps_the_incumbent(models):
    """The replaced agent's spec carries the new model and the replacement's template keywords; its role prompt,
    δ and sampling (the team's protocol) stay; the other agents are untouched; the incumbent is remembered."""
    block = _block(models)
    block["agents"][1].update(role_prompt="You solve.", delta=0.05, sampling={"temperature": 0.7})
    block["replace"] = {"agent": "solver", "model": models["critic"], "method": "direct",
                        "chat_template_kwargs": {"enable_thinking": False}}
    team = TeamConfig.from_config(block)
    solver = team.agent("solver")
    assert (solver.model, solver.role_prompt, solver.delta, solver.sampling.temperature) == (
        models["critic"], "You solve.", 0.05, 0.7)
    assert solver.chat_template_kwargs == {"enable_thinking": False} and solver.chat_template is None
    assert team.agent("planner") == AgentSpec(name="planner", model=models["planner"])
    assert (team.replace.agent, team.replace.model, team.replace.incumbent, team.replace.method) == (
        "solver", models["critic"], models["solver"], "direct")
    assert team.replace.incumbent_agent == TeamConfig.from_config(_block(models) | {
        "agents": block["agents"]}).agent("solver")  # the agent as configured, before the swap


@pytest.mark.parametrize("replace, expected", [
    ({"agent": "critic", "model": "NEW"}, "teamtr.replace.agent='critic' is not an agent of the team: choose one of "
                                          "planner, solver"),
    ({"agent": "solver"}, "teamtr.replace.model is missing"),
    ({"agent": "solver", "model": "SOLVER"}, "is already the model of agent 'solver' (teamtr.agents[1].model)"),
    ({"agent": "solver", "model": "NEW", "method": "distil"}, "teamtr.replace.method='distil' is not valid: "
                                                               "choose one of aligned, direct"),
    ({"agent": "solver", "model": "NEW", "incumbent": "x"}, "teamtr.replace.incumbent is not a known key: known "
                                                              "keys are agent, model, method, delta0, max_epochs, "
                                                              "heldout_fraction, topk, mini_batch, lr, target, "
                                                              "chat_template, chat_template_kwargs"),
    ({"agent": "solver", "model": "NEW", "target": "teacher"}, "teamtr.replace.target='teacher' is not valid: choose "
                                                                "one of incumbent, mixture"),
    ({"agent": "solver", "model": "NEW", "method": "direct", "target": "mixture"},
     "teamtr.replace.target='mixture' does nothing with method=direct"),
    ({"agent": "solver", "model": "NEW", "method": "direct", "chat_template_kwargs": 3},
     "teamtr.replace.chat_template_kwargs=3 must be a mapping"),
    ({"agent": "solver", "model": "NEW", "chat_template_kwargs": {"enable_thinking": False}},
     "teamtr.replace.chat_template_kwargs={'enable_thinking': False} cannot be used with method=aligned"),
    ({"agent": "solver", "model": "NEW", "delta0": 0}, "teamtr.replace.delta0=0 must be > 0"),
    ({"agent": "solver", "model": "NEW", "max_epochs": -1}, "teamtr.replace.max_epochs=-1 must be >= 0"),
    ({"agent": "solver", "model": "NEW", "topk": 0}, "teamtr.replace.topk=0 must be >= 1"),
    ({"agent": "solver", "model": "NEW", "lr": -1e-4}, "teamtr.replace.lr=-0.0001 must be > 0"),
    ({"agent": "solver", "model": "NEW", "mini_batch": 2.5}, "teamtr.replace.mini_batch=2.5 must be an integer >= 1"),
    ({"agent": "solver", "model": "NEW", "method": "direct", "topk": 8}, "teamtr.replace.topk=8 does nothing with "
                                                                         "method=direct"),
    ({"agent": "solver", "model": "NEW", "heldout_fraction": 1.0}, "teamtr.replace.heldout_fraction=1.0 must be a "
                                                                    "number in (0, 1)"),
    ("solver", "teamtr.replace='solver' must be a mapping"),
])
def test_bad_replace(models, replace, expected):
    if isinstance(replace, dict):
        replace = {k: {"NEW": models["critic"], "SOLVER": models["solver"]}.get(v, v) if isinstance(v, str) else v
                   for k, v in replace.items()}
    assert expected in _error(_block(models, replace=replace))


def test_aligned_replace_defaults_and_what_it_refuses(models):
    """method=aligned is the default; δ₀ falls back to the replaced agent's δ; a frozen agent, or an agent whose
    incoming stack name is already an agent's, cannot be swapped with it."""
    team = TeamConfig.from_config(_block(models, delta=0.02, replace={"agent": "solver", "model": models["critic"]}))
    assert (team.replace.method, team.replace.delta0, team.replace.max_epochs, team.replace.heldout_fraction) == (
        "aligned", None, 20, 0.25)
    assert (team.replace.topk, team.replace.mini_batch, team.replace.lr, team.replace.target) == (
        64, 8, None, "incumbent")
    assert team.stage0_delta() == 0.02
    given = TeamConfig.from_config(_block(models, replace={"agent": "solver", "model": models["critic"], "topk": 5,
                                                           "mini_batch": 3, "lr": 1e-4, "target": "mixture"})).replace
    assert (given.topk, given.mini_batch, given.lr, given.target) == (5, 3, 1e-4, "mixture")
    block = _block(models, replace={"agent": "solver", "model": models["critic"], "delta0": 0.5})
    block["agents"][1]["delta"] = 0.03
    assert TeamConfig.from_config(block).stage0_delta() == 0.5
    frozen = _block(models, replace={"agent": "solver", "model": models["critic"]})
    frozen["agents"][1]["train"] = False
    assert "teamtr.replace.method='aligned' needs a trained agent, but 'solver' is frozen" in _error(frozen)
    frozen["replace"]["method"] = "direct"
    assert TeamConfig.from_config(frozen).agent("solver").model == models["critic"]
    clash = {"agents": [{"name": "solver", "model": models["solver"]},
                        {"name": "solver-incoming", "model": models["planner"]}],
             "replace": {"agent": "solver", "model": models["critic"]}}
    assert "while the team has an agent named 'solver-incoming'" in _error(clash)


def test_replace_model_must_exist(models, tmp_path):
    missing = str(tmp_path / "nowhere")
    message = _error(_block(models, replace={"agent": "solver", "model": missing}))
    assert message.startswith(f"teamtr.replace.model={missing!r}")


# ------------------------------------------------------------------------------------------------ shared base


def _shared(models, lora=None, **agent_keys):
    agents = [{"name": "planner", **agent_keys}, {"name": "solver"}]
    return {"agents": agents, "shared_base": {"model": models["planner"], **({"lora": lora} if lora else {})}}


def test_a_shared_base_team_gives_every_agent_the_base_model(models):
    team = TeamConfig.from_config(_shared(models, lora={"rank": 16, "alpha": 32, "target_modules": ["q_proj"]},
                                          model=models["planner"]))
    assert [agent.model for agent in team.agents] == [models["planner"]] * 2
    shared = team.shared_base
    assert (shared.model, shared.lora_rank, shared.lora_alpha, shared.target_modules) == (
        models["planner"], 16, 32, ("q_proj",))
    assert TeamConfig.from_config(_shared(models)).shared_base.target_modules == "all-linear"


@pytest.mark.parametrize("lora, agent_keys, key, value", [
    ({"rank": 12}, {}, "teamtr.shared_base.lora.rank", "12"),  # vLLM serves 1, 8, 16, 32, ...
    ({"dropout": 0.1}, {}, "teamtr.shared_base.lora.dropout", "known keys are rank, alpha, target_modules"),
    ({"target_modules": []}, {}, "teamtr.shared_base.lora.target_modules", "[]"),
    (None, {"train": False}, "teamtr.agents[0].train", "False"),
    (None, {"n_devices": 2}, "teamtr.agents[0].n_devices", "2"),
    (None, {"actor": {"optim": {"betas": [0.9, 0.99]}}}, "teamtr.agents[0].actor.optim.betas", "[0.9, 0.99]"),
    (None, {"actor": {"fsdp_config": {}}}, "teamtr.agents[0].actor.fsdp_config", "{}"),
    # the engine's micro-batch is the team's: an agent's own would be checked but never used
    (None, {"actor": {"ppo_micro_batch_size_per_gpu": 2}}, "teamtr.agents[0].actor.ppo_micro_batch_size_per_gpu",
     "=2 is the team's one engine's"),
    (None, {"actor": "fast"}, "teamtr.agents[0].actor", "'fast'"),
    (None, {"actor": {"optim": 5}}, "teamtr.agents[0].actor.optim", "=5"),
])
def test_shared_base_errors_name_the_key_and_value(models, lora, agent_keys, key, value):
    message = _error(_shared(models, lora=lora, **agent_keys))
    assert message.startswith(key) and value in message


def test_a_shared_base_agent_naming_another_model_or_a_swap_is_refused(models):
    message = _error(_shared(models, model=models["solver"]))
    assert message.startswith("teamtr.agents[0].model") and models["solver"] in message and "shared_base" in message
    block = {**_shared(models), "replace": {"agent": "solver", "model": models["critic"], "incumbent": models["planner"]}}
    assert _error(block).startswith("teamtr.replace")
    assert _error({"agents": [{"name": "a"}], "shared_base": {}}).startswith("teamtr.shared_base.model is missing")


def _adapter(tmp_path, name, base, r=8, weights=True, **extra):
    directory = tmp_path / name
    directory.mkdir()
    config = {"base_model_name_or_path": base, "r": r, "lora_alpha": 16, **extra}  # the team's default alpha: 16
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if weights:
        (directory / "adapter_model.safetensors").write_bytes(b"")
    return str(directory)


def test_an_agents_adapter_must_be_of_the_shared_base_at_the_teams_rank(models, tmp_path):
    good = _adapter(tmp_path, "good", models["planner"])
    team = TeamConfig.from_config(_shared(models, adapter_path=good))
    assert team.agent("planner").adapter_path == good and team.agent("solver").adapter_path is None
    for adapter, why in [(_adapter(tmp_path, "other", models["solver"]), "is an adapter of base"),
                         (_adapter(tmp_path, "rank4", models["planner"], r=4), "has r 4"),
                         (_adapter(tmp_path, "alpha32", models["planner"], lora_alpha=32), "has lora_alpha 32"),
                         (_adapter(tmp_path, "dora", models["planner"], use_dora=True), "is a dora adapter"),
                         (_adapter(tmp_path, "empty", models["planner"], weights=False), "no adapter_model"),
                         (str(tmp_path), "holds no adapter_config.json")]:
        message = _error(_shared(models, adapter_path=adapter))
        assert message.startswith(f"teamtr.agents[0].adapter_path={adapter!r}") and why in message, message
    block = _block(models)
    block["agents"][0]["adapter_path"] = good
    assert _error(block).startswith("teamtr.agents[0].adapter_path") and "needs teamtr.shared_base" in _error(block)
