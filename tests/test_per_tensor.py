"""``clip_per_tensor_`` and ``clip_per_group_``: each gradient (each group) clipped by its own norm, as
``torch.nn.utils.clip_grad_norm_`` called on it alone. Every backend's per-gradient norm is held to E5
(harness.py) against torch's norm of that gradient; the clipped gradients must be torch's scaling by
the norm fastclip returned, bit for bit (E3)."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from harness import assert_norm_error_bound, assert_same, build
from test_differential import CLIPPING, DTYPE_CASES, NOT_CLIPPING, SHAPE_CASES, _specs


@pytest.mark.parametrize("max_norm", [CLIPPING, NOT_CLIPPING], ids=["clips", "no_clip"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0], ids=str)
@pytest.mark.parametrize("dtype", DTYPE_CASES)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_each_gradient_clipped_as_clip_grad_norm_of_it_alone(backend, case, dtype, norm_type, max_norm):
    specs = _specs(case, dtype)
    if norm_type == math.inf and any(math.prod(s.shape) == 0 for s in specs):
        pytest.skip("torch refuses the inf norm of an empty tensor")
    mine, _ = build(specs)
    expected, _ = build(specs)
    pristine = [p.grad.clone() for p in mine]
    norms = fastclip.clip_per_tensor_(mine, max_norm, norm_type, backend=backend)
    assert norms.dtype == torch.float64 and norms.shape == (len(mine),)
    for i, (p, e, g) in enumerate(zip(mine, expected, pristine)):
        torch_norm = torch.nn.utils.get_total_norm([g], norm_type)
        assert_norm_error_bound(norms[i].to(torch_norm.dtype), torch_norm, [g], norm_type)
        assert float(norms[i]) == float(norms[i].to(g.dtype))  # rounded to the gradient's dtype, as torch's
        torch.nn.utils.clip_grads_with_norm_([e], max_norm, norms[i].to(torch_norm.dtype))
        assert_same(p.grad, e.grad, f"gradient {i}")


def test_none_gradients_are_skipped_and_nothing_is_refused_half_way(backend):
    params, _ = build(_specs("scalars", "float32"))
    params[1].grad = None
    norms = fastclip.clip_per_tensor_(params, 0.1, backend=backend)
    assert norms.shape == (2,)
    assert fastclip.clip_per_tensor_([torch.nn.Parameter(torch.zeros(2))], 1.0).shape == (0,)
    before = [p.grad.clone() if p.grad is not None else None for p in params]
    with pytest.raises(ValueError):
        fastclip.clip_per_tensor_(params, -1.0, backend=backend)
    assert all(b is None or torch.equal(p.grad, b) for p, b in zip(params, before))


def test_groups_each_clipped_by_their_own_norm(backend):
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW([
        {"params": model[0].parameters(), "max_norm": 0.5},
        {"params": model[1].parameters()},
        {"params": model[2].parameters(), "max_norm": 100.0},
    ])
    norms = fastclip.clip_per_group_(optimizer.param_groups, 1.0, backend=backend)
    grads = list(model.parameters())
    groups = [(grads[:1], 0.5), (grads[1:3], 1.0), (grads[3:], 100.0)]
    start = 0
    for (group, bound), norm in zip(groups, norms):
        refs = [torch.nn.Parameter(torch.zeros_like(p)) for p in group]
        for r, g in zip(refs, reference[start:start + len(group)]):
            r.grad = g.clone()
        start += len(group)
        expected = fastclip.clip_(refs, bound, backend=backend)
        assert_same(norm, expected, "group norm")
        for p, r in zip(group, refs):
            assert_same(p.grad, r.grad, "gradient")


def test_a_bad_group_is_refused_before_any_group_is_clipped():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.full((3,), 10.0), torch.full((3,), 10.0)
    with pytest.raises(ValueError, match=r"param_groups\[1\] max_norm"):
        fastclip.clip_per_group_([{"params": [a]}, {"params": [b], "max_norm": -1.0}], 1.0)
    assert torch.equal(a.grad, torch.full((3,), 10.0))


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=str)
def test_error_if_nonfinite_raises_before_any_gradient_changes(backend, value):
    params, _ = build(_specs("many_tensors", "mixed"))
    params[7].grad.view(-1)[0] = value
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="gradient 7 .*non-finite"):
        fastclip.clip_per_tensor_(params, 1e-3, error_if_nonfinite=True, backend=backend)
    for p, b in zip(params, before):
        assert_same(p.grad, b, "a gradient changed before the error")
    params[7].grad.view(-1)[0] = 1.0
    expected, _ = build(_specs("many_tensors", "mixed"))
    expected[7].grad.view(-1)[0] = 1.0
    norms = fastclip.clip_per_tensor_(params, 1e-3, error_if_nonfinite=True, backend=backend)
    assert torch.equal(norms, fastclip.clip_per_tensor_(expected, 1e-3, backend=backend))
    for p, e in zip(params, expected):
        assert_same(p.grad, e.grad, "finite gradients, checked or not")


@pytest.mark.parametrize("fused", ["cpp", "triton"])  # opaque ops: compiled must equal eager bit for bit
def test_compiled_per_tensor_clipping_equals_eager(fused):
    from conftest import require_backend

    require_backend(fused)
    torch._dynamo.reset()
    eager, _ = build(_specs("many_tensors", "mixed"))
    compiled_params, _ = build(_specs("many_tensors", "mixed"))
    step = torch.compile(lambda ps: fastclip.clip_per_tensor_(ps, 1e-3, backend=fused), fullgraph=True)
    assert torch.equal(step(compiled_params), fastclip.clip_per_tensor_(eager, 1e-3, backend=fused))
    for p, e in zip(compiled_params, eager):
        assert_same(p.grad, e.grad, "compiled against eager")
