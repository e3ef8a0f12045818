"""TeamTR algorithm core: pure tensor math, torch/numpy only (no verl, Ray or vLLM import).

Equation numbers follow the TeamTR paper (ICML 2026) as summarised in ``docs/paper_map.md``, which also records every
choice made where the paper is silent. Shapes follow verl's ``core_algos`` conventions: ``(bs, response_length)``
tensors hold one row per *message* (one agent's response in one turn of one team trajectory).

  * :mod:`.advantage`    Eq. 9 bounded group-normalized advantage; verl estimator ``teamtr``
  * :mod:`.loss`         Eq. 11 token-decomposed KL monitor, Eq. 10 trust-region loss; verl policy loss ``teamtr``
  * :mod:`.control`      β controller (verl's adaptive rule, once per update) and the line-search step rule
  * :mod:`.certificate`  per-update gain estimates (paired, importance-sampled), the bound, calibration, Spearman
  * :mod:`.happo`        the HAPPO importance factor (``happo`` schedule)
  * :mod:`.stage0`       Prop. 3.8 Stage-0 alignment of a replacement agent: geometric-mixture target, distillation losses, stopping rule
  * :mod:`.checks`       argument checks: every error names the argument and the offending value

``from teamtr_verl import algos; algos.<name>`` reaches every public name. Bad input raises a ``ValueError`` that
names the argument and the value. Values at masked positions are never read: padding may hold anything, even NaN.
"""

from teamtr_verl.algos.advantage import (
    GroupAdvantage,
    RowAdvantage,
    bounded_group_advantage,
    broadcast_to_tokens,
    compute_teamtr_advantage,
    compute_teamtr_outcome_advantage,
    teamtr_row_advantage,
)
from teamtr_verl.algos.certificate import (
    GainEstimate,
    UpdateBound,
    average_ranks,
    calibration_fraction,
    can_bound,
    cumulative_spearman,
    importance_gain,
    is_lower_bound,
    leave_one_out_centered,
    paired_gain,
    spearman_rank_correlation,
    surrogate_gain,
    theorem_bound,
    theorem_constant,
    trajectory_log_ratio,
    trajectory_ratio_excess,
    update_bound,
)
from teamtr_verl.algos.checks import factorize
from teamtr_verl.algos.control import (
    BetaState,
    LineSearchResult,
    StepEval,
    adapt_beta,
    first_step_fraction,
    line_search,
)
from teamtr_verl.algos.happo import happo_factor
from teamtr_verl.algos.loss import (
    aggregate_loss,
    compute_teamtr_policy_loss,
    message_log_ratio,
    teamtr_policy_loss,
    token_kl,
    token_kl_monitor,
)
from teamtr_verl.algos.stage0 import (
    AlignmentVerdict,
    MixtureTarget,
    alignment_verdict,
    exact_kl,
    geometric_mixture,
    message_kl,
    mixture_within,
    topk_forward_kl,
    topk_mixture_target,
    with_rest,
)
from teamtr_verl.defaults import (
    DEFAULT_A_CLIP,
    DEFAULT_BETA,
    DEFAULT_CLIP_RATIO,
    DEFAULT_CLIP_RATIO_C,
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_KL_REDUCTION,
    DEFAULT_NORM_EPS,
    DEFAULT_RATIO_LEVEL,
    LOSS_AGG_MODES,
)

__all__ = [
    "DEFAULT_A_CLIP", "DEFAULT_BETA", "DEFAULT_CLIP_RATIO", "DEFAULT_CLIP_RATIO_C", "DEFAULT_KL_ESTIMATOR",
    "DEFAULT_KL_REDUCTION", "DEFAULT_NORM_EPS", "DEFAULT_RATIO_LEVEL", "LOSS_AGG_MODES",
    "factorize",
    # advantage
    "GroupAdvantage", "RowAdvantage", "bounded_group_advantage", "broadcast_to_tokens", "compute_teamtr_advantage",
    "compute_teamtr_outcome_advantage", "teamtr_row_advantage",
    # loss
    "aggregate_loss", "compute_teamtr_policy_loss", "message_log_ratio", "teamtr_policy_loss", "token_kl",
    "token_kl_monitor",
    # control
    "BetaState", "LineSearchResult", "StepEval", "adapt_beta", "first_step_fraction", "line_search",
    # certificate
    "GainEstimate", "UpdateBound", "average_ranks", "calibration_fraction", "can_bound", "cumulative_spearman",
    "importance_gain", "is_lower_bound", "leave_one_out_centered", "paired_gain", "spearman_rank_correlation",
    "surrogate_gain", "theorem_bound", "theorem_constant", "trajectory_log_ratio", "trajectory_ratio_excess",
    "update_bound",
    # happo
    "happo_factor",
    # stage0
    "AlignmentVerdict", "MixtureTarget", "alignment_verdict", "exact_kl", "geometric_mixture", "message_kl",
    "mixture_within", "topk_forward_kl", "topk_mixture_target", "with_rest",
]
