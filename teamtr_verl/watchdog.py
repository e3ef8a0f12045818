"""Stop a team run, naming the agent, when one of an agent's Ray actors (FSDP worker, vLLM server) or one of verl's
agent-loop or reward-loop workers (shared by the team) dies.

Without it a dead vLLM server can leave the stage loop waiting for rollouts or a weight sync that never come. A daemon
thread in the trainer's process reads Ray's actor table (one GCS query, the same data as ``ray list actors``) every
few seconds; when an actor of an agent is gone it prints one line naming the agent and the actor, and ends the
trainer's process, which fails the driver's ``main_ppo`` instead of letting it hang.

The decision (:func:`dead_actors`) is pure and unit-tested on hand-made tables; only :class:`AgentWatch` talks to Ray.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Optional

POLL_S = 2.0
GRACE_S = 10.0  # after a stage's error: how long Ray may take to mark a killed actor DEAD (seen: up to a few seconds)
AGENT_LOOP = "the team's agent loop"  # verl's agent-loop workers run every agent's turns: no one agent owns them
REWARD_LOOP = "the team's reward loop"  # verl's reward-loop workers score every episode
SHARED_BASE = "the team's shared base model"  # teamtr.shared_base: one worker group trains every agent's adapter
SHARED_BASE_PREFIX = "teamtr__base_"  # its workers' names: no agent's prefix (teamtr_<agent>_, a name starts with a letter)
SHARED = {"agent_loop_worker_": AGENT_LOOP, "reward_loop_worker_": REWARD_LOOP,
          SHARED_BASE_PREFIX: SHARED_BASE}  # actor name prefix -> label


def agent_actor_names(table: Iterable[Mapping], job_id: str, agent_names: Iterable[str],
                      server_names: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Per agent, the names of its live actors in job ``job_id``: its worker group (``teamtr_<agent>_...``, see
    :func:`teamtr_verl.topology.build_team_stacks`) and its vLLM servers."""
    live = sorted({row["Name"] for row in table if row["JobID"] == job_id and row["State"] == "ALIVE" and row["Name"]})
    agents = list(agent_names)
    out = {agent: [] for agent in agents}
    for name in live:  # the longest matching prefix owns a worker: agents "a" and "a_b" do not share "teamtr_a_b_..."
        owners = [agent for agent in agents if name.startswith(f"teamtr_{agent}_")]
        if owners:
            out[max(owners, key=len)].append(name)
    for agent in agents:
        out[agent] += [name for name in server_names.get(agent, []) if name in live]
    return out


def shared_worker_names(table: Iterable[Mapping], job_id: str) -> dict[str, list[str]]:
    """Per label of :data:`SHARED`, the names of verl's workers that serve the whole team in job ``job_id``, whatever
    their state: some may still be starting, and one that died before ``fit`` is reported at the first poll."""
    names = sorted(row["Name"] for row in table if row["JobID"] == job_id and row["Name"])
    groups = {label: [name for name in names if name.startswith(prefix)] for prefix, label in SHARED.items()}
    return {label: group for label, group in groups.items() if group}  # (only a shared-base team has the base's)


def dead_actors(table: Iterable[Mapping], job_id: str, actors_of: Mapping[str, list[str]]) -> list[tuple[str, str, str]]:
    """(agent, actor name, why) for every watched actor with no live entry in job ``job_id``'s part of the table."""
    rows = [row for row in table if row["JobID"] == job_id]
    alive = {row["Name"] for row in rows if row["State"] != "DEAD"}  # RESTARTING or PENDING still counts as there
    why = {row["Name"]: _death_cause(row) for row in rows if row["State"] == "DEAD"}
    return [(agent, name, why.get(name, "no longer in Ray's actor table"))
            for agent, names in actors_of.items() for name in names if name not in alive]


def describe(dead: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{_owner(agent)}: its actor {name} died ({why})" for agent, name, why in dead)


def _owner(agent: str, quote: bool = True) -> str:
    return agent if agent in SHARED.values() else f"agent {agent!r}" if quote else f"agent {agent}"


def _death_cause(row: Mapping) -> str:
    cause = str(row.get("DeathCause") or "").strip().replace("\n", " ")
    return (cause[:200] + "...") if len(cause) > 200 else (cause or "dead")


class AgentWatch:
    """The agents' actors in this Ray job, and a thread that stops the process when one dies."""

    def __init__(self, actors_of: dict[str, list[str]], job_id: str, pids: Optional[dict[str, int]] = None):
        self.actors_of, self.job_id, self.pids = actors_of, job_id, pids or {}
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()

    @staticmethod
    def _table() -> list[dict]:
        from ray._private import state  # DeveloperAPI (ray 2.x): the GCS actor table, no dashboard needed

        return list(state.actors().values())

    @classmethod
    def of_team(cls, agent_names: Iterable[str], server_names: Mapping[str, list[str]]) -> "AgentWatch":
        import ray

        job_id = ray.get_runtime_context().get_job_id()
        table = cls._table()
        pids = {row["Name"]: row["Pid"] for row in table if row["JobID"] == job_id and row["State"] == "ALIVE"}
        actors_of = agent_actor_names(table, job_id, agent_names, server_names)
        return cls(actors_of, job_id, {name: pids[name] for names in actors_of.values() for name in names})

    def watch_shared_workers(self) -> None:
        """Watch verl's agent-loop and reward-loop workers too (the agent loop exists only once ``fit`` is called):
        a dead one would leave a rollout waiting, or fail every episode without a name."""
        table = self._table()
        shared = shared_worker_names(table, self.job_id)
        names = {name for group in shared.values() for name in group}
        self.pids.update({row["Name"]: row["Pid"] for row in table if row["JobID"] == self.job_id and row["Name"] in names})
        self.actors_of = {**self.actors_of, **shared}  # one assignment: the thread reads whole dicts

    def hand_over(self, agent: str, incoming: str) -> list[str]:
        """A committed swap: ``incoming``'s actors are ``agent``'s from now on, and ``agent``'s old ones are no longer
        watched (the caller is about to end them). Returns the old ones' names."""
        old = self.actors_of.get(agent, [])
        actors = {owner: names for owner, names in self.actors_of.items() if owner != incoming}
        actors[agent] = self.actors_of.get(incoming, [])
        self.actors_of = actors  # one assignment: the thread reads whole dicts
        return old

    def stop(self) -> None:
        """No more polls (after ``fit``: Ray's shutdown ends every actor, which is no death to report)."""
        self._stopped.set()

    def dead(self) -> list[tuple[str, str, str]]:
        # the table first: one read after a hand_over's kill is matched against the handed-over actors
        table = self._table()
        return dead_actors(table, self.job_id, self.actors_of)

    def dead_within(self, grace_s: float = GRACE_S, poll_s: float = 0.5) -> list[tuple[str, str, str]]:
        """:meth:`dead`, asked again until it names an actor or ``grace_s`` has passed: an error in a stage can reach
        the trainer (a rollout whose server is gone) before Ray's table says the server died."""
        deadline = time.monotonic() + grace_s
        while True:
            try:
                dead = self.dead()
            except Exception:  # a GCS hiccup is not a death
                dead = []
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(poll_s)

    def summary(self) -> list[str]:
        """One line per agent: its actors and their process ids (what an operator, or a drill, kills)."""
        return [f"teamtr: {_owner(agent, quote=False)}: "
                + ", ".join(f"{name} (pid {self.pids.get(name) or '?'})" for name in names)
                for agent, names in self.actors_of.items()]

    def start(self, poll_s: float = POLL_S, on_death: Optional[Callable[[str], None]] = None) -> None:
        def watch():
            while not self._stopped.wait(poll_s):
                try:
                    dead = self.dead()
                except Exception:  # a GCS hiccup is not a death; the next poll asks again
                    continue
                if dead and not self._stopped.is_set():
                    (on_death or _stop_process)(f"teamtr: stopping the run: {describe(dead)}")
                    return

        self._thread = threading.Thread(target=watch, name="teamtr-agent-watch", daemon=True)
        self._thread.start()


def _stop_process(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    time.sleep(2.0)  # let Ray's log monitor forward the line to the driver's console
    os._exit(1)
