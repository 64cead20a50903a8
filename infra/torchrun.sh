#!/usr/bin/env bash
# Stage 1 under DDP: one process per GPU; InfoNCE gathers docs across ranks (cross-device negatives).
# Usage: infra/torchrun.sh NUM_GPUS --pairs runs/pairs [key=value ...]
set -euo pipefail
gpus="$1"; shift
exec torchrun --standalone --nproc-per-node "${gpus}" -m towerline.cli train "$@"
