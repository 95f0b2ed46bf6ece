"""A training step that calls ``fastclip.clip_`` compiles with ``torch.compile(fullgraph=True)`` (no
graph break), and its results are bit-identical to the right reference on every machine.

What "the right reference" is depends on who computes the norm under the compiler:

- backend ``"torch"`` is traced into plain ATen ops, and Inductor generates its own reductions for
  them; their summation order depends on the CPU's vector width, so they are NOT eager's bits (on
  an AMD EPYC the compiled L2 norm differs from eager's in the last place). The reference is torch's
  own ``clip_grad_norm_`` compiled the same way in the same process: same graph, same generated code.
- a fused backend is an opaque custom op to Inductor that declares the gradients it writes: the
  compiled step calls the same kernel as eager, so the reference is the same backend, eager. The
  Triton ops too (under TRITON_INTERPRET=1 their kernels run in the interpreter at run time): once
  ``triton_op``s traced into kernels whose writes the compiler could not see, they failed here.

The parameter update multiplies by a power of two, so it is exact whether or not the compiler fuses
it into a multiply-add.
"""

from __future__ import annotations

import pytest
import torch

import fastclip
from conftest import require_backend
from harness import assert_same

LEARNING_RATE = 0.125  # a power of two: p - lr * g rounds once, fused or not


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _step(model: torch.nn.Module, clip) -> callable:
    def clip_and_update():
        norm = clip(model.parameters())
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(LEARNING_RATE * p.grad)
        return norm
    return clip_and_update


def _run_side_by_side(step, reference_step, steps: int = 3) -> None:
    """Run ``step`` and ``reference_step`` (each built on its own copy of the same model) on the same
    batches and assert norms, clipped gradients and updated parameters bit-identical."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 1, generator=torch.Generator().manual_seed(2)) * 100
    for _ in range(steps):
        for model in (step.model, reference_step.model):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        assert_same(step(), reference_step(), "norm")
        for p, q in zip(step.model.parameters(), reference_step.model.parameters()):
            assert_same(p.grad, q.grad, "clipped gradient")
            assert_same(p, q, "updated parameter")


class _Step:
    """A (possibly compiled) clip-and-update step bound to its own model."""

    def __init__(self, clip, compiled: bool):
        self.model = _model(0)
        step = _step(self.model, clip)
        self._step = torch.compile(step, fullgraph=True) if compiled else step

    def __call__(self):
        return self._step()


def _torch_compiles_its_own_clip() -> bool:
    """Whether Dynamo traces torch.nn.utils.clip_grad_norm_ without a graph break (torch 2.6 does not:
    its grouping helper returns a dict Dynamo cannot trace), which backend "torch" inherits."""
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    try:
        torch.compile(lambda: torch.nn.utils.clip_grad_norm_([param], 1.0), fullgraph=True)()
    except torch._dynamo.exc.Unsupported:
        return False
    finally:
        torch._dynamo.reset()
    return True


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clips", "no_clip"])
def test_compiled_step_matches_reference(backend, max_norm):
    torch._dynamo.reset()
    fastclip_step = _Step(lambda params: fastclip.clip_(params, max_norm, backend=backend), compiled=True)
    if backend == "torch":
        if not _torch_compiles_its_own_clip():
            pytest.skip(f"torch {torch.__version__} cannot compile its own clip_grad_norm_ with fullgraph=True")
        reference = _Step(lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm), compiled=True)
    else:
        reference = _Step(lambda params: fastclip.clip_(params, max_norm, backend=backend), compiled=False)
    _run_side_by_side(fastclip_step, reference)


def _norm_then_scale(backend: str, max_norm: float):
    """The two-call path (trainers that log the norm first, torchtitan): an overflow-safe norm, then
    clip_grads_with_norm_, both of which the compiler must keep, in order, before the update."""
    def clip(params):
        params = list(params)
        norm = fastclip.get_total_norm([p.grad for p in params], overflow_safe=True, backend=backend)
        fastclip.clip_grads_with_norm_(params, max_norm, norm, backend=backend)
        return norm
    return clip


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clips", "no_clip"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])  # opaque ops: compiled must equal eager bit for bit
def test_compiled_norm_then_scale_matches_eager(backend, max_norm):
    require_backend(backend)
    torch._dynamo.reset()
    _run_side_by_side(_Step(_norm_then_scale(backend, max_norm), compiled=True),
                      _Step(_norm_then_scale(backend, max_norm), compiled=False))


@pytest.mark.parametrize("backend", ["cpp", "triton"])  # opaque ops: compiled must equal eager bit for bit
def test_compiled_value_clipping_matches_eager(backend):
    require_backend(backend)
    torch._dynamo.reset()

    def clip(params):
        fastclip.clip_grad_value_(params, 0.05, backend=backend)
        return torch.zeros(())

    _run_side_by_side(_Step(clip, compiled=True), _Step(clip, compiled=False))


def test_compiled_skip_decisions_match_eager():
    """SkipOnSpike.update compiles with fullgraph=True (no graph break, no host read), so a compiled
    training step can keep it, and Inductor fuses its ~35 small ops. The decisions are eager's on a
    sequence with spikes, a loss spike, Inf and NaN; the recorded windows and counters are copies and
    sums of integers, so they are compared exactly. (The means and deviations are Inductor's own
    reductions, not eager's bits: only decisions far from the threshold are compared, as here.)"""
    from test_step import norm_sequence

    torch._dynamo.reset()
    norms = norm_sequence()
    losses = [2.0 + 0.01 * (i % 7) for i in range(len(norms))]
    losses[120] = 9.0
    eager = fastclip.SkipOnSpike(window=32, min_history=16, norm_threshold=45.0)
    compiled = fastclip.SkipOnSpike(window=32, min_history=16, norm_threshold=45.0)
    update = torch.compile(compiled.update, fullgraph=True)
    expected = [bool(eager.update(torch.tensor(n), torch.tensor(l))) for n, l in zip(norms, losses)]
    got = [bool(update(torch.tensor(n), torch.tensor(l))) for n, l in zip(norms, losses)]
    assert got == expected and sum(expected) >= 6, (sum(got), sum(expected))
    for key, value in eager.state_dict().items():
        other = compiled.state_dict()[key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
    torch._dynamo.reset()
