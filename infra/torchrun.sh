#!/usr/bin/env bash
# Stage 1 under DDP: one process per GPU; InfoNCE gathers docs across ranks (cross-device negatives).
# Usage: infra/torchrun.sh NUM_GPUS --pairs runs/pairs [key=value ...]
#
# One machine by default. Several: set TORCHRUN_NNODES and TORCHRUN_MASTER_ADDR (the node of rank 0;
# TORCHRUN_MASTER_PORT, default 29500) and run the same command on every node, each with its own
# TORCHRUN_NODE_RANK — or, in a Kubernetes Indexed Job (infra/k8s/train-job.yaml), the pod's
# JOB_COMPLETION_INDEX. Every node must see the same pairs and output paths (a shared volume).
set -euo pipefail
gpus="$1"; shift
if [[ -n "${TORCHRUN_NNODES:-}" ]]; then
  rank="${TORCHRUN_NODE_RANK:-${JOB_COMPLETION_INDEX:?set TORCHRUN_NODE_RANK (or run in an Indexed Job)}}"
  exec torchrun --nnodes "${TORCHRUN_NNODES}" --node-rank "${rank}" --nproc-per-node "${gpus}" \
    --master-addr "${TORCHRUN_MASTER_ADDR:?set TORCHRUN_MASTER_ADDR to the node of rank 0}" \
    --master-port "${TORCHRUN_MASTER_PORT:-29500}" -m towerline.cli train "$@"
fi
exec torchrun --standalone --nproc-per-node "${gpus}" -m towerline.cli train "$@"
