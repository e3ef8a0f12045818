"""One source of truth for teamtr-verl's names, defaults and choice lists (standard library only).

Everything a user can type (a schedule, an estimator, a router kind) or that two modules must agree on (a registry
name, an ``extra_fields`` key) is defined here once; :mod:`teamtr_verl.config` validates against these lists and
:mod:`teamtr_verl.algos` uses the numeric defaults. The reasons for each default are in ``docs/paper_map.md``.
"""

# ---------------------------------------------------------------------------------------------- registry names
TRAINER_MODE = "teamtr"  # trainer.v1.trainer_mode
ADV_ESTIMATOR_NAME = "teamtr"  # algorithm.adv_estimator
POLICY_LOSS_NAME = "teamtr"  # actor_rollout_ref.actor.policy_loss.loss_mode
AGENT_LOOP_NAME = "teamtr_handoff"  # actor_rollout_ref.rollout.agent.default_agent_loop
AGENT_LOOP_MANAGER = "teamtr_verl.team.TeamAgentLoopManager"

# ------------------------------------------------------------------------------------- Eq. 9 / Eq. 10 defaults
DEFAULT_A_CLIP = 5.0  # advantage clip A_clip of Eq. 9 (the predecessor SAT code uses 5.0)
DEFAULT_NORM_EPS = 1e-6  # ε_norm inside the square root of Eq. 9
DEFAULT_BETA = 0.1  # initial β of Eq. 10
DEFAULT_CLIP_RATIO = 0.2  # PPO ε when no actor config is given (verl's default)
DEFAULT_CLIP_RATIO_C = 3.0  # dual-clip bound, as verl's vanilla loss
DEFAULT_KL_ESTIMATOR = "k3"  # non-negative, low variance; "k1" is Eq. 11 verbatim
DEFAULT_KL_REDUCTION = "message_sum"  # Eq. 11: sum over a message's tokens, mean over messages
DEFAULT_RATIO_LEVEL = "token"  # per-token ratio as verl's vanilla loss; "message" is the paper's product ratio
DEFAULT_HAPPO_FACTOR_CLIP = (0.5, 2.0)

# ------------------------------------------------------------------------------------ trust region (δ, β, step)
DEFAULT_MAX_BACKTRACKS = 5  # halvings of the step after the first (scaled) try
DEFAULT_STEP_SAFETY = 0.9  # first try α = min(1, safety·sqrt(δ/KL_full)): KL ≈ α²·KL_full lands just inside δ
DEFAULT_BETA_MAX_STEP = 0.2  # verl's AdaptiveKLController clips its proportional error at ±0.2

# ----------------------------------------------------------------------------------------------- certificate
DEFAULT_CONFIDENCE_T = 1.645  # one-sided 95 % normal quantile for the lower confidence bound
DEFAULT_HELDOUT_FRACTION = 0.25  # prompt groups kept out of the gradient to measure the update on

# Log-ratio clamps, for numerical stability only (documented where used):
TOKEN_LOG_RATIO_CLAMP = 20.0  # verl's vanilla loss and k3 clamp the per-token log-ratio to ±20
MESSAGE_LOG_RATIO_CLAMP = 10.0  # verl's gspo clamps the sequence log-ratio at 10; we clamp to ±10

# ---------------------------------------------------------------------------------------------- choice lists
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")
KL_REDUCTIONS = ("message_sum", "token_mean", "none")
RATIO_LEVELS = ("token", "message")
TRAJECTORY_RETURN_MODES = ("sum", "last")
# is_lcb: importance-sampled lower confidence bound on held-out groups (default, return units);
# theorem: Thm. 3.4 with the finite-horizon constant sqrt(2)·ε·n_j·(n_j−1) (docs/paper_map.md derives both).
CERTIFICATE_BOUNDS = ("is_lcb", "theorem")
ROUTER_KINDS = ("chain", "round_robin", "random", "sequence")
PLACEMENTS = ("split", "colocate")
# teamtr: regenerate before every agent update; stale: one rollout per stage, sequential updates on it;
# happo: stale + HAPPO importance factor instead of resampling (the paper's Table 2b ablation).
SCHEDULES = ("teamtr", "stale", "happo")
ORDERS = ("fixed", "reversed", "random")
# all: every regeneration of a stage covers its whole prompt batch; split: update i regenerates only the i-th of N
# disjoint parts (a matched rollout budget: a stage generates as many episodes as a stale stage).
PROMPTS_PER_UPDATE = ("all", "split")
ON_NONFINITE = ("error", "skip")
RESUME_MODES = ("auto", "disable", "resume_path")

# ------------------------------------------------------------------------------- keys shared across modules
AGENT_FIELD = "teamtr_agent"  # extra_fields key: who wrote a row
TURN_FIELD = "teamtr_turn"  # extra_fields key: the turn index of a row in its episode
REUSED_FIELD = "teamtr_reused"  # extra_fields key: a turn taken from the previous regeneration (prefix reuse)
# dataset-row field the trainer sets to reuse an episode's first turns from the previous regeneration of the same
# episode: JSON {session: [[prompt_ids, response_ids, log_probs or null, server extra_fields], ...]}
PREFIX_FIELD = "teamtr_prefix"
# dataset-row field of a Stage-0 probe: the swapped agent still speaks as the incumbent (its model's tokenizer)
PROBE_FIELD = "teamtr_probe"
# a turn's extra field: the model whose tokenizer wrote its ids (the reward decodes the answer with it)
MODEL_FIELD = "teamtr_model"
AGENT_VIEWS_KEY = "agent_views"  # extra_info key: per-agent views of a dataset row
