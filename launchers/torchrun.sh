#!/usr/bin/env bash
# torchrun on one node, or on several by running it on each with its NODE_RANK.
#
#   CONFIG=configs/X.yaml NPROC=8 bash launchers/torchrun.sh [key=value ...]
#   CONFIG=... NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launchers/torchrun.sh
#
# NPROC (processes per node, default: GPUs, or 2 on CPU), NNODES (default 1), NODE_RANK
# (default 0), MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500), CONFIG.
# After a lost node, run it again with the nodes left (NNODES, NPROC): the run resumes from
# its latest checkpoint on the new world size with the same global batches (docs/launching.md).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CONFIG:?set CONFIG=configs/<experiment>.yaml}"
NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count() or 2)")}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec ${TORCHRUN:-torchrun} --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  rskdist/train.py --config "$CONFIG" "$@"
