"""``clipped_step``: clip, optionally skip, and step the optimizer, with the clip coefficient and the
skip decision handed to a fused optimizer's own pass where that saves memory traffic.

torch's fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``) read two device
tensors that ``GradScaler`` normally sets on them: ``grad_scale``, by which they divide every gradient
inside their pass (writing the divided gradient back), and ``found_inf``, which turns the whole
update into a no-op on the device when it is 1.0 (parameters, moments and step counts untouched).
Both are set here, so neither the coefficient nor the decision ever goes to the host.

Memory traffic per step, in passes over gradient-sized data (G = the gradients; AdamW also reads and
writes parameters and two moments):

========================================  ==========================  ==========================
path                                      with GradScaler             without
========================================  ==========================  ==========================
torch: unscale_, clip_grad_norm_, step    unscale 2 + norm 1 +        norm 1 + scale 2 +
                                          scale 2 + step 7 = 12       step 7 = 10
fastclip ``"clip"``: fused clip, step     1 + 2 + 7 = 10              1 + 7 = 8 (no clip),
                                          (``unscale_clip_``)         1 + 2 + 7 = 10 (clip)
fastclip ``"grad_scale"``: norm, step     1 + 8 = 9                   1 + 8 = 9, clip or not
========================================  ==========================  ==========================

The fused step writes the divided gradient back whenever ``grad_scale`` is set (8 passes, not 7).
So with a ``GradScaler``, handing it the coefficient saves a read and a write on every step; without
one it saves a read on clipping steps but costs a write on the others, which are most steps:
``path="auto"`` takes ``"grad_scale"`` only with an enabled ``GradScaler`` (``bench/optim_step.py``
measures all three).
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from fastclip import api
from fastclip.amp import unscale_clip_
from fastclip.backends.torch_backend import clip_coefficient
from fastclip.distributed import has_dtensors
from fastclip._inputs import grads_of, parse_max_norm, parse_norm_type
from fastclip.skip import SkipOnSpike

PATHS = ("auto", "clip", "grad_scale")


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer whose ``step()`` reads ``grad_scale`` and ``found_inf`` from itself, as
    ``GradScaler.step`` relies on (torch's fused ``Adam``, ``AdamW``, ``SGD``, ``Adagrad``)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _scaler_state(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    """The scaler's per-optimizer state, checked to be at the start of a step."""
    scaler._check_scale_growth_tracker("step")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.READY:
        raise RuntimeError("clipped_step unscales the gradients itself: call it instead of scaler.unscale_() and "
                           "scaler.step(), once per scaler.update()")
    return state


def _choose_path(path, optimizer, grads, scaler_enabled, norm_type) -> str:
    servable = (_is_fused(optimizer) and bool(grads) and norm_type > 0 and not has_dtensors(grads)
                and len({g.device for g in grads}) == 1 and all(g.layout == torch.strided for g in grads))
    if path == "grad_scale" and not servable:
        raise ValueError("path='grad_scale' needs a fused optimizer (fused=True), gradients as plain strided tensors "
                         "on one device, and norm_type > 0 or inf")
    if path == "auto":
        return "grad_scale" if servable and scaler_enabled else "clip"
    return path


def _fused_step(optimizer: torch.optim.Optimizer, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None):
    """One ``optimizer.step()`` with ``grad_scale`` and ``found_inf`` set on it, as ``GradScaler.step``
    sets them, and removed afterwards so that no later step sees them."""
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale
    if found_inf is not None:
        optimizer.found_inf = found_inf.float()  # the fused kernels skip iff it is exactly 1.0
    try:
        optimizer.step()
    finally:
        for name in ("grad_scale", "found_inf"):
            if hasattr(optimizer, name):
                delattr(optimizer, name)


def _or(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a | b.to(a.device)


@torch.no_grad()
def clipped_step(
    optimizer: torch.optim.Optimizer,
    max_norm: float | torch.Tensor,
    norm_type: float | str = 2.0,
    *,
    scaler: torch.amp.GradScaler | None = None,
    skip: SkipOnSpike | None = None,
    loss: torch.Tensor | None = None,
    path: str = "auto",
    allow_sync: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Clip the optimizer's gradients to ``max_norm`` and take its step, optionally skipping the step
    on a spike, without a host-device synchronisation when the optimizer is fused.

    Replaces, in a training loop::

        scaler.unscale_(optimizer)                        # with a GradScaler
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(optimizer)                            # or optimizer.step()

    by ``fastclip.clipped_step(optimizer, max_norm, scaler=scaler)``; ``scaler.update()`` follows as
    before.

    Paths (see the module's table for their memory traffic):

    * ``"clip"``: :func:`fastclip.clip_` (with a scaler, :func:`fastclip.unscale_clip_`), then the
      step. The gradients are clipped exactly as torch clips them.
    * ``"grad_scale"`` (fused optimizers only): the norm in one read, nothing written, and
      ``grad_scale = scale / coefficient`` handed to the optimizer, which divides the gradients by it
      in its own pass. Steps that do not clip are bit-identical to torch's (a division by a power of
      two, or by 1); on clipping steps each gradient differs from torch's ``g * coefficient`` by at
      most an ulp or so (a division by ``1 / c`` instead of a multiplication by ``c``), and 16-bit
      gradients are not rounded to 16 bits after scaling as torch rounds them.
    * ``"auto"`` (default): ``"grad_scale"`` for a fused optimizer with an enabled ``GradScaler``,
      ``"clip"`` otherwise.

    Skipping: with ``skip`` (a :class:`fastclip.SkipOnSpike`), the step is skipped when the norm or
    ``loss`` is an outlier or not finite; with an enabled ``scaler``, also when the scaled gradients
    hold Inf/NaN (only that reason backs off the scale in ``scaler.update()``). A fused optimizer
    skips on the device. Other optimizers have no such switch: multiplying the gradients by 0 on the
    device does *not* skip an Adam-type step (the moments still decay, the update from the old
    moments is still applied, weight decay still shrinks the parameters, the step count advances),
    so for them the decision is read on the host, one synchronisation per step, which must be asked
    for with ``allow_sync=True``.

    Args:
        optimizer (torch.optim.Optimizer): owns the parameters and their gradients.
        max_norm (float or Tensor): max norm of the (unscaled) gradients.
        norm_type (float or str): as in :func:`fastclip.clip_`. Default: 2.0
        scaler (torch.amp.GradScaler, optional): the scaler that scaled the loss. Default: None
        skip (SkipOnSpike, optional): decides which steps to skip. Default: None (none skipped
            but for the scaler's Inf/NaN steps)
        loss (Tensor, optional): the step's loss, for ``skip``'s loss rule. Default: None
        path (str): ``"auto"``, ``"clip"`` or ``"grad_scale"``. Default: ``"auto"``
        allow_sync (bool): allow reading ``skip``'s decision on the host for an optimizer that is not
            fused. Default: False
        backend (str): as in :func:`fastclip.clip_`, for the norm. Default: ``"auto"``

    Returns:
        Total norm of the unscaled gradients before clipping, as ``clip_grad_norm_`` returns it.

    Raises:
        ValueError: a bad argument, ``path="grad_scale"`` where it cannot serve, or ``skip`` with an
            optimizer that is not fused and ``allow_sync=False``; raised before anything changes.
        RuntimeError: with a scaler, ``unscale_()`` or ``step()`` already called since its ``update()``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if skip is not None and not isinstance(skip, SkipOnSpike):
        raise TypeError(f"skip must be a fastclip.SkipOnSpike or None, got {type(skip).__name__}")
    if loss is not None and skip is None:
        raise ValueError("loss is only used by skip's loss rule: pass skip= as well")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    max_norm = parse_max_norm(max_norm)
    norm_type = parse_norm_type(norm_type)
    fused = _is_fused(optimizer)
    if skip is not None and not fused and not allow_sync:
        raise ValueError(
            f"{type(optimizer).__name__} is not fused, so it cannot skip a step on the device; zeroing the gradients "
            "would not skip it either (Adam's moments, weight decay and step count still move). Use fused=True, "
            "or pass allow_sync=True to read the decision on the host (one synchronisation per step)")
    scaler_enabled = scaler is not None and scaler.is_enabled()
    state = _scaler_state(scaler, optimizer) if scaler_enabled else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = grads_of(params)
    path = _choose_path(path, optimizer, grads, scaler_enabled, norm_type)

    if path == "grad_scale":
        _, impl, total, _ = api._prepare(grads, "optimizer's parameters", norm_type, False, None, backend, written=True)
        scaled_norm = impl.get_total_norm(grads, norm_type, None, False) if total is None else total
        device = grads[0].device
        nonfinite = None
        scale = torch.ones((), dtype=torch.float32, device=device)
        total_norm = scaled_norm
        if scaler_enabled:
            scale = scaler._scale.to(device)
            inv_scale = scaler._scale.double().reciprocal().float()  # exactly as unscale_ computes it
            total_norm = scaled_norm * inv_scale.to(device, scaled_norm.dtype)
            nonfinite = ~scaled_norm.isfinite()
        decision = skip.update(total_norm, loss) if skip is not None else None
        grad_scale = scale / clip_coefficient(total_norm, max_norm).float()
        _fused_step(optimizer, grad_scale, _or(nonfinite, decision))
        if scaler_enabled:
            # What scaler.step leaves behind: scaler.update() backs off the scale on Inf/NaN only.
            state["found_inf_per_device"] = {device: nonfinite.float()}
            state["stage"] = OptState.STEPPED
        return total_norm

    if scaler_enabled:
        total_norm = unscale_clip_(scaler, optimizer, max_norm, norm_type, backend=backend)
    else:
        total_norm = api.clip_(params, max_norm, norm_type, backend=backend)
    decision = skip.update(total_norm, loss) if skip is not None else None
    if decision is None:
        if scaler_enabled:
            scaler.step(optimizer)
        else:
            optimizer.step()
    elif fused:
        nonfinite = None
        if scaler_enabled:
            nonfinite = sum(state["found_inf_per_device"].values()).to(decision.device) > 0
        _fused_step(optimizer, None, _or(nonfinite, decision))
        if scaler_enabled:
            state["stage"] = OptState.STEPPED
    else:  # allow_sync: the one host read of the decision
        if not bool(decision):
            if scaler_enabled:
                scaler.step(optimizer)
            else:
                optimizer.step()
        elif scaler_enabled:
            state["stage"] = OptState.STEPPED
    return total_norm
