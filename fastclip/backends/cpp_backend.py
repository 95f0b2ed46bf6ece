"""Backend "cpp": the C++/CUDA extension (``csrc/``), called through ``torch.ops.fastclip``."""

from __future__ import annotations

import functools

import torch

from fastclip import _extension
from fastclip.backends.base import Backend, dispatcher_may_be_skipped, fused_kernel_refusal, total_norm_dtype

# Dispatch key of the extension's kernels for each device type it can serve.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# Backend methods whose kernels the extension has for CPU tensors only (tests/test_build.py names
# their ops): on CUDA tensors "auto" takes the Triton backend's, and asking for "cpp" is refused.
CPU_ONLY_OPERATIONS = frozenset({"adaptive_clip_grad_", "clip_per_tensor_", "scale_by_"})


@functools.cache
def _register_fake_kernels() -> None:
    """Shape-and-dtype functions so torch.compile(fullgraph=True) can trace the ops."""

    @torch.library.register_fake("fastclip::total_norm")
    def _(tensors, norm_type, overflow_safe=False):
        return tensors[0].new_empty((), dtype=total_norm_dtype(tensors, overflow_safe))

    @torch.library.register_fake("fastclip::clip_")
    def _(grads, max_norm, norm_type, overflow_safe=False):
        return grads[0].new_empty((), dtype=total_norm_dtype(grads, overflow_safe))

    @torch.library.register_fake("fastclip::tensor_norms")
    def _(tensors, norm_type):
        return (tensors[0].new_empty((), dtype=total_norm_dtype(tensors, False)),
                tensors[0].new_empty((len(tensors),), dtype=torch.float64))

    @torch.library.register_fake("fastclip::clip_with_tensor_norms_")
    def _(grads, max_norm, norm_type):
        return (grads[0].new_empty((), dtype=total_norm_dtype(grads, False)),
                grads[0].new_empty((len(grads),), dtype=torch.float64))

    @torch.library.register_fake("fastclip::scale_with_norm_")
    def _(grads, max_norm, total_norm):
        return None

    @torch.library.register_fake("fastclip::clamp_values_")
    def _(grads, clip_value, foreach=True):
        return None

    @torch.library.register_fake("fastclip::clip_per_tensor_")
    def _(grads, max_norm, norm_type):
        return grads[0].new_empty((len(grads),), dtype=torch.float64)

    @torch.library.register_fake("fastclip::adaptive_clip_")
    def _(params, grads, clip_factor, eps):
        return None

    @torch.library.register_fake("fastclip::scale_by_")
    def _(grads, coefficients):
        return None


def direct_entries():
    """``fastclip._C`` if this call may use its direct entries (``clip_``, ``total_norm``: the CPU and
    CUDA operators' own functions, ``scale_by_``: the CPU one, called without the dispatcher, ~0.1 us
    per tensor cheaper; ``clip_parameters``: :func:`fastclip.clip_`'s whole call), else None: they
    serve eager calls only (:func:`~fastclip.backends.base.dispatcher_may_be_skipped`). An entry answers NotImplemented for what it does not serve (a tensor subclass, a
    CUDA tensor for scale_by_), and the caller then takes the general path."""
    if _extension.load_error() is not None or not dispatcher_may_be_skipped():
        return None
    import fastclip._C

    return fastclip._C


class CppBackend(Backend):
    """Fused multi-tensor kernels from the compiled extension."""

    name = "cpp"

    def unavailable_reason(self, device):
        error = _extension.load_error()
        if error is not None:
            return error
        key = _DISPATCH_KEYS.get(device.type)
        if key is None:
            return f"no kernels for {device.type} tensors"
        if not _extension.has_kernel("clip_", key):
            return f"the extension was built without {key} kernels"
        _register_fake_kernels()
        return None

    def unsupported_reason(self, tensors, norm_type, summary=None):
        return fused_kernel_refusal(tensors, norm_type, summary)

    def overflow_safe_refusal(self, device):
        if device.type == "cuda":
            return "the CUDA kernel has no overflow-safe norm yet (the Triton backend has)"
        return None

    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        direct = direct_entries()
        if direct is not None:
            total = direct.total_norm(tensors, norm_type, overflow_safe)
            if total is not NotImplemented:
                return total
        return torch.ops.fastclip.total_norm(tensors, norm_type, overflow_safe)

    def clip_(self, grads, max_norm, norm_type, foreach, overflow_safe=False):
        direct = direct_entries()
        if direct is not None:
            total = direct.clip_(grads, max_norm, norm_type, overflow_safe)
            if total is not NotImplemented:
                return total
        return torch.ops.fastclip.clip_(grads, max_norm, norm_type, overflow_safe)

    def clip_with_tensor_norms_(self, grads, max_norm, norm_type):
        return torch.ops.fastclip.clip_with_tensor_norms_(grads, max_norm, norm_type)

    def tensor_norms(self, tensors, norm_type):
        return torch.ops.fastclip.tensor_norms(tensors, norm_type)

    def clip_grads_with_norm_(self, grads, max_norm, total_norm, foreach):
        torch.ops.fastclip.scale_with_norm_(grads, max_norm, total_norm.to(grads[0].device))

    def clip_grad_value_(self, grads, clip_value, foreach):
        # Built wherever clip_ is (CPU and CUDA kernels of the same extension).
        torch.ops.fastclip.clamp_values_(grads, clip_value, foreach is not False)

    def operation_refusal(self, operation, device):
        if operation in CPU_ONLY_OPERATIONS and device.type != "cpu":
            return f"{operation} has no CUDA kernel in the C++ extension (the Triton backend has one)"
        return None

    def adaptive_clip_grad_(self, params, grads, clip_factor, eps, norm_type):
        if norm_type == 2.0:  # the fused kernel is L2's (timm's default and the paper's)
            torch.ops.fastclip.adaptive_clip_(params, grads, clip_factor, eps)
        else:
            super().adaptive_clip_grad_(params, grads, clip_factor, eps, norm_type)

    def clip_per_tensor_(self, grads, max_norm, norm_type):
        return torch.ops.fastclip.clip_per_tensor_(grads, max_norm, norm_type)

    def scale_by_(self, grads, coefficients):
        direct = direct_entries()
        if direct is None or direct.scale_by_(grads, coefficients) is NotImplemented:
            torch.ops.fastclip.scale_by_(grads, coefficients)
