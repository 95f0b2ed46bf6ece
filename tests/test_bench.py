"""The benchmark's own machinery (not its timings: performance is measured by the benchmark, never
asserted in tests): model shapes match the real models' parameter counts, the correctness gate
rejects a wrong provider before anything is timed, and a tiny run produces every output."""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from bench import limits, report, run
from bench.workloads import (MIB, Workload, gpt2_shapes, llama_shapes, lstm_lm_shapes, make_grads, preset, resnet50_shapes,
                              with_dtype)


def _parameters(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def test_model_shapes_have_the_published_parameter_counts():
    assert _parameters(gpt2_shapes()) == 124_439_808  # GPT-2 small, tied output embedding
    assert _parameters(llama_shapes()) == 6_738_415_616  # LLaMA-7B
    assert _parameters(resnet50_shapes()) == 25_557_032  # torchvision resnet50
    lstm = torch.nn.LSTM(650, 650, num_layers=2)
    assert _parameters(lstm_lm_shapes()[1:-2]) == sum(p.numel() for p in lstm.parameters())


def test_quick_preset_contains_the_issue_targets_and_sweeps():
    names = [w.name for w in preset("quick", "cpu")]
    assert "8 x 8M fp32 (256 MiB)" in names and "2000 x 8K fp32" in names
    # the CPU-speed issue's 16-bit targets: bf16 and fp16, each a model of its own dtype
    targets = {workload for _, issue_targets in report.TARGETS.items() for _, workload, *_ in issue_targets}
    assert {"llama-style 4 layers bf16", "llama-style 4 layers fp16"} <= targets <= set(names)
    dtypes = {w.name: {dtype for _, dtype in w.spec} for w in preset("quick", "cpu")}
    assert dtypes["llama-style 4 layers bf16"] == {torch.bfloat16} and dtypes["llama-style 4 layers fp16"] == {torch.float16}
    groups = {w.group for w in preset("quick", "cpu")}
    assert groups == {"model", "target", "count sweep", "size sweep", "allocation order"}
    assert max(w.count for w in preset("quick", "cpu")) == 10_000


def test_backward_order_changes_where_gradients_lie_not_their_values():
    """(Where they lie is the allocator's business: not asserted, it depends on the heap's state.)"""
    spec = with_dtype([(100,)] * 50, torch.float32)
    forward, backward = make_grads(spec, "cpu"), make_grads(spec, "cpu", backward_order=True)
    assert all(torch.equal(f, b) for f, b in zip(forward, backward))


def test_correctness_gate_rejects_a_wrong_provider(monkeypatch):
    """A fastclip provider whose norm is 1% off must stop the benchmark before timing."""
    real = run.providers

    def with_a_wrong_one(device):
        table = real(device)
        table["fastclip wrong"] = lambda params, m: torch.nn.utils.clip_grad_norm_(params, m) * 1.01
        return table

    monkeypatch.setattr(run, "providers", with_a_wrong_one)
    workload = Workload("tiny", with_dtype([(100,), (7, 3)], torch.float32), "model", "float32")
    with pytest.raises(AssertionError, match="fastclip wrong"):
        run.bench_workload(workload, "cpu", 1, run.Timer("cpu"), _NoProgress())


class _NoProgress:
    def update(self, n):
        pass


def test_tiny_run_writes_every_output(tmp_path):
    workloads = [
        Workload("8 x 8M fp32 (256 MiB)", with_dtype([(1000,)] * 3, torch.float32), "target", "float32"),
        Workload("1 tensors, 1 MiB float32", with_dtype([(MIB // 4,)], torch.float32), "count sweep", "float32"),
        Workload("4 tensors, 1 MiB float32", with_dtype([(MIB // 16,)] * 4, torch.float32), "count sweep", "float32"),
        Workload("4 tensors, 2 MiB float32", with_dtype([(MIB // 8,)] * 4, torch.float32), "size sweep", "float32"),
    ]
    results = [run.bench_workload(w, "cpu", 2, run.Timer("cpu"), _NoProgress()) for w in workloads]
    text = report.markdown(results)
    assert text.count("| no clip |") == len(workloads) and text.count("| clip |") == len(workloads)
    assert "x fastclip cpp" in text
    assert "no clipping, 256 MiB in 8 tensors: % of one read" in text
    written = report.save(results, text, "test machine, 2 cores", "quick", str(tmp_path))
    assert [p.rsplit(".", 1)[1] for p in written] == ["csv", "md", "png"]
    rows = (tmp_path / "benchmarks.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(2 * len(r.providers()) for r in results)
    assert (tmp_path / written[2].rsplit("/", 1)[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_many_tensor_targets_report_the_limit_with_the_gradient_list(monkeypatch):
    """Building the gradient list is timed in the same rounds (no-clip step only), and a no-clip target
    on 1,000 tensors or more reports the limit of one read plus that list next to its figure, and the
    ceiling of one read alone."""
    # The baseline and the backend the targets name: the others (Triton's interpreter, torch's loop)
    # would take minutes on 1,000 tensors and add nothing to what this checks.
    real = run.providers
    monkeypatch.setattr(run, "providers", lambda device: {name: provider for name, provider in real(device).items()
                                                          if name in ("torch default", "fastclip cpp")})
    workload = Workload("2000 x 8K fp32", with_dtype([(8,)] * report.MANY_TENSORS, torch.float32), "target", "float32")
    result = run.bench_workload(workload, "cpu", 2, run.Timer("cpu"), _NoProgress())
    assert len(result.samples[(report.GRADIENT_LIST, "no clip")]) == 2
    assert (report.GRADIENT_LIST, "clip") not in result.samples
    limit = result.read_and_list()
    read = min(result.median(name, "no clip") for name in limits.READS)
    assert limit == read + result.median(report.GRADIENT_LIST, "no clip")
    lines = [line for line in report.targets([result]) if line.startswith("- no clipping, 2000 x 8K")]
    assert len(lines) == 2  # the C++ issue's target and the CPU-speed issue's
    assert all(f"one read + building the gradient list: {limit * 1e3:.3f} ms" in line for line in lines), lines
    ceiling = result.median("torch default", "no clip") / read
    assert all(f"one read alone: {read * 1e3:.3f} ms, {ceiling:.2f}x torch" in line for line in lines), lines
    assert "gradient list" not in report.markdown([result]).split("Targets of")[0]  # not a provider column


def test_streaming_limits_take_the_faster_read_and_restore_their_buffer():
    """One read is the faster reduction; a clip's limit adds the in-place multiply; the buffer is
    rewritten from its copy before every timed pass, as the gradients are before a provider's run."""
    medians = {"one read (sum)": 2.0, "one read (dot)": 1.5, limits.MULTIPLY: 3.0}
    assert set(medians) == {*limits.READS, limits.MULTIPLY}
    assert limits.one_read(medians.__getitem__) == 1.5
    assert limits.read_and_write(medians.__getitem__) == 4.5
    streaming = limits.StreamingLimits(4096, "cpu")
    source = streaming.flat.clone()
    assert streaming.flat.numel() == 1024 and bool(source.ne(0).any())
    assert set(streaming.passes()) == {*limits.READS, limits.MULTIPLY}
    assert torch.equal(streaming.passes()["one read (sum)"](), source.sum())
    streaming.flat.zero_()
    streaming.restore()
    assert torch.equal(streaming.flat, source)


def test_optim_step_gate_rejects_a_provider_that_does_not_clip(monkeypatch):
    """bench/optim_step.py checks every provider's gradients against torch's loop before timing: one
    that steps without clipping must stop it."""
    from bench import optim_step

    real = optim_step.providers

    def with_a_wrong_one(optimizer, params, skip):
        table = real(optimizer, params, skip)
        def step_without_clipping(max_norm, scaler):
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            scaler.step(optimizer) if scaler is not None else optimizer.step()
            return norm

        table["steps without clipping"] = step_without_clipping
        return table

    monkeypatch.setattr(optim_step, "providers", with_a_wrong_one)
    with pytest.raises(AssertionError, match="steps without clipping, clip, no scaler"):
        optim_step.bench_workload(with_dtype([(300,), (40, 20)], torch.float32), "cpu", 1, run.Timer("cpu"),
                                  _NoProgress())


def test_optim_step_tiny_run_reports_every_provider_and_step_kind():
    from bench import optim_step

    result = optim_step.bench_workload(with_dtype([(300,), (40, 20)], torch.float32), "cpu", 2, run.Timer("cpu"),
                                       _NoProgress())
    text = optim_step.markdown({"tiny": result})
    for name in ("torch", "fastclip clip_ + step", "clipped_step grad_scale", "clipped_step auto",
                 "clipped_step auto + skip"):
        assert text.count(f"| {name} | ") == 1
    assert text.count("of limit") == 5 * len(optim_step.STEP_KINDS)


def test_value_clip_bench_gate_rejects_a_provider_that_is_not_torch(monkeypatch):
    """bench/value_clip.py checks every provider against torch's bits before timing."""
    from bench import value_clip

    real = value_clip.providers

    def with_a_wrong_one(device):
        table = real(device)
        table["clamps too much"] = lambda params, value: torch.nn.utils.clip_grad_value_(params, value / 2)
        return table

    monkeypatch.setattr(value_clip, "providers", with_a_wrong_one)
    with pytest.raises(AssertionError, match="clamps too much, a third outside"):
        value_clip.bench_workload(with_dtype([(300,), (40, 20)], torch.float32), "cpu", 1, run.Timer("cpu"),
                                  _NoProgress())


def test_value_clip_bench_tiny_run_reports_every_provider():
    from bench import value_clip

    result = value_clip.bench_workload(with_dtype([(300,), (40, 20)], torch.bfloat16), "cpu", 2, run.Timer("cpu"),
                                       _NoProgress())
    text = value_clip.markdown({"tiny": result})
    assert text.count("| torch |") == 2 and text.count("| fastclip cpp |") == 2


def _needs_timm():
    """timm's agc.py is loaded from its file (the package itself needs torchvision): skip without it."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (scripts/setup-env.sh installs it with --no-deps)")


def test_agc_bench_gate_rejects_a_provider_that_is_not_timms(monkeypatch):
    """bench/agc.py checks every provider against timm before timing."""
    _needs_timm()
    from bench import agc

    real = agc.providers

    def with_a_wrong_one():
        table = real()
        table["clips harder"] = lambda params, clip_factor: fastclip.adaptive_clip_grad_(params, clip_factor / 2)
        return table

    monkeypatch.setattr(agc, "providers", with_a_wrong_one)
    with pytest.raises(AssertionError, match="clips harder, every unit clips"):
        agc.bench_workload(with_dtype([(30, 4), (40,)], torch.float32), "cpu", 1, run.Timer("cpu"), _NoProgress())


def test_agc_bench_tiny_run_reports_every_provider():
    _needs_timm()
    from bench import agc

    result = agc.bench_workload(with_dtype([(30, 4), (40,)], torch.float32), "cpu", 2, run.Timer("cpu"),
                                _NoProgress())
    text = agc.markdown({"tiny": result})
    assert text.count("| timm |") == 2 and text.count("| fastclip cpp |") == 2


def _needs_zclip():
    import importlib.util

    if importlib.util.find_spec("zclip") is None:
        pytest.skip("zclip is not installed (scripts/setup-env.sh installs it with --no-deps)")


def test_zclip_bench_gate_rejects_a_provider_that_is_not_the_reference(monkeypatch):
    """bench/adaptive.py checks every clipper against the zclip package's class before timing."""
    _needs_zclip()
    from bench import adaptive

    real = adaptive.providers

    def with_a_wrong_one(device, max_grad_norm):
        table = real(device, max_grad_norm)
        halving = fastclip.ZClip(max_grad_norm=None if max_grad_norm is None else max_grad_norm / 2)
        table["caps at half"] = lambda params, module: halving.clip_(params)
        return table

    monkeypatch.setattr(adaptive, "providers", with_a_wrong_one)
    with pytest.raises(AssertionError, match="caps at half, clips"):
        adaptive.bench_workload(with_dtype([(300, 4), (40,)], torch.float32), "cpu", 1, run.Timer("cpu"), _NoProgress())


def test_zclip_bench_tiny_run_reports_every_provider():
    _needs_zclip()
    from bench import adaptive

    result = adaptive.bench_workload(with_dtype([(300, 4), (40,)], torch.bfloat16), "cpu", 2, run.Timer("cpu"),
                                     _NoProgress())
    text = adaptive.markdown({"tiny": result})
    assert text.count("| zclip (reference) |") == 2 and text.count("| fastclip cpp |") == 2


def test_host_overhead_line_is_measured_and_reported():
    """The CPU-speed issue's host-overhead figure: measured on tiny gradients, reported with its target."""
    micros = run.host_overhead_per_tensor("cpu", "cpp" if "cpp" in fastclip.available_backends("cpu") else "torch", 200,
                                          2, run.Timer("cpu"))
    assert math.isfinite(micros) and -5 < micros < 1000
    workload = Workload("2000 x 8K fp32", with_dtype([(100,)] * 3, torch.float32), "target", "float32")
    text = report.markdown([run.bench_workload(workload, "cpu", 2, run.Timer("cpu"), _NoProgress())],
                           ("fastclip cpp", 200, micros))
    assert "Host overhead per tensor (200 one-element fp32 gradients" in text and "target <= 0.1 us" in text
    assert "Targets of the CPU-speed issue" in text and "2000 x 8K: x torch clip_grad_norm_" in text
