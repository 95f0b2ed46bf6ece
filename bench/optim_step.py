"""Benchmark: clipping plus a fused AdamW step, gradients given (no backward), torch's loop against
fastclip's, for steps that clip and steps that do not, with and without a GradScaler.

Providers, each one whole step on the same parameters and the same optimizer (its state is shared,
which does not change the work a step does):

* ``torch``: ``scaler.unscale_`` (with a scaler), ``clip_grad_norm_``, ``scaler.step`` /
  ``optimizer.step()``; torch's AMP path is the baseline of every ratio.
* ``fastclip clip_ + step``: ``fastclip.unscale_clip_`` / ``fastclip.clip_``, then the step.
* ``clipped_step grad_scale``: the coefficient inside the fused step (``path="grad_scale"``).
* ``clipped_step auto``: what ``fastclip.clipped_step`` chooses; ``... + skip`` adds ``SkipOnSpike``.

Before timing, every provider's gradients after one step of each kind are checked against torch's.
The gradients are restored before every run, outside the timed region, so every clipping run clips.
Runs are interleaved (the provider order rotates every round) after two warm-up rounds; the table
gives medians. The limit is the memory traffic no path can avoid, timed in the same rounds on a flat
buffer of the gradients' size, restored before each pass as the gradients are (bench/limits.py): the
norm's read plus AdamW's step (reads parameters, gradients and two moments, writes three of them) =
2 reads (the faster of a sum and a dot) + 3 in-place multiplies of that buffer.

Usage: python -m bench.optim_step [--repeats N] [--workload SUBSTRING] [--device D] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fastclip
from bench import limits
from bench.run import Timer, reference_norm
from bench.timing import interleaved_samples, run_and_save
from bench.workloads import MIB, gpt2_shapes, make_grads, resnet50_shapes, with_dtype

NO_CLIP, CLIP = 1e9, 1e-3
SCALE = 2.0**16
WORKLOADS = {
    "gpt2-124m fp32": with_dtype(gpt2_shapes(), torch.float32),
    "resnet-50 fp32": with_dtype(resnet50_shapes(), torch.float32),
    "2000 x 8K fp32": with_dtype([(8192,)] * 2000, torch.float32),
}
STEP_KINDS = [(clips, scaled) for scaled in (False, True) for clips in (False, True)]


def kind_name(clips: bool, scaled: bool) -> str:
    return f"{'clip' if clips else 'no clip'}, {'GradScaler' if scaled else 'no scaler'}"


def providers(optimizer, params, skip):
    """{name: step(max_norm, scaler or None) -> the norm of the unscaled gradients before clipping}."""

    def torch_loop(max_norm, scaler):
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(optimizer) if scaler is not None else optimizer.step()
        return norm

    def fastclip_then_step(max_norm, scaler):
        if scaler is not None:
            norm = fastclip.unscale_clip_(scaler, optimizer, max_norm)
            scaler.step(optimizer)
        else:
            norm = fastclip.clip_(params, max_norm)
            optimizer.step()
        return norm

    return {
        "torch": torch_loop,
        "fastclip clip_ + step": fastclip_then_step,
        "clipped_step grad_scale": lambda m, s: fastclip.clipped_step(optimizer, m, scaler=s, path="grad_scale"),
        "clipped_step auto": lambda m, s: fastclip.clipped_step(optimizer, m, scaler=s),
        "clipped_step auto + skip": lambda m, s: fastclip.clipped_step(optimizer, m, scaler=s, skip=skip),
    }


def new_scaler(device: str, scaled: bool):
    """A GradScaler at the start of a step (scale SCALE), or None."""
    if not scaled:
        return None
    scaler = torch.amp.GradScaler(device, init_scale=SCALE)
    scaler.scale(torch.ones((), device=device))  # creates its scale tensor
    return scaler


def check_providers(table, grads, pristine, device: str) -> None:
    """Before anything is timed, for every step kind: each provider's norm is within torch's own
    error of a float64 reference (or 4 fp32 ulp), and its step leaves the gradients unscaled and
    clipped as torch's ``clip_grads_with_norm_`` clips them by that norm (the fused step writes the
    divided gradient back), to 2^-20 relative (the grad_scale path divides by 1 / c where torch
    multiplies by c: about an ulp). A provider that clipped wrongly, or not at all, fails by far more.
    (torch 2.13's fp32 CPU norm of GPT-2's 38M-element embedding gradient is 2.7e-3 off, its total
    9e-4, so the providers are compared through their norms, not with torch's clipped gradients.)"""
    truth = reference_norm(pristine[False])
    expected_grads = [g.clone() for g in pristine[False]]
    expected_params = [torch.zeros((), device=device).expand(g.shape) for g in expected_grads]
    for p, g in zip(expected_params, expected_grads):
        p.grad = g
    for clips, scaled in STEP_KINDS:
        max_norm, norms = CLIP if clips else NO_CLIP, {}
        for name, step in table.items():
            torch._foreach_copy_(grads, pristine[scaled])
            norms[name] = norm = step(max_norm, new_scaler(device, scaled))
            torch._foreach_copy_(expected_grads, pristine[False])
            torch.nn.utils.clip_grads_with_norm_(expected_params, max_norm, norm)
            for g, expected in zip(grads, expected_grads):
                torch.testing.assert_close(g, expected, rtol=2**-20, atol=0,
                                           msg=lambda m: f"{name}, {kind_name(clips, scaled)}: {m}")
        torch_error = abs(float(norms["torch"]) - truth)
        for name, norm in norms.items():
            assert abs(float(norm) - truth) <= max(torch_error, 4 * 2**-23 * truth), \
                f"{name}, {kind_name(clips, scaled)}: norm {float(norm)} against float64 {truth}"


def bench_workload(spec, device: str, repeats: int, timer: Timer, progress) -> dict:
    grads = make_grads(spec, device)
    params = [torch.nn.Parameter(torch.randn_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    pristine = {False: [g.clone() for g in grads], True: [g.clone() * SCALE for g in grads]}
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    # The default window, acting only once it is full (129 steps, more than are run here), so every
    # provider takes every step (a skipped step would be cheaper, not comparable) at the full cost.
    skip = fastclip.SkipOnSpike(window=128, min_history=129)
    table = providers(optimizer, params, skip)
    check_providers(table, grads, pristine, device)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    streaming = limits.StreamingLimits(nbytes, device)
    passes = streaming.passes()

    def measure(name):
        if name in passes:
            streaming.restore()
            yield "limit", timer(passes[name])
            return
        for clips, scaled in STEP_KINDS:
            scaler = new_scaler(device, scaled)
            torch._foreach_copy_(grads, pristine[scaled])
            yield kind_name(clips, scaled), timer(lambda: table[name](CLIP if clips else NO_CLIP, scaler))

    samples = interleaved_samples(list(table) + list(passes), measure, repeats, progress)
    medians = {key: statistics.median(v) for key, v in samples.items()}
    pass_median = lambda name: medians[(name, "limit")]  # noqa: E731
    medians["limit"] = 2 * limits.one_read(pass_median) + 3 * limits.multiply_in_place(pass_median)
    return {"medians": medians, "providers": list(table), "nbytes": nbytes, "count": len(grads)}


def markdown(results: dict[str, dict]) -> str:
    lines = []
    for workload, r in results.items():
        m = r["medians"]
        lines += [f"\n## {workload} ({len(r['providers'])} providers, {r['count']} tensors, "
                  f"{r['nbytes'] / MIB:.0f} MiB of gradients; limit {m['limit'] * 1e3:.1f} ms)\n",
                  "| provider | " + " | ".join(kind_name(*k) for k in STEP_KINDS) + " |",
                  "|---|" + "---|" * len(STEP_KINDS)]
        for name in r["providers"]:
            cells = []
            for k in STEP_KINDS:
                t, base = m[(name, kind_name(*k))], m[("torch", kind_name(*k))]
                cells.append(f"{t * 1e3:.1f} ms, {base / t:.2f}x torch, {m['limit'] / t:.0%} of limit")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--workload", default="", help="run only workloads whose name contains this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results", help="directory for the markdown")
    args = parser.parse_args()
    run_and_save("fastclip optimizer-step benchmark (clip + fused AdamW)",
                 "; each cell: time, torch's time / this time, the memory-traffic limit / this time",
                 {name: spec for name, spec in WORKLOADS.items() if args.workload in name}, bench_workload, markdown,
                 repeats=args.repeats, device=args.device, out=args.out, slug="optim-step")


if __name__ == "__main__":
    main()
