"""What the stand-alone benchmark scripts (``optim_step``, ``value_clip``, ``agc``) share: timed rounds,
interleaved so that drift and noise hit every provider alike, and the run from the command line to
its markdown file in ``bench/results``."""

from __future__ import annotations

import datetime
import os
import re
import statistics
from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from bench.limits import StreamingLimits
from bench.run import WARMUP_ROUNDS, Timer, device_description


def interleaved_samples(names: list[str], measure: Callable[[str], Iterable[tuple[str, float]]], repeats: int,
                        progress) -> dict[tuple[str, str], list[float]]:
    """Seconds per (name, kind): every round runs ``measure(name)`` for every name, in an order that
    rotates each round; the first ``WARMUP_ROUNDS`` rounds are discarded.

    Args:
        names: the providers and limits to time.
        measure: runs one name once; yields (kind, seconds) for each kind of step it timed.
        repeats: timed rounds.
        progress: a tqdm-like object, updated once per round.
    """
    samples: dict[tuple[str, str], list[float]] = {}
    for round_index in range(repeats + WARMUP_ROUNDS):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            for kind, seconds in measure(name):
                if round_index >= WARMUP_ROUNDS:
                    samples.setdefault((name, kind), []).append(seconds)
        progress.update(1)
    return samples


def median_times(steps: Iterable[str], streaming: StreamingLimits, limit_of: dict[str, Callable], providers: Iterable[str],
                 restore: Callable[[], None], run: Callable[[str, str], Callable], timer, repeats: int,
                 progress) -> dict[tuple[str, str], float]:
    """Median seconds of every provider on every step, and of each step's limit, interleaved.

    Args:
        steps: the kinds of step, in order.
        streaming: the machine's streaming passes over a flat buffer of the same bytes
            (:class:`bench.limits.StreamingLimits`, or anything with its ``passes()`` and
            ``restore()``), each timed once a round after the buffer is restored.
        limit_of: per step, its limit's seconds from the passes' medians: ``limit_of[step](median)``,
            ``median(pass name)`` giving seconds (e.g. :func:`bench.limits.one_read`).
        providers: the providers' names.
        restore: puts the gradients back as they were; called before every provider's run, untimed.
        run: ``run(provider, step)`` gives the function that runs one such step.
        timer, repeats, progress: as for :func:`interleaved_samples` (``timer(fn)`` times one call).

    Returns:
        ``{(name, step): seconds}`` for every provider, and ``{("limit", step): seconds}``.
    """
    passes = streaming.passes()

    def measure(name):
        if name in passes:
            streaming.restore()
            yield "pass", timer(passes[name])
            return
        for step in steps:
            restore()
            yield step, timer(run(name, step))

    samples = interleaved_samples(list(providers) + list(passes), measure, repeats, progress)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    for step in steps:
        medians[("limit", step)] = limit_of[step](lambda name: medians[(name, "pass")])
    return medians


def ratio_table(results: dict[str, dict], steps: Iterable[str], baseline: str, size_label: Callable[[dict], str]) -> str:
    """The markdown table of a stand-alone benchmark: per workload, step and provider, the median
    time, the ratio to ``baseline`` and the % of the step's limit. Each result holds ``medians``
    (from :func:`median_times`) and ``providers``; ``size_label(result)`` describes its workload."""
    lines = [f"| workload | step | provider | ms | x {baseline} | % of limit |", "|---|---|---|---|---|---|"]
    for workload, r in results.items():
        m = r["medians"]
        for step in steps:
            limit, base = m[("limit", step)], m[(baseline, step)]
            for name in r["providers"]:
                t = m[(name, step)]
                lines.append(f"| {workload} ({size_label(r)}) | {step} | {name} | {t * 1e3:.2f} | {base / t:.2f} | "
                             f"{limit / t:.0%} |")
    return "\n".join(lines) + "\n"


def run_and_save(title: str, note: str, workloads: dict, bench_one: Callable, markdown: Callable[[dict], str], *,
                 repeats: int, device: str, out: str, slug: str) -> str:
    """Runs ``bench_one(spec, device, repeats, timer, progress)`` for every workload, prints the
    markdown (a header naming the machine, torch and the date, then ``markdown(results)``) and writes
    it to ``out/<slug>-<machine>-<date>.md``; returns that path."""
    machine = device_description(device)
    today = datetime.date.today().isoformat()
    header = f"# {title}\n\n{machine}; torch {torch.__version__}; {today}; medians of {repeats} interleaved rounds{note}\n\n"
    print(header, flush=True)
    timer = Timer(device)
    results = {}
    with tqdm(total=len(workloads) * (repeats + WARMUP_ROUNDS), desc=slug, unit="round", disable=None) as progress:
        for name, spec in workloads.items():
            results[name] = bench_one(spec, device, repeats, timer, progress)
    text = header + markdown(results)
    print(text[len(header):], flush=True)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, re.sub(r"[^a-z0-9]+", "-", f"{slug}-{machine.split(',')[0]}-{today}".lower()).strip("-") + ".md")
    with open(path, "w") as f:
        f.write(text)
    print(f"written: {path}")
    return path
