#!/usr/bin/env bash
# Runs the test suite against another torch release, in its own copy of the tree and its own venv:
#   bash scripts/test-torch.sh VERSION [pytest arguments...]
# e.g. 2.14.1 (a CUDA 13 build, on this machine's local package index; scripts/test.sh runs it as
# CI's second lane) or 2.6.0 (the oldest supported release; a CUDA 12.4 build from PyPI, ~3 GB).
#
# An editable install builds fastclip._C inside the source tree, so two torch releases cannot share
# one tree: the lane copies the working tree (tracked and untracked-but-not-ignored files) to
# build/torch-VERSION/ and installs there. With a CUDA build of torch, fastclip._C is built with its
# CUDA kernels (no GPU needed), and the suite checks that (tests/test_build.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=${1:?usage: scripts/test-torch.sh TORCH_VERSION [pytest arguments...]}
shift
lane=build/torch-$version
echo "== torch $version: in $lane"
mkdir -p "$lane"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$lane"
cd "$lane"
start=$SECONDS
bash scripts/setup-env.sh "$version"
echo "== torch $version: environment and build took $((SECONDS - start)) s"
. .venv/bin/activate
bash scripts/run-suite.sh "$@"
