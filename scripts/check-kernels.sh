#!/usr/bin/env bash
# Builds the kernel cores with CMake and runs their C++ unit tests (ctest), compiles the CUDA
# kernels with nvcc for sm_80 and sm_90, and compiles the CUDA bindings against torch's headers:
# all of it without a GPU, so a CUDA compile error fails CI on a machine that has none.
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

cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_ARCHITECTURES="80;90" > build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
cmake --build build/cmake -j "$(nproc)" >> build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
grep "fastclip:" build-cmake.log
rm -f build-cmake.log
ctest --test-dir build/cmake --output-on-failure

if command -v nvcc > /dev/null; then
  # The bindings include c10/cuda headers. A CPU-only torch ships them but not the header that its
  # CMake generates for CUDA builds; a stand-in with the same definition lets them compile here.
  stub=build/cuda-header-stub
  torch_include=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
  mkdir -p "$stub/c10/cuda/impl"
  generated=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h'))")
  [ -f "$generated" ] || echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
  cuda_include=$(python -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '/usr/local/cuda')")/include
  # shellcheck disable=SC2086
  g++ -std=c++20 -fsyntax-only -Wall -Werror $torch_include -I"$stub" -I"$cuda_include" -Icsrc \
    csrc/fastclip_cuda_ops.cpp
  echo "check-kernels: CUDA bindings (csrc/fastclip_cuda_ops.cpp) compile against torch's headers"
fi
