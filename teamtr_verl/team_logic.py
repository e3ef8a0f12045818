"""The pure logic of one team episode: who speaks, what each speaker sees, which message is scored.

An episode: the router fixes the speakers of every turn (:func:`router_schedule`); at each turn the speaker's input is
its role prompt + its own view of the task (:func:`agent_view`) + the transcript so far (:func:`build_agent_messages`);
its reply is appended to the transcript as a :class:`Message`; at the end one message is the answer the verifier
scores (:func:`answer_turn`).

Decisions (tested in tests/test_team_logic.py):
  * **Views are private.** A dataset row may carry ``extra_info["agent_views"] = {agent_name: text}``. An agent with a
    view sees exactly one user message holding its view text, and neither the shared prompt nor any other agent's
    view; an agent without one sees the row's shared prompt. Everything an agent learns from another agent comes
    through the transcript.
  * **One system message.** The agent's role prompt comes first, then the dataset's own system text (all system
    messages of the shared prompt, in order) after a blank line. Empty parts are left out; no parts, no system message.
  * **A row may hide the transcript.** ``extra_info["show_transcript"] = False`` (default: absent or None = shown)
    gives every speaker of that row only its own view, never an earlier message: the agents of a simultaneous-move
    game (e.g. the budget task of :mod:`teamtr_verl.fixtures.budget`) act in turn but cannot see each other.
    :func:`agent_view` carries the flag on the list it returns (:class:`TaskMessages`) and
    :func:`build_agent_messages` honours it; a caller that copies the view into a plain list loses the flag, so pass
    ``show_transcript=transcript_visible(extra_info)`` to :func:`build_agent_messages` instead.
  * **The transcript is user text.** Earlier messages, the speaker's own included, are rendered with
    ``handoff.message_format`` under ``handoff.transcript_header``; they are never replayed as assistant turns, so each
    turn is one fresh prompt + one response. The block is appended to the last task message after a blank line when
    that message is a user message (many chat templates reject two user messages in a row); otherwise it becomes a new
    user message.
  * **Turns are 0-based**, in :class:`Message`, in the ``{turn}`` placeholder and in :func:`answer_turn`.
  * **Random schedules are reproducible**: each turn's speaker comes from SHA-256 of (seed, episode key, turn), never
    from Python's salted ``hash()`` or a process-wide RNG, so any process draws the same schedule for the same episode.

No verl, Ray, vLLM or torch import: only the standard library and the dataclasses of :mod:`teamtr_verl.config`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from teamtr_verl.config import ANSWER_LAST, AgentSpec, HandoffSpec, RouterSpec, SamplingSpec
from teamtr_verl.defaults import AGENT_VIEWS_KEY

__all__ = [
    "AGENT_VIEWS_KEY",
    "Message",
    "episode_key",
    "router_schedule",
    "answer_turn",
    "agent_views_of",
    "check_agent_views",
    "agent_view",
    "SHOW_TRANSCRIPT_KEY",
    "TaskMessages",
    "transcript_visible",
    "format_transcript",
    "build_agent_messages",
]

# The key of a row's extra_info that, set to False, hides the transcript from every speaker of that row.
SHOW_TRANSCRIPT_KEY = "show_transcript"


@dataclass(frozen=True)
class Message:
    """One message of the transcript: what ``speaker`` said at (0-based) ``turn``."""

    speaker: str
    turn: int
    content: str


def episode_key(uid: str, session_id: Any) -> str:
    """The key that seeds a random schedule: one per (prompt uid, rollout session)."""
    return f"{uid}/{session_id}"


# ------------------------------------------------------------------------------------------------ router


def router_schedule(router: RouterSpec, agent_names: Sequence[str], episode_key: str) -> list[str]:
    """The speaker of every turn of one episode, in order.

    chain: each agent once, in list order. round_robin: ``router.turns`` turns cycling the list. random:
    ``router.turns`` speakers drawn uniformly and independently, a pure function of (``router.seed``, ``episode_key``,
    turn). sequence: ``router.sequence`` as given.
    """
    names = list(agent_names)
    if not names:
        raise ValueError("agent_names is empty: a team needs at least one agent")
    if router.kind == "chain":
        return names
    if router.kind == "sequence":
        if not router.sequence:
            raise ValueError(f"router.sequence={router.sequence!r} is empty: the sequence router needs agent names")
        for name in router.sequence:
            if name not in names:
                raise ValueError(f"router.sequence names {name!r}, which is no agent: agents are {names}")
        return list(router.sequence)
    if router.kind in ("round_robin", "random"):
        if not isinstance(router.turns, int) or router.turns < 1:
            raise ValueError(f"router.turns={router.turns!r} must be an integer >= 1 for kind {router.kind!r}")
        if router.kind == "round_robin":
            return [names[turn % len(names)] for turn in range(router.turns)]
        return [names[_stable_index(router.seed, episode_key, turn, len(names))] for turn in range(router.turns)]
    raise ValueError(f"router.kind={router.kind!r} is not valid: choose one of chain, round_robin, random, sequence")


def _stable_index(seed: int, key: str, turn: int, n: int) -> int:
    # 256 hash bits reduced mod n: the bias is below 2**-250, i.e. uniform for any team size.
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{turn}".encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % n


def answer_turn(schedule: Sequence[str], handoff: HandoffSpec) -> int:
    """Index of the turn whose message the verifier scores: the last turn, or the named agent's last turn."""
    if not schedule:
        raise ValueError("schedule is empty: an episode with no turn has no answer")
    if handoff.answer == ANSWER_LAST:
        return len(schedule) - 1
    for turn in range(len(schedule) - 1, -1, -1):
        if schedule[turn] == handoff.answer:
            return turn
    raise ValueError(f"handoff.answer={handoff.answer!r} never speaks in this episode's schedule {list(schedule)}")


def reusable_turns(schedule: Sequence[str], changed: Iterable[str]) -> int:
    """How many leading turns of an episode a regeneration may take from the previous rollout of the same episode:
    those before the first turn of an agent updated since (the earlier speakers and everything they saw are
    unchanged, so those turns have exactly the distribution they had). All of them when no speaker changed."""
    changed = set(changed)
    return next((turn for turn, speaker in enumerate(schedule) if speaker in changed), len(schedule))


def prefix_reuse_is_exact(router: RouterSpec) -> bool:
    """Whether an episode's schedule is the same in every regeneration: not for the random router, whose schedule is
    drawn from the episode's uid, fresh in each regeneration."""
    return router.kind != "random"


# ------------------------------------------------------------------------------------------------ views


def agent_views_of(row_extra_info: Optional[Mapping]) -> dict[str, str]:
    """The row's ``{agent_name: view text}``, without the agents that have no view.

    A parquet dict column becomes a struct whose keys are the union over all rows, so an agent with no view in this
    row shows up with the value None; it is dropped here.
    """
    if not row_extra_info:
        return {}
    views = row_extra_info.get(AGENT_VIEWS_KEY)
    if views is None:
        return {}
    if not isinstance(views, Mapping):
        raise TypeError(f"extra_info[{AGENT_VIEWS_KEY!r}] must map agent names to text, got {views!r}")
    present = {}
    for name, text in views.items():
        if text is None:
            continue
        if not isinstance(text, str):
            raise TypeError(f"extra_info[{AGENT_VIEWS_KEY!r}][{name!r}] must be a string, got {text!r}")
        present[name] = text
    return present


def check_agent_views(row_extra_info: Optional[Mapping], agent_names: Sequence[str]) -> None:
    """Raise if the row has a view for a name that is no agent.

    A misspelt view name would otherwise go unnoticed: that agent would silently see the shared prompt instead.
    """
    views = (row_extra_info or {}).get(AGENT_VIEWS_KEY) or {}
    unknown = [name for name in views if name not in agent_names]
    if unknown:
        raise ValueError(
            f"extra_info[{AGENT_VIEWS_KEY!r}] has views for {unknown}, which are no agents: "
            f"agents are {list(agent_names)}"
        )


class TaskMessages(list):
    """The chat messages of :func:`agent_view` (a plain list of dicts to any reader) plus the row's
    ``show_transcript`` flag, which :func:`build_agent_messages` reads when it is not told otherwise."""

    def __init__(self, messages=(), show_transcript: bool = True):
        super().__init__(messages)
        self.show_transcript = show_transcript


def transcript_visible(row_extra_info: Optional[Mapping]) -> bool:
    """Whether the speakers of this row see the transcript: ``extra_info["show_transcript"]``, True when absent or
    None (a parquet struct gives None to rows without the key)."""
    value = (row_extra_info or {}).get(SHOW_TRANSCRIPT_KEY)
    if value is None:
        return True
    if not isinstance(value, bool) and hasattr(value, "item"):
        value = value.item()  # a numpy bool from parquet
    if not isinstance(value, bool):
        raise TypeError(f"extra_info[{SHOW_TRANSCRIPT_KEY!r}] must be true or false, got {value!r}")
    return value


def agent_view(
    row_extra_info: Optional[Mapping], raw_prompt_messages: Sequence[Mapping], agent_name: str
) -> TaskMessages:
    """The chat messages that present the task to ``agent_name``.

    With a view: one user message holding exactly the view text (the shared prompt, including its system message, is
    not shown: a view is the agent's whole picture of the task). Without: a copy of the row's shared prompt, system
    messages included; :func:`build_agent_messages` merges those with the role prompt. The result carries the row's
    :func:`transcript_visible` flag.
    """
    visible = transcript_visible(row_extra_info)
    views = agent_views_of(row_extra_info)
    if agent_name in views:
        return TaskMessages([{"role": "user", "content": views[agent_name]}], show_transcript=visible)
    # Copies: the caller may edit the result without touching the dataset row (parquet may hand us numpy arrays).
    return TaskMessages([dict(message) for message in list(raw_prompt_messages)], show_transcript=visible)


# ------------------------------------------------------------------------------------------------ messages


def format_transcript(transcript: Sequence[Message], handoff: HandoffSpec) -> str:
    """The header line, then one line per earlier message in ``handoff.message_format``; "" for no messages."""
    if not transcript:
        return ""
    lines = [handoff.message_format.format(name=m.speaker, content=m.content, turn=m.turn) for m in transcript]
    if handoff.transcript_header:
        lines.insert(0, handoff.transcript_header)
    return "\n".join(lines)


def build_agent_messages(
    agent: AgentSpec,
    task_messages: Sequence[Mapping],
    transcript: Sequence[Message],
    handoff: HandoffSpec,
    show_transcript: Optional[bool] = None,
) -> list[dict]:
    """The chat messages of ``agent``'s next turn: system, task, then the transcript (see the module docstring).

    ``show_transcript=False`` leaves the transcript out; None (the default) takes the flag of ``task_messages`` when
    it is a :class:`TaskMessages` from :func:`agent_view`, else shows it.
    """
    if show_transcript is None:
        show_transcript = getattr(task_messages, "show_transcript", True)
    system_parts = [agent.role_prompt] if agent.role_prompt else []
    conversation = []
    for message in task_messages:
        if message["role"] == "system":
            if message["content"]:
                system_parts.append(_text(message, "a system message"))
        else:
            conversation.append(dict(message))

    messages = [{"role": "system", "content": "\n\n".join(system_parts)}] if system_parts else []
    messages.extend(conversation)

    transcript_text = format_transcript(transcript, handoff) if show_transcript else ""
    if transcript_text:
        if messages and messages[-1]["role"] == "user":
            last = messages[-1]
            task_text = _text(last, "the last user message")
            last["content"] = f"{task_text}\n\n{transcript_text}" if task_text else transcript_text
        else:
            messages.append({"role": "user", "content": transcript_text})
    return messages


def _text(message: Mapping, what: str) -> str:
    content = message["content"]
    if not isinstance(content, str):
        raise TypeError(f"{what} has non-text content {content!r}: team handoff supports text messages only")
    return content


_SEED_MODULUS = 2**31 - 1  # vLLM takes any int seed; keep it in int32 range for every backend


def render_prompt(tokenizer, agent: AgentSpec, chat: list[dict], data_config) -> list[int]:
    """An agent's prompt token ids: its chat template (its own, or ``agent.chat_template``) on ``chat`` with the
    generation prompt, under verl's ``data.apply_chat_template_kwargs`` overridden by the agent's own."""
    kwargs = {**dict(data_config.get("apply_chat_template_kwargs") or {}), **agent.chat_template_kwargs}
    template = kwargs.pop("chat_template", None)
    if agent.chat_template is not None:  # the agent's own template wins over one given as a keyword
        template = agent.chat_template
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              chat_template=template, **kwargs))


def turn_sampling_params(params: Mapping[str, Any], spec: SamplingSpec, *, validate: bool,
                         seed: Optional[int] = None) -> dict[str, Any]:
    """The vLLM sampling params of one turn: the loop's ``params`` (verl's rollout or val_kwargs values) with the
    speaker's own values over them (``val_kwargs`` ones when ``validate``), its token cap and stop strings, and the
    turn's CRN ``seed`` if any. ``params`` is not modified."""
    out = dict(params)
    chosen = spec.val_kwargs if validate else spec
    for key in ("temperature", "top_p", "top_k"):
        if getattr(chosen, key) is not None:
            out[key] = getattr(chosen, key)
    if spec.max_new_tokens is not None:
        out["max_tokens"] = spec.max_new_tokens
    if spec.stop:
        out["stop"] = list(spec.stop)
    if seed is not None:
        out["seed"] = seed
    return out


def prompt_seeds(stage: int, num_prompts: int, base: int = 0) -> list[int]:
    """The per-prompt seed bases of a stage: fixed for the stage (so its regenerations share random numbers),
    different across stages and prompts."""
    return [_mix(base, stage, index) for index in range(num_prompts)]


def turn_seed(prompt_seed: int, session: int, turn: int) -> int:
    """The sampling seed of one turn of one episode (prompt, session): the same in every regeneration of a stage,
    so two regenerations differ only through the agents that changed (common random numbers)."""
    return _mix(prompt_seed, session, turn)


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _SEED_MODULUS


def heldout_prompts(num_prompts: int, fraction: float, stage: int, seed: int = 0) -> frozenset[int]:
    """The prompt indices of a stage kept out of every gradient, to measure each update on (the certificate).

    round(fraction·P) prompts, at least 1 when fraction > 0 and at most P − 1; drawn per stage from a seeded RNG, so
    a resumed run holds out the same prompts."""
    if fraction <= 0 or num_prompts < 2:
        return frozenset()
    count = min(max(round(fraction * num_prompts), 1), num_prompts - 1)
    rng = random.Random(_mix(seed, stage, num_prompts))
    return frozenset(rng.sample(range(num_prompts), count))


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give every text the same ids and end a message alike (a Stage 0 between them can
    distil token by token; otherwise it works on re-tokenized texts)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
