"""Validation of a ``trainer.v1.trainer_mode=teamtr`` run (its config and data files), in the driver, before Ray starts.

verl's ``main_ppo`` calls ``verl.utils.config.validate_config`` before ``run_ppo`` starts Ray; the plugin wraps that
function (see :func:`teamtr_verl.patches.install_config_validation_hook`) so that a bad TeamTR config stops
there, with one line naming the dotted key, the value and what is valid.
"""

from __future__ import annotations

import glob
import os
import re

from omegaconf import DictConfig, ListConfig

from teamtr_verl import checkpoints
from teamtr_verl.config import TeamConfig, TeamConfigError, validate_placement
from teamtr_verl.defaults import AGENT_LOOP_MANAGER, RESUME_MODES, TRAINER_MODE
from teamtr_verl.defaults import AGENT_LOOP_NAME as AGENT_LOOP
from teamtr_verl.team_logic import same_vocabulary
from teamtr_verl.topology import agent_trainer_config, configured_max_loras, stacks_team

DATA_FILE_KEYS = ("data.train_files", "data.val_files")
# A URL (hdfs://, s3://, gs://, ...) is fetched by verl's or fsspec's own clients at load time: not checked here.
_REMOTE = re.compile(r"^(?!file://)[A-Za-z][A-Za-z0-9+.-]*://")


def is_teamtr_run(config: DictConfig) -> bool:
    return config.trainer.get("v1", {}).get("trainer_mode") == TRAINER_MODE


def _require(key: str, value, expected, why: str) -> None:
    if value != expected:
        raise TeamConfigError(f"{key}={value!r} {why}: set {key}={expected}")


def validate_teamtr_config(config: DictConfig) -> TeamConfig:
    """Check everything a TeamTR run needs; return the validated team. Raises :class:`TeamConfigError`."""
    _require("algorithm.adv_estimator", config.algorithm.adv_estimator, "teamtr",
             "does not match trainer.v1.trainer_mode=teamtr (the stage loop computes Eq. 9 itself)")
    actor = config.actor_rollout_ref.actor
    _require("actor_rollout_ref.actor.policy_loss.loss_mode", actor.policy_loss.get("loss_mode"), "teamtr",
             "does not match trainer.v1.trainer_mode=teamtr (β and δ act through the teamtr loss)")
    rollout = config.actor_rollout_ref.rollout
    _require("actor_rollout_ref.rollout.name", rollout.name, "vllm", "is not supported: each agent needs vLLM servers")
    _require("actor_rollout_ref.rollout.agent.default_agent_loop", rollout.agent.default_agent_loop, AGENT_LOOP,
             "is not the team's agent loop")
    _require("actor_rollout_ref.rollout.agent.agent_loop_manager_class",
             rollout.agent.get("agent_loop_manager_class"), AGENT_LOOP_MANAGER, "does not score team episodes")
    if rollout.n < 2:
        raise TeamConfigError(f"actor_rollout_ref.rollout.n={rollout.n!r} must be > 1: the advantage is normalized "
                              "over the G trajectories of a prompt, and a group of 1 has advantage 0")
    if config.critic.get("enable"):
        raise TeamConfigError(f"critic.enable={config.critic.enable!r} is not supported by teamtr: set it to false")
    if config.algorithm.get("use_kl_in_reward"):
        raise TeamConfigError("algorithm.use_kl_in_reward=True is not supported by teamtr: the trust region is the "
                              "KL term of the teamtr loss; set algorithm.use_kl_in_reward=false")
    mode = config.trainer.resume_mode
    if mode not in RESUME_MODES:
        raise TeamConfigError(f"trainer.resume_mode={mode!r} is not valid: choose one of {', '.join(RESUME_MODES)}")
    if mode == "resume_path":
        path = config.trainer.get("resume_from_path")
        try:
            checkpoints.stages_done(str(path or ""))
        except ValueError:
            raise TeamConfigError(f"trainer.resume_from_path={path!r} must name a global_step_S or stage_S_update_U "
                                  "folder when trainer.resume_mode=resume_path") from None
    team = TeamConfig.from_config(config.get("teamtr"), prefix="teamtr")
    if team.prompts_per_update == "split" and config.data.train_batch_size < len(team.trained_names):
        raise TeamConfigError(f"data.train_batch_size={config.data.train_batch_size!r} is smaller than the number of "
                              f"trained agents ({len(team.trained_names)}): teamtr.prompts_per_update=split needs a "
                              "prompt per update")
    stage0 = validate_resume(config, team)
    built = stacks_team(team, stage0)  # the stacks this run builds: + the incoming model's during a Stage 0
    try:
        validate_placement(built, config.trainer.n_gpus_per_node * config.trainer.nnodes)
        validate_micro_batches(config, built)
        validate_ray_cpus(config, built)
    except TeamConfigError as error:
        if stage0:
            raise TeamConfigError(f"teamtr.replace.method=aligned runs the incoming model beside the team until it "
                                  f"is aligned: {error}") from None
        if team.replace is not None and team.replace.method == "aligned":
            raise TeamConfigError(f"{error} (the swap of {team.replace.agent!r} is done: the incoming model's extra "
                                  "devices are not needed any more)") from None
        raise
    for index, agent in enumerate(team.agents):
        cap = agent.sampling.max_new_tokens
        if cap is not None and cap > rollout.response_length:
            raise TeamConfigError(f"teamtr.agents[{index}].sampling.max_new_tokens={cap!r} exceeds "
                                  f"actor_rollout_ref.rollout.response_length={rollout.response_length}: every "
                                  "message is padded to that length; lower the cap or raise data.max_response_length")
    validate_chat_templates(config, team)
    validate_shared_base(config, team)
    for key in DATA_FILE_KEYS:
        _check_data_files(key, config.data.get(key.split(".", 1)[1]))
    return team


def validate_shared_base(config: DictConfig, team: TeamConfig) -> None:
    """A shared-base team (``teamtr.shared_base``): one vLLM engine keeps every agent's adapter resident, and no
    second copy of the base is built for a reference policy."""
    if team.shared_base is None:
        return
    actor_rollout_ref = config.actor_rollout_ref
    max_loras = configured_max_loras(actor_rollout_ref.rollout)
    if max_loras is not None and max_loras != len(team.agents):
        raise TeamConfigError(f"actor_rollout_ref.rollout.engine_kwargs.vllm.max_loras={max_loras!r} is not the "
                              f"team's size ({len(team.agents)} agents): every agent's adapter stays resident, one "
                              "each; remove the key (teamtr sets it)")
    lora = actor_rollout_ref.model.get("lora") or {}
    if lora.get("merge"):
        raise TeamConfigError("actor_rollout_ref.model.lora.merge=True is not supported with teamtr.shared_base: a "
                              "merged sync has no adapter to serve per agent; set it to false")
    if actor_rollout_ref.model.get("lora_adapter_path"):
        raise TeamConfigError(f"actor_rollout_ref.model.lora_adapter_path={actor_rollout_ref.model.lora_adapter_path!r}"
                              " would start every agent from one adapter: give each agent its own with "
                              "teamtr.agents[i].adapter_path")
    if actor_rollout_ref.actor.get("use_kl_loss"):
        raise TeamConfigError("actor_rollout_ref.actor.use_kl_loss=True is not supported with teamtr.shared_base: "
                              "the trust region is the teamtr loss's KL to each agent's own π_cur; set it to false")
    rank = actor_rollout_ref.model.get("lora_rank") or 0
    if rank not in (0, team.shared_base.lora_rank):
        raise TeamConfigError(f"actor_rollout_ref.model.lora_rank={rank!r} differs from teamtr.shared_base.lora.rank="
                              f"{team.shared_base.lora_rank}: set the rank in teamtr.shared_base.lora only")


def validate_resume(config: DictConfig, team: TeamConfig) -> bool:
    """The checkpoint to resume from was written by this team (or by its incumbent, for ``teamtr.replace``);
    ``teamtr.replace`` needs one. Returns whether this run starts with a Stage-0 aligned swap."""
    from teamtr_verl.state import STATE_FILE, resume_state  # torch (through algos): only when resuming

    resumed = resume_state(config.trainer)
    if resumed is None:
        if config.trainer.resume_mode == "resume_path":
            raise TeamConfigError(f"trainer.resume_from_path={config.trainer.resume_from_path!r} holds no "
                                  f"{STATE_FILE}: it is not a committed teamtr checkpoint")
        if team.replace is not None:
            raise TeamConfigError(
                f"teamtr.replace.agent={team.replace.agent!r} needs a checkpoint to resume from, but "
                f"trainer.resume_mode={config.trainer.resume_mode!r} finds none (trainer.default_local_dir="
                f"{config.trainer.default_local_dir!r}): a swap replaces an agent of a trained team")
        return False
    folder, state = resumed
    try:
        pending = state.check_matches(team, folder)
    except ValueError as error:
        raise TeamConfigError(str(error)) from None
    stage0 = pending and team.replace.method == "aligned"
    if stage0:
        validate_stage0_tokenizer(config, team)
        validate_stage0_model_path(config, team)
    return stage0


def validate_stage0_model_path(config: DictConfig, team: TeamConfig) -> None:
    """Stage 0 runs the actors' modules directly on padded batches for whole next-token distributions: refuse the
    engine options that change what that forward returns or how it is split across ranks, in the team's config or in
    the swapped agent's own actor overrides (both the incumbent's and the newcomer's stacks use them)."""
    name = team.replace.agent
    agent_config = agent_trainer_config(config, team.agent(name))
    if agent_config.actor_rollout_ref.model.get("use_fused_kernels", False):
        raise TeamConfigError("actor_rollout_ref.model.use_fused_kernels=True cannot be used with teamtr.replace "
                              "method=aligned: fused kernels never materialize the logits Stage 0 distils; set it "
                              "to false for the swap's run, or use method=direct")
    actor = agent_config.actor_rollout_ref.actor
    for key, sp in (("actor_rollout_ref.actor.ulysses_sequence_parallel_size",  # deprecated in verl 0.9.1, still read
                     actor.get("ulysses_sequence_parallel_size", 1)),
                    ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
                     (actor.get("fsdp_config") or {}).get("ulysses_sequence_parallel_size", 1))):
        if (sp or 1) > 1:
            raise TeamConfigError(f"{key}={sp} (agent {name!r}) cannot be used with teamtr.replace method=aligned: "
                                  "Stage 0 runs every sequence whole on each rank; set it to 1 for the swap's run, or "
                                  "use method=direct")


def validate_stage0_tokenizer(config: DictConfig, team: TeamConfig) -> None:
    """A Stage-0 aligned swap trains the newcomer on the incumbent's contexts and messages, re-tokenized where the
    vocabularies differ: the newcomer must end a message (an EOS token) and render those contexts alike."""
    from transformers import AutoTokenizer

    swap = team.replace
    incumbent, incoming = (AutoTokenizer.from_pretrained(path) for path in (swap.incumbent, swap.model))
    if not same_vocabulary(incumbent, incoming) and config.trainer.get("val_before_train", True):
        raise TeamConfigError(
            f"trainer.val_before_train=True cannot be used with teamtr.replace.model={swap.model!r}, whose tokenizer "
            "is not the incumbent's: the validation before training runs before Stage 0, while the incumbent's servers "
            "still answer the agent's turns; set trainer.val_before_train=false for the swap's run")
    if swap.target == "mixture" and not same_vocabulary(incumbent, incoming):
        raise TeamConfigError(
            f"teamtr.replace.target=mixture cannot be used with teamtr.replace.model={swap.model!r}, whose tokenizer is "
            "not the incumbent's: a geometric mixture needs both distributions over one vocabulary; use "
            "target=incumbent")
    if incoming.eos_token_id is None:
        raise TeamConfigError(f"teamtr.replace.model={swap.model!r}: its tokenizer has no EOS token, so Stage 0 "
                              "cannot end the incumbent's messages in its tokens; give it one, or use method=direct")
    # the newcomer is aligned on the incumbent's rendered contexts: its own template must render them the same way
    if swap.incumbent_agent.chat_template is None and incumbent.chat_template != incoming.chat_template:
        raise TeamConfigError(
            f"teamtr.replace.model={swap.model!r} has another chat template than the incumbent ({swap.incumbent}): "
            "the Stage-0 probe would show the incumbent contexts it never saw; give the agent the incumbent's template "
            "(teamtr.agents[i].chat_template) or use method=direct")


def validate_chat_templates(config: DictConfig, team: TeamConfig) -> None:
    """Every agent whose prompt rendering is configured (its own template or kwargs, or verl's
    ``data.apply_chat_template_kwargs``, which apply to every agent's turns) must render a probe chat with its
    tokenizer: a template error would otherwise surface in the first episode, after the cluster started."""
    from transformers import AutoTokenizer

    from teamtr_verl.team_logic import render_prompt

    data_kwargs = dict(config.data.get("apply_chat_template_kwargs") or {})
    for index, agent in enumerate(team.agents):
        if agent.chat_template is None and not agent.chat_template_kwargs and not data_kwargs:
            continue
        if agent.chat_template is not None:
            key, value = f"teamtr.agents[{index}].chat_template", agent.chat_template
        elif agent.chat_template_kwargs:
            key, value = f"teamtr.agents[{index}].chat_template_kwargs", agent.chat_template_kwargs
        else:
            key, value = "data.apply_chat_template_kwargs", data_kwargs
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        # the messages the agent's turns carry: a system message only with a role prompt
        probe = ([{"role": "system", "content": agent.role_prompt}] if agent.role_prompt else []) + [
            {"role": "user", "content": "probe task"}]
        try:
            render_prompt(AutoTokenizer.from_pretrained(agent.model), agent, probe, config.data)
        except Exception as error:  # any template failure (syntax, undefined name, raise_exception) is the user's
            raise TeamConfigError(f"{key}={shown} does not render a probe chat with agent {agent.name!r}'s "
                                  f"tokenizer: {type(error).__name__}: {error}") from None


# One logical CPU kept free beyond the placement group: actors created without resource options (the vLLM servers,
# verl's agent-loop and reward-loop workers) need one free CPU to be placed, then hold none.
RAY_SPARE_CPUS = 1


def transfer_queue_cpus(config: DictConfig) -> int:
    """Logical CPUs TransferQueue's actors hold before verl places the team: its controller and each storage unit."""
    simple = (((config.get("transfer_queue") or {}).get("backend") or {}).get("SimpleStorage") or {})
    return 1 + int(simple.get("num_data_storage_units", 8))  # 8: TransferQueue's default


def validate_ray_cpus(config: DictConfig, team: TeamConfig) -> None:
    """With a fixed ``ray_kwargs.ray_init.num_cpus`` (the CPU runtime's), the team's placement group must fit in it:
    Ray would wait for it forever (one node; several nodes bring their own CPUs and are checked once Ray is up)."""
    from teamtr_verl.topology import bundle_cpus_per_node, colocate_count

    num_cpus = (config.get("ray_kwargs") or {}).get("ray_init", {}).get("num_cpus")
    if num_cpus is None or config.trainer.nnodes != 1:
        return
    queue = transfer_queue_cpus(config)
    need = bundle_cpus_per_node(config, team) + queue + RAY_SPARE_CPUS
    if need > num_cpus:
        raise TeamConfigError(
            f"ray_kwargs.ray_init.num_cpus={num_cpus} is too few for this team: verl's placement group asks "
            f"trainer.n_gpus_per_node={config.trainer.n_gpus_per_node} x {colocate_count(team)} logical CPUs "
            f"(teamtr.placement={team.placement!r}), plus {queue} for TransferQueue and {RAY_SPARE_CPUS} to place the "
            f"servers and loop workers: set it to at least {need}")


def validate_micro_batches(config: DictConfig, team: TeamConfig) -> None:
    """Fixed micro-batches must divide each agent's mini-batch on its devices.

    verl pads an agent's rows (prompts x samples x its turns: any router) to whole mini-batches of
    ``ppo_mini_batch_size x rollout.n`` rows; a micro-batch that does not divide that would make verl pad further,
    into mini-batches of padding only (an empty loss and a momentum-only optimizer step), or fail in its split.
    """
    from teamtr_verl.topology import agent_devices, agent_trainer_config

    for agent in team.agents:
        if not agent.train:  # a frozen agent has no actor and no mini-batches
            continue
        ref = agent_trainer_config(config, agent).actor_rollout_ref
        rows, devices = ref.actor.ppo_mini_batch_size * ref.rollout.n, agent_devices(config, team, agent)
        checks = [("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", ref.actor.get("ppo_micro_batch_size_per_gpu"),
                   ref.actor.get("use_dynamic_bsz", False)),
                  ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
                   ref.rollout.get("log_prob_micro_batch_size_per_gpu"), ref.rollout.get("log_prob_use_dynamic_bsz", False))]
        for key, micro, dynamic in checks:
            if not dynamic and micro and rows % (devices * micro):
                raise TeamConfigError(
                    f"{key}={micro} does not divide the mini-batch of agent {agent.name!r}: "
                    f"actor_rollout_ref.actor.ppo_mini_batch_size x rollout.n = {rows} rows over {devices} device(s); "
                    f"choose a micro-batch that divides {rows / devices:g}, or dynamic batch sizes")


def _check_data_files(key: str, value) -> None:
    """verl builds both datasets only after Ray and every worker have started: a missing file would fail minutes in.

    verl's loader (HF datasets) takes a path, a glob or a list of them, does not expand ``~``, and opens relative
    paths from the working directory.
    """
    valid = "an existing parquet/json file, a glob or a list of them, or a hdfs://, s3:// or gs:// URL"
    paths = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if value is None or not paths:
        raise TeamConfigError(f"{key}={value!r} is not set: set {key} to {valid}")
    for index, path in enumerate(paths):
        where = f"{key}[{index}]" if isinstance(value, (list, tuple, ListConfig)) else key
        if not isinstance(path, str) or not path.strip():
            raise TeamConfigError(f"{where}={path!r} is not a path: set {key} to {valid}")
        if _REMOTE.match(path):
            continue
        if not os.path.isfile(path) and not any(os.path.isfile(match) for match in glob.glob(path)):
            hint = " (verl does not expand ~: write the full path)" if path.startswith("~") else ""
            raise TeamConfigError(f"{where}={path!r} does not exist{hint}: set {key} to {valid}")
