"""The interface every backend implements.

A backend receives already-validated arguments: a list of gradient tensors (never parameters, never
None), ``norm_type`` and ``max_norm`` as Python floats. It never sees ``error_if_nonfinite``: the
public API handles that check once, between the norm and the scaling, for every backend alike.
"""

from __future__ import annotations

import functools
import math

import torch

from fastclip._inputs import TensorSummary


class Backend:
    """Base class: a named implementation of the clipping operations.

    Subclasses implement :meth:`get_total_norm` and :meth:`clip_grads_with_norm_`; a fused backend
    also overrides :meth:`clip_` to compute the norm and scale in one pass.
    """

    name: str = ""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` at all on this machine, or None if it can."""
        return None

    def unsupported_reason(
        self, tensors: list[torch.Tensor], norm_type: float | None, summary: TensorSummary | None = None
    ) -> str | None:
        """Why this backend cannot serve these particular tensors, or None if it can.

        Called only after :meth:`unavailable_reason` said the device is usable. ``summary`` is
        :func:`fastclip._inputs.summarize` of ``tensors`` when the caller already has it.
        """
        return None

    def overflow_safe_refusal(self, device: torch.device) -> str | None:
        """Why this backend has no overflow-safe norm on ``device``, or None if it has one."""
        return None

    def operation_refusal(self, operation: str, device: torch.device) -> str | None:
        """Why this backend has no kernel for the method named ``operation`` on ``device``, or None.
        ``"auto"`` then passes it over for a backend that has one."""
        return None

    def get_total_norm(
        self, tensors: list[torch.Tensor], norm_type: float, foreach: bool | None, overflow_safe: bool = False
    ) -> torch.Tensor:
        """The total ``norm_type``-norm of ``tensors`` (a non-empty list), in torch's result dtype;
        with ``overflow_safe``, the scaled norm of :func:`fastclip.clip_`'s ``overflow_safe``."""
        raise NotImplementedError

    def tensor_norms(self, tensors: list[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(total norm, per-tensor norms) of ``tensors`` (a non-empty list), writing nothing: the total
        as :meth:`get_total_norm` gives it, the per-tensor norms as :meth:`clip_with_tensor_norms_`."""
        raise NotImplementedError

    def clip_grads_with_norm_(
        self, grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor, foreach: bool | None
    ) -> None:
        """Scale ``grads`` (a non-empty list) in place by ``min(max_norm / (total_norm + 1e-6), 1)``."""
        raise NotImplementedError

    def clip_(
        self, grads: list[torch.Tensor], max_norm: float, norm_type: float, foreach: bool | None,
        overflow_safe: bool = False,
    ) -> torch.Tensor:
        """Clip ``grads`` (a non-empty list) in place and return their total norm before clipping."""
        total_norm = self.get_total_norm(grads, norm_type, foreach, overflow_safe)
        self.clip_grads_with_norm_(grads, max_norm, total_norm, foreach)
        return total_norm

    def clip_with_tensor_norms_(
        self, grads: list[torch.Tensor], max_norm: float, norm_type: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`clip_` that also returns each gradient's norm (a float64 vector, each value
        torch's per-tensor norm, rounded to the gradient's dtype), from the same pass."""
        raise NotImplementedError

    def clip_grad_value_(self, grads: list[torch.Tensor], clip_value: float, foreach: bool | None) -> None:
        """Clamp every element of ``grads`` to ``[-clip_value, clip_value]`` in place.

        Clamping is exact, so every implementation gives torch's bits; the default is the torch
        backend's, for backends that have no fused version.
        """
        from fastclip.backends.torch_backend import clamp_grads_

        clamp_grads_(grads, clip_value, foreach)

    def scale_by_(self, grads: list[torch.Tensor], coefficients: torch.Tensor) -> None:
        """Multiply ``grads`` in place by float64 ``coefficients`` computed on the device (one for all,
        shape ``()`` or ``(1,)``, or one per gradient), as ``mul_`` by a 0-dim float64 tensor does.

        A fused backend skips the gradients whose coefficient is 1 (same bits: x * 1 == x). The
        default is torch's arithmetic: ``_foreach_mul_`` per device and dtype for one coefficient,
        one ``mul_`` per gradient otherwise.
        """
        from fastclip.backends.torch_backend import scale_grads_

        if coefficients.numel() == 1:
            scale_grads_(grads, coefficients.reshape(()), None)
        else:
            for g, c in zip(grads, coefficients.unbind()):
                g.mul_(c)

    def clip_per_tensor_(self, grads: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
        """Each gradient clipped by its own norm, as ``clip_grad_norm_`` of it alone; returns the norms
        (float64, on the first gradient's device). The default: the torch backend's arithmetic, one
        gradient at a time."""
        from fastclip.backends.torch_backend import TorchBackend, clip_coefficient, scale_grads_

        norms = []
        for g in grads:
            norm = TorchBackend().get_total_norm([g], norm_type, None)
            scale_grads_([g], clip_coefficient(norm, max_norm), None)
            norms.append(norm.to(grads[0].device, torch.float64))
        return torch.stack(norms)

    def adaptive_clip_grad_(self, params: list[torch.Tensor], grads: list[torch.Tensor], clip_factor: float, eps: float,
                            norm_type: float) -> None:
        """Adaptive gradient clipping (timm's unit-wise rule) of ``grads`` against ``params``, in place.

        The default is timm's arithmetic with torch ops (:mod:`fastclip.agc`), for backends that have
        no fused version.
        """
        from fastclip.agc import adaptive_clip_reference_

        adaptive_clip_reference_(params, grads, clip_factor, eps, norm_type)


def dispatcher_may_be_skipped() -> bool:
    """Whether this call may run a backend's kernels without torch's dispatcher (the C++ operators'
    own functions, the Triton ops' Python bodies): only in eager code. Traced code, torch function
    and dispatch modes, and the profiler must see the operators."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled())


def total_norm_dtype(tensors: list[torch.Tensor], overflow_safe: bool = False) -> torch.dtype:
    """The dtype of the total norm: torch.stack of the per-tensor norms promotes every tensor's
    dtype; the overflow-safe norm is at least float32 (fp16 norms readily exceed 65504)."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
    return torch.promote_types(dtype, torch.float32) if overflow_safe else dtype


FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


def fused_kernel_refusal(tensors: list[torch.Tensor], norm_type: float | None, summary: TensorSummary | None) -> str | None:
    """Why the fused kernels (C++/CUDA and Triton alike) cannot serve this call, or None.

    They cover ``norm_type`` > 0 (finite) and ``inf``, the four float dtypes and strided tensors;
    everything else is left to the ``"torch"`` backend.
    """
    from fastclip._inputs import summarize

    if norm_type is not None and not (norm_type > 0 and (math.isfinite(norm_type) or norm_type == math.inf)):
        return f"norm_type {norm_type} has no fused kernel (only p > 0 and inf)"
    summary = summary or summarize(tensors)
    unsupported_dtypes = summary.dtypes - FUSED_DTYPES
    if unsupported_dtypes:
        return f"gradients of dtype {sorted(map(str, unsupported_dtypes))[0]} have no fused kernel"
    unsupported_layouts = summary.layouts - {torch.strided}
    if unsupported_layouts:
        return f"gradients with layout {sorted(map(str, unsupported_layouts))[0]} have no fused kernel"
    return None
