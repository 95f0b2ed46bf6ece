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


@pytest.mark.parametrize("norm_type", [math.inf, 2.0], ids=str)
def test_get_tensor_norms_measures_without_writing(backend, norm_type):
    """get_tensor_norms: the per-tensor norms torch computes (exact cases as above), the total
    get_total_norm gives (the same backend's bits), and not one gradient written, even when one holds
    NaN and another inf (a clip by that total would make every gradient NaN)."""
    values = "randn" if norm_type == math.inf else "dyadic"
    specs = [GradSpec((100,), values=values), GradSpec((70_000,), torch.bfloat16, values=values),
             GradSpec((3, 5), torch.float16, "transposed", values=values), GradSpec((), torch.float64, values=values),
             GradSpec((40,), values=values)]
    params, _ = build(specs, seed=3)
    grads = [p.grad for p in params]
    grads[0][7] = math.nan
    grads[4][1] = -math.inf
    before = [g.clone() for g in grads]
    total, norms = fastclip.get_tensor_norms(grads, norm_type, backend=backend)
    for g, b in zip(grads, before):
        assert_same(g, b, "gradient (must not be written)")
    expected = torch.stack([torch.linalg.vector_norm(g, norm_type).double() for g in before])
    assert_same(norms, expected, "per-tensor norms")
    assert_same(total, fastclip.get_total_norm(grads, norm_type, backend=backend), "total norm")
    # The finite gradients alone: their norms are the same values, the total finite.
    finite_total, finite_norms = fastclip.get_tensor_norms(grads[1:4], norm_type, backend=backend)
    assert_same(finite_norms, expected[1:4], "per-tensor norms of the finite gradients")
    assert_same(finite_total, torch.nn.utils.get_total_norm(before[1:4], norm_type), "finite total")


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


def test_suggest_max_norm_is_a_percentile_of_the_recorded_norms():
    monitor = fastclip.ClipMonitor(max_norm=1.0)
    norms = [float(v) for v in torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10]
    norms[50] = math.inf  # non-finite norms are left out
    for n in norms:
        monitor.record(torch.tensor(n, dtype=torch.float64))
    finite = torch.tensor([n for n in norms if math.isfinite(n)], dtype=torch.float64)
    for percentile, name in ((90, "conservative"), (75, "moderate"), (50, "aggressive")):
        expected = float(torch.quantile(finite, percentile / 100))
        assert monitor.suggest_max_norm(percentile) == expected == monitor.suggest_max_norm(name)
        # numpy.percentile's default (linear) by hand: the rank percentile / 100 * (n - 1)
        ordered = sorted(finite.tolist())
        rank = percentile / 100 * (len(ordered) - 1)
        low, frac = int(rank), rank - int(rank)
        assert expected == pytest.approx(ordered[low] + frac * (ordered[low + 1] - ordered[low]), rel=1e-15)
    assert monitor.suggest_max_norm(100, last=10) == max(n for n in norms[-10:])
    for bad in (0, 101, "wild", True):
        with pytest.raises(ValueError):
            monitor.suggest_max_norm(bad)
    with pytest.raises(ValueError, match="no finite"):
        fastclip.ClipMonitor(max_norm=1.0).suggest_max_norm()


def test_layer_breakdown_names_the_gradients_that_dominate(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].weight.grad.fill_(3.0)  # sqrt(24) * 3 = 14.7: dominant
    model[0].bias.grad.fill_(1.0)  # sqrt(8)
    model[1].bias.grad = None  # no gradient: not listed
    monitor = fastclip.ClipMonitor(max_norm=1e6, tensor_norms=True, backend=backend)
    monitor.clip_(model.named_parameters())
    rows = monitor.layer_breakdown()
    assert [name for name, _, _ in rows] == ["1.weight", "0.bias", "0.weight"]
    assert rows[0][1] == pytest.approx(3 * math.sqrt(24)) and rows[2][1] == 0.0
    assert rows[0][2] == pytest.approx(216 / (216 + 8)) and sum(share for _, _, share in rows) == pytest.approx(1.0)
    assert monitor.layer_breakdown(top=1) == rows[:1]
    with pytest.raises(RuntimeError, match="tensor_norms=True"):
        fastclip.ClipMonitor(max_norm=1.0).layer_breakdown()


def test_log_dict_plot_and_state_dict(tmp_path):
    monitor = fastclip.ClipMonitor(max_norm=1.0, window=3)
    for v in (0.5, 0.5, 2.0, 0.4, math.nan, 0.6):
        monitor.record(torch.tensor(v, dtype=torch.float64))
    logged = monitor.log_dict()
    assert logged["grad_norm/last"] == 0.6 and logged["grad_norm/clip_fraction"] == 1 / 6
    assert logged["grad_norm/spikes"] == 2.0 and logged["grad_norm/is_spike"] == 0.0  # 2.0 and NaN
    assert logged["grad_norm/running_mean"] == pytest.approx(0.5) and set(monitor.log_dict("g/")) == {
        "g/last", "g/running_mean", "g/clip_fraction", "g/spikes", "g/is_spike", "g/max_norm"}
    path = monitor.plot(str(tmp_path / "norms.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    resumed = fastclip.ClipMonitor(max_norm=1.0, window=3)
    resumed.load_state_dict(monitor.state_dict())
    for m in (monitor, resumed):
        m.record(torch.tensor(5.0, dtype=torch.float64))  # a spike against the same history
    assert resumed.spikes == monitor.spikes and resumed.clipped == monitor.clipped
    assert str(resumed.norms) == str(monitor.norms)  # NaN included
    with pytest.raises(ValueError, match="window"):
        fastclip.ClipMonitor(max_norm=1.0, window=4).load_state_dict(monitor.state_dict())


def test_recording_a_step_reads_nothing_on_the_host():
    from test_step import _NoHostReads

    monitor = fastclip.ClipMonitor(max_norm=1.0, tensor_norms=True)
    model = torch.nn.Linear(4, 2)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        with _NoHostReads():
            monitor.clip_(model.named_parameters())
    assert monitor.steps == 3 and len(monitor.norms) == 3
