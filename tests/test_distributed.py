"""Distributed gradients, with 2 and 4 processes on CPU (gloo): hand-sharded plain tensors with
``group=``, DTensor gradients, and FSDP2 ``fully_shard``. On every rank the norm must be torch's
norm of the unsharded gradients (exactly for inf, E2; within E5 for L2) and every clipped shard
must be the shard of torch's clipping of the full gradients by that norm (E3).

Each world size is one spawn whose ranks run every case, so processes start once per world size.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(64, 3), (10,), (7, 5, 2), (1,), (33,)]


def _full_grads(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _shard(t: torch.Tensor, rank: int, world: int, dtensor_layout: bool = False) -> torch.Tensor:
    """This rank's piece of t along dim 0, possibly empty: tensor_split's pieces for hand sharding,
    torch.chunk's (which DTensor's Shard(0) and FSDP2 use: 33 over 4 is 9, 9, 9, 6) for DTensors."""
    if dtensor_layout:
        chunks = torch.chunk(t, world, dim=0)
        return chunks[rank].clone() if rank < len(chunks) else t[:0].clone()
    return torch.tensor_split(t, world, dim=0)[rank].clone()


def _torch_reference(full: list[torch.Tensor], max_norm: float, norm_type: float):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
    for p, g in zip(params, full):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    return norm


def _check(norm, clipped_local, full, max_norm, norm_type, rank, world, what, dtensor_layout=False):
    from harness import assert_norm_error_bound, assert_same

    torch_norm = _torch_reference(full, max_norm, norm_type)
    if math.isinf(norm_type):
        assert_same(norm, torch_norm, f"{what}: [E2] norm")
    else:
        assert_norm_error_bound(norm, torch_norm, full, norm_type)
    # E3: the shards of torch's clipping of the full gradients by fastclip's norm.
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
    for p, g in zip(params, full):
        p.grad = g.clone()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    for i, (local, p) in enumerate(zip(clipped_local, params)):
        assert_same(local, _shard(p.grad, rank, world, dtensor_layout), f"{what}: [E3] shard {i}")


# FSDP2 (fully_shard) runs on CPU processes only where torch's CPU streams can record events (torch
# 2.6 has none, and its fully_shard fails in its first all-gather).
FSDP2_RUNS_ON_CPU = hasattr(torch.cpu.Stream, "record_event")


def _worker(rank: int, world: int, init_file: str, backends: list[str], with_fsdp2: bool) -> None:
    sys.path.insert(0, HERE)
    from harness import gloo_worker

    with gloo_worker(rank, world, init_file):
        import fastclip
        from harness import assert_same, whole_norm
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        for backend in backends:
            for norm_type in (2.0, math.inf):
                max_norm = 0.5
                full = _full_grads(seed=7)

                # Hand-sharded plain tensors, group= (Megatron style).
                params = [torch.nn.Parameter(_shard(torch.zeros_like(g), rank, world)) for g in full]
                for p, g in zip(params, full):
                    p.grad = _shard(g, rank, world)
                norm = whole_norm(fastclip.clip_(params, max_norm, norm_type, group=dist.group.WORLD, backend=backend),
                                  dtensor=False)
                _check(norm, [p.grad for p in params], full, max_norm, norm_type, rank, world, f"group {backend}")
                total = fastclip.get_total_norm([_shard(g, rank, world) for g in full], norm_type,
                                                group=dist.group.WORLD, backend=backend)
                assert torch.equal(total, norm), "get_total_norm(group=) differs from clip_"

                # DTensor gradients, sharded on dim 0.
                dparams = [torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, [Shard(0)])) for g in full]
                for p, g in zip(dparams, full):
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                norm = whole_norm(fastclip.clip_(dparams, max_norm, norm_type, backend=backend), dtensor=True)
                _check(norm, [p.grad.to_local() for p in dparams], full, max_norm, norm_type, rank, world,
                       f"DTensor {backend}", dtensor_layout=True)

        # Value clipping and AGC of DTensor gradients, with backend "auto": clamping runs on each
        # local shard (exactly torch's clamping of the whole); AGC runs torch's DTensor operations
        # (a unit can span ranks: a 1-d gradient is one unit), so it is torch's AGC of the whole
        # within rounding.
        generator = torch.Generator().manual_seed(11)
        weights = [torch.randn(g.shape, generator=generator) for g in full]
        for operation in ("value", "agc"):
            expected = [torch.nn.Parameter(w.clone()) for w in weights]
            dparams = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
            for p, q, g in zip(dparams, expected, full):
                p.grad, q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]), g.clone()
            if operation == "value":
                fastclip.clip_grad_value_(dparams, 0.5)
                torch.nn.utils.clip_grad_value_(expected, 0.5)
            else:
                fastclip.adaptive_clip_grad_(dparams, 0.05)
                fastclip.adaptive_clip_grad_(expected, 0.05, backend="torch")
            for i, (p, q) in enumerate(zip(dparams, expected)):
                shard = _shard(q.grad, rank, world, dtensor_layout=True)
                if operation == "value":
                    assert_same(p.grad.to_local(), shard, f"DTensor value clipping: shard {i}")
                else:
                    torch.testing.assert_close(p.grad.to_local(), shard, rtol=1e-6, atol=0, msg=f"DTensor AGC: shard {i}")

        if not with_fsdp2:
            return
        # FSDP2: a real fully_shard model's gradients after backward.
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        reference.load_state_dict(model.state_dict())
        fully_shard(model, mesh=mesh)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
        model(x).square().sum().backward()
        reference(x).square().sum().backward()
        full = [p.grad.detach().clone() for p in reference.parameters()]  # every rank saw all of x
        norm = whole_norm(fastclip.clip_(model.parameters(), 0.01), dtensor=True)
        local = [p.grad.to_local() for p in model.parameters()]
        _check(norm, local, full, 0.01, 2.0, rank, world, "FSDP2", dtensor_layout=True)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_gradients_give_the_unsharded_result(world, tmp_path):
    from fastclip._dispatch import backend_status

    backends = [name for name, reason in backend_status("cpu").items() if reason is None]
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), backends, FSDP2_RUNS_ON_CPU), nprocs=world, join=True)
    if not FSDP2_RUNS_ON_CPU:
        pytest.skip(f"plain and DTensor shards checked; torch {torch.__version__}'s fully_shard cannot run on CPU "
                    "(its CPU streams have no record_event), so the FSDP2 model was not")


def test_placements_that_shard_replicate_or_are_refused():
    from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

    from fastclip.distributed import sharded_mesh_dims

    class UnknownPlacement(Placement):
        pass

    assert sharded_mesh_dims([Replicate(), _StridedShard(0, split_factor=2), Shard(1)]) == [1, 2]
    assert sharded_mesh_dims([Replicate(), Replicate()]) == []
    with pytest.raises(ValueError, match="Partial"):
        sharded_mesh_dims([Shard(0), Partial()])
    with pytest.raises(ValueError, match="does not know"):
        sharded_mesh_dims([UnknownPlacement()])


def _strided_shard_worker(rank: int, world: int, init_file: str, backends: list[str]) -> None:
    sys.path.insert(0, HERE)
    from harness import gloo_worker

    with gloo_worker(rank, world, init_file):
        import fastclip
        from harness import assert_norm_error_bound, assert_same, whole_norm
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh = init_device_mesh("cpu", (world,))

        def param(values):  # the issue's case: FSDP2's placement when TP shares the mesh
            p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(values), mesh, [_StridedShard(0, split_factor=2)]))
            p.grad = distribute_tensor(values.clone(), mesh, [_StridedShard(0, split_factor=2)])
            return p

        for backend in backends:
            for norm_type in (2.0, math.inf):
                mine, reference = param(torch.arange(1.0, 9.0)), param(torch.arange(1.0, 9.0))
                norm = whole_norm(fastclip.clip_([mine], 5.0, norm_type, backend=backend), dtensor=True)
                expected = torch.nn.utils.clip_grad_norm_([reference], 5.0, norm_type).full_tensor()
                what = f"rank {rank}, {backend}, norm_type {norm_type}"
                if math.isinf(norm_type):
                    assert_same(norm, expected, f"{what}: [E2] norm")
                else:
                    assert_norm_error_bound(norm, expected, [torch.arange(1.0, 9.0)], norm_type)
                rescaled = param(torch.arange(1.0, 9.0))
                torch.nn.utils.clip_grads_with_norm_([rescaled], 5.0, norm)
                assert_same(mine.grad.to_local(), rescaled.grad.to_local(), f"{what}: [E3] local shard")


def test_strided_shard_gradients_give_torchs_norm_on_every_rank(tmp_path):
    """FSDP2 on a mesh that also does tensor parallelism shards with _StridedShard, which torch 2.13
    does not call a Shard: it must still count as one (it once counted as replicated, giving a
    too-small norm that differed per rank)."""
    from fastclip._dispatch import backend_status

    backends = [name for name, reason in backend_status("cpu").items() if reason is None]
    mp.spawn(_strided_shard_worker, args=(2, str(tmp_path / "init"), backends), nprocs=2, join=True)
