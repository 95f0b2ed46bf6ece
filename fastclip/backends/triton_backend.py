"""Backend "triton": the Triton kernels of ``triton_kernels/``, for CUDA tensors.

CPU tensors are served only under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CI
tests these kernels on machines without a GPU; ``"auto"`` never picks the interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from fastclip.backends.base import Backend


@functools.cache
def _kernels_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        found = importlib.util.find_spec("triton_kernels.clip") is not None
    except ModuleNotFoundError:  # no triton_kernels package at all
        found = False
    return None if found else "this version of fastclip has no Triton kernels"


class TritonBackend(Backend):
    """Fused multi-tensor Triton kernels."""

    name = "triton"

    def unavailable_reason(self, device):
        error = _kernels_error()
        if error is not None:
            return error
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
        if device.type not in ("cpu", "cuda"):
            return f"no kernels for {device.type} tensors"
        return None
