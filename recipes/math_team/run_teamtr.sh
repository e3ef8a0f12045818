#!/usr/bin/env bash
# The paper's three-agent math team with TeamTR.
#   bash recipes/math_team/run_teamtr.sh homogeneous|heterogeneous [Hydra overrides...]
#   bash recipes/math_team/run_teamtr.sh heterogeneous teamtr.schedule=stale     # the stale baseline
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VARIANT=${1:-homogeneous}; shift || true
exec python -m verl.trainer.main_ppo --config-path="$HERE" --config-name="config_${VARIANT}" \
  reward.custom_reward_function.path="$HERE/reward.py" reward.custom_reward_function.name=compute_score "$@"
