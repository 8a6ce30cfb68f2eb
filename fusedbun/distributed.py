r"""Sharded state for DTensor parameters (FSDP2, tensor parallel, replicate): where each SM3 accumulator
lives on the device mesh, and the collectives the step needs.

The DTensor engine (:mod:`fusedbun.engines.dtensor`) computes the rule on each rank's local shards with
these helpers; the optimizer creates the state with :func:`dtensor_sm3_accumulators`, and the ``"skip"``
and ``"raise"`` non-finite modes agree across ranks with :func:`dtensor_finite_flags`. Chapter 9 of the
book derives the placements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["dtensor_sm3_accumulators", "dtensor_finite_flags", "sharded_dims", "all_reduce_"]


def sharded_dims(dt: DTensor) -> dict[int, int]:
    """``{mesh dim: tensor dim}`` for every mesh dimension that shards ``dt``.

    ``Replicate`` mesh dimensions are left out. ``Partial`` placements (a pending sum, which a parameter
    never is) are refused.
    """
    out = {}
    for mesh_dim, placement in enumerate(dt.placements):
        if placement.is_replicate():
            continue
        if placement.is_partial() or not hasattr(placement, "dim"):
            raise ValueError(
                f"FusionOptimizer supports Shard and Replicate placements of a parameter or its state, "
                f"got {placement} on mesh dim {mesh_dim}"
            )
        out[mesh_dim] = placement.dim % max(dt.dim(), 1)
    return out


def dtensor_sm3_accumulators(param: DTensor) -> list[DTensor]:
    """Zero fp32 SM3 accumulators for a sharded parameter, as DTensors that follow its sharding.

    The ``k``-th accumulator has the global shape ``[1, .., n_k, .., 1]`` and, on each mesh dimension,
    the parameter's placement when that placement shards dim ``k``, else ``Replicate()``. Its local
    slice therefore covers exactly the indices of dim ``k`` that the local shard of the parameter holds.
    """
    mesh = param.device_mesh
    shards = sharded_dims(param)
    local = param.to_local()
    accs = []
    for k, n in enumerate(param.shape):
        shape = [1] * param.dim()
        shape[k] = n
        local_shape = [1] * param.dim()
        local_shape[k] = local.shape[k]
        placements = [param.placements[i] if shards.get(i) == k else Replicate() for i in range(mesh.ndim)]
        zeros = torch.zeros(local_shape, dtype=torch.float32, device=local.device)
        accs.append(
            DTensor.from_local(
                zeros,
                mesh,
                placements,
                run_check=False,
                shape=torch.Size(shape),
                stride=tuple(torch.empty(shape, device="meta").stride()),
            )
        )
    return accs


def dtensor_finite_flags(grads: Sequence[DTensor]) -> list[bool]:
    """One flag per sharded gradient: is the sum of its squares, over all shards, finite?

    The same answer on every rank (so every rank skips the same parameters and the collectives of the
    step stay matched): each rank takes the 2-norm of its local shards, and the squared norms are summed
    across the mesh dimensions that shard each gradient, one all-reduce per (mesh, mesh dims).
    """
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device_mesh, tuple(sorted(sharded_dims(g)))), []).append(i)
    flags = [True] * len(grads)
    for (mesh, across), idx in groups.items():
        norms: dict[int, Tensor] = {}
        half = [i for i in idx if grads[i].dtype in (torch.float16, torch.bfloat16)]
        other = [i for i in idx if grads[i].dtype not in (torch.float16, torch.bfloat16)]
        for sub, dtype in ((half, torch.float32), (other, None)):
            if sub:  # fp16/bf16 norms are taken in fp32: an fp16 norm overflows at 65504
                norms.update(zip(sub, torch._foreach_norm([grads[i].to_local() for i in sub], 2, dtype=dtype)))
        total = torch.stack([norms[i].to(torch.float32) for i in idx]).square()
        all_reduce_(total, dist.ReduceOp.SUM, mesh, across)
        for i, ok in zip(idx, total.isfinite().tolist()):
            flags[i] = ok
    return flags


def all_reduce_(t: Tensor, op: dist.ReduceOp, mesh, mesh_dims: Sequence[int]) -> None:
    """All-reduce ``t`` in place over each listed mesh dimension (a max or a sum over all of them)."""
    for i in mesh_dims:
        dist.all_reduce(t, op=op, group=mesh.get_group(i))
