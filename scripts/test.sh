#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (README's test command; CI runs exactly this):
# the kernels on their own (C++ unit tests, nvcc compile), the Python suite against torch 2.13 (CPU
# build), then the Python suite again against torch 2.14.1, a CUDA build, with fastclip._C built with
# its CUDA kernels. FASTCLIP_SECOND_TORCH= (empty) skips the second lane. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
bash scripts/setup-env.sh
. .venv/bin/activate
# Kernel cores on their own: C++ unit tests (ctest), nvcc compile of the CUDA sources.
bash scripts/check-kernels.sh
bash scripts/run-suite.sh "$@"
echo "== torch $(python -c 'import torch; print(torch.__version__)'): done at $((SECONDS - start)) s"
deactivate
second_torch=${FASTCLIP_SECOND_TORCH-2.14.1}
if [ -n "$second_torch" ]; then
  # A CUDA build of torch: fastclip._C must be built with its CUDA kernels, or the lane fails.
  FASTCLIP_USE_CUDA=1 bash scripts/test-torch.sh "$second_torch" "$@"
  echo "== torch $second_torch: done at $((SECONDS - start)) s"
fi
