"""Builds fastclip and its C++/CUDA extension ``fastclip._C`` (csrc/) against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against the torch
already in the environment. The CPU kernels are always built; the CUDA kernels too when torch has
CUDA (``torch.version.cuda``) and a CUDA toolkit is found (see :func:`find_cuda_home`).
``FASTCLIP_USE_CPP=0`` gives a pure-Python install; ``FASTCLIP_USE_CUDA=0`` leaves the CUDA kernels
out, ``FASTCLIP_USE_CUDA=1`` makes a missing toolkit an error instead of a warning. ``MAX_JOBS``
limits ninja's parallelism and ``TORCH_CUDA_ARCH_LIST`` the GPU architectures, as in every torch
extension (default: the visible GPUs', else 8.0;9.0, and 10.0 with CUDA 12.8 or newer).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# fp-contract=off: no fused multiply-adds, so every instruction-set variant of the CPU kernels
# rounds exactly like torch's separate multiply and add. -fopenmp: at::parallel_for is an OpenMP
# pragma in an ATen header, which runs on one thread unless the extension is built with OpenMP; the
# library then shares torch's libgomp (same soname) and its thread count. -Wno-psabi: the SIMD
# vector types never cross a library boundary, so GCC's ABI note is moot.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
# No fast math: divisions, square roots and conversions must round like torch's kernels.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# Ampere and Hopper data-centre GPUs when the build machine has no GPU to ask; Blackwell too where
# the toolkit and torch know it (CUDA 12.8 and newer).
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")
BLACKWELL_ARCH, BLACKWELL_CUDA = "10.0", (12, 8)


def _toolkit_root_of(nvcc: str) -> str | None:
    """The toolkit root that ``nvcc`` really uses. nvcc is often a wrapper script or a symlink
    (/usr/local/bin/nvcc, conda, ccache), so its own folder says nothing; nvcc's dry run prints
    the root it resolved (``#$ TOP=...``)."""
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: ``CUDA_HOME`` (or ``CUDA_PATH``) if set, else the root of the
    ``nvcc`` on PATH as nvcc itself reports it, else /usr/local/cuda; None if there is none.

    torch guesses the root as the folder above ``which nvcc``, which is wrong for a wrapper
    script and then fails deep in the build (``cuda_runtime.h: No such file or directory``).

    Raises:
        SystemExit: ``CUDA_HOME``/``CUDA_PATH`` is set but holds no toolkit.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root:
            if not _is_toolkit(root):
                sys.exit(f"fastclip: {variable}={root} holds no CUDA toolkit (no include/cuda_runtime.h)")
            return root
    nvcc = shutil.which("nvcc")
    for root in (_toolkit_root_of(nvcc) if nvcc else None, "/usr/local/cuda"):
        if _is_toolkit(root):
            return root
    return None


def _cuda_version(text: str | None) -> tuple[int, int]:
    match = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _toolkit_version(cuda_home: str) -> tuple[int, int]:
    """(major, minor) of the toolkit's nvcc, from ``nvcc --version`` (``... release 13.0, V13.0.88``)."""
    try:
        output = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    return _cuda_version(output.rpartition("release")[2])


def _cuda_home_or_none() -> str | None:
    """The toolkit for a CUDA build, or None for a CPU-only one (with a warning, or an error when
    ``FASTCLIP_USE_CUDA=1`` asks for CUDA): when none is found, or when its major version is not
    torch's (torch refuses to build extensions across CUDA major versions)."""
    import torch

    wanted = os.environ.get("FASTCLIP_USE_CUDA", "auto")
    if wanted == "0" or (torch.version.cuda is None and wanted != "1"):
        return None
    if torch.version.cuda is None:
        sys.exit(f"fastclip: FASTCLIP_USE_CUDA=1, but torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    toolkit_major, toolkit_minor = _toolkit_version(cuda_home) if cuda_home else (0, 0)
    if cuda_home is None:
        problem = f"no CUDA toolkit found for torch {torch.__version__} (CUDA {torch.version.cuda})"
    elif toolkit_major != _cuda_version(torch.version.cuda)[0]:
        problem = (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit_major}.{toolkit_minor}, but torch {torch.__version__} was built "
                   f"with CUDA {torch.version.cuda}, and the major versions must agree")
    else:
        return cuda_home
    hint = "set CUDA_HOME to a matching toolkit's root (the folder holding bin/nvcc and include/cuda_runtime.h)"
    if wanted == "1":
        sys.exit(f"fastclip: {problem}: {hint}")
    print(f"fastclip: WARNING: {problem}; building the CPU kernels only (the Triton backend still serves CUDA "
          f"tensors); for the CUDA kernels, {hint}", file=sys.stderr)
    return None


def _default_cuda_archs(cuda_home: str) -> str:
    """The architectures to build for: the visible GPUs', else DEFAULT_CUDA_ARCHS (+ Blackwell)."""
    import torch

    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    archs = list(DEFAULT_CUDA_ARCHS)
    if min(_toolkit_version(cuda_home), _cuda_version(torch.version.cuda)) >= BLACKWELL_CUDA:
        archs.append(BLACKWELL_ARCH)
    return ";".join(archs)


def _cuda_arch_macro() -> str:
    """TORCH_CUDA_ARCH_LIST as a macro value the extension reports (``8.0;9.0+PTX`` -> ``80_90``: one
    preprocessing number, since nvcc splits -D values at commas)."""
    archs = re.findall(r"(\d+)\.(\d+)", os.environ["TORCH_CUDA_ARCH_LIST"])
    return "_".join(major + minor for major, minor in archs)


def extension_build():
    """(ext_modules, cmdclass) for setup(); empty when FASTCLIP_USE_CPP=0."""
    if os.environ.get("FASTCLIP_USE_CPP", "1") == "0":
        return [], {}
    cuda_home = _cuda_home_or_none()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastclip_ops.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    if cuda_home is None:
        extension = CppExtension("fastclip._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])
        return [extension], {"build_ext": BuildExtension}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_cuda_archs(cuda_home))
    sources += ["csrc/fastclip_cuda_ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))]
    extension = CUDAExtension(
        "fastclip._C",
        sources,
        define_macros=[("FASTCLIP_CUDA_ARCHS", _cuda_arch_macro())],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions
    ext_modules, cmdclass = extension_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
