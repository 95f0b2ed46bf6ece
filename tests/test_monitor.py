"""``ClipMonitor`` and ``clip_with_tensor_norms_``: the statistics over recorded norms, and per-tensor
norms from the clipping pass that are torch's per-tensor norms."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from harness import GradSpec, assert_same, build


def test_statistics_of_recorded_norms():
    monitor = fastclip.ClipMonitor(max_norm=1.0, window=3, spike_factor=3.0)
    values = [0.5, 0.5, 2.0, 0.5, 10.0, math.inf, 1.0, math.nan, 0.2]
    for v in values:
        monitor.record(torch.tensor(v, dtype=torch.float64))
    assert monitor.steps == len(values)
    norms = monitor.norms
    assert norms[:7] == values[:7] and math.isnan(norms[7]) and norms[8] == 0.2
    # Coefficient min(1 / (n + 1e-6), 1) < 1: 2.0, 10.0, inf, 1.0 (1 / 1.000001 < 1) clip; NaN does
    # not compare below 1, so it counts as not clipped, as torch's clamp keeps NaN.
    assert monitor.clipped == [False, False, True, False, True, True, True, False, False]
    assert monitor.clip_fraction == 4 / 9
    # Step 2: 2.0 > 3 * 0.5; step 4: 10 > 3 * mean(0.5, 2.0, 0.5); steps 5 and 7 are not finite.
    assert monitor.spikes == [2, 4, 5, 7]
    assert not monitor.is_spike
    assert monitor.running_mean == pytest.approx((1.0 + 0.2) / 2)  # last 3 steps, NaN left out
    monitor.record(torch.tensor(5.0))  # 5 > 3 * mean(1.0, 0.2)
    assert monitor.is_spike and monitor.spikes[-1] == 9


def test_long_history_crosses_device_buffers():
    monitor = fastclip.ClipMonitor(max_norm=1.0)
    values = [float(i % 997) / 7 for i in range(10_000)]
    for i, v in enumerate(values):
        monitor.record(torch.tensor(v, dtype=torch.float64))
        if i in (100, 4095, 4096, 8191):  # reads in between must not lose or repeat steps
            assert monitor.norms == values[: i + 1]
    assert monitor.norms == values


def test_monitor_clips_like_clip_(backend):
    specs = [GradSpec((100,)), GradSpec((7, 3), torch.bfloat16), GradSpec((1000,), values="none")]
    params, _ = build(specs, seed=1)
    reference, _ = build(specs, seed=1)
    monitor = fastclip.ClipMonitor(max_norm=0.5, backend=backend)
    norm = monitor.clip_(params)
    expected = fastclip.clip_(reference, 0.5, backend=backend)
    assert_same(norm, expected, "norm")
    for p, q in zip(params, reference):
        if p.grad is not None:
            assert_same(p.grad, q.grad, "gradient")
    assert monitor.norms == [float(expected)]


@pytest.mark.parametrize("norm_type", [math.inf, 2.0], ids=str)
def test_tensor_norms_are_torchs_per_tensor_norms(backend, norm_type):
    """From the clipping pass itself; bit-identical to torch's per-tensor norms where the arithmetic
    is exact (the inf norm, E2; dyadic values with the L2 norm, E4), and on every input for the
    torch backend (E1)."""
    values = "randn" if norm_type == math.inf else "dyadic"
    specs = [GradSpec((100,), values=values), GradSpec((70_000,), torch.bfloat16, values=values),
             GradSpec((0,)), GradSpec((), torch.float64, values=values), GradSpec((5, 4), values="none"),
             GradSpec((3, 5), torch.float16, "transposed", values=values)]
    if norm_type == math.inf:
        specs.remove(GradSpec((0,)))  # the inf norm of an empty tensor is an error, as in torch
    params, _ = build(specs, seed=2)
    reference, _ = build(specs, seed=2)
    monitor = fastclip.ClipMonitor(max_norm=0.5, norm_type=norm_type, tensor_norms=True, backend=backend)
    total = monitor.clip_(params)
    grads = [p.grad for p in reference if p.grad is not None]
    expected = torch.stack([torch.linalg.vector_norm(g, norm_type).double() for g in grads])
    assert_same(monitor.last_tensor_norms, expected, "per-tensor norms")
    assert_same(total, torch.nn.utils.clip_grad_norm_(reference, 0.5, norm_type), "total norm")
    for p, q in zip(params, reference):
        if p.grad is not None:
            assert_same(p.grad, q.grad, "gradient")


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.ClipMonitor(max_norm=-1.0)
    with pytest.raises(ValueError, match="window"):
        fastclip.ClipMonitor(max_norm=1.0, window=0)
    with pytest.raises(ValueError, match="spike_factor"):
        fastclip.ClipMonitor(max_norm=1.0, spike_factor=0.0)
    monitor = fastclip.ClipMonitor(max_norm=1.0, tensor_norms=True)
    with pytest.raises(ValueError, match="overflow_safe"):
        monitor.clip_([torch.zeros(3, requires_grad=True)], overflow_safe=True)
