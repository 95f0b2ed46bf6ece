"""The Triton kernels' own properties, beyond the differential harness (which runs them on every
case as backend "triton"): a constant number of launches whatever the number of tensors, cached
device tables, and capture by torch.compile(fullgraph=True)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import require_backend
from harness import reference_norm


@pytest.fixture
def kernels():
    require_backend("triton", "cpu")
    import fastclip.triton_kernels.clip

    return fastclip.triton_kernels.clip


def _count_launches(monkeypatch, module) -> list:
    """The kernels ``module`` launches from now on: ``kernel[grid](...)`` calls the kernel's ``run``,
    which is wrapped here for every Triton function in the module's namespace."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []
    for kernel in {id(v): v for v in vars(module).values()}.values():
        if isinstance(kernel, (JITFunction, InterpretedFunction)):
            def counting_run(*args, _kernel=kernel, _run=kernel.run, **kwargs):
                launched.append(_kernel)
                return _run(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", counting_run)
    return launched


@pytest.mark.parametrize("num_tensors", [1, 3, 300])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["clips", "no_clip"])
def test_two_launches_whatever_the_number_of_tensors(kernels, monkeypatch, num_tensors, max_norm):
    launched = _count_launches(monkeypatch, kernels)
    grads = [torch.randn(5 + i % 70_000, dtype=(torch.float32, torch.bfloat16)[i % 2]) for i in range(num_tensors)]
    kernels.clip_(grads, max_norm, 2.0)
    assert len(launched) == 2  # the norm kernel and the scale kernel (which returns if not clipping)
    norms_only = _count_launches(monkeypatch, kernels)
    kernels.tensor_norms(grads, 2.0)
    assert len(norms_only) == 1  # tensor_norms: the norm kernel alone


@pytest.mark.parametrize("num_tensors", [1, 130])
def test_per_tensor_and_agc_launch_counts_do_not_grow_with_tensors(kernels, monkeypatch, num_tensors):
    import fastclip.triton_kernels.agc as agc
    import fastclip.triton_kernels.per_tensor as per_tensor

    shapes = [(3 + i % 5, 1 + i % 70) for i in range(num_tensors)]
    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[i % 3] for i in range(num_tensors)]
    grads = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    norm_launches = _count_launches(monkeypatch, kernels)
    scale_launches = _count_launches(monkeypatch, per_tensor)
    per_tensor.clip_per_tensor_(grads, 1e-3, 2.0)
    assert len(norm_launches) + len(scale_launches) == 2  # clip.py's norm kernel, then the per-tensor scaling
    agc_launches = _count_launches(monkeypatch, agc)
    agc.adaptive_clip_(params, grads, 0.01, 1e-3)
    assert len(agc_launches) == 1


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_gpu_rules_accumulate_in_fp64_like_the_cpu_rules(kernels, monkeypatch, norm_type):
    """Issue E5 on a GPU: the norm kernel accumulates every dtype in fp64 there too (fp32 sums in
    another order than torch's can round a 16-bit or fp32 norm the other way). Run in the interpreter
    under the GPU rules, every per-tensor norm and the total of multi-element gradients equal, bit for
    bit, those of the CPU rules, whose fp64 sums the E5 tests bound; the rules differ only for
    one-element gradients (torch's CPU norm of one element is its magnitude)."""
    generator = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    for dtype_set in ([torch.bfloat16], [torch.float16], [torch.float32], dtypes):
        grads = [(torch.randn(2 + (i * 7919) % 70_000, generator=generator) * 10.0 ** (i % 5 - 2)).to(dtype_set[i % len(dtype_set)])
                 for i in range(24)]
        cpu_total, cpu_norms = kernels.tensor_norms(grads, norm_type)
        monkeypatch.setattr(kernels, "gpu_rules_on_cpu", True)
        gpu_total, gpu_norms = kernels.tensor_norms(grads, norm_type)
        monkeypatch.setattr(kernels, "gpu_rules_on_cpu", False)
        assert torch.equal(gpu_norms, cpu_norms), [str(d) for d in dtype_set]
        assert torch.equal(gpu_total, cpu_total) and gpu_total.dtype == cpu_total.dtype


def test_tables_are_cached_by_address(kernels):
    import fastclip.triton_kernels.tables as tables

    grads = [torch.randn(10), torch.randn(70_000, dtype=torch.float16)]
    first = tables.gradient_tables(grads, torch.float32)
    again = tables.gradient_tables(grads, torch.float32)
    assert all(a is b for a, b in zip(first, again)), "same gradients, same storage: the cached table is reused"
    other = tables.gradient_tables([torch.randn(10), grads[1]], torch.float32)
    assert other[0] is not first[0]
    assert first[0].shape == (1 + 2, 4)  # one chunk for 10 elements, two for 70,000
    assert first[1][:, 2:4].tolist() == [[0, 1], [1, 3]]  # first and end chunk of each tensor


def test_cached_tables_never_serve_a_replaced_resized_or_freed_gradient(kernels):
    """A table holds each gradient's address, size, dtype and scaling mode, and the cache is keyed by
    exactly those: after a gradient is shrunk or grown in place, replaced, or freed and its memory
    reused, the kernels read what is there now. Checked through the results (the norm of integer
    data, exact in every accumulation, and a clip that writes every element), not the cache."""
    def integers(n, dtype=torch.float32):
        return torch.randint(-3, 4, (n,), generator=generator).to(dtype)

    def check(tensors):
        truth = reference_norm(tensors, 2.0)  # each tensor's norm rounded to its dtype, as torch's
        assert float(kernels.total_norm(tensors, 2.0)) == pytest.approx(truth, rel=1e-6)
        total = torch.tensor(truth, dtype=torch.float32)
        coefficient = torch.clamp(0.3 / (total + 1e-6), max=1.0)  # torch's, as clip_grads_with_norm_ has it
        expected = [t.clone().mul_(coefficient) for t in tensors]
        kernels.scale_with_norm_(tensors, 0.3, total)
        for t, e in zip(tensors, expected):
            assert torch.equal(t, e)

    generator = torch.Generator().manual_seed(0)
    grads = [integers(10), integers(70_000, torch.float16), integers(300)]
    check(grads)
    check(grads)  # the cached tables
    grads[0].fill_(1000.0)  # what a table of the old size would still read...
    grads[0].resize_(4)  # ...after this: same memory, fewer elements
    grads[0].copy_(integers(4))
    check(grads)
    grads[2].resize_(200_000)  # more elements than its storage had: new memory
    grads[2].copy_(integers(200_000))
    check(grads)
    grads[1] = integers(70_000, torch.bfloat16)  # replaced, another dtype
    check(grads)
    del grads[0]
    grads.insert(0, integers(4))  # freed: its memory may come back to this one, holding other values
    check(grads)


def test_table_cache_follows_the_capture_and_stream_rules(kernels, monkeypatch):
    """Issue 15 item 7, with the GPU's answers simulated (which stream is current, whether it is being
    captured): the Triton table cache keeps the C++ cache's rules. A miss during a capture raises and
    builds nothing; a table used in a capture is never evicted, until release_captured_tables();
    a table used on a stream other than the one that built it is record_stream-ed there, once."""
    import fastclip
    import fastclip.triton_kernels.tables as tables

    current = {"stream": "A", "capturing": False}
    monkeypatch.setattr(tables, "_stream_state", lambda device: (current["stream"], current["capturing"]))
    recorded = []
    monkeypatch.setattr(tables, "_record_stream", lambda entry, stream: recorded.append((entry, stream)))
    cache = tables._TableCache(capacity=2)
    monkeypatch.setattr(tables, "TABLE_CACHE", cache)  # the one release_captured_tables() empties
    built = []

    def get(n):
        def build():
            built.append(n)
            return (torch.full((n,), float(n)), n)
        return cache.get((n, torch.device("cpu")), build)

    first = get(1)
    assert get(1) is first and built == [1] and recorded == []
    current["stream"] = "B"
    assert get(1) is first and get(1) is first
    assert recorded == [(first, "B")], "used on a second stream: recorded there, once"
    current["capturing"] = True
    with pytest.raises(RuntimeError, match="call fastclip once on the same tensors before capturing"):
        get(2)
    assert built == [1], "a table was built during a capture"
    assert get(1) is first  # a hit during a capture: kept from now on
    current["capturing"] = False
    for n in (2, 3, 4):
        get(n)
    assert built == [1, 2, 3, 4] and len(cache.entries) == 2
    assert get(1) is first, "a table used in a capture was evicted"
    assert fastclip.release_captured_tables() == 1
    assert fastclip.release_captured_tables() == 0
    assert get(1) is not first and built[-1] == 1, "a released table was served again"
    get(5)
    assert len(cache.entries) == 2, "a released table still held a place in the cache"


_CAPTURE_SCRIPT = textwrap.dedent(
    """
    import torch
    import fastclip.triton_kernels.agc  # noqa: F401  (registers the ops)
    import fastclip.triton_kernels.per_tensor  # noqa: F401

    graphs = []

    def capture(gm, example_inputs):  # records the graph; never runs it (no GPU needed)
        graphs.append(gm.code)
        return lambda *args: [torch.zeros(())]

    def step(grads, norm):
        torch.ops.fastclip_triton.scale_with_norm_(grads, 1.0, norm)
        torch.ops.fastclip_triton.adaptive_clip_(grads, grads, 0.01, 1e-3)
        per_tensor = torch.ops.fastclip_triton.clip_per_tensor_(grads, 1.0, 2.0)
        torch.ops.fastclip_triton.scale_by_(grads, per_tensor)
        clipped = torch.ops.fastclip_triton.clip_(grads, 0.5, 2.0) + torch.ops.fastclip_triton.total_norm(grads, 2.0)
        total, norms = torch.ops.fastclip_triton.tensor_norms(grads, 2.0)
        return clipped + per_tensor.sum() + total + norms.sum()

    torch.compile(step, fullgraph=True, backend=capture)([torch.randn(100), torch.randn(7, dtype=torch.bfloat16)],
                                                         torch.tensor(3.0))
    print(graphs[0])
    """
)


def test_torch_compile_fullgraph_captures_the_ops(kernels):
    """Dynamo traces the three triton_ops into one graph (fullgraph=True raises on any break).

    Run without TRITON_INTERPRET: the interpreter's kernels are plain Python functions, which
    torch.compile cannot trace into; compiled kernels are what it sees on a GPU.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for op in ("fastclip_triton.scale_with_norm_", "fastclip_triton.clip_", "fastclip_triton.total_norm",
               "fastclip_triton.adaptive_clip_", "fastclip_triton.clip_per_tensor_", "fastclip_triton.scale_by_",
               "fastclip_triton.tensor_norms"):
        assert op in result.stdout, result.stdout


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fastclip.triton_kernels.clip as kernels
    import fastclip.triton_kernels.value_clip as value_clip
    import fastclip.triton_kernels.per_tensor as per_tensor
    import fastclip.triton_kernels.agc as agc

    target = GPUTarget("cuda", int(sys.argv[1]), 32)
    norm_signature = {
        "chunks_ptr": "*i64", "tensors_ptr": "*i64", "partials_ptr": "*fp64", "tensor_norms_ptr": "*fp64",
        "counters_ptr": "*i32", "total_ptr": None, "coefficient_ptr": "*fp64", "partial_exponents_ptr": "*i32",
        "tensor_exponents_ptr": "*i32", "num_tensors": "i32", "num_nonempty": "i32", "p_bits": "i64",
        "max_norm_bits": "i64", "total_elements": "i32",
        **dict.fromkeys(["NORM", "TOTAL_DTYPE", "CPU_RULES", "SAFE", "BLOCK", "BARRIER"], "constexpr"),
    }
    scale_signature = {"chunks_ptr": "*i64", "tensors_ptr": "*i64", "coefficient_ptr": "*fp64",
                       "COEFFICIENT_DTYPE": "constexpr", "BLOCK": "constexpr"}
    compiled = vector_loads = vector_stores = 0
    for tag, pointer in {0: "*fp32", 1: "*fp16", 2: "*bf16", 3: "*fp64"}.items():
        for norm in range(4):
            # The overflow-safe variant: fp32 or fp64 totals, every norm but inf (served unscaled).
            for safe in (False, True) if tag in (0, 3) and norm != 2 else (False,):
                constants = {"NORM": norm, "TOTAL_DTYPE": tag, "CPU_RULES": False, "SAFE": safe, "BLOCK": 2048,
                             "BARRIER": True}
                kernel = triton.compile(ASTSource(kernels._norm_kernel, {**norm_signature, "total_ptr": pointer},
                                                  constants), target=target)
                compiled += 1
                if norm == 0 and not safe:  # the plain L2 norm kernel: its full blocks load 16 bytes at a time
                    vector_loads += kernel.asm["ptx"].count("ld.global.v4") + kernel.asm["ptx"].count("ld.global.v2")
        scale = triton.compile(ASTSource(kernels._scale_kernel, scale_signature,
                                         {"COEFFICIENT_DTYPE": tag, "BLOCK": 2048}), target=target)
        vector_stores += scale.asm["ptx"].count("st.global.v4") + scale.asm["ptx"].count("st.global.v2")
        coefficient_signature = {"total_ptr": pointer, "coefficient_ptr": "*fp64", "max_norm_bits": "i64",
                                 "TOTAL_DTYPE": "constexpr"}
        triton.compile(ASTSource(kernels._coefficient_kernel, coefficient_signature, {"TOTAL_DTYPE": tag}),
                       target=target)
        compiled += 2
    # The value-clipping kernel, with its bounds' bits typed i64, or i32 (Triton's type for a small
    # integer such as the bits of 0.0); the routes' mask is a small integer.
    for bits in ("i64", "i32"):
        clamp_signature = {"chunks_ptr": "*i64", "tensors_ptr": "*i64", "BLOCK": "constexpr",
                           **dict.fromkeys(["hi_f32_bits", "hi_f16_bits", "hi_bf16_bits", "hi_f64_bits"], bits),
                           "fused_route_dtypes": "i32"}
        triton.compile(ASTSource(value_clip._clamp_kernel, clamp_signature, {"BLOCK": 2048}), target=target)
        compiled += 1
    # Per-tensor scaling under CUDA's rules, every norm kind; AGC (every dtype inside one kernel).
    per_tensor_signature = {"chunks_ptr": "*i64", "tensors_ptr": "*i64", "tensor_norms_ptr": "*fp64", "p_bits": "i64",
                            "max_norm_bits": "i64", **dict.fromkeys(["NORM", "CPU_RULES", "BLOCK"], "constexpr")}
    for norm in range(4):
        triton.compile(ASTSource(per_tensor._per_tensor_scale_kernel, per_tensor_signature,
                                 {"NORM": norm, "CPU_RULES": False, "BLOCK": 2048}), target=target)
        compiled += 1
    agc_signature = {"runs_ptr": "*i64", "clip_factor_bits": "i64", "eps_bits": "i64", "floor_bits": "i64",
                     "BLOCK": "constexpr"}
    triton.compile(ASTSource(agc._agc_kernel, agc_signature, {"BLOCK": 1024}), target=target)
    compiled += 1
    # Scaling by coefficients computed elsewhere (the adaptive clippers'): one, or one per gradient.
    scale_by_signature = {"chunks_ptr": "*i64", "tensors_ptr": "*i64", "coefficients_ptr": "*fp64",
                          "PER_TENSOR": "constexpr", "BLOCK": "constexpr"}
    for per_tensor_coefficients in (False, True):
        triton.compile(ASTSource(kernels._scale_by_kernel, scale_by_signature,
                                 {"PER_TENSOR": per_tensor_coefficients, "BLOCK": 2048}), target=target)
        compiled += 1
    print("compiled", compiled)
    print("vector loads", vector_loads)
    print("vector stores", vector_stores)
    """
)


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpus(kernels, arch):
    """Every kernel variant compiles ahead of time for sm_80 and sm_90, no GPU needed. The
    interpreter runs kernels as Python, so it accepts code that the compiler rejects (a global that
    is not constexpr, a type mismatch between branches); this catches that in CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # 16 norm kernels, 6 of them overflow-safe, 4 scale, 4 coefficient, 2 value clipping, 4 per-tensor, 1 AGC,
    # 2 scale-by
    assert "compiled 39" in result.stdout
    # Full blocks of aligned gradients are read with 16-byte vector loads (ld.global.v4 / .v2): the
    # table's addresses alone would give the compiler no alignment to prove them from.
    vector_loads = int(result.stdout.split("vector loads ")[1].split()[0])
    assert vector_loads >= 4 * 4, result.stdout  # each of the 4 kernels, for its 4 gradient dtypes
    assert int(result.stdout.split("vector stores ")[1].split()[0]) >= 4 * 4, result.stdout  # and the scaling


_NOT_TUNED_SCRIPT = textwrap.dedent(
    """
    import triton
    import fastclip.triton_kernels.clip as kernels

    kernel = kernels._norm_kernel
    assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
    unspecialised = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    assert {"num_tensors", "num_nonempty", "total_elements"} <= unspecialised, unspecialised
    print("ok")
    """
)


def test_norm_kernel_is_not_autotuned_nor_specialised_on_sizes(kernels):
    """No autotuner (it benchmarks each new key on the GPU: a host wait, impossible under capture),
    and the per-step sizes are not specialised on (a new size would recompile). Checked on the
    compiled (not interpreted) kernel object, as a GPU process sees it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _NOT_TUNED_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_aligned_and_unaligned_gradients_give_the_same_norm(kernels):
    """A gradient whose address is not 16-byte aligned (a view at an odd offset) takes the masked path
    for its full blocks, an aligned one the vector path: the same values must give the same bits."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        buffer = torch.randn(3 * 65536 + 4097, dtype=torch.float64).to(dtype)
        unaligned = buffer[1:]
        aligned = unaligned.clone()
        assert unaligned.data_ptr() % 16 != 0 and aligned.data_ptr() % 16 == 0
        for norm_type in (2.0, 1.0, math.inf):
            a = torch.ops.fastclip_triton.total_norm([aligned], norm_type)
            b = torch.ops.fastclip_triton.total_norm([unaligned], norm_type)
            assert torch.equal(a, b), (dtype, norm_type, a, b)


def test_eager_calls_run_the_op_bodies_and_traced_or_profiled_calls_the_ops(kernels, monkeypatch):
    """In eager code the backend runs the norm and clip ops' bodies as functions (the custom-op
    dispatch cost ~235 us a call on an H200); under the profiler (as in traced code and dispatch
    modes) the ops themselves run, so the tools see them. Same results either way."""
    import fastclip

    def make():
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 300)]
        for p, scale in zip(params, (3.0, 0.5)):
            p.grad = torch.arange(p.numel(), dtype=torch.float32) * scale
        return params

    def refuse(*args, **kwargs):
        raise AssertionError("the op was dispatched in eager code")

    eager = make()
    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.fastclip_triton, "clip_", refuse)
        patch.setattr(torch.ops.fastclip_triton, "total_norm", refuse)
        eager_norm = fastclip.clip_(eager, 1.0, backend="triton")
        eager_total = fastclip.get_total_norm([p.grad for p in eager], backend="triton")
    profiled = make()
    with torch.autograd.profiler.profile() as profile:
        profiled_norm = fastclip.clip_(profiled, 1.0, backend="triton")
    assert "fastclip_triton::clip_" in {e.name for e in profile.function_events}
    assert torch.equal(eager_norm, profiled_norm) and eager_total.item() <= 1.0 + 1e-6
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(eager, profiled))
