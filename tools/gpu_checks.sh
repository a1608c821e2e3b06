#!/usr/bin/env bash
# The GPU checks the issues ask for, as one script for a machine with one NVIDIA GPU.
# Results (JSON lines and logs) go to ${OUT:-runs/gpu_checks}. Prepared on a CPU-only
# machine: it has not run on a GPU yet, so expect to fix small things on first use.
#
#   bash tools/gpu_checks.sh            # all checks, about 10 minutes on an H100
#   CHECKS="loss eval" bash tools/gpu_checks.sh
#
# Needs torch with CUDA, timm, deepspeed, webdataset, open_clip_torch and faiss-gpu
# importable (pip install -e ".[gpu]" where a registry is reachable).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
PY=${PY:-python3}
CHECKS=${CHECKS:-"env loss eval step tests"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

for check in $CHECKS; do
  echo "== $check"
  case $check in
    env)  # what the machine is
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
      "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
      ;;
    loss)  # the loss table on GPU: floor, eager vs the fused triton backend, with and without SiMix
      "$PY" tools/bench_loss.py --device cuda --sizes 4096 16384 65536 --impls floor eager triton dense \
        --repeats 2 --timeout 240 --out "$OUT/loss.jsonl" --dense-max-gb 60
      "$PY" tools/bench_loss.py --device cuda --sizes 4096 16384 65536 --simix --impls floor eager triton \
        --repeats 1 --timeout 240 --out "$OUT/loss.jsonl"
      "$PY" tools/bench_loss.py --device cuda --dtype bf16 --sizes 16384 --impls blockwise --out "$OUT/loss.jsonl"
      ;;
    eval)  # all-vs-all 136k on GPU (target: under 10 s)
      "$PY" tools/bench_eval.py --sizes 136093 | tee "$OUT/eval.jsonl"
      ;;
    step)  # ViT-L/16, 224 px, bf16, ZeRO-2, activation checkpointing; chunk size sweep
      for chunk in 128 256 512 1024; do
        "$PY" rskdist/train.py --config configs/debug.yaml run.output_dir="$OUT/step" run.name="vitl_chunk$chunk" \
          run.resume=never run.max_steps=3 eval.every_epochs=-1 run.save_every=0 \
          model.backbone=vit_large_patch16_224 model.image_size=224 "model.backbone_kwargs={}" model.embed_dim=512 \
          model.grad_checkpointing=true deepspeed.precision=bf16 deepspeed.zero_stage=2 \
          data.global_batch=$((chunk * 4)) data.chunk_size=$chunk data.synthetic_classes=$chunk \
          > "$OUT/step_chunk$chunk.log" 2>&1 || { echo "chunk $chunk failed (out of memory?)"; break; }
        tail -n 1 "$OUT/step/vitl_chunk$chunk/metrics.jsonl"
        "$PY" tools/estimate_memory.py --config configs/debug.yaml --world-size 1 --device cuda \
          model.backbone=vit_large_patch16_224 model.image_size=224 "model.backbone_kwargs={}" model.embed_dim=512 \
          model.grad_checkpointing=true deepspeed.precision=bf16 deepspeed.zero_stage=2 \
          data.global_batch=$((chunk * 4)) data.chunk_size=$chunk | tee -a "$OUT/estimate.jsonl"
      done
      ;;
    tests)  # the gpu tier and the loss on CUDA
      "$PY" -m pytest -m gpu -q tests | tee "$OUT/tests.txt"
      ;;
  esac
done
echo "results in $OUT"
