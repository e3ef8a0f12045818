"""Exact tabular team simulator: the compounding occupancy shift of stale sequential updates vs TeamTR.

    python benchmarks/occupancy_shift.py --task {budget_sq,chaincode} --agents 2 4 8 --seeds 0 1 2 --stages 30 \
        --schedules teamtr stale matched adaptive --json OUT.json [--router chain|round_robin] [--delta 0.02] \
        [--lr 0.1] [--epochs 4] [--prompts 16] [--samples 8] [--equal-episodes [stale]] [--adaptive-kl KL]
    python benchmarks/occupancy_shift.py --onestage --task budget_sq --agents 2 3 4 6 8 --seeds 0 ... --warm 3 ...
    python benchmarks/occupancy_shift.py --summarize docs/data/os_*.json.gz docs/data/onestage_*.json.gz

Results, commands and their discussion: docs/science.md (JSON in docs/data/).

Each agent is a softmax table θ_j (logits per private input × action); a tabular "message" is one token, so every
per-message quantity goes through :mod:`teamtr_verl.algos` as ``(bs, 1)`` tensors. Nothing of the algorithm is
re-implemented here: Eq. 9 advantages are ``algos.bounded_group_advantage``, the loss is ``algos.teamtr_policy_loss``
on the updated agent's own messages, the δ monitor is ``algos.token_kl_monitor``, the line search's surrogate is
``algos.surrogate_gain``, the step rule is ``algos.line_search`` (β adapted once per update; first α =
min(1, 0.9·sqrt(δ/KL_full)), then halvings; accept only KL ≤ δ and L̂ ≥ 0) and the certificate is
``algos.update_bound`` on held-out prompt groups with ``algos.trajectory_log_ratio`` / ``algos.leave_one_out_centered``
(stale/adaptive pass ``prior_log_w`` = Σ log W of the earlier updates on the same rollout), exactly as
``teamtr_verl.trainer`` does. What is exact (no sampling) is J, the per-update gain ΔJ_i and the first-order surrogate.

Tasks (``--task``), turn order ``--router chain`` (1..N once) or ``round_robin`` (1..N, ``--rounds`` times):
  * ``budget_sq``: prompt = target T (central range of the reachable sums); each agent sees T only and writes
    d ∈ {0..V−1}; R = −(Σd − T)² (a substitutes game: every agent can absorb the same deficit).
    Accuracy = P(Σd = T).
  * ``chaincode``: x ~ U{0..K−1}; the first speaker sees x, every later speaker sees only the previous message;
    R = 1[last message = x]. ``--init mis``: each agent leans (per-hop fidelity ``--fid``) on a random permutation whose
    composition is a derangement (confident, miscoordinated). Accuracy = J.

Exact machinery: a task is a finite world (per prompt x: world state w, the speaker's private input obs[x, w], the
transition nxt[x, w, a], the terminal reward r[x, w]); the forward occupancy F_p[x, w] and the backward value
B_p[x, w] = E[R | x, w before turn p] give J = mean_x B_0[x, w0(x)] and the exact first-order surrogate of agent j's
change ΔP on a team T: S(ΔP; T) = mean_x Σ_{p: speaker j} Σ_w F^T_p[x, w] Σ_a ΔP(a | obs) Q^T_p[x, w, a],
Q^T_p[x, w, a] = B^T_{p+1}[x, nxt[x, w, a]].

Schedules (``--schedules``), per stage of P prompts × G samples, agents updated in order 1..N:
  * ``teamtr``:   regenerate the team's episodes before every update (N·P·G episodes per stage);
  * ``stale``:    one regeneration at the stage start, all N updates on it (P·G per stage);
  * ``matched``:  TeamTR with the stage's P prompts split into N disjoint parts (np.array_split), update i regenerates
    on part i only: the same P·G episodes per stage as stale; each part holds out its own prompt groups;
  * ``adaptive``: regenerate before update i > 0 only when the summed committed KL (Eq. 11 monitor) of the agents
    updated since the last regeneration exceeds ``--adaptive-kl`` (default δ). Between regenerations it is stale
    (its certificate passes prior_log_w; its S_used uses the team of the last regeneration).

Per update i: ΔJ_i = J(π̂^i) − J(π̂^{i−1}) exact, and S_used,i = S(ΔP_i; team whose episodes the update used)
(teamtr/matched: π̂^{i−1}; stale: the stage-start team; adaptive: the team at the last regeneration), as the prior
study (shared/research/occupancy_shift/RESULTS.md §1) defines it; stale_error of a stage = Σ_i |S_used,i − ΔJ_i|.
In a one-turn chain S is linear in ΔP and J multilinear in the agents, so S_used ≡ ΔJ under regeneration.

Held-out groups: ``round(--heldout-fraction·P)`` prompt groups per stage (``team_logic.heldout_prompts``, as the
trainer) are kept out of every gradient and used only for the certificate.

Equal stages and equal episodes: ``final_*`` is always at stage S = ``--stages`` (equal stages). Two episode
comparisons: ``small_*`` is each run's value after at most S·P·G episodes (stale's budget of S stages: teamtr at
stage ⌊S/N⌋; free, from the curves), and ``--equal-episodes [SCHED ...]`` (no name: stale) runs those schedules on
until they have generated teamtr's episodes of S stages (N·S·P·G, at most N·S stages): ``eqep_*`` is at that budget
(teamtr: stage S; null for a run that did not reach it). Per-update records and stale errors are kept for the first
S stages only.

``--onestage``: from the same start team (budget_sq: ``--warm`` teamtr stages after the noise init; chaincode: the
init) and the same stage-start batch, one stage of each schedule; prints the stale error by position i and N with
the fitted exponents (least-squares slope of log mean Σ_i|err| over log N).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from teamtr_verl import algos
from teamtr_verl.defaults import (
    DEFAULT_A_CLIP,
    DEFAULT_BETA,
    DEFAULT_CLIP_RATIO,
    DEFAULT_CONFIDENCE_T,
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_MAX_BACKTRACKS,
    DEFAULT_NORM_EPS,
    DEFAULT_STEP_SAFETY,
)
from teamtr_verl.team_logic import heldout_prompts

SCHEDULES = ("teamtr", "stale", "matched", "adaptive")
TASKS = ("budget_sq", "chaincode")
ROUTERS = ("chain", "round_robin")
REGRESSION_TOL = 0.005
PAPER_EXPONENTS = {"stale": 1.94, "teamtr": 1.07}  # the paper's fitted stale-error exponents over N


# ----------------------------------------------------------------------------------------------------------- task
@dataclass
class Task:
    """A finite team game. Agent tables have ``n_inputs`` rows (private inputs) × ``n_actions`` columns."""

    name: str
    n_agents: int
    turns: tuple[int, ...]  # speaker of each position
    n_inputs: int
    n_actions: int
    prompt_values: np.ndarray  # (n_x,) the prompt label shown in records (T or x)
    init_world: np.ndarray  # (n_x,) world state before the first turn
    obs: np.ndarray  # (n_x, n_world) private input of the speaker in world state w
    nxt: np.ndarray  # (n_x, n_world, V) next world state
    reward: np.ndarray  # (n_x, n_world) terminal return
    success: np.ndarray  # (n_x, n_world) terminal success (accuracy)
    onehot: np.ndarray = field(init=False)  # (n_x, n_world, V, n_world) 1[nxt == v]

    def __post_init__(self):
        nw = self.obs.shape[1]
        self.onehot = (self.nxt[..., None] == np.arange(nw)).astype(np.float64)

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_values)

    # exact ---------------------------------------------------------------------------------------------------------
    def obs_probs(self, probs: list[np.ndarray], p: int) -> np.ndarray:
        """(n_x, n_world, V): the speaker of position p's action distribution in each world state."""
        return probs[self.turns[p]][self.obs]

    def forward(self, probs: list[np.ndarray]) -> list[np.ndarray]:
        """F[p][x, w] = P(world state w before turn p | x), p = 0..L."""
        F = np.zeros(self.obs.shape)
        F[np.arange(self.n_prompts), self.init_world] = 1.0
        out = [F]
        for p in range(len(self.turns)):
            F = np.einsum("xw,xwa,xwav->xv", F, self.obs_probs(probs, p), self.onehot)
            out.append(F)
        return out

    def backward(self, probs: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(B, Q): B[p][x, w] = E[R | x, w before turn p]; Q[p][x, w, a] = B[p+1][x, nxt[x, w, a]]."""
        L = len(self.turns)
        B = [None] * (L + 1)
        Q = [None] * L
        B[L] = self.reward
        xi = np.arange(self.n_prompts)[:, None, None]
        for p in range(L - 1, -1, -1):
            Q[p] = B[p + 1][xi, self.nxt]
            B[p] = (self.obs_probs(probs, p) * Q[p]).sum(-1)
        return B, Q

    def J(self, probs: list[np.ndarray]) -> float:
        return float(np.mean((self.forward(probs)[-1] * self.reward).sum(-1)))

    def accuracy(self, probs: list[np.ndarray]) -> float:
        return float(np.mean((self.forward(probs)[-1] * self.success).sum(-1)))

    def surrogate(self, agent: int, dP: np.ndarray, F: list[np.ndarray], Q: list[np.ndarray]) -> float:
        """Exact first-order surrogate of changing agent ``agent``'s table by dP, on the occupancy F and values Q."""
        tot = 0.0
        for p, j in enumerate(self.turns):
            if j == agent:
                tot += float(np.einsum("xw,xwa,xwa->", F[p], dP[self.obs], Q[p]))
        return tot / self.n_prompts

    # sampled -------------------------------------------------------------------------------------------------------
    def sample(self, probs: list[np.ndarray], prompt_idx: np.ndarray, rng: np.random.Generator):
        """Episodes for prompt indices ``prompt_idx`` (M,): per position (obs, action) arrays, returns (M,), success."""
        M = len(prompt_idx)
        w = self.init_world[prompt_idx].copy()
        obs, act = [], []
        for p in range(len(self.turns)):
            o = self.obs[prompt_idx, w]
            cp = np.cumsum(probs[self.turns[p]][o], 1)
            a = np.minimum((rng.random(M)[:, None] > cp).sum(1), self.n_actions - 1)
            obs.append(o)
            act.append(a)
            w = self.nxt[prompt_idx, w, a]
        return np.array(obs), np.array(act), self.reward[prompt_idx, w], self.success[prompt_idx, w]


def make_task(name: str, n_agents: int, router: str = "chain", rounds: int = 2, K: int = 4, V: int = 3) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got task={name!r}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got router={router!r}")
    if n_agents < 1:
        raise ValueError(f"n_agents must be >= 1, got n_agents={n_agents}")
    turns = tuple(range(n_agents)) * (rounds if router == "round_robin" else 1)
    if name == "chaincode":
        x = np.arange(K)
        obs = np.tile(np.arange(K), (K, 1))  # the speaker sees the current message (the first: x itself)
        nxt = np.broadcast_to(np.arange(K), (K, K, K)).copy()  # the new message is the action
        succ = (np.arange(K)[None, :] == x[:, None])
        return Task(name, n_agents, turns, K, K, x, x.copy(), obs, nxt, succ.astype(np.float64), succ)
    smax = len(turns) * (V - 1)
    Ts = np.arange(smax // 4, smax - smax // 4 + 1)
    n_x, n_w = len(Ts), smax + 1
    obs = np.tile(np.arange(n_x)[:, None], (1, n_w))  # each agent sees T only
    nxt = np.minimum(np.arange(n_w)[None, :, None] + np.arange(V)[None, None, :], smax)
    nxt = np.broadcast_to(nxt, (n_x, n_w, V)).copy()
    dev = np.arange(n_w)[None, :] - Ts[:, None]
    return Task(name, n_agents, turns, n_x, V, Ts, np.zeros(n_x, dtype=int), obs, nxt,
                -(dev.astype(np.float64) ** 2), dev == 0)


def init_tables(task: Task, rng: np.random.Generator, init: str = "mis", fid: float = 0.8,
                noise: float = 0.3) -> list[np.ndarray]:
    """Initial logit tables. budget_sq: noise·N(0, 1). chaincode: the study's 'mis' (each agent leans on a random
    permutation with per-hop fidelity ``fid``; one round of the team composes to x → x+1, or for 2 round-robin rounds
    to τ with τ∘τ a derangement), 'coord' (composes to the identity) or 'uniform' (noise only)."""
    N = task.n_agents
    if task.name == "budget_sq":
        return [noise * rng.standard_normal((task.n_inputs, task.n_actions)) for _ in range(N)]
    K = task.n_inputs
    b = math.log(fid * (K - 1) / (1 - fid)) if fid < 1 else 20.0
    perms = [rng.permutation(K) for _ in range(N)]
    rounds = len(task.turns) // N
    if init in ("mis", "coord"):
        comp = np.arange(K)
        for p in perms[:-1]:
            comp = p[comp]
        if init == "coord" and rounds == 1:
            target = np.arange(K)
        elif rounds == 2 and K == 4:
            target = np.array([2, 3, 1, 0])  # τ∘τ = (0 1)(2 3): a derangement after two rounds
        else:
            target = (np.arange(K) + 1) % K
        last = np.empty(K, dtype=int)
        last[comp] = target
        perms[-1] = last
    tables = []
    for j in range(N):
        z = noise * rng.standard_normal((K, K))
        if init != "uniform":
            z[np.arange(K), perms[j]] += b
        tables.append(z)
    return tables


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """Team episodes of one regeneration: G per prompt slot of ``slots``, with the team they were sampled from."""

    slots: np.ndarray  # (P',) stage prompt-slot ids (the groups)
    heldout: frozenset  # slot ids held out of the gradient
    group: np.ndarray  # (M,) slot id of each trajectory
    obs: np.ndarray  # (L, M)
    act: np.ndarray  # (L, M)
    returns: np.ndarray  # (M,)
    advantage: torch.Tensor  # (M,) Eq. 9
    F: list  # exact occupancy of the team that generated it
    Q: list
    in_heldout: np.ndarray = None  # (M,) bool

    def __post_init__(self):
        self.in_heldout = np.isin(self.group, list(self.heldout)) if self.heldout else np.zeros(len(self.group), bool)


class Team:
    """N softmax tables as torch float64 parameters, one Adam per agent, one β per agent (BetaState)."""

    def __init__(self, tables: list[np.ndarray], lr: float, beta0: float):
        self.theta = [torch.nn.Parameter(torch.tensor(z, dtype=torch.float64)) for z in tables]
        self.opt = [torch.optim.Adam([t], lr=lr, foreach=False) for t in self.theta]
        self.beta = [algos.BetaState(beta=beta0) for _ in tables]

    def probs(self) -> list[np.ndarray]:
        return [softmax(t.detach().numpy()) for t in self.theta]

    def clone(self) -> Team:
        return copy.deepcopy(self)


def regenerate(task: Task, team: Team, prompt_idx_of_slot: np.ndarray, slots: np.ndarray, heldout: frozenset,
               G: int, rng: np.random.Generator, a_clip: float, norm_eps: float) -> Rollout:
    probs = team.probs()
    group = np.repeat(slots, G)
    obs, act, R, _ = task.sample(probs, prompt_idx_of_slot[group], rng)
    adv = algos.bounded_group_advantage(torch.tensor(R), group, a_clip=a_clip, norm_eps=norm_eps).advantage
    F = task.forward(probs)
    _, Q = task.backward(probs)
    return Rollout(slots, heldout, group, obs, act, R, adv, F, Q)


# --------------------------------------------------------------------------------------------- one agent update
@dataclass
class Config:
    delta: float = 0.02
    lr: float = 0.1
    epochs: int = 4
    clip: float = DEFAULT_CLIP_RATIO
    a_clip: float = DEFAULT_A_CLIP
    norm_eps: float = DEFAULT_NORM_EPS
    beta0: float = DEFAULT_BETA
    kl_estimator: str = "k3"
    ratio_level: str = "token"
    max_backtracks: int = DEFAULT_MAX_BACKTRACKS
    step_safety: float = DEFAULT_STEP_SAFETY
    trust_region: bool = True
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    bound: str = "is_lcb"
    confidence_t: float = DEFAULT_CONFIDENCE_T
    prompts: int = 16
    samples: int = 8
    adaptive_kl: float | None = None


def _rows(task: Task, ro: Rollout, agent: int, heldout: bool | None):
    """(trajectory, obs, action) of agent ``agent``'s messages in ``ro``; heldout None = all, else that side."""
    traj, obs, act = [], [], []
    M = ro.returns.shape[0]
    for p, j in enumerate(task.turns):
        if j != agent:
            continue
        keep = np.ones(M, bool) if heldout is None else (ro.in_heldout == heldout)
        idx = np.flatnonzero(keep)
        traj.append(idx)
        obs.append(ro.obs[p, idx])
        act.append(ro.act[p, idx])
    return np.concatenate(traj), np.concatenate(obs), np.concatenate(act)


def _logp(theta: torch.Tensor, obs: np.ndarray, act: np.ndarray) -> torch.Tensor:
    """(bs, 1) log π(a | obs): one row per message, one token per message."""
    return torch.log_softmax(theta, -1)[torch.as_tensor(obs), torch.as_tensor(act)][:, None]


def update_agent(task: Task, team: Team, agent: int, ro: Rollout, cfg: Config, prior_log_w: torch.Tensor | None):
    """One TeamTR agent update with the trainer's semantics. Returns (record dict, log W of every trajectory of ``ro``
    for the committed update — zeros when given up)."""
    theta, opt = team.theta[agent], team.opt[agent]
    beta_state = team.beta[agent]
    traj, obs, act = _rows(task, ro, agent, heldout=False)
    if traj.size == 0:
        raise ValueError(f"agent {agent} has no trained messages (heldout_fraction={cfg.heldout_fraction})")
    adv = ro.advantage[torch.as_tensor(traj)].to(torch.float64)
    mask = torch.ones((traj.size, 1), dtype=torch.bool)
    theta_cur = theta.detach().clone()
    old_lp = _logp(theta_cur, obs, act)
    opt_snapshot = copy.deepcopy(opt.state_dict())
    # the optimizer's proposal: E full-batch Adam steps on the Eq. 10 loss of the agent's own messages
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        loss, _ = algos.teamtr_policy_loss(old_lp, _logp(theta, obs, act), adv[:, None], mask, beta=beta_state.beta,
                                           clip_ratio_low=cfg.clip, clip_ratio_high=cfg.clip,
                                           ratio_level=cfg.ratio_level, kl_estimator=cfg.kl_estimator,
                                           loss_agg_mode="token-mean")
        loss.backward()
        opt.step()
    theta_new = theta.detach().clone()

    def evaluate(alpha: float) -> algos.StepEval:
        with torch.no_grad():
            th = theta_cur + alpha * (theta_new - theta_cur)
            new_lp = _logp(th, obs, act)
            kl = float(algos.token_kl_monitor(old_lp, new_lp, mask, estimator=cfg.kl_estimator))
            sur = algos.surrogate_gain(old_lp, new_lp, adv, mask, cfg.clip, cfg.clip, cfg.ratio_level)
        return algos.StepEval(alpha, kl, sur)

    full = evaluate(1.0)
    if cfg.trust_region:
        res = algos.line_search(evaluate, full, cfg.delta, beta_state.beta, cfg.max_backtracks, cfg.step_safety)
    else:  # teamtr.enforce=false: the full step, whatever its KL (β still adapts)
        res = algos.LineSearchResult("accept", 1.0, full, full, 0, (full,),
                                     algos.adapt_beta(beta_state.beta, full.kl, cfg.delta))
    committed = res.action == "accept"
    with torch.no_grad():
        if committed:
            theta.copy_(theta_cur + res.alpha * (theta_new - theta_cur))
            if res.alpha < 1.0:  # as the trainer: Adam's momentum remembers the step taken
                for st in opt.state.values():
                    st["exp_avg"].mul_(res.alpha)
        else:  # weights and optimizer state back to π_cur exactly
            theta.copy_(theta_cur)
            opt.load_state_dict(opt_snapshot)
    team.beta[agent] = beta_state.after_update(res.full.kl, res.beta, res.backtracks, committed)

    M = ro.returns.shape[0]
    rec = dict(agent=agent, committed=committed, kl=res.kl, kl_full=res.full.kl, alpha=res.alpha,
               backtracks=res.backtracks, beta=beta_state.beta, surrogate=res.committed.surrogate if committed else 0.0,
               bound=None, bound_point=None, bound_se=None, is_gain=None, is_gain_se=None, heldout_trajectories=0)
    log_w_all = torch.zeros(M, dtype=torch.float64)
    if not committed:
        return rec, log_w_all
    with torch.no_grad():
        # every message of the agent in this rollout (trained and held-out): W per trajectory of the committed update
        t_all, o_all, a_all = _rows(task, ro, agent, heldout=None)
        m_all = torch.ones((t_all.size, 1), dtype=torch.bool)
        log_w_all = algos.trajectory_log_ratio(_logp(theta_cur, o_all, a_all), _logp(theta.detach(), o_all, a_all),
                                               m_all, torch.as_tensor(t_all), M)
        if ro.in_heldout.any():
            t_h, o_h, a_h = _rows(task, ro, agent, heldout=True)
            old_h, new_h = _logp(theta_cur, o_h, a_h), _logp(theta.detach(), o_h, a_h)
            m_h = torch.ones((t_h.size, 1), dtype=torch.bool)
            codes = torch.as_tensor(t_h)
            log_w = algos.trajectory_log_ratio(old_h, new_h, m_h, codes, M)  # 0 outside the held-out groups
            centered, usable = algos.leave_one_out_centered(ro.returns, ro.group)
            usable = usable & torch.as_tensor(ro.in_heldout)
            if not algos.can_bound(centered, usable):  # the trainer's rule: no bound, not 0 ± 0
                return rec, log_w_all
            return_range = float(ro.returns.max() - ro.returns.min()) or 1.0
            bound = algos.update_bound(
                cfg.bound, log_w=log_w, centered=centered, usable=usable, prior_log_w=prior_log_w,
                clip_ratio=cfg.clip, t=cfg.confidence_t, kl=res.kl, return_range=return_range,
                agent_turns=t_all.size / M,
                ratio_excess=algos.trajectory_ratio_excess(old_h, new_h, m_h, codes, M))
            rec.update(bound=bound.bound, bound_point=bound.point, bound_se=bound.se, is_gain=bound.estimate.mean,
                       is_gain_se=bound.estimate.se, heldout_trajectories=bound.n)
    return rec, log_w_all


# -------------------------------------------------------------------------------------------------------- stage
def run_stage(task: Task, team: Team, schedule: str, cfg: Config, stage: int, seed: int, prompt_idx: np.ndarray,
              rng: np.random.Generator, first: Rollout | None = None) -> dict:
    """One stage (agents 1..N). ``prompt_idx`` (P,): the prompt of each slot. ``first``: the stage-start rollout to use
    (one-stage counterfactuals); otherwise it is sampled. Returns the stage's records."""
    N, P, G = task.n_agents, len(prompt_idx), cfg.samples
    slots = np.arange(P)
    heldout = heldout_prompts(P, cfg.heldout_fraction, stage, seed)
    if schedule == "matched":
        if P < N:
            raise ValueError(f"matched needs prompts >= agents, got prompts={P}, agents={N}")
        parts = np.array_split(slots, N)
    kl_thr = cfg.adaptive_kl if cfg.adaptive_kl is not None else cfg.delta
    probs0 = team.probs()
    J_start, acc_start = task.J(probs0), task.accuracy(probs0)
    ro, prior, kl_since = None, None, 0.0
    updates, episodes, regens = [], 0, 0
    for i in range(N):
        j = i  # update order 1..N (fixed)
        if schedule == "matched":
            part = parts[i]
            held = frozenset(int(part[k]) for k in heldout_prompts(len(part), cfg.heldout_fraction, stage,
                                                                      seed * 1000 + i))
            regen = True
        else:
            part, held = slots, heldout
            regen = i == 0 or schedule == "teamtr" or (schedule == "adaptive" and kl_since > kl_thr)
        if regen:
            if i == 0 and first is not None:
                ro = first
            else:
                ro = regenerate(task, team, prompt_idx, part, held, G, rng, cfg.a_clip, cfg.norm_eps)
            episodes += len(part) * G
            regens += 1
            prior = torch.zeros(ro.returns.shape[0], dtype=torch.float64)
            kl_since = 0.0
        probs_cur = team.probs()
        J_before = task.J(probs_cur)
        rec, log_w = update_agent(task, team, j, ro, cfg, None if schedule in ("teamtr", "matched") else prior)
        probs_new = team.probs()
        dP = probs_new[j] - probs_cur[j]
        S_used = task.surrogate(j, dP, ro.F, ro.Q)
        dJ = task.J(probs_new) - J_before
        if rec["committed"] and schedule in ("stale", "adaptive"):
            prior = prior + log_w
            kl_since += rec["kl"]
        rec.update(stage=stage, position=i, regenerated=regen, exact_gain=dJ, S_used=S_used)
        updates.append(rec)
    probs1 = team.probs()
    J_end = task.J(probs1)
    return dict(J_start=J_start, J_end=J_end, acc_start=acc_start, acc_end=task.accuracy(probs1), episodes=episodes,
                regenerations=regens, updates=updates,
                stale_error=float(sum(abs(u["S_used"] - u["exact_gain"]) for u in updates)),
                abs_gain=float(sum(abs(u["exact_gain"]) for u in updates)))


def _round(x, nd=7):
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return float(f"{x:.{nd}g}")


UPDATE_FIELDS = ("stage", "position", "committed", "kl", "alpha", "backtracks", "beta", "surrogate", "bound",
                 "bound_se", "is_gain", "exact_gain", "S_used")


def run(task_name: str, n_agents: int, schedule: str, seed: int, stages: int, cfg: Config, router: str = "chain",
        rounds: int = 2, init: str = "mis", fid: float = 0.8, equal_episodes: bool = False) -> dict:
    """One training run; returns its JSON entry. ``equal_episodes``: run on (at most N·S stages) until teamtr's
    episode budget of S stages is reached."""
    t0 = time.perf_counter()
    task = make_task(task_name, n_agents, router, rounds)
    rng = np.random.default_rng(seed)
    team = Team(init_tables(task, rng, init, fid), cfg.lr, cfg.beta0)
    probs = team.probs()
    J, acc, eps = [task.J(probs)], [task.accuracy(probs)], [0]
    budget = stages * n_agents * cfg.prompts * cfg.samples  # teamtr's episodes in `stages` stages
    max_stages = stages * n_agents if equal_episodes else stages
    updates, stale_err, abs_gain, regress, regens = [], [], [], 0, 0
    st = 0
    while st < max_stages and (st < stages or eps[-1] < budget):
        prompt_idx = rng.integers(0, task.n_prompts, cfg.prompts)
        out = run_stage(task, team, schedule, cfg, st, seed, prompt_idx, rng)
        J.append(out["J_end"])
        acc.append(out["acc_end"])
        eps.append(eps[-1] + out["episodes"])
        if st < stages:
            updates += [{k: _round(u[k], 6) for k in UPDATE_FIELDS} for u in out["updates"]]
            stale_err.append(_round(out["stale_error"]))
            abs_gain.append(_round(out["abs_gain"]))
            regress += int(out["J_end"] - out["J_start"] < -REGRESSION_TOL)
            regens += out["regenerations"]
        st += 1
    k_eq = next((k for k, e in enumerate(eps) if e >= budget), None)  # None: the budget was not reached
    small = stages * cfg.prompts * cfg.samples  # stale's episodes in `stages` stages
    k_small = max(k for k, e in enumerate(eps) if e <= small)
    return dict(task=task_name, router=router, agents=n_agents, schedule=schedule, seed=seed, stages=stages,
                delta=cfg.delta, lr=cfg.lr, epochs=cfg.epochs, prompts=cfg.prompts, samples=cfg.samples,
                heldout_fraction=cfg.heldout_fraction, adaptive_kl=cfg.adaptive_kl if schedule == "adaptive" else None,
                trust_region=cfg.trust_region, bound=cfg.bound, init=init if task_name == "chaincode" else "noise",
                fid=fid if task_name == "chaincode" else None,
                initial_return=_round(J[0]), initial_accuracy=_round(acc[0]),
                final_return=_round(J[stages]), final_accuracy=_round(acc[stages]),
                regressions=regress, episodes=int(eps[stages]), regenerations=regens,
                eqep_budget=budget, eqep_stage=k_eq, eqep_episodes=None if k_eq is None else int(eps[k_eq]),
                eqep_return=None if k_eq is None else _round(J[k_eq]),
                eqep_accuracy=None if k_eq is None else _round(acc[k_eq]),
                small_budget=small, small_stage=k_small, small_return=_round(J[k_small]),
                small_accuracy=_round(acc[k_small]),
                return_curve=[_round(x, 5) for x in J], accuracy_curve=[_round(x, 5) for x in acc], episode_curve=eps,
                stale_error=stale_err, abs_gain=abs_gain, updates=updates, wall_s=round(time.perf_counter() - t0, 3))


# ----------------------------------------------------------------------------------------------------- summaries
def _mean_se(xs) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0


def _fmt(m: float, s: float | None = None, nd: int = 3) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.{nd}f}" if s is None else f"{m:.{nd}f} ± {s:.{nd}f}"


def certificate_stats(runs: list[dict]) -> dict:
    """Calibration (exact gain ≥ bound) and Spearman (bound vs exact gain, ĝ vs exact gain, per update pooled; the
    cumulative series per run, averaged) over the committed updates that have a bound."""
    ups = [u for r in runs for u in r["updates"] if u.get("bound") is not None]
    out = dict(updates=len(ups))
    if len(ups) < 2:
        return out
    b = [u["bound"] for u in ups]
    g = [u["exact_gain"] for u in ups]
    out.update(calibration=algos.calibration_fraction(b, g), spearman=algos.spearman_rank_correlation(b, g),
               spearman_is=algos.spearman_rank_correlation([u["is_gain"] for u in ups], g),
               spearman_surrogate=algos.spearman_rank_correlation([u["surrogate"] for u in ups], g),
               mean_bound=float(np.mean(b)), mean_gain=float(np.mean(g)))
    cums = []
    for r in runs:
        rb = [u for u in r["updates"] if u.get("bound") is not None]
        if len(rb) >= 2:
            c = algos.cumulative_spearman([u["bound"] for u in rb], [u["exact_gain"] for u in rb])
            if not math.isnan(c):
                cums.append(c)
    out["cumulative_spearman"] = float(np.mean(cums)) if cums else math.nan
    return out


def summary_tables(runs: list[dict]) -> str:
    lines = []
    keys = sorted({(r["task"], r["router"], r["agents"]) for r in runs})
    for task, router, n in keys:
        sub = [r for r in runs if (r["task"], r["router"], r["agents"]) == (task, router, n)]
        r0 = sub[0]
        seeds = sorted({r["seed"] for r in sub})
        lines.append(f"\n### {task} ({router}), N = {n}: δ {r0['delta']}, lr {r0['lr']}, E {r0['epochs']}, "
                     f"P {r0['prompts']} × G {r0['samples']}, {r0['stages']} stages, seeds {seeds}")
        lines.append(f"initial accuracy {_fmt(*_mean_se([r['initial_accuracy'] for r in sub]))}, initial return "
                     f"{_fmt(*_mean_se([r['initial_return'] for r in sub]))}")
        head = ("| schedule | acc@S | return@S | regressions/run | episodes@S | stale err/stage | "
                "acc @ S·P·G episodes (stage) | acc @ N·S·P·G episodes (stage) | return @ N·S·P·G episodes | "
                "calib. | Spearman(B, ΔJ) | cum. Spearman | Spearman(ĝ, ΔJ) | wall s/run |")
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for sch in SCHEDULES:
            rs = [r for r in sub if r["schedule"] == sch]
            if not rs:
                continue
            cs = certificate_stats(rs)
            row = [sch, _fmt(*_mean_se([r["final_accuracy"] for r in rs])),
                   _fmt(*_mean_se([r["final_return"] for r in rs])),
                   _fmt(float(np.mean([r["regressions"] for r in rs])), nd=2),
                   f"{int(np.mean([r['episodes'] for r in rs]))}",
                   _fmt(float(np.mean([np.mean(r["stale_error"]) for r in rs])), nd=4)]
            row.append(_fmt(*_mean_se([r["small_accuracy"] for r in rs]))
                       + f" ({np.mean([r['small_stage'] for r in rs]):.0f})")
            if all(r["eqep_stage"] is not None for r in rs):
                row += [_fmt(*_mean_se([r["eqep_accuracy"] for r in rs]))
                        + f" ({np.mean([r['eqep_stage'] for r in rs]):.0f})",
                        _fmt(*_mean_se([r["eqep_return"] for r in rs]))]
            else:
                row += ["not run", "not run"]
            row += [_fmt(cs.get("calibration", math.nan), nd=2), _fmt(cs.get("spearman", math.nan), nd=2),
                    _fmt(cs.get("cumulative_spearman", math.nan), nd=2), _fmt(cs.get("spearman_is", math.nan), nd=2),
                    _fmt(float(np.mean([r["wall_s"] for r in rs])), nd=1)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one-stage mode
def start_team(task: Task, seed: int, cfg: Config, init: str, fid: float, warm: int):
    """The counterfactual's start team (after ``warm`` teamtr stages) and the RNG that continues from it."""
    rng = np.random.default_rng(10_000 + seed)
    team = Team(init_tables(task, rng, init, fid), cfg.lr, cfg.beta0)
    for w in range(warm):  # teamtr stages to a mid-training team
        run_stage(task, team, "teamtr", cfg, -1 - w, seed, rng.integers(0, task.n_prompts, cfg.prompts), rng)
    return team, rng


def onestage(task_name: str, agents: list[int], seeds: list[int], schedules: list[str], cfg: Config, router: str,
             rounds: int, init: str, fid: float, warm: int) -> list[dict]:
    out = []
    for n in agents:
        task = make_task(task_name, n, router, rounds)
        for seed in seeds:
            t0 = time.perf_counter()
            team, rng = start_team(task, seed, cfg, init, fid, warm)
            prompt_idx = rng.integers(0, task.n_prompts, cfg.prompts)
            stage = 0
            heldout = heldout_prompts(cfg.prompts, cfg.heldout_fraction, stage, seed)
            first = regenerate(task, team, prompt_idx, np.arange(cfg.prompts), heldout, cfg.samples, rng,
                               cfg.a_clip, cfg.norm_eps)
            probs = team.probs()
            rec = dict(task=task_name, router=router, agents=n, seed=seed, warm=warm, delta=cfg.delta, lr=cfg.lr,
                       epochs=cfg.epochs, prompts=cfg.prompts, samples=cfg.samples, J_start=task.J(probs),
                       acc_start=task.accuracy(probs))
            for sch in schedules:
                if sch == "matched":
                    first_s = None  # matched regenerates on its own first part
                else:
                    first_s = first
                t = team.clone()
                res = run_stage(task, t, sch, cfg, stage, seed, prompt_idx, np.random.default_rng(7 + seed), first_s)
                errs = [u["S_used"] - u["exact_gain"] for u in res["updates"]]
                rec[sch] = dict(gain=res["J_end"] - res["J_start"], gain_acc=res["acc_end"] - res["acc_start"],
                                err_abs=float(np.sum(np.abs(errs))), err_pos=errs,
                                dJ=[u["exact_gain"] for u in res["updates"]], abs_gain=res["abs_gain"],
                                kl=[u["kl"] for u in res["updates"]], alpha=[u["alpha"] for u in res["updates"]],
                                bound=[u["bound"] for u in res["updates"]], episodes=res["episodes"])
            rec["wall_s"] = round(time.perf_counter() - t0, 3)
            out.append(rec)
        print(f"  onestage {task_name} N={n} done", file=sys.stderr, flush=True)
    return out


def fit_exponent(ns, ys) -> float:
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    ok = ys > 1e-12
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(ns[ok]), np.log(ys[ok]), 1)[0])


def onestage_tables(recs: list[dict], schedules: list[str]) -> str:
    lines = []
    ns = sorted({r["agents"] for r in recs})
    r0 = recs[0]
    lines.append(f"\n### one-stage counterfactual: {r0['task']} ({r0['router']}), δ {r0['delta']}, lr {r0['lr']}, "
                 f"E {r0['epochs']}, P {r0['prompts']} × G {r0['samples']}, warm {r0['warm']}, "
                 f"{len({r['seed'] for r in recs})} seeds")
    head = ("| N | J_start | " + " | ".join(f"gain {s}" for s in schedules) + " | "
            + " | ".join(f"Σ\\|err\\| {s} (rel.)" for s in schedules) + " | \\|err\\| by position i (stale) |")
    lines.append(head)
    lines.append("|" + "---|" * (3 + 2 * len(schedules)))
    mean_err = {s: [] for s in schedules}
    mean_rel = {s: [] for s in schedules}
    for n in ns:
        sub = [r for r in recs if r["agents"] == n]
        row = [str(n), _fmt(float(np.mean([r["J_start"] for r in sub])), nd=4)]
        row += [_fmt(*_mean_se([r[s]["gain"] for r in sub]), nd=4) for s in schedules]
        for s in schedules:
            e = float(np.mean([r[s]["err_abs"] for r in sub]))
            rel = e / max(float(np.mean([r[s]["abs_gain"] for r in sub])), 1e-300)
            mean_err[s].append(e)
            mean_rel[s].append(rel)
            row.append(f"{e:.2e} ({rel:.3f})")
        if "stale" in schedules:
            pos = np.mean([np.abs(r["stale"]["err_pos"]) for r in sub], axis=0)
            row.append(", ".join(f"{x:.2g}" for x in pos))
        else:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\nfitted exponent of the mean stale error Σ_i|S_used,i − ΔJ_i| over N (log-log slope; "
                 "absolute / relative to Σ_i|ΔJ_i|), beside the paper's:")
    for s in schedules:
        a, r = fit_exponent(ns, mean_err[s]), fit_exponent(ns, mean_rel[s])
        zero = all(e < 1e-12 for e in mean_err[s])
        paper = {"stale": " (paper, naive sequential: 1.94)", "teamtr": " (paper, TeamTR: 1.07)"}.get(s, "")
        lines.append(f"- {s}: " + ("0 to rounding (< 1e-12) at every N: no exponent" if zero else f"N^{a:.2f} absolute, "
                                   f"N^{r:.2f} relative") + paper)
    return "\n".join(lines)


def onestage_exponents(recs: list[dict], schedules: list[str]) -> dict:
    ns = sorted({r["agents"] for r in recs})
    out = {}
    for s in schedules:
        e = [float(np.mean([r[s]["err_abs"] for r in recs if r["agents"] == n])) for n in ns]
        g = [float(np.mean([r[s]["abs_gain"] for r in recs if r["agents"] == n])) for n in ns]
        out[s] = dict(N=ns, err=e, exponent_abs=fit_exponent(ns, e),
                      exponent_rel=fit_exponent(ns, [x / max(y, 1e-300) for x, y in zip(e, g)]))
    return out


# ------------------------------------------------------------------------------------------------ summarize mode
def read_json(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _setting(r: dict) -> str:
    bound = r.get("bound", "is_lcb")  # runs saved before the form was recorded used the default
    return f"{r['task']} ({r['router']}) δ {r['delta']} lr {r['lr']} E {r['epochs']}" + (
        f", bound {bound}" if bound != "is_lcb" else "")


def cross_n_tables(runs: list[dict]) -> str:
    """Per setting, one row per N: acc@S of every schedule, the paired teamtr − stale difference (same seeds start
    from the same team), stale at teamtr's episodes, and the mean stale error per stage."""
    lines = []
    for setting in sorted({_setting(r) for r in runs}):
        sub = [r for r in runs if _setting(r) == setting]
        schs = [s for s in SCHEDULES if any(r["schedule"] == s for r in sub)]
        lines.append(f"\n### {setting}, {sub[0]['stages']} stages, P {sub[0]['prompts']} × G {sub[0]['samples']}, "
                     f"{len({r['seed'] for r in sub})} seeds: accuracy at equal stages (S) and equal episodes")
        head = ("| N | " + " | ".join(f"{s} acc@S" for s in schs) + " | teamtr − stale (paired) | "
                "regressions/run teamtr / stale | stale acc @ teamtr's episodes (N·S stages) | "
                "stale err/stage: stale / adaptive |")
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for n in sorted({r["agents"] for r in sub}):
            by = {s: sorted((r for r in sub if r["agents"] == n and r["schedule"] == s), key=lambda r: r["seed"])
                  for s in schs}
            row = [str(n)] + [_fmt(*_mean_se([r["final_accuracy"] for r in by[s]])) for s in schs]
            if by.get("teamtr") and by.get("stale"):
                st = {r["seed"]: r for r in by["stale"]}
                d = [r["final_accuracy"] - st[r["seed"]]["final_accuracy"] for r in by["teamtr"] if r["seed"] in st]
                row.append(_fmt(*_mean_se(d)))
                row.append(f"{np.mean([r['regressions'] for r in by['teamtr']]):.2f} / "
                           f"{np.mean([r['regressions'] for r in by['stale']]):.2f}")
                eq = [r["eqep_accuracy"] for r in by["stale"]]
                row.append(_fmt(*_mean_se(eq)) if all(e is not None for e in eq) else "not run")
            else:
                row += ["", "", ""]
            errs = [_fmt(float(np.mean([np.mean(r["stale_error"]) for r in by[s]])), nd=4)
                    for s in ("stale", "adaptive") if by.get(s)]
            row.append(" / ".join(errs))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def certificate_table(runs: list[dict]) -> str:
    """Calibration and rank correlations of the per-update certificate against the exact gains, per setting and
    schedule (pooled over N and seeds), with the share of committed updates left without a bound (the trainer's
    rule, ``algos.can_bound``: every held-out group flat, so no information on the update)."""
    lines = ["| setting | schedule | committed updates | share without a bound | calibration (ΔJ ≥ B) | "
             "Spearman(B, ΔJ) | cum. Spearman (mean/run) | Spearman(ĝ, ΔJ) | Spearman(L̂, ΔJ) | "
             "mean B | mean ΔJ |", "|" + "---|" * 11]
    for setting in sorted({_setting(r) for r in runs}):
        for s in SCHEDULES:
            rs = [r for r in runs if _setting(r) == setting and r["schedule"] == s]
            if not rs:
                continue
            cs = certificate_stats(rs)
            committed = [u for r in rs for u in r["updates"] if u["committed"]]
            unbounded = sum(1 for u in committed if u.get("bound") is None) / max(len(committed), 1)
            lines.append("| " + " | ".join([
                setting, s, str(len(committed)), _fmt(unbounded, nd=2), _fmt(cs.get("calibration", math.nan)),
                _fmt(cs.get("spearman", math.nan), nd=2),
                _fmt(cs.get("cumulative_spearman", math.nan), nd=2), _fmt(cs.get("spearman_is", math.nan), nd=2),
                _fmt(cs.get("spearman_surrogate", math.nan), nd=2), f"{cs.get('mean_bound', math.nan):.4g}",
                f"{cs.get('mean_gain', math.nan):.4g}"]) + " |")
    return "\n".join(lines)


def summarize(paths: list[str]) -> str:
    runs, one = [], []
    walls = []
    for p in paths:
        d = read_json(p)
        walls.append(f"- `{d['command']}`: {d['wall_s']:.0f} s ({d['date']})")
        (one if d["mode"] == "onestage" else runs).extend(d["runs"])
    out = ["## equal stages and equal episodes", cross_n_tables(runs) if runs else "(no runs)",
           "\n## certificate against the exact gains", certificate_table(runs) if runs else "(no runs)"]
    if one:
        out.append("\n## one-stage counterfactuals")
        for key in sorted({(r["task"], r["router"], r["delta"]) for r in one}):
            sub = [r for r in one if (r["task"], r["router"], r["delta"]) == key]
            schs = [s for s in SCHEDULES if s in sub[0]]
            out.append(onestage_tables(sub, schs))
    out.append("\n## wall times\n" + "\n".join(walls))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------- CLI
def machine_line() -> str:
    return (f"{platform.machine()} {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
            f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")


def write_json(path: str, obj) -> None:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=True)
    if path.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        with open(path, "w") as f:
            f.write(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASKS, default="budget_sq")
    ap.add_argument("--router", choices=ROUTERS, default="chain")
    ap.add_argument("--rounds", type=int, default=2, help="round_robin: rounds per episode")
    ap.add_argument("--agents", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", type=int, default=30)
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument("--json", default=None, help="output file (.json or .json.gz)")
    ap.add_argument("--delta", type=float, default=0.02)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=4, help="Adam steps per agent update")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--beta0", type=float, default=DEFAULT_BETA, help="initial β of each agent (adapted per update)")
    ap.add_argument("--clip", type=float, default=DEFAULT_CLIP_RATIO)
    ap.add_argument("--max-backtracks", type=int, default=DEFAULT_MAX_BACKTRACKS)
    ap.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION)
    ap.add_argument("--bound", choices=("is_lcb", "theorem"), default="is_lcb")
    ap.add_argument("--adaptive-kl", type=float, default=None, help="adaptive: regeneration threshold (default δ)")
    ap.add_argument("--no-trust-region", action="store_true", help="keep the optimizer's full step (enforce=false)")
    ap.add_argument("--equal-episodes", nargs="*", choices=SCHEDULES, default=None,
                    help="run these schedules (no name: stale) on to teamtr's episode budget of --stages stages "
                         "(at most N·S stages)")
    ap.add_argument("--init", choices=("mis", "coord", "uniform"), default="mis", help="chaincode init")
    ap.add_argument("--fid", type=float, default=0.8, help="chaincode init: per-hop fidelity")
    ap.add_argument("--onestage", action="store_true", help="one-stage counterfactuals instead of full runs")
    ap.add_argument("--warm", type=int, default=0, help="onestage: teamtr stages before the counterfactual stage")
    ap.add_argument("--summarize", nargs="+", metavar="JSON", help="print the tables of earlier --json outputs")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.summarize:
        print(summarize(a.summarize))
        return 0
    cfg = Config(delta=a.delta, lr=a.lr, epochs=a.epochs, clip=a.clip, beta0=a.beta0, max_backtracks=a.max_backtracks,
                 heldout_fraction=a.heldout_fraction, bound=a.bound, prompts=a.prompts, samples=a.samples,
                 adaptive_kl=a.adaptive_kl, trust_region=not a.no_trust_region)
    t0 = time.perf_counter()
    header = dict(command="python benchmarks/occupancy_shift.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=machine_line())
    print(f"# occupancy_shift: {header['command']}\n- date: {header['date']}\n- machine: {header['machine']}")
    if a.onestage:
        recs = onestage(a.task, a.agents, a.seeds, a.schedules, cfg, a.router, a.rounds, a.init, a.fid, a.warm)
        print(onestage_tables(recs, a.schedules))
        wall = time.perf_counter() - t0
        print(f"\nwall time {wall:.1f} s")
        if a.json:
            write_json(a.json, dict(header, mode="onestage", wall_s=round(wall, 2), runs=recs,
                                    exponents=onestage_exponents(recs, a.schedules)))
        return 0
    eqep = set() if a.equal_episodes is None else set(a.equal_episodes or ["stale"])
    runs = []
    for n in a.agents:
        for sch in a.schedules:
            for seed in a.seeds:
                r = run(a.task, n, sch, seed, a.stages, cfg, a.router, a.rounds, a.init, a.fid, sch in eqep)
                runs.append(r)
                print(f"  {a.task} N={n} {sch} seed={seed}: acc {r['final_accuracy']:.3f} J {r['final_return']:.3f} "
                      f"({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    print(summary_tables(runs))
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s")
    if a.json:
        write_json(a.json, dict(header, mode="runs", wall_s=round(wall, 2), runs=runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
