"""Builds fastclip and its C++/CUDA extension ``fastclip._C`` (csrc/) against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against the torch
already in the environment. The CPU kernels are always built; the CUDA kernels too when torch has
CUDA (``torch.version.cuda``) and nvcc is found (``CUDA_HOME``). ``FASTCLIP_USE_CPP=0`` gives a
pure-Python install. ``MAX_JOBS`` limits ninja's parallelism and ``TORCH_CUDA_ARCH_LIST`` the GPU
architectures, as in every torch extension (default here, when no GPU is visible: 8.0;9.0).
"""

import glob
import os

from setuptools import setup

# fp-contract=off: no fused multiply-adds, so every instruction-set variant of the CPU kernels
# rounds exactly like torch's separate multiply and add. -fopenmp: at::parallel_for is an OpenMP
# pragma in an ATen header, which runs on one thread unless the extension is built with OpenMP; the
# library then shares torch's libgomp (same soname) and its thread count. -Wno-psabi: the SIMD
# vector types never cross a library boundary, so GCC's ABI note is moot.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
# No fast math: divisions, square roots and conversions must round like torch's kernels.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _build_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("FASTCLIP_USE_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension_build():
    """(ext_modules, cmdclass) for setup(); empty when FASTCLIP_USE_CPP=0."""
    if os.environ.get("FASTCLIP_USE_CPP", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastclip_ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    if not _build_cuda():
        extension = CppExtension("fastclip._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])
        return [extension], {"build_ext": BuildExtension}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    sources += ["csrc/fastclip_cuda_ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))]
    extension = CUDAExtension(
        "fastclip._C",
        sources,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
