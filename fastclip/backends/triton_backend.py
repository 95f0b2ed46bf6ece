"""Backend "triton": the Triton kernels of ``triton_kernels/clip.py``, for CUDA tensors.

CPU tensors are served only under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CI
tests these kernels on machines without a GPU; ``"auto"`` never picks the interpreter. The kernels
are called through ``torch.ops.fastclip_triton.*`` (registered by importing the module), or, for the
norm and the clip in eager code, as the ops' plain bodies.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os

import torch

from fastclip._inputs import summarize
from fastclip.backends.base import Backend, dispatcher_may_be_skipped, fused_kernel_refusal

# The repository's triton_kernels/clip.py, installed inside fastclip's namespace (pyproject.toml);
# the other kernel families import their shared pieces from it.
KERNELS_MODULE = "fastclip.triton_kernels.clip"
KERNEL_FAMILIES = (KERNELS_MODULE, "fastclip.triton_kernels.value_clip", "fastclip.triton_kernels.per_tensor",
                   "fastclip.triton_kernels.agc")


@functools.cache
def _kernels_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        found = importlib.util.find_spec(KERNELS_MODULE) is not None
    except ModuleNotFoundError:  # no fastclip.triton_kernels package at all
        found = False
    if not found:
        return "this installation of fastclip has no Triton kernels"
    try:
        for module in KERNEL_FAMILIES:
            importlib.import_module(module)  # registers torch.ops.fastclip_triton
    except Exception as e:  # a Triton that cannot build for this machine, say
        return f"the Triton kernels failed to load: {e}"
    return None


@functools.cache
def _interpreter_error() -> str | None:
    """Why Triton's interpreter cannot run the kernels, or None: one tiny clip, checked against
    torch. Old interpreters (Triton 3.2) fail on loops whose bounds are loaded from memory."""
    import triton

    from fastclip.backends.torch_backend import clip_coefficient

    importlib.import_module(KERNELS_MODULE)
    grad = torch.tensor([3.0, 4.0])
    try:
        norm = torch.ops.fastclip_triton.clip_([grad], 1.0, 2.0, False)
    except Exception as e:  # triton.runtime.errors.InterpreterError, whatever its cause
        return f"Triton {triton.__version__}'s interpreter cannot run the kernels: {e}"
    expected = torch.tensor([3.0, 4.0]) * clip_coefficient(torch.tensor(5.0), 1.0)
    if float(norm) != 5.0 or not torch.equal(grad, expected):
        return f"Triton {triton.__version__}'s interpreter gives wrong results (norm {float(norm)}, want 5)"
    return None


def _op_bodies_may_run_directly(tensors: list[torch.Tensor]) -> bool:
    """Whether the hot ops (``clip_``, ``total_norm``) may run as plain Python functions: in eager
    code, on plain tensors. The custom-op dispatch around their bodies cost ~235 us a call on an
    H200 (torch 2.11), more than the kernels on most models."""
    return dispatcher_may_be_skipped() and set(map(type, tensors)) == {torch.Tensor}  # types collected in C


class TritonBackend(Backend):
    """Fused multi-tensor Triton kernels."""

    name = "triton"

    def unavailable_reason(self, device):
        error = _kernels_error()
        if error is not None:
            return error
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
            return _interpreter_error()
        if device.type not in ("cpu", "cuda"):
            return f"no kernels for {device.type} tensors"
        return None

    def unsupported_reason(self, tensors, norm_type, summary=None):
        summary = summary or summarize(tensors)
        refusal = fused_kernel_refusal(tensors, norm_type, summary)
        if refusal is None and norm_type not in (None, 1.0, 2.0, math.inf) and torch.float64 in summary.dtypes:
            # |x|^p is computed as exp2(p * log2|x|) in fp64 (the interpreter has no libdevice pow):
            # exact enough for fp32 accumulation, a few fp64 ulp short of torch's for fp64.
            return f"norm_type {norm_type} with float64 gradients has no Triton kernel (p-th powers are not fp64-exact)"
        return refusal

    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        if _op_bodies_may_run_directly(tensors):
            return importlib.import_module(KERNELS_MODULE).total_norm_of(tensors, norm_type, overflow_safe)
        return torch.ops.fastclip_triton.total_norm(tensors, norm_type, overflow_safe)

    def clip_(self, grads, max_norm, norm_type, foreach, overflow_safe=False):
        if _op_bodies_may_run_directly(grads):
            return importlib.import_module(KERNELS_MODULE).clip_grads(grads, max_norm, norm_type, overflow_safe)
        return torch.ops.fastclip_triton.clip_(grads, max_norm, norm_type, overflow_safe)

    def clip_with_tensor_norms_(self, grads, max_norm, norm_type):
        return torch.ops.fastclip_triton.clip_with_tensor_norms_(grads, max_norm, norm_type)

    def tensor_norms(self, tensors, norm_type):
        return torch.ops.fastclip_triton.tensor_norms(tensors, norm_type)

    def clip_grads_with_norm_(self, grads, max_norm, total_norm, foreach):
        torch.ops.fastclip_triton.scale_with_norm_(grads, max_norm, total_norm)

    def clip_grad_value_(self, grads, clip_value, foreach):
        torch.ops.fastclip_triton.clamp_values_(grads, clip_value, foreach is not False)

    def clip_per_tensor_(self, grads, max_norm, norm_type):
        return torch.ops.fastclip_triton.clip_per_tensor_(grads, max_norm, norm_type)

    def scale_by_(self, grads, coefficients):
        torch.ops.fastclip_triton.scale_by_(grads, coefficients)

    def adaptive_clip_grad_(self, params, grads, clip_factor, eps, norm_type):
        if norm_type == 2.0:
            torch.ops.fastclip_triton.adaptive_clip_(params, grads, clip_factor, eps)
        else:  # the kernel is L2's (timm's default and the paper's)
            super().adaptive_clip_grad_(params, grads, clip_factor, eps, norm_type)
