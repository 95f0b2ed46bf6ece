#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
python -m fastclip.info
# Kernel cores on their own: C++ unit tests (ctest), nvcc compile of the CUDA sources, bindings.
bash scripts/check-kernels.sh
# Backends that must be usable here: their absence fails the run instead of skipping their tests.
export FASTCLIP_TEST_REQUIRE="torch cpp"
python -m pytest tests "$@"
