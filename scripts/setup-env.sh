#!/usr/bin/env bash
# Sets up .venv from nothing (idempotent, quick when already done) for one torch release:
#   bash scripts/setup-env.sh [TORCH_VERSION]        (default: 2.13.0, the CPU build on local disk)
# Pinned torch first, so nothing later can make pip resolve an unpinned (multi-GB CUDA) torch; then
# the Triton that this torch requires (its own dependency), or for a torch that requires none (CPU
# builds) the pinned one; then the pinned tools and trainer frameworks, constrained to that torch;
# then fastclip, built against that torch (with CUDA kernels when it is a CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
torch_version=${1:-2.13.0}
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip_install "torch==$torch_version"
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('triton') is None)" || pip_install -r requirements-triton.txt
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
pip_install -c "$constraints" -r requirements-dev.txt
pip_install -c "$constraints" -r requirements-integration.txt
pip_install --no-deps -r requirements-reference.txt
pip_install -c "$constraints" --no-build-isolation -e .
python -c "import sys, torch; v = sys.argv[1]; assert torch.__version__.split('+')[0] == v, (torch.__version__, v)" "$torch_version"
