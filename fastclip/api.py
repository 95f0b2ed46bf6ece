"""The public functions: drop-in replacements for ``torch.nn.utils``'s gradient-clipping functions.

Each one validates and normalises its arguments (``fastclip._inputs``), picks a backend
(``fastclip._dispatch``) and hands it a plain list of gradient tensors. Nothing is modified before
every argument has been checked.
"""

from __future__ import annotations

import math
import sys

import torch

from fastclip._dispatch import backend_status, requested_backend, select_backend
from fastclip._inputs import (
    TensorOrTensors,
    as_tensor_list,
    check_gradients,
    check_tensor_types,
    grads_of,
    parse_overflow_safe,
    parse_max_norm,
    parse_norm_type,
    summarize,
)
from fastclip.backends.base import total_norm_dtype
from fastclip.backends.cpp_backend import direct_entries
from fastclip._extension import load_error
from fastclip.distributed import as_dtensor_like_torch, as_extra_groups, as_plain_tensor, global_norm, split_shards


def _distributed_norm(backend, local, shard_sets, norm_type, overflow_safe, summary, extra_groups):
    """(backend, global norm) for sharded gradients: the local shards' norm from a fused kernel
    (overflow-safe, so each process's share is exact to fp32 or better), and one collective where
    the layout allows (``fastclip.distributed``)."""
    if not norm_type > 0:
        raise ValueError(f"the norm of distributed gradients needs norm_type > 0 or inf, got {norm_type}")
    impl = select_backend(backend, local, norm_type, summary, overflow_safe=True)
    # A process without gradients cannot know their dtype: it answers in the default dtype, as torch
    # does for no gradients.
    dtype = total_norm_dtype(local, overflow_safe) if local else torch.get_default_dtype()
    total_norm = global_norm(shard_sets, norm_type, dtype,
                             lambda tensors: impl.get_total_norm(tensors, norm_type, None, True), extra_groups)
    return impl, total_norm


def _prepare(tensors, arg_name, norm_type, overflow_safe, group, backend, *, written, extra_groups=None,
             shardable=True):
    """(local tensors, backend, global norm or None, result mesh): the call's tensors checked
    (DTensors replaced by their local shards), the backend that serves them, for sharded tensors
    (DTensors, or plain ones with ``group`` or ``extra_groups``) their global norm, which needs
    collectives (None otherwise), and the mesh on which torch would return the norm as a DTensor
    (None for a plain tensor). A process without tensors still joins the collectives of ``group`` and
    ``extra_groups``, so that the others do not wait for it forever."""
    tensors, shard_sets, result_mesh = split_shards(tensors, group)
    extra_groups = as_extra_groups(extra_groups)
    distributed = bool(shard_sets or extra_groups or group is not None)
    if distributed and not shardable:
        raise ValueError(f"{arg_name}: sharded (DTensor) gradients and process groups are not supported here")
    summary = summarize(tensors)
    check_gradients(tensors, summary, arg_name, written=written)
    if not distributed:
        return tensors, select_backend(backend, tensors, norm_type, summary, overflow_safe), None, None
    impl, total_norm = _distributed_norm(backend, tensors, shard_sets, norm_type, overflow_safe, summary, extra_groups)
    return tensors, impl, total_norm, result_mesh


def _clip_in_one_call(parameters, max_norm, norm_type, overflow_safe, backend) -> torch.Tensor | None:
    """:func:`clip_` of plain local gradients by the cpp backend in one call into the extension, which
    takes the gradients from the parameters, checks them and clips them in one pass
    (``fastclip._C.clip_parameters``); None where it does not serve the call (the general path runs)."""
    if requested_backend(backend) not in ("auto", "cpp"):
        return None
    direct = direct_entries()
    if direct is None:
        return None
    total_norm = direct.clip_parameters(parameters, max_norm, norm_type, overflow_safe)
    return None if total_norm is NotImplemented else total_norm


def _raise_if_nonfinite(total_norm: torch.Tensor, norm_type: float) -> None:
    # One host-device synchronisation, as in torch; only when the user asked for the check.
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )


def clip_(
    parameters: TensorOrTensors,
    max_norm: float | torch.Tensor,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    overflow_safe: bool = False,
    group: "torch.distributed.ProcessGroup | None" = None,
    extra_groups=None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Clip the gradient norm of an iterable of parameters, in place: a drop-in for
    :func:`torch.nn.utils.clip_grad_norm_`.

    The norm is computed over the norms of the individual gradients, as if they were concatenated
    into a single vector, and every gradient is multiplied by
    :math:`\min(\text{max\_norm} / (\text{total\_norm} + 10^{-6}), 1)`.

    Args:
        parameters (Iterable[Tensor] or Tensor): tensors whose ``.grad`` will be clipped; those
            whose ``.grad`` is None are skipped.
        max_norm (float or Tensor): max norm of the gradients.
        norm_type (float or str): type of the p-norm: any real number, ``inf``, ``-inf`` or
            ``'inf'``. Default: 2.0
        error_if_nonfinite (bool): if True, raise (before modifying anything) when the total norm
            is NaN or infinite. Costs one host-device synchronisation. Default: False
        foreach (bool, optional): passed to the ``"torch"`` backend, as in torch; fused backends
            are always multi-tensor and ignore it. Default: None
        overflow_safe (bool): if True, compute the norm without overflow or underflow: each chunk
            of a gradient is scaled by a power of two near its largest magnitude before its
            powers are summed (as BLAS ``nrm2`` does), so gradients of 1e20 or 1e-25 in fp32 get
            their true, finite norm and are clipped with their direction kept, where torch's
            squares overflow to an infinite norm (and a coefficient of 0). The norm is that of
            all elements as one vector, not rounded per gradient, and its dtype is torch's widened
            to at least float32. Needs ``norm_type`` > 0 or ``inf``. Default: False (torch's
            results)
        group (ProcessGroup, optional): the process group over which plain-tensor gradients are
            shards of one whole (each rank holds different elements, as with Megatron-style model
            parallelism): the norm is that of all ranks' elements together, the same on every rank,
            from one ``all_reduce``. DTensor gradients (FSDP2, tensor parallel) need no ``group``:
            their meshes say how they are sharded; with them, ``group`` may only name the ranks of
            their mesh. Default: None (plain tensors are local)
        extra_groups (ProcessGroup, 1-D DeviceMesh, or a sequence of them, optional): groups over
            which the total is summed again (inf: maxed) because each of their ranks holds other
            gradients: the pipeline-parallel group (torchtitan's ``pp_mesh``). Reduced in the same
            collective as the shards where the layout is a grid covering the world. Default: None
        backend (str): ``"auto"`` (default; overridden by ``FASTCLIP_BACKEND``), ``"torch"``,
            ``"cpp"`` or ``"triton"``. A named backend that cannot serve the call raises.

    Returns:
        Total norm of the gradients before clipping (viewed as a single vector), a 0-dim tensor
        with the dtype and device torch's ``clip_grad_norm_`` would return (at least float32 with
        ``overflow_safe``); for DTensor gradients on one mesh, like torch's, a DTensor replicated on
        that mesh (the same value on every rank).
    """
    # The items' types are checked by the one-call path's C++ entry, or below before the general
    # path: a Python pass over 2,000 parameters cost ~60 us. No autograd here either until then.
    # Neither path keeps or changes the list: a list passed in is used as it is.
    parameters = as_tensor_list(parameters, "parameters", warn_empty_generator=True, check_types=False, copy=False)
    max_norm = parse_max_norm(max_norm)
    norm_type = parse_norm_type(norm_type)
    overflow_safe = parse_overflow_safe(overflow_safe, norm_type)
    if group is None and extra_groups is None and not error_if_nonfinite:
        total_norm = _clip_in_one_call(parameters, max_norm, norm_type, overflow_safe, backend)
        if total_norm is not None:
            return total_norm
    check_tensor_types(parameters, "parameters")
    with torch.no_grad():
        return _clip_general(parameters, max_norm, norm_type, error_if_nonfinite, foreach, overflow_safe, group,
                             extra_groups, backend)


def _clip_general(parameters, max_norm, norm_type, error_if_nonfinite, foreach, overflow_safe, group, extra_groups,
                  backend) -> torch.Tensor:
    """:func:`clip_` of checked arguments through the backends (every case the one call does not serve)."""
    grads, impl, total_norm, result_mesh = _prepare(grads_of(parameters), "parameters", norm_type, overflow_safe,
                                                    group, backend, written=True, extra_groups=extra_groups)
    if total_norm is None:
        if not grads:
            return torch.tensor(0.0)
        if not error_if_nonfinite:  # the fused path: norm and scaling in one call
            return impl.clip_(grads, max_norm, norm_type, foreach, overflow_safe)
        total_norm = impl.get_total_norm(grads, norm_type, foreach, overflow_safe)
    if error_if_nonfinite:
        _raise_if_nonfinite(total_norm, norm_type)
    if grads:
        impl.clip_grads_with_norm_(grads, max_norm, total_norm, foreach)
    return as_dtensor_like_torch(total_norm, result_mesh)


@torch.no_grad()
def clip_with_tensor_norms_(
    parameters: TensorOrTensors, max_norm: float | torch.Tensor, norm_type: float | str = 2.0, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`clip_` that also returns each gradient's norm, from the same pass (no extra read).

    Args:
        parameters (Iterable[Tensor] or Tensor): as in :func:`clip_`.
        max_norm (float or Tensor): as in :func:`clip_`.
        norm_type (float or str): as in :func:`clip_`. Default: 2.0
        backend (str): as in :func:`clip_`. Default: ``"auto"``

    Returns:
        (total norm, per-gradient norms): the total as :func:`clip_` returns it; the per-gradient
        norms as a float64 vector on the gradients' device, in the order of the gradients (those
        that are not None), each the norm torch computes for that gradient, in its dtype's precision.
    """
    parameters = as_tensor_list(parameters, "parameters", warn_empty_generator=True)
    max_norm = parse_max_norm(max_norm)
    norm_type = parse_norm_type(norm_type)
    grads, impl, _, _ = _prepare(grads_of(parameters), "parameters", norm_type, False, None, backend, written=True,
                              shardable=False)
    if not grads:
        return torch.tensor(0.0), torch.zeros(0, dtype=torch.float64)
    return impl.clip_with_tensor_norms_(grads, max_norm, norm_type)


@torch.no_grad()
def get_tensor_norms(
    tensors: TensorOrTensors, norm_type: float | str = 2.0, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`get_total_norm` that also returns each tensor's norm, from the same pass; writes nothing.

    What per-tensor clippers (:class:`fastclip.AdaGC`) read first: a NaN or inf in one gradient makes
    the total non-finite, but leaves the other tensors' norms as they are.

    Args:
        tensors (Iterable[Tensor] or Tensor): the tensors (typically gradients) to measure.
        norm_type (float or str): as in :func:`clip_`. Default: 2.0
        backend (str): as in :func:`clip_`. Default: ``"auto"``

    Returns:
        (total norm, per-tensor norms): the total as :func:`get_total_norm` returns it; the per-tensor
        norms as :func:`clip_with_tensor_norms_` returns them (float64, on the tensors' device, each
        the norm torch computes for that tensor, in its dtype's precision).
    """
    tensors = as_tensor_list(tensors, "tensors", warn_empty_generator=False)
    norm_type = parse_norm_type(norm_type)
    tensors, impl, _, _ = _prepare(tensors, "tensors", norm_type, False, None, backend, written=False,
                                   shardable=False)
    if not tensors:
        return torch.tensor(0.0), torch.zeros(0, dtype=torch.float64)
    return impl.tensor_norms(tensors, norm_type)


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    overflow_safe: bool = False,
    group: "torch.distributed.ProcessGroup | None" = None,
    extra_groups=None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Compute the norm of an iterable of tensors: a drop-in for :func:`torch.nn.utils.get_total_norm`.

    Args:
        tensors (Iterable[Tensor] or Tensor): the tensors (typically gradients) to measure.
        norm_type (float or str): type of the p-norm, as in :func:`clip_`. Default: 2.0
        error_if_nonfinite (bool): if True, raise when the norm is NaN or infinite. Default: False
        foreach (bool, optional): as in :func:`clip_`. Default: None
        overflow_safe (bool): as in :func:`clip_`. Default: False
        group (ProcessGroup, optional): as in :func:`clip_`. Default: None
        extra_groups (ProcessGroup, 1-D DeviceMesh, or a sequence of them, optional): as in
            :func:`clip_`. Default: None
        backend (str): as in :func:`clip_`. Default: ``"auto"``

    Returns:
        Total norm of the tensors (viewed as a single vector), a 0-dim tensor; a replicated DTensor
        for DTensors on one mesh, as in :func:`clip_`.
    """
    tensors = as_tensor_list(tensors, "tensors", warn_empty_generator=False)
    norm_type = parse_norm_type(norm_type)
    overflow_safe = parse_overflow_safe(overflow_safe, norm_type)
    tensors, impl, total_norm, result_mesh = _prepare(tensors, "tensors", norm_type, overflow_safe, group, backend,
                                                      written=False, extra_groups=extra_groups)
    if total_norm is None:
        if not tensors:
            return torch.tensor(0.0)
        total_norm = impl.get_total_norm(tensors, norm_type, foreach, overflow_safe)
    if error_if_nonfinite:
        _raise_if_nonfinite(total_norm, norm_type)
    return as_dtensor_like_torch(total_norm, result_mesh)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float | torch.Tensor,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> None:
    r"""Scale gradients in place given a precomputed total norm: a drop-in for
    :func:`torch.nn.utils.clip_grads_with_norm_`.

    Every gradient is multiplied by :math:`\min(\text{max\_norm} / (\text{total\_norm} + 10^{-6}), 1)`.

    Args:
        parameters (Iterable[Tensor] or Tensor): tensors whose ``.grad`` will be scaled.
        max_norm (float or Tensor): max norm of the gradients.
        total_norm (Tensor): total norm of the gradients, e.g. from :func:`get_total_norm`.
        foreach (bool, optional): as in :func:`clip_`. Default: None
        backend (str): as in :func:`clip_`. Default: ``"auto"``

    Returns:
        None
    """
    parameters = as_tensor_list(parameters, "parameters", warn_empty_generator=False)
    max_norm = parse_max_norm(max_norm)
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm must be a Tensor, got {type(total_norm).__name__}")
    total_norm = as_plain_tensor(total_norm)  # torch's norm of DTensor gradients is a DTensor
    grads, _, _ = split_shards(grads_of(parameters), None)  # scaling is elementwise: local shards
    summary = summarize(grads)
    check_gradients(grads, summary, "parameters", written=True)
    impl = select_backend(backend, grads, None, summary)
    if grads:
        impl.clip_grads_with_norm_(grads, max_norm, total_norm, foreach)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float | torch.Tensor,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> None:
    r"""Clamp gradients in place to ``[-clip_value, clip_value]``: a drop-in for
    :func:`torch.nn.utils.clip_grad_value_`, with torch's results bit for bit (clamping is exact).

    torch clamps each dtype group twice (``clamp_min`` then ``clamp_max``: two reads and two writes of
    every gradient). The ``"cpp"`` backend clamps every gradient of every dtype in one call: each
    64K-element chunk is read once, and written only if it holds an element outside the interval.

    Args:
        parameters (Iterable[Tensor] or Tensor): tensors whose ``.grad`` will be clamped.
        clip_value (float or Tensor): maximum allowed magnitude of each gradient element.
        foreach (bool, optional): as in :func:`clip_`. Default: None
        backend (str): as in :func:`clip_`. Default: ``"auto"``

    Returns:
        None

    Raises:
        RuntimeError: ``clip_value`` is finite but beyond a gradient dtype's range (torch raises the
            same), before any gradient is clamped.
    """
    parameters = as_tensor_list(parameters, "parameters", warn_empty_generator=False)
    clip_value = parse_max_norm(clip_value, "clip_value")
    grads, _, _ = split_shards(grads_of(parameters), None)  # clamping is elementwise: local shards
    summary = summarize(grads)
    check_gradients(grads, summary, "parameters", written=True)
    for dtype in summary.dtypes:
        # torch raises this too, but only when it reaches that dtype's group, after clamping others.
        if dtype.is_floating_point and math.isfinite(clip_value) and clip_value > torch.finfo(dtype).max:
            raise RuntimeError(f"clip_value {clip_value} cannot be converted to {dtype} without overflow "
                               "(as in torch); nothing was clamped")
    impl = select_backend(backend, grads, None, summary)
    if grads:
        impl.clip_grad_value_(grads, clip_value, foreach)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` on this machine, best first.

    Args:
        device: a device or device type, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        Backend names; ``"torch"`` is always among them. ``python -m fastclip.info`` says why the
        others are missing.
    """
    status = backend_status(device)
    preferred = ("cpp", "triton", "torch")
    return [name for name in preferred if status[name] is None]


def release_captured_tables() -> int:
    """Frees the gradient tables kept for CUDA graphs that captured fastclip calls.

    A captured call reads a device table of its gradients' addresses (built by the eager warm-up
    call before the capture), and its graph may replay at any time: fastclip never evicts such a
    table on its own. Call this once the graphs that captured fastclip are deleted; a graph replayed
    afterwards would read freed memory. Tables of eager calls need nothing: they are cached and
    evicted by themselves.

    Returns:
        The number of tables freed (the C++ and the Triton backends' together; 0 without a GPU).
    """
    released = 0
    if load_error() is None:
        import fastclip._C

        released += fastclip._C.release_captured_tables()
    triton_tables = sys.modules.get("fastclip.triton_kernels.tables")  # not imported: nothing cached
    if triton_tables is not None:
        released += triton_tables.TABLE_CACHE.release_captured()
    return released
