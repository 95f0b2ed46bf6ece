"""The benchmark's outputs: a markdown table (every figure as "x times torch" and "% of this
machine's limit"), the CPU targets of the C++ issue, rows appended to a CSV, a markdown file and a
PNG plot of speedup against tensor count and total size, per dtype."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import re
import statistics

from bench import limits
from bench.workloads import MIB, Workload

BASELINE = "torch default"
GRADIENT_LIST = "gradient list"  # building [p.grad for p in params], timed by bench.run
MANY_TENSORS = 1000  # from this many tensors on, a no-clip target also reports the read + list limit


@dataclasses.dataclass
class Result:
    workload: Workload
    samples: dict[tuple[str, str], list[float]]  # (provider or limit, step) -> seconds per run
    failures: dict[str, str]  # external providers that failed their check, not timed
    provider_order: list[str]  # as the providers table lists them

    def median(self, name: str, step: str) -> float:
        return statistics.median(self.samples[(name, step)])

    def quantiles(self, name: str, step: str) -> tuple[float, float]:
        values = self.samples[(name, step)]
        if len(values) < 2:
            return values[0], values[0]
        q = statistics.quantiles(values, n=10)
        return q[1], q[7]

    def providers(self) -> list[str]:
        return [name for name in self.provider_order if (name, "no clip") in self.samples]

    def bytes_moved(self, step: str) -> int:
        """One read without clipping; two reads and a write with it."""
        return self.workload.nbytes * (1 if step == "no clip" else 3)

    def limit(self, step: str) -> float:
        """Seconds of the step's limit: one read without clipping, a read and an in-place multiply
        with it (see bench/limits.py)."""
        if step == "no clip":
            return limits.one_read(lambda name: self.median(name, "no clip"))
        return limits.read_and_write(lambda name: self.median(name, "no clip" if name in limits.READS else "clip"))

    def percent_of_limit(self, name: str, step: str) -> float:
        return 100 * self.limit(step) / self.median(name, step)

    def speedup(self, name: str, step: str) -> float:
        return self.median(BASELINE, step) / self.median(name, step)

    def read_and_list(self) -> float | None:
        """Seconds of the many-tensor limit without clipping: one read plus building the list of
        gradients (None where the list was not timed)."""
        if (GRADIENT_LIST, "no clip") not in self.samples:
            return None
        return self.limit("no clip") + self.median(GRADIENT_LIST, "no clip")


# Per issue, (description, workload, step, measure, threshold): the CPU targets, set for the 2-core
# CPU machines; "limit" measures % of the limit, "speedup" x torch.
TARGETS = {
    "the C++ issue": [
        ("no clipping, 256 MiB in 8 tensors: % of one read", "8 x 8M fp32 (256 MiB)", "no clip", "limit", 85.0),
        ("clipping, 256 MiB in 8 tensors: % of read + write", "8 x 8M fp32 (256 MiB)", "clip", "limit", 90.0),
        ("no clipping, 2000 x 8K: x torch clip_grad_norm_", "2000 x 8K fp32", "no clip", "speedup", 6.0),
    ],
    "the CPU-speed issue": [
        ("bf16 (LLaMA-style 4 layers), no clipping: % of one read", "llama-style 4 layers bf16", "no clip", "limit",
         85.0),
        ("bf16 (LLaMA-style 4 layers), clipping: % of read + write", "llama-style 4 layers bf16", "clip", "limit", 90.0),
        ("fp16 (LLaMA-style 4 layers), no clipping: % of one read", "llama-style 4 layers fp16", "no clip", "limit",
         85.0),
        ("fp16 (LLaMA-style 4 layers), clipping: % of read + write", "llama-style 4 layers fp16", "clip", "limit", 90.0),
        ("no clipping, 2000 x 8K: x torch clip_grad_norm_", "2000 x 8K fp32", "no clip", "speedup", 7.0),
        ("no clipping, 10,000 tensors (16 MiB fp32): % of one read", "10000 tensors, 16 MiB float32", "no clip",
         "limit", 50.0),
    ],
}
# The CPU-speed issue's host-overhead target: fastclip's whole call, per tensor, above building the
# list of gradients, in microseconds (tiny tensors, so that the bytes do not count).
HOST_OVERHEAD_TARGET_US = 0.1


def _fastclip_providers(result: Result) -> list[str]:
    return [p for p in result.providers() if p.startswith("fastclip") and p != "fastclip torch"]


def markdown(results: list[Result], host_overhead: tuple[str, int, float] | None = None) -> str:
    """The benchmark's markdown: the table, failures, the issues' targets and, if measured,
    ``host_overhead`` = (provider, number of tensors, microseconds per tensor)."""
    providers = list(dict.fromkeys(p for r in results for p in r.providers()))
    others = [p for p in providers if p != BASELINE]
    lines = [
        f"Ratios are `{BASELINE}` (torch.nn.utils.clip_grad_norm_ as users call it) time / provider time. "
        "\"% of limit\" compares the best fastclip kernel with this machine's streaming speed over the same "
        "bytes in the same run, on a flat buffer restored before every run as the gradients are (one read, the "
        "faster of a sum and a dot, without clipping; that read plus an in-place multiply with it).\n",
        "| workload | tensors | MiB | step | torch ms (p20-p80) | " + " | ".join(f"x {p}" for p in others)
        + " | best fastclip GB/s | % of limit |",
        "|---|---|---|---|---|" + "---|" * len(others) + "---|---|",
    ]
    for r in results:
        for step in ("no clip", "clip"):
            p20, p80 = r.quantiles(BASELINE, step)
            cells = [f"{r.speedup(p, step):.2f}" if (p, step) in r.samples else "-" for p in others]
            fused = _fastclip_providers(r)
            best = min(fused, key=lambda p: r.median(p, step)) if fused else None
            gbs = f"{r.bytes_moved(step) / r.median(best, step) / 1e9:.1f}" if best else "-"
            limit = f"{r.percent_of_limit(best, step):.0f}%" if best else "-"
            lines.append(f"| {r.workload.name} | {r.workload.count} | {r.workload.nbytes / MIB:.1f} | {step} | "
                         f"{r.median(BASELINE, step) * 1e3:.3f} ({p20 * 1e3:.3f}-{p80 * 1e3:.3f}) | "
                         + " | ".join(cells) + f" | {gbs} | {limit} |")
    failures = [f"- {r.workload.name}: {name} not timed: {error}" for r in results for name, error in r.failures.items()]
    if failures:
        lines += ["", "Providers that failed their correctness check:", *failures]
    lines += ["", *targets(results)]
    if host_overhead is not None:
        name, count, micros = host_overhead
        verdict = "met" if micros <= HOST_OVERHEAD_TARGET_US else "NOT met"
        lines += ["", f"Host overhead per tensor ({count:,} one-element fp32 gradients, no clipping; the whole call above "
                  f"building the list of gradients): {micros:.3f} us ({name}), target <= {HOST_OVERHEAD_TARGET_US:g} us "
                  f"(the CPU-speed issue): {verdict}"]
    return "\n".join(lines) + "\n"


def targets(results: list[Result]) -> list[str]:
    """The issues' CPU targets, for the best fastclip backend, where their workloads ran."""
    by_name = {r.workload.name: r for r in results}
    lines = []
    for issue, issue_targets in TARGETS.items():
        lines += [f"Targets of {issue} (best fastclip backend; they are set for the 2-core CPU machines):", ""]
        for description, workload, step, measure, threshold in issue_targets:
            r = by_name.get(workload)
            fused = _fastclip_providers(r) if r else []
            if not fused:
                lines.append(f"- {description}: not measured in this run")
                continue
            best = min(fused, key=lambda p: r.median(p, step))
            value = r.percent_of_limit(best, step) if measure == "limit" else r.speedup(best, step)
            unit = "%" if measure == "limit" else "x"
            verdict = "met" if value >= threshold else "NOT met"
            lines.append(f"- {description}: {value:.2f}{unit} ({best}), target >= {threshold:g}{unit}: {verdict}"
                         + _read_and_list_note(r, best, step))
        lines.append("")
    return lines[:-1]


def _read_and_list_note(r: Result, best: str, step: str) -> str:
    """For a no-clip target on many tensors: the limit that counts building the gradient list too
    (what any clip of these tensors must at least do), in x torch, and the share of it fastclip reaches;
    and the ceiling of one read alone, in x torch (a speed-up target above it asks for more than
    streaming the bytes once, with no gradient to take)."""
    limit = r.read_and_list()
    if step != "no clip" or r.workload.count < MANY_TENSORS or limit is None:
        return ""
    torch_seconds = r.median(BASELINE, step)
    read = r.limit(step)
    return (f" (one read + building the gradient list: {limit * 1e3:.3f} ms, {torch_seconds / limit:.2f}x "
            f"torch; fastclip at {100 * limit / r.median(best, step):.0f}% of it; one read alone: "
            f"{read * 1e3:.3f} ms, {torch_seconds / read:.2f}x torch)")


def save(results: list[Result], markdown_text: str, machine: str, preset: str, directory: str) -> list[str]:
    """Appends to <directory>/benchmarks.csv and writes <slug>.md and <slug>.png; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    today = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{machine.split(',')[0]}-{today}-{preset}".lower()).strip("-")
    csv_path = os.path.join(directory, "benchmarks.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "machine", "preset", "workload", "group", "dtype", "tensors", "bytes", "provider",
                             "step", "median_s", "p20_s", "p80_s", "limit_median_s"])
        for r in results:
            for name in [*r.providers()]:
                for step in ("no clip", "clip"):
                    p20, p80 = r.quantiles(name, step)
                    writer.writerow([today, machine, preset, r.workload.name, r.workload.group, r.workload.dtype_label,
                                     r.workload.count, r.workload.nbytes, name, step, r.median(name, step), p20, p80,
                                     r.limit(step)])
    md_path = os.path.join(directory, f"{slug}.md")
    with open(md_path, "w") as f:
        f.write(markdown_text)
    written = [csv_path, md_path]
    png_path = plot(results, machine, os.path.join(directory, f"{slug}.png"))
    if png_path:
        written.append(png_path)
    return written


def plot(results: list[Result], machine: str, path: str) -> str | None:
    """Speedup of the best fastclip backend over torch, against tensor count and total size."""
    sweeps = [r for r in results if r.workload.group in ("count sweep", "size sweep") and _fastclip_providers(r)]
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, group, x_of, label in ((axes[0], "count sweep", lambda r: r.workload.count, "number of tensors"),
                                     (axes[1], "size sweep", lambda r: r.workload.nbytes / MIB, "total size (MiB)")):
        for dtype in dict.fromkeys(r.workload.dtype_label for r in sweeps if r.workload.group == group):
            points = sorted((x_of(r), r) for r in sweeps if r.workload.group == group and r.workload.dtype_label == dtype)
            for step, style in (("no clip", "-o"), ("clip", "--s")):
                speedups = [max(r.speedup(p, step) for p in _fastclip_providers(r)) for _, r in points]
                axis.plot([x for x, _ in points], speedups, style, label=f"{dtype}, {step}")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("speedup over torch clip_grad_norm_ (x)")
    figure.suptitle(f"fastclip vs torch: {machine}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
