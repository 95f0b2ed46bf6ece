"""Hypothesis-based differential fuzzing of every backend against torch.

Inputs: lists of gradients with random shapes, dtypes, layouts, magnitudes and special values
(NaN, ±inf, huge, tiny, ±0), random norm types and max_norm. The CI profile runs a fixed number of
examples derandomised (repeatable): 700 per backend, 2,100 in all; ``HYPOTHESIS_PROFILE=release``
runs a long random search (20,000 per backend). The overflow-safe norm is fuzzed on the same
inputs with a quarter as many examples.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastclip
from harness import FLOAT_DTYPES, GradSpec, assert_same, build, check_clip, poison, refusal_reason
from test_overflow_safe import check_overflow_safe_bound

settings.register_profile("ci", max_examples=700, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("release", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
    st.sampled_from([(1023,), (1024,), (1025,), (33, 31)]),
)
specs = st.builds(
    GradSpec,
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    values=st.sampled_from(["randn", "randn", "dyadic", "none"]),
    scale=st.sampled_from([1.0, 1e-3, 1e3, 1e-30, 1e30]),
)
special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 6e4, 1e-40])


@st.composite
def cases(draw):
    grads = draw(st.lists(specs, min_size=0, max_size=12))
    specials = []
    with_grad = [i for i, s in enumerate(grads) if s.values != "none" and math.prod(s.shape) > 0]
    for _ in range(draw(st.integers(0, 2)) if with_grad else 0):
        i = draw(st.sampled_from(with_grad))
        specials.append((i, draw(st.integers(0, math.prod(grads[i].shape) - 1)), draw(special)))
    return grads, specials


@given(
    case=cases(),
    norm_type=st.sampled_from([2.0, 1.0, 3.0, 0.5, 0.0, math.inf, -math.inf, "inf"]),
    max_norm=st.sampled_from([1e-3, 0.5, 1.0, 1e6]),
    error_if_nonfinite=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_torch(backend, case, norm_type, max_norm, error_if_nonfinite, seed):
    grads, specials = case
    check_clip(backend, grads, max_norm, norm_type, seed=seed, special_values=specials,
               error_if_nonfinite=error_if_nonfinite)


@settings(max_examples=max(1, settings().max_examples // 4))
@given(
    case=cases(),
    norm_type=st.sampled_from([2.0, 1.0, 3.0, 0.5, math.inf]),
    max_norm=st.sampled_from([1e-3, 1.0, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_overflow_safe(backend, case, norm_type, max_norm, seed):
    """The overflow-safe norm on the same inputs (a quarter as many examples: its reference is
    decimal arithmetic): within its bound of the exact norm, gradients exactly torch's scaling by
    it (E3), or refused with every gradient untouched."""
    specs, specials = case
    params, buffers = build(specs, seed)
    poison(params, specials)
    grads = [p.grad for p in params if p.grad is not None]
    pristine = [g.clone() for g in grads]
    before = [b.clone() for b in buffers]
    refused = refusal_reason(backend, grads, norm_type) is not None
    inf_of_empty = math.isinf(norm_type) and any(g.numel() == 0 for g in grads)
    if refused or inf_of_empty:
        with pytest.raises(ValueError if refused else RuntimeError):
            fastclip.clip_(params, max_norm, norm_type, overflow_safe=True, backend=backend)
        for i, (b, old) in enumerate(zip(buffers, before)):
            assert_same(b, old, f"gradient buffer {i} after a refused call")
        return
    norm = fastclip.clip_(params, max_norm, norm_type, overflow_safe=True, backend=backend)
    if not grads:
        return
    check_overflow_safe_bound(norm, pristine, norm_type)
    expected, expected_buffers = build(specs, seed)
    poison(expected, specials)
    torch.nn.utils.clip_grads_with_norm_(expected, max_norm, norm)
    for i, (b, e) in enumerate(zip(buffers, expected_buffers)):
        assert_same(b, e, f"[E3] gradient buffer {i}")
