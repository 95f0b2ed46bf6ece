"""``adaptive_clip_grad_``: adaptive gradient clipping (AGC; Brock et al. 2021, the NFNet paper),
unit-wise, as timm's ``timm/utils/agc.py`` defines it.

Each unit (one index of a parameter's first dimension, or the whole parameter when it has at most
one dimension) is clipped against its own parameter: its gradient is left alone when its norm is
below ``clip_factor * max(norm of the parameter unit, eps)``, and scaled down to that limit
otherwise. timm's loop runs several kernels per parameter (two unit norms, clamps, a division, a
product, a ``where`` and a copy: the gradient is read three times and written twice, the parameter
read once); fastclip's kernels (C++ for CPU tensors, Triton for CUDA ones, the same arithmetic) read
each parameter and gradient once and write only the units that clip. See ``../shared/CLIPPING-METHODS.md`` for where optax's definition differs.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastclip._dispatch import select_backend
from fastclip._inputs import TensorOrTensors, as_tensor_list, check_gradients, parse_norm_type, summarize


def unit_norms(x: torch.Tensor, norm_type: float) -> torch.Tensor:
    """timm's ``unitwise_norm``: the norm of the whole tensor for 0-d and 1-d ones, else of each index
    of dimension 0 (keeping dimensions, so it broadcasts against ``x``)."""
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_clip_reference_(params: list[torch.Tensor], grads: list[torch.Tensor], clip_factor: float, eps: float,
                             norm_type: float) -> None:
    """timm's arithmetic, operation for operation, in each tensor's dtype: the reference, and what
    backends without a fused kernel run. Out of place where timm works in place (the same values):
    the norm of a DTensor sharded across its only unit is a pending (partial) reduction, which
    in-place operations cannot take."""
    for p, g in zip(params, grads):
        limit = unit_norms(p.detach(), norm_type).clamp(min=eps).mul(clip_factor)
        grad_norm = unit_norms(g, norm_type)
        clipped = g * (limit / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < limit, g, clipped))


def _positive_finite(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)  # one host read, as torch's own functions take a tensor bound
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: TensorOrTensors,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float | str = 2.0,
    *,
    backend: str = "auto",
) -> None:
    r"""Adaptive gradient clipping, unit-wise, in place: a drop-in for timm's ``adaptive_clip_grad``.

    For each unit (a row of dimension 0; a 0-d or 1-d parameter is one unit), with ``W`` the
    parameter's unit and ``G`` its gradient's::

        limit = max(||W||, eps) * clip_factor
        G = G                              if ||G|| < limit
        G = G * limit / max(||G||, 1e-6)   otherwise

    every operation in the tensor's dtype, as timm computes it (so the results are timm's, up to the
    rounding of the norms themselves, which fastclip accumulates in double). The NFNet paper leaves
    the final classifier unclipped: pass the parameters to clip, not the whole model, to do the same.

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` will be clipped; those
            without a gradient are skipped.
        clip_factor (float): the limit as a fraction of the parameter's norm. Default: 0.01
        eps (float): the smallest parameter norm a limit is taken from (so that zero-initialised
            parameters can still learn). Default: 1e-3
        norm_type (float or str): the unit norm; the fused kernels serve 2 (timm's default and the
            paper's), other norms run timm's arithmetic with torch. Default: 2.0
        backend (str): ``"auto"``, ``"cpp"`` (CPU tensors: one fused pass), ``"triton"`` (one fused
            launch; CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (timm's arithmetic
            with torch ops). Default: ``"auto"``

    Returns:
        None

    Raises:
        ValueError: a bad ``clip_factor``, ``eps`` or ``norm_type``, or a gradient whose shape or dtype
            differs from its parameter's; TypeError: a gradient that is not floating point. Raised
            before any gradient changes.
    """
    parameters = as_tensor_list(parameters, "parameters", warn_empty_generator=False)
    clip_factor = _positive_finite(clip_factor, "clip_factor")
    eps = _positive_finite(eps, "eps")
    norm_type = parse_norm_type(norm_type)
    if not norm_type > 0:
        raise ValueError(f"adaptive_clip_grad_ needs norm_type > 0 or inf, got {norm_type}")
    pairs = [(p, p.grad) for p in parameters if p.grad is not None]
    if not pairs:
        return
    params, grads = [p for p, _ in pairs], [g for _, g in pairs]
    for i, (p, g) in enumerate(pairs):
        if p.shape != g.shape or p.dtype != g.dtype or p.device != g.device:
            raise ValueError(f"parameters: parameter {i} ({tuple(p.shape)}, {p.dtype}, {p.device}) and its gradient "
                             f"({tuple(g.shape)}, {g.dtype}, {g.device}) differ; AGC compares them unit by unit")
    summary = summarize(grads)
    check_gradients(grads, summary, "parameters", written=True)
    impl = select_backend(backend, grads, norm_type, summary, operation="adaptive_clip_grad_")
    impl.adaptive_clip_grad_(params, grads, clip_factor, eps, norm_type)
