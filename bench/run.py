"""Benchmark: fastclip's backends against ``torch.nn.utils.clip_grad_norm_``, in one process.

Every provider runs on the same gradients, interleaved (provider order rotates each repeat, so drift
and noise hit all alike), after a warm-up, and is checked against torch before anything is timed.
Each workload is timed for a step that does not clip (max_norm huge) and one that does (the
gradients are restored from a copy before every clipping run, outside the timed region, so every
timed run clips). The machine's own limit is measured in the same run on a flat buffer of the same
bytes: one read (a sum) for the no-clip step, one read plus one in-place multiply for the clip step.

Usage: python -m bench.run [--repeats N] [--workload SUBSTRING]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import torch

import fastclip
from bench.workloads import WORKLOADS, make_grads

NO_CLIP, CLIP = 1e9, 1e-3


def providers(device: str) -> dict:
    """name -> function(params, max_norm) that clips the params' gradients in place, returns the norm."""
    table = {
        # What users call (foreach=None: torch picks), the baseline of every ratio.
        "torch default": lambda params, m: torch.nn.utils.clip_grad_norm_(params, m),
        "torch foreach": lambda params, m: torch.nn.utils.clip_grad_norm_(params, m, foreach=True),
        "torch loop": lambda params, m: torch.nn.utils.clip_grad_norm_(params, m, foreach=False),
    }
    for name in fastclip.available_backends(device):
        table[f"fastclip {name}"] = lambda params, m, name=name: fastclip.clip_(params, m, backend=name)
    return table


def parameters_for(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters holding ``grads``; their data are zero-stride views, so they cost no memory."""
    params = []
    for g in grads:
        p = torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
        p.grad = g
        params.append(p)
    return params


def _time(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_workload(shapes, dtype, device, repeats):
    grads = make_grads(shapes, dtype, device)
    params = parameters_for(grads)
    pristine = [g.clone() for g in grads]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    flat = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    table = providers(device)
    restore = lambda: torch._foreach_copy_(grads, pristine)  # noqa: E731
    # Correctness before timing, by the exactness contract (README): the norm within torch's own
    # error of float64 or 2 fp32 ulp (E5; torch's fp32 CPU reduction is far off on big tensors, so
    # agreement with torch is the wrong test), and the gradients bit-identical to torch's scaling by
    # the returned norm (E3).
    truth = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in pristine])))
    restore()
    torch_error = abs(float(table["torch default"](params, CLIP)) - truth)
    expected = [g.clone() for g in pristine]
    expected_params = parameters_for(expected)
    for name, fn in table.items():
        restore()
        norm = fn(params, CLIP)
        assert abs(float(norm) - truth) <= max(torch_error, 2 * 2**-23 * truth), f"{name}: norm {float(norm)} vs float64 {truth}"
        torch._foreach_copy_(expected, pristine)
        torch.nn.utils.clip_grads_with_norm_(expected_params, CLIP, norm)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected)), f"{name}: clipped gradients differ from torch's"
    limits = {
        "one read": lambda: flat.sum(),
        "read + write": lambda: (flat.sum(), flat.mul_(1.0)),
    }
    samples = {(name, mode): [] for name in [*table, *limits] for mode in ("no clip", "clip")}
    names = list(table) + list(limits)
    for repeat in range(repeats + 2):  # the first two rounds are warm-up
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            for mode, max_norm in (("no clip", NO_CLIP), ("clip", CLIP)):
                if name in limits:
                    if (name == "one read") != (mode == "no clip"):
                        continue
                    t = _time(limits[name], device)
                else:
                    restore()
                    t = _time(lambda: table[name](params, max_norm), device)
                if repeat >= 2:
                    samples[(name, mode)].append(t)
    return nbytes, {k: v for k, v in samples.items() if v}


def quantiles(values):
    q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return q[1], statistics.median(values), q[7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workload", default="", help="run only workloads whose name contains this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"# fastclip benchmark on {device_name}; torch {torch.__version__}; medians of {args.repeats} interleaved runs\n")
    rows = []
    for workload, (shapes, dtype) in WORKLOADS.items():
        if args.workload not in workload:
            continue
        nbytes, samples = bench_workload(shapes, dtype, args.device, args.repeats)
        print(f"## {workload}: {len(shapes)} tensors, {nbytes / 2**20:.1f} MiB\n")
        print("| provider | step | median ms (p20-p80) | x torch default | GB/s | % of machine limit |")
        print("|---|---|---|---|---|---|")
        for mode, moved, limit in (("no clip", nbytes, "one read"), ("clip", 3 * nbytes, "read + write")):
            limit_s = statistics.median(samples[(limit, mode)])
            base = statistics.median(samples[("torch default", mode)])
            for (name, m), values in samples.items():
                if m != mode or name in ("one read", "read + write"):
                    continue
                p20, median, p80 = quantiles(values)
                print(f"| {name} | {mode} | {median * 1e3:.3f} ({p20 * 1e3:.3f}-{p80 * 1e3:.3f}) | {base / median:.2f} "
                      f"| {moved / median / 1e9:.1f} | {100 * limit_s / median:.0f}% |")
                rows.append([datetime.date.today().isoformat(), device_name, workload, name, mode, median, p20, p80, moved])
        print()
    os.makedirs("bench/results", exist_ok=True)
    path = "bench/results/results.csv"
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "device", "workload", "provider", "step", "median_s", "p20_s", "p80_s", "bytes_moved"])
        writer.writerows(rows)
    print(f"results appended to {path}")


if __name__ == "__main__":
    main()
