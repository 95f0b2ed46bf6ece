"""Benchmark: adaptive gradient clipping (AGC), timm's ``adaptive_clip_grad`` against fastclip's
``adaptive_clip_grad_``, for a step where no unit clips and one where every unit does.

timm's function is loaded from the installed timm's own file (``timm/utils/agc.py``; the package
itself needs torchvision). Every provider is first checked against timm (same units clipped, values
within 1e-5 relative: the norms differ in their last bits). Runs are interleaved after two warm-up
rounds, gradients restored before each run outside the timed region; medians. The limit is this
machine's streaming speed over the same bytes, timed in the same rounds: reading the parameters and
the gradients, plus writing the gradients where every unit clips.

Usage: python -m bench.agc [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import statistics

import torch
from tqdm import tqdm

import fastclip
from bench.run import WARMUP_ROUNDS, Timer, device_description
from bench.workloads import MIB, gpt2_shapes, make_grads, resnet50_shapes, with_dtype

# Gradients ~1e-3 (make_grads) against parameters ~0.1: no unit clips at clip_factor 1, every unit
# at 1e-4.
STEPS = {"no unit clips": 1.0, "every unit clips": 1e-4}
WORKLOADS = {
    "resnet-50 fp32": with_dtype(resnet50_shapes(), torch.float32),
    "gpt2-124m fp32": with_dtype(gpt2_shapes(), torch.float32),
}


def timm_adaptive_clip_grad():
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise SystemExit("bench.agc needs timm (scripts/setup-env.sh installs it with --no-deps)")
    path = os.path.join(spec.submodule_search_locations[0], "utils", "agc.py")
    module_spec = importlib.util.spec_from_file_location("timm_agc_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


def providers() -> dict:
    table = {"timm": timm_adaptive_clip_grad()}
    for name in fastclip.available_backends("cpu"):
        table[f"fastclip {name}"] = lambda params, clip_factor, name=name: fastclip.adaptive_clip_grad_(
            params, clip_factor, backend=name)
    return table


def bench_workload(spec, repeats: int, timer: Timer, progress) -> dict:
    grads = make_grads(spec, "cpu")
    params = [torch.nn.Parameter(torch.randn(g.shape, generator=torch.Generator().manual_seed(i)).mul_(0.1).to(g.dtype))
              for i, g in enumerate(grads)]
    for p, g in zip(params, grads):
        p.grad = g
    pristine = [g.clone() for g in grads]
    table = providers()
    for step, clip_factor in STEPS.items():  # the gate, before any timing
        torch._foreach_copy_(grads, pristine)
        table["timm"](params, clip_factor)
        expected = [g.clone() for g in grads]
        for name, fn in table.items():
            torch._foreach_copy_(grads, pristine)
            fn(params, clip_factor)
            for g, e, o in zip(grads, expected, pristine):
                assert torch.equal(g == o, e == o), f"{name}, {step}: other elements clipped than timm's"
                torch.testing.assert_close(g, e, rtol=1e-5, atol=0, msg=lambda m: f"{name}, {step}: {m}")
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    flat_p = torch.empty(param_bytes // 4).uniform_()
    flat_g = torch.empty(grad_bytes // 4).uniform_()
    limits = {"reads": lambda: (flat_p.sum(), flat_g.sum()), "reads + write": lambda: (flat_p.sum(), flat_g.mul_(1.0))}
    limit_of = {"no unit clips": "reads", "every unit clips": "reads + write"}
    samples: dict[tuple[str, str], list[float]] = {}
    names = list(table) + list(limits)
    for round_index in range(repeats + WARMUP_ROUNDS):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            for step, clip_factor in STEPS.items():
                if name in limits:
                    if limit_of[step] != name:
                        continue
                    seconds = timer(limits[name])
                else:
                    torch._foreach_copy_(grads, pristine)
                    seconds = timer(lambda: table[name](params, clip_factor))
                if round_index >= WARMUP_ROUNDS:
                    samples.setdefault((name, step), []).append(seconds)
        progress.update(1)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {"medians": medians, "providers": list(table), "limit_of": limit_of, "count": len(grads),
            "bytes": param_bytes + grad_bytes}


def markdown(results: dict[str, dict]) -> str:
    lines = ["| workload | step | provider | ms | x timm | % of limit |", "|---|---|---|---|---|---|"]
    for workload, r in results.items():
        m = r["medians"]
        for step in STEPS:
            limit, base = m[(r["limit_of"][step], step)], m[("timm", step)]
            for name in r["providers"]:
                t = m[(name, step)]
                lines.append(f"| {workload} ({r['count']} tensors, {r['bytes'] / MIB:.0f} MiB of parameters and "
                             f"gradients) | {step} | {name} | {t * 1e3:.2f} | {base / t:.2f} | {limit / t:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown")
    args = parser.parse_args()
    machine = device_description("cpu")
    header = (f"# fastclip AGC benchmark (CPU)\n\n{machine}; torch {torch.__version__}; "
              f"{datetime.date.today().isoformat()}; medians of {args.repeats} interleaved rounds\n\n")
    print(header, flush=True)
    timer = Timer("cpu")
    results = {}
    with tqdm(total=len(WORKLOADS) * (args.repeats + WARMUP_ROUNDS), desc="agc", unit="round", disable=None) as progress:
        for name, spec in WORKLOADS.items():
            results[name] = bench_workload(spec, args.repeats, timer, progress)
    text = header + markdown(results)
    print(text[len(header):], flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"agc-{machine.split(',')[0]}-{datetime.date.today()}".lower()).strip("-")
    path = os.path.join(args.out, f"{slug}.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
