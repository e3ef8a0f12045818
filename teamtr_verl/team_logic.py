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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from teamtr_verl.config import ANSWER_LAST, AgentSpec, HandoffSpec, RouterSpec

__all__ = [
    "AGENT_VIEWS_KEY",
    "Message",
    "episode_key",
    "router_schedule",
    "answer_turn",
    "agent_views_of",
    "check_agent_views",
    "agent_view",
    "format_transcript",
    "build_agent_messages",
]

# The key of a row's extra_info that holds the per-agent views.
AGENT_VIEWS_KEY = "agent_views"


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


def agent_view(
    row_extra_info: Optional[Mapping], raw_prompt_messages: Sequence[Mapping], agent_name: str
) -> list[dict]:
    """The chat messages that present the task to ``agent_name``.

    With a view: one user message holding exactly the view text (the shared prompt, including its system message, is
    not shown: a view is the agent's whole picture of the task). Without: a copy of the row's shared prompt, system
    messages included; :func:`build_agent_messages` merges those with the role prompt.
    """
    views = agent_views_of(row_extra_info)
    if agent_name in views:
        return [{"role": "user", "content": views[agent_name]}]
    # Copies: the caller may edit the result without touching the dataset row (parquet may hand us numpy arrays).
    return [dict(message) for message in list(raw_prompt_messages)]


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
    agent: AgentSpec, task_messages: Sequence[Mapping], transcript: Sequence[Message], handoff: HandoffSpec
) -> list[dict]:
    """The chat messages of ``agent``'s next turn: system, task, then the transcript (see the module docstring)."""
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

    transcript_text = format_transcript(transcript, handoff)
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
