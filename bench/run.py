"""Benchmark: fastclip's backends against ``torch.nn.utils.clip_grad_norm_`` (and apex / Transformer
Engine where installed), in one process.

For every workload, every provider is first checked for correctness (the norm within torch's own
error of a float64 reference or 2 fp32 ulp; fastclip's gradients bit-identical to torch's scaling by
the norm it returned), then timed, interleaved (the provider order rotates each round, so drift and
noise hit all alike), after two warm-up rounds, for a step that does not clip (max_norm huge) and
one that does (gradients are restored from a copy before every run, outside the timed region, so
every clipping run clips). On CUDA the L2 cache is flushed before each timed run. The machine's own
limit is measured in the same rounds on a flat buffer of the same bytes, restored before every run
as the gradients are (bench/limits.py): one read (the faster of a sum and a dot) for the no-clip
step, one read plus an in-place multiply for the clip step; building the list of gradients is timed
too, as the many-tensor targets count it in their limit.

Usage: python -m bench.run [--preset quick|full] [--repeats N] [--workload SUBSTRING] [--device D]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm

import fastclip

from bench import limits, report
from bench.providers import gradient_list, is_fastclip_or_torch, providers
from bench.workloads import Workload, make_grads, preset

NO_CLIP, CLIP = 1e9, 1e-3
STEPS = (("no clip", NO_CLIP), ("clip", CLIP))
# Building the list of gradients, [p.grad for p in params], is timed in the same rounds (after the
# same restore as every provider's run, so with the same cache state): with thousands of tensors it is
# part of what any clip must do, and the many-tensor targets add it to the read.
GRADIENT_LIST = report.GRADIENT_LIST
# The step each limit's pass is timed in.
LIMIT_STEP = {**{name: "no clip" for name in limits.READS}, limits.MULTIPLY: "clip", GRADIENT_LIST: "no clip"}
WARMUP_ROUNDS = 2


def parameters_for(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters holding ``grads``; their data are zero-stride views, so they cost no memory."""
    params = []
    for g in grads:
        p = torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
        p.grad = g
        params.append(p)
    return params


class Timer:
    """Seconds one call takes: perf_counter on CPU; CUDA events on GPU, after flushing the L2 cache
    (a write over a buffer larger than it) so no run finds the previous run's data cached."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush_buffer = torch.empty(max(4 * l2, 256 * 2**20) // 4, dtype=torch.float32, device="cuda")

    def __call__(self, fn) -> float:
        if self.device != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self.flush_buffer.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def reference_norm(grads: list[torch.Tensor]) -> float:
    """float64 truth with torch's structure: per-tensor norms rounded to their dtype, then the norm
    of those (the rounding is part of what torch defines; only accumulation error is judged)."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.double()).to(g.dtype).double() for g in grads])
    return float(torch.linalg.vector_norm(per_tensor))


def check_providers(table, grads, pristine, params, restore) -> dict[str, str]:
    """Runs each provider once on clipping gradients and checks it; returns {name: error} for
    external providers that fail (they are then not timed). A fastclip or torch failure raises."""
    truth = reference_norm(pristine)
    restore()
    torch_error = abs(float(table["torch default"](params, CLIP)) - truth)
    expected = [g.clone() for g in pristine]
    expected_params = parameters_for(expected)
    failures = {}
    for name, fn in table.items():
        restore()
        try:
            norm = fn(params, CLIP)
            assert abs(float(norm) - truth) <= max(torch_error, 2 * 2**-23 * truth), f"norm {float(norm)} vs float64 {truth}"
            torch._foreach_copy_(expected, pristine)
            torch.nn.utils.clip_grads_with_norm_(expected_params, CLIP, norm)
            for g, e in zip(grads, expected):
                if is_fastclip_or_torch(name):
                    assert torch.equal(g, e), "clipped gradients differ from torch's scaling by the returned norm"
                else:
                    torch.testing.assert_close(g, e)
        except Exception as e:  # noqa: BLE001  (reported, or re-raised for our own providers)
            if is_fastclip_or_torch(name):
                raise AssertionError(f"{name}: {e}") from e
            failures[name] = f"{type(e).__name__}: {e}"
    return failures


def bench_workload(workload: Workload, device: str, repeats: int, timer: Timer, progress) -> report.Result:
    grads = make_grads(workload.spec, device, workload.backward_order)
    params = parameters_for(grads)
    pristine = [g.clone() for g in grads]
    streaming = limits.StreamingLimits(workload.nbytes, device)
    table = providers(device)
    restore = lambda: torch._foreach_copy_(grads, pristine)  # noqa: E731
    failures = check_providers(table, grads, pristine, params, restore)
    for name in failures:
        del table[name]
    passes = {**streaming.passes(), GRADIENT_LIST: lambda: gradient_list(params)}
    samples: dict[tuple[str, str], list[float]] = {}
    names = list(table) + list(passes)
    for round_index in range(repeats + WARMUP_ROUNDS):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            for step, max_norm in STEPS:
                if name in passes:
                    if LIMIT_STEP[name] != step:
                        continue
                    restore() if name == GRADIENT_LIST else streaming.restore()
                    seconds = timer(passes[name])
                else:
                    restore()
                    seconds = timer(lambda: table[name](params, max_norm))
                if round_index >= WARMUP_ROUNDS:
                    samples.setdefault((name, step), []).append(seconds)
        progress.update(1)
    return report.Result(workload, samples, failures, list(table))


def host_overhead_per_tensor(device: str, backend: str, count: int, repeats: int, timer: Timer) -> float:
    """Microseconds per tensor that one ``fastclip.clip_`` call (no clipping) costs above building the
    list of gradients, on ``count`` one-element fp32 gradients, so that the bytes do not count:
    medians of interleaved calls of each."""
    params = parameters_for([torch.ones(1, device=device) for _ in range(count)])
    calls = {"clip_": lambda: fastclip.clip_(params, 1e9, backend=backend),
             "list": lambda: gradient_list(params)}
    samples = {name: [] for name in calls}
    for round_index in range(repeats + WARMUP_ROUNDS):
        for name, call in calls.items():
            seconds = timer(call)
            if round_index >= WARMUP_ROUNDS:
                samples[name].append(seconds)
    return (statistics.median(samples["clip_"]) - statistics.median(samples["list"])) / count * 1e6


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["quick", "full"], default="quick")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 5 quick, 15 full)")
    parser.add_argument("--workload", default="", help="run only workloads whose name contains this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results", help="directory for the CSV, markdown and plot")
    args = parser.parse_args()
    repeats = args.repeats or (15 if args.preset == "full" else 5)
    workloads = [w for w in preset(args.preset, args.device) if args.workload in w.name]
    machine = device_description(args.device)
    header = (f"# fastclip benchmark, preset {args.preset}\n\n{machine}; torch {torch.__version__}; "
              f"{datetime.date.today().isoformat()}; medians of {repeats} interleaved rounds (p20-p80)\n")
    print(header, flush=True)
    timer = Timer(args.device)
    results = []
    with tqdm(total=len(workloads) * (repeats + WARMUP_ROUNDS), desc="benchmark", unit="round", disable=None) as progress:
        for workload in workloads:
            progress.set_postfix_str(workload.name)
            results.append(bench_workload(workload, args.device, repeats, timer, progress))
    fused = [name for name in ("cpp", "triton") if name in fastclip.available_backends(args.device)]
    overhead = None
    if fused:
        count = 10_000
        overhead = (f"fastclip {fused[0]}", count, host_overhead_per_tensor(args.device, fused[0], count, repeats, timer))
    markdown = header + "\n" + report.markdown(results, overhead)
    print(markdown[len(header):], flush=True)
    written = report.save(results, markdown, machine, args.preset, args.out)
    print("written: " + ", ".join(written))


if __name__ == "__main__":
    main()
