"""Backend "cpp": the C++/CUDA extension (``csrc/``), called through ``torch.ops.fastclip``."""

from __future__ import annotations

import torch

from fastclip import _extension
from fastclip.backends.base import Backend

# Dispatch key of the extension's kernels for each device type it can serve.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


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
        return None
