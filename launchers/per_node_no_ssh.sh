#!/usr/bin/env bash
# Start one node of a multi-node job by hand (no ssh): run this on every node with its
# own NODE_RANK. Useful where ssh between nodes is not allowed (containers, some clouds).
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 HOSTFILE=hosts CONFIG=configs/X.yaml bash launchers/per_node_no_ssh.sh
#
# NODE_RANK    0 .. nodes-1 (required); node 0 hosts the rendezvous
# MASTER_ADDR  address of node 0 reachable from every node (required)
# MASTER_PORT  free TCP port on node 0 (default 29500)
# HOSTFILE     "<hostname> slots=<gpus>" per node, same file on every node (default ./hostfile)
# CONFIG       experiment YAML (required)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${CONFIG:?set CONFIG}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec ${DEEPSPEED:-deepspeed} --hostfile "${HOSTFILE:-hostfile}" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  rskdist/train.py --config "$CONFIG" "$@"
