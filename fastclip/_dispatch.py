"""Chooses the backend that serves a call.

``backend="auto"`` (or the ``FASTCLIP_BACKEND`` environment variable, which overrides it) takes the
first backend in the device's preference order that is available on this machine and can serve
these tensors, and falls back to ``"torch"``, which serves everything. A backend named explicitly
must serve the call or raise: silently running something else would make benchmarks and bug
reports lie.
"""

from __future__ import annotations

import os

import torch

from fastclip._inputs import TensorSummary, summarize
from fastclip.distributed import has_dtensors
from fastclip.backends import Backend, CppBackend, TorchBackend, TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), CppBackend(), TritonBackend())}

# Preference order of "auto" per device type. The Triton interpreter (CPU) is for tests, never auto.
_AUTO_ORDER = {"cuda": ("cpp", "triton", "torch"), "cpu": ("cpp", "torch")}


def requested_backend(backend: str) -> str:
    """The backend asked for: ``backend``, or for ``"auto"`` the ``FASTCLIP_BACKEND`` override.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    forced = os.environ.get("FASTCLIP_BACKEND", "auto")
    if forced != "auto" and forced not in BACKENDS:
        raise ValueError(f"FASTCLIP_BACKEND must be 'auto' or one of {sorted(BACKENDS)}, got {forced!r}")
    return forced


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    # A property of the machine, not of the call: traced code (torch.compile) takes it as a
    # constant instead of tracing the dispatcher queries behind it (see below).
    return BACKENDS[name].unavailable_reason(device)


# What torch.compiler.assume_constant_result(_unavailable_reason) does, without calling it: it
# imports torch._dynamo, which would add ~1 s to `import fastclip`. tests/test_compile.py fails
# if a torch release stops honouring the mark.
_unavailable_reason._dynamo_marked_constant = True


def _reason_not_served(
    backend: Backend, tensors: list[torch.Tensor], norm_type: float | None, summary: TensorSummary,
    overflow_safe: bool, operation: str | None,
) -> str | None:
    if backend.name == "torch" or not tensors:
        return None
    if len(summary.devices) > 1:
        return f"the tensors are on several devices ({', '.join(sorted(map(str, summary.devices)))})"
    device = next(iter(summary.devices))
    return (
        _unavailable_reason(backend.name, device)
        or backend.unsupported_reason(tensors, norm_type, summary)
        or (backend.overflow_safe_refusal(device) if overflow_safe else None)
        or (backend.operation_refusal(operation, device) if operation else None)
    )


def select_backend(
    backend: str,
    tensors: list[torch.Tensor],
    norm_type: float | None,
    summary: TensorSummary | None = None,
    overflow_safe: bool = False,
    operation: str | None = None,
) -> Backend:
    """The backend that runs this call.

    Args:
        backend: ``"auto"`` or a backend name, as passed to the public function.
        tensors: the gradients (or tensors) the call works on; may be empty.
        norm_type: the parsed norm type, or None for operations without a norm.
        summary: :func:`fastclip._inputs.summarize` of ``tensors``, if the caller has it.
        overflow_safe: whether the call asks for the overflow-safe norm.
        operation: the backend method the call will use, for operations that not every fused backend
            has a kernel for on every device (see :meth:`Backend.operation_refusal`).

    Returns:
        The chosen :class:`~fastclip.backends.Backend`.

    Raises:
        ValueError: ``backend`` (or ``FASTCLIP_BACKEND``) is not a known name, or the named backend
            cannot serve these tensors; the message says why.
    """
    name = requested_backend(backend)
    if tensors and has_dtensors(tensors):
        # The norms take DTensors' local shards before they get here, and so do the elementwise
        # operations; what comes here with DTensors (AGC, per-tensor clipping) runs torch's own
        # operations on them, which do the collectives that the fused kernels cannot.
        if name not in ("auto", "torch"):
            raise ValueError(f"fastclip backend {name!r} cannot serve this call: DTensor gradients (the fused kernels "
                             "take plain tensors; backend 'torch' runs torch's DTensor operations)")
        return BACKENDS["torch"]
    summary = summary or summarize(tensors)
    if name != "auto":
        reason = _reason_not_served(BACKENDS[name], tensors, norm_type, summary, overflow_safe, operation)
        if reason is not None:
            raise ValueError(f"fastclip backend {name!r} cannot serve this call: {reason}")
        return BACKENDS[name]
    device_type = tensors[0].device.type if tensors else "cpu"
    for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
        if _reason_not_served(BACKENDS[candidate], tensors, norm_type, summary, overflow_safe, operation) is None:
            return BACKENDS[candidate]
    return BACKENDS["torch"]


def backend_status(device: str | torch.device) -> dict[str, str | None]:
    """For each backend, None if it can run on ``device`` on this machine, else the reason it cannot."""
    device = torch.device(device)
    return {name: (None if name == "torch" else b.unavailable_reason(device)) for name, b in BACKENDS.items()}
