"""Robustness at the extremes users hit: many threads at once, 100,000 tiny tensors, a tensor of more
than 2^31 elements, peak memory that does not grow with the gradients' size. Every backend that serves CPU tensors here; the Triton interpreter is left out
where it would run one Python program per tensor for minutes (the GPU tests cover Triton there)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import fastclip
from harness import assert_norm_error_bound, assert_same


def _params(seed: int, count: int, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i in range(count):
        p = torch.zeros(1 + (seed * 7 + i) % 300, dtype=dtype)
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        params.append(p)
    return params


def test_concurrent_calls_from_eight_threads(backend):
    """Eight threads clip their own parameter sets at once; each gets exactly what a call alone gives."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is not a concurrency test; covered on GPU")
    alone = [_params(seed, 50) for seed in range(8)]
    alone_norms = [fastclip.clip_(params, 0.5, backend=backend) for params in alone]
    together = [_params(seed, 50) for seed in range(8)]
    together_norms = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        for _ in range(5):  # repeated (each call clips the last one's result), so calls overlap in time
            together_norms[i] = fastclip.clip_(together[i], 0.5, backend=backend)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        expected_params = _params(i, 50)
        norms = [fastclip.clip_(expected_params, 0.5, backend=backend) for _ in range(5)]
        assert_same(together_norms[i], norms[-1], f"thread {i} norm")
        for p, q in zip(together[i], expected_params):
            assert_same(p.grad, q.grad, f"thread {i} gradient")
        assert_same(alone_norms[i], fastclip.clip_(_params(i, 50), 0.5, backend=backend), f"set {i} alone")


def test_one_hundred_thousand_tiny_tensors(backend):
    if backend == "triton":
        pytest.skip("100,000 interpreted Triton programs take minutes; covered on GPU")
    params = _params(3, 100_000)
    reference = _params(3, 100_000)
    pristine = [p.grad.clone() for p in reference]
    torch_norm = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    norm = fastclip.clip_(params, 0.5, backend=backend)
    assert_norm_error_bound(norm, torch_norm, pristine, 2.0)
    expected = _params(3, 100_000)
    torch.nn.utils.clip_grads_with_norm_(expected, 0.5, norm)
    assert all(torch.equal(p.grad, e.grad) for p, e in zip(params, expected)), "[E3] gradients"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_of_more_than_2_to_the_31_elements(backend, dtype):
    """64-bit indexing: a 2^31 + 3 element gradient (4 GiB) whose last three elements decide the
    norm (3, 4, 12: exactly 13) and must be scaled exactly like torch scales them."""
    if backend == "triton":
        pytest.skip("4 GiB through the Triton interpreter takes too long; covered on GPU")
    n = 2**31 + 3
    try:
        grad = torch.zeros(n, dtype=dtype)
    except RuntimeError:
        pytest.skip("not enough memory for a 4 GiB tensor")
    grad[-3:] = torch.tensor([3.0, 4.0, 12.0])
    param = torch.zeros((), dtype=dtype).expand(n)
    param.grad = grad
    norm = fastclip.clip_([param], 6.5, backend=backend)
    assert float(norm) == 13.0
    expected = torch.zeros(5, dtype=dtype)
    expected[-3:] = torch.tensor([3.0, 4.0, 12.0])
    small = torch.zeros((), dtype=dtype).expand(5)
    small.grad = expected
    torch.nn.utils.clip_grads_with_norm_([small], 6.5, norm)
    assert torch.equal(grad[-5:], expected)
    assert int(torch.count_nonzero(grad[: n - 3])) == 0


_PEAK_MEMORY_SCRIPT = """
import resource, sys, torch, fastclip
backend, total_mib, overflow_safe = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
params = []
for _ in range(64):
    p = torch.zeros(total_mib * 2**20 // 4 // 64)
    p.grad = torch.randn(p.shape) * 10  # a norm far above max_norm: every call scales
    params.append(p)
warm_up = [torch.zeros(70_000, requires_grad=True) for _ in range(2)]
for w in warm_up:
    w.grad = torch.randn(w.shape)
fastclip.clip_(warm_up, 1e-3, backend=backend, overflow_safe=overflow_safe)  # first-call set-up, small
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    fastclip.clip_(params, 1.0, backend=backend, overflow_safe=overflow_safe)
    fastclip.get_total_norm([p.grad for p in params], backend=backend, overflow_safe=overflow_safe)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("growth_kib", after - before)
"""


@pytest.mark.parametrize("overflow_safe", [False, True], ids=["plain", "overflow_safe"])
def test_workspace_does_not_grow_with_gradient_size(backend, overflow_safe):
    """Peak memory (the process's resident high-water mark, in a fresh process) grows by less than
    4 MiB while clipping 32 MiB or 256 MiB of gradients: no call copies a gradient. The torch
    backend's overflow-safe norm, a reference implementation, makes an fp64 copy of one gradient at
    a time and is left out; the Triton interpreter is left out (test_cuda checks GPU memory)."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is not a memory test; covered on GPU")
    if backend == "torch" and overflow_safe:
        pytest.skip("the torch backend's overflow-safe norm copies one gradient at a time to fp64")
    for total_mib in (32, 256):
        result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, backend, str(total_mib), str(int(overflow_safe))],
                                capture_output=True, text=True, check=True)
        growth_kib = int(result.stdout.split("growth_kib")[1])
        assert growth_kib < 4096, f"{total_mib} MiB of gradients: peak memory grew by {growth_kib} KiB"
