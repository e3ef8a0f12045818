#!/usr/bin/env bash
# The demo: a two-agent relay team learns to pass a secret digit, trained with TeamTR through the stock entry point.
#   bash recipes/tiny_cpu/run_relay_demo.sh [OUT_DIR] [extra Hydra overrides...]
# alice sees the secret x, bob sees only alice's message and must answer "#### x" (teamtr_verl/fixtures/relay.py).
# Both are 353k-parameter Qwen2 models with a task-trained tokenizer and a short supervised warm start (~30 s).
set -euo pipefail
PY=${PY:-python}
OUT=${1:-.demo/teamtr_relay_cpu}; shift || true
STAGES=${STAGES:-15}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CONFIG_DIR=$("$PY" -c 'import pathlib, teamtr_verl; print(pathlib.Path(teamtr_verl.__file__).parent / "configs")')
[ -f "$OUT/team/data/train.parquet" ] || "$PY" -m teamtr_verl.fixtures relay "$OUT/team" --agents alice bob
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled VERL_FILE_LOGGER_PATH="$OUT/metrics.jsonl"
rm -f "$OUT/metrics.jsonl"
LOG="$OUT/train.log"
echo "teamtr demo: $STAGES stages of a two-agent relay team on CPU (~1 min each after ~2 min of start-up)"
echo "teamtr demo: verl's full log goes to $LOG; one line per stage here"
set +e
"$PY" -m verl.trainer.main_ppo --config-path="$CONFIG_DIR" --config-name=teamtr_relay_cpu \
  "teamtr.agents=[{name: alice, model: '$OUT/team/alice'}, {name: bob, model: '$OUT/team/bob'}]" \
  data.train_files="$OUT/team/data/train.parquet" data.val_files="$OUT/team/data/test.parquet" \
  trainer.total_training_steps="$STAGES" trainer.default_local_dir="$OUT/ckpt" trainer.resume_mode=disable \
  "$@" 2>&1 | tee "$LOG" | grep --line-buffered -o "teamtr stage .*"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  echo "teamtr demo: training failed (exit $rc); the end of $LOG:" >&2
  tail -n 40 "$LOG" >&2
  exit "$rc"
fi
"$PY" -m teamtr_verl.summary "$OUT/metrics.jsonl"
"$PY" -m teamtr_verl.plot "$OUT/metrics.jsonl" -o "$OUT/teamtr_run.png"
