"""GPU tests for the "torch", "cpp" and "triton" backends: the differential harness on CUDA tensors, CUDA-graph capture and replay, no host
synchronisation, the single-launch and two-launch paths agreeing bit for bit, and a tensor of more
than 2^31 elements. Skipped where no GPU is visible (CI has none; run them where one is lent).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastclip
from conftest import require_backend
from harness import check_clip
from test_differential import (CLIPPING, DTYPE_CASES, NOT_CLIPPING, NORM_TYPES, P_NORMS_WITH_A_ROOT, SHAPE_CASES,
                               SPECIAL_VALUES, _specs, check_fp64_p_norms_over_random_cases)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]

GPU_BACKENDS = ["torch", "cpp", "triton"]
FUSED_BACKENDS = ["cpp", "triton"]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request) -> str:
    require_backend(request.param, "cuda")
    return request.param


@pytest.mark.parametrize("max_norm", [CLIPPING, NOT_CLIPPING], ids=["clips", "no_clip"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPE_CASES)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_random_gradients_on_cuda(gpu_backend, case, dtype, norm_type, max_norm):
    check_clip(gpu_backend, _specs(case, dtype), max_norm, norm_type, device="cuda")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=str)
@pytest.mark.parametrize("dtype", DTYPE_CASES)
@pytest.mark.parametrize("case", ["boundaries_65536", "non_contiguous", "many_tensors"])
def test_exact_arithmetic_gradients_on_cuda(gpu_backend, case, dtype, norm_type):
    check_clip(gpu_backend, _specs(case, dtype, values="dyadic"), CLIPPING, norm_type, device="cuda")


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
@pytest.mark.parametrize("value", SPECIAL_VALUES, ids=str)
@pytest.mark.parametrize("dtype", DTYPE_CASES)
def test_nan_and_inf_gradients_on_cuda(gpu_backend, dtype, value, norm_type, error_if_nonfinite):
    check_clip(
        gpu_backend, _specs("boundaries_1024", dtype), CLIPPING, norm_type, special_values=[(1, 700, value)],
        error_if_nonfinite=error_if_nonfinite, device="cuda",
    )


@pytest.mark.parametrize("norm_type", P_NORMS_WITH_A_ROOT, ids=str)
def test_fp64_p_norms_meet_e5_over_many_random_cases_on_cuda(gpu_backend, norm_type):
    """The CPU test's 120 random fp64 cases on the GPU (the CUDA kernel sums these norms in double)."""
    check_fp64_p_norms_over_random_cases(gpu_backend, norm_type, device="cuda")


def _model_grads(seed: int) -> list[torch.nn.Parameter]:
    """A mixed-dtype, many-tensor set of parameters with CUDA gradients."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i in range(150):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        p = torch.nn.Parameter(torch.zeros(1000 + 37 * i, dtype=dtype, device="cuda"))
        p.grad = torch.randn(p.shape, generator=generator).to(dtype).cuda()
        params.append(p)
    return params


@pytest.mark.parametrize("name", FUSED_BACKENDS)
@pytest.mark.parametrize("max_norm", [CLIPPING, NOT_CLIPPING], ids=["clips", "no_clip"])
def test_cuda_graph_capture_and_replay(name, max_norm):
    """fastclip.clip_ captured in a CUDA graph, replayed on new gradient values in the same
    storage, gives what an eager call gives on those values."""
    require_backend(name, "cuda")
    params = _model_grads(0)
    fastclip.clip_(params, max_norm, backend=name)  # warm-up outside capture: table, compilation
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured_norm = fastclip.clip_(params, max_norm, backend=name)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        fresh = _model_grads(seed)
        for p, f in zip(params, fresh):
            p.grad.copy_(f.grad)
        graph.replay()
        expected = torch.nn.utils.clip_grad_norm_(fresh, max_norm)
        eager = _model_grads(seed)
        eager_norm = fastclip.clip_(eager, max_norm, backend=name)
        assert torch.equal(captured_norm, eager_norm), "replayed norm differs from an eager call"
        assert all(torch.equal(p.grad, e.grad) for p, e in zip(params, eager)), "replayed gradients differ"
        assert abs(float(captured_norm) - float(expected)) <= 1e-5 * float(expected)
    del graph  # its tables are kept until said so; then eager calls build them anew
    torch.cuda.synchronize()
    assert fastclip.release_captured_tables() >= 1
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params):
        r.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    norm = fastclip.clip_(params, max_norm, backend=name)
    assert abs(float(norm) - float(expected)) <= 1e-5 * float(expected)
    if max_norm == NOT_CLIPPING:
        assert all(torch.equal(p.grad, r.grad) for p, r in zip(params, reference))


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_capture_without_warm_up_is_refused_clearly(name):
    """A capture whose gradients fastclip has not seen raises (the table built inside it would be
    filled only on replay, leaving eager calls an unfilled table), and eager calls still work."""
    require_backend(name, "cuda")
    params = _model_grads(3)
    before = [p.grad.clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.stream(stream), torch.cuda.graph(torch.cuda.CUDAGraph()):
            fastclip.clip_(params, CLIPPING, backend=name)
    torch.cuda.synchronize()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before)), "gradients changed by a refused capture"
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, b in zip(reference, before):
        r.grad = b.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, CLIPPING)
    norm = fastclip.clip_(params, CLIPPING, backend=name)
    assert abs(float(norm) - float(expected)) <= 1e-5 * float(expected)


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_no_host_synchronisation(name):
    """No call waits for the GPU: with "cpp" not even the first (table built and uploaded); with
    "triton" every call after the process's first (which compiles the kernels), including one on a
    total size never seen (no autotuning: one configuration by rule)."""
    require_backend(name, "cuda")
    params = _model_grads(3)
    if name == "triton":
        fastclip.clip_(params, NOT_CLIPPING, backend=name)
        fastclip.get_total_norm([p.grad for p in params], backend=name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastclip.clip_(params[:2], CLIPPING, backend=name)  # another total size
        fastclip.clip_(params, CLIPPING, backend=name)
        fastclip.clip_(params, NOT_CLIPPING, backend=name)
        norm = fastclip.get_total_norm([p.grad for p in params], backend=name)
        fastclip.clip_grads_with_norm_(params, CLIPPING, norm, backend=name)
        monitor = fastclip.ClipMonitor(CLIPPING, tensor_norms=True, backend=name)
        for _ in range(3):  # recording norms and per-tensor norms waits for nothing
            monitor.clip_(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_workspace_does_not_grow_with_gradient_size_on_cuda(name):
    """Peak GPU memory during clipping: a few bytes per tensor and per 64K-element chunk, never a
    copy of a gradient, whether the gradients total 32 MiB or 512 MiB (with the overflow-safe
    norm too, where the backend has it)."""
    require_backend(name, "cuda")
    modes = [False, True] if name == "triton" else [False]
    for total_mib in (32, 512):
        params = []
        for _ in range(64):
            p = torch.zeros(total_mib * 2**20 // 4 // 64, device="cuda")
            p.grad = torch.randn(p.shape, device="cuda") * 10
            params.append(p)
        for overflow_safe in modes:
            fastclip.clip_(params, 1.0, backend=name, overflow_safe=overflow_safe)  # set-up, compilation
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fastclip.clip_(params, 1.0, backend=name, overflow_safe=overflow_safe)
            fastclip.get_total_norm([p.grad for p in params], backend=name, overflow_safe=overflow_safe)
            torch.cuda.synchronize()
            growth = torch.cuda.max_memory_allocated() - base
            assert growth < 2**20, f"{total_mib} MiB, overflow_safe={overflow_safe}: peak grew by {growth} bytes"


_PATH_SCRIPT = """
import torch, fastclip, sys
g = torch.Generator().manual_seed(0)
grads = [torch.randn(n, generator=g).to(dt).cuda() for n, dt in
         [(3_000_001, torch.float32), (70_000, torch.bfloat16), (5, torch.float16), (1_000_003, torch.float64)]]
norm = fastclip.clip_(grads, 0.5, backend="cpp")
torch.save([norm.cpu()] + [x.cpu() for x in grads], sys.argv[1])
"""


def test_single_launch_and_fallback_agree_bitwise(tmp_path):
    """The cooperative kernel and the two-launch fallback compute the same bits."""
    require_backend("cpp", "cuda")
    results = []
    for cooperative in ("1", "0"):
        out = tmp_path / f"cooperative-{cooperative}.pt"
        env = {**os.environ, "FASTCLIP_CUDA_COOPERATIVE": cooperative}
        subprocess.run([sys.executable, "-c", _PATH_SCRIPT, str(out)], env=env, check=True)
        results.append(torch.load(out))
    assert all(torch.equal(a, b) for a, b in zip(*results))


_TWO_STREAMS_SCRIPT = """
import torch, fastclip
g = torch.Generator().manual_seed(0)
grads = [torch.randn(n, generator=g).cuda() for n in (2_000_003, 70_001, 5)]
expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in grads]))
streams = [torch.cuda.Stream() for _ in range(2)]
for _ in range(50):  # the same gradient set, the same cached table, two calls in flight at once
    norms = []
    for stream in streams:
        with torch.cuda.stream(stream):
            norms.append(fastclip.get_total_norm(grads, backend="cpp"))
    torch.cuda.synchronize()
    assert all(torch.equal(n, norms[0]) for n in norms), norms
    assert abs(float(norms[0]) - float(expected)) <= 1e-5 * float(expected), (norms, expected)
print("ok")
"""


def test_fallback_calls_in_flight_on_two_streams():
    """The two-launch path's arrival counter is each call's own: two calls on one gradient set in
    flight on two streams both get the right norm (one counter per table once mixed their counts)."""
    require_backend("cpp", "cuda")
    env = {**os.environ, "FASTCLIP_CUDA_COOPERATIVE": "0"}
    result = subprocess.run([sys.executable, "-c", _TWO_STREAMS_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_tensor_over_2_to_the_31_elements(name):
    """64-bit indexing: a 2^31 + 3 element fp16 gradient (4 GiB), whose last elements decide the norm."""
    require_backend(name, "cuda")
    n = 2**31 + 3
    try:
        grad = torch.zeros(n, dtype=torch.float16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    grad[-3:] = torch.tensor([3.0, 4.0, 12.0], dtype=torch.float16)
    norm = fastclip.clip_([grad], 6.5, backend=name)
    assert float(norm) == 13.0
    expected = torch.zeros(5, dtype=torch.float16, device="cuda")
    expected[-3:] = torch.tensor([3.0, 4.0, 12.0], dtype=torch.float16)
    torch.nn.utils.clip_grads_with_norm_([expected], 6.5, norm)
    assert torch.equal(grad[-5:], expected)
    assert int(torch.count_nonzero(grad[: n - 3])) == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_gradients_on_a_gpu_that_is_not_current(name):
    """Kernels launch on the gradients' GPU (a device guard), not on the current one."""
    require_backend(name, "cuda")
    generator = torch.Generator().manual_seed(4)
    values = [torch.randn(n, generator=generator) for n in (100_003, 17)]
    mine = [torch.nn.Parameter(torch.zeros(v.shape, device="cuda:1")) for v in values]
    reference = [torch.nn.Parameter(torch.zeros(v.shape, device="cuda:1")) for v in values]
    for p, q, v in zip(mine, reference, values):
        p.grad, q.grad = v.to("cuda:1"), v.to("cuda:1")
    with torch.cuda.device(0):
        norm = fastclip.clip_(mine, CLIPPING, backend=name)
        expected = torch.nn.utils.clip_grad_norm_(reference, CLIPPING)
    assert norm.device == torch.device("cuda:1")
    assert abs(float(norm) - float(expected)) <= 1e-5 * float(expected)
    rescaled = [torch.nn.Parameter(torch.zeros(v.shape, device="cuda:1")) for v in values]
    for p, v in zip(rescaled, values):
        p.grad = v.to("cuda:1")
    torch.nn.utils.clip_grads_with_norm_(rescaled, CLIPPING, norm)  # E3: torch's scaling by fastclip's norm
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(mine, rescaled))


@pytest.mark.parametrize("path", ["clip", "grad_scale"])
def test_clipped_step_skips_on_the_device_without_a_sync(path):
    """clipped_step with a fused AdamW, a GradScaler and SkipOnSpike: after a warm-up step (which
    creates the optimizer's state and moves SkipOnSpike's state to the GPU), no step synchronises, and
    a spike is skipped (step counts stay behind by one)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda")) for shape in ((256, 128), (128,), (64, 256))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    skip = fastclip.SkipOnSpike(window=8, min_history=4)

    def step(factor: float) -> None:
        scale = scaler.scale(torch.ones((), device="cuda"))
        for p in params:
            p.grad = torch.randn_like(p) * scale * factor
        fastclip.clipped_step(optimizer, 1.0, scaler=scaler, skip=skip, loss=scale / scale, path=path)
        scaler.update()

    step(1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(10):
            step(1000.0 if i == 8 else 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(skip.skipped_steps) == 1 and int(optimizer.state[params[0]]["step"]) == 10


@pytest.mark.parametrize("clip_value", [0.3, 0.0, math.inf], ids=str)
@pytest.mark.parametrize("dtype", DTYPE_CASES)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_value_clipping_on_cuda_equals_torch(gpu_backend, case, dtype, clip_value):
    """Clamping is exact: every backend gives torch's CUDA bits (the cpp backend in one launch)."""
    from harness import assert_same, build

    mine, _ = build(_specs(case, dtype), device="cuda")
    ref, _ = build(_specs(case, dtype), device="cuda")
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    fastclip.clip_grad_value_(mine, clip_value, backend=gpu_backend)
    for p, r in zip(mine, ref):
        if r.grad is not None:
            assert_same(p.grad, r.grad, "gradient")


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach_none", "foreach_false"])
@pytest.mark.parametrize("clip_value", [0.0, 1e-30, 0.3, 65504.0], ids=str)
def test_value_clipping_on_cuda_gives_torchs_signed_zeros(gpu_backend, clip_value, foreach):
    """torch's CUDA foreach clamps take a fused route for a dtype whose gradients are all dense (with
    clip_value 0 every element becomes +0.0) and a per-tensor route otherwise or with foreach=False
    (-3 becomes -0.0): exact zeros, NaN and infinities of every dtype, both routes in one call."""
    from harness import assert_same
    from test_value_clip import signed_zero_params

    mine, ref = signed_zero_params("cuda"), signed_zero_params("cuda")
    torch.nn.utils.clip_grad_value_(ref, clip_value, foreach=foreach)
    fastclip.clip_grad_value_(mine, clip_value, foreach=foreach, backend=gpu_backend)
    for i, (p, r) in enumerate(zip(mine, ref)):
        assert_same(p.grad, r.grad, f"gradient {i} ({r.grad.dtype})")


@pytest.mark.parametrize("name", ["RunningAverageClip", "ZClip", "QuantileClip", "AdaGC", "clip_grad_value_"])
def test_adaptive_clipping_and_value_clipping_do_not_sync(name):
    """After one warm-up step (which moves an adaptive clipper's state to the GPU), no step waits for
    the host."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda")) for shape in ((256, 128), (128,), (64, 256))]

    def step(i: int) -> None:
        for p in params:
            p.grad = torch.randn_like(p) * (50.0 if i == 30 else 1.0)
        if name == "clip_grad_value_":
            fastclip.clip_grad_value_(params, 0.5)
        else:
            clipper.clip_(params)

    clipper = None if name == "clip_grad_value_" else getattr(fastclip, name)()
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 40):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_agc_and_per_tensor_on_cuda_take_the_triton_kernels():
    """On CUDA tensors "auto" serves AGC, per-tensor clipping and the clippers' scaling with the Triton
    kernels (the C++ extension has CPU kernels only for them, and refuses when asked by name); AGC
    gives timm's bits where the unit norms are exact, per-tensor clipping torch's."""
    from fastclip._dispatch import select_backend
    from harness import assert_same, build
    from test_agc import SHAPES, _clone, _params, timm_adaptive_clip_grad

    require_backend("triton", "cuda")
    grads = [torch.randn(10, device="cuda")]
    for operation in ("adaptive_clip_grad_", "clip_per_tensor_", "scale_by_"):
        assert select_backend("auto", grads, 2.0, operation=operation).name == "triton"
        with pytest.raises(ValueError, match="no CUDA kernel"):
            select_backend("cpp", grads, 2.0, operation=operation)
    reference = timm_adaptive_clip_grad()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        mine = [p.cuda() for p in _params(SHAPES, dtype, seed=1, exact=True)]
        for p, q in zip(mine, _params(SHAPES, dtype, seed=1, exact=True)):
            p.grad = q.grad.cuda()
        theirs = _clone(mine)
        fastclip.adaptive_clip_grad_(mine)
        reference(theirs)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, theirs)), dtype
    for dtype in DTYPE_CASES:
        mine, _ = build(_specs("many_tensors", dtype), device="cuda")
        expected, _ = build(_specs("many_tensors", dtype), device="cuda")
        norms = fastclip.clip_per_tensor_(mine, CLIPPING)
        for i, (p, e) in enumerate(zip(mine, expected)):
            torch.nn.utils.clip_grads_with_norm_([e], CLIPPING, norms[i].to(p.dtype))
            assert_same(p.grad, e.grad, f"{dtype} gradient {i}")


@pytest.mark.parametrize("method", ["adaptive_clip_grad_", "clip_per_tensor_", "clip_grad_value_", "RunningAverageClip",
                                    "ZClip", "QuantileClip", "AdaGC"])
def test_every_method_captures_in_a_cuda_graph_after_warm_up(method):
    """Each method, captured after three eager steps, replays on new gradients in the same storage
    with the gradients (and clipper state) an eager twin computes step by step."""
    require_backend("triton", "cuda")

    def make_params(seed):
        generator = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator).cuda()) for shape in ((64, 48), (48,), (9, 3, 3))]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * (0.05 if seed % 4 else 3.0)).cuda()
        return params

    def stepper():
        clipper = getattr(fastclip, method)() if method[0].isupper() else None
        if clipper is not None:
            return clipper, clipper.clip_
        bound = {"adaptive_clip_grad_": (), "clip_per_tensor_": (0.5,), "clip_grad_value_": (0.02,)}[method]
        return None, lambda params: getattr(fastclip, method)(params, *bound)

    def load(params, fresh):  # in place: the captured graph reads these storages
        with torch.no_grad():
            for p, f in zip(params, fresh):
                p.copy_(f)  # AGC's bounds come from the parameters
                p.grad.copy_(f.grad)

    (clipper, step), (twin, twin_step) = stepper(), stepper()
    params = make_params(0)
    for seed in range(3):  # warm-up: tables, compilation, the clipper's state on the GPU
        load(params, make_params(seed))
        step(params)
        twin_step(make_params(seed))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        step(params)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(3, 9):
        fresh = make_params(seed)
        load(params, fresh)
        graph.replay()
        twin_step(fresh)
        assert all(torch.equal(p.grad, f.grad) for p, f in zip(params, fresh)), f"step {seed}"
    if clipper is not None:
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(clipper.state_dict().values(), twin.state_dict().values()))


def test_direct_entries_on_cuda_give_the_operators_bits():
    """fastclip._C.clip_ / total_norm on CUDA tensors (what eager cpp calls take) call the CUDA
    operators' functions without the dispatcher: the same bits, the same current stream."""
    from harness import assert_same, build

    require_backend("cpp", "cuda")
    import fastclip._C as direct

    params, _ = build(_specs("many_tensors", "mixed"), seed=7, device="cuda")
    grads = [p.grad for p in params if p.grad is not None]
    for max_norm in (CLIPPING, NOT_CLIPPING):
        ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
        assert_same(direct.clip_(ours, max_norm, 2.0, False), torch.ops.fastclip.clip_(theirs, max_norm, 2.0), "total")
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"gradient {i}")
    assert_same(direct.total_norm(grads, math.inf, False), torch.ops.fastclip.total_norm(grads, math.inf), "inf norm")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        total = direct.clip_(grads, CLIPPING, 2.0, False)
    stream.synchronize()
    assert total.isfinite()
