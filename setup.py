"""Builds fastclip and its C++ extension ``fastclip._C`` (csrc/) against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against the torch
already in the environment. ``FASTCLIP_USE_CPP=0`` gives a pure-Python install. ``MAX_JOBS`` limits
ninja's parallelism, as in every torch extension.
"""

import glob
import os

from setuptools import setup


def extension_build():
    """(ext_modules, cmdclass) for setup(); empty when FASTCLIP_USE_CPP=0."""
    if os.environ.get("FASTCLIP_USE_CPP", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = ["csrc/fastclip_ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # fp-contract=off: no fused multiply-adds, so every instruction-set variant of the kernels
    # rounds exactly like torch's separate multiply and add. -fopenmp: at::parallel_for is an
    # OpenMP pragma in an ATen header, which runs on one thread unless the extension is built with
    # OpenMP; the library then shares torch's libgomp (same soname) and its thread count.
    # -Wno-psabi: the SIMD vector types never cross a library boundary, so GCC's ABI note is moot.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
    extension = CppExtension("fastclip._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
