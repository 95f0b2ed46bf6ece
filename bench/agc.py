"""Benchmark: adaptive gradient clipping (AGC), timm's ``adaptive_clip_grad`` against fastclip's
``adaptive_clip_grad_``, for a step where no unit clips and one where every unit does.

timm's function is loaded from the installed timm's own file (``timm/utils/agc.py``; the package
itself needs torchvision). Every provider is first checked against timm (same units clipped, values
within 1e-5 relative: the norms differ in their last bits). Runs are interleaved after two warm-up
rounds, gradients restored before each run outside the timed region; medians. The limit is this
machine's streaming speed over the same bytes, timed in the same rounds on flat buffers restored
before each pass as the gradients are (bench/limits.py): reading the parameters and the gradients,
plus writing the gradients where every unit clips.

Usage: python -m bench.agc [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

import fastclip
from bench import limits
from bench.run import Timer
from bench.timing import median_times, ratio_table, run_and_save
from bench.workloads import MIB, gpt2_shapes, make_grads, resnet50_shapes, with_dtype

# Gradients ~1e-3 (make_grads) against parameters ~0.1: no unit clips at clip_factor 1, every unit
# at 1e-4.
STEPS = {"no unit clips": 1.0, "every unit clips": 1e-4}
WORKLOADS = {
    "resnet-50 fp32": with_dtype(resnet50_shapes(), torch.float32),
    "gpt2-124m fp32": with_dtype(gpt2_shapes(), torch.float32),
}


class ParameterAndGradientLimits:
    """Streaming passes over two flat buffers, of the parameters' bytes and of the gradients' (as
    :class:`bench.limits.StreamingLimits`; the reads of each, the gradients' multiply)."""

    def __init__(self, param_bytes: int, grad_bytes: int, device: str):
        self.params = limits.StreamingLimits(param_bytes, device)
        self.grads = limits.StreamingLimits(grad_bytes, device)

    def passes(self) -> dict:
        reads = {f"parameters: {name}": fn for name, fn in self.params.passes().items() if name in limits.READS}
        return {**reads, **{f"gradients: {name}": fn for name, fn in self.grads.passes().items()}}

    def restore(self) -> None:
        self.params.restore()
        self.grads.restore()


def _read(median, buffer: str) -> float:
    return limits.one_read(lambda name: median(f"{buffer}: {name}"))


# Reading the parameters and the gradients; plus writing the gradients where every unit clips.
LIMIT_OF = {"no unit clips": lambda median: _read(median, "parameters") + _read(median, "gradients"),
            "every unit clips": lambda median: _read(median, "parameters") + median(f"gradients: {limits.MULTIPLY}")}


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


def bench_workload(spec, device: str, repeats: int, timer: Timer, progress) -> dict:
    """Gate then time one workload (CPU only: ``device`` is for the shared driver)."""
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
    streaming = ParameterAndGradientLimits(param_bytes, grad_bytes, "cpu")

    medians = median_times(STEPS, streaming, LIMIT_OF, table, lambda: torch._foreach_copy_(grads, pristine),
                           lambda name, step: lambda: table[name](params, STEPS[step]), timer, repeats, progress)
    return {"medians": medians, "providers": list(table), "count": len(grads), "bytes": param_bytes + grad_bytes}


def markdown(results: dict[str, dict]) -> str:
    return ratio_table(results, STEPS, "timm",
                       lambda r: f"{r['count']} tensors, {r['bytes'] / MIB:.0f} MiB of parameters and gradients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown")
    args = parser.parse_args()
    run_and_save("fastclip AGC benchmark (CPU)", "", WORKLOADS, bench_workload, markdown, repeats=args.repeats,
                 device="cpu", out=args.out, slug="agc")


if __name__ == "__main__":
    main()
