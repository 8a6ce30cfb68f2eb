r"""The DTensor engine: one FusionOptimizer step on sharded parameters (FSDP2, tensor parallel, replicate).

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` sharded on dim 0;
tensor parallelism shards on other dims; ``Replicate`` placements keep a full copy on every rank. This
engine computes exactly the rule of :mod:`fusedbun.engines.single_tensor` on each rank's local shard
(``to_local()``) and communicates only where the rule reduces across a sharded dimension. No parameter,
gradient or momentum is ever gathered.

Where the rule reduces, and what that costs under sharding (chapter 9 of the book derives this):

- **Elementwise steps** (maximize, mask, RMS normalization, momentum, weight decay, the update, and the
  dense second moment ``v`` of 0-D and 1-D parameters, which is sharded like the parameter) are local.
- **Centralization** takes the mean over dims ``1..``; it is local when no mesh dimension shards those
  dims (FSDP2's dim-0 sharding). Otherwise the local sums are all-reduced (``SUM``) and divided by the
  global count.
- **SM3 accumulators**: the ``k``-th accumulator (shaped ``[1, .., n_k, .., 1]``) is sharded like dim
  ``k`` of the parameter (``Shard(k)`` where the parameter has ``Shard(k)``) and replicated over every
  other mesh dimension. ``prev = min_k a_k`` needs only the local slices. The new ``a_k`` is the maximum
  of ``nu`` over every dim but ``k``: the local maximum is exact when no other dim is sharded (the dim-0
  accumulator under FSDP2); otherwise the local maxima are all-reduced with ``MAX`` over the mesh
  dimensions that shard the other dims. All such maxima of one step are packed into one flat buffer per
  (mesh, mesh dims) and reduced with a single collective, after the last parameter's update (the update
  needs only the previous accumulators), so one step costs one small all-reduce: ``sum_k>=1 n_k`` fp32
  numbers per dim-0-sharded weight, against ``n * m`` numbers for the gradient's reduce-scatter.

Uneven shards (a dim 0 that the world size does not divide; FSDP2 follows ``torch.chunk``, so a rank
may even hold zero rows) need no special case in the arithmetic: a rank's empty slice contributes 0 to a
maximum (``nu >= 0``) and nothing to a sum. Every rank still joins every collective, in the same order.

The state is stored as DTensors with these placements (see :func:`dtensor_sm3_accumulators`), so
``torch.distributed.checkpoint`` saves it once per shard and reshards it on load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from fusedbun.adalite import decoupled_weight_decay_, eps_mask, momentum_, nonfinite_entries, rms_normalize
from fusedbun.engines.single_tensor import compute_dtype, stack_flags
from fusedbun.hessian import dense_second_moment_, hessian_decay, masked_ema
from fusedbun.sm3 import sm3_min, sm3_reduce_

__all__ = ["dtensor_fusion", "dtensor_sm3_accumulators", "dtensor_finite_flags", "sharded_dims"]


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
        _all_reduce_(total, dist.ReduceOp.SUM, mesh, across)
        for i, ok in zip(idx, total.isfinite().tolist()):
            flags[i] = ok
    return flags


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce_(t: Tensor, op: dist.ReduceOp, mesh, mesh_dims: Sequence[int]) -> None:
    """All-reduce ``t`` in place over each listed mesh dimension (a max or a sum over all of them)."""
    for i in mesh_dims:
        dist.all_reduce(t, op=op, group=mesh.get_group(i))


def _local_grad(param: DTensor, grad: Tensor) -> Tensor:
    """The local shard of ``grad`` laid out like ``param``'s local shard."""
    if not isinstance(grad, DTensor):
        raise TypeError("a DTensor parameter needs a DTensor gradient; got a plain tensor")
    if grad.device_mesh != param.device_mesh or tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def dtensor_fusion(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    exp_hessians: list[Tensor | list[Tensor]],
    state_steps: list[Tensor],
    *,
    lr: float,
    eps: float,
    beta_decay: float,
    Lambda: float,
    momentum_beta: float,
    centralize: bool,
    use_rms: bool,
    maximize: bool,
    find_nonfinite: bool = False,
) -> Tensor | None:
    """One step for DTensor parameters; the engine signature of :mod:`fusedbun.engines`.

    Every rank must call it with the same parameters in the same order (as ``optimizer.step()`` on
    every rank does), because the accumulator maxima are reduced across ranks. The mask is elementwise,
    so a non-finite entry needs no agreement between ranks; with ``find_nonfinite`` the flags returned
    say what this rank's shards held (a plain tensor on the local device).
    """
    found = []
    # Deferred accumulator maxima: (mesh, mesh dims) -> [(local accumulator, its new local maximum)].
    pending: dict[tuple, list[tuple[Tensor, Tensor]]] = {}

    for param, grad, buf, hess, step in zip(params, grads, momentum_buffers, exp_hessians, state_steps):
        step += 1
        if param.numel() == 0:
            found.append(torch.zeros((), dtype=torch.bool, device=param.to_local().device))
            continue  # nothing to update anywhere; the same decision on every rank (global shape)
        beta = hessian_decay(step.item(), beta_decay=beta_decay)
        dtype = compute_dtype(param)
        mesh = param.device_mesh
        shards = sharded_dims(param)
        p_local = param.to_local()

        # 1-3: maximize, centralize, mask, on an fp32 (or fp64) copy of the local gradient.
        g = _local_grad(param, grad).to(dtype)
        if maximize:
            g = -g
        if centralize and g.dim() > 1:
            dims = tuple(range(1, g.dim()))
            across = [i for i, d in shards.items() if d != 0]
            if not across:
                g = g - g.mean(dim=dims, keepdim=True)  # each row is whole on this rank
            else:
                row_sum = g.sum(dim=dims, keepdim=True)
                _all_reduce_(row_sum, dist.ReduceOp.SUM, mesh, across)
                g = g - row_sum / math.prod(param.shape[1:])
        if find_nonfinite:
            found.append(nonfinite_entries(g).any())
        g, mask = eps_mask(g, eps=eps)

        # 4: the second moment nu from the previous (local slices of the) accumulators.
        if param.dim() <= 1:
            nu = dense_second_moment_(_local(hess), g, mask, beta=beta)
        else:
            accs = [_local(a) for a in hess]
            prev = sm3_min(accs).expand(g.shape)
            nu = masked_ema(prev, g, mask, beta=beta)
            # New local maxima; an empty local shard leaves zeros, the neutral element since nu >= 0.
            new = [torch.zeros_like(a) for a in accs]
            sm3_reduce_(new, nu)
            for k, (acc, a_new) in enumerate(zip(accs, new)):
                across = tuple(sorted(i for i, d in shards.items() if d != k))
                if across:
                    pending.setdefault((mesh, across), []).append((acc, a_new))
                else:
                    acc.copy_(a_new)  # exact locally; prev of this parameter is already computed

        # 5-8: normalize, momentum, decoupled weight decay, update: all elementwise on local shards.
        u = rms_normalize(g, nu, eps=eps).to(dtype) if use_rms else g
        if momentum_beta > 0:
            u = momentum_(_local(buf), u, momentum_beta=momentum_beta).to(dtype)
        p = p_local if p_local.dtype == dtype else p_local.to(dtype)
        decoupled_weight_decay_(p, lr=lr, Lambda=Lambda)
        p.add_(u, alpha=-lr)
        if p is not p_local:
            p_local.copy_(p)

    # One MAX all-reduce per (mesh, mesh dims) for every replicated accumulator of the step.
    for (mesh, across), pairs in pending.items():
        flat = torch.cat([a_new.reshape(-1) for _, a_new in pairs])
        _all_reduce_(flat, dist.ReduceOp.MAX, mesh, across)
        sizes = [a_new.numel() for _, a_new in pairs]
        for (acc, _), values in zip(pairs, flat.split(sizes)):
            acc.copy_(values.view_as(acc))
    if not find_nonfinite:
        return None
    return stack_flags(found, [p.to_local() for p in params[:1]])
