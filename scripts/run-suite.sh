#!/usr/bin/env bash
# Runs the Python test suite in the active venv (called by scripts/test.sh and scripts/test-torch.sh):
# reports the build, then requires every backend that must work here, so that a broken build fails
# the run instead of turning into skipped tests. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -m fastclip.info
# FASTCLIP_TEST_REQUIRE set by the caller wins (e.g. "torch cpp" for a Triton whose interpreter
# cannot run the kernels: see README's Supported table).
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  # A GPU: the Triton kernels are compiled for it and tested on CUDA tensors (tests/test_cuda.py).
  export FASTCLIP_TEST_REQUIRE="${FASTCLIP_TEST_REQUIRE-torch cpp}"
else
  # No GPU (CI): the Triton kernels run on CPU tensors in Triton's interpreter.
  export TRITON_INTERPRET=1
  export FASTCLIP_TEST_REQUIRE="${FASTCLIP_TEST_REQUIRE-torch cpp triton}"
  # Most of the time goes to the interpreter, one core per test: one pytest-xdist worker per core
  # (at most 4; FASTCLIP_TEST_WORKERS overrides, 1 runs in this process), tests handed out as
  # workers free up, since a few of them take a minute and most a fraction of a second.
  workers=${FASTCLIP_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
  if [ "$workers" -gt 1 ]; then set -- -n "$workers" --dist worksteal "$@"; fi
fi
if [ "${FASTCLIP_USE_CUDA:-}" = "1" ]; then
  # The build was asked for CUDA kernels (setup.py stops without a matching toolkit): the tests
  # check that every op has one (tests/test_build.py).
  export FASTCLIP_TEST_REQUIRE="$FASTCLIP_TEST_REQUIRE cuda-build"
fi
python -m pytest tests "$@"
