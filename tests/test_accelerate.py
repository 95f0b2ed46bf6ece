"""Hugging Face Accelerate's ``accelerator.clip_grad_norm_`` through ``fastclip.patch_torch()``, in 2-
and 4-process CPU runs (gloo), with Accelerate's multi-CPU DDP and with its FSDP2 path.

Each worker trains the same small MLP twice from identical weights on the same data, three AdamW steps
that all clip: once plain, once under ``patch_torch()``. On every step of the patched run, fastclip
must serve the call, its norm must be within E5 of torch's norm of the full (unsharded) gradients and
bit-identical on every rank, and the clipped gradients must be bit-identical to torch's
``clip_grads_with_norm_`` of the full gradients by that norm (E3). The first step starts from the same
weights in both runs, so its gradients before clipping must be bit-identical, which ties the patched
run to the plain one; with the "torch" backend under DDP the whole run must be bit-identical (E1).

Accelerate never selects FSDP for CPU processes: ``AcceleratorState`` (accelerate/state.py) sets
``DistributedType.FSDP`` only when the type chosen for the device is one of MULTI_GPU, MULTI_MLU,
MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU or MULTI_NEURON; CPU processes get MULTI_CPU,
and the ``fsdp_plugin`` is silently ignored (the model is wrapped in DDP). That gate is the only
obstacle: the FSDP2 case sets the state's ``distributed_type`` to FSDP after construction, and from
there on everything is Accelerate's own code (``fsdp2_prepare_model``'s ``fully_shard``, the FSDP2
branch of ``clip_grad_norm_``), which runs on CPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
BATCH = 4  # per process
MAX_NORM = 0.05  # far below the gradients' norm (9 to 18 here): every step clips
# Looked up before anything is patched: torch's own functions, the reference in the patched run.
TORCH_CLIP_GRAD_NORM_ = torch.nn.utils.clip_grad_norm_
TORCH_CLIP_GRADS_WITH_NORM_ = torch.nn.utils.clip_grads_with_norm_
# torch 2.6's fully_shard cannot run on CPU (its CPU streams have no record_event): DDP only there.
FSDP2_RUNS_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
MODES = ("ddp", "fsdp2") if FSDP2_RUNS_ON_CPU else ("ddp",)


def _model() -> torch.nn.Module:
    # Widths that do not divide by 2 or 4, so FSDP2's shards are uneven; over 4 processes the
    # 3-element bias leaves one of them an empty shard.
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 13), torch.nn.Tanh(), torch.nn.Linear(13, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3),
    )


def _loader(world: int) -> torch.utils.data.DataLoader:
    """STEPS batches per process; Accelerate gives each process its own."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH * world, 8, generator=generator)
    y = torch.randn(STEPS * BATCH * world, 3, generator=generator) * 20  # a large loss, large gradients
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor: all-gathered if it is a DTensor (FSDP2's shards)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _accelerator(mode: str):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if mode == "ddp":
        accelerator = Accelerator(cpu=True)
        assert accelerator.distributed_type == DistributedType.MULTI_CPU
        return accelerator
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    if accelerator.distributed_type != DistributedType.FSDP:
        # The CPU gate (module docstring). What AcceleratorState.__init__ does when it takes FSDP
        # without mixed precision is these assignments; it also copies the type into PartialState's
        # shared state, from which every later AcceleratorState() (prepare makes some) refreshes its own.
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState().distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2, accelerator.distributed_type
    return accelerator


def _train(accelerator, mode: str, world: int, step_hook) -> list[torch.Tensor]:
    """STEPS AdamW steps with ``accelerator.clip_grad_norm_``; returns the final full weights.

    ``step_hook(step, model, clip)`` runs the clipping (``clip()`` returns its norm) and checks it.
    """
    from torch.distributed.tensor import DTensor

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(world))
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        # Each run must take the path it is named for: a quiet fall back to DDP (as Accelerate does
        # with an fsdp_plugin on CPU) would leave the FSDP2 case checking plain gradients.
        sharded = [isinstance(p.grad, DTensor) for p in model.parameters()]
        assert sharded == [mode == "fsdp2"] * len(sharded), f"{type(model).__name__}: DTensor gradients {sharded}"

        def clip():
            return accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)

        step_hook(step, model, clip)
        optimizer.step()
        optimizer.zero_grad()
    assert step == STEPS - 1
    weights = [_full(p) for p in model.parameters()]
    # Accelerate's advice between two trainings. It also matters: with FSDP, clip_grad_norm_ looks
    # for the model by comparing parameter lists, which raises on a second model of the same shapes.
    accelerator.free_memory()
    return weights


def _check_patched_step(step, model, clip, served, expected_backend, plain_grads, patched_norms):
    """One step of the patched run: fastclip serves the call, E5, the same norm on every rank, E3."""
    import fastclip
    from harness import assert_norm_error_bound, assert_same
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    full_grads = [_full(p.grad) for p in params]
    if step == 0:  # the same weights and data as the plain run: the same gradients
        for i, (g, e) in enumerate(zip(full_grads, plain_grads)):
            assert_same(g, e, f"step 0 gradient {i} before clipping, patched run vs plain run")

    assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_, "patch_torch() did not install fastclip.clip_"
    calls_before = len(served)
    norm = clip()
    assert served[calls_before:] == [expected_backend], f"step {step}: fastclip calls {served[calls_before:]}"
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # fastclip's is plain; torch's a DTensor
    patched_norms.append(norm.clone())

    # torch's clipping of the full gradients: its norm is the E5 reference, and with fastclip's
    # norm it gives the gradients every process must hold (E3).
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in full_grads]
    for p, g in zip(reference, full_grads):
        p.grad = g.clone()
    torch_norm = TORCH_CLIP_GRAD_NORM_(reference, MAX_NORM)
    assert float(torch_norm) > 10 * MAX_NORM, f"step {step}: norm {float(torch_norm)}, the step must clip"
    assert_norm_error_bound(norm, torch_norm, full_grads, 2.0)
    for p, g in zip(reference, full_grads):
        p.grad = g.clone()
    TORCH_CLIP_GRADS_WITH_NORM_(reference, MAX_NORM, norm)
    for i, (param, expected) in enumerate(zip(params, reference)):
        assert_same(_full(param.grad), expected.grad, f"step {step}: [E3] clipped gradient {i}")

    # The norm is the same float on every process (compared as bits, so -0.0 or NaN would not pass).
    gathered = [torch.empty((), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, norm.double())
    bits = [int(g.view(torch.int64)) for g in gathered]
    assert len(set(bits)) == 1, f"step {step}: norms differ across ranks: {[float(g) for g in gathered]}"


def _plain_and_patched_runs(mode: str, world: int, served: list[str], expected_backend: str) -> None:
    """The two trainings of one mode, from the same weights: plain, then under patch_torch()."""
    import fastclip
    from harness import assert_same

    accelerator = _accelerator(mode)
    assert accelerator.is_fsdp2 == (mode == "fsdp2"), accelerator.distributed_type
    plain_norms, plain_grads = [], []

    def plain_step(step, model, clip):
        if step == 0:
            plain_grads.extend(_full(p.grad) for p in model.parameters())
        plain_norms.append(_full(clip()))

    plain_weights = _train(accelerator, mode, world, plain_step)
    assert not served, f"the unpatched run called fastclip: {served}"

    patched_norms = []
    with fastclip.patch_torch():
        patched_weights = _train(accelerator, mode, world, lambda step, model, clip: _check_patched_step(
            step, model, clip, served, expected_backend, plain_grads, patched_norms))
    assert torch.nn.utils.clip_grad_norm_ is TORCH_CLIP_GRAD_NORM_

    if expected_backend == "torch" and mode == "ddp":
        # E1: DDP's gradients are whole on every process, so fastclip's "torch" backend runs
        # torch's own arithmetic and the two runs cannot differ by a bit.
        for step, (n, e) in enumerate(zip(patched_norms, plain_norms)):
            assert_same(n, e, f"[E1] step {step} norm")
        for i, (w, e) in enumerate(zip(patched_weights, plain_weights)):
            assert_same(w, e, f"[E1] trained weight {i}")


def _worker(rank: int, world: int, init_file: str) -> None:
    sys.path.insert(0, HERE)
    # What `accelerate launch` would set; with them Accelerator(cpu=True) picks MULTI_CPU and gloo.
    # The process group is created here (harness.gloo_worker); Accelerate uses an existing one.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # world processes share the CPU
    from harness import gloo_worker

    with gloo_worker(rank, world, init_file):
        import fastclip
        from accelerate.state import AcceleratorState, GradientState

        from harness import record_served_backends

        served = record_served_backends(setattr)  # the fastclip backend that served each call
        expected_backend = os.environ.get("FASTCLIP_BACKEND") or fastclip.available_backends("cpu")[0]
        # DDP first: an fsdp_plugin sets ACCELERATE_USE_FSDP in the environment for good.
        for mode in MODES:
            try:
                _plain_and_patched_runs(mode, world, served, expected_backend)
            except AssertionError as e:
                raise AssertionError(f"{mode}: {e}") from e
            # A new Accelerator for the next mode, as accelerate's own tests reset between cases
            # (accelerate.test_utils.AccelerateTestCase); the process group stays.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            served.clear()


@pytest.mark.parametrize("world", [2, 4])
def test_accelerator_clip_grad_norm_goes_through_fastclip(world, tmp_path):
    """Both modes in one spawn per world size, so the processes start (and import) once."""
    pytest.importorskip("accelerate")
    mp.spawn(_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True)
    if not FSDP2_RUNS_ON_CPU:
        pytest.skip(f"DDP checked; torch {torch.__version__}'s fully_shard cannot run on CPU (its CPU streams "
                    "have no record_event), so Accelerate's FSDP2 path was not")
