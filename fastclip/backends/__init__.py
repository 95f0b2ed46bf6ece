"""The backends, one module each; ``fastclip._dispatch`` chooses among them."""

from fastclip.backends.base import Backend
from fastclip.backends.cpp_backend import CppBackend
from fastclip.backends.torch_backend import TorchBackend
from fastclip.backends.triton_backend import TritonBackend

__all__ = ["Backend", "CppBackend", "TorchBackend", "TritonBackend"]
