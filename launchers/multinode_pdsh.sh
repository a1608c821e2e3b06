#!/usr/bin/env bash
# Multi-node training with DeepSpeed's default launcher (pdsh over ssh).
#
#   HOSTFILE=hosts CONFIG=configs/inat_vit_l16_4node.yaml bash launchers/multinode_pdsh.sh [key=value ...]
#
# HOSTFILE   one line per node: "<hostname> slots=<gpus>" (default: ./hostfile)
# NUM_NODES  use the first N hosts of the hostfile (default: all)
# CONFIG     experiment YAML (required)
# MASTER_ADDR / MASTER_PORT   rendezvous of rank 0 (default: first host, 29500)
# Requirements: passwordless ssh from this node to every host, pdsh installed, the same
# checkout and virtualenv at the same path on every node, data reachable from all.
# Only PYTHON*/NCCL* variables and the lines of .deepspeed_env (home or this directory)
# reach the other nodes: put HF_HUB_OFFLINE=1 there too (docs/launching.md).
# Interrupting this command pkills every DeepSpeed launch on all hosts (docs/launching.md).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CONFIG:?set CONFIG=configs/<experiment>.yaml}"
HOSTFILE=${HOSTFILE:-hostfile}
ARGS=(--hostfile "$HOSTFILE" --launcher pdsh)
[ -n "${NUM_NODES:-}" ] && ARGS+=(--num_nodes "$NUM_NODES")
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
[ -n "${MASTER_PORT:-}" ] && ARGS+=(--master_port "$MASTER_PORT")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec ${DEEPSPEED:-deepspeed} "${ARGS[@]}" rskdist/train.py --config "$CONFIG" "$@"
