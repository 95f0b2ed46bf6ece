"""The public API's contract beyond the arithmetic: input forms, the other three functions,
dispatch rules, errors, and ``python -m fastclip.info``."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy
import pytest
import torch

import fastclip
from fastclip._dispatch import select_backend
from harness import (
    FLOAT_DTYPES,
    GradSpec,
    assert_norm_error_bound,
    assert_same,
    build,
    check_clip,
    exact_clause,
    refusal_reason,
)

MIXED = [GradSpec((1025,), d) for d in FLOAT_DTYPES] + [GradSpec((6, 5), torch.float32, "transposed")]


def test_bare_tensor(backend):
    # 3-4-5: exact arithmetic, so every backend must match torch bit for bit (E4).
    ref, mine = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    ref.grad, mine.grad = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
    assert_same(fastclip.clip_(mine, 1.0, backend=backend), torch.nn.utils.clip_grad_norm_(ref, 1.0), "norm")
    assert_same(mine.grad, ref.grad, "gradient")


def test_no_gradients_returns_zero(backend):
    for parameters in ([], [torch.nn.Parameter(torch.ones(3))]):
        norm = fastclip.clip_(parameters, 1.0, backend=backend)
        assert_same(norm, torch.nn.utils.clip_grad_norm_(parameters, 1.0), "norm of nothing")


def test_a_parameter_list_is_read_not_kept_or_changed(backend):
    """clip_ uses a list passed in as it is (no copy): it must leave it as it found it, unchanged and
    not referenced, on every path (the one call into the extension, and the general path when a
    parameter without a gradient or the error check sends it there)."""
    import sys

    for error_if_nonfinite in (False, True):
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 5)]
        params[0].grad, params[2].grad = torch.full((3,), 2.0), torch.full((5,), 1.0)
        passed = list(params)
        count = sys.getrefcount(passed)
        fastclip.clip_(passed, 1.0, error_if_nonfinite=error_if_nonfinite, backend=backend)
        assert sys.getrefcount(passed) == count
        assert len(passed) == 3 and all(p is q for p, q in zip(passed, params))
        assert params[1].grad is None


def test_empty_generator_warns_like_torch(backend):
    with pytest.warns(UserWarning, match="empty generator"):
        fastclip.clip_((p for p in []), 1.0, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastclip.clip_([], 1.0, backend=backend)  # an empty list is not suspicious


@pytest.mark.parametrize("max_norm", [0.5, torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64), 1,
                                      numpy.float32(0.5), numpy.int64(1)], ids=repr)
def test_max_norm_spellings(backend, max_norm):
    check_clip(backend, MIXED, max_norm)


@pytest.mark.parametrize("norm_type", [numpy.float32(2.0), numpy.int64(1), torch.tensor(2.0), torch.tensor(math.inf)],
                         ids=repr)
def test_norm_type_spellings(backend, norm_type):
    """torch takes float(norm_type): numpy scalars and one-element tensors too (a trainer's config
    values are often numpy's)."""
    check_clip(backend, MIXED, 0.5, norm_type)


def test_clip_value_spellings(backend):
    params, _ = build(MIXED)
    expected, _ = build(MIXED)
    for clip_value in (numpy.float32(0.25), numpy.int64(1), torch.tensor(0.125)):
        fastclip.clip_grad_value_(params, clip_value, backend=backend)
        torch.nn.utils.clip_grad_value_(expected, float(clip_value))
        for p, q in zip(params, expected):
            assert_same(p.grad, q.grad, f"clip_value {clip_value!r}")


@pytest.mark.parametrize("norm_type", [2.0, 1, 3.0, math.inf, "inf", -math.inf, 0.0], ids=str)
def test_get_total_norm(backend, norm_type):
    params, _ = build(MIXED)
    grads = [p.grad for p in params]
    if refusal_reason(backend, grads, float(norm_type)):
        with pytest.raises(ValueError, match="cannot serve"):
            fastclip.get_total_norm(grads, norm_type, backend=backend)
        return
    expected = torch.nn.utils.get_total_norm(grads, norm_type)
    norm = fastclip.get_total_norm(grads, norm_type, backend=backend)
    if exact_clause(backend, float(norm_type), values_exact=False):
        assert_same(norm, expected, "norm")
    else:
        assert_norm_error_bound(norm, expected, grads, norm_type)


def test_get_total_norm_error_if_nonfinite(backend):
    grads = [torch.ones(3), torch.tensor([1.0, math.inf])]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.get_total_norm(grads, error_if_nonfinite=True, backend=backend)
    assert fastclip.get_total_norm([], backend=backend).item() == 0.0


@pytest.mark.parametrize("total_norm", [0.3, 2.0, 1e6, math.inf, math.nan])
def test_clip_grads_with_norm(backend, total_norm):
    """E3: given the same total norm, the scaling is bit-identical to torch for every backend."""
    ref, _ = build(MIXED)
    mine, _ = build(MIXED)
    torch.nn.utils.clip_grads_with_norm_(ref, 1.0, torch.tensor(total_norm))
    assert fastclip.clip_grads_with_norm_(mine, 1.0, torch.tensor(total_norm), backend=backend) is None
    for p, r in zip(mine, ref):
        assert_same(p.grad, r.grad, "gradient")


def test_clip_grads_with_norm_needs_a_tensor():
    with pytest.raises(TypeError, match="total_norm"):
        fastclip.clip_grads_with_norm_([torch.nn.Parameter(torch.ones(2))], 1.0, 2.0)


@pytest.mark.parametrize("clip_value", [0.1, 1.0, torch.tensor(0.25)], ids=str)
def test_clip_grad_value(backend, clip_value):
    ref, _ = build(MIXED)
    mine, _ = build(MIXED)
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    assert fastclip.clip_grad_value_(mine, clip_value, backend=backend) is None
    for p, r in zip(mine, ref):
        assert_same(p.grad, r.grad, "gradient")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"norm_type": "two"}, ValueError, "norm_type"),
        ({"norm_type": None}, TypeError, "norm_type"),
        ({"norm_type": math.nan}, ValueError, "norm_type"),
        ({"max_norm": "1.0"}, TypeError, "max_norm"),
        ({"max_norm": torch.ones(2)}, ValueError, "max_norm"),
        ({"max_norm": math.nan}, ValueError, "max_norm must not be NaN"),
        ({"max_norm": -1.0}, ValueError, "max_norm must be >= 0"),
        ({"max_norm": torch.tensor(-0.5)}, ValueError, "max_norm must be >= 0"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_arguments_raise_before_modifying(kwargs, error, match):
    params, buffers = build(MIXED)
    before, _ = build(MIXED)
    arguments = {"max_norm": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        fastclip.clip_(params, **arguments)
    for p, b in zip(params, before):
        assert_same(p.grad, b.grad, "gradient after refused call")


@pytest.mark.parametrize("parameters, match", [(3.0, "parameters"), ([torch.ones(2), "w"], r"parameters\[1\]")])
def test_parameters_that_are_not_tensors(parameters, match):
    with pytest.raises(TypeError, match=match):
        fastclip.clip_(parameters, 1.0)


def test_auto_always_finds_a_backend():
    grads = [torch.ones(3)]
    assert select_backend("auto", grads, 2.0).name in fastclip.available_backends("cpu")


def test_auto_falls_back_to_torch_for_several_devices():
    grads = [torch.ones(3), torch.ones(3, device="meta")]
    assert select_backend("auto", grads, 2.0).name == "torch"


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_named_backend_that_cannot_serve_raises(name):
    grads = [torch.ones(3), torch.ones(3, device="meta")]
    with pytest.raises(ValueError, match=f"backend '{name}' cannot serve this call: .*several devices"):
        select_backend(name, grads, 2.0)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTCLIP_BACKEND", "torch")
    assert select_backend("auto", [torch.ones(2)], 2.0).name == "torch"
    monkeypatch.setenv("FASTCLIP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTCLIP_BACKEND"):
        select_backend("auto", [torch.ones(2)], 2.0)
    with pytest.raises(ValueError, match="FASTCLIP_BACKEND"):
        fastclip.clip_([], 1.0)  # checked even when there is nothing to clip


def test_available_backends():
    names = fastclip.available_backends("cpu")
    assert names[-1] == "torch" and set(names) <= {"cpp", "triton", "torch"}


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "fastclip.info"], capture_output=True, text=True, check=True).stdout
    for name in ("torch", "cpp", "triton"):
        assert f"  {name} " in out
    assert "torch   available" in out


def test_results_do_not_require_grad(backend):
    p = torch.nn.Parameter(torch.ones(4))
    (p * 3).sum().backward()
    assert not fastclip.clip_([p], 1.0, backend=backend).requires_grad


def test_tensor_summary_matches_python_attributes():
    """The extension's one-pass summary (used on every call) agrees with Python's own view, also
    for a Tensor subclass, which takes the Python path."""
    from fastclip._inputs import summarize

    class Tagged(torch.Tensor):
        pass

    tensors = [
        torch.ones(2),
        torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)),
        torch.ones(4, dtype=torch.float64).to_sparse(),
        torch.ones(1, device="meta"),
        torch.ones(5).as_subclass(Tagged),
    ]
    for subset in (tensors[:4], tensors, []):
        summary = summarize(subset)
        assert summary.devices == {t.device for t in subset}
        assert summary.dtypes == {t.dtype for t in subset}
        assert summary.layouts == {t.layout for t in subset}


def _with_grad(grad: torch.Tensor) -> torch.Tensor:
    param = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    param.grad = grad
    return param


@pytest.mark.parametrize("clip", ["clip_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm"])
@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda: torch.ones(3, dtype=torch.int64), TypeError, "gradient 1 has dtype torch.int64"),
        (lambda: torch.ones(3, dtype=torch.bool), TypeError, "gradient 1 has dtype torch.bool"),
        (lambda: torch.ones(3, device="meta"), ValueError, "gradient 1 is on the meta device"),
        (lambda: torch.ones(1).expand(4), ValueError, "gradient 1 overlaps itself"),
    ],
    ids=["int64", "bool", "meta", "expanded"],
)
def test_gradients_that_cannot_be_clipped_are_refused_untouched(clip, bad, error, match):
    """Refused before any gradient is touched (the good gradient before the bad one stays as is).
    get_total_norm only reads, so an expanded view is fine there."""
    good = torch.full((5,), 3.0)
    tensors = [good, bad()]
    call = {
        "clip_": lambda: fastclip.clip_([_with_grad(t) for t in tensors], 0.1),
        "clip_grads_with_norm_": lambda: fastclip.clip_grads_with_norm_([_with_grad(t) for t in tensors], 0.1, torch.tensor(9.0)),
        "clip_grad_value_": lambda: fastclip.clip_grad_value_([_with_grad(t) for t in tensors], 0.1),
        "get_total_norm": lambda: fastclip.get_total_norm(tensors),
    }[clip]
    if clip == "get_total_norm" and "overlaps" in match:
        assert float(call()) == pytest.approx(math.sqrt(5 * 9 + 4))
        return
    with pytest.raises(error, match=match):
        call()
    assert torch.equal(good, torch.full((5,), 3.0))


@pytest.mark.parametrize("clip", ["clip_", "clip_grads_with_norm_", "clip_grad_value_"])
@pytest.mark.parametrize(
    "views, shared",
    [
        (lambda b: [b[:10], b[5:15]], True),  # partial overlap
        (lambda b: [b[:10], torch.ones(3), b[:10]], True),  # the same memory twice
        (lambda b: [b[:10], b[10:]], False),  # adjacent views of one buffer (a flat gradient buffer)
        (lambda b: [b[::2], b[1::2]], False),  # interleaved views share no element
        (lambda b: [b[::2], b[2:4]], True),  # a strided view and a slice over one of its elements
        (lambda b: [b[1::2], torch.ones(2), b[::3]], True),  # two strided views crossing at element 3
        (lambda b: [b[:10], torch.from_numpy(b.numpy())[5:15]], True),  # two storages over one memory
        (lambda b: [b[:8].view(torch.bfloat16), b[6:12]], True),  # another dtype's view of the same bytes
    ],
    ids=["partial", "twice", "adjacent", "interleaved", "strided and slice", "strided crossing", "two storages",
         "dtype view"],
)
def test_gradients_sharing_memory_are_refused_untouched(clip, views, shared):
    """Two gradients that share elements would have them scaled twice (torch does so silently);
    views of one buffer that share none, as in flat gradient buffers, are clipped normally."""
    buffer = torch.arange(1.0, 21.0)
    params = [_with_grad(v) for v in views(buffer)]
    call = {
        "clip_": lambda: fastclip.clip_(params, 0.1),
        "clip_grads_with_norm_": lambda: fastclip.clip_grads_with_norm_(params, 0.1, torch.tensor(50.0)),
        "clip_grad_value_": lambda: fastclip.clip_grad_value_(params, 0.1),
    }[clip]
    if shared:
        with pytest.raises(ValueError, match="share memory"):
            call()
        assert torch.equal(buffer, torch.arange(1.0, 21.0))
    else:
        call()
        assert not torch.equal(buffer, torch.arange(1.0, 21.0))


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_shared_memory_is_found_in_any_address_order(order, backend):
    """The shared-memory check takes gradients in address order, or in its reverse, without sorting
    them (backward allocates the last layer's first): one overlapping pair among 300 disjoint views
    is refused whatever the order the list has them in, and the disjoint list is clipped."""
    if backend == "cpp" and "cpp" not in fastclip.available_backends():
        pytest.skip("the C++ extension is not built")
    def in_order(views):
        if order == "descending":
            return views[::-1]
        if order == "shuffled":
            return [views[i] for i in torch.randperm(len(views), generator=torch.Generator().manual_seed(0)).tolist()]
        return views

    buffer = torch.arange(1.0, 3001.0)
    views = list(buffer.split(10))
    fastclip.clip_([_with_grad(v) for v in in_order(views)], 1e9, backend=backend)  # disjoint: served
    # Inside view 123 (elements 1230-1239), and in address order right after it.
    overlapping = views[:124] + [buffer[1234:1236]] + views[124:]
    with pytest.raises(ValueError, match="share memory"):
        fastclip.clip_([_with_grad(v) for v in in_order(overlapping)], 0.1, backend=backend)
    assert torch.equal(buffer, torch.arange(1.0, 3001.0))


def test_import_loads_neither_dynamo_nor_dtensor():
    """`import fastclip` stays cheap: torch._dynamo (~1 s) and torch.distributed.tensor are loaded
    only by code that uses them (DTensors are recognised only once their module is imported)."""
    import subprocess
    import sys

    code = "import sys, fastclip; print(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
