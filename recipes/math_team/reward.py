"""Reward of the math team: 1 if the last \\boxed{} of the scored message equals the ground truth (verl's MATH
equivalence, verl.utils.reward_score.math_reward), else 0. The same for every data source of prepare_data.py."""

from verl.utils.reward_score import math_reward


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    return float(math_reward.compute_score(solution_str, str(ground_truth)))
