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


def median_times(steps: Iterable[str], limits: dict[str, Callable], limit_of: dict[str, str], providers: Iterable[str],
                 restore: Callable[[], None], run: Callable[[str, str], Callable], timer, repeats: int,
                 progress) -> dict[tuple[str, str], float]:
    """Median seconds of every provider on every step, and of each step's limit, interleaved.

    Args:
        steps: the kinds of step, in order.
        limits: the machine's limits by name: functions streaming the same bytes (a read, a read and
            a write...).
        limit_of: the name of each step's limit.
        providers: the providers' names.
        restore: puts the gradients back as they were; called before every provider's run, untimed.
        run: ``run(provider, step)`` gives the function that runs one such step.
        timer, repeats, progress: as for :func:`interleaved_samples` (``timer(fn)`` times one call).

    Returns:
        ``{(name, step): seconds}`` for every provider, and for each step's limit.
    """
    def measure(name):
        for step in steps:
            if name in limits:
                if limit_of[step] == name:
                    yield step, timer(limits[name])
            else:
                restore()
                yield step, timer(run(name, step))

    samples = interleaved_samples(list(providers) + list(limits), measure, repeats, progress)
    return {key: statistics.median(values) for key, values in samples.items()}


def ratio_table(results: dict[str, dict], steps: Iterable[str], limit_of: dict[str, str], baseline: str,
                size_label: Callable[[dict], str]) -> str:
    """The markdown table of a stand-alone benchmark: per workload, step and provider, the median
    time, the ratio to ``baseline`` and the % of the step's limit. Each result holds ``medians``
    (from :func:`median_times`) and ``providers``; ``size_label(result)`` describes its workload."""
    lines = [f"| workload | step | provider | ms | x {baseline} | % of limit |", "|---|---|---|---|---|---|"]
    for workload, r in results.items():
        m = r["medians"]
        for step in steps:
            limit, base = m[(limit_of[step], step)], m[(baseline, step)]
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
