#!/usr/bin/env bash
# The main job: build the demo shards, train on 2 CPU processes through the deepspeed
# launcher, evaluate, plot and report. Usage: bash launchers/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ ! -f data/demo/index.json ]; then
  echo "== building the demo dataset (data/demo)"
  "$PY" tools/make_shards.py demo --out data/demo
fi
echo "== training: deepspeed --num_gpus 2 rskdist/train.py --config configs/demo.yaml $*"
# Run it as a job of its own process group, so that a signal to this script (`kill PID`, a
# scheduler, Ctrl-C) goes to the deepspeed command alone: its ranks then finish the step,
# save it and exit 143 (docs/launching.md). Wait for the ranks, not just the command.
set -m
"$DS" --num_gpus 2 rskdist/train.py --config configs/demo.yaml "$@" &
DS_PID=$!
set +m
trap 'kill -TERM "$DS_PID" 2>/dev/null || true' TERM INT
STATUS=0
wait "$DS_PID" || STATUS=$?
while kill -0 "$DS_PID" 2>/dev/null; do wait "$DS_PID" || STATUS=$?; done  # a trapped signal ends the first wait
while ps -eo pgid=,stat= | awk -v g="$DS_PID" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'; do
  sleep 1  # the ranks of a signalled run are still saving
done
trap - TERM INT
if [ "$STATUS" -ne 0 ]; then
  echo "== training stopped (exit $STATUS); rerun the same command to resume" >&2
  exit "$STATUS"
fi
RUN_DIR=$("$PY" -c "import sys; from rskdist.config import load_config; c = load_config('configs/demo.yaml', sys.argv[1:]); print(f'{c.run.output_dir}/{c.run.name}')" "$@")
echo "== report"
"$PY" tools/report.py "$RUN_DIR"
