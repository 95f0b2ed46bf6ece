"""fastclip: fused multi-tensor gradient clipping, a drop-in for ``torch.nn.utils.clip_grad_norm_``.

    total_norm = fastclip.clip_(model.parameters(), max_norm=1.0)
"""

from fastclip.api import (
    available_backends,
    clip_,
    clip_grad_value_,
    clip_grads_with_norm_,
    clip_with_tensor_norms_,
    get_tensor_norms,
    get_total_norm,
    release_captured_tables,
)
from fastclip.adaptive import AdaGC, QuantileClip, RunningAverageClip, ZClip
from fastclip.agc import adaptive_clip_grad_
from fastclip.amp import unscale_clip_
from fastclip.skip import SkipOnSpike
from fastclip.step import clipped_step
from fastclip.monitor import ClipMonitor
from fastclip.per_tensor import clip_per_group_, clip_per_tensor_
from fastclip.patch import patch_torch

__version__ = "0.1.0"

__all__ = [
    "AdaGC",
    "ClipMonitor",
    "QuantileClip",
    "RunningAverageClip",
    "SkipOnSpike",
    "ZClip",
    "adaptive_clip_grad_",
    "available_backends",
    "clip_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_per_group_",
    "clip_per_tensor_",
    "clip_with_tensor_norms_",
    "clipped_step",
    "get_tensor_norms",
    "get_total_norm",
    "patch_torch",
    "release_captured_tables",
    "unscale_clip_",
]
