"""Adaptive gradient clipping (AGC; Brock et al. 2021), unit-wise as timm defines it, in Triton: one
launch over every parameter and gradient of every dtype.

A unit is one index of a parameter's first dimension (the whole tensor for 0-d and 1-d ones). The
table holds runs of whole units of one tensor, about ``CHUNK`` elements each (one unit when a unit
is larger): one program per run. For each unit the program reduces the parameter's and the
gradient's squares in fp64, roots and rounds them to the dtype (as torch's norm returns them), takes
timm's limit and ratio with timm's roundings (``_unit_ratio``) and, only when the unit clips,
multiplies the gradient's unit in place while it is still in cache. The same arithmetic as
fastclip's C++ CPU kernel (``csrc/cpu/agc_kernels.cpp``), so the interpreter, the GPU and the CPU
give the same bits. Registers ``torch.ops.fastclip_triton.adaptive_clip_``.

A unit larger than a run is one program's work: a huge 1-d parameter is reduced by a single
program (correct, not fast; such parameters are rare in the models AGC is used with).
"""

from __future__ import annotations

# The operators' signatures say typing.List: torch before 2.7 infers no schema from list[Tensor].
from typing import List

import torch
import triton
import triton.language as tl

from .clip import NORM_L2, chunk_partial, finished_norm, scale_chunk
from .elements import DTYPE_TAGS, float_bits, load_math, round_f32_to
from .tables import CHUNK, TABLE_CACHE, checked_total_dtype, device_guard, upload

# Columns of the run table (int64): [parameter address, gradient address, first unit, end unit,
# elements per unit, dtype tag].
_RUN_COLUMNS = tl.constexpr(6)
_L2 = tl.constexpr(NORM_L2)  # kernels read only constexpr globals
# Units are often short (a row of a linear layer): a narrower block than the norm kernel's wastes
# fewer masked lanes on them.
_AGC_BLOCK, _AGC_WARPS = 1024, 4


@triton.jit
def _element_bytes(DTYPE: tl.constexpr):
    if DTYPE == 3:
        return 8
    elif DTYPE == 0:
        return 4
    else:
        return 2


@triton.jit
def _unit_norm(address, size, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """torch's L2 norm of one unit of ``size`` > 0 elements at ``address``, as fp64 holding a DTYPE
    value: squares summed in fp64, rooted, rounded to DTYPE. A one-element unit's norm is its
    magnitude, as torch's CPU norm gives it."""
    summed = chunk_partial(address, tl.full([], 0, tl.int64), size, 2.0, DTYPE, _L2, BLOCK)
    norm = finished_norm(summed, 2.0, _L2, DTYPE)
    if DTYPE != 3:
        norm = round_f32_to(norm, DTYPE).to(tl.float64)
    first = tl.arange(0, 1).to(tl.int64)
    single = tl.sum(tl.abs(load_math(address, first, first < 1, DTYPE).to(tl.float64)), axis=0)
    return tl.where(size == 1, single, norm)


@triton.jit
def _clamp_min(x, bound):
    """torch's clamp(min=bound): NaN stays NaN."""
    return tl.where(x != x, x, tl.maximum(x, bound))


@triton.jit
def _unit_ratio(param_norm, grad_norm, clip_factor, eps, floor, DTYPE: tl.constexpr):
    """What a unit's gradient is multiplied by, or 1 when it does not clip, as fp64: timm's
    ``limit = max(||W||, eps) * clip_factor; G * (limit / max(||G||, 1e-6))`` where not
    ``||G|| < limit``, each operation in the dtype's arithmetic (fp32 for all but fp64) and rounded to
    the dtype, the Scalars eps and 1e-6 converted to the dtype as ATen converts them (through fp32).
    A NaN norm gives a NaN ratio, as in timm."""
    if DTYPE == 3:
        limit = _clamp_min(param_norm, eps) * clip_factor
        ratio = limit / _clamp_min(grad_norm, floor)
    else:
        eps_in_dtype = round_f32_to(eps.to(tl.float32), DTYPE)
        floor_in_dtype = round_f32_to(floor.to(tl.float32), DTYPE)
        limit = round_f32_to(_clamp_min(param_norm.to(tl.float32), eps_in_dtype) * clip_factor.to(tl.float32), DTYPE)
        ratio = round_f32_to(tl.math.div_rn(limit, _clamp_min(grad_norm.to(tl.float32), floor_in_dtype)), DTYPE)
    return tl.where(grad_norm < limit, 1.0, ratio.to(tl.float64))


@triton.jit
def _clip_units(param, grad, first, end, size, clip_factor, eps, floor, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    unit_bytes = size * _element_bytes(DTYPE)
    for unit in range(first, end):
        grad_unit = grad + unit * unit_bytes
        ratio = _unit_ratio(_unit_norm(param + unit * unit_bytes, size, DTYPE, BLOCK),
                            _unit_norm(grad_unit, size, DTYPE, BLOCK), clip_factor, eps, floor, DTYPE)
        if ratio != 1.0:  # NaN included: timm makes such a unit NaN
            scale_chunk(grad_unit, tl.full([], 0, tl.int64), size, ratio, 0, DTYPE, DTYPE, BLOCK)


# The factors are passed as float64 bits (Triton passes Python floats as fp32).
@triton.jit(do_not_specialize=["clip_factor_bits", "eps_bits"])
def _agc_kernel(runs_ptr, clip_factor_bits, eps_bits, floor_bits, BLOCK: tl.constexpr):
    row = runs_ptr + tl.program_id(0).to(tl.int64) * _RUN_COLUMNS
    param, grad, first, end, size, dtype = (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
                                            tl.load(row + 4), tl.load(row + 5))
    clip_factor = clip_factor_bits.to(tl.float64, bitcast=True)
    eps = eps_bits.to(tl.float64, bitcast=True)
    floor = floor_bits.to(tl.float64, bitcast=True)
    if dtype == 0:
        _clip_units(param, grad, first, end, size, clip_factor, eps, floor, 0, BLOCK)
    elif dtype == 1:
        _clip_units(param, grad, first, end, size, clip_factor, eps, floor, 1, BLOCK)
    elif dtype == 2:
        _clip_units(param, grad, first, end, size, clip_factor, eps, floor, 2, BLOCK)
    else:
        _clip_units(param, grad, first, end, size, clip_factor, eps, floor, 3, BLOCK)


def _run_table(params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(the device table of runs of units (see _RUN_COLUMNS), the number of runs) for contiguous
    ``params`` and ``grads``, cached on their addresses and shapes."""
    device = grads[0].device
    key = tuple((p.data_ptr(), g.data_ptr(), tuple(g.shape), DTYPE_TAGS[g.dtype]) for p, g in zip(params, grads))

    def build():
        rows = []
        for p_address, g_address, shape, tag in key:
            units = 1 if len(shape) <= 1 else shape[0]
            numel = 1
            for s in shape:
                numel *= s
            if numel == 0:
                continue
            size = numel // units
            per_run = max(1, CHUNK // size)
            rows += [(p_address, g_address, u, min(u + per_run, units), size, tag) for u in range(0, units, per_run)]
        (runs,), host = upload([torch.tensor(rows or [(0, 0, 0, 0, 1, 0)], dtype=torch.int64)], device)
        return runs, len(rows), host

    runs, num_runs, _ = TABLE_CACHE.get((("agc",) + key, device), build)
    return runs, num_runs


@torch.library.custom_op("fastclip_triton::adaptive_clip_", mutates_args={"grads"})
def adaptive_clip_(params: List[torch.Tensor], grads: List[torch.Tensor], clip_factor: float, eps: float) -> None:
    """AGC of ``grads`` against ``params`` in place, unit-wise with the L2 norm (one launch)."""
    checked_total_dtype(list(params) + list(grads), "adaptive_clip_")
    if len(params) != len(grads):
        raise ValueError("fastclip_triton: adaptive_clip_ needs one gradient per parameter")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape or p.dtype != g.dtype:
            raise ValueError(f"fastclip_triton: adaptive_clip_: parameter {i} ({tuple(p.shape)}, {p.dtype}) and its "
                             f"gradient ({tuple(g.shape)}, {g.dtype}) differ in shape or dtype")
    # Units are rows of the logical layout: row-major buffers, the gradient's written back if copied.
    param_buffers = [p.detach().contiguous() for p in params]
    grad_buffers = [g.contiguous() for g in grads]
    runs, num_runs = _run_table(param_buffers, grad_buffers)
    if num_runs:
        with device_guard(grads[0].device):
            _agc_kernel[(num_runs,)](
                runs, float_bits(float(clip_factor)), float_bits(float(eps)), float_bits(1e-6), BLOCK=_AGC_BLOCK,
                num_warps=_AGC_WARPS, enable_fp_fusion=False,  # one rounding per operation, as timm's torch ops
            )
    for original, buffer in zip(grads, grad_buffers):
        if buffer is not original:
            original.copy_(buffer)


@adaptive_clip_.register_fake
def _(params, grads, clip_factor, eps):
    checked_total_dtype(list(params) + list(grads), "adaptive_clip_")
