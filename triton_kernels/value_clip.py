"""Value clipping (``clip_grad_value_``) in Triton: one launch over every gradient of every dtype.

One program per chunk of ``CHUNK`` elements of one gradient (the chunk table of ``clip.py``, cached
the same way) clamps its chunk in place: ``clamp_min(-clip_value)`` then ``clamp_max(clip_value)``,
as torch does, with each bound in the gradient's dtype (converted on the host as ATen converts a
Scalar holding a double: to float, then to the 16-bit dtype). An element inside the interval, and
a NaN, is read and not written. Registers ``torch.ops.fastclip_triton.clamp_values_``.
"""

from __future__ import annotations

# The operators' signatures say typing.List: torch before 2.7 infers no schema from list[Tensor].
from typing import List

import torch
import triton
import triton.language as tl

from .elements import float_bits, load_math, store_math
from .tables import INTERPRETING, checked_total_dtype, dense_tensors, device_guard, tables_for, this_chunk, wrap_triton

# Each program clamps a chunk in BLOCK-wide steps; like the scale kernel's (clip.py), one fixed
# configuration: the kernel writes the gradients, so it cannot be benchmarked in place.
_CLAMP_BLOCK, _CLAMP_WARPS = (4096 if INTERPRETING else 2048), 8


@triton.jit
def _clamp_chunk(address, begin, end, hi, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    lo = -hi  # exact in every format, so the bounds are symmetric as torch's are
    for start in range(begin, end, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offsets < end
        x = load_math(address, offsets, mask, DTYPE)
        y = tl.where(x < lo, lo, x)
        y = tl.where(y > hi, hi, y)
        store_math(address, offsets, mask & (y != x) & (x == x), y, DTYPE)


@triton.jit(do_not_specialize=["hi_f32_bits", "hi_f16_bits", "hi_bf16_bits", "hi_f64_bits"])
def _clamp_kernel(chunks_ptr, tensors_ptr, hi_f32_bits, hi_f16_bits, hi_bf16_bits, hi_f64_bits, BLOCK: tl.constexpr):
    """The upper bound of each dtype arrives as the bits of a float64 (lo is -hi); a small value's
    bits may be typed int32, hence the widening before the bitcast."""
    _, address, begin, end, _, dtype = this_chunk(chunks_ptr, tensors_ptr)
    if dtype == 0:
        _clamp_chunk(address, begin, end, hi_f32_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32),
                     0, BLOCK)
    elif dtype == 1:
        _clamp_chunk(address, begin, end, hi_f16_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32),
                     1, BLOCK)
    elif dtype == 2:
        _clamp_chunk(address, begin, end, hi_bf16_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32),
                     2, BLOCK)
    else:
        _clamp_chunk(address, begin, end, hi_f64_bits.to(tl.int64).to(tl.float64, bitcast=True), 3, BLOCK)


def _bound_bits(clip_value: float, dtype: torch.dtype) -> int:
    """clip_value as a gradient of ``dtype`` holds it (through float for the narrower dtypes, as
    ATen converts a Scalar), as float64 bits. Every value of these dtypes is exact in float64."""
    if dtype != torch.float64:
        clip_value = torch.tensor(clip_value, dtype=torch.float64).to(torch.float32).to(dtype).item()
    return float_bits(float(clip_value))


@torch.library.custom_op("fastclip_triton::clamp_values_", mutates_args={"grads"})
def clamp_values_(grads: List[torch.Tensor], clip_value: float) -> None:
    """Clamps every element of ``grads`` in place to ``[-clip_value, clip_value]`` (one launch)."""
    checked_total_dtype(grads, "clamp_values_")
    if not clip_value >= 0:
        raise ValueError(f"fastclip_triton: clip_value must be >= 0, got {clip_value}")
    dense, copies = dense_tensors(grads)
    chunks, table, num_chunks = tables_for(dense, torch.float32, list(map(torch.Tensor.numel, dense)))
    bounds = [_bound_bits(clip_value, d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    if num_chunks:
        with device_guard(grads[0].device):
            wrap_triton(_clamp_kernel)[(num_chunks,)](chunks, table, *bounds, BLOCK=_CLAMP_BLOCK,
                                                      num_warps=_CLAMP_WARPS)
    for original, copy in copies:
        original.copy_(copy)


@clamp_values_.register_fake
def _(grads, clip_value):
    checked_total_dtype(grads, "clamp_values_")
