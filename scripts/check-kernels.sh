#!/usr/bin/env bash
# Builds the kernel cores with CMake and runs their C++ unit tests (ctest), and compiles the
# torch-free CUDA kernels with nvcc for sm_80, sm_90 and sm_100, all without a GPU, so a CUDA
# compile error fails CI on a machine that has none. (The whole extension, bindings included, is
# built against a CUDA torch by scripts/test-torch.sh in CI's second lane.)
# Called by scripts/test.sh, in the project's virtual environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if ! command -v nvcc > /dev/null && [ "${FASTCLIP_REQUIRE_NVCC:-1}" = "1" ]; then
  echo "check-kernels: nvcc not found; the CUDA sources cannot be checked (FASTCLIP_REQUIRE_NVCC=0 to skip)" >&2
  exit 1
fi

cmake -S . -B build/cmake -G Ninja > build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
cmake --build build/cmake -j "$(nproc)" >> build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
grep "fastclip:" build-cmake.log
rm -f build-cmake.log
ctest --test-dir build/cmake --output-on-failure
