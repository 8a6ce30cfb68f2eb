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

- **Factored accumulators** (``cover="factored"``, :mod:`fusedbun.factored`) are sharded the same way.
  ``prev`` needs :math:`S`, the mean of the whole :math:`a^{(0)}`: the local sums are all-reduced
  (``SUM``) over the mesh dimensions that shard dim 0, for every such parameter of the step in one
  collective before the first update. The new :math:`a^{(k)}` are means: local sums, all-reduced with
  ``SUM`` where another dim is sharded (deferred and packed like the maxima), divided by the global count.

Uneven shards (a dim 0 that the world size does not divide; FSDP2 follows ``torch.chunk``, so a rank
may even hold zero rows) need no special case in the arithmetic: a rank's empty slice contributes 0 to a
maximum (``nu >= 0``) and nothing to a sum. Every rank still joins every collective, in the same order.

The state is stored as DTensors with these placements (see :func:`fusedbun.distributed.dtensor_sm3_accumulators`), so
``torch.distributed.checkpoint`` saves it once per shard and reshards it on load.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from fusedbun.adalite import decoupled_weight_decay_, eps_mask, momentum_, nonfinite_entries, rms_normalize
from fusedbun.distributed import all_reduce_, sharded_dims
from fusedbun.engines.common import StepHyper, StepTensors, compute_dtype, signed_gradient, stack_flags, step_decay
from fusedbun.factored import factored_rest
from fusedbun.hessian import dense_second_moment_, masked_ema
from fusedbun.rounding import stochastic_round_at
from fusedbun.sm3 import sm3_min, sm3_reduce_

__all__ = ["dtensor_fusion"]


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _global_index(param: DTensor) -> Tensor:
    """The flat row-major index in the whole parameter of each element of the local shard (int64)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    device = param.to_local().device
    index = torch.zeros(local_shape, dtype=torch.int64, device=device)
    stride = 1
    for k in reversed(range(len(local_shape))):
        shape = [1] * len(local_shape)
        shape[k] = local_shape[k]
        index += (torch.arange(local_shape[k], dtype=torch.int64, device=device) + offset[k]).view(shape) * stride
        stride *= param.shape[k]
    return index


def _local_grad(param: DTensor, grad: Tensor) -> Tensor:
    """The local shard of ``grad`` laid out like ``param``'s local shard."""
    if not isinstance(grad, DTensor):
        raise TypeError("a DTensor parameter needs a DTensor gradient; got a plain tensor")
    if grad.device_mesh != param.device_mesh or tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def dtensor_fusion(tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None:
    """One step for DTensor parameters (the :class:`~fusedbun.engines.common.Engine` signature).

    Every rank must call it with the same parameters in the same order (as ``optimizer.step()`` on
    every rank does), because the accumulator maxima are reduced across ranks. The mask is elementwise,
    so a non-finite entry needs no agreement between ranks; with ``find_nonfinite`` the flags returned
    say what this rank's shards held (a plain tensor on the local device).
    """
    params, grads, momentum_buffers, exp_hessians, state_steps = tensors[:5]
    lr, eps, Lambda, momentum_beta = hyper.lr, hyper.eps, hyper.Lambda, hyper.momentum_beta
    found = []
    # Deferred accumulator reductions: (op, mesh, mesh dims) -> [(local accumulator, its new local maximum or
    # sum, the divisor that turns the reduced sum into a mean)].
    pending: dict[tuple, list[tuple[Tensor, Tensor, int]]] = {}
    scales = _factored_scales(params, exp_hessians) if hyper.factored else {}

    for i, (param, grad, buf, hess, step) in enumerate(zip(params, grads, momentum_buffers, exp_hessians, state_steps)):
        step += 1
        if param.numel() == 0:
            found.append(torch.zeros((), dtype=torch.bool, device=param.to_local().device))
            continue  # nothing to update anywhere; the same decision on every rank (global shape)
        beta = step_decay(step, beta_decay=hyper.beta_decay)
        dtype = compute_dtype(param)
        mesh = param.device_mesh
        shards = sharded_dims(param)
        p_local = param.to_local()

        # 1-3: maximize, centralize, mask, on an fp32 (or fp64) copy of the local gradient.
        g = signed_gradient(_local_grad(param, grad), dtype, hyper)
        if hyper.centralize and g.dim() > 1:
            dims = tuple(range(1, g.dim()))
            across = [i for i, d in shards.items() if d != 0]
            if not across:
                g = g - g.mean(dim=dims, keepdim=True)  # each row is whole on this rank
            else:
                row_sum = g.sum(dim=dims, keepdim=True)
                all_reduce_(row_sum, dist.ReduceOp.SUM, mesh, across)
                g = g - row_sum / math.prod(param.shape[1:])
        if find_nonfinite:
            found.append(nonfinite_entries(g).any())
        g, mask = eps_mask(g, eps=eps)

        # 4: the second moment nu from the previous (local slices of the) accumulators.
        index = None  # the flat positions of the local elements in the whole parameter, when a rounding needs them
        if hyper.dense(param):  # 0-D, 1-D, or cover="dense": v is sharded as the parameter is
            hessian_keys = hyper.hessian_rounding(hess, tensors.key(i), step)
            if hessian_keys is not None:
                index = _global_index(param)
            rounding = None if hessian_keys is None else (hessian_keys, index)
            nu = dense_second_moment_(_local(hess), g, mask, beta=beta, rounding=rounding)
        elif hyper.factored:
            accs = [_local(a) for a in hess]
            prev = (accs[0] * factored_rest(accs, scales[i])).expand(g.shape)
            nu = masked_ema(prev, g, mask, beta=beta)
            dims = tuple(range(nu.dim()))
            for k, acc in enumerate(accs):
                local_sum = nu.sum(dim=dims[:k] + dims[k + 1 :], keepdim=True)
                divisor = param.numel() // param.shape[k]
                across = tuple(sorted(i for i, d in shards.items() if d != k))
                if across:
                    pending.setdefault((dist.ReduceOp.SUM, mesh, across), []).append((acc, local_sum, divisor))
                else:
                    acc.copy_(local_sum / divisor)  # whole locally; prev of this parameter is already computed
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
                    pending.setdefault((dist.ReduceOp.MAX, mesh, across), []).append((acc, a_new, 1))
                else:
                    acc.copy_(a_new)  # exact locally; prev of this parameter is already computed

        # 5-8: normalize, momentum, decoupled weight decay, update: all elementwise on local shards.
        u = rms_normalize(g, nu, eps=eps).to(dtype) if hyper.use_rms else g
        if momentum_beta > 0:
            u = momentum_(_local(buf), u, momentum_beta=momentum_beta).to(dtype)
        p = p_local if p_local.dtype == dtype else p_local.to(dtype)
        decoupled_weight_decay_(p, lr=lr, Lambda=Lambda)
        p.add_(u, alpha=-lr)
        keys = hyper.rounding(p_local, tensors.key(i), step)
        if keys is not None:  # each element at its index in the whole (unsharded) parameter
            p_local.copy_(stochastic_round_at(p, p_local.dtype, keys, _global_index(param) if index is None else index))
        elif p is not p_local:
            p_local.copy_(p)

    # One all-reduce per (op, mesh, mesh dims) for every replicated accumulator of the step.
    for (op, mesh, across), pairs in pending.items():
        flat = torch.cat([a_new.reshape(-1) for _, a_new, _ in pairs])
        all_reduce_(flat, op, mesh, across)
        sizes = [a_new.numel() for _, a_new, _ in pairs]
        for (acc, _, divisor), values in zip(pairs, flat.split(sizes)):
            acc.copy_(values.view_as(acc) / divisor if divisor != 1 else values.view_as(acc))
    if not find_nonfinite:
        return None
    return stack_flags(found, [p.to_local() for p in params[:1]])


def _factored_scales(params: list[DTensor], exp_hessians: list) -> dict[int, Tensor]:
    """``S``, the mean of the whole dim-0 accumulator, of each factored parameter of 2+ dims (by list
    position): local sums, all-reduced with ``SUM`` over the mesh dims that shard dim 0, one collective
    per (mesh, mesh dims) for the whole step. Every rank computes the same list, in the same order."""
    scales: dict[int, Tensor] = {}
    pending: dict[tuple, list[int]] = {}
    for i, (param, hess) in enumerate(zip(params, exp_hessians)):
        if param.dim() < 2 or param.numel() == 0:
            continue
        scales[i] = _local(hess[0]).sum().reshape(1)
        across = tuple(sorted(j for j, d in sharded_dims(param).items() if d == 0))
        if across:
            pending.setdefault((param.device_mesh, across), []).append(i)
    for (mesh, across), idx in pending.items():
        flat = torch.cat([scales[i] for i in idx])
        all_reduce_(flat, dist.ReduceOp.SUM, mesh, across)
        for i, value in zip(idx, flat.unbind()):
            scales[i] = value
    return {i: s.reshape(()) / params[i].shape[0] for i, s in scales.items()}
