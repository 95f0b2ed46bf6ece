"""Multi-tensor gradient norm and clipping in Triton: two launches, whatever the number of tensors.

Launch 1 (``_norm_kernel``, one program per chunk of ``CHUNK`` elements of one gradient) reduces
its chunk to a partial in fp64 and stores it; no float atomics. The last
program of each gradient to finish (an integer arrival counter decides) combines that gradient's
partials in a fixed order into its norm, rounded to the gradient's dtype as torch's
``_foreach_norm`` returns it. The last gradient to finish computes the total norm (the norm of the
per-tensor norms, in the promoted dtype) and the clip coefficient with torch's two roundings, on the
device. Launch 2 (``_scale_kernel``) reads the coefficient and returns at once when it is 1.

Everything the kernels know about the gradients is in the chunk tables of ``tables.py`` (built once
per set of gradients and cached on the device); element access is ``elements.py``'s.

This module knows nothing of fastclip's public API; it registers ``torch.ops.fastclip_triton.*`` as
opaque custom ops that declare the gradients they write (``torch.compile(fullgraph=True)`` captures
them without tracing inside). Not ``triton_op``: the kernels reach the gradients through addresses
in a table, so a traced kernel would show the compiler no read or write of them, and Inductor could
reorder the scaling against other uses of the gradients or drop it. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how CI tests them;
the kernels follow CPU rules (``CPU_RULES``): gradients are scaled with CPU torch's arithmetic
instead of CUDA torch's (see ``SCALE_*``) and a one-element gradient's norm is |x| as torch's CPU
norm gives it. Sums are accumulated in fp64 under either rules, as fastclip's C++ CPU kernel does
(fp32 partial sums in another order than torch's would now and then land a hair further from the
truth than torch's own, which E5 forbids; fp64 sums are never further).
"""

from __future__ import annotations

# The operators' signatures say typing.List: torch before 2.7 infers no schema from list[Tensor].
from typing import List

import torch
import triton
import triton.language as tl

from .elements import (
    DTYPE_TAGS,
    aligned_block_pointer,
    float_bits,
    load_block_math,
    load_math,
    round_f32_to,
    store_block_math,
    store_math,
)
from .tables import (
    INTERPRETING,
    TENSOR_COLUMNS,
    checked_total_dtype,
    dense_tensors,
    device_guard,
    tables_for,
    this_chunk,
)

# norm kinds (compile-time constants of the kernels)
NORM_L2, NORM_L1, NORM_INF, NORM_P = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# Norm arithmetic


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _abs_pow(x, p):
    # |x|^p through fp64 exp2/log2 (Triton's interpreter has no libdevice pow); exact enough that
    # the fp32 result is the correctly rounded power in all but rare cases. 0 stays 0, inf inf.
    return tl.exp2(tl.log2(tl.abs(x).to(tl.float64)) * p).to(x.dtype)


@triton.jit
def accumulate(acc, x, p, NORM: tl.constexpr):
    if NORM == 0:
        return acc + x * x
    elif NORM == 1:
        return acc + tl.abs(x)
    elif NORM == 2:
        return _max_nan(acc, tl.abs(x))
    else:
        return acc + _abs_pow(x, p)


@triton.jit
def _reduce(acc, NORM: tl.constexpr):
    if NORM == 2:
        # max that propagates NaN, from built-in reductions (a custom-combine tl.reduce is
        # element-by-element Python in the interpreter): if any lane is NaN, the lanes' sum is NaN
        # too (they are magnitudes, so no inf - inf), and it is returned instead of the max.
        has_nan = tl.sum((acc != acc).to(tl.int32), axis=0) > 0
        return tl.where(has_nan, tl.sum(acc, axis=0), tl.max(acc, axis=0))
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def _combine(acc, x, NORM: tl.constexpr):
    if NORM == 2:
        return _max_nan(acc, x)
    else:
        return acc + x


@triton.jit
def _finish(accumulated, p, NORM: tl.constexpr):
    """The root step of the norm, in the accumulation type (correctly rounded square root)."""
    if NORM == 0:
        if accumulated.dtype == tl.float64:
            return tl.sqrt(accumulated)
        else:
            return tl.sqrt_rn(accumulated)
    elif NORM == 3:
        return tl.exp2(tl.log2(accumulated.to(tl.float64)) / p).to(accumulated.dtype)
    else:
        return accumulated


@triton.jit
def _single_element(address, dtype):
    """The first element of a gradient, as fp64."""
    offsets = tl.arange(0, 1).to(tl.int64)
    if dtype == 0:
        x = load_math(address, offsets, offsets < 1, 0).to(tl.float64)
    elif dtype == 1:
        x = load_math(address, offsets, offsets < 1, 1).to(tl.float64)
    elif dtype == 2:
        x = load_math(address, offsets, offsets < 1, 2).to(tl.float64)
    else:
        x = load_math(address, offsets, offsets < 1, 3)
    return tl.sum(x, axis=0)


@triton.jit
def finished_norm(reduced, p, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """The finished norm of a reduced sum (or max): fp64 for fp64, else fp32, not yet rounded to a
    16-bit dtype. A non-fp64 sum accumulated in fp64 beyond fp32's range becomes inf (torch's fp32
    accumulation overflows there, and so must this) and the root is taken in fp64, as fastclip's C++
    CPU kernel does."""
    if DTYPE == 3:
        return _finish(reduced, p, NORM)
    else:
        in_range = tl.where(reduced > 3.4028234663852886e38, reduced * 1e300, reduced)  # * 1e300: inf
        return _finish(in_range, p, NORM).to(tl.float32)


@triton.jit
def chunk_partial(address, begin, end, p, DTYPE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk reduced in BLOCK fp64 lanes, then a fixed tree. fp64 on a GPU too: fp32 sums in
    another order than torch's land now and then on the other side of a rounding boundary of the
    gradient's dtype, where torch's own does not, which E5 forbids; a memory-bound pass has fp64
    throughput to spare on the GPUs fastclip targets (H100: 2 flops per 2-byte element at 3.35 TB/s
    is ~3.4 fp64 TFLOP/s of its 34)."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    # Full blocks first: where the gradient's address is 16-byte aligned (torch's allocator aligns
    # every allocation; a view with an odd storage offset may not be), unmasked through a pointer
    # declared aligned, so the compiler emits 16-byte vector loads. Then the tail, masked. The blocks
    # are accumulated in the same order on either path, so the bits do not depend on it.
    full_blocks = (end - begin) // BLOCK
    full_end = begin + full_blocks * BLOCK
    if address % 16 == 0:
        pointer = aligned_block_pointer(address, begin, DTYPE)
        for block in range(0, full_blocks):
            offsets = block * BLOCK + tl.arange(0, BLOCK)
            acc = accumulate(acc, load_block_math(pointer, offsets, DTYPE).to(acc.dtype), p, NORM)
    else:
        for start in range(begin, full_end, BLOCK):
            offsets = start + tl.arange(0, BLOCK).to(tl.int64)
            acc = accumulate(acc, load_math(address, offsets, offsets < end, DTYPE).to(acc.dtype), p, NORM)
    for start in range(full_end, end, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        acc = accumulate(acc, load_math(address, offsets, offsets < end, DTYPE).to(acc.dtype), p, NORM)
    return _reduce(acc, NORM)


# Overflow-safe norm (SAFE): a chunk's partial is (sum, exponent) standing for sum * (2^exponent)^p,
# where sum adds |x * 2^-exponent|^p in fp64 and 2^exponent is within a factor 2 of the chunk's
# largest magnitude (so no power or sum overflows, and nothing that matters underflows). A
# non-finite chunk gets the exponent _NON_FINITE_EXPONENT, above every finite one, so that its inf
# or NaN survives the combination. The same definition as fastclip's C++ CPU kernel.
_MIN_SCALE_EXPONENT = tl.constexpr(-1022)
_MAX_SCALE_EXPONENT = tl.constexpr(1022)
_NON_FINITE_EXPONENT = tl.constexpr(1023)


@triton.jit
def _power_of_two(exponent):
    """2^exponent as fp64, built from its bits (exact), for -1022 <= exponent <= 1023."""
    return ((exponent.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _scaled_chunk_partial(address, begin, end, p, DTYPE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """(sum, exponent) of one chunk: two sweeps, the second finding the chunk in cache."""
    largest = chunk_partial(address, begin, end, p, DTYPE, 2, BLOCK)  # the inf norm, exact
    biased = (largest.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    exponent = tl.minimum(tl.maximum(biased - 1023, _MIN_SCALE_EXPONENT), _MAX_SCALE_EXPONENT).to(tl.int32)
    scale = _power_of_two(-exponent)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(begin, end, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        acc = accumulate(acc, load_math(address, offsets, offsets < end, DTYPE).to(tl.float64) * scale, p, NORM)
    finite = largest < float("inf")  # false for NaN too
    return tl.where(finite, _reduce(acc, NORM), largest), tl.where(finite, exponent, _NON_FINITE_EXPONENT)


@triton.jit
def _exponent_weight(shift, p, NORM: tl.constexpr):
    """(2^shift)^p for shift <= 0, which brings a partial to a larger exponent: exact for L1 and L2
    (0 where the power of two is below fp64's normal range: such partials are negligible)."""
    if NORM == 0:
        return tl.where(2 * shift >= -1022, _power_of_two(tl.maximum(2 * shift, -1022)), 0.0)
    elif NORM == 1:
        return tl.where(shift >= -1022, _power_of_two(tl.maximum(shift, -1022)), 0.0)
    else:
        return tl.exp2(shift.to(tl.float64) * p)


@triton.jit
def _combine_scaled(sums_ptr, exponents_ptr, first, last, p, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """(sum, exponent) of the partials first..last-1 combined at their largest exponent, in order."""
    top = tl.full([BLOCK], _MIN_SCALE_EXPONENT, tl.int32)
    for start in range(first, last, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        exponents = tl.load(exponents_ptr + offsets, mask=offsets < last, other=_MIN_SCALE_EXPONENT, cache_modifier=".cg")
        top = tl.maximum(top, exponents)
    top = tl.max(top, axis=0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(first, last, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        in_range = offsets < last
        sums = tl.load(sums_ptr + offsets, mask=in_range, other=0.0, cache_modifier=".cg")
        exponents = tl.load(exponents_ptr + offsets, mask=in_range, other=_MIN_SCALE_EXPONENT, cache_modifier=".cg")
        acc += sums * _exponent_weight(exponents - top, p, NORM)
    return tl.sum(acc, axis=0), top


@triton.jit
def _finalize_scaled_total(tensor_sums_ptr, tensor_exponents_ptr, total_ptr, coefficient_ptr, num_tensors, p,
                           max_norm, NORM: tl.constexpr, TOTAL_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The overflow-safe total, 2^top * root(sum), rounded to the total dtype, and the coefficient."""
    accumulated, top = _combine_scaled(tensor_sums_ptr, tensor_exponents_ptr, 0, num_tensors, p, NORM, BLOCK)
    total = _finish(accumulated, p, NORM) * _power_of_two(top)
    if TOTAL_DTYPE == 0:
        total = total.to(tl.float32)
    tl.store(total_ptr, total.to(total_ptr.dtype.element_ty))
    tl.store(coefficient_ptr, clip_coefficient(total, max_norm, TOTAL_DTYPE))


@triton.jit
def _tensor_norm(partials_ptr, first, last, p, DTYPE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """A gradient's norm from its chunk partials (fixed order, fp64), rooted and rounded to its dtype."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(first, last, BLOCK):
        offsets = start + tl.arange(0, BLOCK).to(tl.int64)
        values = tl.load(partials_ptr + offsets, mask=offsets < last, other=0.0, cache_modifier=".cg")
        acc = _combine(acc, values.to(acc.dtype), NORM)
    norm = finished_norm(_reduce(acc, NORM), p, NORM, DTYPE)
    if DTYPE == 3:
        return norm
    else:
        return round_f32_to(norm, DTYPE).to(tl.float64)


@triton.jit
def _finalize_total(tensors_ptr, tensor_norms_ptr, total_ptr, coefficient_ptr, num_tensors, p, max_norm,
                    NORM: tl.constexpr, TOTAL_DTYPE: tl.constexpr, CPU_RULES: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Total norm (norm of the per-tensor norms, accumulated in fp64, in the total dtype) and torch's
    coefficient."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, num_tensors, BLOCK):
        t = start + tl.arange(0, BLOCK).to(tl.int64)
        in_range = t < num_tensors
        first = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 2, mask=in_range, other=0)
        last = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 3, mask=in_range, other=0)
        norms = tl.load(tensor_norms_ptr + t, mask=in_range, other=0.0, cache_modifier=".cg")
        norms = tl.where(last > first, norms, 0.0)  # an empty gradient's norm is 0 (never written)
        acc = accumulate(acc, norms.to(acc.dtype), p, NORM)
    total = finished_norm(_reduce(acc, NORM), p, NORM, TOTAL_DTYPE)
    if CPU_RULES and num_tensors == 1:
        total = tl.abs(tl.load(tensor_norms_ptr, cache_modifier=".cg")).to(total.dtype)
    if TOTAL_DTYPE != 3:
        total = round_f32_to(total, TOTAL_DTYPE)
    # store_math writes bf16 as bits: the interpreter's float->bf16 cast garbles subnormals
    store_math(total_ptr, 0, True, total, TOTAL_DTYPE)
    tl.store(coefficient_ptr, clip_coefficient(total, max_norm, TOTAL_DTYPE))


@triton.jit
def clip_coefficient(total, max_norm, TOTAL_DTYPE: tl.constexpr):
    """min(max_norm / (total + 1e-6), 1) as fp64, total holding a TOTAL_DTYPE value. torch runs a
    Python float divided by a tensor as reciprocal(total + 1e-6) * max_norm, each step rounded to
    the tensor's dtype, Python scalars entering in its arithmetic (fp32, or fp64 for fp64); its
    clamp keeps NaN."""
    if TOTAL_DTYPE == 3:
        coefficient = (1.0 / (total.to(tl.float64) + 1e-6)) * max_norm
    else:
        shifted = round_f32_to(total.to(tl.float32) + 1e-6, TOTAL_DTYPE)
        reciprocal = round_f32_to(tl.math.div_rn(1.0, shifted), TOTAL_DTYPE)
        coefficient = round_f32_to(reciprocal * max_norm.to(tl.float32), TOTAL_DTYPE).to(tl.float64)
    return tl.where(coefficient > 1.0, 1.0, coefficient)


# The counts change with every model and the total with every batch of shapes: not specialised on,
# so that a new size neither recompiles the kernel nor leaves the GPU waiting on the compiler.
@triton.jit(do_not_specialize=["num_tensors", "num_nonempty", "total_elements"])
def _norm_kernel(chunks_ptr, tensors_ptr, partials_ptr, tensor_norms_ptr, counters_ptr, total_ptr,
                 coefficient_ptr, partial_exponents_ptr, tensor_exponents_ptr, num_tensors, num_nonempty, p_bits,
                 max_norm_bits, total_elements, NORM: tl.constexpr, TOTAL_DTYPE: tl.constexpr,
                 CPU_RULES: tl.constexpr, SAFE: tl.constexpr, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """Launch 1. With SAFE (the overflow-safe norm; never with the inf norm, which needs no
    scaling) partials are (sum, exponent) pairs and tensor_norms holds each gradient's combined
    sum, not its norm."""
    chunk, address, begin, end, t, dtype = this_chunk(chunks_ptr, tensors_ptr)
    p = p_bits.to(tl.float64, bitcast=True)
    if SAFE:
        if dtype == 0:
            partial, exponent = _scaled_chunk_partial(address, begin, end, p, 0, NORM, BLOCK)
        elif dtype == 1:
            partial, exponent = _scaled_chunk_partial(address, begin, end, p, 1, NORM, BLOCK)
        elif dtype == 2:
            partial, exponent = _scaled_chunk_partial(address, begin, end, p, 2, NORM, BLOCK)
        else:
            partial, exponent = _scaled_chunk_partial(address, begin, end, p, 3, NORM, BLOCK)
        tl.store(partial_exponents_ptr + chunk, exponent)
    elif dtype == 0:
        partial = chunk_partial(address, begin, end, p, 0, NORM, BLOCK)
    elif dtype == 1:
        partial = chunk_partial(address, begin, end, p, 1, NORM, BLOCK)
    elif dtype == 2:
        partial = chunk_partial(address, begin, end, p, 2, NORM, BLOCK)
    else:
        partial = chunk_partial(address, begin, end, p, 3, NORM, BLOCK)
    tl.store(partials_ptr + chunk, partial)

    # The last chunk of this gradient to finish computes its norm. acq_rel atomics order the
    # partials' stores before the count and the count before the loads of the last program.
    if BARRIER:
        tl.debug_barrier()
    first = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 2)
    last = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 3)
    arrived = tl.atomic_add(counters_ptr + t, 1, sem="acq_rel")
    if arrived == last - first - 1:
        if SAFE:
            tensor_sum, tensor_exponent = _combine_scaled(partials_ptr, partial_exponents_ptr, first, last, p, NORM,
                                                          BLOCK)
            tl.store(tensor_exponents_ptr + t, tensor_exponent)
            norm = tensor_sum
        elif CPU_RULES and (end - begin == 1) and (last - first == 1):
            norm = tl.abs(_single_element(address, dtype))
        elif dtype == 0:
            norm = _tensor_norm(partials_ptr, first, last, p, 0, NORM, BLOCK)
        elif dtype == 1:
            norm = _tensor_norm(partials_ptr, first, last, p, 1, NORM, BLOCK)
        elif dtype == 2:
            norm = _tensor_norm(partials_ptr, first, last, p, 2, NORM, BLOCK)
        else:
            norm = _tensor_norm(partials_ptr, first, last, p, 3, NORM, BLOCK)
        tl.store(tensor_norms_ptr + t, norm)
        tl.store(counters_ptr + t, 0)  # ready for the next call or graph replay
        if BARRIER:
            tl.debug_barrier()
        done = tl.atomic_add(counters_ptr + num_tensors, 1, sem="acq_rel")
        if done == num_nonempty - 1:
            max_norm = max_norm_bits.to(tl.float64, bitcast=True)
            if SAFE:
                _finalize_scaled_total(tensor_norms_ptr, tensor_exponents_ptr, total_ptr, coefficient_ptr,
                                       num_tensors, p, max_norm, NORM, TOTAL_DTYPE, BLOCK)
            else:
                _finalize_total(tensors_ptr, tensor_norms_ptr, total_ptr, coefficient_ptr, num_tensors, p, max_norm,
                                NORM, TOTAL_DTYPE, CPU_RULES, BLOCK)
            tl.store(counters_ptr + num_tensors, 0)


@triton.jit
def _scaled(x, coefficient, mode, DTYPE: tl.constexpr, COEFFICIENT_DTYPE: tl.constexpr):
    """x (in the arithmetic type) times the coefficient (fp64 holding a COEFFICIENT_DTYPE value),
    in the arithmetic torch uses for this gradient (see the SCALE_* modes)."""
    if DTYPE == 3:
        return x * coefficient  # fp64 arithmetic; a coefficient of any dtype converts exactly
    else:
        c32 = coefficient.to(tl.float32)
        y = x * tl.where(mode == 0, round_f32_to(c32, DTYPE), c32)
        if COEFFICIENT_DTYPE == 3:  # a 0-dim gradient with an fp64 coefficient: double arithmetic
            y = tl.where(mode == 1, (x.to(tl.float64) * coefficient).to(tl.float32), y)
        return y


@triton.jit
def scale_chunk(address, begin, end, coefficient, mode, DTYPE: tl.constexpr, COEFFICIENT_DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr):
    # As in chunk_partial: full blocks of an aligned gradient through a pointer declared aligned
    # (16-byte vector loads and stores), the rest masked. Elementwise: the path changes no bits.
    start = begin
    if address % 16 == 0:
        pointer = aligned_block_pointer(address, begin, DTYPE)
        full_blocks = (end - begin) // BLOCK
        for block in range(0, full_blocks):
            offsets = block * BLOCK + tl.arange(0, BLOCK)
            x = load_block_math(pointer, offsets, DTYPE)
            store_block_math(pointer, offsets, _scaled(x, coefficient, mode, DTYPE, COEFFICIENT_DTYPE), DTYPE)
        start = begin + full_blocks * BLOCK
    for block_start in range(start, end, BLOCK):
        offsets = block_start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offsets < end
        x = load_math(address, offsets, mask, DTYPE)
        store_math(address, offsets, mask, _scaled(x, coefficient, mode, DTYPE, COEFFICIENT_DTYPE), DTYPE)


@triton.jit
def _scale_kernel(chunks_ptr, tensors_ptr, coefficient_ptr, COEFFICIENT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    coefficient = tl.load(coefficient_ptr)
    if coefficient != 1.0:  # x * 1 == x for every x: skip the read and the write
        _, address, begin, end, t, dtype = this_chunk(chunks_ptr, tensors_ptr)
        mode = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 4)
        if dtype == 0:
            scale_chunk(address, begin, end, coefficient, mode, 0, COEFFICIENT_DTYPE, BLOCK)
        elif dtype == 1:
            scale_chunk(address, begin, end, coefficient, mode, 1, COEFFICIENT_DTYPE, BLOCK)
        elif dtype == 2:
            scale_chunk(address, begin, end, coefficient, mode, 2, COEFFICIENT_DTYPE, BLOCK)
        else:
            scale_chunk(address, begin, end, coefficient, mode, 3, COEFFICIENT_DTYPE, BLOCK)


@triton.jit
def _scale_by_kernel(chunks_ptr, tensors_ptr, coefficients_ptr, PER_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    """Scales each chunk by a float64 coefficient computed elsewhere: one for every gradient, or
    (PER_TENSOR) its gradient's own; a chunk whose coefficient is 1 is neither read nor written."""
    _, address, begin, end, t, dtype = this_chunk(chunks_ptr, tensors_ptr)
    if PER_TENSOR:
        coefficient = tl.load(coefficients_ptr + t)
    else:
        coefficient = tl.load(coefficients_ptr)
    if coefficient != 1.0:
        mode = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 4)
        if dtype == 0:
            scale_chunk(address, begin, end, coefficient, mode, 0, 3, BLOCK)
        elif dtype == 1:
            scale_chunk(address, begin, end, coefficient, mode, 1, 3, BLOCK)
        elif dtype == 2:
            scale_chunk(address, begin, end, coefficient, mode, 2, 3, BLOCK)
        else:
            scale_chunk(address, begin, end, coefficient, mode, 3, 3, BLOCK)


@triton.jit
def _coefficient_kernel(total_ptr, coefficient_ptr, max_norm_bits, TOTAL_DTYPE: tl.constexpr):
    """The coefficient for a given total norm (clip_grads_with_norm_), on the device."""
    max_norm = max_norm_bits.to(tl.float64, bitcast=True)
    tl.store(coefficient_ptr, clip_coefficient(tl.load(total_ptr), max_norm, TOTAL_DTYPE))


# One configuration, chosen by rule rather than by autotuning: an autotuner benchmarks every new key
# on the GPU, which waits for the host (breaking the no-sync promise) and cannot run inside a CUDA
# graph capture. Each program reduces a chunk of CHUNK elements in BLOCK-wide steps; 8 warps give
# each thread 16 elements a step, enough loads in flight for a memory-bound stream. The interpreter
# takes the same configuration (each interpreted step costs Python time, a wide block does not).
_NORM_CONFIG = {"BLOCK": 4096, "num_warps": 8}
# The scale kernel writes the gradients, so it cannot be benchmarked in place: one configuration.
SCALE_BLOCK, SCALE_WARPS = (4096 if INTERPRETING else 2048), 8


def norm_kind(norm_type: float) -> int:
    if norm_type == 2.0:
        return NORM_L2
    if norm_type == 1.0:
        return NORM_L1
    if norm_type == float("inf"):
        return NORM_INF
    if norm_type > 0 and norm_type != float("inf") and norm_type == norm_type:
        return NORM_P
    raise ValueError(f"fastclip_triton: norm_type {norm_type} has no kernel (only p > 0 and inf)")


def run_norm(tensors: list[torch.Tensor], norm_type: float, max_norm: float, total_dtype: torch.dtype,
              overflow_safe: bool = False, tensor_norms_out: torch.Tensor | None = None):
    """Launch 1. Returns (total norm tensor, coefficient tensor, tables); the coefficient has the
    total norm's dtype (which for the overflow-safe norm the caller has widened to fp32 or more).
    ``tensor_norms_out`` (float64 zeros, one per tensor), if given, receives the per-tensor norms."""
    kind = norm_kind(norm_type)
    safe = overflow_safe and kind != NORM_INF  # a max never overflows: the plain kernel is exact
    numels = list(map(torch.Tensor.numel, tensors))
    if kind == NORM_INF and 0 in numels:
        raise RuntimeError(
            "_foreach_norm cannot compute the infinity norm on an empty tensor because the operation does not "
            "have an identity"
        )
    device = tensors[0].device
    chunks, table, num_chunks = tables_for(tensors, total_dtype, numels)
    total = torch.empty((), dtype=total_dtype, device=device)
    coefficient = torch.empty((), dtype=torch.float64, device=device)
    if num_chunks == 0:  # only empty tensors: norm 0, coefficient min(max_norm / 1e-6, 1) = 1
        total.zero_()
        coefficient.fill_(1.0)
        return total, coefficient, (chunks, table, 0)
    partials = torch.empty(num_chunks, dtype=torch.float64, device=device)
    counters = torch.zeros(len(tensors) + 1, dtype=torch.int32, device=device)
    if safe:  # an empty gradient's (sum, exponent) is never written: (0, the smallest exponent)
        tensor_norms = torch.zeros(len(tensors), dtype=torch.float64, device=device)
        partial_exponents = torch.empty(num_chunks, dtype=torch.int32, device=device)
        tensor_exponents = torch.full((len(tensors),), _MIN_SCALE_EXPONENT.value, dtype=torch.int32, device=device)
    else:
        tensor_norms = tensor_norms_out if tensor_norms_out is not None else torch.empty(
            len(tensors), dtype=torch.float64, device=device)
        partial_exponents = tensor_exponents = counters  # not read
    _norm_kernel[(num_chunks,)](
        chunks, table, partials, tensor_norms, counters, total, coefficient, partial_exponents, tensor_exponents,
        len(tensors), len(numels) - numels.count(0), float_bits(float(norm_type)), float_bits(float(max_norm)),
        sum(numels), NORM=kind, TOTAL_DTYPE=DTYPE_TAGS[total_dtype], CPU_RULES=cpu_rules(device), SAFE=safe,
        BARRIER=not INTERPRETING, enable_fp_fusion=True,  # fused multiply-adds in the sums: fine for E5
        **_NORM_CONFIG,
    )
    return total, coefficient, (chunks, table, num_chunks)


# Set by tests only: the norm kernel's GPU rules on CPU tensors, so that the interpreter runs the
# arithmetic a GPU runs (there is no GPU in CI). Scaling modes stay the CPU's (see tables.py).
gpu_rules_on_cpu = False


def cpu_rules(device: torch.device) -> bool:
    """Whether kernels on ``device`` follow CPU torch's rules (see the module docstring)."""
    return device.type == "cpu" and not gpu_rules_on_cpu


def _run_scale(tables, coefficient: torch.Tensor, coefficient_dtype: torch.dtype) -> None:
    """Launch 2."""
    chunks, table, num_chunks = tables
    if num_chunks:
        _scale_kernel[(num_chunks,)](
            chunks, table, coefficient, COEFFICIENT_DTYPE=DTYPE_TAGS[coefficient_dtype], BLOCK=SCALE_BLOCK,
            num_warps=SCALE_WARPS, enable_fp_fusion=False,  # one rounding per operation, as torch
        )


def _total_dtype(tensors: list[torch.Tensor], what: str, overflow_safe: bool) -> torch.dtype:
    """The total norm's dtype: torch's, widened to at least fp32 for the overflow-safe norm."""
    dtype = checked_total_dtype(tensors, what)
    return torch.promote_types(dtype, torch.float32) if overflow_safe else dtype


def total_norm_of(tensors: list[torch.Tensor], norm_type: float, overflow_safe: bool = False) -> torch.Tensor:
    """The total ``norm_type``-norm of ``tensors``, in the promoted dtype, as torch computes it;
    or the overflow-safe norm of all their elements (see _scaled_chunk_partial). The body of the
    ``total_norm`` op, which eager callers may call without the op's dispatch."""
    total_dtype = _total_dtype(tensors, "total_norm", overflow_safe)
    dense, _ = dense_tensors(tensors)
    with device_guard(tensors[0].device):
        total, _, _ = run_norm(dense, norm_type, 1.0, total_dtype, overflow_safe)
    return total


@torch.library.custom_op("fastclip_triton::total_norm", mutates_args=())
def total_norm(tensors: List[torch.Tensor], norm_type: float, overflow_safe: bool = False) -> torch.Tensor:
    """:func:`total_norm_of` as an opaque op (one launch)."""
    return total_norm_of(tensors, norm_type, overflow_safe)


@torch.library.custom_op("fastclip_triton::tensor_norms", mutates_args=())
def tensor_norms(tensors: List[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """total_norm that also returns the per-tensor norms (float64, each rounded to its tensor's dtype;
    0 for an empty tensor), from its one launch."""
    total_dtype = _total_dtype(tensors, "tensor_norms", False)
    dense, _ = dense_tensors(tensors)
    norms = torch.zeros(len(tensors), dtype=torch.float64, device=tensors[0].device)
    with device_guard(tensors[0].device):
        total, _, _ = run_norm(dense, norm_type, 1.0, total_dtype, False, norms)
    return total, norms


def _clip(grads: list[torch.Tensor], max_norm: float, norm_type: float, overflow_safe: bool, what: str,
          with_tensor_norms: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both launches of a clip; returns the total norm and, if asked, the per-tensor norms."""
    total_dtype = _total_dtype(grads, what, overflow_safe)
    dense, copies = dense_tensors(grads)
    tensor_norms = torch.zeros(len(grads), dtype=torch.float64, device=grads[0].device) if with_tensor_norms else None
    with device_guard(grads[0].device):
        total, coefficient, tables = run_norm(dense, norm_type, max_norm, total_dtype, overflow_safe, tensor_norms)
        _run_scale(tables, coefficient, total_dtype)
    for original, copy in copies:  # whether anything was scaled is known only on the device
        original.copy_(copy)
    return total, tensor_norms


def clip_grads(grads: list[torch.Tensor], max_norm: float, norm_type: float, overflow_safe: bool = False) -> torch.Tensor:
    """Clips ``grads`` in place by their total norm, which it returns (two launches). The body of
    the ``clip_`` op, which eager callers may call without the op's dispatch."""
    return _clip(grads, max_norm, norm_type, overflow_safe, "clip_")[0]


@torch.library.custom_op("fastclip_triton::clip_", mutates_args={"grads"})
def clip_(grads: List[torch.Tensor], max_norm: float, norm_type: float, overflow_safe: bool = False) -> torch.Tensor:
    """:func:`clip_grads` as an opaque op that declares the gradients it writes."""
    return clip_grads(grads, max_norm, norm_type, overflow_safe)


@torch.library.custom_op("fastclip_triton::clip_with_tensor_norms_", mutates_args={"grads"})
def clip_with_tensor_norms_(grads: List[torch.Tensor], max_norm: float,
                            norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """clip_ that also returns the per-tensor norms its first launch computes (float64, each rounded
    to its gradient's dtype; 0 for an empty gradient)."""
    return _clip(grads, max_norm, norm_type, False, "clip_with_tensor_norms_", with_tensor_norms=True)


@torch.library.custom_op("fastclip_triton::scale_with_norm_", mutates_args={"grads"})
def scale_with_norm_(grads: List[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scales ``grads`` in place by ``min(max_norm / (total_norm + 1e-6), 1)`` (two launches)."""
    checked_total_dtype(grads, "scale_with_norm_")
    if total_norm.numel() != 1 or total_norm.dtype not in DTYPE_TAGS:
        raise ValueError("fastclip_triton: total_norm must be a one-element float tensor")
    dense, copies = dense_tensors(grads)
    total = total_norm.reshape(()).to(grads[0].device)
    coefficient = torch.empty((), dtype=torch.float64, device=grads[0].device)
    with device_guard(grads[0].device):
        _coefficient_kernel[(1,)](total, coefficient, float_bits(float(max_norm)), TOTAL_DTYPE=DTYPE_TAGS[total.dtype],
                                  enable_fp_fusion=False)
        _run_scale(tables_for(dense, total.dtype, list(map(torch.Tensor.numel, dense))), coefficient, total.dtype)
    for original, copy in copies:
        original.copy_(copy)


@torch.library.custom_op("fastclip_triton::scale_by_", mutates_args={"grads"})
def scale_by_(grads: List[torch.Tensor], coefficients: torch.Tensor) -> None:
    """Multiplies ``grads`` in place by float64 ``coefficients`` (one, or one per gradient) as torch's
    ``mul_`` by a 0-dim float64 tensor does, skipping those whose coefficient is 1 (one launch)."""
    checked_total_dtype(grads, "scale_by_")
    if coefficients.dtype != torch.float64 or coefficients.numel() not in (1, len(grads)):
        raise ValueError(f"fastclip_triton: scale_by_ expects float64 coefficients, one or one per gradient "
                         f"({len(grads)}), got {coefficients.numel()} of {coefficients.dtype}")
    dense, copies = dense_tensors(grads)
    chunks, table, num_chunks = tables_for(dense, torch.float64, list(map(torch.Tensor.numel, dense)))
    if num_chunks:
        with device_guard(grads[0].device):
            _scale_by_kernel[(num_chunks,)](
                chunks, table, coefficients.to(grads[0].device).contiguous(),
                PER_TENSOR=coefficients.numel() != 1, BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS,
                enable_fp_fusion=False,
            )
    for original, copy in copies:
        original.copy_(copy)


@scale_by_.register_fake
def _(grads, coefficients):
    checked_total_dtype(grads, "scale_by_")


# Fake kernels: what the compiler needs to know of each op's results (shape, dtype, device).
@total_norm.register_fake
def _(tensors, norm_type, overflow_safe=False):
    return tensors[0].new_empty((), dtype=_total_dtype(tensors, "total_norm", overflow_safe))


@clip_.register_fake
def _(grads, max_norm, norm_type, overflow_safe=False):
    return grads[0].new_empty((), dtype=_total_dtype(grads, "clip_", overflow_safe))


@tensor_norms.register_fake
def _(tensors, norm_type):
    total = tensors[0].new_empty((), dtype=_total_dtype(tensors, "tensor_norms", False))
    return total, tensors[0].new_empty((len(tensors),), dtype=torch.float64)


@clip_with_tensor_norms_.register_fake
def _(grads, max_norm, norm_type):
    total = grads[0].new_empty((), dtype=_total_dtype(grads, "clip_with_tensor_norms_", False))
    return total, grads[0].new_empty((len(grads),), dtype=torch.float64)


@scale_with_norm_.register_fake
def _(grads, max_norm, total_norm):
    checked_total_dtype(grads, "scale_with_norm_")
