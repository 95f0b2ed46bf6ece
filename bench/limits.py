"""This machine's streaming limits for a workload: how fast plain torch streams the same number of
bytes, from the same cache state, in the same interleaved rounds as the providers.

Two things made an earlier single ``flat.sum()`` an unfair limit on an Intel Xeon VM (2 cores, 480 MiB
L3, of which ~100 MiB held data between runs): every provider ran right after its gradients were
restored from a copy, so up to L3's worth of them came from cache, while the flat buffer had not
been touched since the previous round and came from DRAM (fastclip "reached" 115-180% of the limit
on 16-256 MiB); and torch's float dot streams ~12% faster than its sum there. So the buffer is
restored from its own copy before every timed run, as the gradients are, and one read is the faster
of the two reductions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

READS = {
    "one read (sum)": lambda flat: flat.sum(),
    "one read (dot)": lambda flat: torch.dot(flat, flat),
}
MULTIPLY = "multiply in place"  # one read and one write of every byte


class StreamingLimits:
    """A flat float32 buffer of a workload's bytes and the plain torch passes timed over it.

    Args:
        nbytes: the workload's bytes.
        device: where its gradients live.
    """

    def __init__(self, nbytes: int, device: str):
        self.flat = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        self.source = self.flat.clone()

    def passes(self) -> dict[str, Callable[[], object]]:
        """The passes to time, by name: each read of :data:`READS`, and :data:`MULTIPLY`."""
        timed = {name: (lambda read=read: read(self.flat)) for name, read in READS.items()}
        timed[MULTIPLY] = lambda: self.flat.mul_(1.0)
        return timed

    def restore(self) -> None:
        """Rewrites the buffer from its copy (untimed, before every timed pass): the same traffic, so
        the same cache state, as restoring the gradients before a provider's run."""
        self.flat.copy_(self.source)


def one_read(median: Callable[[str], float]) -> float:
    """Seconds of one read: the faster of the timed reductions, given ``median(pass name)``."""
    return min(median(name) for name in READS)


def read_and_write(median: Callable[[str], float]) -> float:
    """Seconds of a clip's least traffic: one read for the norm, then an in-place multiply."""
    return one_read(median) + median(MULTIPLY)


def multiply_in_place(median: Callable[[str], float]) -> float:
    """Seconds of one pass that reads and writes every byte: the in-place multiply alone."""
    return median(MULTIPLY)
