"""Build script: a pure-Python package for now; the C++/CUDA extension is added with its kernels."""

from setuptools import setup

setup()
