"""The CUDA kernels' launch plan, proven without a GPU (issue 15): one launch per call where the
device allows a cooperative launch, two (after a memset of the call's own counter) where it does
not or refuses it at launch, whatever the number of tensors, their dtypes and the norm.

``csrc/tests/cuda_launch_plan.cpp`` is linked, in place of the CUDA runtime, with the kernels as nvcc
compiles them (PTX for sm_90 only, to keep the build short): it records every launch the host code
asks for and answers device queries as an H100 would (132 SMs, 2 resident blocks of each kernel per
SM). No kernel runs; the kernels' arithmetic is tested where a GPU is lent (tests/test_cuda.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REQUIRED_BACKENDS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc/cuda/clip_kernels.cu", "csrc/cuda/value_clip_kernels.cu", "csrc/tests/cuda_launch_plan.cpp"]
COUNTS = (1, 3, 300, 5000)  # tensors per call; the driver mixes fp32, bf16, fp16 and fp64
NORMS = {"l2": "0", "l1": "1", "inf": "2", "p": "3"}  # the kernels' NormKind of each norm


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The driver's output: scenario name -> {chunks, error, launches, memsets, refused, grids}, and
    "device" -> {sms, blocks_per_sm}."""
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
    if nvcc is None or not os.path.exists(nvcc):
        if "cuda-build" in REQUIRED_BACKENDS:
            pytest.fail("nvcc is required here (FASTCLIP_TEST_REQUIRE has cuda-build) but was not found")
        pytest.skip("no nvcc: the CUDA launch plan cannot be built")
    build = tmp_path_factory.mktemp("launch_plan")
    objects = []
    for source in SOURCES:
        obj = build / (Path(source).stem + ".o")
        subprocess.run([nvcc, "-O1", "--expt-relaxed-constexpr", "-std=c++17", "-gencode", "arch=compute_90,code=compute_90",
                        f"-I{ROOT / 'csrc'}", "-c", str(ROOT / source), "-o", str(obj)], check=True, capture_output=True)
        objects.append(str(obj))
    binary = build / "cuda_launch_plan"
    subprocess.run([nvcc, "-cudart", "none", *objects, "-o", str(binary)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "FASTCLIP_CUDA_COOPERATIVE"}).stdout
    lines = output.splitlines()
    scenarios = {"device": dict(field.split("=") for field in lines[0].split())}
    for line in lines[1:]:
        name, *fields = line.split()
        scenarios[name] = dict(field.split("=", 1) for field in fields)
    return scenarios


def _launches(scenario: dict[str, str]) -> list[str]:
    return scenario["launches"].split(";") if scenario["launches"] else []


def _grids(scenario: dict[str, str]) -> list[tuple[int, int]]:
    return [tuple(map(int, grid.split("x"))) for grid in scenario["grids"].split(";")] if scenario["grids"] else []


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("norm", NORMS)
def test_one_cooperative_launch_per_call(plan, norm, count):
    """Clip and norm-only calls: one launch of the norm's cooperative kernel, no memset, a grid that
    fits on the GPU at once (a cooperative launch with more blocks than can be resident fails) and
    no larger than the number of chunks."""
    resident = int(plan["device"]["sms"]) * int(plan["device"]["blocks_per_sm"])
    for phase in ("clip", "norm"):
        scenario = plan[f"{phase}/cooperative/{norm}/{count}"]
        assert scenario["error"] == "0" and scenario["refused"] == "0"
        assert _launches(scenario) == [f"c{NORMS[norm]}"], scenario
        assert scenario["memsets"] == "0"
        [(grid, block)] = _grids(scenario)
        assert 1 <= grid <= min(resident, int(scenario["chunks"])) and block <= 1024


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("norm", NORMS)
def test_two_launches_without_a_cooperative_launch(plan, norm, count):
    """A device without cooperative launches (MIG, MPS): the call's counter zeroed on the stream, then
    the norm kernel and, when clipping, the scale kernel; a norm-only call stops after the first."""
    clip = plan[f"clip/no-cooperative/{norm}/{count}"]
    assert clip["error"] == "0" and clip["memsets"] == "1"
    assert _launches(clip) == [f"n{NORMS[norm]}", "s"], clip
    norm_only = plan[f"norm/no-cooperative/{norm}/{count}"]
    assert norm_only["memsets"] == "1" and _launches(norm_only) == [f"n{NORMS[norm]}"], norm_only
    for grid, _ in _grids(clip):
        assert 1 <= grid <= min(8 * int(plan["device"]["sms"]), int(clip["chunks"]))


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("norm", NORMS)
def test_a_refused_cooperative_launch_falls_back_to_two(plan, norm, count):
    """Refused at launch (cudaErrorCooperativeLaunchTooLarge: SMs held by another process): the call
    says so (a one-time warning upstream) and runs the two-launch path; the refused launch ran nothing."""
    scenario = plan[f"clip/refused/{norm}/{count}"]
    assert scenario["error"] == "0" and scenario["refused"] == "1" and scenario["memsets"] == "1"
    assert _launches(scenario) == [f"c{NORMS[norm]}", f"n{NORMS[norm]}", "s"], scenario


def test_other_launch_errors_are_reported_not_retried(plan):
    scenario = plan["clip/failed/l2/3"]
    assert scenario["error"] != "0" and scenario["refused"] == "0"
    assert _launches(scenario) == ["c0"], scenario


@pytest.mark.parametrize("count", COUNTS)
def test_scaling_by_a_given_norm_and_value_clipping_take_one_launch(plan, count):
    for device in ("cooperative", "no-cooperative"):
        scenario = plan[f"scale-by-given/{device}/{count}"]
        assert scenario["error"] == "0" and scenario["memsets"] == "0" and _launches(scenario) == ["s"], scenario
    clamp = plan[f"clamp/{count}"]
    assert clamp["error"] == "0" and _launches(clamp) == ["v"], clamp
