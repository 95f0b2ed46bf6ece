"""Backend "torch": pure PyTorch, always available, bit-identical to ``torch.nn.utils`` (clause E1).

It mirrors ``torch/nn/utils/clip_grad.py`` (torch 2.13) operation for operation: same grouping by
(device, dtype), same foreach kernels, same coefficient arithmetic. The norm is computed by torch's
own ``_get_total_norm``, captured at import so that ``fastclip`` keeps calling the original even
after ``torch.nn.utils`` is patched to call ``fastclip``.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import clip_grad as _torch_clip_grad
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from fastclip.backends.base import Backend, total_norm_dtype

# Undecorated original: the public API already runs under torch.no_grad().
_torch_get_total_norm = _torch_clip_grad._get_total_norm.__wrapped__


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)`` with torch's exact roundings, on the norm's device.

    A Python float divided by a tensor runs as ``reciprocal(total + 1e-6) * max_norm``: two
    roundings, not a true division. Kept as a tensor so no host-device synchronisation happens.
    """
    clip_coef = max_norm / (total_norm + 1e-6)
    return torch.clamp(clip_coef, max=1.0)


def _use_foreach(foreach: bool | None, tensors: list[torch.Tensor], device: torch.device) -> bool:
    """torch's rule for taking the foreach path, including its error for an unsupported device."""
    if (foreach is None and _has_foreach_support(tensors, device)) or (foreach and _device_has_foreach_support(device)):
        return True
    if foreach:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return False


def scale_grads_(grads: list[torch.Tensor], coefficient: torch.Tensor, foreach: bool | None) -> None:
    """Multiply every gradient in place by the 0-dim tensor ``coefficient``, grouped as torch does."""
    for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([grads]).items():
        coefficient_on_device = coefficient.to(device)
        if _use_foreach(foreach, device_grads, device):
            torch._foreach_mul_(device_grads, coefficient_on_device)
        else:
            for g in device_grads:
                g.mul_(coefficient_on_device)


def clamp_grads_(grads: list[torch.Tensor], clip_value: float, foreach: bool | None) -> None:
    """Clamp every gradient in place to ``[-clip_value, clip_value]``, as ``clip_grad_value_`` does."""
    for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _use_foreach(foreach, device_grads, device):
            torch._foreach_clamp_min_(device_grads, -clip_value)
            torch._foreach_clamp_max_(device_grads, clip_value)
        else:
            for g in device_grads:
                g.clamp_(min=-clip_value, max=clip_value)


# Exponents of the power-of-two scales: 2^-e must be a normal float64 for every e used.
_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT = -1022, 1022


def overflow_safe_total_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The p-norm of all elements of ``tensors`` as one vector, without overflow or underflow.

    Each tensor is scaled in float64 by a power of two (exactly) so that its largest magnitude lies
    in [1, 2), and its sum of |x|^p taken; the sums are brought to the largest scale by powers of
    two, added, and rooted once: nothing overflows unless the true norm exceeds float64's range.
    The same definition as the fused kernels' (which scale per chunk, in one pass); this reference
    version needs a float64 copy of one tensor at a time. The result has torch's dtype widened to
    at least float32, and stays on the device (no host synchronisation).
    """
    dtype = total_norm_dtype(tensors, overflow_safe=True)
    if math.isinf(norm_type):  # the max is never out of range, and is exact in every dtype
        return _torch_get_total_norm(tensors, norm_type, False, None).to(dtype)
    device = tensors[0].device
    sums, exponents = [], []
    for t in tensors:
        if t.numel() == 0:
            continue
        largest = torch.linalg.vector_norm(t, math.inf).double()
        exponent = torch.frexp(largest).exponent - 1  # largest in [2^exponent, 2^(exponent + 1))
        # inf and NaN (and so the norm) must survive the combination: give them the largest exponent.
        # An all-zero tensor adds nothing and gets the smallest (frexp(0) says 0): with its exponent
        # as the top, a tiny norm's root was taken of a sum near 2^-300, where the rounded 1/p cost
        # ~17 ulp (as the fused kernels do, scaled_partial).
        exponent = torch.where(largest.isfinite(), exponent.clamp(_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT),
                               _MAX_SCALE_EXPONENT)
        exponent = torch.where(largest == 0, _MIN_SCALE_EXPONENT, exponent)
        powers = t.to(torch.float64, copy=True).mul_(torch.ldexp(torch.ones_like(largest), -exponent)).abs_()
        sums.append((powers if norm_type == 1.0 else powers.pow_(norm_type)).sum().to(device))
        exponents.append(exponent.to(device))
    if not sums:
        return torch.zeros((), dtype=dtype, device=device)
    exponents = torch.stack(exponents)
    top = exponents.max()
    # (2^(e - top))^p: exact for p = 1 and 2; partials far below the top may become 0, harmlessly.
    total = (torch.stack(sums) * torch.exp2((exponents - top).double() * norm_type)).sum()
    return torch.ldexp(total ** (1.0 / norm_type), top).to(dtype)


class TorchBackend(Backend):
    """Pure-PyTorch reference backend: serves every input torch accepts, on every device."""

    name = "torch"

    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        if overflow_safe:
            return overflow_safe_total_norm(tensors, norm_type)
        return _torch_get_total_norm(tensors, norm_type, False, foreach)

    def tensor_norms(self, tensors, norm_type):
        # torch's own first step computes these norms; kept instead of discarded. The total stacks
        # them in torch's (group) order, so it is torch's bits (E1).
        first_device = tensors[0].device
        in_group_order, by_position = [], [None] * len(tensors)
        for (device, _), ([group], indices) in _group_tensors_by_device_and_dtype([tensors], with_indices=True).items():
            if _use_foreach(None, group, device):
                group_norms = torch._foreach_norm(group, norm_type)
            else:
                group_norms = [torch.linalg.vector_norm(g, norm_type) for g in group]
            in_group_order.extend(group_norms)
            for i, n in zip(indices, group_norms):
                by_position[i] = n.to(first_device, torch.float64)
        total_norm = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in in_group_order]), norm_type)
        return total_norm, torch.stack(by_position)

    def clip_with_tensor_norms_(self, grads, max_norm, norm_type):
        total_norm, norms = self.tensor_norms(grads, norm_type)
        self.clip_grads_with_norm_(grads, max_norm, total_norm, None)
        return total_norm, norms

    def clip_grads_with_norm_(self, grads, max_norm, total_norm, foreach):
        scale_grads_(grads, clip_coefficient(total_norm, max_norm), foreach)
