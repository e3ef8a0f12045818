#!/usr/bin/env bash
# GSM8K solver -> verifier team on one GPU with TeamTR. Extra Hydra overrides are passed through, e.g.
#   bash recipes/gsm8k_solver_verifier/run_teamtr.sh teamtr.schedule=stale    # the paper's stale baseline
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
exec python -m verl.trainer.main_ppo --config-path="$HERE" --config-name=config "$@"
