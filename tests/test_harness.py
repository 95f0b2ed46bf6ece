"""Negative controls: deliberately wrong backends that the differential harness must catch.

Without these, a harness that compares nothing (or compares a tensor with itself) would pass too.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastclip._dispatch import BACKENDS
from fastclip.backends.torch_backend import TorchBackend, clip_coefficient, scale_grads_
from harness import GradSpec, check_clip

SPECS = [GradSpec((1025,)), GradSpec((7, 9), torch.bfloat16, "strided"), GradSpec((3,), torch.float16)]
DYADIC = [GradSpec(s.shape, s.dtype, s.layout, "dyadic") for s in SPECS]


class NormOneUlpHigh(TorchBackend):
    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        norm = super().get_total_norm(tensors, norm_type, foreach, overflow_safe)
        return torch.nextafter(norm, torch.tensor(math.inf, dtype=norm.dtype))


class SkipsLastGradient(TorchBackend):
    def clip_grads_with_norm_(self, grads, max_norm, total_norm, foreach):
        super().clip_grads_with_norm_(grads[:-1], max_norm, total_norm, foreach)


class MissesOneElement(TorchBackend):
    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        return super().get_total_norm([tensors[0][1:]] + tensors[1:], norm_type, foreach, overflow_safe)


class ScalesTheGaps(TorchBackend):
    """Scales a strided gradient through its whole underlying buffer, gaps included."""

    def clip_grads_with_norm_(self, grads, max_norm, total_norm, foreach):
        coefficient = clip_coefficient(total_norm, max_norm)
        for g in grads:
            base = g if g.is_contiguous() else g._base
            scale_grads_([base], coefficient, foreach)


class HalfClipsBeforeNormCheck(TorchBackend):
    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        tensors[0].mul_(0.5)
        return super().get_total_norm(tensors, norm_type, foreach, overflow_safe)


class FusedOnePercentHigh(TorchBackend):
    """Consistent scaling, but a norm 1% too large: E5 must catch it."""

    def get_total_norm(self, tensors, norm_type, foreach, overflow_safe=False):
        return super().get_total_norm(tensors, norm_type, foreach, overflow_safe) * 1.01


class FusedWrongCoefficient(TorchBackend):
    """Right norm, but a coefficient from a true division (one rounding instead of torch's two)."""

    def clip_grads_with_norm_(self, grads, max_norm, total_norm, foreach):
        scale_grads_(grads, torch.clamp(torch.tensor(max_norm) / (total_norm + 1e-6), max=1.0), foreach)


# (wrong backend, the name it stands in for, gradients, extra arguments). Standing in for "torch"
# puts it under E1 (bit-identical); any other name under the fused backends' clauses E3/E4/E5.
WRONG_BACKENDS = [
    (NormOneUlpHigh, "torch", SPECS, {}),
    (SkipsLastGradient, "torch", SPECS, {}),
    (SkipsLastGradient, "fused_wrong", SPECS, {}),
    (MissesOneElement, "fused_wrong", DYADIC, {}),
    (ScalesTheGaps, "fused_wrong", SPECS, {}),
    (HalfClipsBeforeNormCheck, "fused_wrong", SPECS, {"special_values": [(0, 3, math.nan)], "error_if_nonfinite": True}),
    (FusedOnePercentHigh, "fused_wrong", SPECS, {}),
]


@pytest.mark.parametrize(
    "wrong, poses_as, specs, kwargs", WRONG_BACKENDS, ids=[f"{w.__name__}-as-{n}" for w, n, _, _ in WRONG_BACKENDS]
)
def test_harness_catches_wrong_backend(monkeypatch, wrong, poses_as, specs, kwargs):
    monkeypatch.setitem(BACKENDS, poses_as, wrong())
    with pytest.raises(AssertionError):
        check_clip(poses_as, specs, 0.5, 2.0, **kwargs)


def test_harness_catches_wrong_coefficient_rounding(monkeypatch):
    # A single-rounding coefficient differs from torch's two roundings on some norms; find one
    # input where it does, so the E3 check is shown to see a one-ulp coefficient error.
    monkeypatch.setitem(BACKENDS, "fused_wrong", FusedWrongCoefficient())
    failures = 0
    for seed in range(20):
        try:
            check_clip("fused_wrong", SPECS, 0.7, 2.0, seed=seed)
        except AssertionError:
            failures += 1
    assert failures > 0


def test_harness_accepts_the_right_backend(monkeypatch):
    monkeypatch.setitem(BACKENDS, "right", TorchBackend())
    check_clip("right", SPECS, 0.5, 2.0)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed", "channels_last"])
def test_dyadic_gradients_have_exact_square_sums(layout):
    """E4 rests on it: every dyadic gradient's own sum of squares (not its buffer's) is the square of
    a multiple of 1/8, for every layout. A strided gradient is half its buffer, whose sum once was
    the square (a randomised fuzz run found torch and the cpp backend a float apart on one)."""
    from harness import build

    shape = (2, 3, 4, 5) if layout == "channels_last" else (1023,) if layout == "strided" else (7, 9)
    for seed in range(50):
        params, _ = build([GradSpec(shape, torch.float32, layout, "dyadic")], seed)
        eighths_squared = round(math.fsum(float(v) ** 2 for v in params[0].grad.reshape(-1).tolist()) * 64)
        assert math.isqrt(eighths_squared) ** 2 == eighths_squared, (seed, eighths_squared)
