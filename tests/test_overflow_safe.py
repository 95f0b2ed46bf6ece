"""``overflow_safe=True``: the scaled norm that stays finite where torch's squares overflow (1e20 in
fp32) and exact where they underflow (1e-25), on every backend.

The reference is the p-norm of all elements as one vector in 60-digit decimal arithmetic (no
overflow there). The norm is computed in fp64 after power-of-two scaling, so an fp32 result must be
the truth to within 1 ulp of fp32 (rounding plus a negligible fp64 error); an fp64 result is
bounded like E5: 2 ulp of fp64, or torch's own error on the same sum, whichever is larger. Gradients must be exactly torch's scaling by the returned norm
(E3), so the direction is kept.
"""

from __future__ import annotations

import decimal
import functools
import math

import pytest
import torch

import fastclip
from harness import assert_same, refusal_reason, ulp_scale


def _exact_norm(tensors: list[torch.Tensor], p: float) -> float:
    """The p-norm of every element as one vector, in decimal arithmetic, rounded once to float64."""
    values = [abs(v) for t in tensors for v in t.detach().double().reshape(-1).tolist()]
    if any(math.isnan(v) for v in values):  # before max(), which skips or keeps NaN by position
        return math.nan
    if math.isinf(p):
        return max(values, default=0.0)
    if any(math.isinf(v) for v in values):
        return math.inf
    with decimal.localcontext(decimal.Context(prec=60, Emin=-10**6, Emax=10**6)):
        power = decimal.Decimal(p)
        total = sum((decimal.Decimal(v) ** power for v in values if v), decimal.Decimal(0))
        return float(total ** (1 / power)) if total else 0.0


def _grads(spec: list[tuple[int, torch.dtype, float]], seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for numel, dtype, scale in spec:
        p = torch.nn.Parameter(torch.zeros(numel, dtype=dtype))
        # Values in [0.5, 2) * scale with random signs: scale is the magnitude that matters.
        magnitudes = torch.rand(numel, generator=generator, dtype=torch.float64) * 1.5 + 0.5
        signs = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
        p.grad = (magnitudes * signs * scale).to(dtype)
        params.append(p)
    return params


CASES = {
    "fp32 1e20 (torch: inf)": [(1000, torch.float32, 1e20), (70000, torch.float32, 1e19)],
    "fp32 1e-25 (torch: underflow)": [(1000, torch.float32, 1e-25), (3, torch.float32, 1e-24)],
    "bf16 1e20 and 1e-25": [(5000, torch.bfloat16, 1e20), (5000, torch.bfloat16, 1e-25)],
    "fp16 norm beyond fp16 range": [(100_000, torch.float16, 1e3)],
    "fp64 1e200 and 1e-200": [(66000, torch.float64, 1e200), (10, torch.float64, 1e-200)],
    "fp64 1e-200 alone": [(1000, torch.float64, 1e-200)],
    "mixed dtypes and magnitudes": [(1000, torch.float32, 1e20), (300, torch.bfloat16, 1e-25),
                                    (70000, torch.float16, 1.0), (0, torch.float32, 1.0),
                                    (1, torch.float64, 1e-30), (2000, torch.float64, 1e100)],
    "ordinary values": [(4096, torch.float32, 1.0), (100, torch.bfloat16, 0.01)],
    # A norm below fp32's smallest normal (1.2e-38): rounded once, it is off by up to half of the
    # subnormal spacing (2^-149), which the bound counts in (harness.ulp_scale; found by the fuzzer).
    "fp32 subnormal norm": [(3, torch.float32, 1e-40), (2, torch.float32, 3e-41)],
    # An all-zero gradient once set the common exponent (frexp(0) is 0) in the torch backend, and
    # the root of a sum near 2^-300 cost ~17 ulp (found by the fuzzer).
    "tiny norm next to an all-zero gradient": [(1, torch.float64, 1e-30), (4, torch.float32, 0.0)],
    # The layout of a fuzzer case whose fp64 L1 sum the 32 lanes' combination in double left 2.4 ulp
    # off (these values passed before too; test_differential's random fp64 cases cover it).
    "fp64 1e30 next to fp32 near 1": [(1, torch.float32, 1.0), (1023, torch.float32, 1.0), (1023, torch.float64, 1e30)],
}


def _expected_dtype(params: list[torch.Tensor]) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, {p.grad.dtype for p in params})
    return torch.promote_types(dtype, torch.float32)


def _torch_own_error(tensors: list[torch.Tensor], p: float, truth: float) -> float:
    """The error of torch's own fp64 norm of all the elements, scaled by one power of two so that
    it cannot overflow: what E5 calls torch's own error, for the same definition of the norm."""
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    if flat.numel() == 0:
        return 0.0
    exponent = torch.frexp(flat.abs().max()).exponent
    norm = torch.ldexp(torch.linalg.vector_norm(torch.ldexp(flat, -exponent), p), exponent)
    return abs(float(norm) - truth)


def check_overflow_safe_bound(norm: torch.Tensor, tensors: list[torch.Tensor], p: float) -> None:
    """E5 for the overflow-safe norm: the error is at most torch's own error or, for an fp32 result,
    1 ulp (it is an fp64 result rounded once), for fp64, 2 ulp, or 2/p ulp for p < 1: the p-th root
    multiplies the relative error of the sum (about 1 ulp: rounded powers, then a compensated or
    pairwise sum) by 1/p."""
    truth = _exact_norm(tensors, p)
    if not math.isfinite(truth):
        assert float(norm) == truth or (math.isnan(float(norm)) and math.isnan(truth)), (float(norm), truth)
        return
    ulps = 1 if norm.dtype == torch.float32 else max(2.0, 2.0 / p if math.isfinite(p) else 2.0)
    bound = max(ulps * ulp_scale(truth, norm.dtype), _torch_own_error(tensors, p, truth))
    assert abs(float(norm) - truth) <= bound, (float(norm), truth)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_overflow_safe_clip(backend, case, norm_type):
    params = _grads(CASES[case], seed=1)
    pristine = [p.grad.clone() for p in params]
    grads = [p.grad for p in params]
    if refusal_reason(backend, grads, norm_type) is not None:
        with pytest.raises(ValueError, match="cannot serve"):
            fastclip.clip_(params, 1.0, norm_type, overflow_safe=True, backend=backend)
        for g, before in zip(grads, pristine):
            assert_same(g, before, "gradient after a refused call")
        return
    if math.isinf(norm_type) and any(g.numel() == 0 for g in grads):  # as torch: the max has no identity
        with pytest.raises(RuntimeError, match="identity"):
            fastclip.clip_(params, 1.0, norm_type, overflow_safe=True, backend=backend)
        for g, before in zip(grads, pristine):
            assert_same(g, before, "gradient after a refused call")
        return
    norm = fastclip.clip_(params, 1.0, norm_type, overflow_safe=True, backend=backend)
    assert norm.dtype == _expected_dtype(params)
    check_overflow_safe_bound(norm, pristine, norm_type)
    # E3: exactly torch's scaling by the returned norm: finite, direction kept.
    expected = [torch.nn.Parameter(torch.zeros_like(g)) for g in pristine]
    for e, g in zip(expected, pristine):
        e.grad = g.clone()
    torch.nn.utils.clip_grads_with_norm_(expected, 1.0, norm)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_same(p.grad, e.grad, f"[E3] gradient {i}")
    # get_total_norm gives the same norm and leaves its input untouched.
    again = _grads(CASES[case], seed=1)
    assert_same(fastclip.get_total_norm([p.grad for p in again], norm_type, overflow_safe=True, backend=backend),
                norm, "get_total_norm")
    for p, before in zip(again, pristine):
        assert_same(p.grad, before, "get_total_norm's input")


def test_direction_kept_where_torch_zeroes_everything(backend):
    """The issue's case: fp32 gradients of 1e20. torch's norm is inf and every gradient becomes 0;
    the overflow-safe norm is finite and the clipped gradients point the same way."""
    params = _grads([(1000, torch.float32, 1e20)], seed=2)
    original = params[0].grad.clone()
    reference = _grads([(1000, torch.float32, 1e20)], seed=2)
    assert math.isinf(torch.nn.utils.clip_grad_norm_(reference, 1.0))
    assert torch.all(reference[0].grad == 0)
    norm = fastclip.clip_(params, 1.0, overflow_safe=True, backend=backend)
    assert math.isfinite(float(norm))
    clipped = params[0].grad.double()
    assert abs(float(torch.linalg.vector_norm(clipped)) - 1.0) < 1e-5
    cosine = float(torch.nn.functional.cosine_similarity(clipped, original.double(), dim=0))
    assert cosine > 1 - 1e-6


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=str)
def test_nonfinite_gradients(backend, value):
    """inf and NaN are not overflow: the norm is inf or NaN, as torch's, and error_if_nonfinite
    raises with every gradient untouched."""
    params = _grads([(70000, torch.float32, 1e20), (100, torch.bfloat16, 1.0)], seed=3)
    params[0].grad[66000] = value
    pristine = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.clip_(params, 1.0, error_if_nonfinite=True, overflow_safe=True, backend=backend)
    for p, before in zip(params, pristine):
        assert_same(p.grad, before, "gradient after a refused clip")
    norm = fastclip.get_total_norm([p.grad for p in params], overflow_safe=True, backend=backend)
    assert (math.isnan(float(norm)) if math.isnan(value) else float(norm) == math.inf)


def test_error_if_nonfinite_does_not_fire_on_overflow(backend):
    """Where torch's norm overflows (and its error_if_nonfinite raises), the safe norm is finite."""
    params = _grads([(1000, torch.float32, 1e20)], seed=4)
    norm = fastclip.clip_(params, 1.0, error_if_nonfinite=True, overflow_safe=True, backend=backend)
    assert math.isfinite(float(norm))


def test_overflow_safe_must_be_a_bool():
    params = _grads([(10, torch.float32, 1.0)], seed=5)
    with pytest.raises(TypeError, match="overflow_safe"):
        fastclip.clip_(params, 1.0, overflow_safe="yes")
    with pytest.raises(TypeError, match="overflow_safe"):
        fastclip.get_total_norm([p.grad for p in params], overflow_safe=1)


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -math.inf], ids=str)
def test_overflow_safe_needs_a_positive_norm_type(norm_type):
    params = _grads([(10, torch.float32, 1.0)], seed=6)
    before = params[0].grad.clone()
    with pytest.raises(ValueError, match="norm_type > 0"):
        fastclip.clip_(params, 1.0, norm_type, overflow_safe=True)
    assert_same(params[0].grad, before, "gradient after a refused call")
