"""``unscale_clip_``: the same as ``scaler.unscale_(optimizer)`` then ``clip_grad_norm_`` (E1 for the
torch backend; E3 and E5 for the fused ones), Inf/NaN recorded so that ``scaler.step`` skips."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from harness import assert_norm_error_bound, assert_same


def _setup(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    scaler.scale(model(x).square().sum() * 10).backward()
    return model, optimizer, scaler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
def test_same_as_unscale_then_clip(backend, norm_type, dtype):
    model, optimizer, scaler = _setup(0, dtype)
    ref_model, ref_optimizer, ref_scaler = _setup(0, dtype)
    scaled = [p.grad.clone() for p in model.parameters()]
    norm = fastclip.unscale_clip_(scaler, optimizer, 0.5, norm_type, backend=backend)

    ref_scaler.unscale_(ref_optimizer)
    unscaled = [p.grad.clone() for p in ref_model.parameters()]
    expected = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5, norm_type)
    if backend == "torch" or math.isinf(norm_type):  # E1 / E2: torch's bits
        assert_same(norm, expected, "norm")
    else:  # E5, and E3 below
        assert_norm_error_bound(norm, expected, unscaled, norm_type)
        for p, u in zip(ref_model.parameters(), unscaled):
            p.grad = u.clone()
        torch.nn.utils.clip_grads_with_norm_(ref_model.parameters(), 0.5, norm)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_same(p.grad, q.grad, "gradient")
    assert any(not torch.equal(p.grad, s) for p, s in zip(model.parameters(), scaled))
    for s, o in ((scaler, optimizer), (ref_scaler, ref_optimizer)):
        s.step(o)
        s.update()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_same(p, q, "parameter after the step")
    assert scaler.get_scale() == ref_scaler.get_scale()


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=str)
def test_inf_or_nan_skips_the_step(backend, value):
    model, optimizer, scaler = _setup(1)
    next(model.parameters()).grad[0, 0] = value
    before = [p.detach().clone() for p in model.parameters()]
    norm = fastclip.unscale_clip_(scaler, optimizer, 0.5, backend=backend)
    assert not math.isfinite(float(norm))
    scaler.step(optimizer)
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert_same(p.detach(), b, "parameter after a skipped step")
    assert scaler.get_scale() == 2.0**13  # backed off, as after unscale_ + a skipped step


def test_misuse_raises_like_unscale_(backend):
    model, optimizer, scaler = _setup(2)
    fastclip.unscale_clip_(scaler, optimizer, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="already been called"):
        fastclip.unscale_clip_(scaler, optimizer, 0.5, backend=backend)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        fastclip.unscale_clip_(scaler, optimizer, 0.5, backend=backend)


def test_bad_max_norm_is_refused_before_anything_changes(backend):
    model, optimizer, scaler = _setup(3)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.unscale_clip_(scaler, optimizer, -1.0, backend=backend)
    for p, b in zip(model.parameters(), before):
        assert_same(p.grad, b, "gradient after a refused call")
    fastclip.unscale_clip_(scaler, optimizer, 0.5, backend=backend)  # the scaler's state is untouched


@pytest.mark.parametrize("norm_type", [0.0, -math.inf], ids=str)
def test_norms_without_a_fused_path_run_torchs_two_steps(norm_type):
    model, optimizer, scaler = _setup(4)
    ref_model, ref_optimizer, ref_scaler = _setup(4)
    norm = fastclip.unscale_clip_(scaler, optimizer, 0.5, norm_type)
    ref_scaler.unscale_(ref_optimizer)
    assert_same(norm, torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5, norm_type), "norm")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_same(p.grad, q.grad, "gradient")
