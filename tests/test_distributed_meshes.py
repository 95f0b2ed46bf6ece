"""Gradients on the meshes large trainers build, with 4 CPU processes (gloo): FSDP2 x TP (torchtitan's
Llama plan), HSDP, pipeline stages (``extra_groups=``), experts on a mesh of their own, uneven and
empty shards, and input that must be refused.

Every case checks, on every rank: the norm against torch (``clip_grad_norm_``'s own on the same
DTensors where torch can take them, else the float64 norm of the gathered full gradients): exactly
for the inf norm (E2), within E5 for p-norms; the norm bit-identical on every rank; every clipped
local shard exactly torch's scaling by that norm (E3); and the number of collectives one call
issues (counted by CommDebugMode, which sees every c10d collective).

One spawn runs every case on every backend, so the processes start once.
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
WORLD = 4
NORM_TYPES = (2.0, math.inf)


def _counted(fn, dtensor: bool | None = None):
    """(fn(), the number of collectives it issued); with ``dtensor`` set, fn() is a norm, checked
    to come back as torch's would (a replicated DTensor or a plain tensor) and given as plain.
    Every collective must be torch's functional all_reduce: the kind DTensor's own norm reduction
    issues, and the one torch's FSDP clipping test counts."""
    from harness import whole_norm
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        result = fn()
    kinds = {op: count for op, count in comm.get_comm_counts().items() if count}
    assert set(kinds) <= {torch.ops.c10d_functional.all_reduce}, kinds
    return result if dtensor is None else whole_norm(result, dtensor), comm.get_total_counts()


def _assert_same_on_every_rank(norm: torch.Tensor, what: str) -> None:
    bits = norm.detach().double().reshape(1).view(torch.int64)
    gathered = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, bits)
    assert all(torch.equal(g, bits) for g in gathered), f"{what}: norms differ between ranks: {gathered}"


def _assert_norm(norm, full_grads, norm_type, what, torch_norm=None):
    """E2 (inf) or E5 (p) against torch's norm of the full gradients, and the same on every rank."""
    from harness import assert_norm_error_bound, assert_same

    if torch_norm is None:  # torch refuses the inf norm of a 0-element tensor; without it, the same norm
        torch_norm = torch.nn.utils.get_total_norm([g for g in full_grads if g.numel()], norm_type)
    if math.isinf(norm_type):
        assert_same(norm, torch_norm, f"{what}: [E2] norm")
    else:
        assert_norm_error_bound(norm, torch_norm, full_grads, norm_type)
    _assert_same_on_every_rank(norm, what)


def _assert_clipped_shards(dtensor_grads, full_before, max_norm, norm, what):
    """E3: each local shard is the shard of torch's clipping of the full gradient by ``norm``."""
    from harness import assert_same
    from torch.distributed.tensor import distribute_tensor

    params = [torch.nn.Parameter(torch.zeros_like(f)) for f in full_before]
    for p, f in zip(params, full_before):
        p.grad = f.clone()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    for i, (g, p) in enumerate(zip(dtensor_grads, params)):
        expected = distribute_tensor(p.grad, g.device_mesh, g.placements).to_local()
        assert_same(g.to_local(), expected, f"{what}: [E3] local shard {i}")


def _twin_models(build):
    """Two models with the same weights: fastclip clips one, torch measures the other."""
    torch.manual_seed(0)
    mine = build()
    reference = build()
    reference.load_state_dict(mine.state_dict())
    return mine, reference


def _llama_on_fsdp_tp_mesh():
    """(the 2 x 2 (dp, tp) mesh, the config, twin Llama models sharded the torchtitan way on it)."""
    from tiny_llama import LlamaConfig, Transformer, apply_fsdp, apply_tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    config = LlamaConfig()

    def build():
        model = Transformer(config)
        apply_tensor_parallel(model, mesh["tp"])
        apply_fsdp(model, mesh["dp"])
        return model

    return mesh, config, _twin_models(build)


def _clip_twin_against_torch(mine, reference, tokens, norm_type, backend, what):
    """One step of twin models: fastclip clips ``mine`` in one collective; its norm is torch's
    norm of ``reference``'s gradients (E2/E5), and its local shards torch's scaling by it (E3)."""
    import fastclip
    from harness import assert_same

    for model in (mine, reference):
        model.zero_grad()
        model.loss(tokens).backward()
    full = [p.grad.full_tensor() for p in mine.parameters()]
    norm, collectives = _counted(lambda: fastclip.clip_(mine.parameters(), 0.05, norm_type, backend=backend),
                                 dtensor=True)
    assert collectives == 1, f"{what}: {collectives} collectives, expected 1"
    torch_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()], norm_type).full_tensor()
    _assert_norm(norm, full, norm_type, what, torch_norm)
    torch.nn.utils.clip_grads_with_norm_(reference.parameters(), 0.05, norm)
    for i, (a, b) in enumerate(zip(mine.parameters(), reference.parameters())):
        assert_same(a.grad.to_local(), b.grad.to_local(), f"{what}: [E3] local shard {i}")


def _fsdp_tp(rank, backends):
    """torchtitan's Llama plan (TP with sequence-parallel norms, FSDP2 per block) on a 2 x 2 mesh:
    every gradient is a DTensor on the (dp, tp) mesh, FSDP's dimension a _StridedShard where TP also
    shards dim 0. Against torch's clip_grad_norm_ machinery on the same DTensors."""
    from tiny_llama import batch

    mesh, config, (mine, reference) = _llama_on_fsdp_tp_mesh()
    tokens = batch(config, seed=mesh.get_coordinate()[0])  # data parallel: one batch per dp rank
    placements = {type(p).__name__ for m in mine.parameters() for p in m.placements}
    assert "_StridedShard" in placements or "Shard" in placements, placements
    for backend in backends:
        for norm_type in NORM_TYPES:
            _clip_twin_against_torch(mine, reference, tokens, norm_type, backend,
                                     f"FSDP2 x TP, rank {rank}, {backend}, norm_type {norm_type}")


def _hsdp(rank, backends):
    """FSDP2 on a (replicate, shard) mesh: the replicate dimension holds copies, counted once."""
    import fastclip
    from harness import assert_same
    from tiny_llama import LlamaConfig, Transformer, apply_fsdp, batch
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    config = LlamaConfig(n_layers=1)

    def build():
        model = Transformer(config)
        apply_fsdp(model, mesh)
        return model

    mine, reference = _twin_models(build)
    tokens = batch(config, seed=rank)
    for backend in backends:
        for norm_type in NORM_TYPES:
            what = f"HSDP, rank {rank}, {backend}, norm_type {norm_type}"
            _clip_twin_against_torch(mine, reference, tokens, norm_type, backend, what)
            assert all(p.grad.placements[0].is_replicate() for p in mine.parameters())
            # torch's norm of DTensors is a DTensor; clip_grads_with_norm_ takes it as torch's does
            # (Accelerate passes one), on the now equal gradients.
            dtensor_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()], norm_type) * 3
            fastclip.clip_grads_with_norm_(mine.parameters(), 0.05, dtensor_norm, backend=backend)
            torch.nn.utils.clip_grads_with_norm_(reference.parameters(), 0.05, dtensor_norm)
            for i, (a, b) in enumerate(zip(mine.parameters(), reference.parameters())):
                assert_same(a.grad.to_local(), b.grad.to_local(), f"{what}: DTensor total_norm, local shard {i}")


def _gathered_full(grads, keep: bool) -> list[torch.Tensor]:
    """The full gradients of every rank that passes ``keep``, in rank order, gathered to all."""
    local = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]  # collective: every rank
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local if keep else [])
    return [t for part in everyone for t in part]


class _FirstStage(torch.nn.Module):
    def __init__(self, config):
        from tiny_llama import Block

        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(config.vocab_size, config.dim)
        self.block = Block(config)

    def forward(self, tokens):
        return self.block(self.tok_embeddings(tokens))


class _LastStage(torch.nn.Module):
    def __init__(self, config):
        from tiny_llama import Block

        super().__init__()
        self.block = Block(config)
        self.norm = torch.nn.RMSNorm(config.dim)
        self.output = torch.nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens):  # the activations the first stage would send: synthetic, per batch
        x = torch.randn(tokens.shape + (self.norm.normalized_shape[0],), generator=torch.Generator().manual_seed(1))
        return self.output(self.norm(self.block(x)))


def _pipeline(rank, backends):
    """2 pipeline stages x 2 FSDP ranks: each stage holds other layers, sharded on its own dp mesh;
    the norm is summed over the pipeline group (extra_groups=) in the same single collective.
    Against the float64 norm of every stage's gathered full gradients."""
    import fastclip
    from tiny_llama import LlamaConfig, apply_fsdp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage, dp_rank = mesh.get_coordinate()
    config = LlamaConfig()
    torch.manual_seed(stage)  # each stage its own layers
    model = _FirstStage(config) if stage == 0 else _LastStage(config)
    apply_fsdp(model, mesh["dp"])
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len), generator=torch.Generator().manual_seed(dp_rank))
    for backend in backends:
        for norm_type in NORM_TYPES:
            what = f"pipeline, rank {rank}, {backend}, norm_type {norm_type}"
            model.zero_grad()
            model(tokens).square().mean().backward()
            grads = [p.grad for p in model.parameters()]
            every_stage = _gathered_full(grads, keep=dp_rank == 0)
            mine = [g.full_tensor() for g in grads]
            norm, collectives = _counted(lambda: fastclip.clip_(model.parameters(), 0.05, norm_type,
                                                                extra_groups=mesh["pp"], backend=backend), dtensor=True)
            assert collectives == 1, f"{what}: {collectives} collectives, expected 1"
            _assert_norm(norm, every_stage, norm_type, what,
                         torch.nn.utils.get_total_norm(every_stage, norm_type))
            _assert_clipped_shards(grads, mine, 0.05, norm, what)
            # torchtitan's own pipeline path gives the same total: torch's stage norm, then the pipeline group.
            if not math.isinf(norm_type):
                stage_norm = torch.nn.utils.get_total_norm(mine, norm_type) ** norm_type
                dist.all_reduce(stage_norm, group=mesh["pp"].get_group())
                _assert_norm(norm, every_stage, norm_type, what + " (torchtitan's reduction)",
                             stage_norm ** (1 / norm_type))


def _expert_grads(dense_mesh, expert_mesh, expert_placements):
    """Dense gradients sharded on the (dp, tp) mesh, expert gradients on a mesh of their own; the
    full tensors are built on every rank from one seed, so the truth is known without gathering."""
    from torch.distributed.tensor import Shard, distribute_tensor

    generator = torch.Generator().manual_seed(11)
    dense = [torch.randn(shape, generator=generator) for shape in [(8, 6), (5,), (4, 4)]]
    experts = [torch.randn(shape, generator=generator) * 3 for shape in [(4, 6, 5), (4, 5)]]  # 4 experts on dim 0
    params = []
    for full, mesh, placements in [(t, dense_mesh, [Shard(0), Shard(1) if t.dim() > 1 else Shard(0)]) for t in dense] + \
                                  [(t, expert_mesh, expert_placements) for t in experts]:
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, placements))
        p.grad = distribute_tensor(full.clone(), mesh, placements)
        params.append(p)
    return params, dense + experts


def _experts(rank, backends):
    """Mixture-of-experts layouts: experts on a mesh of their own over the same ranks (one
    collective; its replicated dimension counted once), and on a mesh over fewer ranks, as
    expert parallelism within each half of the world (one collective per mesh)."""
    import fastclip
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    dense_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    # Ranks in another order than the dense mesh: experts 0-1 on ranks 0 and 2, copies on 1 and 3.
    expert_mesh = DeviceMesh("cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("dp_mod_ep", "ep"))
    half_meshes = [DeviceMesh("cpu", torch.tensor(ranks), mesh_dim_names=("ep",)) for ranks in ([0, 1], [2, 3])]
    half_mesh = half_meshes[rank // 2]
    layouts = {"experts over the same ranks": (expert_mesh, [Replicate(), Shard(0)], 1),
               "experts within each half": (half_mesh, [Shard(0)], 2)}
    for backend in backends:
        for name, (mesh, placements, expected_collectives) in layouts.items():
            for norm_type in NORM_TYPES + (3.0,):
                what = f"{name}, rank {rank}, {backend}, norm_type {norm_type}"
                params, full = _expert_grads(dense_mesh, mesh, placements)
                norm, collectives = _counted(lambda: fastclip.clip_(params, 1.0, norm_type, backend=backend),
                                             dtensor=False)  # two meshes: torch could not return a DTensor
                assert collectives == expected_collectives, f"{what}: {collectives} collectives"
                _assert_norm(norm, full, norm_type, what,
                             torch.nn.utils.get_total_norm(full, norm_type))
                _assert_clipped_shards([p.grad for p in params], full, 1.0, norm, what)


def _uneven(rank, backends):
    """Shards of 0 elements on some ranks (pytorch#140066): L2, inf and p = 3, 0.5; with
    error_if_nonfinite and overflow_safe; and a rank with no gradient at all under group=."""
    import fastclip
    from harness import assert_same
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    shapes = [(1,), (3, 2), (0,), (5,), (2, 7)]  # 1 and 3 rows over 4 ranks leave ranks empty
    for backend in backends:
        for scale, overflow_safe in ((1.0, False), (1e20, True)):
            for norm_type in NORM_TYPES + (3.0, 0.5):
                what = f"uneven shards, rank {rank}, {backend}, norm_type {norm_type}, scale {scale}"
                generator = torch.Generator().manual_seed(5)
                full = [torch.randn(shape, generator=generator) * scale for shape in shapes]
                params = []
                for f in full:
                    p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(f), mesh, [Shard(0)]))
                    p.grad = distribute_tensor(f.clone(), mesh, [Shard(0)])
                    params.append(p)
                if rank == 3:
                    assert all(p.grad.to_local().numel() == 0 for p in params[:3])
                norm, collectives = _counted(lambda: fastclip.clip_(params, 0.5, norm_type, backend=backend,
                                                                    overflow_safe=overflow_safe), dtensor=True)
                assert collectives == 1, f"{what}: {collectives} collectives"
                if overflow_safe:  # torch's squares overflow: the truth is the float64 norm, to 2 ulp of fp32
                    truth = torch.nn.utils.get_total_norm([f.double() for f in full if f.numel()], norm_type)
                    assert torch.isfinite(norm) and abs(float(norm) - float(truth)) <= 2 * 2**-23 * float(truth), (
                        f"{what}: {float(norm)!r}, float64 {float(truth)!r}")
                    _assert_same_on_every_rank(norm, what)
                else:
                    _assert_norm(norm, full, norm_type, what)
                _assert_clipped_shards([p.grad for p in params], full, 0.5, norm, what)

            # error_if_nonfinite: a NaN on one rank's shard makes every rank raise, before any change.
            poisoned = torch.randn(9, generator=torch.Generator().manual_seed(6))
            poisoned[0] = math.nan  # in rank 0's shard only
            p = torch.nn.Parameter(distribute_tensor(torch.zeros(9), mesh, [Shard(0)]))
            p.grad = distribute_tensor(poisoned.clone(), mesh, [Shard(0)])
            before = p.grad.to_local().clone()
            with pytest.raises(RuntimeError, match="non-finite"):
                fastclip.clip_([p], 1.0, error_if_nonfinite=True, backend=backend, overflow_safe=overflow_safe)
            assert_same(p.grad.to_local(), before, f"rank {rank}, {backend}: gradients after a refused clip")

        # group=: hand-sharded plain tensors, with a rank that holds no gradient at all.
        full = torch.randn(2, 3, generator=torch.Generator().manual_seed(8))
        local = [torch.tensor_split(full, WORLD)[rank].clone()] if rank != 3 else []
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in local]
        for p, t in zip(params, local):
            p.grad = t.clone()
        for norm_type in NORM_TYPES:
            norm, collectives = _counted(lambda: fastclip.get_total_norm([p.grad for p in params], norm_type,
                                                                         group=dist.group.WORLD, backend=backend),
                                         dtensor=False)
            assert collectives == 1
            _assert_norm(norm, [full], norm_type, f"group=, a rank without gradients, rank {rank}, {backend}")


def _refused(rank, backends):
    """Bad input: a clear error on every rank where it is bad, before any gradient changes."""
    import fastclip
    from harness import assert_same
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    world_mesh = init_device_mesh("cpu", (WORLD,))
    first_two = DeviceMesh("cpu", torch.tensor([0, 1]))
    pair_group = dist.new_group([0, 1])

    def param(mesh):
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(8), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])
        return p

    backend = backends[0]
    # distribute_tensor scatters: every rank makes the same DTensors in the same order.
    on_world, on_first_two = param(world_mesh), param(first_two)
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    meta.grad = torch.zeros(2, device="meta")
    cases = [
        ("a mesh without this rank", [on_world, on_first_two], {}, ValueError,
         "does not contain this process" if rank >= 2 else None),
        ("gradients on two device types", [on_world, meta], {}, ValueError, "one device type"),
        ("a group= the mesh contradicts", [on_world], {"group": pair_group if rank < 2 else None}, ValueError,
         "must agree" if rank < 2 else None),
        ("an extra group of the wrong type", [on_world], {"extra_groups": ["pp"]}, TypeError, "extra_groups"),
        ("an extra group over the gradients' own mesh", [on_world], {"extra_groups": world_mesh}, ValueError,
         "counted twice"),
    ]
    for name, params, kwargs, error, message in cases:
        if message is None:  # valid on this rank
            continue
        before = [p.grad.to_local().clone() for p in params if p.device.type != "meta"]
        with pytest.raises(error, match=message):
            fastclip.clip_(params, 0.1, backend=backend, **kwargs)
        for b, p in zip(before, params):
            assert_same(p.grad.to_local(), b, f"rank {rank}, {name}: gradient after a refused call")


def _torchtitan_clip_grad_norm_(parameters, max_norm, norm_type=2.0, pp_mesh=None):
    """torchtitan's clipping (torchtitan/distributed/utils.py), as trainers call it: torch.nn.utils'
    functions looked up at call time, a DTensor norm made whole, the pipeline group reduced by hand."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    if pp_mesh is not None:
        if math.isinf(norm_type):
            dist.all_reduce(total_norm, op=dist.ReduceOp.MAX, group=pp_mesh.get_group())
        else:
            total_norm **= norm_type
            dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
            total_norm **= 1.0 / norm_type
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


def _torchtitan_training(rank, backends):
    """A torchtitan-style run: the Llama plan on a 2 x 2 (dp, tp) mesh, AdamW, torchtitan's clipping
    with fastclip.patch_torch(). At each of 3 steps a twin model with the same weights clips without
    the patch: the norms agree (E5, E2), the clipped local shards are exactly torch's scaling by
    fastclip's norm (E3), and fastclip's path takes one collective where torch's takes two."""
    import fastclip
    from harness import assert_same
    from tiny_llama import batch

    mesh, config, (patched, plain) = _llama_on_fsdp_tp_mesh()
    optimizer = torch.optim.AdamW(patched.parameters(), lr=1e-2)
    clipped_steps = 0
    for step in range(3):
        for norm_type in NORM_TYPES:
            what = f"torchtitan-style step {step}, rank {rank}, norm_type {norm_type}"
            tokens = batch(config, seed=100 * step + mesh.get_coordinate()[0])
            plain.load_state_dict(patched.state_dict())
            for model in (patched, plain):
                model.zero_grad()
                model.loss(tokens).backward()
            full = [p.grad.full_tensor() for p in patched.parameters()]
            max_norm = 0.125 if math.isinf(norm_type) else 1.1  # clips on some steps, not on others
            with fastclip.patch_torch():
                norm, collectives = _counted(lambda: _torchtitan_clip_grad_norm_(patched.parameters(), max_norm,
                                                                                 norm_type), dtensor=False)
            torch_norm, torch_collectives = _counted(lambda: _torchtitan_clip_grad_norm_(plain.parameters(), max_norm,
                                                                                         norm_type), dtensor=False)
            assert (collectives, torch_collectives) == (1, 2), (what, collectives, torch_collectives)
            _assert_norm(norm, full, norm_type, what, torch_norm)
            clipped_steps += bool(norm > max_norm)
            plain.load_state_dict(patched.state_dict())  # weights unchanged by clipping: same as before
            for p, g in zip(plain.parameters(), full):
                p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
            torch.nn.utils.clip_grads_with_norm_(plain.parameters(), max_norm, norm)
            for i, (a, b) in enumerate(zip(patched.parameters(), plain.parameters())):
                assert_same(a.grad.to_local(), b.grad.to_local(), f"{what}: [E3] local shard {i}")
        optimizer.step()
    assert 0 < clipped_steps < 6, f"{clipped_steps} of 6 calls clipped: both cases must be seen"


CASES = {"fsdp_tp": _fsdp_tp, "hsdp": _hsdp, "pipeline": _pipeline, "experts": _experts, "uneven": _uneven,
         "refused": _refused, "torchtitan_training": _torchtitan_training}


def _worker(rank: int, init_file: str, backends: list[str], cases: list[str]) -> None:
    sys.path.insert(0, HERE)
    from harness import gloo_worker

    with gloo_worker(rank, WORLD, init_file):
        for name in cases:
            CASES[name](rank, backends)
            dist.barrier()


def _stage_mesh_worker(rank: int, init_file: str, backends: list[str]) -> None:
    """8 ranks as 2 pipeline stages x (dp 2 x tp 2): DTensors on a stage's 2-D mesh, which spans
    neither the world nor one mesh dimension. Without extra_groups the norm is the stage's, reduced
    over the stage mesh flattened (a group built on the first call, then kept); with the pipeline
    group, the world's; one collective either way."""
    sys.path.insert(0, HERE)
    from harness import gloo_worker

    with gloo_worker(rank, 8, init_file):
        import fastclip
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
        stage = mesh.get_coordinate()[0]
        stage_mesh = mesh["dp", "tp"]
        shapes = {0: [(6, 4), (3,)], 1: [(5, 2), (4, 4), (2,)]}  # each stage its own gradients
        full_by_stage = {s: [torch.randn(shape, generator=torch.Generator().manual_seed(10 * s + i))
                             for i, shape in enumerate(shapes[s])] for s in shapes}
        for backend in backends:
            for norm_type in NORM_TYPES:
                every_stage = full_by_stage[0] + full_by_stage[1]
                for extra_groups, truth in ((None, full_by_stage[stage]), (mesh["pp"], every_stage)):
                    what = f"stage mesh, rank {rank}, {backend}, norm_type {norm_type}, extra_groups {extra_groups}"
                    params = []
                    for full in full_by_stage[stage]:
                        placements = [Shard(0), Shard(1) if full.dim() > 1 else Replicate()]
                        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full), stage_mesh, placements))
                        p.grad = distribute_tensor(full.clone(), stage_mesh, placements)
                        params.append(p)
                    fastclip.get_total_norm([p.grad for p in params], norm_type, extra_groups=extra_groups,
                                            backend=backend)  # the first call may build the flattened group
                    norm, collectives = _counted(lambda: fastclip.clip_(params, 0.5, norm_type, backend=backend,
                                                                        extra_groups=extra_groups), dtensor=True)
                    assert collectives == 1, f"{what}: {collectives} collectives"
                    torch_norm = torch.nn.utils.get_total_norm(truth, norm_type)
                    if extra_groups is None:  # the norm is the same on the stage's ranks, not across stages
                        from harness import assert_norm_error_bound, assert_same

                        (assert_same(norm, torch_norm, what) if math.isinf(norm_type)
                         else assert_norm_error_bound(norm, torch_norm, truth, norm_type))
                    else:
                        _assert_norm(norm, truth, norm_type, what, torch_norm)
                    _assert_clipped_shards([p.grad for p in params], full_by_stage[stage], 0.5, norm, what)


def test_pipeline_stage_meshes_of_eight_ranks(tmp_path):
    from fastclip._dispatch import backend_status

    backends = [name for name, reason in backend_status("cpu").items() if reason is None]
    mp.spawn(_stage_mesh_worker, args=(str(tmp_path / "init"), backends), nprocs=8, join=True)


def test_meshes_large_trainers_build(tmp_path):
    from fastclip._dispatch import backend_status

    if not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip(f"torch {torch.__version__}'s fully_shard cannot run on CPU (its CPU streams have no record_event)")
    backends = [name for name, reason in backend_status("cpu").items() if reason is None]
    mp.spawn(_worker, args=(str(tmp_path / "init"), backends, list(CASES)), nprocs=WORLD, join=True)
