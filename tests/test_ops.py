"""The registered operators themselves (torch.ops.fastclip.*): torch.library.opcheck verifies that
their schemas tell the truth about mutation, that the fake (meta) kernels agree with the real ones,
and that they trace through AOT autograd with dynamic shapes, on every device with kernels here."""

from __future__ import annotations

import pytest
import torch

import fastclip  # noqa: F401  (loads the extension)
from conftest import require_backend

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _tensors(device: str) -> list[torch.Tensor]:
    return [
        torch.randn(5, 3, device=device),
        torch.randn(70_000, dtype=torch.bfloat16, device=device),
        torch.randn((), dtype=torch.float64, device=device),
        torch.randn(4, 6, device=device).t(),
    ]


def _cases(device: str):
    tensors = _tensors(device)
    norm = torch.tensor(3.0, device=device)
    return [
        (torch.ops.fastclip.total_norm.default, (tensors, 2.0)),
        (torch.ops.fastclip.total_norm.default, (tensors, float("inf"))),
        (torch.ops.fastclip.clip_.default, (tensors, 0.1, 2.0)),
        (torch.ops.fastclip.clip_.default, (tensors, 1e9, 1.0)),
        (torch.ops.fastclip.scale_with_norm_.default, (tensors, 0.1, norm)),
        (torch.ops.fastclip.total_norm.default, (tensors, 3.0, True)),
        (torch.ops.fastclip.clip_.default, (tensors, 0.1, 2.0, True)),
        (torch.ops.fastclip.clip_with_tensor_norms_.default, (tensors, 0.1, 2.0)),
        (torch.ops.fastclip.clamp_values_.default, (tensors, 0.3)),
        (torch.ops.fastclip.tensor_norms.default, (tensors, 2.0)),
        (torch.ops.fastclip.tensor_norms.default, (tensors, float("inf"))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(11))
def test_opcheck(device, case):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    if device == "cuda" and case in (5, 6):
        pytest.skip("the CUDA kernel has no overflow-safe variant (the Triton backend serves it)")
    require_backend("cpp", device)  # also registers the fake kernels
    op, args = _cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op", ["clip_with_tensor_norms_", "tensor_norms"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_tensor_norms_are_a_tensor_of_their_own(device, op):
    """The ops that return per-tensor norms return them as a fresh tensor, as their fake kernels
    do: not a view into the kernel's scratch (storage offset, aliasing, and the whole scratch
    kept alive as long as the norms are)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    require_backend("cpp", device)
    tensors = _tensors(device)
    args = (tensors, 0.1, 2.0) if op == "clip_with_tensor_norms_" else (tensors, 2.0)
    _, norms = getattr(torch.ops.fastclip, op).default(*args)
    assert norms.shape == (len(tensors),) and norms.dtype == torch.float64
    assert norms.storage_offset() == 0, norms.storage_offset()
    assert norms.untyped_storage().nbytes() == len(tensors) * 8, norms.untyped_storage().nbytes()


def test_opcheck_clip_per_tensor_on_cpu():
    require_backend("cpp")
    torch.library.opcheck(torch.ops.fastclip.clip_per_tensor_.default, (_tensors("cpu"), 0.1, 2.0))


def test_opcheck_adaptive_clip_on_cpu():
    """AGC's fused kernel is CPU-only: its op, checked like the others."""
    require_backend("cpp")
    params = [torch.randn(5, 3), torch.randn(70_000, dtype=torch.bfloat16), torch.randn((), dtype=torch.float64),
              torch.randn(4, 6).t().contiguous()]
    grads = [torch.randn_like(p) for p in params[:3]] + [torch.randn(4, 6).t()]
    torch.library.opcheck(torch.ops.fastclip.adaptive_clip_.default, (params, grads, 0.01, 1e-3))
