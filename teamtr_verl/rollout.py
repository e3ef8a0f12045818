"""Team rollouts without training: look at what a team says before training it.

    python -m teamtr_verl.rollout [--config-dir DIR] [--config-name teamtr_trainer] [--prompts 4] [--show 3] \
        [--out transcripts.jsonl] [--split val|train] HYDRA_OVERRIDES...

Starts Ray, builds every agent's worker group and vLLM servers exactly as training would (``topology``), runs the
``teamtr_handoff`` episode of the first ``--prompts`` dataset rows ``actor_rollout_ref.rollout.n`` times each, scores
each answer with the configured ``reward.custom_reward_function`` (if any), prints a few transcripts with speaker
names and writes all of them to a JSONL file, one episode per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Optional

CONFIG_DIR = Path(__file__).parent / "configs"


def compose(config_dir: str, config_name: str, overrides: list[str]):
    """The config ``python -m verl.trainer.main_ppo --config-path DIR --config-name NAME OVERRIDES`` would see."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        config = hydra_compose(config_name=config_name, overrides=overrides)
    OmegaConf.resolve(config)
    return config


def validate_team(config):
    """The team, validated before any cluster starts (every error names the dotted key and value)."""
    from teamtr_verl.config import TeamConfig, validate_placement

    team = TeamConfig.from_config(config.get("teamtr"), prefix="teamtr")
    validate_placement(team, config.trainer.n_gpus_per_node * config.trainer.nnodes)
    if config.actor_rollout_ref.rollout.name != "vllm":
        raise ValueError(f"actor_rollout_ref.rollout.name={config.actor_rollout_ref.rollout.name!r}: "
                         "teamtr_verl's per-agent servers need vllm")
    return team


def dataset_rows(config, split: str, limit: int) -> list[dict]:
    import pandas as pd

    files = config.data.val_files if split == "val" else config.data.train_files
    files = [files] if isinstance(files, str) else list(files)
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).head(limit)
    return frame.to_dict(orient="records")


def _plain(value):
    """numpy arrays / scalars from parquet -> JSON-able Python values."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


async def run_episodes(config, client, rows: list[dict], reward_fn=None) -> list[dict]:
    """Run ``rollout.n`` team episodes per row through ``client``; return one JSON-able record per episode."""
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from teamtr_verl.team import AGENT_FIELD, ANSWER_FIELD, TURN_FIELD, TeamHandoffAgentLoop

    tokenizer = AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.path)
    rollout = config.actor_rollout_ref.rollout
    sampling_params = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                           repetition_penalty=1.0, logprobs=True)

    async def episode(row_index: int, row: dict, session: int) -> dict:
        loop = TeamHandoffAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=client, tokenizer=tokenizer, processor=None,
            dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
        )
        uid = f"row{row_index}"
        outputs = await loop.run(sampling_params, raw_prompt=_plain(row["prompt"]),
                                 extra_info=_plain(row.get("extra_info") or {}), uid=uid, session_id=session)
        turns = sorted(outputs, key=lambda o: o.extra_fields[TURN_FIELD])
        answer = next(o for o in outputs if o.extra_fields[ANSWER_FIELD])
        record = {
            "uid": uid,
            "session": session,
            "data_source": row.get("data_source"),
            "transcript": answer.extra_fields["teamtr_transcript"],
            "answer_agent": answer.extra_fields[AGENT_FIELD],
            "answer_turn": answer.extra_fields[TURN_FIELD],
            "response_token_ids": {str(o.extra_fields[TURN_FIELD]): list(o.response_ids) for o in turns},
            "response_logprobs": {str(o.extra_fields[TURN_FIELD]): list(o.response_logprobs or []) for o in turns},
            "prompt_token_ids": {str(o.extra_fields[TURN_FIELD]): list(o.prompt_ids) for o in turns},
        }
        if reward_fn is not None:
            ground_truth = (row.get("reward_model") or {}).get("ground_truth")
            answer_text = record["transcript"][record["answer_turn"]]["content"]
            record["reward"] = float(reward_fn(data_source=row.get("data_source"), solution_str=answer_text,
                                               ground_truth=ground_truth, extra_info=_plain(row.get("extra_info"))))
        return record

    jobs = [episode(i, row, s) for i, row in enumerate(rows) for s in range(rollout.n)]
    return list(await asyncio.gather(*jobs))


def report_isolation(stacks, team) -> None:
    """Move each agent's weights in turn; only that agent's servers may change. Raises otherwise."""
    from teamtr_verl.team import agent_tokenizer
    from teamtr_verl.topology import check_sync_isolation

    probe = [{"role": "user", "content": "What is 12 + 30?"}]
    prompts = {name: [agent_tokenizer(team.agent(name).model).apply_chat_template(
        probe, add_generation_prompt=True, tokenize=True, return_dict=False)] for name in stacks}
    for moved in [name for name, stack in stacks.items() if stack.trained]:  # a frozen agent has no actor to move
        changed = check_sync_isolation(stacks, prompts, moved)
        expected = {name: name == moved for name in stacks}
        print(f"isolation: synced {moved!r} -> outputs changed {changed}")
        if changed != expected:
            raise RuntimeError(f"teamtr: syncing {moved!r} changed {changed}, expected {expected}")


def format_transcript(record: dict) -> str:
    lines = [f"--- {record['uid']} session {record['session']}"
             + (f"  reward={record['reward']:.3f}" if "reward" in record else "")]
    for message in record["transcript"]:
        marker = "  <- scored" if message["turn"] == record["answer_turn"] else ""
        lines.append(f"  [{message['turn']}] {message['agent']}: {message['content']!r}{marker}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teamtr_verl.rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--config-dir", default=str(CONFIG_DIR))
    parser.add_argument("--config-name", default="teamtr_trainer")
    parser.add_argument("--prompts", type=int, default=4, help="dataset rows to roll out")
    parser.add_argument("--show", type=int, default=3, help="transcripts to print")
    parser.add_argument("--out", default="team_transcripts.jsonl")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--check-isolation", action="store_true",
                        help="first prove that syncing one agent's weights reaches only its own servers")
    args, overrides = parser.parse_known_args(argv)

    config = compose(args.config_dir, args.config_name, overrides)
    try:
        team = validate_team(config)  # before Ray starts
    except ValueError as error:
        print(f"teamtr-verl: {error}", file=sys.stderr)
        return 2

    import ray
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from teamtr_verl.team import TeamLLMClient
    from teamtr_verl.topology import build_team_stacks

    ray.init(**OmegaConf.to_container(config.ray_kwargs.ray_init, resolve=True))
    try:
        stacks = build_team_stacks(config, team)
        if args.check_isolation:
            report_isolation(stacks, team)
        client = TeamLLMClient(config, {name: stack.client() for name, stack in stacks.items()},
                               default_agent=team.agent_names[0])
        records = asyncio.run(run_episodes(config, client, dataset_rows(config, args.split, args.prompts),
                                           reward_fn=get_custom_reward_fn(config)))
    finally:
        ray.shutdown()
    with open(args.out, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    for record in records[: args.show]:
        print(format_transcript(record))
    print(f"{len(records)} team episodes written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
