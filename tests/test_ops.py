"""The registered operators themselves (torch.ops.fastclip.*): torch.library.opcheck verifies that
their schemas tell the truth about mutation, that the fake (meta) kernels agree with the real ones,
and that they trace through AOT autograd with dynamic shapes, on every device with kernels here."""

from __future__ import annotations

import copy
import math

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


# The direct entries (fastclip._C.clip_ / total_norm / scale_by_): the CPU operators' functions called
# without the dispatcher, for eager calls (cpp_backend._direct).


def _direct_module():
    require_backend("cpp")
    import fastclip._C

    return fastclip._C


@pytest.mark.parametrize("case", ["scalars", "zero_size", "boundaries_65536", "non_contiguous", "many_tensors"])
def test_direct_entries_give_the_operators_bits(case):
    from harness import assert_same, build
    from test_differential import _specs

    direct = _direct_module()
    params, _ = build(_specs(case, "mixed"), seed=5)
    grads = [p.grad for p in params if p.grad is not None]
    coefficients = torch.tensor([(0.3, 1.0, 1 / 3)[i % 3] for i in range(len(grads))], dtype=torch.float64)
    calls = [
        ("clip_", (0.01, 2.0, False)), ("clip_", (0.01, 1.0, False)), ("clip_", (1e9, 2.0, False)),
        ("clip_", (0.01, 3.0, True)), ("total_norm", (2.0, False)), ("total_norm", (2.0, True)),
        ("scale_by_", (coefficients,)), ("scale_by_", (torch.tensor(0.7, dtype=torch.float64),)),
    ]
    for name, args in calls:
        ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
        result = getattr(direct, name)(ours, *args)
        expected = getattr(torch.ops.fastclip, name)(theirs, *args)
        if expected is None:
            assert result is None
        else:
            assert_same(result, expected, f"{name}{args[:3]}: result")
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{name}{args[:3]}: gradient {i}")


def test_direct_entries_borrow_without_changing_reference_counts():
    """The tensors are borrowed: after many calls every Python reference count is what it was, and
    the tensors (and their memory) are intact and usable."""
    import sys

    direct = _direct_module()
    grads = [torch.ones(3), torch.full((2, 2), 2.0).t(), torch.ones(70_000, dtype=torch.bfloat16)]
    counts = [sys.getrefcount(g) for g in grads]
    for _ in range(200):
        direct.clip_(grads, 1e9, 2.0, False)
        direct.total_norm(grads, 2.0, False)
        direct.scale_by_(grads, torch.ones((), dtype=torch.float64))
    assert [sys.getrefcount(g) for g in grads] == counts
    total = direct.clip_(grads, 1.0, 2.0, False)
    assert torch.equal(total, torch.ops.fastclip.total_norm([torch.ones(3), torch.full((2, 2), 2.0),
                                                             torch.ones(70_000, dtype=torch.bfloat16)], 2.0))
    del grads  # the borrowed handles must not have kept (or freed) anything: nothing here may crash
    import gc

    gc.collect()


def test_direct_entries_refuse_what_they_cannot_serve_as_the_operators_do():
    direct = _direct_module()

    class Subclass(torch.Tensor):
        pass

    assert direct.clip_((torch.ones(2),), 1.0, 2.0, False) is NotImplemented  # not a list
    assert direct.clip_([torch.ones(2), torch.ones(2).as_subclass(Subclass)], 1.0, 2.0, False) is NotImplemented
    assert direct.total_norm([torch.ones(2), 3.0], 2.0, False) is NotImplemented
    for call in (lambda t: direct.clip_(t, 1.0, 2.0, False), lambda t: torch.ops.fastclip.clip_(t, 1.0, 2.0)):
        with pytest.raises(RuntimeError, match="have no fused kernel"):  # the operator's own check and message
            call([torch.ones(2), torch.ones(2, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="needs at least one tensor"):  # (the dispatcher refuses it before)
        direct.clip_([], 1.0, 2.0, False)
    with pytest.raises(RuntimeError, match="infinity norm on an empty tensor"):
        direct.total_norm([torch.ones(2), torch.ones(0)], float("inf"), False)
    with pytest.raises(TypeError):
        direct.clip_([torch.ones(2)], "one", 2.0, False)


def test_the_backend_takes_the_direct_entries_only_where_nothing_must_see_the_operator(monkeypatch):
    """Eager CPU calls go through fastclip._C (clip_parameters for fastclip.clip_, total_norm for
    get_total_norm); under a dispatch mode (which must see fastclip::clip_, as FlopCounter or a debug
    mode do) the operators are called instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    direct = _direct_module()
    direct_calls = []
    for name in ("clip_parameters", "total_norm"):
        real = getattr(direct, name)
        monkeypatch.setattr(direct, name, lambda *args, real=real, name=name: direct_calls.append(name) or real(*args))
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), 4.0)
    fastclip.clip_(params, 1.0, backend="cpp")
    fastclip.get_total_norm([params[0].grad], backend="cpp")
    assert direct_calls == ["clip_parameters", "total_norm"]

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with RecordOps() as mode:
        fastclip.clip_(params, 1.0, backend="cpp")
        fastclip.get_total_norm([params[0].grad], backend="cpp")
    assert direct_calls == ["clip_parameters", "total_norm"]
    assert "fastclip.clip_.default" in mode.ops and "fastclip.total_norm.default" in mode.ops, mode.ops
    monkeypatch.setenv("FASTCLIP_BACKEND", "torch")  # another backend asked for: not the extension
    fastclip.clip_(params, 1.0)
    assert direct_calls == ["clip_parameters", "total_norm"]


def _with_grads(grads):
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def test_clip_parameters_refuses_everything_the_general_path_must_handle():
    """fastclip._C.clip_parameters serves plain local gradients only; for anything else it answers
    NotImplemented before touching a gradient, and fastclip.clip_'s general path raises or picks a
    backend as it always has (tested by the rest of the suite)."""
    direct = _direct_module()

    class Subclass(torch.Tensor):
        pass

    shared = torch.full((8,), 5.0)
    expanded = torch.full((1,), 5.0).expand(4)
    leaf = torch.ones(3, requires_grad=True)
    non_leaf = leaf * 2
    non_leaf.retain_grad()
    non_leaf.sum().backward()
    subclass_param = torch.nn.Parameter(torch.zeros(2))
    subclass_param.grad = torch.full((2,), 5.0).as_subclass(Subclass)
    cases = {
        "no gradients": ([torch.nn.Parameter(torch.zeros(2))], 2.0, False),
        "an integer gradient": (_with_grads([torch.ones(2)]) + [_int_grad_param()], 2.0, False),
        "a sparse gradient": (_with_grads([torch.ones(2), torch.ones(3).to_sparse()]), 2.0, False),
        "two devices": (_with_grads([torch.ones(2), torch.ones(2, device="meta")]), 2.0, False),
        "shared memory": (_with_grads([shared[:4], shared[2:6]]), 2.0, False),
        "shared memory, one strided": (_with_grads([shared[::2], shared[2:4]]), 2.0, False),
        "shared memory, after a strided one": (_with_grads([torch.ones(6)[::3], shared[:4], shared[3:5]]), 2.0, False),
        "an expanded view": (_with_grads([expanded]), 2.0, False),
        "a non-leaf tensor": ([non_leaf], 2.0, False),
        "a gradient subclass": ([subclass_param], 2.0, False),
        "a parameter subclass": ([torch.ones(2).as_subclass(Subclass)], 2.0, False),
        "norm 0": (_with_grads([torch.full((2,), 5.0)]), 0.0, False),
        "norm -1": (_with_grads([torch.full((2,), 5.0)]), -1.0, False),
        "norm NaN": (_with_grads([torch.full((2,), 5.0)]), math.nan, False),
        "a tuple": (tuple(_with_grads([torch.full((2,), 5.0)])), 2.0, False),
    }
    for name, (params, norm_type, overflow_safe) in cases.items():
        before = [p.grad.clone() if p.grad is not None and p.grad.device.type == "cpu" and not p.grad.is_sparse
                  else None for p in params]
        assert direct.clip_parameters(params, 1e-3, norm_type, overflow_safe) is NotImplemented, name
        for p, b in zip(params, before):
            if b is not None:
                assert torch.equal(p.grad, b), name


def _int_grad_param():
    """A parameter whose gradient is an integer tensor (torch refuses to assign one; the autograd
    engine never makes one: only a direct write of the C++ field could, so the test builds it on a
    detached integer tensor instead)."""
    p = torch.zeros(2, dtype=torch.int32)
    p.grad = torch.ones(2, dtype=torch.int32)
    return p


def test_clip_parameters_takes_long_lists_of_every_kind_of_parameter():
    """clip_parameters loads the objects of parameters ahead of the one it takes (ChainPrefetcher):
    on a list longer than that distance, mixing parameters without gradients, plain tensors without
    autograd metadata and, far down the list, a tensor subclass or a non-tensor that it must refuse, it takes exactly the gradients
    present (the same bits as the operator on them) or refuses before changing any."""
    direct = _direct_module()

    class Subclass(torch.Tensor):
        pass

    def make_params():
        generator = torch.Generator().manual_seed(1)
        params = []
        for k in range(40):
            if k % 11 == 5:
                params.append(torch.zeros(2))  # no autograd metadata, no gradient
                continue
            p = torch.nn.Parameter(torch.zeros(k + 1))
            if k % 7 != 3:  # k % 7 == 3: no gradient
                p.grad = torch.randn(k + 1, generator=generator)
            params.append(p)
        return params

    params, twin = make_params(), make_params()
    total = direct.clip_parameters(params, 0.1, 2.0, False)
    expected = torch.ops.fastclip.clip_([q.grad for q in twin if q.grad is not None], 0.1, 2.0)
    assert torch.equal(total, expected)
    for p, q in zip(params, twin):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)

    for odd_one in (torch.ones(2).as_subclass(Subclass), "not a tensor"):
        refused = make_params()
        refused[30] = odd_one
        before = [p.grad.clone() if isinstance(p, torch.Tensor) and p.grad is not None else None for p in refused]
        assert direct.clip_parameters(refused, 1e-3, 2.0, False) is NotImplemented
        for p, b in zip(refused, before):
            assert b is None or torch.equal(p.grad, b)


def test_clip_parameters_takes_gradients_made_by_backward_and_changes_no_reference_count():
    """Gradients made by backward have no Python object until read; clip_parameters makes it, as
    reading p.grad would, and leaves every reference count as it found it."""
    import sys

    direct = _direct_module()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m(torch.randn(5, 8, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    params = list(model.parameters())
    total = direct.clip_parameters(params, 0.1, 2.0, False)
    expected = torch.ops.fastclip.clip_([q.grad for q in twin.parameters()], 0.1, 2.0)  # the same kernel: its bits
    assert torch.equal(total, expected)
    for p, q in zip(params, twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    counts = [(sys.getrefcount(p), sys.getrefcount(p.grad)) for p in params]
    for _ in range(100):
        direct.clip_parameters(params, 1e9, 2.0, False)
    assert [(sys.getrefcount(p), sys.getrefcount(p.grad)) for p in params] == counts


def _dense_table_cases():
    """Gradient lists for clip_parameters' one-walk table (DenseCpuViews) and for what it must hand
    back to the general checks: {name: (make gradients, norm types)}."""

    def mixed_dtypes():
        g = torch.Generator().manual_seed(2)
        return [torch.randn(37, generator=g).to(d) for d in (torch.bfloat16, torch.float32, torch.float16, torch.float64)]

    def zero_dim():  # 0-dim fp32 gradients next to an fp64 one scale in double (as torch's 0-dim * 0-dim)
        g = torch.Generator().manual_seed(12)
        return [torch.randn((), generator=g) for _ in range(20)] + [torch.randn(2, generator=g, dtype=torch.float64)]

    def zero_dim_fp32():  # ... and in float next to fp32 ones
        g = torch.Generator().manual_seed(3)
        return [torch.randn((), generator=g) for _ in range(20)] + [torch.randn(9, generator=g)]

    def permuted():  # dense, not contiguous: used in place
        g = torch.Generator().manual_seed(4)
        return [torch.randn(6, 5, generator=g).t(), torch.randn(2, 3, 4, generator=g).permute(2, 0, 1)]

    def strided():  # neither: copied, scaled and written back by the general path
        g = torch.Generator().manual_seed(5)
        return [torch.randn(6, 8, generator=g)[:, ::2], torch.randn(7, generator=g)]

    def interleaved():  # two strided views of one buffer that share no element: served
        buffer = torch.randn(16, generator=torch.Generator().manual_seed(14))
        return [buffer[::2], buffer[1::2]]

    def with_empty():
        g = torch.Generator().manual_seed(6)
        return [torch.randn(5, generator=g), torch.ones(0), torch.randn(3, 0), torch.randn(4, generator=g)]

    def slices_in_shuffled_order():  # 300 disjoint slices of one buffer, in an order with no runs
        buffer = torch.randn(300 * 7, generator=torch.Generator().manual_seed(7))
        order = torch.randperm(300, generator=torch.Generator().manual_seed(8)).tolist()
        return [buffer[7 * k: 7 * k + 7] for k in order]

    def allocated_in_reverse():  # as backward allocates them: addresses mostly descending down the list
        g = torch.Generator().manual_seed(9)
        return [torch.randn(k % 13 + 1, generator=g) for k in range(500)][::-1]

    return {
        "mixed dtypes": (mixed_dtypes, [2.0, 1.0, math.inf, 3.0]),
        "0-dim with fp64": (zero_dim, [2.0, 0.5]),
        "0-dim, fp32 total": (zero_dim_fp32, [2.0]),
        "permuted": (permuted, [2.0, math.inf]),
        "strided": (strided, [2.0, 1.0]),
        "interleaved strided views": (interleaved, [2.0]),
        "empty gradients": (with_empty, [2.0, 1.0]),
        "shuffled slices of one buffer": (slices_in_shuffled_order, [2.0]),
        "allocated in reverse": (allocated_in_reverse, [2.0, math.inf]),
    }


@pytest.mark.parametrize("case", list(_dense_table_cases()))
def test_clip_parameters_gives_the_operators_bits_on_every_layout(case):
    """clip_parameters builds the kernels' table while it takes the gradients, for dense CPU
    gradients none of which shares memory with another, and hands anything else to the general checks:
    either way the total and every clipped gradient have the operator's bits (its dtype promotion,
    0-dim gradients scaled in double next to an fp64 one, empty gradients, permuted and strided
    layouts, address orders with and without runs)."""
    direct = _direct_module()
    make, norm_types = _dense_table_cases()[case]
    for norm_type in norm_types:
        for max_norm in (1e-3, 1e9):  # clipping, and not
            grads, twin = make(), make()
            total = direct.clip_parameters(_with_grads(grads), max_norm, norm_type, False)
            expected = torch.ops.fastclip.clip_(twin, max_norm, norm_type)
            assert total.dtype == expected.dtype and torch.equal(total, expected), (case, norm_type, max_norm)
            for g, e in zip(grads, twin):
                assert torch.equal(g, e), (case, norm_type, max_norm)


def test_clip_parameters_finds_shared_memory_anywhere_in_a_long_list():
    """Two gradients that share elements, far apart in a long list whose addresses come in runs (up
    and down) and out of order, are refused before any gradient changes; the general path then raises
    fastclip's error. Gradients that only touch (one ends where the next begins) are not refused."""
    direct = _direct_module()
    buffer = torch.randn(1000 * 4, generator=torch.Generator().manual_seed(10))
    slices = [buffer[4 * k: 4 * k + 4] for k in range(1000)]
    shuffled = torch.randperm(201, generator=torch.Generator().manual_seed(11)).add(400).tolist()
    order = list(range(0, 400)) + list(range(999, 600, -1)) + shuffled
    touching = [slices[k] for k in order]
    assert direct.clip_parameters(_with_grads(touching), 1e9, 2.0, False) is not NotImplemented

    for position in (0, 450, 999):
        grads = list(touching)
        grads[position] = buffer[4 * 700 + 2: 4 * 700 + 6]  # overlaps slices 700 and 701
        before = [g.clone() for g in grads]
        params = _with_grads(grads)
        assert direct.clip_parameters(params, 1e-3, 2.0, False) is NotImplemented, position
        assert all(torch.equal(g, b) for g, b in zip(grads, before)), position
        with pytest.raises(ValueError, match="share memory"):
            fastclip.clip_(params, 1e-3, backend="cpp")
        assert all(torch.equal(g, b) for g, b in zip(grads, before)), position


def test_clip_parameters_refuses_the_inf_norm_of_an_empty_gradient_as_the_operator_does():
    """The one-walk table leaves this case to the operator, whose error (torch's) it raises."""
    direct = _direct_module()
    params = _with_grads([torch.ones(3), torch.ones(0)])
    with pytest.raises(RuntimeError, match="infinity norm on an empty tensor"):
        direct.clip_parameters(params, 1e-3, math.inf, False)
    assert torch.equal(params[0].grad, torch.ones(3))


def _laid_out(values, descending: bool) -> list[torch.Tensor]:
    """Copies of `values` in one buffer, each 64-byte aligned, at ascending addresses down the list
    or at descending ones (as backward allocates gradients, last layer first)."""
    sizes = [(v.numel() * v.element_size() + 63) // 64 * 64 for v in values]
    buffer = torch.empty(sum(sizes) + 64, dtype=torch.uint8)
    start = (-buffer.data_ptr()) % 64
    order = range(len(values) - 1, -1, -1) if descending else range(len(values))
    offsets = {}
    for i in order:
        offsets[i] = start
        start += sizes[i]
    copies = []
    for i, v in enumerate(values):
        copy = buffer[offsets[i]: offsets[i] + v.numel() * v.element_size()].view(v.dtype).view(v.shape)
        copies.append(copy.copy_(v))
    return copies


@pytest.mark.parametrize("op", ["clip_", "clip_with_tensor_norms_", "clip_per_tensor_", "clamp_values_", "overflow_safe"])
def test_cpu_kernels_give_the_same_bits_whatever_the_address_order(op):
    """The CPU kernels work through the chunks in reverse where the tensors lie mostly at descending
    addresses (parallel_over_chunks), so that small ones are read upwards: the same gradients laid
    out in both orders give the same bits (norms, per-tensor norms and clipped values), with small,
    empty, one-element and multi-chunk (> 65,536 elements) gradients of every dtype."""
    _direct_module()  # the extension, which registers the operators
    generator = torch.Generator().manual_seed(13)
    sizes = [k % 37 + 1 for k in range(400)] + [0, 1, 70_000, 200_001, 3]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    values = [torch.randn(n, generator=generator).to(dtypes[k % 4]) for k, n in enumerate(sizes)]
    results = []
    for descending in (False, True):
        grads = _laid_out(values, descending)
        if op == "clip_":
            out = [torch.ops.fastclip.clip_(grads, 0.5, 2.0)]
        elif op == "clip_with_tensor_norms_":
            out = list(torch.ops.fastclip.clip_with_tensor_norms_(grads, 0.5, 3.0))
        elif op == "clip_per_tensor_":
            out = [torch.ops.fastclip.clip_per_tensor_(grads, 0.5, 1.0)]
        elif op == "clamp_values_":
            torch.ops.fastclip.clamp_values_(grads, 0.3)
            out = []
        else:
            out = [torch.ops.fastclip.clip_(grads, 0.5, 2.0, True)]
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b)), op
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b)), op
    assert not all(torch.equal(a, v) for a, v in zip(grads_a, values))  # something was clipped


def _long_list_values(large_at: int | None):
    """~700 gradients of every dtype and of the sizes that the norms-while-taking threads treat
    differently: one element, empty, 0-dim, a few hundred elements, exactly one chunk (65,536) and,
    at `large_at`, one of several chunks, where those threads stop; inf and NaN far down the list."""
    generator = torch.Generator().manual_seed(15)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    shapes = [(k % 300 + 1,) for k in range(700)]
    shapes[7], shapes[40], shapes[41], shapes[333] = (1,), (0,), (), (65_536,)
    if large_at is not None:
        shapes[large_at] = (70_001,)
    values = [torch.randn(s, generator=generator).to(dtypes[k % 4]) for k, s in enumerate(shapes)]
    return values


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("large_at", [None, 0, 300, 699])
def test_clip_parameters_norms_while_taking_give_the_operators_bits(threads, large_at):
    """On lists of 256 parameters or more, the pool's other threads compute the norms of CPU
    gradients while the calling thread is still taking them (NormsWhileTaking), up to the first
    gradient of several chunks; the kernels' pass after the walk does the rest. With 1, 2 and 4
    threads (several threads claiming blocks), that gradient first, in the middle, last or absent,
    gradients laid out at ascending and descending addresses, and every norm type, the total and
    every clipped gradient have the operator's bits (the operator never computes norms that way)."""
    direct = _direct_module()
    values = _long_list_values(large_at)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for descending in (False, True):
            for norm_type, max_norm in [(2.0, 1e-3), (2.0, 1e9), (1.0, 0.5), (3.0, 1e-2), (0.5, 1e9)]:
                grads, twin = _laid_out(values, descending), _laid_out(values, descending)
                total = direct.clip_parameters(_with_grads(grads), max_norm, norm_type, False)
                expected = torch.ops.fastclip.clip_(twin, max_norm, norm_type)
                context = (descending, norm_type, max_norm)
                assert total.dtype == expected.dtype and torch.equal(total, expected), context
                assert all(torch.equal(g, e) for g, e in zip(grads, twin)), context
            # non-finite gradients far down the list, and the inf norm (no empty gradient: an error)
            nonfinite = [v.clone() for v in values]
            nonfinite[41] = torch.tensor(0.5)
            nonfinite[40] = torch.ones(1)
            for position, value in ((500, math.inf), (650, math.nan)):
                nonfinite[position].view(-1)[0] = value
                for norm_type in (2.0, math.inf):
                    grads, twin = _laid_out(nonfinite, descending), _laid_out(nonfinite, descending)
                    total = direct.clip_parameters(_with_grads(grads), 1.0, norm_type, False)
                    expected = torch.ops.fastclip.clip_(twin, 1.0, norm_type)
                    exactly = dict(rtol=0, atol=0, equal_nan=True)  # the same values, NaN where NaN
                    torch.testing.assert_close(total, expected, **exactly)
                    for g, e in zip(grads, twin):
                        torch.testing.assert_close(g, e, **exactly)
    finally:
        torch.set_num_threads(saved_threads)


def test_clip_parameters_norms_while_taking_leave_everything_as_found_where_the_walk_gives_up():
    """The other threads read gradients while the walk goes on; where the walk then finds something
    the fused path does not serve (a tensor subclass, a non-leaf parameter, gradients sharing memory)
    clip_parameters answers NotImplemented with every gradient unchanged, and where it finds a
    strided gradient (copied by the operator) the result has the operator's bits."""
    direct = _direct_module()

    class Subclass(torch.Tensor):
        pass

    values = _long_list_values(None)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for position in (260, 699):
            for odd_one in ("subclass", "non-leaf", "shared"):
                grads = _laid_out(values, False)
                params = _with_grads(grads)
                if odd_one == "subclass":
                    params[position] = torch.ones(2).as_subclass(Subclass)
                elif odd_one == "non-leaf":
                    params[position] = torch.zeros(3, requires_grad=True) * 2
                else:  # a gradient that is a view of another's first element
                    params[position] = _with_grads([grads[10][:1]])[0]
                before = [g.clone() for g in grads]
                assert direct.clip_parameters(params, 1e-3, 2.0, False) is NotImplemented, (odd_one, position)
                assert all(torch.equal(g, b) for g, b in zip(grads, before)), (odd_one, position)
            grads, twin = _laid_out(values, False), _laid_out(values, False)
            generator = torch.Generator().manual_seed(16)
            strided = torch.randn(8, 6, generator=generator)[:, ::3]
            grads[position], twin[position] = strided, strided.clone()
            total = direct.clip_parameters(_with_grads(grads), 1e-3, 2.0, False)
            expected = torch.ops.fastclip.clip_(twin, 1e-3, 2.0)
            assert torch.equal(total, expected), position
            assert all(torch.equal(g, e) for g, e in zip(grads, twin)), position
    finally:
        torch.set_num_threads(saved_threads)


def test_every_thread_works_in_the_callers_floating_point_environment():
    """torch.set_flush_denormal(True) sets the flush-to-zero and denormals-are-zero flags on the
    calling thread only: the pool's threads, which reduce chunks of the operator's kernels and the
    norms of gradients while clip_parameters takes them, work in the caller's environment, so
    denormal gradients give the same bits with 1, 2 or 4 threads, as if the caller did it all."""
    direct = _direct_module()
    generator = torch.Generator().manual_seed(17)
    tiny = [torch.rand(10, generator=generator) * 1e-39 for _ in range(3000)]  # denormal fp32 (made before
    tiny += [torch.rand(300_000, generator=generator) * 1e-39]  # flushing), and several chunks of them
    assert all(t.count_nonzero() > 0 for t in tiny)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    saved_threads = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            grads, twin = [t.clone() for t in tiny], [t.clone() for t in tiny]
            results[threads] = (direct.clip_parameters(_with_grads(grads), 1e-3, 2.0, False),
                                torch.ops.fastclip.clip_(twin, 1e-3, 2.0))
        # on the caller alone, with DAZ every denormal reads as 0
        assert results[1][0].item() == 0.0 and results[1][1].item() == 0.0
        for threads, (direct_total, operator_total) in results.items():
            assert torch.equal(direct_total, results[1][0]) and torch.equal(operator_total, results[1][1]), threads
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(saved_threads)
