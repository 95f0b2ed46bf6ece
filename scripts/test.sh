#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (README's test command; CI runs exactly this):
# the kernels on their own (C++ unit tests, nvcc compile), the Python suite against torch 2.13 (CPU
# build), then the Python suite again against torch 2.14.1, a CUDA build, with fastclip._C built with
# its CUDA kernels. FASTCLIP_SECOND_TORCH= (empty) skips the second lane. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
free_gb() { df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }'; }
# The first lane's venv (torch 2.13 CPU build, Triton, the dev tools) takes 2.2 GB. On a full disk pip
# dies in its first install with "No space left on device" (a CI run once did): say so before starting.
if [ ! -x .venv/bin/python ] && [ "$(free_gb)" -lt 3 ]; then
  echo "== fastclip tests: only $(free_gb) GB of disk free here; the test environment needs 3 GB" \
       "(and CI's second lane 7 GB more). Free some space and run again." >&2
  exit 1
fi
bash scripts/setup-env.sh
. .venv/bin/activate
# Kernel cores on their own: C++ unit tests (ctest), nvcc compile of the CUDA sources.
bash scripts/check-kernels.sh
bash scripts/run-suite.sh "$@"
echo "== torch $(python -c 'import torch; print(torch.__version__)'): done at $((SECONDS - start)) s"
deactivate
second_torch=${FASTCLIP_SECOND_TORCH-2.14.1}
# The second lane's CUDA build of torch and its NVIDIA libraries take about 6 GB of disk (5.7 GB
# measured). Where that is not free (and not already installed), pip would die half-way with "No space
# left on device": say plainly that the lane is skipped and why, and keep the first lane's verdict.
need_gb=${FASTCLIP_SECOND_LANE_GB:-7}
if [ -n "$second_torch" ] && [ ! -x "build/torch-$second_torch/.venv/bin/python" ] && [ "$(free_gb)" -lt "$need_gb" ]; then
  echo "== torch $second_torch: SKIPPED, only $(free_gb) GB of disk free and its lane needs $need_gb GB" \
       "(a CUDA build of torch); the torch 2.13 lane above ran the whole suite"
  second_torch=
fi
if [ -n "$second_torch" ]; then
  # A CUDA build of torch: fastclip._C must be built with its CUDA kernels, or the lane fails.
  FASTCLIP_USE_CUDA=1 bash scripts/test-torch.sh "$second_torch" "$@"
  echo "== torch $second_torch: done at $((SECONDS - start)) s"
fi
