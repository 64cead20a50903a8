#!/usr/bin/env bash
# Run the pairs job on a cluster: the same job code as `towerline pairs`, another master.
# Usage: infra/spark-submit.sh yarn|k8s://https://host:443|spark://host:7077 [key=value ...]
set -euo pipefail
master="$1"; shift
exec towerline pairs "spark.master=${master}" "$@"
