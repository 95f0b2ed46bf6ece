"""The global norm of gradients spread over processes: DTensor gradients (FSDP2 ``fully_shard``,
tensor parallelism, expert meshes), hand-sharded ones (``group=``, Megatron style), and totals
summed again over further groups (pipeline stages: ``extra_groups=``).

Each process computes the norm of its local shards with a fused kernel and turns it into its share
of the global sum of |g|^p (or max). Every share goes into one vector and one ``all_reduce`` (SUM,
or MAX for the inf norm) gives the global value on every rank, bit-identical across ranks; the root
follows, and every process scales its own shards by the same coefficient. Nothing waits on the
host: the collective is stream-ordered. It is torch's functional ``all_reduce``, the one DTensor's
own norm reduction issues, so tools that count torch's collectives (CommDebugMode) see the kind
they see in torch's ``clip_grad_norm_``, only fewer of them.

One collective serves several shard sets (FSDP x TP, dense and expert meshes, pipeline stages)
because replication is divided out exactly rather than by reducing dimension by dimension: of the
ranks holding the same copy of some elements (a ``Replicate`` mesh dimension, or plain tensors
that every rank holds), only one adds its share, and the others add 0. The collective then runs
over the group that spans every rank involved. Where the layout does not let one group serve
everything (meshes over different sets of ranks), there is one collective per distinct set of
ranks and one per extra group, never one per mesh dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import torch
import torch.distributed as dist


@dataclasses.dataclass
class ShardSet:
    """Local tensors whose norms combine the same way across processes.

    Attributes:
        tensors: this rank's local tensors of the set.
        ranks: the ranks over which the set's elements are spread (its mesh's ranks, or the
            ``group=`` ranks), sorted; empty for tensors that are local to this rank (plain tensors
            without ``group=``, which every rank is taken to hold alike, as with data parallelism).
        counts_here: whether this rank's share counts in a sum over ``ranks``: False where this
            rank holds a copy of elements that another rank of ``ranks`` counts (a ``Replicate``
            mesh dimension).
        mesh: the DTensors' device mesh, or None.
        group: the process group of ``group=``, or None.
    """

    tensors: list[torch.Tensor]
    ranks: tuple[int, ...] = ()
    counts_here: bool = True
    mesh: object = None
    group: object = None


def _dtensor_class():
    """DTensor, or None while torch.distributed.tensor is not imported: no DTensor can exist then,
    and importing it (~0.4 s) just to find out would slow down ``import fastclip``."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def has_dtensors(tensors: list[torch.Tensor]) -> bool:
    # On every call: the distinct types are collected in C (a model has one or two), so the common
    # case costs no Python-level pass over the gradients.
    dtensor = _dtensor_class()
    return dtensor is not None and any(issubclass(kind, dtensor) for kind in set(map(type, tensors)))


@functools.cache
def _shard_placement_types() -> tuple[type, ...]:
    """The placements whose local tensors hold disjoint parts of the whole: Shard, and _StridedShard
    (FSDP2's placement on a mesh that also does tensor parallelism), which torch 2.13 no longer
    derives from Shard and whose is_shard() is False."""
    from torch.distributed.tensor import placement_types

    return tuple(getattr(placement_types, name) for name in ("Shard", "_StridedShard") if hasattr(placement_types, name))


def sharded_mesh_dims(placements) -> list[int]:
    """The mesh dimensions over which a DTensor's local tensors are disjoint parts of the whole.

    A norm adds up over those; a Replicate dimension holds the same elements on every rank and adds
    nothing. Any shard-like placement counts, however its elements are interleaved (a norm does not
    care about the order of elements).

    Raises:
        ValueError: a Partial placement (the local values are addends of the whole, not its
            elements), or a placement type fastclip does not know, rather than guess.
    """
    shard_types = _shard_placement_types()
    dims = []
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if placement.is_partial():
            raise ValueError("fastclip: DTensor gradients with Partial placements are not reduced yet; "
                             "redistribute them to Shard or Replicate first")
        if not isinstance(placement, shard_types):
            raise ValueError(f"fastclip: DTensor placement {placement!r} on mesh dimension {dim} is of a type fastclip "
                             "does not know (not Shard, _StridedShard, Replicate or Partial); its norm cannot be "
                             "combined safely")
        dims.append(dim)
    return dims


def group_ranks(group) -> tuple[int, ...]:
    """The global ranks of a process group, sorted."""
    return tuple(sorted(dist.get_process_group_ranks(group)))


def _mesh_set(tensors: list, mesh, placements) -> ShardSet:
    """The shard set of DTensors on one mesh with one placement."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"fastclip: a DTensor gradient lives on {mesh}, which does not contain this process "
                         f"(rank {dist.get_rank()}): its norm cannot be computed here")
    sharded = sharded_mesh_dims(placements)
    if not sharded or mesh.size() == 1:  # the same values on every rank of the mesh, like a local tensor
        return ShardSet(tensors)
    counts_here = all(coordinate[dim] == 0 for dim in range(mesh.ndim) if dim not in sharded)
    return ShardSet(tensors, tuple(sorted(mesh.mesh.flatten().tolist())), counts_here, mesh=mesh)


def split_shards(grads: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list[ShardSet], object]:
    """Local tensors of ``grads`` and how their norms combine across processes.

    Args:
        grads: gradients, plain tensors and/or DTensors.
        group: the process group over which plain tensors are shards of one whole (``group=``), or
            None if plain tensors are local (replicated) values.

    Returns:
        (every local tensor, the shard sets, the mesh of the result): the shard sets are empty when
        nothing is distributed; the mesh is the DTensors' when every gradient is a DTensor on one
        mesh (torch then returns the norm as a DTensor on it), else None.

    Raises:
        ValueError: a DTensor on a mesh without this rank, a placement that cannot be combined, a
            ``group`` without this rank or over other ranks than the DTensors' meshes, gradients on
            several device types.
    """
    if group is None and not has_dtensors(grads):
        return grads, [], None
    dtensor = _dtensor_class()
    by_layout: dict[tuple, list] = {}
    local = []
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            key = (id(g.device_mesh), tuple(g.placements))
            layout, tensors = by_layout.setdefault(key, ((g.device_mesh, g.placements), []))
            g = g.to_local()
        else:
            tensors = by_layout.setdefault(("plain",), (None, []))[1]
        tensors.append(g)
        local.append(g)
    if len({t.device.type for t in local}) > 1:
        raise ValueError("fastclip: distributed gradients must all be on one device type (one collective reduces "
                         f"their norm), got {sorted({t.device.type for t in local})}")
    sets = []
    for key, (layout, tensors) in by_layout.items():
        if layout is not None:
            sets.append(_mesh_set(tensors, *layout))
        elif group is not None and dist.get_world_size(group) > 1:
            sets.append(ShardSet(tensors, group_ranks(group), group=group))
        else:
            sets.append(ShardSet(tensors))
    if group is not None:
        _check_group(group, sets)
        if ("plain",) not in by_layout and dist.get_world_size(group) > 1:
            # No plain tensors here: this process still joins the group's collective, with nothing.
            sets.append(ShardSet([], group_ranks(group), group=group))
    meshes = {layout[0] for layout, _ in by_layout.values() if layout is not None}
    result_mesh = next(iter(meshes)) if len(meshes) == 1 and ("plain",) not in by_layout else None
    return local, sets, result_mesh


def as_dtensor_like_torch(total_norm: torch.Tensor, mesh) -> torch.Tensor:
    """The norm as torch returns it for DTensor gradients on one mesh: a DTensor replicated on that
    mesh (code written for torch calls ``.full_tensor()`` on it); a plain tensor otherwise. Every
    rank holds the same value already, so this wraps it without communicating."""
    if mesh is None:
        return total_norm
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(total_norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


def as_plain_tensor(total_norm: torch.Tensor) -> torch.Tensor:
    """A total norm given as a DTensor (torch's, or fastclip's own result) as the plain tensor of
    its whole value: a replicated one is its local tensor; a partial one is reduced (collective)."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(total_norm, dtensor):
        return total_norm
    return total_norm.full_tensor()


def _check_group(group, sets: list[ShardSet]) -> None:
    ranks = group_ranks(group)
    if dist.get_rank() not in ranks:
        raise ValueError(f"fastclip: group= spans ranks {list(ranks)}, which do not include this process "
                         f"(rank {dist.get_rank()})")
    for shard_set in sets:
        if shard_set.mesh is not None and shard_set.ranks != ranks:
            raise ValueError(f"fastclip: group= spans ranks {list(ranks)}, but DTensor gradients are sharded over "
                             f"{shard_set.mesh} (ranks {list(shard_set.ranks)}): group= says over which ranks plain "
                             "tensors are shards, and must agree with the DTensors' mesh, or be left out")


def as_extra_groups(extra_groups) -> list:
    """``extra_groups=`` as a list of process groups: a group, a 1-D DeviceMesh, or a sequence of
    them (None or empty: none), each containing this process.

    Raises:
        TypeError, ValueError: anything else.
    """
    if extra_groups is None:
        return []
    if isinstance(extra_groups, dist.ProcessGroup) or hasattr(extra_groups, "get_group"):
        extra_groups = [extra_groups]
    groups = []
    for item in extra_groups:
        if hasattr(item, "get_group"):  # a DeviceMesh
            if item.ndim != 1:
                raise ValueError(f"fastclip: extra_groups takes 1-D device meshes, got {item}")
            item = item.get_group()
        if not isinstance(item, dist.ProcessGroup):
            raise TypeError(f"fastclip: extra_groups takes ProcessGroups or 1-D DeviceMeshes, got {type(item).__name__}")
        if dist.get_rank() not in group_ranks(item):
            raise ValueError(f"fastclip: an extra group spans ranks {list(group_ranks(item))}, which do not include "
                             f"this process (rank {dist.get_rank()})")
        groups.append(item)
    return groups


@dataclasses.dataclass
class _Reduction:
    """One collective (or none, for ``group`` None): the shard sets whose shares it sums."""

    group: object
    sets: list[ShardSet]
    local_counts_here: bool  # whether the sets local to this rank count here (one rank of the group adds them)


def _group_spanning(ranks: tuple[int, ...], sets: list[ShardSet]):
    """A process group over exactly ``ranks``: the world, ``group=``, or a mesh's."""
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    shard_set = next(s for s in sets if s.ranks == ranks)
    if shard_set.group is not None:
        return shard_set.group
    mesh = shard_set.mesh
    wide = [dim for dim in range(mesh.ndim) if mesh.size(dim) > 1]
    return mesh.get_group(wide[0]) if len(wide) == 1 else _flattened_group(mesh)


@functools.lru_cache(maxsize=None)
def _flattened_group(mesh):
    """The group over all ranks of a multi-dimensional mesh that is not the whole world (a pipeline
    stage's FSDP x TP mesh): DeviceMesh's own flattening, made once per mesh and kept (creating the
    group is collective over the mesh's root, which every stage reaches in the same call)."""
    return mesh._flatten().get_group()


def _plan(sets: list[ShardSet], extra_groups: list) -> tuple[list[_Reduction], list]:
    """How to combine ``sets`` across processes and sum them over ``extra_groups``, in the fewest
    collectives.

    One collective when all sets spread over the same ranks (one mesh, or dense and expert meshes
    over the same ranks): over those ranks, or with extra groups over the world when the sizes say
    that the stages and their meshes tile it (the meshes DeviceMesh builds are grids: every rank
    sees the same shape). Otherwise one per distinct set of ranks, whose results add up, then one
    per extra group.

    Raises:
        ValueError: an extra group sharing more than this rank with the sets' ranks or with another
            extra group: its shares would be counted twice.

    Returns:
        (the reductions whose results add up, the extra groups still to reduce the sum over).
    """
    rank = dist.get_rank()
    domains = list(dict.fromkeys(s.ranks for s in sets if s.ranks))
    extra_ranks = [group_ranks(g) for g in extra_groups]
    for i, ranks in enumerate(extra_ranks):
        for domain in domains + extra_ranks[:i]:
            if set(ranks) & set(domain) != {rank}:
                raise ValueError(f"fastclip: an extra group spans ranks {list(ranks)}, which share more than this "
                                 f"process with ranks {list(domain)} over which the gradients are already reduced: "
                                 "an extra group must hold other gradients (e.g. other pipeline stages), or its "
                                 "shares would be counted twice")
    if len(domains) <= 1:
        domain = domains[0] if domains else (rank,)
        if not extra_groups:
            group = None if len(domain) == 1 else _group_spanning(domain, sets)
            return [_Reduction(group, sets, rank == domain[0])], []
        if len(domain) * math.prod(map(len, extra_ranks)) == dist.get_world_size():
            return [_Reduction(dist.group.WORLD, sets, rank == domain[0])], []
        if len(extra_groups) == 1 and len(domain) == 1:
            return [_Reduction(extra_groups[0], sets, True)], []
    if not domains:
        return [_Reduction(None, sets, True)], extra_groups
    reductions = []
    for i, domain in enumerate(domains):
        # The local sets (alike on every rank) are added once, with the first domain's sets.
        members = [s for s in sets if s.ranks == domain or (i == 0 and not s.ranks)]
        reductions.append(_Reduction(_group_spanning(domain, sets), members, rank == domain[0]))
    return reductions, extra_groups


def _device_without_tensors(groups) -> torch.device:
    """Where a process without gradients makes its (empty) share: on the device that the
    collectives' backend works on (CUDA for NCCL, else the CPU)."""
    for group in groups:
        if group is not None and "nccl" in str(dist.get_backend(group)):
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_norm(shard_sets: list[ShardSet], norm_type: float, total_dtype: torch.dtype, local_norm,
                extra_groups=()) -> torch.Tensor:
    """The norm of all shards of all sets as one vector, identical on every process.

    Args:
        shard_sets: from :func:`split_shards`.
        norm_type: p > 0 or inf.
        total_dtype: the dtype of the result.
        local_norm: ``local_norm(tensors)``: the overflow-safe norm of local tensors (fp32 or
            wider, on their device), from a fused kernel.
        extra_groups: process groups over which the totals are summed again (inf: maxed), e.g. the
            pipeline-parallel group: each of their ranks holds other gradients.

    Returns:
        A 0-dim tensor of ``total_dtype`` on the first shard's device (where this process has no
        shard: on the collectives' device).
    """
    from torch.distributed import _functional_collectives as functional  # out of place; waited on first use

    is_max = math.isinf(norm_type)
    op = "max" if is_max else "sum"
    reductions, extra_groups = _plan(shard_sets, list(extra_groups))
    device = next((t.device for s in shard_sets for t in s.tensors), None)
    if device is None:
        device = _device_without_tensors([r.group for r in reductions] + extra_groups)
    total = None
    for reduction in reductions:
        # inf: [max, any NaN]: a MAX reduction need not propagate NaN (gloo's does not), so NaN
        # travels as a flag in the same collective. p: [sum of |g|^p].
        part = torch.zeros(2 if is_max else 1, dtype=torch.float64, device=device)
        for shard_set in reduction.sets:
            counts = shard_set.counts_here if shard_set.ranks else reduction.local_counts_here
            # Uneven sharding leaves some shards empty: they add nothing (0 is the identity of both
            # the sum and the max of norms), and the inf norm of an empty tensor is an error.
            nonempty = [t for t in shard_set.tensors if t.numel() > 0]
            if not (nonempty and (counts or is_max)):
                continue
            norm = local_norm(nonempty).to(device, torch.float64)
            if is_max:
                part = torch.maximum(part, torch.stack([torch.nan_to_num(norm, nan=0.0), norm.isnan().double()]))
            else:
                part = part + norm**norm_type
        if reduction.group is not None:
            part = functional.all_reduce(part, op, reduction.group)
        total = part if total is None else (torch.maximum(total, part) if is_max else total + part)
    for group in extra_groups:
        total = functional.all_reduce(total, op, group)
    if is_max:
        return torch.where(total[1] > 0, math.nan, total[0]).to(total_dtype)
    return (total[0] ** (1.0 / norm_type)).to(total_dtype)
