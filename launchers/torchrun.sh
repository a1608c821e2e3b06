#!/usr/bin/env bash
# torchrun under PyTorch's elastic agent: one node, or several by running it on each.
#
#   CONFIG=configs/X.yaml NPROC=8 bash launchers/torchrun.sh [key=value ...]
#   CONFIG=... NNODES=4 MASTER_ADDR=10.0.0.1 bash launchers/torchrun.sh        # on each of the 4 nodes
#   CONFIG=... NNODES=2:4 MASTER_ADDR=10.0.0.1 bash launchers/torchrun.sh      # go on with 2 or 3 nodes
#
# The agent restarts the whole group when a rank fails (up to MAX_RESTARTS times); the
# restarted ranks resume from the run folder's latest complete checkpoint. The nodes meet
# through a c10d rendezvous on MASTER_ADDR:MASTER_PORT (served by the agent there, so start
# this script on MASTER_ADDR's node first or within RDZV_TIMEOUT seconds of the others);
# ranks are assigned by the rendezvous, not by node. With NNODES=MIN:MAX a node that is gone
# for good is left behind: the others meet again without it once RDZV_LAST_CALL seconds pass
# and resume on fewer ranks (docs/distributed.md, "Resume on another world size").
#
# NPROC (processes per node, default: GPUs, or 2 on CPU), NNODES (N or MIN:MAX, default 1),
# MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500), RDZV_ID (the job's name,
# the same on every node; default rskdist), MAX_RESTARTS (default 3), RDZV_TIMEOUT (seconds
# for all nodes to join, default 900), RDZV_LAST_CALL (seconds the rendezvous waits for more
# nodes once MIN have joined, default 60), SCRIPT (default rskdist/train.py; a wrapper of
# yours that calls rskdist.train.main), CONFIG.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CONFIG:?set CONFIG=configs/<experiment>.yaml}"
NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count() or 2)")}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# Every rendezvous round gets a store of its own. The agent's shared store (torch's default)
# outlives a round, and a restarted group then reads the failed group's addresses from it
# and cannot connect ("Gloo connectFullMesh failed ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec ${TORCHRUN:-torchrun} --nnodes "${NNODES:-1}" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-rskdist}" \
  --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-900},last_call_timeout=${RDZV_LAST_CALL:-60}" \
  --max-restarts "${MAX_RESTARTS:-3}" --monitor-interval 1 \
  "${SCRIPT:-rskdist/train.py}" --config "$CONFIG" "$@"
