"""Loads the compiled extension ``fastclip._C`` once and remembers why it failed, if it did.

Importing ``fastclip._C`` registers the ``torch.ops.fastclip.*`` operators with the dispatcher; the
module itself exports nothing. A missing module is the normal state of a pure-Python install
(``FASTCLIP_USE_CPP=0``) and stays silent; a module that exists but fails to load (an ABI mismatch
with the installed torch, say) is reported once as a warning, and every later query gets the reason.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch


@functools.cache
def load_error() -> str | None:
    """Why ``fastclip._C`` could not be loaded, or None if it is loaded. Tries only once."""
    if os.environ.get("FASTCLIP_USE_CPP", "1") == "0":
        return "disabled by FASTCLIP_USE_CPP=0"
    try:
        import fastclip._C  # noqa: F401  (registers torch.ops.fastclip)
    except ModuleNotFoundError as e:
        if e.name != "fastclip._C":
            raise
        return "extension not built (install with `pip install --no-build-isolation -e .` and a C++ compiler)"
    except (ImportError, OSError) as e:
        reason = f"extension failed to load: {e}"
        warnings.warn(f"fastclip: {reason}; falling back to other backends", RuntimeWarning, stacklevel=2)
        return reason
    return None


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered ``fastclip::<op_name>`` for ``dispatch_key`` (CPU, CUDA)."""
    return load_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastclip::{op_name}", dispatch_key)


def build_description() -> str:
    """How the extension was built, for ``python -m fastclip.info``: ``built with CUDA, no device
    (kernels for sm_80, sm_90)``, ``built for CPU only``, or why it is not loaded."""
    error = load_error()
    if error is not None:
        return f"not loaded: {error}"
    import fastclip._C

    if not fastclip._C.cuda_archs:
        return "built for CPU only (no CUDA kernels)"
    kernels = ", ".join(f"sm_{arch}" for arch in fastclip._C.cuda_archs.split("_"))
    if not torch.cuda.is_available():
        return f"built with CUDA, no device (kernels for {kernels})"
    major, minor = torch.cuda.get_device_capability()
    return f"built with CUDA, device {torch.cuda.get_device_name()} (sm_{major}{minor}; kernels for {kernels})"
