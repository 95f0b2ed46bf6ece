"""Clipping each gradient, or each parameter group, by its own norm rather than by the global one.

``clip_per_tensor_`` gives what ``torch.nn.utils.clip_grad_norm_`` gives when called on each gradient
alone, from one pass for all the norms (the fused kernels write only the gradients that clip);
``clip_per_group_`` clips each of an optimizer's parameter groups by the group's own norm, one fused
``clip_`` per group.
"""

from __future__ import annotations

import torch

from fastclip import api
from fastclip._dispatch import select_backend
from fastclip._inputs import (
    TensorOrTensors,
    as_tensor_list,
    check_gradients,
    grads_of,
    parse_max_norm,
    parse_norm_type,
    summarize,
)


@torch.no_grad()
def clip_per_tensor_(
    parameters: TensorOrTensors, max_norm: float | torch.Tensor, norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False, *, backend: str = "auto"
) -> torch.Tensor:
    r"""Clip each gradient by its own norm: the same as ``torch.nn.utils.clip_grad_norm_([p], max_norm)``
    for every parameter ``p``, without a call (and its launches) per parameter.

    Args:
        parameters (Iterable[Tensor] or Tensor): tensors whose ``.grad`` will be clipped.
        max_norm (float or Tensor): max norm of each gradient.
        norm_type (float or str): as in :func:`fastclip.clip_`. Default: 2.0
        error_if_nonfinite (bool): if True, raise (before any gradient is modified) when a gradient's
            norm is NaN or infinite. The check reads the norms on the host (one synchronisation, as
            torch's) and costs a second read of the gradients. Default: False
        backend (str): as in :func:`fastclip.clip_`: ``"cpp"`` (CPU tensors) and ``"triton"`` run
            fused kernels (two passes, whatever the number of gradients), ``"torch"`` clips gradient
            by gradient. Default: ``"auto"``

    Returns:
        The norm of each gradient before clipping (those that are not None, in order), a float64
        vector on the first gradient's device, each the norm torch computes for that gradient.

    Raises:
        RuntimeError: with ``error_if_nonfinite``, a gradient whose norm is not finite.
    """
    parameters = as_tensor_list(parameters, "parameters", warn_empty_generator=True)
    max_norm = parse_max_norm(max_norm)
    norm_type = parse_norm_type(norm_type)
    grads = grads_of(parameters)
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    summary = summarize(grads)
    check_gradients(grads, summary, "parameters", written=True)
    impl = select_backend(backend, grads, norm_type, summary, operation="clip_per_tensor_")
    if error_if_nonfinite:
        # The fused pass writes as soon as it knows a gradient's coefficient, so the check reads the
        # norms first, with torch (torch.nn.utils.get_total_norm of each gradient alone).
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type).to(grads[0].device, torch.float64) for g in grads])
        nonfinite = (~torch.isfinite(norms)).nonzero().flatten().tolist()  # the one host read
        if nonfinite:
            raise RuntimeError(f"The norm of order {norm_type} of gradient {nonfinite[0]} (of {len(nonfinite)} non-finite "
                               "ones) is non-finite, so it cannot be clipped. To disable this error and scale the "
                               "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    return impl.clip_per_tensor_(grads, max_norm, norm_type)


@torch.no_grad()
def clip_per_group_(param_groups, max_norm: float | torch.Tensor, norm_type: float | str = 2.0, *,
                    backend: str = "auto") -> list[torch.Tensor]:
    r"""Clip each parameter group by its own norm (one fused :func:`fastclip.clip_` per group), as
    trainers do that treat embeddings, norms and the rest differently.

    Args:
        param_groups: ``optimizer.param_groups`` (dicts with ``"params"``; a group's own
            ``"max_norm"`` entry, if it has one, overrides ``max_norm``), or a sequence of parameter
            iterables.
        max_norm (float or Tensor): max norm of each group's gradients.
        norm_type (float or str): as in :func:`fastclip.clip_`. Default: 2.0
        backend (str): as in :func:`fastclip.clip_`. Default: ``"auto"``

    Returns:
        Each group's total norm before clipping, in order.

    Raises:
        ValueError / TypeError: a bad argument in any group, before any group is clipped.
    """
    groups = []
    for i, group in enumerate(param_groups):
        params = group["params"] if isinstance(group, dict) else group
        bound = group.get("max_norm", max_norm) if isinstance(group, dict) else max_norm
        groups.append((as_tensor_list(params, f"param_groups[{i}]", warn_empty_generator=False),
                       parse_max_norm(bound, f"param_groups[{i}] max_norm")))
    norm_type = parse_norm_type(norm_type)
    for i, (params, _) in enumerate(groups):  # every group checked before any is clipped
        grads = grads_of(params)
        check_gradients(grads, summarize(grads), f"param_groups[{i}]", written=True)
    return [api.clip_(params, bound, norm_type, backend=backend) for params, bound in groups]
