#!/usr/bin/env bash
# Pack the project's Python environment for YARN executors (spark-submit --archives): a fresh
# virtualenv with Towerline and its dependencies, relocatable by venv-pack.
# Usage: infra/spark/pack-env.sh [OUTPUT.tar.gz]   (default: towerline-env.tar.gz)
set -euo pipefail
output="${1:-towerline-env.tar.gz}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/env"
"$scratch/env/bin/pip" install --quiet "$root[cpu]" venv-pack
"$scratch/env/bin/venv-pack" --python-prefix ./environment -p "$scratch/env" -o "$output" --force
echo "packed $output"
