"""The team's rollout side inside verl: a routing LLM client, the ``teamtr_handoff`` agent loop, and the agent-loop
worker/manager that score a team episode with verl's own configured reward.

Pure episode logic (routers, views, transcripts) lives in :mod:`teamtr_verl.team_logic`; this module wires it to
verl's agent-loop machinery. One episode = one ``run`` call = one team trajectory; it returns one
``AgentLoopOutput`` per turn, each carrying its speaker's name and turn index in ``extra_fields``, with the answer
turn placed last (verl scores the last output of a trajectory and copies the reward to the others).
"""

from __future__ import annotations

import json
import logging
import math
import os
from functools import lru_cache
from typing import Any
from uuid import uuid4

import ray
from omegaconf import DictConfig
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ
from verl.utils.profiler import simple_timer
from verl.workers.rollout.llm_server import LLMServerClient

from teamtr_verl.config import TeamConfig
from teamtr_verl.defaults import (
    AGENT_FIELD,
    AGENT_LOOP_NAME,
    MODEL_FIELD,
    PREFIX_FIELD,
    PROBE_FIELD,
    REUSED_FIELD,
    TURN_FIELD,
)
from teamtr_verl.team_logic import (
    Message,
    agent_view,
    answer_turn,
    build_agent_messages,
    check_agent_views,
    episode_key,
    render_prompt,
    router_schedule,
    transcript_visible,
    turn_sampling_params,
    turn_seed,
)

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

# Keys this module writes into each AgentLoopOutput.extra_fields (they reach the trainer through TransferQueue).
ANSWER_FIELD, TRANSCRIPT_FIELD = "teamtr_answer", "teamtr_transcript"
# sampling kwarg the routing client pops to choose the server set
ROUTE_KWARG = "teamtr_agent"
# dataset-row field the trainer sets per prompt: the base of the episode's per-turn sampling seeds (common random
# numbers: every regeneration of a stage samples each (prompt, sample, turn) with the same seed)
SEED_FIELD = "teamtr_seed"
# run() kwarg the team's agent-loop worker adds: verl tells the loop only its sampling params, not whether it validates
VALIDATE_KWARG = "teamtr_validate"


class TeamRewardError(RuntimeError):
    """The configured reward raised or returned a non-finite value for one team trajectory.

    Raised inside the episode so that verl's own failure path drops exactly that trajectory (its prompt group is
    marked ``failure``; the other sessions stay) and logs this message with the uid, session and transcript.
    """


class TeamLLMClient(LLMServerClient):
    """Routes each ``generate`` call to the server set of the agent named by the ``teamtr_agent`` kwarg.

    Each per-agent client has its own load balancer, which knows only that agent's vLLM servers. Without the kwarg
    the call goes to ``default_agent`` so that stock single-agent loops (e.g. a validation-only run) still work.
    """

    def __init__(self, config: DictConfig, agent_clients: dict[str, LLMServerClient], default_agent: str):
        super().__init__(config, load_balancer_handle=None)
        if default_agent not in agent_clients:
            raise ValueError(f"default_agent={default_agent!r} is not one of {sorted(agent_clients)}")
        self.agent_clients = dict(agent_clients)
        self.default_agent = default_agent

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        agent = kwargs.pop(ROUTE_KWARG, None) or self.default_agent
        client = self.agent_clients.get(agent)
        if client is None:
            raise KeyError(f"no LLM server set for agent {agent!r}; the team has {sorted(self.agent_clients)}")
        return await client.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params, **kwargs)


# config object id -> (the config, its team). The config is kept alive so its id cannot be reused; an agent-loop
# worker holds one trainer config for its lifetime, so this parses once instead of once per episode.
_TEAMS: dict[int, tuple[DictConfig, TeamConfig]] = {}


def team_of(config: DictConfig) -> TeamConfig:
    """The validated TeamConfig of a whole trainer config (parsed once per config object and process)."""
    cached = _TEAMS.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    if config.get("teamtr") is None:
        raise ValueError("the config has no `teamtr` block: the teamtr_handoff agent loop needs a team")
    # Paths were checked in the driver; agent-loop workers may run where the check would only cost time.
    team = TeamConfig.from_config(config.teamtr, check_paths=False)
    _TEAMS[id(config)] = (config, team)
    return team


@lru_cache(maxsize=None)
def agent_tokenizer(model_path: str):
    """Each agent's own tokenizer, loaded once per process: heterogeneous teams need not share a vocabulary."""
    from verl.utils import hf_tokenizer

    return hf_tokenizer(model_path, trust_remote_code=False)


def episode_prefix(prefix_json: Any, session: int) -> list[tuple[list[int], list[int], Any, dict]]:
    """The reused turns of one session from a row's ``PREFIX_FIELD`` (empty when there is none)."""
    if not prefix_json:
        return []
    turns = json.loads(prefix_json).get(str(session), [])
    return [(list(p), list(r), None if lp is None else list(lp), dict(fields or {})) for p, r, lp, fields in turns]


@register(AGENT_LOOP_NAME)
class TeamHandoffAgentLoop(AgentLoopBase):
    """One team episode: the router picks the speaker of each turn; the speaker sees its role prompt, its own view
    of the task and the transcript so far (through its own chat template), and writes one message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.team = team_of(self.config)
        self.response_length = self.rollout_config.response_length

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> list[AgentLoopOutput]:
        raw_prompt = list(kwargs.get("raw_prompt") or [])
        extra_info = kwargs.get("extra_info") or {}
        check_agent_views(extra_info, self.team.agent_names)
        key = episode_key(kwargs.get("uid", uuid4().hex), kwargs.get("session_id", 0))
        schedule = router_schedule(self.team.router, self.team.agent_names, key)
        scored_turn = answer_turn(schedule, self.team.handoff)

        prompt_seed = kwargs.get(SEED_FIELD)
        validate = bool(kwargs.get(VALIDATE_KWARG, False))
        session = int(kwargs.get("session_id", 0))
        reused = episode_prefix(kwargs.get(PREFIX_FIELD), session)
        swap = self.team.replace if kwargs.get(PROBE_FIELD) else None  # a Stage-0 probe: the incumbent still speaks
        transcript: list[Message] = []
        outputs: list[AgentLoopOutput] = []
        for turn, speaker in enumerate(schedule):
            agent = swap.incumbent_agent if swap is not None and speaker == swap.agent else self.team.agent(speaker)
            tokenizer = agent_tokenizer(agent.model)
            metrics = {"generate_sequences": 0.0}
            if turn < len(reused):  # the same speaker saw the same context: the earlier sample stands (exact)
                prompt_ids, response_ids, log_probs, server_fields = reused[turn]
            else:
                task_messages = agent_view(extra_info, raw_prompt, speaker)
                chat = build_agent_messages(agent, task_messages, transcript, self.team.handoff,
                                            show_transcript=transcript_visible(extra_info))
                prompt_ids = render_prompt(tokenizer, agent, chat, self.config.data)
                prompt_ids = self._cap_text_prompt_length(list(prompt_ids))
                with simple_timer("generate_sequences", metrics):
                    turn_params = turn_sampling_params(
                        sampling_params, agent.sampling, validate=validate,
                        seed=None if prompt_seed is None else turn_seed(int(prompt_seed), session, turn))
                    generated = await self.server_manager.generate(
                        request_id=uuid4().hex, prompt_ids=prompt_ids, sampling_params=turn_params,
                        **{ROUTE_KWARG: speaker},
                    )
                response_ids = list(generated.token_ids[: self.response_length])
                log_probs = list(generated.log_probs[: self.response_length]) if generated.log_probs else None
                server_fields = dict(generated.extra_fields or {})
            content = tokenizer.decode(response_ids, skip_special_tokens=True)
            transcript.append(Message(speaker=speaker, turn=turn, content=content))
            extra_fields = dict(server_fields)
            extra_fields.update({AGENT_FIELD: speaker, MODEL_FIELD: agent.model, TURN_FIELD: turn,
                                 ANSWER_FIELD: turn == scored_turn,
                                 REUSED_FIELD: turn < len(reused)})
            outputs.append(
                AgentLoopOutput(
                    prompt_ids=prompt_ids,
                    response_ids=response_ids,
                    response_mask=[1] * len(response_ids),  # every response token is the speaker's own
                    response_logprobs=log_probs,
                    num_turns=len(schedule),
                    metrics=AgentLoopMetrics(generate_sequences=metrics["generate_sequences"]),
                    extra_fields=extra_fields,
                )
            )
        # The reward sees the whole transcript (verl passes the last output's extra_fields into extra_info).
        answer = outputs[scored_turn]
        answer.extra_fields[TRANSCRIPT_FIELD] = [
            {"agent": m.speaker, "turn": m.turn, "content": m.content} for m in transcript
        ]
        # verl scores the last output of a trajectory: put the answer there; turns keep their index in extra_fields.
        return [o for i, o in enumerate(outputs) if i != scored_turn] + [answer]


class _TeamAgentLoopWorker(AgentLoopWorkerTQ.__ray_metadata__.modified_class):
    """verl's TransferQueue agent-loop worker, with the team's reward path.

    verl's reward workers decode the scored response with the *default* model's tokenizer. In a heterogeneous team
    the answer may come from an agent with another vocabulary, so the reward is asked about a copy of the answer
    message re-tokenized with that default tokenizer (the trained token ids are untouched). A reward that raises or
    is not finite drops the trajectory through verl's failure path instead of being scored 0.
    """

    async def _run_agent_loop(self, sampling_params, trajectory, **kwargs):
        return await super()._run_agent_loop(sampling_params, trajectory, **kwargs,
                                             **{VALIDATE_KWARG: bool(trajectory["validate"])})

    async def _agent_loop_postprocess(self, output, validate, **kwargs) -> None:
        # verl stores every row argument in every output row: the prefix, probe and validate flags are input only
        kwargs.pop(PREFIX_FIELD, None)
        kwargs.pop(PROBE_FIELD, None)
        kwargs.pop(VALIDATE_KWARG, None)
        return await super()._agent_loop_postprocess(output, validate, **kwargs)

    async def _compute_score(self, outputs: list[AgentLoopOutput], kwargs: dict) -> None:
        answer = outputs[-1]
        if AGENT_FIELD not in answer.extra_fields or self.reward_loop_worker_handles is None:
            return await super()._compute_score(outputs, kwargs)
        answer_tokenizer = agent_tokenizer(answer.extra_fields[MODEL_FIELD])
        reward_view = answer.model_copy(deep=True)
        text = answer_tokenizer.decode(answer.response_ids, skip_special_tokens=True)
        reward_view.prompt_ids = self.tokenizer.encode(
            answer_tokenizer.decode(answer.prompt_ids, skip_special_tokens=False), add_special_tokens=False
        )
        reward_view.response_ids = self.tokenizer.encode(text, add_special_tokens=False)
        reward_view.response_mask = [1] * len(reward_view.response_ids)
        reward_view.response_logprobs = None
        where = f"uid={kwargs.get('uid')} session={kwargs.get('session_id')}"
        try:
            await super()._compute_score([reward_view], kwargs)
        except Exception as error:
            raise TeamRewardError(f"reward raised for {where}: {type(error).__name__}: {error}; "
                                  f"transcript={answer.extra_fields.get(TRANSCRIPT_FIELD)}") from error
        score = reward_view.reward_score
        if score is None or not math.isfinite(float(score)):
            raise TeamRewardError(f"reward returned {score!r} for {where}; "
                                  f"transcript={answer.extra_fields.get(TRANSCRIPT_FIELD)}")
        answer.reward_score = float(score)
        answer.extra_fields["reward_extra_info"] = reward_view.extra_fields.get("reward_extra_info", {})
        answer.metrics.compute_score = reward_view.metrics.compute_score


TeamAgentLoopWorker = ray.remote(_TeamAgentLoopWorker)


class TeamAgentLoopManager(AgentLoopManagerTQ):
    """verl's TransferQueue agent-loop manager with :class:`TeamAgentLoopWorker` workers.

    Selected by ``actor_rollout_ref.rollout.agent.agent_loop_manager_class=teamtr_verl.team.TeamAgentLoopManager``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = TeamAgentLoopWorker
