#!/usr/bin/env bash
# Sets everything up and runs the benchmark (README's main command). Extra arguments go to bench.run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
python -m bench.run "$@"
