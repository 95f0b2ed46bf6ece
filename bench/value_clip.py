"""Benchmark: value clipping (``clip_grad_value_``), torch against fastclip's backends, for a step where
no element lies outside the interval and one where about a third do (gradients ~ N(0, 1e-3^2),
clip value 1e-3).

Every provider is first checked to give torch's gradients bit for bit. Runs are interleaved (the
order rotates every round) after two warm-up rounds, gradients restored before each run outside the
timed region; the table gives medians. The limit is this machine's streaming speed over the same
bytes, timed in the same rounds on a flat buffer restored before each pass as the gradients are
(bench/limits.py): one read (the faster of a sum and a dot) where nothing is outside, one in-place
multiply (a read and a write) where elements are.

Usage: python -m bench.value_clip [--repeats N] [--device D] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

import fastclip
from bench import limits
from bench.run import Timer, parameters_for
from bench.timing import median_times, ratio_table, run_and_save
from bench.workloads import MIB, gpt2_shapes, llama_shapes, make_grads, with_dtype

STEPS = {"none outside": 1e4, "a third outside": 1e-3}
LIMITS = {"none outside": limits.one_read, "a third outside": limits.multiply_in_place}
WORKLOADS = {
    "gpt2-124m fp32": with_dtype(gpt2_shapes(), torch.float32),
    "llama-style 4 layers bf16": with_dtype(llama_shapes(n_layer=4, dim=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                                                         vocab=32000), torch.bfloat16),
    "2000 x 8K fp32": with_dtype([(8192,)] * 2000, torch.float32),
}


def providers(device: str) -> dict:
    table = {"torch": lambda params, value: torch.nn.utils.clip_grad_value_(params, value)}
    for name in fastclip.available_backends(device):
        table[f"fastclip {name}"] = lambda params, value, name=name: fastclip.clip_grad_value_(params, value,
                                                                                               backend=name)
    return table


def bench_workload(spec, device: str, repeats: int, timer: Timer, progress) -> dict:
    grads = make_grads(spec, device)
    params = parameters_for(grads)
    pristine = [g.clone() for g in grads]
    table = providers(device)
    for step, value in STEPS.items():  # the correctness gate: torch's bits, before any timing
        torch._foreach_copy_(grads, pristine)
        table["torch"](params, value)
        expected = [g.clone() for g in grads]
        for name, fn in table.items():
            torch._foreach_copy_(grads, pristine)
            fn(params, value)
            assert all(torch.equal(g, e) for g, e in zip(grads, expected)), f"{name}, {step}: not torch's gradients"
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    streaming = limits.StreamingLimits(nbytes, device)

    medians = median_times(STEPS, streaming, LIMITS, table, lambda: torch._foreach_copy_(grads, pristine),
                           lambda name, step: lambda: table[name](params, STEPS[step]), timer, repeats, progress)
    return {"medians": medians, "providers": list(table), "nbytes": nbytes, "count": len(grads)}


def markdown(results: dict[str, dict]) -> str:
    return ratio_table(results, STEPS, "torch", lambda r: f"{r['count']} tensors, {r['nbytes'] / MIB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown")
    args = parser.parse_args()
    run_and_save("fastclip value-clipping benchmark", "", WORKLOADS, bench_workload, markdown, repeats=args.repeats,
                 device=args.device, out=args.out, slug="value-clip")


if __name__ == "__main__":
    main()
