"""The global norm of gradients spread over processes: DTensor gradients (FSDP2 ``fully_shard``,
tensor parallelism) and hand-sharded ones (``group=``, Megatron style).

Each process computes the norm of its local shards with a fused kernel, turns it into its share of
the global sum of |g|^p (or max), and one ``all_reduce`` per set of shards (SUM, or MAX for the inf
norm) on the device gives the global value; the root follows, and every process scales its own
shards by the same coefficient. Nothing waits on the host: the collectives are stream-ordered.
Collectives are torch.distributed's own, nothing home-made.
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
    """Local tensors whose norms add up over ``groups`` (each process holds different elements);
    no groups means the tensors are the same on every process (replicated) and add up locally."""

    tensors: list[torch.Tensor]
    groups: tuple = ()


def _dtensor_class():
    """DTensor, or None while torch.distributed.tensor is not imported: no DTensor can exist then,
    and importing it (~0.4 s) just to find out would slow down ``import fastclip``."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _has_dtensors(tensors: list[torch.Tensor]) -> bool:
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


def split_shards(grads: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list[ShardSet]]:
    """Local tensors of ``grads`` and how their norms combine across processes.

    Args:
        grads: gradients, plain tensors and/or DTensors.
        group: the process group over which plain tensors are shards of one whole (``group=``), or
            None if plain tensors are local (replicated) values.

    Returns:
        (every local tensor, the shard sets); the shard sets are empty when nothing is distributed.
    """
    if group is None and not _has_dtensors(grads):
        return grads, []
    dtensor = _dtensor_class()
    sets: dict[tuple, ShardSet] = {}
    local = []
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            groups = tuple(g.device_mesh.get_group(dim) for dim in sharded_mesh_dims(g.placements))
            g = g.to_local()
        else:
            groups = () if group is None else (group,)
        local.append(g)
        sets.setdefault(tuple(map(id, groups)), ShardSet([], groups)).tensors.append(g)
    return local, list(sets.values())


def global_norm(shard_sets: list[ShardSet], norm_type: float, total_dtype: torch.dtype, local_norm) -> torch.Tensor:
    """The norm of all shards of all sets as one vector, identical on every process.

    Args:
        shard_sets: from :func:`split_shards`.
        norm_type: p > 0 or inf.
        total_dtype: the dtype of the result.
        local_norm: ``local_norm(tensors)``: the overflow-safe norm of local tensors (fp32 or
            wider, on their device), from a fused kernel.

    Returns:
        A 0-dim tensor of ``total_dtype`` on the first shard's device.
    """
    device = next(t.device for s in shard_sets for t in s.tensors)
    if math.isinf(norm_type):
        # [max, any NaN]: a MAX reduction need not propagate NaN (gloo's does not), so NaN travels
        # as a flag in the same collective.
        result = torch.zeros(2, dtype=torch.float64, device=device)
        for shard_set in shard_sets:
            part = torch.zeros(2, dtype=torch.float64, device=device)
            # Uneven sharding leaves some shards empty; the inf norm of an empty tensor is an error,
            # but an empty shard of a non-empty tensor is fine: 0 is the max's identity on norms.
            nonempty = [t for t in shard_set.tensors if t.numel() > 0]
            if nonempty:
                n = local_norm(nonempty).to(device, torch.float64)
                part = torch.stack([torch.nan_to_num(n, nan=0.0), n.isnan().double()])
            for group in shard_set.groups:
                dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
            result = torch.maximum(result, part)
        return torch.where(result[1] > 0, math.nan, result[0]).to(total_dtype)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for shard_set in shard_sets:
        # This process's share of the sum of |g|^p, from its shards' (overflow-safe) norm.
        share = local_norm(shard_set.tensors).to(device, torch.float64) ** norm_type
        for group in shard_set.groups:
            dist.all_reduce(share, op=dist.ReduceOp.SUM, group=group)
        total = total + share
    return (total ** (1.0 / norm_type)).to(total_dtype)
