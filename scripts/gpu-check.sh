#!/usr/bin/env bash
# One command for a machine with a GPU, a preinstalled torch (with Triton) and no network:
#   bash scripts/gpu-check.sh
# 1. builds fastclip in place against that torch: no download, no build isolation, CUDA kernels for
#    the visible GPU (MAX_JOBS, TORCH_CUDA_ARCH_LIST and CUDA_HOME are honoured);
# 2. runs the GPU tests (every test marked `gpu`: the differential harness on CUDA tensors for the
#    torch, cpp and triton backends, opcheck on CUDA, both launch paths, peak memory);
# 3. checks CUDA-graph capture and replay, and that no call synchronises with the host;
# 4. runs a short benchmark (quick preset, CUDA events) and the clipping + fused-step benchmark;
# and writes one summary (device, versions, pass/fail and time per step, benchmark rows) to
# bench/results/gpu-check-<device>-<date>.md, copied with the logs to $OUT when that is set (the
# device tool brings $OUT back). Every step runs even if an earlier one failed; the exit status is
# non-zero if any failed. Without a visible GPU it stops at once with exit status 2.
# Budget: under 8 minutes (FASTCLIP_GPU_CHECK_SECONDS, default 480) on one H100/H200: each step has
# its own time limit, cut to what is left of the budget; a step with no time left is reported as
# not run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2> /dev/null; then
  echo "gpu-check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False, or torch is missing);" \
       "this script is for a machine with a GPU. On CPU machines run: bash scripts/test.sh" >&2
  exit 2
fi

device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | tr -s '-' | sed 's/^-//; s/-$//')
logs=build/gpu-check
mkdir -p "$logs" bench/results
summary=bench/results/gpu-check-$slug-$(date -u +%Y-%m-%d).md
failed=0
rows=()

budget=${FASTCLIP_GPU_CHECK_SECONDS:-480}

# run_step NAME LIMIT_SECONDS COMMAND...: runs the command with a time limit (cut to what is left of
# the budget), logs its output, and records pass/fail, the time taken and the log's last pytest
# summary line (if any).
run_step() {
  local name=$1 limit=$2 start=$SECONDS status verdict last
  shift 2
  if [ $((budget - SECONDS)) -lt "$limit" ]; then limit=$((budget - SECONDS)); fi
  if [ "$limit" -lt 10 ]; then
    rows+=("| $name | not run: the ${budget} s budget was spent | - | |")
    failed=1
    echo "== gpu-check: $name not run (budget spent)"
    return
  fi
  echo "== gpu-check: $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
  status=$?
  if [ "$status" -eq 0 ]; then verdict=pass; elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict="TIMEOUT"; failed=1; else verdict="FAIL (exit $status)"; failed=1; fi
  last=$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$logs/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  rows+=("| $name | $verdict | $((SECONDS - start)) s | ${last:-} |")
  echo "   $verdict in $((SECONDS - start)) s ${last:+($last)}"
  [ "$verdict" = pass ] || tail -30 "$logs/$name.log"
}

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
run_step build 180 env FASTCLIP_USE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
run_step info 30 "$PYTHON" -m fastclip.info
export FASTCLIP_TEST_REQUIRE="torch cpp triton cuda-build"
run_step gpu-tests 300 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider -k "not over_2_to_the_31"
run_step graph-capture-and-no-sync 60 "$PYTHON" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
  -k "graph_capture or no_host_synchronisation"
run_step benchmark 150 "$PYTHON" -m bench.run --preset quick --repeats 5 --out bench/results
run_step optim-step-benchmark 90 "$PYTHON" -m bench.optim_step --repeats 5 --out bench/results

{
  echo "# fastclip GPU check: $device"
  echo
  versions=$("$PYTHON" -c "import platform, torch
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = 'not installed'
print(f'Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton_version}')")
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -1)
  # The tree may differ from the commit git names (the device tool sends the working tree, and its
  # copy of .git can be older): say how many files differ, so the summary never names the wrong code.
  changed=$(git status --porcelain --untracked-files=no 2> /dev/null | wc -l)
  echo "$(date -u +'%Y-%m-%d %H:%M UTC'); $versions; driver ${driver:-unknown};" \
       "fastclip $(git rev-parse --short HEAD 2> /dev/null || echo '(commit unknown: no git here)')" \
       "$([ "${changed:-0}" -gt 0 ] && echo "plus changes to $changed tracked files")"
  echo
  echo '```'
  cat "$logs/info.log"
  echo '```'
  echo
  echo "| step | result | time | pytest |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "## Benchmark (quick preset)"
  echo
  # bench.run's last line names what it wrote: the CSV it appended to, its markdown table and plot.
  bench_md=$(grep "^written:" "$logs/benchmark.log" | tr ',' '\n' | grep -o '[^ ]*\.md$' | head -1)
  if [ -n "$bench_md" ]; then sed -n '/^|/,$p' "$bench_md"; else echo "(no benchmark table: see the benchmark step's log)"; fi
  echo
  echo "## Clipping + fused AdamW step (bench/optim_step.py)"
  echo
  step_md=$(grep "^written:" "$logs/optim-step-benchmark.log" | grep -o '[^ ]*\.md$' | head -1)
  if [ -n "$step_md" ]; then sed -n '/^## /,$p' "$step_md"; else echo "(no table: see the optim-step-benchmark log)"; fi
} > "$summary"
echo "== gpu-check: summary in $summary"
cat "$summary"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/logs"
  cp "$summary" "$OUT/"
  cp "$logs"/*.log "$OUT/logs/" 2> /dev/null
  [ -z "${bench_md:-}" ] || cp "$bench_md" "${bench_md%.md}.png" "$OUT/" 2> /dev/null
  [ -z "${step_md:-}" ] || cp "$step_md" "$OUT/" 2> /dev/null
fi
exit "$failed"
