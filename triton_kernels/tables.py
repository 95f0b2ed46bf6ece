"""Chunk tables: how every Triton kernel family finds the gradients it works on.

A set of gradients becomes two device-resident int64 tables, built on the host once per set and
cached: one row per chunk of ``CHUNK`` elements of one gradient (one program's work) and one row per
gradient. A CUDA graph that captured a launch replays validly because the tables stay where they
were, and the host never waits for the GPU to read them. Also here: what every launch needs around
it (the device guard, dense copies of gradients that are not).

Kernels are launched directly (``kernel[grid](...)``), not through ``torch.library.wrap_triton``: every
launch happens inside an opaque custom op, whose body torch.compile never traces, and on an H200
(torch 2.11, Triton 3.6) wrap_triton cost 189 us a launch in eager mode against 20 us direct.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading

import torch
import triton
import triton.language as tl

from .elements import DTYPE_TAGS

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per chunk: one program's work, and the fixed unit in which partials are combined.
CHUNK = 65536

# How a gradient is multiplied by the coefficient, as torch's _foreach_mul_ does on each device:
# CUDA reads the coefficient in the gradient's dtype; CPU converts it to the arithmetic type
# (float, or double for fp64) exactly; a 0-dim gradient of another dtype than the coefficient is
# multiplied in the promoted type on both (two 0-dim operands promote).
SCALE_COEFFICIENT_IN_GRAD_DTYPE, SCALE_PROMOTED, SCALE_COEFFICIENT_IN_MATH_TYPE = 0, 1, 2

# Columns of the tables (int64): chunks [address of the gradient, begin, end, gradient index];
# tensors [address, dtype tag, first chunk, end chunk, scale mode].
CHUNK_COLUMNS = tl.constexpr(4)
TENSOR_COLUMNS = tl.constexpr(5)


@triton.jit
def this_chunk(chunks_ptr, tensors_ptr):
    """(chunk index, gradient address, begin, end, gradient index, dtype tag) of this program's chunk,
    read from the tables: how every kernel that works chunk by chunk starts."""
    chunk = tl.program_id(0).to(tl.int64)
    row = chunks_ptr + chunk * CHUNK_COLUMNS
    t = tl.load(row + 3)
    return chunk, tl.load(row), tl.load(row + 1), tl.load(row + 2), t, tl.load(tensors_ptr + t * TENSOR_COLUMNS + 1)


# Raised by a table-cache miss during a CUDA graph capture (the C++ extension's cache says the same).
CAPTURE_MISS = ("fastclip: these gradients were not seen before this CUDA graph capture; call fastclip once on "
                "the same tensors before capturing (warm-up). Non-contiguous gradients cannot be captured: each "
                "call clips a new contiguous copy of them, so make them contiguous first")


def _stream_state(device: torch.device) -> tuple[torch.cuda.Stream | None, bool]:
    """(the current stream on ``device``, whether it is being captured into a CUDA graph); (None,
    False) off the GPU."""
    if device.type != "cuda":
        return None, False
    with torch.cuda.device(device):
        return torch.cuda.current_stream(), torch.cuda.is_current_stream_capturing()


def _record_stream(entry: tuple, stream: torch.cuda.Stream) -> None:
    """Tells the caching allocator that ``stream`` uses the device tables of a cache entry."""
    for table in entry:
        if isinstance(table, torch.Tensor) and table.device.type == "cuda":
            table.record_stream(stream)


class _TableCache:
    """Device tables keyed by what they were built from (the tensors' addresses, sizes, dtypes...)
    and, last, the device; the oldest evicted first. An entry is a tuple whose top-level device
    tensors are the tables.

    On a GPU it keeps the rules of the C++ extension's cache:
    - no table is built during a CUDA graph capture: its upload would be recorded, not run, and
      eager calls would then read an unfilled table. A miss during a capture raises CAPTURE_MISS;
    - a table used in a capture is never evicted (its graph may replay it), until
      ``release_captured()`` says those graphs are gone;
    - a table used on a stream other than the one that allocated it is ``record_stream``-ed there,
      so that once evicted its memory is not reused before that stream's work on it is done;
    - an entry evicted by another thread stays alive while a call holds it (its own references).
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.entries: dict[tuple, tuple] = {}
        self.streams: dict[tuple, set] = {}  # per key, the streams its tables were used on
        self.captured: set[tuple] = set()
        self.lock = threading.Lock()

    def get(self, key: tuple, build) -> tuple:
        stream, capturing = _stream_state(key[-1])
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                if capturing:
                    raise RuntimeError(CAPTURE_MISS)
                self._evict_if_full()
                entry = self.entries[key] = build()
                self.streams[key] = {stream}
            if capturing:
                self.captured.add(key)
            elif stream not in self.streams[key]:
                _record_stream(entry, stream)
                self.streams[key].add(stream)
            return entry

    def release_captured(self) -> int:
        """Drops the entries used in CUDA graph captures; returns how many."""
        with self.lock:
            for key in self.captured:
                del self.entries[key], self.streams[key]
            released = len(self.captured)
            self.captured.clear()
            return released

    def _evict_if_full(self) -> None:
        for key in [k for k in self.entries if k not in self.captured]:
            if len(self.entries) < self.capacity:
                break
            del self.entries[key], self.streams[key]


TABLE_CACHE = _TableCache()


def upload(host_tables: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the tables on ``device``, their host copies): stream-ordered copies from pinned memory to a
    GPU, so the host never waits. Keep the host copies with the device ones: a CUDA graph that
    captured the upload copies from them again."""
    if device.type == "cuda":
        host_tables = [h.pin_memory() for h in host_tables]
    return [h.to(device, non_blocking=True) for h in host_tables], host_tables


def _scale_mode(t: torch.Tensor, coefficient_dtype: torch.dtype) -> int:
    if t.dim() == 0 and t.dtype != coefficient_dtype:
        return SCALE_PROMOTED
    return SCALE_COEFFICIENT_IN_GRAD_DTYPE if t.device.type == "cuda" else SCALE_COEFFICIENT_IN_MATH_TYPE


def tables_for(tensors: list[torch.Tensor], coefficient_dtype: torch.dtype, numels: list[int]):
    """(chunk table, tensor table, number of chunks) for dense tensors with these numels, cached."""
    chunks, table = gradient_tables(tensors, coefficient_dtype)
    return chunks, table, (chunks.shape[0] if any(numels) else 0)


def gradient_tables(tensors: list[torch.Tensor], coefficient_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The device tables of dense ``tensors``: chunks and tensors (see CHUNK_COLUMNS, TENSOR_COLUMNS),
    from the cache when these tensors (addresses, sizes, dtypes) were seen on this device before."""
    device = tensors[0].device
    rows = tuple((t.data_ptr(), t.numel(), DTYPE_TAGS[t.dtype], _scale_mode(t, coefficient_dtype)) for t in tensors)

    def build():
        chunk_rows, tensor_rows = [], []
        for index, (address, numel, tag, mode) in enumerate(rows):
            first = len(chunk_rows)
            chunk_rows += [(address, b, min(b + CHUNK, numel), index) for b in range(0, numel, CHUNK)]
            tensor_rows.append((address, tag, first, len(chunk_rows), mode))
        host = [torch.tensor(chunk_rows or [(0, 0, 0, 0)], dtype=torch.int64), torch.tensor(tensor_rows, dtype=torch.int64)]
        (chunks, table), host = upload(host, device)
        return chunks, table, host

    chunks, table, _ = TABLE_CACHE.get((rows, device), build)
    return chunks, table


def _is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one span of memory exactly once, in some order (contiguous,
    transposed, channels-last...): the dimensions sorted by stride must pack without gaps."""
    expected_stride = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


def dense_tensors(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Tensors the kernels can address as one flat span (non-overlapping and dense), copying the
    others; returns (dense tensors, (original, copy) pairs to write back after scaling)."""
    dense, copies = [], []
    for t in tensors:
        if t.is_contiguous() or _is_non_overlapping_and_dense(t):
            dense.append(t)
        else:
            c = t.contiguous()
            dense.append(c)
            copies.append((t, c))
    return dense, copies


def checked_total_dtype(tensors: list[torch.Tensor], what: str) -> torch.dtype:
    """Checks that the kernels can serve ``tensors`` (one device, float dtypes, strided) and returns
    the total norm's dtype, the promotion of theirs. Sets built in C: this runs on every call."""
    if not tensors:
        raise ValueError(f"fastclip_triton: {what} needs at least one tensor")
    devices = set(map(operator.attrgetter("device"), tensors))
    if len(devices) > 1:
        raise ValueError(f"fastclip_triton: expected the tensors on one device, got {sorted(map(str, devices))}")
    dtypes = set(map(operator.attrgetter("dtype"), tensors))
    layouts = set(map(operator.attrgetter("layout"), tensors))
    if not dtypes <= DTYPE_TAGS.keys() or layouts != {torch.strided}:
        raise ValueError(f"fastclip_triton: no kernel for {sorted(map(str, dtypes))} / {sorted(map(str, layouts))} tensors")
    return functools.reduce(torch.promote_types, dtypes)


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one: Triton launches on the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
