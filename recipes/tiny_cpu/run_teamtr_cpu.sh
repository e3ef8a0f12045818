#!/usr/bin/env bash
# A two-agent TeamTR run on CPU with the tiny fixtures, through the stock entry point, then its summary and plot.
#   bash recipes/tiny_cpu/run_teamtr_cpu.sh [OUT_DIR] [extra Hydra overrides...]
# Agents: alice (427k params, seed 0) and bob (another size and tokenizer, seed 1), chain router, teamtr schedule.
set -euo pipefail
PY=${PY:-python}
OUT=${1:-.demo/teamtr_tiny_cpu}; shift || true
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CONFIG_DIR=$("$PY" -c 'import pathlib, teamtr_verl; print(pathlib.Path(teamtr_verl.__file__).parent / "configs")')
[ -f "$OUT/alice/config.json" ] || "$PY" -m teamtr_verl.fixtures model "$OUT/alice" --seed 0
[ -f "$OUT/bob/config.json" ] || "$PY" -m teamtr_verl.fixtures model "$OUT/bob" --seed 1 --hidden 64 --heads 1
[ -f "$OUT/data/train.parquet" ] || "$PY" -m teamtr_verl.fixtures data "$OUT/data"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled VERL_FILE_LOGGER_PATH="$OUT/metrics.jsonl"
rm -f "$OUT/metrics.jsonl"
"$PY" -m verl.trainer.main_ppo --config-path="$CONFIG_DIR" --config-name=teamtr_tiny_cpu \
  "teamtr.agents=[{name: alice, model: '$OUT/alice'}, {name: bob, model: '$OUT/bob'}]" \
  data.train_files="$OUT/data/train.parquet" data.val_files="$OUT/data/test.parquet" \
  trainer.total_training_steps=3 trainer.logger='[console,file]' trainer.default_local_dir="$OUT/ckpt" \
  trainer.resume_mode=disable \
  "$@"
"$PY" -m teamtr_verl.summary "$OUT/metrics.jsonl"
"$PY" -m teamtr_verl.plot "$OUT/metrics.jsonl" -o "$OUT/teamtr_run.png"
