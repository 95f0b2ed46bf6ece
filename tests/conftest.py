"""Shared fixtures: fixed seeds, and the ``backend`` fixture that runs a test once per backend.

A backend that is unavailable on this machine is skipped, unless it is listed in the environment
variable ``FASTCLIP_TEST_REQUIRE`` (space-separated names): then its absence is a failure. CI sets it,
so a broken build cannot turn into a green run of skipped tests. The name ``cuda-build`` there
requires fastclip._C to have CUDA kernels (tests/test_build.py).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from fastclip._dispatch import BACKENDS, backend_status

REQUIRED_BACKENDS = set(os.environ.get("FASTCLIP_TEST_REQUIRE", "").split())


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    torch.manual_seed(0)


def require_backend(name: str, device: str = "cpu") -> None:
    """Skip the calling test if ``name`` cannot run on ``device`` here (fail if it is required)."""
    reason = backend_status(device)[name]
    if reason is None:
        return
    if name in REQUIRED_BACKENDS:
        pytest.fail(f"backend {name!r} is required (FASTCLIP_TEST_REQUIRE) but unavailable: {reason}")
    pytest.skip(f"backend {name!r} unavailable on {device}: {reason}")


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    """Each backend name in turn, for CPU tensors."""
    require_backend(request.param)
    return request.param
