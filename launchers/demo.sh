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
"$DS" --num_gpus 2 rskdist/train.py --config configs/demo.yaml "$@"
RUN_DIR=$("$PY" -c "import sys; from rskdist.config import load_config; c = load_config('configs/demo.yaml', sys.argv[1:]); print(f'{c.run.output_dir}/{c.run.name}')" "$@")
echo "== report"
"$PY" tools/report.py "$RUN_DIR"
