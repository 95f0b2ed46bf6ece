"""``adaptive_clip_grad_`` against timm's ``adaptive_clip_grad`` (its own file, loaded from the installed
timm 1.0.31 without importing the package, which needs torchvision) and against float64 arithmetic.

Exactness: timm computes every step in the tensor's dtype, so where the unit norms are exact (dyadic
rows such as (3, 4) * 2^-k) every backend must give timm's bits. On random data the norms differ in
their last bit (fastclip accumulates in double, torch in its own order), so the clipped gradients are
bounded against the exact formula in float64 instead: each result is at most 8 roundings of the
dtype from it (two norms, the limit product, the division, the final product, each within one
rounding, with margin; for float64 gradients also the float64 reference's own summation error);
timm, whose float32 norms of long rows are further off, must clip the same units. Units are built away from the clipping boundary (||G|| at 0.5x or 2x to 5x the limit), so
no decision is a tie.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import fastclip
from test_step import _NoHostReads

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SHAPES = [(64, 32), (32,), (16, 3, 3, 3), (), (10, 0), (0,), (5, 70_000), (1, 7)]


def timm_adaptive_clip_grad():
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed (scripts/setup-env.sh installs it with --no-deps)")
    path = os.path.join(spec.submodule_search_locations[0], "utils", "agc.py")
    module_spec = importlib.util.spec_from_file_location("timm_agc_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


def _units(shape):
    return 1 if len(shape) <= 1 else shape[0]


def _params(shapes, dtype, seed: int, layout: str = "contiguous", exact: bool = False):
    """Parameters with gradients whose unit norms sit at 0.5x, 2x or 5x their AGC limit (clip_factor
    0.01, eps 1e-3), cycling over the units. ``exact``: every unit is (3, 4, 0, ...) times a power of
    two, so every norm is exact in every dtype and any order."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for index, shape in enumerate(shapes):
        numel = math.prod(shape)
        units = _units(shape)
        size = numel // units if units else 0
        if exact:
            base = torch.zeros(units, size, dtype=torch.float64)
            if size >= 2:
                base[:, 0], base[:, 1] = 3.0, 4.0
            elif size == 1:
                base[:, 0] = 5.0
            scales = 2.0 ** -torch.randint(0, 6, (units, 1), generator=g).double()
            p = base * scales
            # limit = 0.01 * 5 * scale (norms >= 5/32 > eps); a gradient of base * scale * 2^-m has
            # ||G|| / limit = 100 * 2^-m: 0.39 (m = 8, kept), 1.56 and 3.1 (m = 6, 5, clipped)
            shifts = torch.tensor([8.0, 6.0, 5.0])[(torch.arange(units) + index) % 3].double().reshape(units, 1)
            grad = base * scales * 2.0 ** -shifts
        else:
            p = torch.randn(units, size, generator=g, dtype=torch.float64) * 0.1
            p[::4] *= 1e-4  # some units below eps: the limit is then 0.01 * eps
            direction = torch.randn(units, size, generator=g, dtype=torch.float64)
            ratios = torch.tensor([0.5, 2.0, 5.0])[(torch.arange(units) + index) % 3].double().reshape(units, 1)
            limits = p.norm(dim=1, keepdim=True).clamp(min=1e-3) * 0.01
            grad = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-300) * limits * ratios
        param = torch.nn.Parameter(p.reshape(shape).to(dtype))
        grad = grad.reshape(shape).to(dtype)
        if layout == "transposed" and len(shape) >= 2:
            grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
        elif layout == "channels_last" and len(shape) == 4:
            grad = grad.contiguous(memory_format=torch.channels_last)
        param.grad = grad
        params.append(param)
    return params


def _clone(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone() if p.grad is not None else None
        out.append(q)
    return out


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_timm_where_the_norms_are_exact(backend, dtype, layout):
    reference = timm_adaptive_clip_grad()
    mine = _params(SHAPES, dtype, seed=1, layout=layout, exact=True)
    theirs = _clone(mine)
    before = [p.grad.clone() for p in mine]
    fastclip.adaptive_clip_grad_(mine, backend=backend)
    reference(theirs)
    changed = 0
    for i, (a, b, was) in enumerate(zip(mine, theirs, before)):
        assert a.grad.stride() == was.stride(), f"tensor {i}: the gradient's layout changed"
        assert torch.equal(a.grad, b.grad), f"tensor {i} ({tuple(a.shape)}, {dtype})"
        changed += not torch.equal(a.grad, was)
    assert changed >= 4  # clipping happened


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_units_within_8_roundings_of_float64(backend, dtype):
    reference = timm_adaptive_clip_grad()
    mine = _params(SHAPES, dtype, seed=2)
    theirs = _clone(mine)
    exact = [(p.detach().double().clone(), p.grad.double().clone()) for p in mine]  # copies even for fp64
    fastclip.adaptive_clip_grad_(mine, backend=backend)
    reference(theirs)
    for i, ((p, g), a, b) in enumerate(zip(exact, mine, theirs)):
        if g.numel() == 0:
            continue
        if backend == "torch":  # no fused kernel: timm's arithmetic with torch ops, so timm's bits
            assert torch.equal(a.grad, b.grad), f"tensor {i}"
            continue
        if g.ndim <= 1:
            limit = p.norm().clamp(min=1e-3) * 0.01
            norm = g.norm()
        else:
            dims = tuple(range(1, g.ndim))
            limit = torch.linalg.vector_norm(p, dim=dims, keepdim=True).clamp(min=1e-3) * 0.01
            norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        expected = torch.where(norm < limit, g, g * (limit / norm.clamp(min=1e-6)))
        error = (a.grad.double() - expected).abs()
        subnormal_spacing = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # fp16 units of 1e-6 are subnormal
        # The float64 reference's own norms carry up to n roundings of float64 (Higham's bound for a
        # sum of n terms): nothing against float32 and below, but for float64 gradients it is the bound.
        reference_error = 2 * (g.numel() // _units(tuple(g.shape))) * 2.0**-53 if dtype == torch.float64 else 0.0
        relative = 8 * ROUNDOFF[dtype] + reference_error
        assert bool((error <= relative * expected.abs() + 8 * subnormal_spacing).all()), \
            f"tensor {i}: {float((error / expected.abs()).max())} relative"
        # timm's norms accumulate in its own order (on a 70,000-element row, 13 float32 roundings
        # off), so it is not held to that bound; it must clip the same units.
        units = _units(tuple(g.shape))
        original = g.to(dtype).reshape(units, -1)
        changed_here = (a.grad.reshape(units, -1) != original).any(dim=1)
        changed_there = (b.grad.reshape(units, -1) != original).any(dim=1)
        assert torch.equal(changed_here, changed_there), f"tensor {i}: other units clipped than timm's"


def test_many_tensors_mixed_dtypes_and_missing_gradients(backend):
    reference = timm_adaptive_clip_grad()
    shapes = [(i % 5 + 1, 3) for i in range(130)]
    mine = []
    for i, dtype in enumerate([torch.float32, torch.bfloat16] * 65):
        mine += _params([shapes[i]], dtype, seed=i, exact=True)
    mine[7].grad = None
    theirs = _clone(mine)
    fastclip.adaptive_clip_grad_(mine, backend=backend)
    reference(theirs)
    assert mine[7].grad is None
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, theirs) if a.grad is not None)


def test_other_norm_types_run_timms_arithmetic(backend):
    reference = timm_adaptive_clip_grad()
    for norm_type in (1.0, math.inf):
        mine = _params([(8, 5), (5,)], torch.float32, seed=3)
        theirs = _clone(mine)
        fastclip.adaptive_clip_grad_(mine, norm_type=norm_type, backend=backend)
        reference(theirs, norm_type=norm_type)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, theirs))


def test_bad_arguments_are_refused_before_anything_changes():
    params = _params([(8, 5), (5,)], torch.float32, seed=4)
    before = [p.grad.clone() for p in params]
    bad_param = torch.nn.Parameter(torch.zeros(3, 2))
    bad_param.grad = torch.zeros(3, 2)
    bad_param.data = torch.zeros(2, 3)  # swapped under its gradient, as wrappers that flatten parameters do
    for kwargs in ({"clip_factor": 0.0}, {"clip_factor": -1.0}, {"clip_factor": math.nan}, {"eps": 0.0},
                   {"eps": math.inf}, {"norm_type": 0.0}, {"norm_type": "l2"}):
        with pytest.raises(ValueError):
            fastclip.adaptive_clip_grad_(params, **kwargs)
    with pytest.raises(ValueError, match="differ"):
        fastclip.adaptive_clip_grad_(params + [bad_param])
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


@pytest.mark.parametrize("fused", ["cpp", "triton"])
def test_no_host_read_and_compiled_equals_eager(fused):
    from conftest import require_backend

    require_backend(fused)
    params = _params(SHAPES, torch.float32, seed=5)
    with _NoHostReads():
        fastclip.adaptive_clip_grad_(params, backend=fused)
    torch._dynamo.reset()
    eager, compiled_params = _params(SHAPES, torch.float32, seed=6), _params(SHAPES, torch.float32, seed=6)
    step = torch.compile(lambda ps: fastclip.adaptive_clip_grad_(ps, backend=fused), fullgraph=True)
    fastclip.adaptive_clip_grad_(eager, backend=fused)
    step(compiled_params)
    clipped = sum(not torch.equal(a.grad, b.grad) for a, b in zip(eager, _params(SHAPES, torch.float32, seed=6)))
    assert clipped >= 4  # the compiled call has something to get right
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(eager, compiled_params))
