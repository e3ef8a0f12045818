"""A team rollout as it sits in verl's TransferQueue, and the few reads/writes the TeamTR stage loop needs on it.

verl stores every agent-loop output under the key ``{uid}_{session}_{turn_index}``; ``teamtr_handoff`` writes one
output per turn with the speaker in ``extra_fields``. Here the rows of one regeneration are read once, grouped into
team trajectories (``{uid}_{session}``) and prompt groups (``uid``), and given the bounded advantage of Eq. 9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.workers.utils.padding import response_from_nested, response_to_nested

from teamtr_verl.algos import teamtr_row_advantage
from teamtr_verl.defaults import AGENT_FIELD, REUSED_FIELD, TURN_FIELD


@dataclass
class TeamRollout:
    """One regeneration of the team's rollouts on the stage's prompts.

    Attributes:
        meta: every row (message) of the rollout, as verl's batch metadata.
        agent: per row, the name of the agent that wrote it.
        trajectory: per row, its team trajectory (``{uid}_{session}``).
        advantage, normalized, group_size: per row, Ã, z and G of its trajectory (Eq. 9).
        returns: per trajectory, its return R(τ).
        return_mean: mean team return over trajectories (the J of the measured gain).
        group_std_mean: mean σ of the prompt groups (converts advantage units back to returns).
        expected_trajectories: prompts × rollout.n; fewer arrived when a reward failed (verl dropped them).
        prompt_of: per uid, the index of its prompt in the stage's batch (stable across a stage's regenerations,
            while uids are fresh each time): an episode is (prompt index, session).
    """

    meta: KVBatchMeta
    agent: list[str]
    trajectory: list[str]
    advantage: np.ndarray
    normalized: np.ndarray
    group_size: np.ndarray
    returns: dict[str, float]
    return_mean: float
    group_std_mean: float
    expected_trajectories: int
    prompt_of: dict[str, int]
    turn: Optional[list[int]] = None  # per row: its turn in the episode (the key's index is the output's position)
    reused: Optional[list[bool]] = None  # per row: taken from the previous regeneration (prefix reuse)
    response_len: Optional[np.ndarray] = None  # per row: response tokens

    def __post_init__(self) -> None:
        self.row_of_key = {key: i for i, key in enumerate(self.meta.keys)}
        self.trajectories = sorted(self.returns)  # one fixed order: the index of a trajectory in per-τ tensors
        self.trajectory_code = {t: i for i, t in enumerate(self.trajectories)}

    def episode(self, trajectory: str) -> tuple[int, int]:
        """(prompt index, session) of a trajectory ``{uid}_{session}``: the same episode in every regeneration."""
        uid, session = trajectory.rsplit("_", 1)
        return self.prompt_of[uid], int(session)

    def is_heldout(self, trajectory: str, heldout_prompts: frozenset[int]) -> bool:
        return self.episode(trajectory)[0] in heldout_prompts

    def rows_of(self, agent: str, heldout_prompts: frozenset[int] | None = None, heldout: bool = False) -> list[int]:
        """Rows written by ``agent``; with ``heldout_prompts``, only the held-out (``heldout=True``) or the trained
        ones."""
        rows = [i for i, name in enumerate(self.agent) if name == agent]
        if heldout_prompts is None:
            return rows
        return [i for i in rows if self.is_heldout(self.trajectory[i], heldout_prompts) == heldout]

    def keys_of(self, agent: str, heldout_prompts: frozenset[int] | None = None, heldout: bool = False) -> list[str]:
        return [self.meta.keys[i] for i in self.rows_of(agent, heldout_prompts, heldout)]

    def episode_returns(self) -> dict[tuple[int, int], float]:
        return {self.episode(t): r for t, r in self.returns.items()}

    @property
    def dropped_trajectories(self) -> int:
        return self.expected_trajectories - len(self.returns)


def read_team_rollout(meta: KVBatchMeta, expected_trajectories: int, a_clip: float, norm_eps: float,
                      prompt_of: dict[str, int]) -> TeamRollout:
    """Read a regeneration's rows from TransferQueue and compute Eq. 9 over its team trajectories."""
    data = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id,
                           select_fields=["uid", "rm_scores", "response_mask", "extra_fields"])
    extra = data.pop("extra_fields").tolist()
    agents = [fields[AGENT_FIELD] for fields in extra]
    uids = [str(uid) for uid in data.pop("uid").tolist()]
    trajectory = [key.rsplit("_", 1)[0] for key in meta.keys]  # drop the turn index of {uid}_{session}_{turn}
    padded = data.to_padded_tensor()
    # verl copies the scored answer's reward onto every turn of the trajectory: take it once ("last").
    rows = teamtr_row_advantage(padded["rm_scores"].float(), padded["response_mask"], np.array(uids, dtype=object),
                                trajectory_index=np.array(trajectory, dtype=object), a_clip=a_clip,
                                norm_eps=norm_eps, trajectory_return="last")
    returns = {t: float(r) for t, r in zip(trajectory, rows.trajectory_return.tolist())}
    first_row_of = {t: i for i, t in reversed(list(enumerate(trajectory)))}
    group_std = {uids[i]: float(rows.group_std[i]) for i in first_row_of.values()}
    return TeamRollout(
        meta=meta,
        agent=agents,
        trajectory=trajectory,
        advantage=rows.advantage.numpy(),
        normalized=rows.normalized.numpy(),
        group_size=rows.group_size.numpy(),
        returns=returns,
        return_mean=float(np.mean(list(returns.values()))),
        group_std_mean=float(np.mean(list(group_std.values()))),
        expected_trajectories=expected_trajectories,
        prompt_of=prompt_of,
        turn=[int(fields[TURN_FIELD]) for fields in extra],
        reused=[bool(fields.get(REUSED_FIELD, False)) for fields in extra],
        response_len=padded["response_mask"].sum(dim=1).numpy(),
    )


def read_turn_records(meta: KVBatchMeta, keys: list[str], with_log_probs: bool) -> dict[str, tuple[list, list, Any,
                                                                                                     dict]]:
    """Per row ``keys`` of a rollout: (prompt ids, response ids, rollout log-probs or None, the server's own
    extra_fields), what a later regeneration needs to reuse the turn exactly (prefix reuse)."""
    fields = ["prompts", "responses", "extra_fields"] + (["rollout_log_probs"] if with_log_probs else [])
    data = tq.kv_batch_get(keys=keys, partition_id=meta.partition_id, select_fields=fields)
    extra = data.pop("extra_fields").tolist()  # pop: the NonTensorStack itself (indexing returns its raw storage)
    prompts, responses = data["prompts"].unbind(), data["responses"].unbind()
    log_probs = data["rollout_log_probs"].unbind() if with_log_probs else [None] * len(keys)
    records = {}
    for i, key in enumerate(keys):
        server = {k: v for k, v in extra[i].items()  # JSON scalars the server set (not the team's own fields)
                  if not k.startswith("teamtr_") and k != "reward_extra_info" and isinstance(v, (int, float, str))}
        records[key] = (prompts[i].tolist(), responses[i].tolist(),
                        None if log_probs[i] is None else log_probs[i].tolist(), server)
    return records


def write_advantages(batch: KVBatchMeta, row_advantage: dict[str, float]) -> KVBatchMeta:
    """Write ``advantages``/``returns`` for ``batch``: each row's value on its response tokens, 0 on padding rows.

    Returns the batch metadata TransferQueue hands back, which lists the new fields (workers read only those).
    """
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask"])
    response_mask = data["response_mask"]
    mask = data.to_padded_tensor()["response_mask"]
    values = torch.tensor([row_advantage.get(key, 0.0) for key in batch.keys], dtype=torch.float32)
    advantages = values[:, None] * mask.float()
    fields = {"advantages": response_to_nested(advantages, response_mask),
              "returns": response_to_nested(advantages.clone(), response_mask)}
    return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                           fields=TensorDict(fields, batch_size=len(batch)))


def read_log_probs(batch: KVBatchMeta) -> dict[str, torch.Tensor]:
    """Old (pre-update) and freshly computed log-probs of ``batch``'s real rows, padded: (rows, response_length)."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                           select_fields=["log_probs", "old_log_probs", "response_mask"])
    data["new_log_probs"] = response_from_nested(data.pop("log_probs"), data["response_mask"])
    padded = data.to_padded_tensor()
    real = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags])
    return {
        "old": padded["old_log_probs"][real].float(),
        "new": padded["new_log_probs"][real].float(),
        "mask": padded["response_mask"][real].bool(),
        "real_keys": [key for key, keep in zip(batch.keys, real.tolist()) if keep],
    }


def pack_sequences(prompts: list[torch.Tensor], responses: list[torch.Tensor],
                   response_masks: list[torch.Tensor]) -> dict:
    """Rows of (prompt ids, response ids, response mask) as one padded causal-LM batch: prompts left-padded to a
    common width P, responses right-padded to a common length R, so the logits at positions P−1 … P+R−2 predict
    the response tokens of every row.

    Returns:
        ``input_ids``, ``attention_mask``: (rows, P+R) long (pad id 0, masked); ``response_mask``: (rows, R) float
        (the responses end the block: the last R + 1 positions' logits predict them).
    """
    width = max(len(p) for p in prompts)
    length = max(len(r) for r in responses)
    input_ids = torch.zeros(len(prompts), width + length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(prompts), length)
    for i, (prompt, response, mask) in enumerate(zip(prompts, responses, response_masks, strict=True)):
        input_ids[i, width - len(prompt):width] = prompt
        input_ids[i, width:width + len(response)] = response
        attention_mask[i, width - len(prompt):width + len(response)] = 1
        response_mask[i, :len(response)] = mask.float()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def read_rows(batch: KVBatchMeta) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``batch``'s real rows (padding rows left out): prompt ids, response ids and response masks, one tensor each."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                           select_fields=["prompts", "responses", "response_mask"])
    real = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
    prompts, responses, masks = (data[field].unbind() for field in ("prompts", "responses", "response_mask"))
    return [prompts[i] for i in real], [responses[i] for i in real], [masks[i] for i in real]


def read_sequences(batch: KVBatchMeta) -> dict:
    """``batch``'s real rows as :func:`pack_sequences` packs them."""
    return pack_sequences(*read_rows(batch))


def _as_text(ids: list[int], source, target, sampled: bool) -> Optional[list[int]]:
    """``ids`` decoded with ``source`` and re-encoded with ``target`` (its own segmentation), or None when that is not
    exact: an id with no token (a padded embedding row), ``sampled`` tokens that may not be whole text (a sampled
    byte-level token can stop inside a UTF-8 character: decoding replaces it with U+FFFD and the bytes are lost; a
    rendered context is text by construction, its U+FFFD are characters of the transcript), or a text the target
    does not give back (e.g. a tokenizer that adds prefix spaces)."""
    if any(token is None for token in source.convert_ids_to_tokens(ids)):
        return None
    text = source.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if sampled and "\ufffd" in text:
        return None
    encoded = target.encode(text, add_special_tokens=False)
    if target.decode(encoded, skip_special_tokens=False, clean_up_tokenization_spaces=False) != text:
        return None
    return encoded


def _by_token_strings(ids: list[int], source, target, vocab: dict[str, int]) -> Optional[list[int]]:
    """The same token strings by ``target``'s ids (``vocab``, its ``get_vocab()``), where it has them all and they
    decode to the same text (a permuted or extended vocabulary: the segmentation the incumbent sampled, kept); None
    otherwise."""
    tokens = source.convert_ids_to_tokens(ids)
    if any(token is None or token not in vocab for token in tokens):
        return None
    mapped = [vocab[token] for token in tokens]
    same = (target.decode(mapped, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            == source.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return mapped if same else None


def retokenize_rows(prompts: list[torch.Tensor], responses: list[torch.Tensor], source, target
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The probe's rows in ``target``'s tokens. A context is text the incumbent's template rendered: re-encoded, it
    is what the target's own template renders for it (same template, checked before Ray). A message is the
    incumbent's sample: token string by token string where the target has them all (the sampled segmentation,
    which a sampled message need not share with the text's canonical one), else its text re-encoded; it keeps its
    end exactly when it had ``source``'s EOS (a message cut at the length limit has none), as ``target``'s EOS. Rows
    that translate exactly in neither way are left out. Returns (prompts, responses, masks) and the kept indices."""
    if target.eos_token_id is None:
        raise ValueError(f"the target tokenizer ({type(target).__name__}) has no EOS token: a message could not end")
    out_prompts, out_responses, kept = [], [], []
    vocab = target.get_vocab()  # built anew by every call: once per batch, not per message
    for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        ids = response.tolist()
        ended = bool(ids) and ids[-1] == source.eos_token_id
        body = ids[:-1] if ended else ids
        context = _as_text(prompt.tolist(), source, target, sampled=False)
        message = _by_token_strings(body, source, target, vocab)
        if message is None:
            message = _as_text(body, source, target, sampled=True)
        if context is None or message is None:
            continue
        out_prompts.append(torch.tensor(context, dtype=torch.long))
        out_responses.append(torch.tensor(message + ([target.eos_token_id] if ended else []), dtype=torch.long))
        kept.append(index)
    return out_prompts, out_responses, [torch.ones(len(r)) for r in out_responses], kept


def packed_responses(sequences: dict) -> torch.Tensor:
    """The response ids of a :func:`pack_sequences` batch: its last R columns, (rows, R) (padding where masked)."""
    return sequences["input_ids"][:, sequences["input_ids"].shape[1] - sequences["response_mask"].shape[1]:]


def likelihood_teacher(sequences: dict) -> dict:
    """The teacher of a Stage 0 across tokenizers, in :meth:`TeamActorRolloutRefWorker.stage0_teacher_topk`'s form:
    at each response position the message's own (re-tokenized) token with log-probability 0. With it the top-k
    forward KL is the newcomer's negative log-likelihood of the incumbent's messages (k = 1, nothing outside it)."""
    ids = packed_responses(sequences)[..., None]
    return {"log_probs": torch.zeros(ids.shape), "ids": ids.int()}
