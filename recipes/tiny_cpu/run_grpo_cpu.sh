#!/usr/bin/env bash
# Stock single-agent GRPO of verl 0.9.1 on CPU with the tiny fixtures (what the foundation's e2e test runs).
#   bash recipes/tiny_cpu/run_grpo_cpu.sh [OUT_DIR] [extra Hydra overrides...]
# Builds the tiny model and dataset into OUT_DIR (default .demo/grpo_tiny_cpu), then runs the stock entry point.
# Measured on a 2-core CPU machine: see README.md ("Budgets").
set -euo pipefail
PY=${PY:-python}
OUT=${1:-.demo/grpo_tiny_cpu}; shift || true
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CONFIG_DIR=$("$PY" -c 'import pathlib, teamtr_verl; print(pathlib.Path(teamtr_verl.__file__).parent / "configs")')
[ -f "$OUT/model/config.json" ] || "$PY" -m teamtr_verl.fixtures model "$OUT/model"
[ -f "$OUT/data/train.parquet" ] || "$PY" -m teamtr_verl.fixtures data "$OUT/data"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled VERL_FILE_LOGGER_PATH="$OUT/metrics.jsonl"
exec "$PY" -m verl.trainer.main_ppo --config-path="$CONFIG_DIR" --config-name=grpo_tiny_cpu \
  actor_rollout_ref.model.path="$OUT/model" \
  data.train_files="$OUT/data/train.parquet" data.val_files="$OUT/data/test.parquet" \
  trainer.logger='[console,file]' trainer.default_local_dir="$OUT/ckpt" \
  "$@"
