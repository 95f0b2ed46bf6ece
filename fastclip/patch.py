"""``patch_torch()``: make ``torch.nn.utils``'s clipping functions call fastclip, so that trainers
which call them (PyTorch Lightning, Hugging Face Trainer, torchtitan) use fastclip unchanged.

Trainers look the functions up on ``torch.nn.utils`` when they clip, so replacing the module
attributes reaches them. Code that imported a function by name before patching
(``from torch.nn.utils import clip_grad_norm_``) keeps its own reference and is not affected.
"""

from __future__ import annotations

import functools
import threading

import torch.nn.utils
import torch.nn.utils.clip_grad

from fastclip import api
from fastclip._dispatch import BACKENDS

# torch.nn.utils name -> fastclip's drop-in. Same positional signatures, same results (E1-E5).
REPLACEMENTS = {
    "clip_grad_norm_": api.clip_,
    "get_total_norm": api.get_total_norm,
    "clip_grads_with_norm_": api.clip_grads_with_norm_,
}
# Both the package and the module that defines the functions: trainers use either spelling.
_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
_lock = threading.Lock()


class patch_torch:
    """Replace ``torch.nn.utils.clip_grad_norm_``, ``get_total_norm`` and ``clip_grads_with_norm_``
    with fastclip's, at once; undo with :meth:`undo` or by using it as a context manager.

    Example::

        fastclip.patch_torch()           # for the rest of the process
        with fastclip.patch_torch():     # for a block
            trainer.fit(model)

    Patches nest: each one restores, when undone, exactly what it replaced.

    Args:
        backend (str): the fastclip backend the patched functions use. Default: ``"auto"``
    """

    def __init__(self, backend: str = "auto"):
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        self._saved: list[tuple[object, str, object]] = []
        replacements = {
            name: fn if backend == "auto" else functools.update_wrapper(functools.partial(fn, backend=backend), fn)
            for name, fn in REPLACEMENTS.items()
        }
        with _lock:
            for module in _MODULES:
                for name, fn in replacements.items():
                    if hasattr(module, name):  # clip_grad names two of them with a leading _
                        self._saved.append((module, name, getattr(module, name)))
                        setattr(module, name, fn)

    def undo(self) -> None:
        """Put back what this patch replaced (a second call does nothing)."""
        with _lock:
            while self._saved:
                module, name, original = self._saved.pop()
                setattr(module, name, original)

    def __enter__(self) -> patch_torch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()
