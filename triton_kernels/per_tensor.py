"""Per-tensor clipping in Triton: each gradient clipped by its own norm, as
``torch.nn.utils.clip_grad_norm_`` called on it alone, in two launches whatever the number of gradients.

Launch 1 is ``clip.py``'s norm kernel, which leaves each gradient's norm (rounded to its dtype, as
torch's ``_foreach_norm`` returns it) in a float64 vector. Launch 2 (``_per_tensor_scale_kernel``,
one program per chunk) derives its gradient's coefficient from that norm with the arithmetic of a
one-gradient ``clip_grad_norm_`` (the total is the norm of the one-element vector of norms, then
torch's coefficient, both in the gradient's dtype) and scales the chunk only when it is below 1.
Registers ``torch.ops.fastclip_triton.clip_per_tensor_``.
"""

from __future__ import annotations

# The operators' signatures say typing.List: torch before 2.7 infers no schema from list[Tensor].
from typing import List

import torch
import triton
import triton.language as tl

from .clip import (SCALE_BLOCK, SCALE_WARPS, accumulate, clip_coefficient, cpu_rules, finished_norm, norm_kind, run_norm,
                   scale_chunk)
from .elements import float_bits, round_f32_to
from .tables import TENSOR_COLUMNS, checked_total_dtype, dense_tensors, device_guard, this_chunk


@triton.jit
def _own_total(norm, p, NORM: tl.constexpr, DTYPE: tl.constexpr, CPU_RULES: tl.constexpr):
    """clip_grad_norm_'s total for one gradient of norm ``norm`` (fp64 holding a DTYPE value): the
    norm of the one-element vector [norm] in DTYPE. torch's CPU norm of one element is its magnitude;
    CUDA's accumulates it like any other (so a 16-bit norm whose square leaves fp32's range is inf)."""
    if CPU_RULES:
        return tl.abs(norm)
    elif DTYPE == 3:
        return finished_norm(accumulate(tl.zeros_like(norm), norm, p, NORM), p, NORM, DTYPE)
    else:
        single = norm.to(tl.float32)
        total = finished_norm(accumulate(tl.zeros_like(single), single, p, NORM), p, NORM, DTYPE)
        return round_f32_to(total, DTYPE).to(tl.float64)


@triton.jit
def _scale_by_own_norm(tensor_norms_ptr, t, address, begin, end, mode, p, max_norm, NORM: tl.constexpr,
                       DTYPE: tl.constexpr, CPU_RULES: tl.constexpr, BLOCK: tl.constexpr):
    total = _own_total(tl.load(tensor_norms_ptr + t), p, NORM, DTYPE, CPU_RULES)
    coefficient = clip_coefficient(total, max_norm, DTYPE)
    if coefficient != 1.0:  # the coefficient is a DTYPE value: every scale mode multiplies alike
        scale_chunk(address, begin, end, coefficient, mode, DTYPE, DTYPE, BLOCK)


@triton.jit
def _per_tensor_scale_kernel(chunks_ptr, tensors_ptr, tensor_norms_ptr, p_bits, max_norm_bits, NORM: tl.constexpr,
                             CPU_RULES: tl.constexpr, BLOCK: tl.constexpr):
    _, address, begin, end, t, dtype = this_chunk(chunks_ptr, tensors_ptr)
    p = p_bits.to(tl.float64, bitcast=True)
    max_norm = max_norm_bits.to(tl.float64, bitcast=True)
    mode = tl.load(tensors_ptr + t * TENSOR_COLUMNS + 4)
    if dtype == 0:
        _scale_by_own_norm(tensor_norms_ptr, t, address, begin, end, mode, p, max_norm, NORM, 0, CPU_RULES, BLOCK)
    elif dtype == 1:
        _scale_by_own_norm(tensor_norms_ptr, t, address, begin, end, mode, p, max_norm, NORM, 1, CPU_RULES, BLOCK)
    elif dtype == 2:
        _scale_by_own_norm(tensor_norms_ptr, t, address, begin, end, mode, p, max_norm, NORM, 2, CPU_RULES, BLOCK)
    else:
        _scale_by_own_norm(tensor_norms_ptr, t, address, begin, end, mode, p, max_norm, NORM, 3, CPU_RULES, BLOCK)


@torch.library.custom_op("fastclip_triton::clip_per_tensor_", mutates_args={"grads"})
def clip_per_tensor_(grads: List[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    """Clips each of ``grads`` in place by its own norm (two launches); returns the norms (float64,
    each rounded to its gradient's dtype; 0 for an empty gradient)."""
    total_dtype = checked_total_dtype(grads, "clip_per_tensor_")
    device = grads[0].device
    dense, copies = dense_tensors(grads)
    tensor_norms = torch.zeros(len(grads), dtype=torch.float64, device=device)
    with device_guard(device):
        _, _, (chunks, table, num_chunks) = run_norm(dense, norm_type, max_norm, total_dtype, False, tensor_norms)
        if num_chunks:
            _per_tensor_scale_kernel[(num_chunks,)](
                chunks, table, tensor_norms, float_bits(float(norm_type)), float_bits(float(max_norm)),
                NORM=norm_kind(norm_type), CPU_RULES=cpu_rules(device), BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS,
                enable_fp_fusion=False,  # one rounding per operation, as torch
            )
    for original, copy in copies:  # which gradients were scaled is known only on the device
        original.copy_(copy)
    return tensor_norms


@clip_per_tensor_.register_fake
def _(grads, max_norm, norm_type):
    checked_total_dtype(grads, "clip_per_tensor_")
    return grads[0].new_empty((len(grads),), dtype=torch.float64)
