"""``clip_grad_value_``: every backend bit-identical to ``torch.nn.utils.clip_grad_value_`` (clamping is
exact) on the layouts users hit, every float dtype alone and mixed, special values and bounds that no
16-bit dtype can represent; out-of-range bounds refused before anything is clamped."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from harness import assert_same, build, poison
from test_differential import DTYPE_CASES, SHAPE_CASES, _specs

# Exact zeros of both signs, values either side of every bound used with them, NaN and infinities.
SIGNED_ZERO_VALUES = [0.0, -0.0, -3.0, 3.0, 1e-3, -1e-3, 0.3, -0.3, math.inf, -math.inf, math.nan]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def signed_zero_params(device: str = "cpu") -> list[torch.nn.Parameter]:
    """Parameters of every float dtype whose gradients hold SIGNED_ZERO_VALUES six times over: fp32
    and fp64 in a contiguous and a transposed (dense) gradient each, fp16 and bf16 in a contiguous
    and a strided (not dense) one each, which sends torch's CUDA foreach clamps of those two dtypes
    down their per-tensor route and those of the other two down their fused route."""
    values = torch.tensor(SIGNED_ZERO_VALUES * 6, dtype=torch.float64)
    params = []
    for dtype in FLOAT_DTYPES:
        base = values.to(dtype).to(device)
        if dtype in (torch.float32, torch.float64):
            second = base.clone().reshape(6, 11).t()
        else:
            second = torch.stack([base, -base], 1)[:, 0]
        for g in (base, second):
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype, device=device))
            p.grad = g
            params.append(p)
    return params


# 0.3 is representable in no dtype here (each rounds it its own way), 1e-30 is 0 in fp16 (so the
# interval is [-0, 0]) but not in bf16, 65504 is fp16's largest finite value.
CLIP_VALUES = [0.3, 1.0, 1e-30, 0.0, 65504.0, math.inf, torch.tensor(0.25)]


def _both(specs, clip_value, backend, poisoned=()):
    mine, _ = build(specs)
    ref, _ = build(specs)
    poison(mine, list(poisoned))
    poison(ref, list(poisoned))
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    assert fastclip.clip_grad_value_(mine, clip_value, backend=backend) is None
    for i, (p, r) in enumerate(zip(mine, ref)):
        if r.grad is not None:
            assert_same(p.grad, r.grad, f"gradient {i}")
    return mine


@pytest.mark.parametrize("clip_value", CLIP_VALUES, ids=str)
@pytest.mark.parametrize("dtype", DTYPE_CASES)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_value_clipping_equals_torch(backend, case, dtype, clip_value):
    _both(_specs(case, dtype), clip_value, backend)


@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_special_values_are_clamped_or_kept_as_torch_does(backend, dtype):
    """inf and -inf clamp to the bounds, NaN stays NaN, in the scalar tail and in the vector body."""
    specs = _specs("boundaries_65536", dtype)
    where = [(0, 5, math.nan), (0, 65534, math.inf), (1, 0, -math.inf), (1, 65535, math.nan), (2, 65536, math.inf)]
    mine = _both(specs, 0.3, backend, where)
    assert mine[0].grad[5].isnan() and mine[1].grad[65535].isnan()


def test_values_already_inside_are_left_alone(backend):
    """A clip value above every gradient changes nothing (and the gradients equal torch's)."""
    specs = _specs("boundaries_65536", "mixed")
    mine = _both(specs, 1e4, backend)
    expected, _ = build(specs)
    for p, e in zip(mine, expected):
        assert_same(p.grad, e.grad, "gradient")


def test_a_bound_beyond_a_dtype_is_refused_before_anything_changes(backend):
    """torch raises for a clip value fp16 cannot hold, after clamping the groups it reached first;
    fastclip raises before clamping any."""
    mine, _ = build(_specs("many_tensors", "mixed"))
    before = [p.grad.clone() for p in mine]
    with pytest.raises(RuntimeError, match="without overflow"):
        fastclip.clip_grad_value_(mine, 1e5, backend=backend)
    for p, b in zip(mine, before):
        assert_same(p.grad, b, "gradient")
    ref, _ = build(_specs("many_tensors", "mixed"))
    with pytest.raises(RuntimeError, match="without overflow"):
        torch.nn.utils.clip_grad_value_(ref, 1e5)


def test_cpp_backend_clamps_in_one_kernel_call():
    """All dtypes together: one call of the extension's op on CPU, torch's foreach clamps not at all."""
    from conftest import require_backend

    require_backend("cpp")
    mine, _ = build(_specs("many_tensors", "mixed"))
    with torch.autograd.profiler.profile() as profile:
        fastclip.clip_grad_value_(mine, 0.3, backend="cpp")
    clamps = [e.name for e in profile.function_events if "clamp" in e.name]
    assert clamps == ["fastclip::clamp_values_"], clamps


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach_none", "foreach_false"])
@pytest.mark.parametrize("clip_value", [0.0, 1e-30, 0.3, 65504.0], ids=str)
def test_signed_zeros_are_torchs(backend, clip_value, foreach):
    """Zeros keep or take the sign torch gives them (clip_value 0 clamps -3 to -0.0 on CPU), dense and
    strided gradients of every dtype in one call; tests/test_cuda.py checks the same on CUDA, where
    torch's routes differ."""
    mine, ref = signed_zero_params(), signed_zero_params()
    torch.nn.utils.clip_grad_value_(ref, clip_value, foreach=foreach)
    fastclip.clip_grad_value_(mine, clip_value, foreach=foreach, backend=backend)
    for i, (p, r) in enumerate(zip(mine, ref)):
        assert_same(p.grad, r.grad, f"gradient {i} ({r.grad.dtype})")


def _foreach_fused_route_reference(g: torch.Tensor, clip_value: float) -> torch.Tensor:
    """torch's CUDA _foreach_clamp_min_(-c) then _foreach_clamp_max_(c) on their fused route, written
    out: in float (double for fp64) with the bound as a float, keep x if NaN or above the lower bound,
    else the bound; store; then likewise below the upper bound."""
    math_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    lo = torch.tensor(-clip_value, dtype=torch.float64).to(math_dtype)
    hi = torch.tensor(clip_value, dtype=torch.float64).to(math_dtype)
    x = g.to(math_dtype)
    y = torch.where(x.isnan() | (x > lo), x, lo).to(g.dtype).to(math_dtype)
    return torch.where(y.isnan() | (y < hi), y, hi).to(g.dtype)


@pytest.mark.parametrize("clip_value", [0.0, 1e-30, 0.3], ids=str)
def test_triton_fused_route_arithmetic_under_the_interpreter(clip_value):
    """The Triton kernel's fused-route arithmetic, which torch (and so the operator) uses on CUDA
    alone, run here under the interpreter against the route written out: with clip_value 0 every
    element but NaN becomes +0.0."""
    from conftest import require_backend

    require_backend("triton")
    import fastclip.triton_kernels.value_clip as value_clip

    grads = [p.grad for p in signed_zero_params()]
    expected = [_foreach_fused_route_reference(g, clip_value) for g in grads]
    value_clip.clamp_on_routes_(grads, clip_value, fused_routes=dict.fromkeys(FLOAT_DTYPES, True))
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_same(g, e, f"gradient {i} ({g.dtype})")
    if clip_value == 0.0:
        assert all(not g[~g.isnan()].signbit().any() for g in grads)
