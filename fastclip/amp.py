"""``unscale_clip_``: ``GradScaler.unscale_`` and ``clip_grad_norm_`` in one pass over the gradients."""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from fastclip import api
from fastclip._dispatch import select_backend
from fastclip._inputs import check_gradients, grads_of, parse_max_norm, parse_norm_type, summarize
from fastclip.backends.torch_backend import clip_coefficient, scale_grads_


@torch.no_grad()
def unscale_clip_(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    norm_type: float | str = 2.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Unscale the optimizer's gradients and clip their norm, reading and writing each gradient once:
    a fused ``scaler.unscale_(optimizer)`` followed by ``clip_grad_norm_(params, max_norm)``.

    The fused kernel reads the scaled gradients once for their norm; the norm of the unscaled
    gradients is that times ``1 / scale`` (exactly: GradScaler's scale is a power of two, as long as
    its ``init_scale``, growth and backoff factors are), and each gradient is written once, multiplied
    by ``(1 / scale) * clip coefficient``, which equals unscaling then clipping bit for bit. An
    Inf/NaN gradient makes the norm non-finite; that is recorded in the scaler's per-optimizer state
    (``found_inf``) as ``unscale_`` records it, so ``scaler.step`` skips the step. Nothing waits for
    the device.

    Example::

        scaler.scale(loss).backward()
        fastclip.unscale_clip_(scaler, optimizer, max_norm=1.0)
        scaler.step(optimizer)
        scaler.update()

    Args:
        scaler (torch.amp.GradScaler): the scaler that scaled the loss.
        optimizer (torch.optim.Optimizer): owns the gradients.
        max_norm (float): max norm of the unscaled gradients.
        norm_type (float or str): as in :func:`fastclip.clip_`; fused for p > 0 and ``inf`` (other
            norms run ``unscale_`` then the clip). Default: 2.0
        backend (str): as in :func:`fastclip.clip_`, for the norm. Default: ``"auto"``

    Returns:
        Total norm of the unscaled gradients before clipping, as ``clip_grad_norm_`` returns it.
        When a gradient holds Inf/NaN (the step will be skipped), the gradients are left scaled by a
        non-finite coefficient, as unusable as torch leaves them.

    Raises:
        RuntimeError: as ``unscale_``: called twice for one optimizer before ``update()``, or after
            ``step()``.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not scaler.is_enabled():
        return api.clip_(params, max_norm, norm_type, backend=backend)
    max_norm = parse_max_norm(max_norm)  # every argument checked before the scaler's state changes
    norm_type = parse_norm_type(norm_type)
    scaler._check_scale_growth_tracker("unscale_")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    grads = grads_of(params)
    summary = summarize(grads)
    check_gradients(grads, summary, "optimizer's parameters", written=True)
    impl = select_backend(backend, grads, norm_type, summary)
    if not grads or len(summary.devices) > 1 or summary.layouts != {torch.strided} or not norm_type > 0:
        # Nothing to fuse; what torch unscales per device or out of place; or a norm that is not
        # homogeneous (p = 0) or blind to inf (p < 0, -inf), so cannot detect it: torch's own two steps.
        scaler.unscale_(optimizer)
        return api.clip_(params, max_norm, norm_type, backend=backend)
    scaled_norm = impl.get_total_norm(grads, norm_type, None)
    inv_scale = scaler._scale.double().reciprocal().float()  # exactly as unscale_ computes it
    device = grads[0].device
    total_norm = scaled_norm * inv_scale.to(device, scaled_norm.dtype)
    state["found_inf_per_device"] = {device: (~torch.isfinite(scaled_norm)).float()}
    state["stage"] = OptState.UNSCALED
    scale_grads_(grads, inv_scale.to(device) * clip_coefficient(total_norm, max_norm).float(), None)
    return total_norm
