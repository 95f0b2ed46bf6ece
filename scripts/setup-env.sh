#!/usr/bin/env bash
# Sets up .venv from nothing (idempotent, quick when already done): pinned torch first, so nothing
# later can make pip resolve an unpinned (multi-GB CUDA) torch; then the pinned tools and trainer
# frameworks (constrained to that torch); then fastclip,
# built against that torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-integration.txt
python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
