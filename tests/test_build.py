"""What the build and the package deliver, as a user installs them.

- With a CUDA build of torch (CI's second lane, torch 2.14.1 with CUDA 13, no GPU), ``fastclip._C``
  holds a CUDA kernel for every operator it defines, and ``python -m fastclip.info`` says so.
  ``FASTCLIP_TEST_REQUIRE`` containing ``cuda-build`` makes a CPU-only extension a failure there.
- The wheel installs ``fastclip`` and nothing else at the top level (the repository's
  ``triton_kernels/`` goes inside, as ``fastclip.triton_kernels``), and works from a fresh venv.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import fastclip  # noqa: F401  (loads the extension)
from conftest import REQUIRED_BACKENDS
from fastclip import _extension

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_BUILD_REQUIRED = "cuda-build" in REQUIRED_BACKENDS


def _fastclip_ops() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastclip::"))


def _built_with_cuda() -> bool:
    if _extension.load_error() is not None:
        return False
    import fastclip._C

    return bool(fastclip._C.cuda_archs)


@pytest.fixture
def cuda_build():
    if not _built_with_cuda():
        if CUDA_BUILD_REQUIRED:
            pytest.fail(f"a CUDA build of fastclip._C is required here (torch {torch.__version__}, CUDA "
                        f"{torch.version.cuda}): {_extension.build_description()}")
        pytest.skip(f"fastclip._C has no CUDA kernels here: {_extension.build_description()}")


# Operators with a CPU kernel only, by design for now: for CUDA tensors the cpp backend refuses these
# operations (cpp_backend.CPU_ONLY_OPERATIONS) and "auto" takes the Triton kernels, so a CUDA kernel
# is never looked for.
CPU_ONLY_OPS = {"fastclip::adaptive_clip_", "fastclip::clip_per_tensor_", "fastclip::scale_by_"}


def test_every_op_has_a_cuda_kernel(cuda_build):
    ops = _fastclip_ops()
    assert len(ops) >= 5, ops  # total_norm, clip_, scale_with_norm_, clip_with_tensor_norms_, clamp_values_
    assert CPU_ONLY_OPS <= set(ops), ops  # the list names real operators
    missing = [op for op in ops if op not in CPU_ONLY_OPS and not _extension.has_kernel(op.removeprefix("fastclip::"),
                                                                                        "CUDA")]
    assert not missing, f"operators without a CUDA kernel: {missing}"
    assert not any(_extension.has_kernel(op.removeprefix("fastclip::"), "CUDA") for op in CPU_ONLY_OPS)


def test_info_reports_the_cuda_build(cuda_build):
    info = subprocess.run([sys.executable, "-m", "fastclip.info"], capture_output=True, text=True, check=True).stdout
    if torch.cuda.is_available():
        assert "built with CUDA, device" in info, info
    else:
        assert "built with CUDA, no device" in info, info
    import fastclip._C

    for arch in fastclip._C.cuda_archs.split("_"):
        assert f"sm_{arch}" in info, info


def test_cpu_build_says_so():
    if _extension.load_error() is not None:
        pytest.skip(_extension.build_description())
    if _built_with_cuda():
        pytest.skip("a CUDA build")
    assert _extension.build_description() == "built for CPU only (no CUDA kernels)"
    assert not any(_extension.has_kernel(op.removeprefix("fastclip::"), "CUDA") for op in _fastclip_ops())


# Run in the fresh venv, from outside the repository: the installed wheel alone must serve every
# backend this machine has (Triton through its interpreter on CPU), with torch's results.
_WHEEL_SMOKE_TEST = textwrap.dedent(
    """
    import pathlib, sys
    import torch
    import fastclip
    assert pathlib.Path(sys.argv[1]) in pathlib.Path(fastclip.__file__).parents, fastclip.__file__
    backends = fastclip.available_backends("cpu")
    for name in sys.argv[2:]:  # the backends this machine must have
        if name not in backends:
            sys.exit(f"backend {name} unavailable from the wheel: {fastclip._dispatch.backend_status('cpu')[name]}")
    for name in backends:
        grads = [torch.arange(1.0, 7.0).reshape(2, 3), torch.full((4,), 2.0)]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        expected = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(params, expected, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = fastclip.clip_(params, 1.0, backend=name)
        torch_norm = torch.nn.utils.clip_grad_norm_(expected, 1.0)
        assert torch.equal(norm, torch_norm), (name, norm, torch_norm)  # dyadic inputs: exact (E4)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, expected)), name
        print("clipped with", name)
    """
)


def test_wheel_holds_only_fastclip_and_works_in_a_fresh_venv(tmp_path):
    if _extension.load_error() is not None:
        pytest.skip(f"needs the C++ toolchain that built fastclip._C: {_extension.build_description()}")
    # CPU kernels only: the CUDA build is checked above, and compiling it again would take minutes.
    env = {**os.environ, "FASTCLIP_USE_CUDA": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(REPO)], check=True, env=env, cwd=tmp_path)
    [wheel] = tmp_path.glob("fastclip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fastclip"}, f"the wheel installs other top-level names: {sorted(top_level - {'fastclip'})}"
    assert "fastclip/triton_kernels/clip.py" in names
    assert any(name.startswith("fastclip/_C") and name.endswith(".so") for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = pathlib.Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # torch, Triton and friends from this venv (not downloaded again), after the fresh venv's own
    # packages on sys.path; the editable fastclip of this venv is not reachable from there (a .pth
    # file's folders do not have their own .pth files run, so its import hook is never installed).
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    required = sorted(REQUIRED_BACKENDS & {"cpp", "triton"})
    result = subprocess.run([python, "-c", _WHEEL_SMOKE_TEST, str(site_packages), *required], capture_output=True,
                            text=True, cwd=outside, env={**env, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clipped with cpp" in result.stdout, result.stdout
    for name in required:
        assert f"clipped with {name}" in result.stdout, result.stdout
    # and nothing named triton_kernels came in at the top level
    top = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('triton_kernels'))"],
                         capture_output=True, text=True, cwd=outside, check=True).stdout.strip()
    assert top == "None", top


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: scripts/gpu-check.sh would run for real")
def test_gpu_check_stops_clearly_without_a_gpu():
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device visible" in result.stderr
    assert not result.stdout  # nothing was built or run


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastclip_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the build helpers; builds nothing (not __main__)
    return module


def _fake_toolkit(root: pathlib.Path) -> pathlib.Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_toolkit_found_through_a_wrapper_nvcc(tmp_path, monkeypatch):
    """A wrapper script named nvcc (as on this machine, conda, ccache) says nothing by its folder;
    setup.py asks nvcc where its toolkit is, where torch would guess the wrapper's parent folder."""
    toolkit = _fake_toolkit(tmp_path / "real-toolkit")
    wrapper_dir = tmp_path / "wrappers" / "bin"
    wrapper_dir.mkdir(parents=True)
    nvcc = wrapper_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert _setup_module().find_cuda_home() == str(toolkit)


def test_cuda_home_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="holds no CUDA toolkit"):
        _setup_module().find_cuda_home()
    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "toolkit")))
    assert _setup_module().find_cuda_home() == str(tmp_path / "toolkit")
