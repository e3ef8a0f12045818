#!/usr/bin/env bash
# The central comparison: same team and budget, one rollout per stage (naive sequential updates).
VARIANT=${1:-homogeneous}; shift || true
exec bash "$(dirname "$0")/run_teamtr.sh" "$VARIANT" teamtr.schedule=stale \
  trainer.experiment_name="math_team_${VARIANT}_stale" "$@"
