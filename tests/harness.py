"""Differential test harness: run fastclip and ``torch.nn.utils`` on identical copies of the same
gradients and compare, under the clause of the exactness contract (../shared/TORCH-SEMANTICS.md)
that applies to the backend and the input.

Gradients are described by :class:`GradSpec` and built deterministically from a seed, so building
twice gives two independent, bit-identical copies. Non-contiguous gradients are strided views into a
larger buffer; the whole buffer is compared, so a write into the gaps is caught too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import math
import os
import sys

import pytest
import torch

import fastclip

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class GradSpec:
    """One parameter and its gradient.

    Attributes:
        shape: the parameter's shape.
        dtype: the gradient's dtype.
        layout: "contiguous", "strided" (every other element of a 2x larger buffer along the last
            dim), "transposed" (a transposed view) or "channels_last" (4-d only).
        values: "randn" (standard normal times ``scale``), "dyadic" (multiples of 1/8 whose sum of
            squares is an exact square, so the arithmetic of the L1, L2 and inf norms is exact and
            any backend must match torch bit for bit, clause E4), "none" (no gradient).
        scale: multiplier of the random values.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    values: str = "randn"
    scale: float = 1.0


def _four_squares(n: int) -> tuple[int, int, int, int] | None:
    """Four non-negative integers whose squares sum to ``n``, found greedily (None if greed fails)."""
    for a in range(math.isqrt(n), -1, -1):
        rest, parts = n - a * a, [a]
        for _ in range(3):
            parts.append(math.isqrt(rest))
            rest -= parts[-1] ** 2
        if rest == 0:
            return tuple(parts)
    return None


def _exact_square_dyadic(numel: int, generator: torch.Generator) -> torch.Tensor:
    """Multiples of 1/8 in about [-1, 1] whose sum of squares is an exact square, so that each
    tensor's 2-norm, and every sum of squares of such norms, is exact in every float dtype."""
    k = torch.randint(-8, 9, (numel,), generator=generator, dtype=torch.int64)
    if numel < 5:  # a single non-zero value: its square is a square
        k[1:] = 0
        return k.double() / 8
    partial = int((k[:-4] ** 2).sum())
    root = math.isqrt(partial - 1) + 1 if partial else 0  # the smallest root with root**2 >= partial
    while (fill := _four_squares(root * root - partial)) is None:
        root += 1
    signs = torch.randint(0, 2, (4,), generator=generator) * 2 - 1
    k[-4:] = torch.tensor(fill) * signs
    return k.double() / 8


def _values(spec: GradSpec, numel: int, generator: torch.Generator) -> torch.Tensor:
    if spec.values == "dyadic":
        return _exact_square_dyadic(numel, generator)
    return torch.randn(numel, generator=generator, dtype=torch.float64) * spec.scale


def _strided_grad(spec: GradSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient view, the buffer that owns its memory)."""
    shape = spec.shape
    if spec.layout == "contiguous" or len(shape) == 0:
        buffer = _values(spec, math.prod(shape), generator).to(spec.dtype).reshape(shape)
        return buffer, buffer
    if spec.layout == "strided":
        wide = (*shape[:-1], 2 * shape[-1])
        if spec.values == "dyadic":  # the view's own values must have the exact-square sum, not the buffer's
            buffer = torch.empty(wide, dtype=torch.float64)
            buffer[..., ::2] = _values(spec, math.prod(shape), generator).reshape(shape)
            buffer[..., 1::2] = _values(spec, math.prod(shape), generator).reshape(shape)
            buffer = buffer.to(spec.dtype)
        else:
            buffer = _values(spec, math.prod(wide), generator).to(spec.dtype).reshape(wide)
        return buffer[..., ::2], buffer
    if spec.layout == "transposed":
        flipped = tuple(reversed(shape))
        buffer = _values(spec, math.prod(flipped), generator).to(spec.dtype).reshape(flipped)
        return buffer.permute(*reversed(range(len(shape)))), buffer
    if spec.layout == "channels_last":
        buffer = _values(spec, math.prod(shape), generator).to(spec.dtype).reshape(shape)
        buffer = buffer.contiguous(memory_format=torch.channels_last)
        return buffer, buffer
    raise ValueError(f"unknown layout {spec.layout!r}")


def build(specs: list[GradSpec], seed: int = 0, device: str = "cpu") -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Parameters on ``device`` with gradients as described, and the buffers that own the gradients'
    memory. Values are drawn on the CPU, so every device gets the same ones."""
    generator = torch.Generator().manual_seed(seed)
    params, buffers = [], []
    for spec in specs:
        param = torch.nn.Parameter(torch.zeros(spec.shape, dtype=spec.dtype, device=device))
        if spec.values != "none":
            grad, buffer = _strided_grad(spec, generator)
            if device != "cpu":  # same layout on the device: the buffer moved, the view rebuilt
                buffer = buffer.to(device)
                grad = buffer.as_strided(grad.shape, grad.stride(), grad.storage_offset())
            param.grad = grad
            buffers.append(buffer)
        params.append(param)
    return params, buffers


def poison(params: list[torch.nn.Parameter], where: list[tuple[int, int, float]]) -> None:
    """Write special values (NaN, inf) into gradients: ``(parameter index, flat index, value)``,
    the flat index counting elements in the gradient's logical (row-major) order."""
    for index, flat_index, value in where:
        grad = params[index].grad
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), grad.shape))
        grad[position] = value


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Exact equality: same dtype, shape and device; NaN in the same places; every other element
    bit-identical (so ``-0.0`` and ``+0.0`` differ). NaN payloads are not compared."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    actual_nan, expected_nan = actual.isnan(), expected.isnan()
    assert torch.equal(actual_nan, expected_nan), f"{what}: NaN positions differ"
    a = torch.where(actual_nan, torch.zeros_like(actual), actual)
    e = torch.where(expected_nan, torch.zeros_like(expected), expected)
    if not (torch.equal(a, e) and torch.equal(a.signbit(), e.signbit())):
        diff = (a.double() - e.double()).abs()
        worst = int(diff.reshape(-1).argmax())
        raise AssertionError(
            f"{what}: {int((a != e).sum())} of {a.numel()} elements differ; worst at flat index {worst}: "
            f"{a.reshape(-1)[worst].item()!r} != {e.reshape(-1)[worst].item()!r}"
        )


def exact_clause(backend: str, norm_type: float, values_exact: bool) -> str | None:
    """The clause under which ``backend`` must be bit-identical to torch, or None if it need not be.

    E1: backend "torch", always. E2: fused backends with the inf norms. E4: fused backends on inputs
    whose arithmetic is exact: dyadic values with the L1 or L2 norm (for other p the p-th root of
    an exact sum is itself rounded, and torch rounds it in float with 1/p rounded too). Otherwise
    only E3 (gradients given the returned norm) and E5 (norm error bound) apply.
    """
    if backend == "torch":
        return "E1"
    if math.isinf(norm_type):
        return "E2"
    if values_exact and norm_type in (1.0, 2.0):
        return "E4"
    return None


def _exact_norm(values: list[float], p: float) -> float:
    """The p-norm of ``values`` with one rounding at the end (math.fsum sums exactly)."""
    magnitudes = [abs(v) for v in values]
    if not magnitudes:
        return 0.0
    if math.isinf(p):
        return max(magnitudes) if p > 0 else min(magnitudes)
    if p == 2:
        return math.sqrt(math.fsum(v * v for v in magnitudes))
    if p == 0:
        return float(sum(v != 0 for v in magnitudes))
    # The root in 40-digit decimal: in double, 1/p is itself rounded, which puts the root ~ln(sum)
    # ulp off, more than the 2 ulp that E5 allows fp64 results.
    total = math.fsum(v**p for v in magnitudes)
    if total == 0 or not math.isfinite(total):
        return total ** (1 / p)
    with decimal.localcontext(decimal.Context(prec=40)):
        return float(decimal.Decimal(total) ** (decimal.Decimal(1) / decimal.Decimal(p)))


def reference_norm(tensors: list[torch.Tensor], norm_type: float) -> float:
    """E5's float64 reference, with torch's structure: each tensor's norm computed (almost) exactly,
    rounded to the tensor's dtype as torch's per-tensor norm is, then the norm of those norms.

    Rounding per tensor is part of the result torch defines (a bf16 gradient has a bf16 norm), so it
    belongs in the reference; only the accumulation error is what E5 bounds.
    """
    per_tensor = []
    for t in tensors:
        exact = _exact_norm(t.detach().double().reshape(-1).tolist(), norm_type)
        per_tensor.append(float(torch.tensor(exact, dtype=torch.float64).to(t.dtype)))
    return _exact_norm(per_tensor, norm_type)


def ulp_scale(value: float, dtype: torch.dtype) -> float:
    """eps * |value| in ``dtype``, but never below the spacing of its subnormals (eps * tiny): the
    unit in which rounding errors at ``value`` are counted. Below the smallest normal number the
    spacing of ``dtype`` stops shrinking, so a result rounded once to, e.g., fp32 near 1e-40 can be
    off by up to half of 2^-149 (1.4e-45), far more than eps * 1e-40."""
    info = torch.finfo(dtype)
    return info.eps * max(abs(value), info.tiny)


def assert_norm_error_bound(norm: torch.Tensor, torch_norm: torch.Tensor, tensors: list[torch.Tensor], norm_type: float) -> None:
    """E5: fastclip's norm has torch's dtype, and its error against :func:`reference_norm` is at
    most torch's own error, or 2 ulp of the accumulation dtype (fp64 if every tensor is fp64, else
    fp32: the per-tensor norms of the other dtypes accumulate in fp32)."""
    assert norm.dtype == torch_norm.dtype, f"[E5] norm dtype {norm.dtype} != torch's {torch_norm.dtype}"
    truth = reference_norm(tensors, float(norm_type))
    if not math.isfinite(truth):  # no error to bound, but inf must stay inf and NaN NaN
        assert float(norm) == truth or (math.isnan(float(norm)) and math.isnan(truth)), (
            f"[E5] norm {float(norm)!r}, reference {truth!r}, torch {float(torch_norm)!r}"
        )
        return
    all_fp64 = all(t.dtype == torch.float64 for t in tensors)
    accumulation = torch.float64 if all_fp64 else torch.float32
    bound = max(abs(float(torch_norm) - truth), 2 * ulp_scale(truth, accumulation))
    assert abs(float(norm) - truth) <= bound, (
        f"[E5] norm {float(norm)!r}, reference {truth!r}, torch {float(torch_norm)!r}"
    )


def refusal_reason(backend: str, tensors: list[torch.Tensor], norm_type: float | None) -> str | None:
    """Why ``backend``, named explicitly, must refuse this input (None if it must serve it)."""
    from fastclip._dispatch import BACKENDS

    if backend == "torch" or not tensors:  # with nothing to clip, every backend serves the call
        return None
    return BACKENDS[backend].unsupported_reason(tensors, norm_type)


def check_clip(
    backend: str,
    specs: list[GradSpec],
    max_norm: float,
    norm_type: float | str = 2.0,
    *,
    seed: int = 0,
    special_values: list[tuple[int, int, float]] = (),
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    as_generator: bool = False,
    device: str = "cpu",
) -> torch.Tensor:
    """Run ``torch.nn.utils.clip_grad_norm_`` and ``fastclip.clip_(backend=backend)`` on identical
    copies (on ``device``) and assert the applicable clauses. Returns fastclip's norm.

    If torch raises (``error_if_nonfinite`` with a NaN/Inf norm), fastclip must raise the same
    exception type, and leave every gradient buffer bit-identical to before.
    """
    ref_params, ref_buffers = build(specs, seed, device)
    params, buffers = build(specs, seed, device)
    pristine_params, pristine_buffers = build(specs, seed, device)
    for p in (ref_params, params, pristine_params):
        poison(p, list(special_values))
    values_exact = all(s.values in ("dyadic", "none") for s in specs) and not special_values
    grads = [p.grad for p in params if p.grad is not None]
    if refusal_reason(backend, grads, float(norm_type)) is not None:
        # A backend named explicitly never silently runs something else: it refuses, untouched.
        with pytest.raises(ValueError, match="cannot serve"):
            fastclip.clip_(params, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend)
        for i, (buffer, before) in enumerate(zip(buffers, pristine_buffers)):
            assert_same(buffer, before, f"gradient {i} after a refused call")
        return None

    torch_error = fastclip_error = None
    try:
        expected_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type, error_if_nonfinite, foreach)
    except RuntimeError as e:
        torch_error = e
    try:
        arg = (p for p in params) if as_generator else params
        norm = fastclip.clip_(arg, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend)
    except RuntimeError as e:
        fastclip_error = e

    if torch_error is not None or fastclip_error is not None:
        assert torch_error is not None and fastclip_error is not None, (
            f"torch raised {torch_error!r} but fastclip raised {fastclip_error!r}"
        )
        for i, (buffer, before) in enumerate(zip(buffers, pristine_buffers)):
            assert_same(buffer, before, f"gradient {i} after a refused clip")
        return None

    clause = exact_clause(backend, float(norm_type), values_exact)
    if clause is not None:
        assert_same(norm, expected_norm, f"[{clause}] total norm")
        for i, (buffer, ref_buffer) in enumerate(zip(buffers, ref_buffers)):
            assert_same(buffer, ref_buffer, f"[{clause}] gradient {i}")
        return norm

    # E3: the gradients are exactly torch's scaling by the norm fastclip returned.
    e3_params, e3_buffers = build(specs, seed, device)
    poison(e3_params, list(special_values))
    torch.nn.utils.clip_grads_with_norm_(e3_params, max_norm, norm, foreach)
    for i, (buffer, e3_buffer) in enumerate(zip(buffers, e3_buffers)):
        assert_same(buffer, e3_buffer, f"[E3] gradient {i}")
    # E5: the norm's error against the float64 reference.
    assert_norm_error_bound(norm, expected_norm, [p.grad for p in pristine_params if p.grad is not None], norm_type)
    return norm


def whole_norm(norm: torch.Tensor, dtensor: bool) -> torch.Tensor:
    """A distributed call's norm as a plain tensor, after checking that it comes back as torch's
    does: a DTensor replicated on the gradients' mesh when they are all DTensors on one mesh
    (``dtensor``), a plain tensor otherwise."""
    from torch.distributed.tensor import DTensor

    assert isinstance(norm, DTensor) == dtensor, f"norm returned as {type(norm).__name__}, torch's would be " + (
        "a DTensor" if dtensor else "a plain tensor")
    if not dtensor:
        return norm
    assert all(p.is_replicate() for p in norm.placements), f"norm placements {norm.placements}, not replicated"
    return norm.to_local()


def record_served_backends(set_attribute) -> list[str]:
    """The names of the fastclip backends that serve each call from now on: spies installed on
    fastclip.api with ``set_attribute(module, name, value)`` (``monkeypatch.setattr``, or ``setattr``
    in a worker process). A call goes through select_backend, or for fastclip.clip_ on plain local
    gradients through _clip_in_one_call (the cpp backend's one call into the extension)."""
    import fastclip.api

    served = []
    select, one_call = fastclip.api.select_backend, fastclip.api._clip_in_one_call

    def spy_select(*args, **kwargs):
        backend = select(*args, **kwargs)
        served.append(backend.name)
        return backend

    def spy_one_call(*args, **kwargs):
        total = one_call(*args, **kwargs)
        if total is not None:
            served.append("cpp")
        return total

    set_attribute(fastclip.api, "select_backend", spy_select)
    set_attribute(fastclip.api, "_clip_in_one_call", spy_one_call)
    return served


@contextlib.contextmanager
def gloo_worker(rank: int, world: int, init_file: str, timeout_s: float = 60.0):
    """A spawned worker's gloo process group: created on entry (file rendezvous, so no port to
    collide with another test; a timeout, so a rank left waiting fails instead of hanging), destroyed
    on exit. When the body succeeded the process then ends with ``os._exit(0)``, without finalizing
    Python; an exception propagates as usual.

    Why the exit: with torch 2.14.1, gloo's worker threads drop their last reference to a finished
    collective (AsyncAllreduceWork, AsyncScatterWork, a barrier's) after the caller's wait has
    returned. Dropping a tensor that has a Python object takes the GIL; when the main thread is
    already finalizing the interpreter, taking the GIL ends the thread inside that destructor and
    the process aborts ("terminate called without an active exception", SIGABRT), in about 1 run
    in 8 of a short worker, whatever clipped the gradients (torch's own clip_grad_norm_ on DTensors
    does it too). Skipping finalization leaves no finalizing interpreter for those threads to meet.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
