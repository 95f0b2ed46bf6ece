"""``fastclip.patch_torch()``: torch.nn.utils's clipping functions call fastclip while patched, and
are exactly restored after; a real PyTorch Lightning ``Trainer`` run goes through fastclip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.clip_grad

import fastclip
from harness import assert_same, record_served_backends

ORIGINALS = {
    name: getattr(torch.nn.utils, name) for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_")
}
ORIGINAL_IN_MODULE = torch.nn.utils.clip_grad.clip_grad_norm_


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The names of the fastclip backends that served each call made while the test runs."""
    return record_served_backends(monkeypatch.setattr)


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 7, 1000)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def _assert_restored():
    for name, original in ORIGINALS.items():
        assert getattr(torch.nn.utils, name) is original, name
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is ORIGINAL_IN_MODULE


def test_patch_routes_to_fastclip_and_undo_restores(calls):
    patch = fastclip.patch_torch()
    try:
        params, reference = _params(0), _params(0)
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        assert len(calls) == 1
        expected = ORIGINALS["clip_grad_norm_"](reference, 0.5)
        assert abs(float(norm) - float(expected)) <= 2 * torch.finfo(torch.float32).eps * float(expected)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, 0.5, total)
        torch.nn.utils.clip_grad.clip_grad_norm_(params, 0.5)
        assert len(calls) == 4
    finally:
        patch.undo()
    _assert_restored()
    torch.nn.utils.clip_grad_norm_(_params(1), 0.5)
    assert len(calls) == 4  # torch's own function again
    patch.undo()  # a second undo changes nothing
    _assert_restored()


def test_context_manager_and_nesting(calls):
    with fastclip.patch_torch(backend="torch"):
        with fastclip.patch_torch(backend="cpp" if "cpp" in fastclip.available_backends() else "torch"):
            torch.nn.utils.clip_grad_norm_(_params(2), 0.5)
        torch.nn.utils.clip_grad_norm_(_params(2), 0.5)
        assert calls[-1] == "torch"
    _assert_restored()
    assert len(calls) == 2


def test_patched_function_is_bit_identical_with_the_torch_backend():
    params, reference = _params(3), _params(3)
    with fastclip.patch_torch(backend="torch"):
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5, 2.0, False, None)
    expected = ORIGINALS["clip_grad_norm_"](reference, 0.5, 2.0, False, None)
    assert_same(norm, expected, "norm")
    for p, q in zip(params, reference):
        assert_same(p.grad, q.grad, "gradient")


def test_unknown_backend_is_refused_without_patching():
    with pytest.raises(ValueError, match="backend"):
        fastclip.patch_torch(backend="cuda")
    _assert_restored()


# ---------------------------------------------------------------------------------------------
# A real PyTorch Lightning run


def _lightning_run(patch_backend: str | None) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Four training steps of a small MLP with gradient_clip_val set, on synthetic data, optionally
    under patch_torch(backend=...). Returns the clipped gradients seen by each optimizer step and
    the final parameters."""
    lightning = pytest.importorskip("lightning.pytorch")

    class RecordingSGD(torch.optim.SGD):
        """Records the gradients the step applies: after Lightning's closure has clipped them."""

        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            self.recorded = []

        def step(self, closure=None):
            loss = closure() if closure is not None else None
            self.recorded.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            super().step()
            return loss

    class Model(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            self.optimizer = RecordingSGD(self.parameters(), lr=0.1)
            return self.optimizer

    torch.manual_seed(0)
    model = Model()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True) * 10)  # large loss: clipping happens
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    trainer = lightning.Trainer(
        max_steps=4, gradient_clip_val=0.05, gradient_clip_algorithm="norm", accelerator="cpu", devices=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    if patch_backend is None:
        trainer.fit(model, loader)
    else:
        with fastclip.patch_torch(backend=patch_backend):
            trainer.fit(model, loader)
    return model.optimizer.recorded, [p.detach().clone() for p in model.parameters()]


def test_lightning_trainer_goes_through_fastclip(calls):
    """The Trainer clips through fastclip on every step; with the "torch" backend the clipped
    gradients and the trained weights are bit-identical to an unpatched run (E1); with the
    default backend the first step's clipped gradients are within a few fp32 ulp of it."""
    expected_grads, expected_weights = _lightning_run(None)
    assert not calls
    grads, weights = _lightning_run("torch")
    assert calls == ["torch"] * 4
    for step, (got, expected) in enumerate(zip(grads, expected_grads)):
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"step {step} gradient {i}")
    for w, e in zip(weights, expected_weights):
        assert_same(w, e, "trained weight")
    clipped_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[0]])))
    assert abs(clipped_norm - 0.05) < 1e-6, "the run must actually clip"

    calls.clear()
    grads, _ = _lightning_run("auto")
    assert len(calls) == 4 and calls[0] == fastclip.available_backends("cpu")[0]
    # Step 1 starts from the same weights, so the gradients differ only by the clip coefficient,
    # whose relative error is a few fp32 ulp (E5 on the norm); later steps start apart.
    for g, e in zip(grads[0], expected_grads[0]):
        torch.testing.assert_close(g, e, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    _assert_restored()
