#!/usr/bin/env bash
# The central comparison: the same team and budget, naive sequential updates on one rollout per stage.
exec bash "$(dirname "$0")/run_teamtr.sh" teamtr.schedule=stale trainer.experiment_name=gsm8k_solver_verifier_stale "$@"
