"""Benchmark: ZClip, the reference class (PyPI ``zclip`` 1.0.0, ``ZClip.step(model)``) against
``fastclip.ZClip`` on each backend, once its 25 warm-up steps are done, for a step that does not clip
(a steady norm: z-score 0) and one that does (the hard cap ``max_grad_norm`` at half the norm).

The reference computes the norm with a kernel per parameter, reads it on the host (``.item()``) and
multiplies parameter by parameter; fastclip reads the gradients once for the norm, keeps the EMA
state on the device and scales in one fused pass that writes nothing when the coefficient is 1.
Every provider is first checked against the reference after the warm-up and both kinds of step: the
same gradients, within the reference's own error (its norm is torch's float32 one, which on CPU can
be 1e-3 off on large tensors, e.g. GPT-2's embedding gradient; fastclip's is float64-accumulated), or
1e-6 relative where that is smaller than a rounding. Runs are interleaved after
two warm-up rounds, gradients restored before each run outside the timed region; medians. The limit
is this machine's streaming speed over the same bytes, timed in the same rounds on a flat buffer
restored before each pass as the gradients are (bench/limits.py): one read (the faster of a sum and a
dot), or one in-place multiply (a read and a write) when every gradient is scaled.

Usage: python -m bench.adaptive [--repeats N] [--device D] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

import fastclip
from bench import limits
from bench.run import Timer, parameters_for
from bench.timing import median_times, ratio_table, run_and_save
from bench.workloads import MIB, gpt2_shapes, llama_shapes, make_grads, with_dtype

STEPS = ("no clip", "clips")
LIMITS = {"no clip": limits.one_read, "clips": limits.multiply_in_place}
WARMUP_STEPS = 25  # ZClip's default: steps that only collect norms
WORKLOADS = {
    "gpt2-124m fp32": with_dtype(gpt2_shapes(), torch.float32),
    "llama-style 4 layers bf16": with_dtype(llama_shapes(n_layer=4, dim=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                                                         vocab=32000), torch.bfloat16),
    "2000 x 8K fp32": with_dtype([(8192,)] * 2000, torch.float32),
}


def reference_zclip():
    try:
        from zclip import ZClip
    except ImportError:
        raise SystemExit("bench.adaptive needs zclip (scripts/setup-env.sh installs it with --no-deps)") from None
    return ZClip


class _Holder(torch.nn.Module):
    """The gradients as a module's parameters (the reference's step takes a model)."""

    def __init__(self, grads):
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(p) for p in parameters_for(grads))
        for p, g in zip(self.params, grads):
            p.grad = g


def providers(device: str, max_grad_norm: float | None) -> dict:
    """Per provider, a fresh clipper's step: a function of (params, module)."""
    reference = reference_zclip()(max_grad_norm=max_grad_norm)
    table = {"zclip (reference)": lambda params, module: reference.step(module)}
    for name in fastclip.available_backends(device):
        clipper = fastclip.ZClip(max_grad_norm=max_grad_norm, backend=name)
        table[f"fastclip {name}"] = lambda params, module, clipper=clipper: clipper.clip_(params)
    return table


def bench_workload(spec, device: str, repeats: int, timer: Timer, progress) -> dict:
    grads = make_grads(spec, device)
    module = _Holder(grads)
    params = list(module.parameters())
    pristine = [g.clone() for g in grads]
    norm = float(torch.nn.utils.get_total_norm(pristine))
    exact = sum(float(g.double().square().sum()) for g in pristine) ** 0.5
    tolerance = 2 * abs(norm - exact) / exact + 1e-6  # the coefficients differ as the norms do
    tables = {"no clip": providers(device, None), "clips": providers(device, 0.5 * norm)}
    for step, table in tables.items():  # warm-up of every clipper, then the gate, before any timing
        for _ in range(WARMUP_STEPS):
            for fn in table.values():
                torch._foreach_copy_(grads, pristine)
                fn(params, module)
        results = {}
        for name, fn in table.items():
            torch._foreach_copy_(grads, pristine)
            fn(params, module)
            results[name] = [g.clone() for g in grads]
        expected = results["zclip (reference)"]
        changed = not all(torch.equal(e, p) for e, p in zip(expected, pristine))
        assert changed == (step == "clips"), f"{step}: the reference {'did not clip' if step == 'clips' else 'clipped'}"
        for name, got in results.items():
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=tolerance, atol=0, msg=lambda m: f"{name}, {step}: {m}")
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    streaming = limits.StreamingLimits(nbytes, device)

    names = list(tables["no clip"])
    medians = median_times(STEPS, streaming, LIMITS, names, lambda: torch._foreach_copy_(grads, pristine),
                           lambda name, step: lambda: tables[step][name](params, module), timer, repeats, progress)
    return {"medians": medians, "providers": names, "nbytes": nbytes, "count": len(grads)}


def markdown(results: dict[str, dict]) -> str:
    return ratio_table(results, STEPS, "zclip (reference)",
                       lambda r: f"{r['count']} tensors, {r['nbytes'] / MIB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown")
    args = parser.parse_args()
    run_and_save("fastclip ZClip benchmark", "", WORKLOADS, bench_workload, markdown, repeats=args.repeats,
                 device=args.device, out=args.out, slug="zclip")


if __name__ == "__main__":
    main()
