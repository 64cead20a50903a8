#!/usr/bin/env bash
# Kept for old scripts: the launch files are in infra/spark/ (submit.sh yarn|k8s|local JOB ...).
set -euo pipefail
exec "$(dirname "$0")/spark/submit.sh" "$@"
