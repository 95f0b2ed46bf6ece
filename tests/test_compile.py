"""A training step that calls ``fastclip.clip_`` compiles with ``torch.compile(fullgraph=True)`` (no
graph break) and gives eager's results bit for bit. CPU backends with kernels that Inductor can
call; the Triton kernels' capture is tested in test_triton.py (the interpreter cannot be compiled)."""

from __future__ import annotations

import pytest
import torch

import fastclip
from harness import assert_same


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clips", "no_clip"])
def test_compiled_step_matches_eager(backend, max_norm):
    if backend == "triton":
        pytest.skip("the Triton interpreter's kernels are Python functions; capture tested in test_triton.py")
    torch._dynamo.reset()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 1, generator=torch.Generator().manual_seed(2)) * 100

    def make_step(model):
        def clip_and_update():
            norm = fastclip.clip_(model.parameters(), max_norm, backend=backend)
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.1 * p.grad)
            return norm
        return clip_and_update

    eager_model, compiled_model = _model(0), _model(0)
    eager_step = make_step(eager_model)
    compiled_step = torch.compile(make_step(compiled_model), fullgraph=True)
    for _ in range(3):
        for model in (eager_model, compiled_model):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        assert_same(compiled_step(), eager_step(), "norm")
        for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
            assert_same(p.grad, q.grad, "clipped gradient")
            assert_same(p, q, "updated parameter")
