#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
# Kernel cores on their own: C++ unit tests (ctest), nvcc compile of the CUDA sources, bindings.
bash scripts/check-kernels.sh
# Backends that must be usable here: their absence fails the run instead of skipping their tests.
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  # A GPU: the Triton kernels are compiled for it and tested on CUDA tensors (tests/test_cuda.py).
  export FASTCLIP_TEST_REQUIRE="torch cpp"
else
  # No GPU (CI): the Triton kernels run on CPU tensors in Triton's interpreter.
  export TRITON_INTERPRET=1
  export FASTCLIP_TEST_REQUIRE="torch cpp triton"
fi
python -m fastclip.info
python -m pytest tests "$@"
