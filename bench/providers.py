"""The implementations the benchmark compares: torch's clip_grad_norm_ (as users call it, foreach
and per-tensor), every fastclip backend available on the device, and apex's or Transformer Engine's
multi-tensor kernels where they are importable (imported as None otherwise).

Each provider is a function(params, max_norm) -> total norm that clips the parameters' gradients in
place, as clip_grad_norm_ does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastclip

try:  # apex's fused kernels (built with --cpp_ext --cuda_ext)
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier
except ImportError:
    amp_C = multi_tensor_applier = None

try:  # Transformer Engine's copies of the same kernels
    import transformer_engine_torch as te_ops
except ImportError:
    te_ops = None

Provider = Callable[[list[torch.Tensor], float], torch.Tensor]


def gradient_list(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters' gradients as clip_grad_norm_ takes them (and as the benchmark times taking
    them: part of the many-tensor limit)."""
    return [p.grad for p in params if p.grad is not None]


def _multi_tensor_clip(l2norm, scale, applier) -> Provider:
    """clip_grad_norm_ the way Megatron-style trainers do it with apex/TE kernels: one l2norm launch
    per dtype, then a scale launch if the (host-side) coefficient is below 1. The coefficient goes
    through the host, which is that recipe's synchronisation, measured as such."""

    def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        grads = gradient_list(params)
        flag = torch.zeros(1, dtype=torch.int, device=grads[0].device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        norms = [applier(l2norm, flag, [group], False)[0] for group in by_dtype.values()]
        total = torch.linalg.vector_norm(torch.stack([n.float().reshape(()) for n in norms]))
        coefficient = max_norm / (float(total) + 1e-6)
        if coefficient < 1.0:
            for group in by_dtype.values():
                applier(scale, flag, [group, group], coefficient)
        return total

    return clip


def providers(device: str) -> dict[str, Provider]:
    """name -> provider, for gradients on ``device``."""
    table: dict[str, Provider] = {
        # What users call (foreach=None: torch picks), the baseline of every ratio.
        "torch default": lambda params, m: torch.nn.utils.clip_grad_norm_(params, m),
        "torch foreach": lambda params, m: torch.nn.utils.clip_grad_norm_(params, m, foreach=True),
        "torch loop": lambda params, m: torch.nn.utils.clip_grad_norm_(params, m, foreach=False),
    }
    for name in fastclip.available_backends(device):
        table[f"fastclip {name}"] = lambda params, m, name=name: fastclip.clip_(params, m, backend=name)
    if device == "cuda" and amp_C is not None:
        table["apex multi_tensor"] = _multi_tensor_clip(amp_C.multi_tensor_l2norm, amp_C.multi_tensor_scale, multi_tensor_applier)
    if device == "cuda" and te_ops is not None:
        from transformer_engine.pytorch.optimizers import multi_tensor_applier as te_applier

        table["TE multi_tensor"] = _multi_tensor_clip(te_ops.multi_tensor_l2norm, te_ops.multi_tensor_scale, te_applier)
    return table


# Providers whose gradients must be bit-identical to torch's scaling by the norm they return (E3);
# apex and TE scale by a host-side float, so they are held to a tolerance instead.
def is_fastclip_or_torch(name: str) -> bool:
    return name.startswith(("torch", "fastclip"))
