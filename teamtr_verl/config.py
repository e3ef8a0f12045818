"""The ``teamtr:`` block of the Hydra config, as frozen dataclasses, and its validation.

The block is top-level (``teamtr.*``), not under ``algorithm.*``: verl's algorithm dataclass rejects unknown keys.
Shape (YAML)::

    teamtr:
      agents:                 # chain order; each agent keyed by a unique name
        - name: planner       # ^[A-Za-z][A-Za-z0-9_-]*$, used in metric names and checkpoint directories
          model: /path/to/dir # local directory holding config.json
          role_prompt: "..."  # this agent's system prompt
          delta: null         # per-agent KL radius; null -> teamtr.delta
          beta_init: null     # per-agent initial β; null -> teamtr.beta_init
          n_devices: 1        # devices of this agent in `split` placement (ignored by `colocate`)
          actor: {}           # overrides merged into actor_rollout_ref.actor for this agent only
          chat_template: null # a Jinja chat template replacing the tokenizer's (the team's message format for a new model)
          chat_template_kwargs: {}  # over data.apply_chat_template_kwargs, for this agent (e.g. enable_thinking: false)
          train: true         # false: a frozen agent (a fixed judge, a retriever): vLLM servers only, never updated
          adapter_path: null  # teamtr.shared_base only: a PEFT LoRA adapter directory this agent starts from
          sampling: {}        # this agent's turns only (null keys: actor_rollout_ref.rollout's): temperature, top_p,
                              # top_k, max_new_tokens, stop: [strings], val_kwargs: {temperature, top_p, top_k}
      router: {kind: chain, turns: null, seed: 0, sequence: null}
      handoff: {message_format: "{name}: {content}", transcript_header: "Conversation so far:", answer: last}
      placement: split        # split | colocate
      delta: 0.01             # default KL radius δ > 0
      beta_init: 0.1          # default initial β > 0
      replace: null           # on resume: {agent: NAME, model: /new/dir, method: aligned | direct, delta0: null,
                              # max_epochs: 20, heldout_fraction: 0.25, topk: 64, mini_batch: 8, lr: null,
                              # target: incumbent | mixture, chat_template: null, chat_template_kwargs: null}: swap
                              # that agent's model (aligned: Stage 0 first), keep the rest of the team
      shared_base: null       # {model: /base/dir, lora: {rank: 8, alpha: 16, target_modules: all-linear}}: every agent
                              # a LoRA adapter of that base (agents omit model), one engine and vLLM server for all

:meth:`TeamConfig.from_config` raises :class:`TeamConfigError` on the first problem, with a message that names the
dotted key, the offending value and what would be valid. The known keys of each level are the fields of its
dataclass, so adding a field is all it takes to accept a new key. This module imports only the standard library and
(lazily) omegaconf, so validation runs in the driver before Ray, vLLM or torch are touched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "TeamConfigError",
    "AgentSpec",
    "SamplingSpec",
    "ValSamplingSpec",
    "RouterSpec",
    "HandoffSpec",
    "ReplaceSpec",
    "REPLACE_METHODS",
    "SharedBaseSpec",
    "TeamConfig",
    "ROUTER_KINDS",
    "PLACEMENTS",
    "ANSWER_LAST",
    "MESSAGE_FORMAT_FIELDS",
    "RESERVED_AGENT_NAMES",
    "AGENT_NAME_PATTERN",
    "validate_placement",
    "SCHEDULES",
    "ORDERS",
    "PROMPTS_PER_UPDATE",
]

from teamtr_verl.defaults import (  # noqa: E402 (after __all__: the lists are re-exported)
    CERTIFICATE_BOUNDS,
    DEFAULT_CONFIDENCE_T,
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_MAX_BACKTRACKS,
    DEFAULT_STEP_SAFETY,
    KL_ESTIMATORS,
    KL_REDUCTIONS,
    ON_NONFINITE,
    ORDERS,
    PLACEMENTS,
    PROMPTS_PER_UPDATE,
    RATIO_LEVELS,
    ROUTER_KINDS,
    SCHEDULES,
)

# Placeholders a handoff.message_format may use (see team_logic.format_transcript).
MESSAGE_FORMAT_FIELDS = ("name", "content", "turn")
ANSWER_LAST = "last"
# `stage`, `stage0` and `rollout` would collide with the metric namespaces teamtr/<name>/...; `last` with
# handoff.answer's keyword.
RESERVED_AGENT_NAMES = ("stage", "stage0", "rollout", ANSWER_LAST)
AGENT_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"
_AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
# How teamtr.replace brings the incoming model in: `aligned` first distils it into the incumbent's KL ball on the
# team's own contexts (Stage 0, paper Prop. 3.8); `direct` loads it as is (the paper's direct swap).
REPLACE_METHODS = ("aligned", "direct")
# What Stage 0 distils the newcomer toward (shared vocabulary): the incumbent itself, or per position the geometric
# mixture π_t ∝ π_new^(1−t)·π_inc^t closest to the newcomer within the KL budget (keep as much of the newcomer as δ₀
# allows; paper App. D / SAT).
REPLACE_TARGETS = ("incumbent", "mixture")
# During an aligned swap the incoming model has its own stack beside the incumbent's, named <agent><suffix>.
INCOMING_SUFFIX = "-incoming"


class TeamConfigError(ValueError):
    """A bad ``teamtr`` block; the message names the dotted key, the value and what is valid."""


# ------------------------------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True)
class ValSamplingSpec:
    """An agent's validation sampling (None: ``actor_rollout_ref.rollout.val_kwargs``' value)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None


@dataclass(frozen=True)
class SamplingSpec:
    """How one agent's turns are sampled; None means the team's ``actor_rollout_ref.rollout`` value.

    ``temperature`` also reaches the agent's actor (its log-probs divide the logits by it, as vLLM's did), so a
    trained agent's temperature must be > 0. ``max_new_tokens`` caps the agent's messages below
    ``actor_rollout_ref.rollout.response_length``; generation stops at any of ``stop`` (vLLM's stop strings). vLLM
    trims a stop string from its text only: the message keeps the tokens that completed it (they were sampled, and
    are trained on), so the transcript and the reward see it."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_new_tokens: Optional[int] = None
    stop: tuple[str, ...] = ()
    val_kwargs: ValSamplingSpec = ValSamplingSpec()


@dataclass(frozen=True)
class AgentSpec:
    """One agent of the team. ``delta``/``beta_init`` of None mean "use the team default" (see TeamConfig)."""

    name: str
    model: str
    role_prompt: str = ""
    delta: Optional[float] = None
    beta_init: Optional[float] = None
    n_devices: int = 1
    # A plain nested dict, owned by this agent alone (never aliased with another agent's); excluded from the hash.
    actor: dict = field(default_factory=dict, hash=False)
    sampling: SamplingSpec = SamplingSpec()
    # How the agent's prompt is rendered: a Jinja chat template instead of its tokenizer's, and keyword arguments
    # for it over verl's data.apply_chat_template_kwargs (e.g. enable_thinking=False). Part of the team's protocol:
    # an incoming model can be made to see the team's messages exactly as its predecessor did.
    chat_template: Optional[str] = None
    chat_template_kwargs: dict = field(default_factory=dict, hash=False)
    # False: a frozen agent. It speaks through its own vLLM servers, loaded from ``model``, but has no actor and is
    # never updated: the stage loop, the certificate and checkpoints treat it as part of the environment.
    train: bool = True
    # teamtr.shared_base only: a PEFT LoRA adapter directory (adapter_config.json + weights) this agent starts from
    adapter_path: Optional[str] = None


@dataclass(frozen=True)
class RouterSpec:
    """Who speaks at each turn of an episode (see team_logic.router_schedule)."""

    kind: str = "chain"
    turns: Optional[int] = None
    seed: int = 0
    sequence: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class HandoffSpec:
    """How earlier messages are shown to the next speaker, and which message the reward scores."""

    message_format: str = "{name}: {content}"
    transcript_header: str = "Conversation so far:"
    answer: str = ANSWER_LAST


@dataclass(frozen=True)
class CertificateSpec:
    """How each update's gain is measured and bounded (teamtr_verl/algos/certificate.py, docs/paper_map.md)."""

    bound: str = "is_lcb"  # is_lcb: importance-sampled lower confidence bound | theorem: Thm. 3.4, turn-based constant
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION  # prompt groups kept out of the gradient, to measure on
    confidence_t: float = DEFAULT_CONFIDENCE_T  # standard errors subtracted from the bound
    return_range: Optional[float] = None  # ε of the theorem form; None: max − min of the stage's returns
    crn: bool = True  # every regeneration of a stage samples with the same per-(prompt, sample, turn) seeds
    closing_regeneration: bool = True  # regenerate once more after the stage's last update to measure its gain


@dataclass(frozen=True)
class ReplaceSpec:
    """``teamtr.replace``: resume a run with agent ``agent``'s model swapped for ``model``.

    ``incumbent`` is the model the agent was configured with (``teamtr.agents[i].model``): the one the checkpoint's
    weights were trained from; ``incumbent_agent`` the agent's whole spec as configured. In :class:`TeamConfig` the
    agent's spec already carries the new model (and, ``direct`` only, the chat-template override), so the agent loop
    and the trainer see the team after the swap; the resume check (:meth:`teamtr_verl.state.TeamTRState.
    check_matches`), the Stage-0 stacks (:func:`teamtr_verl.topology.stacks_team`) and the tokenizer check use the
    incumbent.
    """

    agent: str
    model: str
    incumbent: str
    method: str = "aligned"
    # Stage 0 (method=aligned): the KL radius δ₀ the newcomer must reach, KL(π_incumbent ‖ π_new) per message on the
    # held-out probe messages (None: the agent's δ); the alignment epochs allowed before the swap is refused; the
    # share of probe prompt groups held out to measure it on.
    delta0: Optional[float] = None
    max_epochs: int = 20
    heldout_fraction: float = 0.25
    # the distillation: the incumbent's top-k tokens per position (plus the mass outside them; exact when k covers the
    # vocabulary; unused across tokenizers, where the loss is the re-tokenized messages' likelihood), the probe
    # messages per optimizer step (an epoch is one pass over the training messages) and the learning rate of its steps
    # (None: the agent's actor.optim.lr)
    topk: int = 64
    mini_batch: int = 8
    lr: Optional[float] = None
    # the distillation's target (REPLACE_TARGETS); "mixture" spends half of δ₀, split over a message's tokens, per
    # position (the other half is left for the fit), and needs the incumbent's vocabulary
    target: str = "incumbent"
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict] = field(default=None, hash=False)
    incumbent_agent: Optional[AgentSpec] = field(default=None, compare=False)  # the agent as configured (incumbent)


@dataclass(frozen=True)
class SharedBaseSpec:
    """``teamtr.shared_base``: every agent a LoRA adapter of one base model, one training engine and one vLLM
    replica set for the whole team (each agent keeps its own adapter, optimizer state, lr, δ and β)."""

    model: str
    lora_rank: int = 8
    lora_alpha: int = 16  # verl's HFModelConfig.lora_alpha is an int
    target_modules: Any = "all-linear"  # a string (PEFT's "all-linear") or a tuple of module names


@dataclass(frozen=True)
class TeamConfig:
    agents: tuple[AgentSpec, ...]
    router: RouterSpec = RouterSpec()
    handoff: HandoffSpec = HandoffSpec()
    placement: str = "split"
    delta: float = 0.01
    beta_init: float = 0.1
    # -- the stage loop (teamtr_verl/trainer.py) --
    schedule: str = "teamtr"
    resample_every: Optional[int] = None  # schedule=teamtr only: regenerate before every k-th update (None = 1)
    prompts_per_update: str = "all"  # split: update i regenerates (and trains on) only part i of the stage's prompts
    reuse_prefix: bool = True  # a regeneration keeps each episode's turns before the first turn of an updated agent
    order: str = "fixed"
    order_seed: int = 0
    enforce: bool = True  # line-search every update into its KL region (else: only adapt β and count the overshoot)
    max_backtracks: int = DEFAULT_MAX_BACKTRACKS  # step halvings after the first scaled try, then give up
    step_safety: float = DEFAULT_STEP_SAFETY  # first step fraction min(1, step_safety·sqrt(δ/KL_full))
    kl_estimator: str = "k3"  # the monitor (δ check) and the loss's KL penalty use the same estimator
    kl_reduction: str = "message_sum"  # the loss's KL penalty: Eq. 11 message sum | token_mean
    ratio_level: str = "token"  # the loss's importance ratio: per token (verl) | message (the paper's product)
    a_clip: float = 5.0
    norm_eps: float = 1e-6
    certificate: CertificateSpec = CertificateSpec()
    on_nonfinite: str = "error"  # a non-finite loss, KL or grad norm: stop (error) or skip the update and count it
    save_every_update: bool = False  # checkpoint after each update that the next one regenerates for, and every stage
    replace: Optional[ReplaceSpec] = None  # on resume: one agent's model swapped (agents already show the new one)
    shared_base: Optional[SharedBaseSpec] = None  # every agent a LoRA adapter on this one base model

    def regenerates_before(self, update_index: int) -> bool:
        """Whether the team's rollouts are regenerated before the ``update_index``-th agent update of a stage."""
        if update_index == 0:
            return True
        if self.schedule != "teamtr":
            return False
        return update_index % (self.resample_every or 1) == 0

    def prompt_parts(self, num_prompts: int, num_updates: int) -> list[list[int]]:
        """The prompt indices each update of a stage regenerates: all of them, or (``split``) N contiguous parts
        whose sizes differ by at most one."""
        if self.prompts_per_update == "all":
            return [list(range(num_prompts))] * num_updates
        bounds = [round(i * num_prompts / num_updates) for i in range(num_updates + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(num_updates)]

    def checkpoints_after(self, update_index: int, num_updates: int) -> bool:
        """Whether ``save_every_update`` checkpoints after the ``update_index``-th update of a stage: only where the
        next update regenerates, so a resumed run needs no cached rollout (stale: at stage ends only)."""
        return (self.save_every_update and update_index + 1 < num_updates
                and self.regenerates_before(update_index + 1))

    @property
    def agent_names(self) -> tuple[str, ...]:
        return tuple(agent.name for agent in self.agents)

    @property
    def trained_names(self) -> tuple[str, ...]:
        """The agents the stage loop updates (``train: true``), in team order."""
        return tuple(agent.name for agent in self.agents if agent.train)

    def agent(self, name: str) -> AgentSpec:
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise KeyError(f"no agent named {name!r}: agents are {list(self.agent_names)}")

    def delta_of(self, name: str) -> float:
        """Agent ``name``'s KL radius δ: its own ``delta`` or the team default."""
        own = self.agent(name).delta
        return self.delta if own is None else own

    def stage0_delta(self) -> float:
        """δ₀ of ``teamtr.replace`` (its own ``delta0``, else the replaced agent's δ)."""
        return self.replace.delta0 if self.replace.delta0 is not None else self.delta_of(self.replace.agent)

    def beta_init_of(self, name: str) -> float:
        """Agent ``name``'s initial KL coefficient β: its own ``beta_init`` or the team default."""
        own = self.agent(name).beta_init
        return self.beta_init if own is None else own

    @classmethod
    def from_config(cls, block: Any, *, prefix: str = "teamtr", check_paths: bool = True) -> "TeamConfig":
        """Build and validate a TeamConfig from the ``teamtr`` block (an OmegaConf DictConfig or a plain dict).

        ``prefix`` is the dotted path of the block, used in error messages. ``check_paths`` checks that every
        agent's model directory exists and holds a config.json (turn it off to validate on another machine).
        Raises :class:`TeamConfigError` on the first problem.
        """
        return _parse_team(_to_plain(block, prefix), prefix, check_paths)


def validate_placement(
    team: TeamConfig,
    n_devices_available: int,
    *,
    prefix: str = "teamtr",
    available_from: str = "trainer.n_gpus_per_node * trainer.nnodes",
) -> None:
    """Raise unless ``split`` placement's slices add up to the cluster's devices.

    In ``split`` each agent gets its own ``n_devices`` slice and verl's ``split_resource_pool`` hands out every
    device, so their sum must equal the count. ``colocate`` time-shares all devices between the agents and ignores
    ``n_devices``. ``available_from`` names where the count came from.
    """
    if team.placement != "split" or team.shared_base is not None:  # a shared base spans every device
        return
    needed = sum(agent.n_devices for agent in team.agents)
    per_agent = ", ".join(f"{agent.name}: {agent.n_devices}" for agent in team.agents)
    if needed > n_devices_available:
        raise TeamConfigError(
            f"{prefix}.placement='split' needs {needed} devices ({per_agent}) "
            f"but {available_from} = {n_devices_available}"
        )
    if needed < n_devices_available:
        raise TeamConfigError(
            f"{prefix}.placement='split' uses {needed} devices ({per_agent}) but {available_from} = "
            f"{n_devices_available}: verl's split gives every device to an agent; make the agents' n_devices add "
            f"up to it, or use {prefix}.placement=colocate"
        )


# ------------------------------------------------------------------------------------------------ parsing


def _to_plain(block: Any, prefix: str) -> Any:
    """An OmegaConf node as plain Python containers (resolved); anything else is returned as is."""
    if block is None:
        raise TeamConfigError(f"{prefix} is missing: the config needs a {prefix} block with at least `agents`")
    if not (type(block).__module__ or "").startswith("omegaconf"):
        return block
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(block, resolve=True)
    missing = _first_missing(plain, prefix)
    if missing is not None:
        raise TeamConfigError(f"{missing} is ??? (mandatory): set it, e.g. as a Hydra override {missing}=...")
    return plain


def _first_missing(value: Any, key: str) -> Optional[str]:
    """The dotted key of the first OmegaConf ``???`` (mandatory, unset) value, in document order."""
    if value == "???":
        return key
    if isinstance(value, dict):
        children = ((f"{key}.{name}", child) for name, child in value.items())
    elif isinstance(value, list):
        children = ((f"{key}[{index}]", child) for index, child in enumerate(value))
    else:
        return None
    for child_key, child in children:
        found = _first_missing(child, child_key)
        if found is not None:
            return found
    return None


def _fail(key: str, value: Any, why: str) -> TeamConfigError:
    return TeamConfigError(f"{key}={value!r} {why}")


def _known_keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _mapping(value: Any, key: str, *, allow_none: bool = False) -> dict:
    if value is None and allow_none:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, value, "must be a mapping")
    return dict(value)


def _reject_unknown_keys(entry: Mapping, cls, key: str) -> None:
    """``cls``: a dataclass whose fields are the known keys, or the names themselves."""
    known = tuple(cls) if isinstance(cls, (tuple, list)) else _known_keys(cls)
    for name in entry:
        if name not in known:
            raise TeamConfigError(f"{key}.{name} is not a known key: known keys are {', '.join(known)}")


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `delta: true` is a typo, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any, key: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _fail(key, value, "must be a finite number > 0")
    if value <= 0:
        raise _fail(key, value, "must be > 0")
    return float(value)


def _non_negative(value: Any, key: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _fail(key, value, "must be a finite number >= 0")
    if value < 0:
        raise _fail(key, value, "must be >= 0")
    return float(value)


def _integer(value: Any, key: str, *, minimum: Optional[int] = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(key, value, "must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise _fail(key, value, f"must be >= {minimum}")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, "must be a string")
    return value


def _parse_team(block: Any, prefix: str, check_paths: bool) -> TeamConfig:
    block = _mapping(block, prefix)
    _reject_unknown_keys(block, TeamConfig, prefix)

    shared_base = None
    if block.get("shared_base") is not None:
        shared_base = _parse_shared_base(block["shared_base"], f"{prefix}.shared_base", check_paths)
    agents = _parse_agents(block.get("agents"), f"{prefix}.agents", check_paths, shared=shared_base)
    if not any(agent.train for agent in agents):
        raise TeamConfigError(f"{prefix}.agents: every agent has train: false; at least one agent must be trained")
    names = [agent.name for agent in agents]
    router = _parse_router(block.get("router"), f"{prefix}.router", names)
    handoff = _parse_handoff(block.get("handoff"), f"{prefix}.handoff", names, router)

    placement = block.get("placement", TeamConfig.placement)
    if placement not in PLACEMENTS:
        raise _fail(f"{prefix}.placement", placement, f"is not valid: choose one of {', '.join(PLACEMENTS)}")
    delta = _positive(block.get("delta", TeamConfig.delta), f"{prefix}.delta")
    beta_init = _positive(block.get("beta_init", TeamConfig.beta_init), f"{prefix}.beta_init")
    replace = None
    if block.get("replace") is not None:
        if shared_base is not None:
            raise _fail(f"{prefix}.replace", block["replace"], f"is not supported with {prefix}.shared_base yet: a "
                                                               "swapped agent would need a model of its own")
        replace = _parse_replace(block["replace"], f"{prefix}.replace", agents, check_paths)
        agents = [_swapped(agent, replace) if agent.name == replace.agent else agent for agent in agents]
    return TeamConfig(
        agents=tuple(agents), router=router, handoff=handoff, placement=placement, delta=delta, beta_init=beta_init,
        replace=replace, shared_base=shared_base, **_parse_stage_loop(block, prefix),
    )


# the LoRA ranks vLLM 0.31 serves (vllm/config/lora.py, MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# what an agent of a shared-base team may set for itself: the keys each update passes to the loss (agent_loss_config)
# and its learning rate (its adapter slot's); everything else is the one engine's, built once for every agent
SHARED_AGENT_ACTOR_KEYS = ("policy_loss", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c",
                           "loss_agg_mode", "optim")


def _parse_shared_base(entry: Any, key: str, check_paths: bool) -> SharedBaseSpec:
    entry = _mapping(entry, key)
    _reject_unknown_keys(entry, ("model", "lora"), key)
    if entry.get("model") is None:
        raise TeamConfigError(f"{key}.model is missing: the local directory of the base model every agent shares")
    model = _string(entry["model"], f"{key}.model")
    if check_paths:
        _check_model_dir(model, f"{key}.model")
    lora = _mapping(entry.get("lora"), f"{key}.lora", allow_none=True)
    _reject_unknown_keys(lora, ("rank", "alpha", "target_modules"), f"{key}.lora")
    rank = _integer(lora.get("rank", SharedBaseSpec.lora_rank), f"{key}.lora.rank", minimum=1)
    if rank not in VLLM_LORA_RANKS:
        raise _fail(f"{key}.lora.rank", rank, f"is not a LoRA rank vLLM serves: choose one of {VLLM_LORA_RANKS}")
    targets = lora.get("target_modules", SharedBaseSpec.target_modules)
    if isinstance(targets, Sequence) and not isinstance(targets, str):
        targets = tuple(targets)
        valid = bool(targets) and all(isinstance(t, str) and t for t in targets)
    else:
        valid = isinstance(targets, str) and bool(targets)
    if not valid:
        raise _fail(f"{key}.lora.target_modules", lora.get("target_modules"), "must be a PEFT target_modules string "
                                                                              "(e.g. 'all-linear') or a list of names")
    return SharedBaseSpec(model=model, lora_rank=rank,
                          lora_alpha=_integer(lora.get("alpha", SharedBaseSpec.lora_alpha), f"{key}.lora.alpha",
                                              minimum=1),
                          target_modules=targets)


def _same_directory(a: Any, b: str) -> bool:
    return os.path.realpath(str(a)) == os.path.realpath(b)


def _check_adapter_dir(path: str, key: str, shared: SharedBaseSpec) -> None:
    """A PEFT LoRA adapter an agent of a shared-base team starts from: plain LoRA of the shared base, at the team's
    rank and alpha (the one engine trains every adapter with one scaling alpha / rank)."""
    import json

    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise _fail(key, path, "holds no adapter_config.json: give a PEFT LoRA adapter directory (save_pretrained)")
    try:
        with open(config_file) as handle:
            adapter = json.load(handle)
    except (OSError, ValueError) as error:
        raise _fail(key, path, f"has an unreadable adapter_config.json ({error})") from None
    base = adapter.get("base_model_name_or_path")
    if not base or not _same_directory(base, shared.model):
        raise _fail(key, path, f"is an adapter of base {base!r}, not of teamtr.shared_base.model={shared.model!r}")
    for field_name, team_value, team_key in (("r", shared.lora_rank, "rank"), ("lora_alpha", shared.lora_alpha,
                                                                                  "alpha")):
        if adapter.get(field_name) != team_value:
            raise _fail(key, path, f"has {field_name} {adapter.get(field_name)!r}; the team's is "
                                   f"teamtr.shared_base.lora.{team_key}={team_value}")
    for variant in ("use_dora", "use_rslora"):
        if adapter.get(variant):
            raise _fail(key, path, f"is a {variant[4:]} adapter ({variant}: true); the team trains plain LoRA")
    if not any(os.path.isfile(os.path.join(path, f"adapter_model.{ext}")) for ext in ("safetensors", "bin")):
        raise _fail(key, path, "holds no adapter_model.safetensors (or .bin)")


def _check_shared_agent(entry: Mapping, key: str, shared_model: str) -> None:
    """An agent of a shared-base team: the team's base, trained, no engine-level settings of its own."""
    model = entry.get("model")
    if model is not None and not _same_directory(model, shared_model):
        raise _fail(f"{key}.model", model, f"differs from teamtr.shared_base.model={shared_model!r}: every agent of a "
                                           "shared-base team is an adapter of that model (omit the key)")
    if entry.get("train") is False:
        raise _fail(f"{key}.train", False, "is not supported with teamtr.shared_base yet: every agent is trained")
    if entry.get("n_devices") not in (None, 1):
        raise _fail(f"{key}.n_devices", entry["n_devices"], "does nothing with teamtr.shared_base: the one engine "
                                                            "spans every device; remove it")
    actor = _mapping(entry.get("actor"), f"{key}.actor", allow_none=True)
    for name in actor:
        if name not in SHARED_AGENT_ACTOR_KEYS:
            raise _fail(f"{key}.actor.{name}", actor[name], "is the team's one engine's with teamtr.shared_base (an "
                        f"agent may set {', '.join(SHARED_AGENT_ACTOR_KEYS[:-1])} and optim.lr): set it in "
                        "actor_rollout_ref.actor")
    optim = _mapping(actor.get("optim"), f"{key}.actor.optim", allow_none=True)
    for name in optim:
        if name != "lr":
            raise _fail(f"{key}.actor.optim.{name}", optim[name], "is the team's one optimizer's with "
                        "teamtr.shared_base (an agent may set only its lr): set it in actor_rollout_ref.actor.optim")


def _parse_replace(entry: Any, key: str, agents: list[AgentSpec], check_paths: bool) -> ReplaceSpec:
    entry = _mapping(entry, key)
    known = [name for name in _known_keys(ReplaceSpec) if not name.startswith("incumbent")]  # agents[i] gives them
    for name in entry:
        if name not in known:
            raise TeamConfigError(f"{key}.{name} is not a known key: known keys are {', '.join(known)}")
    names = [agent.name for agent in agents]
    name = entry.get("agent")
    if name not in names:
        raise _fail(f"{key}.agent", name, f"is not an agent of the team: choose one of {', '.join(names)}")
    incumbent_agent = next(agent for agent in agents if agent.name == name)
    incumbent = incumbent_agent.model
    if entry.get("model") is None:
        raise TeamConfigError(f"{key}.model is missing: give the incoming model's local directory")
    model = _string(entry["model"], f"{key}.model")
    if os.path.normpath(model) == os.path.normpath(incumbent):
        raise _fail(f"{key}.model", model, f"is already the model of agent {name!r} (teamtr.agents["
                                           f"{names.index(name)}].model): give another model, or remove "
                                           "teamtr.replace")
    if check_paths:
        _check_model_dir(model, f"{key}.model")
    method = entry.get("method", ReplaceSpec.method)
    if method not in REPLACE_METHODS:
        raise _fail(f"{key}.method", method, f"is not valid: choose one of {', '.join(REPLACE_METHODS)}")
    delta0 = entry.get("delta0")
    heldout = entry.get("heldout_fraction", ReplaceSpec.heldout_fraction)
    if not _is_number(heldout) or not 0 < heldout < 1:
        raise _fail(f"{key}.heldout_fraction", heldout, "must be a number in (0, 1): the alignment is measured on "
                                                       "held-out probe prompts and trained on the others")
    template = entry.get("chat_template")
    target = entry.get("target", ReplaceSpec.target)
    if target not in REPLACE_TARGETS:
        raise _fail(f"{key}.target", target, f"is not valid: choose one of {', '.join(REPLACE_TARGETS)}")
    if method == "direct":  # keys only Stage 0 reads would be silently ignored
        for unused in ("delta0", "max_epochs", "heldout_fraction", "topk", "mini_batch", "lr", "target"):
            if entry.get(unused) is not None:
                raise _fail(f"{key}.{unused}", entry[unused], "does nothing with method=direct (no Stage 0): remove "
                                                              "it, or use method=aligned")
    if method == "aligned":
        if not incumbent_agent.train:
            raise _fail(f"{key}.method", method, f"needs a trained agent, but {name!r} is frozen (train: false): "
                                                 "swap a frozen agent with method=direct")
        for override in ("chat_template", "chat_template_kwargs"):
            if entry.get(override) is not None:
                raise _fail(f"{key}.{override}", entry[override], "cannot be used with method=aligned: the "
                                                                  "newcomer is aligned on the contexts the incumbent "
                                                                  "saw, rendered as it saw them; use method=direct")
        incoming = f"{name}{INCOMING_SUFFIX}"
        if incoming in names:
            raise _fail(f"{key}.agent", name, f"cannot be swapped with method=aligned while the team has an agent "
                                              f"named {incoming!r} (the incoming model's stack takes that name)")
    return ReplaceSpec(
        agent=name, model=model, incumbent=incumbent, method=method, incumbent_agent=incumbent_agent,
        delta0=None if delta0 is None else _positive(delta0, f"{key}.delta0"),
        max_epochs=_integer(entry.get("max_epochs", ReplaceSpec.max_epochs), f"{key}.max_epochs", minimum=0),
        heldout_fraction=float(heldout),
        topk=_integer(entry.get("topk", ReplaceSpec.topk), f"{key}.topk", minimum=1),
        mini_batch=_integer(entry.get("mini_batch", ReplaceSpec.mini_batch), f"{key}.mini_batch", minimum=1),
        lr=None if entry.get("lr") is None else _positive(entry["lr"], f"{key}.lr"), target=target,
        chat_template=None if template is None else _string(template, f"{key}.chat_template"),
        chat_template_kwargs=(None if entry.get("chat_template_kwargs") is None else copy.deepcopy(
            _mapping(entry["chat_template_kwargs"], f"{key}.chat_template_kwargs"))),
    )


def _swapped(agent: AgentSpec, replace: ReplaceSpec) -> AgentSpec:
    """The agent as it is after the swap: the new model, the team's role prompt, sampling and handoff format
    (the paper's protocol unification), and the replacement's own chat template where it gives one."""
    changes: dict = {"model": replace.model}
    if replace.chat_template is not None:
        changes["chat_template"] = replace.chat_template
    if replace.chat_template_kwargs is not None:
        changes["chat_template_kwargs"] = copy.deepcopy(replace.chat_template_kwargs)
    return dataclasses.replace(agent, **changes)


def _choice(block: Mapping, name: str, choices: Sequence[str], prefix: str) -> str:
    value = block.get(name, getattr(TeamConfig, name))
    if value not in choices:
        raise _fail(f"{prefix}.{name}", value, f"is not valid: choose one of {', '.join(choices)}")
    return value


def _parse_stage_loop(block: Mapping, prefix: str) -> dict:
    """The stage-loop options of the trainer (schedule, order, δ enforcement, advantage, certificate)."""
    schedule = _choice(block, "schedule", SCHEDULES, prefix)
    resample_every = block.get("resample_every")
    if resample_every is not None:
        resample_every = _integer(resample_every, f"{prefix}.resample_every", minimum=1)
        if schedule != "teamtr":
            raise _fail(f"{prefix}.resample_every", resample_every,
                        f"only applies to {prefix}.schedule='teamtr' (it is {schedule!r}); set it to null")
    prompts_per_update = _choice(block, "prompts_per_update", PROMPTS_PER_UPDATE, prefix)
    if prompts_per_update == "split" and (schedule != "teamtr" or resample_every not in (None, 1)):
        raise _fail(f"{prefix}.prompts_per_update", prompts_per_update,
                    f"needs {prefix}.schedule='teamtr' with a regeneration before every update (schedule is "
                    f"{schedule!r}, resample_every {resample_every!r}): each update regenerates its own part")
    enforce = block.get("enforce", TeamConfig.enforce)
    if not isinstance(enforce, bool):
        raise _fail(f"{prefix}.enforce", enforce, "must be true or false")
    safety = _positive(block.get("step_safety", TeamConfig.step_safety), f"{prefix}.step_safety")
    if safety > 1:
        raise _fail(f"{prefix}.step_safety", safety, "must be in (0, 1]: the first try aims at step_safety²·δ")
    return dict(
        schedule=schedule,
        resample_every=resample_every,
        prompts_per_update=prompts_per_update,
        reuse_prefix=_flag(block, "reuse_prefix", TeamConfig.reuse_prefix, prefix),
        order=_choice(block, "order", ORDERS, prefix),
        order_seed=_integer(block.get("order_seed", TeamConfig.order_seed), f"{prefix}.order_seed"),
        enforce=enforce,
        max_backtracks=_integer(block.get("max_backtracks", TeamConfig.max_backtracks), f"{prefix}.max_backtracks",
                                minimum=0),
        step_safety=safety,
        kl_estimator=_choice(block, "kl_estimator", KL_ESTIMATORS, prefix),
        kl_reduction=_choice(block, "kl_reduction", tuple(r for r in KL_REDUCTIONS if r != "none"), prefix),
        ratio_level=_choice(block, "ratio_level", RATIO_LEVELS, prefix),
        a_clip=_positive(block.get("a_clip", TeamConfig.a_clip), f"{prefix}.a_clip"),
        norm_eps=_non_negative(block.get("norm_eps", TeamConfig.norm_eps), f"{prefix}.norm_eps"),
        certificate=_parse_certificate(block.get("certificate"), f"{prefix}.certificate"),
        on_nonfinite=_choice(block, "on_nonfinite", ON_NONFINITE, prefix),
        save_every_update=_flag(block, "save_every_update", TeamConfig.save_every_update, prefix),
    )


def _flag(entry: Mapping, name: str, default: bool, key: str) -> bool:
    value = entry.get(name, default)
    if not isinstance(value, bool):
        raise _fail(f"{key}.{name}", value, "must be true or false")
    return value


def _parse_certificate(entry: Any, key: str) -> CertificateSpec:
    entry = _mapping(entry, key, allow_none=True)
    _reject_unknown_keys(entry, CertificateSpec, key)
    bound = entry.get("bound", CertificateSpec.bound)
    if bound not in CERTIFICATE_BOUNDS:
        raise _fail(f"{key}.bound", bound, f"is not valid: choose one of {', '.join(CERTIFICATE_BOUNDS)}")
    fraction = _non_negative(entry.get("heldout_fraction", CertificateSpec.heldout_fraction),
                             f"{key}.heldout_fraction")
    if fraction >= 1:
        raise _fail(f"{key}.heldout_fraction", fraction, "must be < 1: some prompt groups must be trained on")
    return_range = entry.get("return_range")
    return CertificateSpec(
        bound=bound,
        heldout_fraction=fraction,
        confidence_t=_non_negative(entry.get("confidence_t", CertificateSpec.confidence_t), f"{key}.confidence_t"),
        return_range=None if return_range is None else _positive(return_range, f"{key}.return_range"),
        crn=_flag(entry, "crn", CertificateSpec.crn, key),
        closing_regeneration=_flag(entry, "closing_regeneration", CertificateSpec.closing_regeneration, key),
    )


def _parse_agents(entries: Any, key: str, check_paths: bool,
                  shared: Optional[SharedBaseSpec] = None) -> list[AgentSpec]:
    if entries is None or (isinstance(entries, Sequence) and not isinstance(entries, str) and len(entries) == 0):
        raise _fail(key, entries, "is empty: list at least one agent, e.g. [{name: solver, model: /path/to/model}]")
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise _fail(key, entries, "must be a list of agents, e.g. [{name: solver, model: /path/to/model}]")
    agents: list[AgentSpec] = []
    for index, entry in enumerate(entries):
        entry_key = f"{key}[{index}]"
        if shared is not None:
            _check_shared_agent(_mapping(entry, entry_key), entry_key, shared.model)
            if entry.get("adapter_path") is not None and check_paths:
                _check_adapter_dir(_string(entry["adapter_path"], f"{entry_key}.adapter_path"),
                                   f"{entry_key}.adapter_path", shared)
            entry = {**entry, "model": shared.model}
        elif isinstance(entry, Mapping) and entry.get("adapter_path") is not None:
            raise _fail(f"{entry_key}.adapter_path", entry["adapter_path"], "needs teamtr.shared_base (an agent with "
                                                                             "a model of its own trains all of it)")
        agents.append(_parse_agent(entry, entry_key, check_paths))
        names = [agent.name for agent in agents]
        if names.count(names[-1]) > 1:
            all_names = [entry.get("name") if isinstance(entry, Mapping) else None for entry in entries]
            raise _fail(
                f"{key}[{index}].name", names[-1], f"is a duplicate: agent names must be unique (got {all_names})"
            )
    return agents


def _parse_agent(entry: Any, key: str, check_paths: bool) -> AgentSpec:
    entry = _mapping(entry, key)
    _reject_unknown_keys(entry, AgentSpec, key)

    if "name" not in entry:
        raise TeamConfigError(f"{key}.name is missing: every agent needs a unique name")
    name = entry["name"]
    if not isinstance(name, str) or not _AGENT_NAME_RE.match(name):
        rule = f"use a letter then letters, digits, _ or - ({AGENT_NAME_PATTERN})"
        raise _fail(f"{key}.name", name, f"is not a valid agent name: {rule}")
    if name in RESERVED_AGENT_NAMES:
        reserved = ", ".join(RESERVED_AGENT_NAMES)
        raise _fail(f"{key}.name", name, f"is reserved: agent names may not be any of {reserved}")

    if "model" not in entry or entry["model"] is None:
        raise TeamConfigError(f"{key}.model is missing: every agent needs a local model directory")
    model = _string(entry["model"], f"{key}.model")
    if not model:
        raise _fail(f"{key}.model", model, "is empty: give a local model directory")
    if check_paths:
        _check_model_dir(model, f"{key}.model")

    role_prompt = entry.get("role_prompt")
    role_prompt = "" if role_prompt is None else _string(role_prompt, f"{key}.role_prompt")
    delta = entry.get("delta")
    beta_init = entry.get("beta_init")
    train = _flag(entry, "train", AgentSpec.train, key)
    if not train:  # keys that only an update reads would be silently ignored
        for unused in ("delta", "beta_init", "actor"):
            if entry.get(unused) not in (None, {}):
                raise _fail(f"{key}.{unused}", entry[unused], f"does nothing for a frozen agent ({key}.train=false): "
                                                                "remove it, or set train: true")
    return AgentSpec(
        name=name,
        model=model,
        role_prompt=role_prompt,
        delta=None if delta is None else _positive(delta, f"{key}.delta"),
        beta_init=None if beta_init is None else _positive(beta_init, f"{key}.beta_init"),
        n_devices=_integer(entry.get("n_devices", AgentSpec.n_devices), f"{key}.n_devices", minimum=1),
        # A deep copy: one agent's overrides must never alias another's (or the caller's) dict.
        actor=copy.deepcopy(_mapping(entry.get("actor"), f"{key}.actor", allow_none=True)),
        sampling=_parse_sampling(entry.get("sampling"), f"{key}.sampling", trained=train),
        chat_template=None if entry.get("chat_template") is None else _string(entry["chat_template"],
                                                                             f"{key}.chat_template"),
        chat_template_kwargs=copy.deepcopy(_mapping(entry.get("chat_template_kwargs"), f"{key}.chat_template_kwargs",
                                                    allow_none=True)),
        train=train,
        adapter_path=None if entry.get("adapter_path") is None else _string(entry["adapter_path"],
                                                                             f"{key}.adapter_path"),
    )


def _parse_sampling(entry: Any, key: str, *, trained: bool = True) -> SamplingSpec:
    entry = _mapping(entry, key, allow_none=True)
    _reject_unknown_keys(entry, SamplingSpec, key)
    common = _parse_sampling_common(entry, key, min_temperature_exclusive=trained)
    max_new = entry.get("max_new_tokens")
    stop = entry.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str) or not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise _fail(f"{key}.stop", stop, "must be a list of non-empty strings, e.g. ['\\n\\n']")
    val = _mapping(entry.get("val_kwargs"), f"{key}.val_kwargs", allow_none=True)
    _reject_unknown_keys(val, ValSamplingSpec, f"{key}.val_kwargs")
    return SamplingSpec(
        **common,
        max_new_tokens=None if max_new is None else _integer(max_new, f"{key}.max_new_tokens", minimum=1),
        stop=tuple(stop),
        val_kwargs=ValSamplingSpec(**_parse_sampling_common(val, f"{key}.val_kwargs", min_temperature_exclusive=False)),
    )


def _parse_sampling_common(entry: Mapping, key: str, *, min_temperature_exclusive: bool) -> dict:
    """temperature, top_p and top_k of a sampling block (None where absent), in vLLM's ranges. A trained agent's
    temperature must be > 0 (its actor divides the logits by it); validation and frozen agents may be greedy (0)."""
    out = {"temperature": entry.get("temperature"), "top_p": entry.get("top_p"), "top_k": entry.get("top_k")}
    if out["temperature"] is not None:
        check = _positive if min_temperature_exclusive else _non_negative
        out["temperature"] = check(out["temperature"], f"{key}.temperature")
    if out["top_p"] is not None:
        out["top_p"] = _positive(out["top_p"], f"{key}.top_p")
        if out["top_p"] > 1:
            raise _fail(f"{key}.top_p", out["top_p"], "must be in (0, 1]")
    if out["top_k"] is not None:
        top_k = _integer(out["top_k"], f"{key}.top_k")
        if top_k == 0 or top_k < -1:
            raise _fail(f"{key}.top_k", top_k, "must be -1 (no top-k) or >= 1")
    return out


def _check_model_dir(model: str, key: str) -> None:
    if not os.path.exists(model):
        raise _fail(key, model, "does not exist: give a local model directory holding config.json")
    if not os.path.isdir(model):
        raise _fail(key, model, "is not a directory: give a local model directory holding config.json")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise _fail(key, model, "holds no config.json: give a Hugging Face model directory")


def _parse_router(entry: Any, key: str, names: list[str]) -> RouterSpec:
    entry = _mapping(entry, key, allow_none=True)
    _reject_unknown_keys(entry, RouterSpec, key)

    kind = entry.get("kind", RouterSpec.kind)
    if kind not in ROUTER_KINDS:
        raise _fail(f"{key}.kind", kind, f"is not valid: choose one of {', '.join(ROUTER_KINDS)}")
    turns = entry.get("turns")
    seed = _integer(entry.get("seed", RouterSpec.seed), f"{key}.seed")
    sequence = entry.get("sequence")

    if kind in ("round_robin", "random"):
        if turns is None:
            raise TeamConfigError(f"{key}.turns is missing: {key}.kind={kind!r} needs the number of turns (>= 1)")
        turns = _integer(turns, f"{key}.turns", minimum=1)
    elif turns is not None:
        what = "the number of agents" if kind == "chain" else "the length of the sequence"
        raise _fail(f"{key}.turns", turns, f"must be null with {key}.kind={kind!r}: it always runs {what}")

    if kind == "sequence":
        sequence = _parse_sequence(sequence, f"{key}.sequence", names)
    elif sequence is not None:
        raise _fail(f"{key}.sequence", sequence, f"must be null unless {key}.kind='sequence' (it is {kind!r})")

    # An agent that never speaks has no tokens to train on: its update would be a silent no-op.
    if kind == "round_robin" and turns < len(names):
        raise _fail(
            f"{key}.turns",
            turns,
            f"gives no turn to {names[turns]!r}: round_robin needs turns >= {len(names)} (the number of agents)",
        )
    if kind == "sequence":
        for name in names:
            if name not in sequence:
                raise _fail(
                    f"{key}.sequence",
                    list(sequence),
                    f"never schedules {name!r}: every agent must speak at least once, or it has nothing to train on",
                )
    return RouterSpec(kind=kind, turns=turns, seed=seed, sequence=sequence)


def _parse_sequence(sequence: Any, key: str, names: list[str]) -> tuple[str, ...]:
    if sequence is None or isinstance(sequence, (str, Mapping)) or not isinstance(sequence, Sequence):
        raise _fail(key, sequence, "must be a list of agent names, e.g. [planner, solver, planner]")
    if len(sequence) == 0:
        raise _fail(key, sequence, "is empty: list the speakers of an episode, e.g. [planner, solver, planner]")
    for index, name in enumerate(sequence):
        if name not in names:
            raise _fail(f"{key}[{index}]", name, f"names no agent: agents are {names}")
    return tuple(sequence)


def _parse_handoff(entry: Any, key: str, names: list[str], router: RouterSpec) -> HandoffSpec:
    entry = _mapping(entry, key, allow_none=True)
    _reject_unknown_keys(entry, HandoffSpec, key)

    message_format = _string(entry.get("message_format", HandoffSpec.message_format), f"{key}.message_format")
    _check_message_format(message_format, f"{key}.message_format")
    header = entry.get("transcript_header", HandoffSpec.transcript_header)
    header = "" if header is None else _string(header, f"{key}.transcript_header")

    # chain, round_robin and sequence give every agent a turn (checked in _parse_router); random may not.
    answer = entry.get("answer", HandoffSpec.answer)
    if answer != ANSWER_LAST:
        if answer not in names:
            raise _fail(f"{key}.answer", answer, f"names no agent: use {ANSWER_LAST!r} or one of {names}")
        if router.kind == "random":
            raise _fail(
                f"{key}.answer",
                answer,
                f"cannot be used with a random router: an episode may give {answer!r} no turn; use {ANSWER_LAST!r}",
            )
    return HandoffSpec(message_format=message_format, transcript_header=header, answer=answer)


def _check_message_format(message_format: str, key: str) -> None:
    valid = ", ".join("{" + name + "}" for name in MESSAGE_FORMAT_FIELDS)
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(message_format) if name is not None]
    except ValueError as error:  # unbalanced braces
        why = f"is not a valid format string ({error}); write a literal brace as {{{{ or }}}}"
        raise _fail(key, message_format, why) from None
    for name in fields:
        if name not in MESSAGE_FORMAT_FIELDS:
            raise _fail(key, message_format, f"uses the unknown placeholder {{{name}}}: valid placeholders are {valid}")
    if "content" not in fields:
        raise _fail(key, message_format, "never shows {content}: earlier messages would be hidden from later speakers")
    try:  # a bad conversion or format spec, e.g. {turn:q}
        message_format.format(name="agent", content="text", turn=0)
    except (ValueError, TypeError) as error:
        raise _fail(key, message_format, f"cannot be formatted ({error}); valid placeholders are {valid}") from None
