"""Argument parsing shared by every public function.

Everything here runs before any backend is chosen, so that bad input is rejected before a single
gradient is touched, and so that every backend receives the same normalised arguments.
"""

from __future__ import annotations

import math
import numbers
import operator
import types
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]


def as_tensor_list(tensors: TensorOrTensors, arg_name: str, *, warn_empty_generator: bool,
                   check_types: bool = True, copy: bool = True) -> list:
    """Turn torch's accepted spellings (a Tensor, a list, any iterable, a generator) into a list.

    Args:
        tensors: what the user passed.
        arg_name: the argument's name, for error messages.
        warn_empty_generator: warn, as ``clip_grad_norm_`` does, when an empty generator is passed
            (usually a sign that ``model.parameters()`` was consumed earlier).
        check_types: raise unless every item is a Tensor; False leaves that to the caller
            (:func:`check_tensor_types`), for a path whose C++ entry checks each item anyway.
        copy: False returns a list passed in as it is, for a caller that only reads it during the
            call: after the backward pass a copy of 10,000 parameters cost ~0.3-0.6 ms on 2 AMD EPYC
            cores (each parameter's uncached object gets its reference count written).

    Returns:
        A list of the items, in the order given.
    """
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{arg_name} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}")
    is_generator = isinstance(tensors, types.GeneratorType)
    items = tensors if type(tensors) is list and not copy else list(tensors)
    if check_types:
        check_tensor_types(items, arg_name)
    if warn_empty_generator and is_generator and not items:
        # Same text and category as torch; stacklevel points at the caller of the public function.
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    return items


def check_tensor_types(items: list, arg_name: str) -> None:
    """Raises TypeError naming the first item of ``items`` that is not a Tensor."""
    # One C-level pass over the types (a model has few), not an isinstance call per tensor: this
    # runs on every training step, for every parameter.
    if not all(issubclass(kind, torch.Tensor) for kind in set(map(type, items))):
        i, item = next((i, item) for i, item in enumerate(items) if not isinstance(item, torch.Tensor))
        raise TypeError(f"{arg_name}[{i}] must be a Tensor, got {type(item).__name__}")


_grad_of = operator.attrgetter("grad")
_device_of = operator.attrgetter("device")
_dtype_of = operator.attrgetter("dtype")
_layout_of = operator.attrgetter("layout")


class TensorSummary(NamedTuple):
    """The distinct devices, dtypes and layouts of a list of tensors, and whether any of them
    overlaps itself in memory (an expanded view: several elements at one address)."""

    devices: set[torch.device]
    dtypes: set[torch.dtype]
    layouts: set[torch.layout]
    self_overlapping: bool
    # The first two tensors (by index) that share elements; checked for plain tensors by the
    # extension only (None on the Python path, which does not look).
    shared_memory: tuple[int, int] | None


def _overlaps_itself(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1


def summarize(tensors: list[torch.Tensor]) -> TensorSummary:
    """What backend selection needs to know about ``tensors``, asked once per call.

    This runs on every training step for every gradient, so plain tensors are summarised by the
    extension in one C++ pass (~300 ns per tensor less than Python attribute lookups); tensor
    subclasses, traced code and pure-Python installs take the Python path.
    """
    from fastclip import _extension

    if not torch.compiler.is_compiling() and _extension.load_error() is None:
        import fastclip._C

        summary = fastclip._C.summarize(tensors)
        if summary is not None:
            return TensorSummary(*summary)
    if torch.compiler.is_compiling():  # plain comprehensions, which Dynamo traces; traced (fake)
        # tensors have no memory to overlap, and the compiled graph runs on the real ones unchecked
        return TensorSummary({t.device for t in tensors}, {t.dtype for t in tensors}, {t.layout for t in tensors},
                             False, None)
    return TensorSummary(set(map(_device_of, tensors)), set(map(_dtype_of, tensors)), set(map(_layout_of, tensors)),
                         any(map(_overlaps_itself, tensors)), None)


def check_gradients(grads: list[torch.Tensor], summary: TensorSummary, arg_name: str, *, written: bool) -> None:
    """Refuses gradients no clipping function can handle, before any is touched.

    Args:
        grads: the gradients (or tensors) of the call.
        summary: :func:`summarize` of ``grads``.
        arg_name: the argument they came from, for messages.
        written: whether the call scales them in place (then self-overlapping views are refused).

    Raises:
        TypeError: a gradient is not floating point (or complex).
        ValueError: a gradient is on the meta device, or overlaps itself or another gradient in
            memory and would be written.
    """
    if not all(d.is_floating_point or d.is_complex for d in summary.dtypes):
        i, g = next((i, g) for i, g in enumerate(grads) if not (g.dtype.is_floating_point or g.dtype.is_complex))
        raise TypeError(f"{arg_name}: gradient {i} has dtype {g.dtype}; only floating-point gradients can be clipped")
    if any(d.type == "meta" for d in summary.devices):
        i = next(i for i, g in enumerate(grads) if g.device.type == "meta")
        raise ValueError(f"{arg_name}: gradient {i} is on the meta device, which holds no values to clip")
    if written and summary.self_overlapping:
        i = next(i for i, g in enumerate(grads) if _overlaps_itself(g))
        raise ValueError(
            f"{arg_name}: gradient {i} overlaps itself in memory (an expanded view, strides {grads[i].stride()}); "
            "scaling it in place would scale shared elements several times. Make it contiguous first."
        )
    if written and summary.shared_memory is not None:
        i, j = summary.shared_memory
        raise ValueError(
            f"{arg_name}: gradients {i} and {j} share memory; scaling both in place would scale the shared "
            "elements twice (pass each gradient once)"
        )


def grads_of(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``parameters``, skipping parameters whose ``.grad`` is None (as torch does)."""
    if torch.compiler.is_compiling():  # Dynamo traces the comprehension, not attrgetter
        return [p.grad for p in parameters if p.grad is not None]
    return [g for g in map(_grad_of, parameters) if g is not None]


def parse_norm_type(norm_type) -> float:
    """``norm_type`` as a float, as torch's ``float(norm_type)``: any real number (numpy's
    included), ``inf``, ``-inf``, the string ``'inf'`` or a one-element tensor."""
    if isinstance(norm_type, torch.Tensor):
        if norm_type.numel() != 1:
            raise ValueError(f"norm_type must be a number or a one-element tensor, got shape {tuple(norm_type.shape)}")
    elif isinstance(norm_type, bool) or not isinstance(norm_type, (numbers.Real, str)):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}")
    try:
        value = float(norm_type)
    except ValueError:
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(value):
        raise ValueError("norm_type must not be NaN")
    return value


def parse_flag(value: bool, arg_name: str) -> bool:
    """A keyword that must be a real bool (a tensor or a string would be truthy by accident)."""
    if not isinstance(value, bool):
        raise TypeError(f"{arg_name} must be a bool, got {type(value).__name__}")
    return value


def parse_overflow_safe(overflow_safe: bool, norm_type: float) -> bool:
    """``overflow_safe``, which scales sums of powers of large values: p > 0 and inf only (p <= 0
    and -inf norms have no such sums, or overflow on small values instead)."""
    if parse_flag(overflow_safe, "overflow_safe") and not norm_type > 0:
        raise ValueError(f"overflow_safe=True needs norm_type > 0 or inf, got {norm_type}")
    return overflow_safe


def parse_max_norm(max_norm, arg_name: str = "max_norm") -> float:
    """``max_norm`` (a real number, numpy's included, or a one-element tensor) as a Python float,
    as torch converts it.

    A CUDA tensor costs one device-to-host copy here, exactly as in ``clip_grad_norm_``.
    """
    if isinstance(max_norm, torch.Tensor):
        if max_norm.numel() != 1:
            raise ValueError(f"{arg_name} must be a number or a one-element tensor, got shape {tuple(max_norm.shape)}")
        return _checked_bound(float(max_norm), arg_name)
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):  # numpy's scalars are Real
        raise TypeError(f"{arg_name} must be a number or a one-element tensor, got {type(max_norm).__name__}")
    return _checked_bound(float(max_norm), arg_name)


def _checked_bound(value: float, arg_name: str) -> float:
    # torch accepts both and silently does harm: a NaN bound turns every gradient into NaN, a
    # negative one flips every gradient's sign. fastclip refuses them.
    if math.isnan(value):
        raise ValueError(f"{arg_name} must not be NaN")
    if value < 0:
        raise ValueError(f"{arg_name} must be >= 0, got {value} (torch would flip the sign of every gradient)")
    return value
