"""What the stand-alone benchmark scripts (``optim_step``, ``value_clip``, ``agc``) share: timed rounds,
interleaved so that drift and noise hit every provider alike, and the run from the command line to
its markdown file in ``bench/results``."""

from __future__ import annotations

import datetime
import os
import re
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
