"""The agent watch's decision (teamtr_verl.watchdog) on hand-made rows of Ray's actor table."""

from teamtr_verl.watchdog import (
    AGENT_LOOP,
    REWARD_LOOP,
    SHARED_BASE,
    AgentWatch,
    agent_actor_names,
    dead_actors,
    describe,
    shared_worker_names,
)

JOB, OTHER = "02000000", "01000000"


def row(name, state="ALIVE", job=JOB, pid=1, cause=""):
    return {"Name": name, "State": state, "JobID": job, "Pid": pid, "DeathCause": cause}


TABLE = [
    row("teamtr_alice_WorkerDict_0:0", pid=11), row("vllm_server_0_0", pid=12),
    row("teamtr_bob_WorkerDict_1:0", pid=21), row("vllm_server_1_0", pid=22),
    row("TaskRunnerV1", pid=5), row("", pid=6),  # not an agent's; unnamed
    row("vllm_server_1_0", state="DEAD", job=OTHER),  # a finished earlier job on the same cluster (two-node test)
]
SERVERS = {"alice": ["vllm_server_0_0"], "bob": ["vllm_server_1_0"]}


def test_each_agents_actors_are_its_worker_group_and_its_servers():
    assert agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS) == {
        "alice": ["teamtr_alice_WorkerDict_0:0", "vllm_server_0_0"],
        "bob": ["teamtr_bob_WorkerDict_1:0", "vllm_server_1_0"]}
    # agent names that prefix each other: each worker group goes to its own agent
    table = [row("teamtr_a_WorkerDict_0:0"), row("teamtr_a_b_WorkerDict_1:0")]
    assert agent_actor_names(table, JOB, ["a", "a_b"], {}) == {"a": ["teamtr_a_WorkerDict_0:0"],
                                                                "a_b": ["teamtr_a_b_WorkerDict_1:0"]}


def test_nothing_is_dead_on_a_healthy_table_even_with_an_earlier_jobs_dead_actor():
    actors_of = agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS)
    assert dead_actors(TABLE, JOB, actors_of) == []


def test_a_killed_server_is_reported_with_its_agent_and_cause():
    actors_of = agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS)
    killed = [r if r["Name"] != "vllm_server_0_0" else row("vllm_server_0_0", "DEAD", cause="SIGKILL\nworker died")
              for r in TABLE]
    dead = dead_actors(killed, JOB, actors_of)
    assert dead == [("alice", "vllm_server_0_0", "SIGKILL worker died")]
    assert describe(dead) == "agent 'alice': its actor vllm_server_0_0 died (SIGKILL worker died)"
    # restarting is not dead; gone from the table is
    restarting = [r if r["Name"] != "teamtr_bob_WorkerDict_1:0" else row(r["Name"], "RESTARTING") for r in TABLE]
    assert dead_actors(restarting, JOB, actors_of) == []
    gone = [r for r in TABLE if r["Name"] != "teamtr_bob_WorkerDict_1:0"]
    assert dead_actors(gone, JOB, actors_of) == [("bob", "teamtr_bob_WorkerDict_1:0", "no longer in Ray's actor table")]


def test_the_watch_thread_reports_a_death_once(monkeypatch):
    tables = [TABLE, [r for r in TABLE if r["Name"] != "vllm_server_1_0"]]
    watch = AgentWatch(agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS), JOB)
    monkeypatch.setattr(AgentWatch, "_table", staticmethod(lambda: tables.pop(0) if len(tables) > 1 else tables[0]))
    reports = []
    watch.start(poll_s=0.01, on_death=reports.append)
    watch._thread.join(timeout=5)
    assert reports == ["teamtr: stopping the run: agent 'bob': its actor vllm_server_1_0 died "
                       "(no longer in Ray's actor table)"]


def test_the_teams_agent_loop_and_reward_loop_workers_are_watched_once_fit_starts(monkeypatch):
    shared = [row("agent_loop_worker_0_ab12cd34", pid=31), row("agent_loop_worker_1_ef56", "PENDING_CREATION", pid=0),
              row("reward_loop_worker_0", pid=41), row("agent_loop_worker_0_0000", "DEAD", job=OTHER)]
    table = TABLE + shared
    # starting (pending) workers count: they are created just before fit; another job's worker does not
    assert shared_worker_names(table, JOB) == {AGENT_LOOP: ["agent_loop_worker_0_ab12cd34", "agent_loop_worker_1_ef56"],
                                               REWARD_LOOP: ["reward_loop_worker_0"]}
    watch = AgentWatch(agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS), JOB)
    monkeypatch.setattr(AgentWatch, "_table", staticmethod(lambda: table))
    watch.watch_shared_workers()
    assert watch.summary()[2:] == [
        "teamtr: the team's agent loop: agent_loop_worker_0_ab12cd34 (pid 31), agent_loop_worker_1_ef56 (pid ?)",
        "teamtr: the team's reward loop: reward_loop_worker_0 (pid 41)"]
    killed = [r for r in table if r["Name"] != "agent_loop_worker_1_ef56"]
    dead = dead_actors(killed, JOB, watch.actors_of)
    assert dead == [(AGENT_LOOP, "agent_loop_worker_1_ef56", "no longer in Ray's actor table")]
    assert describe(dead) == ("the team's agent loop: its actor agent_loop_worker_1_ef56 died "
                              "(no longer in Ray's actor table)")
    # a shared-base team's one worker group serves every agent: watched as the team's, under no agent's name
    base = [row("teamtr__base_WorkerDict_0:0", pid=51)]
    assert agent_actor_names(TABLE + base, JOB, ["alice", "bob"], SERVERS) == agent_actor_names(TABLE, JOB,
                                                                                               ["alice", "bob"], SERVERS)
    assert shared_worker_names(TABLE + base, JOB) == {SHARED_BASE: ["teamtr__base_WorkerDict_0:0"]}
    # one that died before fit is watched too: the first poll reports it
    crashed = TABLE + [row("reward_loop_worker_0", "DEAD", cause="constructor raised")]
    assert shared_worker_names(crashed, JOB)[REWARD_LOOP] == ["reward_loop_worker_0"]
    assert dead_actors(crashed, JOB, {REWARD_LOOP: ["reward_loop_worker_0"]}) == [
        (REWARD_LOOP, "reward_loop_worker_0", "constructor raised")]


def test_a_stopped_watch_reports_nothing(monkeypatch):
    watch = AgentWatch(agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS), JOB)
    monkeypatch.setattr(AgentWatch, "_table", staticmethod(lambda: []))  # Ray shutting down: every actor gone
    reports = []
    watch.stop()
    watch.start(poll_s=0.01, on_death=reports.append)
    watch._thread.join(timeout=5)
    assert not watch._thread.is_alive() and reports == []


def test_a_committed_swap_hands_the_agents_name_to_the_newcomers_actors(monkeypatch):
    """During Stage 0 the incoming model's actors are watched as "bob-incoming"; after the swap they are bob's, and the
    incumbent's (about to be ended) are watched no more: their death is no reason to stop the run."""
    table = TABLE + [row("teamtr_bob-incoming_WorkerDict_2:0", pid=31), row("vllm_server_2_0", pid=32)]
    servers = {**SERVERS, "bob-incoming": ["vllm_server_2_0"]}
    watch = AgentWatch(agent_actor_names(table, JOB, ["alice", "bob", "bob-incoming"], servers), JOB)
    old = watch.hand_over("bob", "bob-incoming")
    assert old == ["teamtr_bob_WorkerDict_1:0", "vllm_server_1_0"]
    assert watch.actors_of == {"alice": ["teamtr_alice_WorkerDict_0:0", "vllm_server_0_0"],
                               "bob": ["teamtr_bob-incoming_WorkerDict_2:0", "vllm_server_2_0"]}
    released = [r for r in table if r["Name"] not in old]
    assert dead_actors(released, JOB, watch.actors_of) == []
    newcomer_died = [r for r in released if r["Name"] != "vllm_server_2_0"]
    assert describe(dead_actors(newcomer_died, JOB, watch.actors_of)) == (
        "agent 'bob': its actor vllm_server_2_0 died (no longer in Ray's actor table)")


def test_after_a_stages_error_the_watch_asks_again_until_ray_marks_the_killed_server_dead(monkeypatch):
    """A rollout fails the moment bob's server is killed; Ray's table says so only a little later: the third read."""
    watch = AgentWatch(agent_actor_names(TABLE, JOB, ["alice", "bob"], SERVERS), JOB)
    killed = [r if r["Name"] != "vllm_server_1_0" else row("vllm_server_1_0", "DEAD", cause="SIGKILL") for r in TABLE]
    reads = iter([TABLE, TABLE, killed])
    monkeypatch.setattr(AgentWatch, "_table", staticmethod(lambda: next(reads)))
    assert watch.dead_within(grace_s=5, poll_s=0) == [("bob", "vllm_server_1_0", "SIGKILL")]
    # nobody died: the grace ends with nothing to report (the stage's own error is then raised as it was)
    monkeypatch.setattr(AgentWatch, "_table", staticmethod(lambda: TABLE))
    assert watch.dead_within(grace_s=0.05, poll_s=0.01) == []
