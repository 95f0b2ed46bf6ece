"""Hypothesis-based differential fuzzing of every backend against torch.

Inputs: lists of gradients with random shapes, dtypes, layouts, magnitudes and special values
(NaN, ±inf, huge, tiny, ±0), random norm types and max_norm. The CI profile runs a fixed number of
examples derandomised (repeatable): 700 per backend, 2,100 in all; ``HYPOTHESIS_PROFILE=release``
runs a long random search (20,000 per backend).
"""

from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import FLOAT_DTYPES, GradSpec, check_clip

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
