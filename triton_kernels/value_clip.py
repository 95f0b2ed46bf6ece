"""Value clipping (``clip_grad_value_``) in Triton: one launch over every gradient of every dtype.

One program per chunk of ``CHUNK`` elements of one gradient (the chunk table of ``clip.py``, cached
the same way) clamps its chunk in place: ``clamp_min(-clip_value)`` then ``clamp_max(clip_value)``,
with torch's bits. torch's foreach clamps take one of two routes per dtype, and the routes differ in
the sign of a zero result when clip_value is 0:

- the fused route (CUDA, every gradient of the dtype dense, ``foreach`` not False): compares in
  float (double for fp64) with the bound as a float: an element is kept if it is above the lower
  bound, else becomes the bound; then likewise below the upper bound. With clip_value 0 every
  element becomes +0.0.
- the per-tensor route (CPU, a gradient of the dtype not dense, or ``foreach=False``):
  ``clamp_min_`` / ``clamp_max_`` on each tensor, with each bound in the gradient's dtype (converted
  as ATen converts a Scalar holding a double: to float, then to the 16-bit dtype); an element equal
  to a bound is kept, so zeros keep their sign and -3 clamps to -0.0 when clip_value is 0.

NaN stays NaN on both. An element the clamp leaves as it was is read and not written. Registers
``torch.ops.fastclip_triton.clamp_values_``.
"""

from __future__ import annotations

# The operators' signatures say typing.List: torch before 2.7 infers no schema from list[Tensor].
from typing import List

import torch
import triton
import triton.language as tl

from .elements import DTYPE_TAGS, float_bits, load_math, store_math
from .tables import INTERPRETING, checked_total_dtype, dense_tensors, device_guard, tables_for, this_chunk

# Each program clamps a chunk in BLOCK-wide steps; like the scale kernel's (clip.py), one fixed
# configuration: the kernel writes the gradients, so it cannot be benchmarked in place.
_CLAMP_BLOCK, _CLAMP_WARPS = (4096 if INTERPRETING else 2048), 8

# The kernel's bound arguments, in their order.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _clamp_chunk(address, begin, end, hi, fused_route, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    lo = hi * -1.0  # exact, and -0.0 for 0 (where 0 - hi would give +0.0)
    for start in range(begin, end, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offsets < end
        x = load_math(address, offsets, mask, DTYPE)
        if fused_route:
            y = tl.where(x > lo, x, lo)
            y = tl.where(y < hi, y, hi)
        else:
            y = tl.where(x < lo, lo, x)
            y = tl.where(y > hi, hi, y)
        # Written where the bits change (a zero's sign too), never for NaN (kept by both routes).
        store_math(address, offsets, mask & (_bits(y) != _bits(x)) & (x == x), y, DTYPE)


@triton.jit
def _bits(x):
    if x.dtype == tl.float64:
        return x.to(tl.int64, bitcast=True)
    else:
        return x.to(tl.int32, bitcast=True)


@triton.jit(do_not_specialize=["hi_f32_bits", "hi_f16_bits", "hi_bf16_bits", "hi_f64_bits", "fused_route_dtypes"])
def _clamp_kernel(chunks_ptr, tensors_ptr, hi_f32_bits, hi_f16_bits, hi_bf16_bits, hi_f64_bits, fused_route_dtypes,
                  BLOCK: tl.constexpr):
    """The upper bound of each dtype arrives as the bits of a float64 (lo is -hi); a small value's
    bits may be typed int32, hence the widening before the bitcast. Bit ``tag`` of
    fused_route_dtypes says whether the dtype of that tag takes torch's fused route."""
    _, address, begin, end, _, dtype = this_chunk(chunks_ptr, tensors_ptr)
    fused_route = ((fused_route_dtypes >> dtype) & 1) != 0
    if dtype == 0:
        _clamp_chunk(address, begin, end, hi_f32_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32),
                     fused_route, 0, BLOCK)
    elif dtype == 1:
        _clamp_chunk(address, begin, end, hi_f16_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32),
                     fused_route, 1, BLOCK)
    elif dtype == 2:
        _clamp_chunk(address, begin, end, hi_bf16_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32),
                     fused_route, 2, BLOCK)
    else:
        _clamp_chunk(address, begin, end, hi_f64_bits.to(tl.int64).to(tl.float64, bitcast=True), fused_route, 3, BLOCK)


def _bound(value: float, dtype: torch.dtype, fused_route: bool) -> float:
    """The upper bound as torch's route holds it, as a float64 (every value below is exact in it): the fused
    route's opmath (float, or double for fp64); the per-tensor route's gradient dtype (through float
    for the narrower dtypes, as ATen converts a Scalar)."""
    if dtype == torch.float64:
        return value
    as_float = torch.tensor(value, dtype=torch.float64).to(torch.float32)
    return (as_float if fused_route else as_float.to(dtype)).item()


def torch_fused_routes(device: torch.device, foreach: bool,
                       copies: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[torch.dtype, bool]:
    """For each kernel dtype, whether torch's foreach clamp takes its fused route for that dtype's
    gradients: on CUDA, with ``foreach`` not False, when every one of them is dense (``copies``, from
    :func:`dense_tensors`, holds those that are not)."""
    fused = dict.fromkeys(_KERNEL_DTYPES, foreach and device.type == "cuda")
    for original, _ in copies:
        fused[original.dtype] = False
    return fused


def clamp_on_routes_(grads: list[torch.Tensor], clip_value: float, foreach: bool = True,
                     fused_routes: dict[torch.dtype, bool] | None = None) -> None:
    """The clamp (one launch) with the arithmetic of torch's route for each dtype, or of the route
    ``fused_routes`` names: that is for the tests, since torch takes the fused route on CUDA alone and
    the interpreter runs its arithmetic only so."""
    dense, copies = dense_tensors(grads)
    if fused_routes is None:
        fused_routes = torch_fused_routes(grads[0].device, foreach, copies)
    chunks, table, num_chunks = tables_for(dense, torch.float32, list(map(torch.Tensor.numel, dense)))
    if num_chunks:
        bounds = [float_bits(_bound(clip_value, d, fused_routes[d])) for d in _KERNEL_DTYPES]
        mask = sum(1 << DTYPE_TAGS[d] for d in _KERNEL_DTYPES if fused_routes[d])
        with device_guard(grads[0].device):
            _clamp_kernel[(num_chunks,)](chunks, table, *bounds, mask, BLOCK=_CLAMP_BLOCK, num_warps=_CLAMP_WARPS)
    for original, copy in copies:
        original.copy_(copy)


@torch.library.custom_op("fastclip_triton::clamp_values_", mutates_args={"grads"})
def clamp_values_(grads: List[torch.Tensor], clip_value: float, foreach: bool = True) -> None:
    """Clamps every element of ``grads`` in place to ``[-clip_value, clip_value]`` (one launch), with
    the bits of torch's ``clip_grad_value_(..., foreach=None)``, or of ``foreach=False`` when
    ``foreach`` is False."""
    checked_total_dtype(grads, "clamp_values_")
    if not clip_value >= 0:
        raise ValueError(f"fastclip_triton: clip_value must be >= 0, got {clip_value}")
    clamp_on_routes_(grads, clip_value, foreach)


@clamp_values_.register_fake
def _(grads, clip_value, foreach=True):
    checked_total_dtype(grads, "clamp_values_")
