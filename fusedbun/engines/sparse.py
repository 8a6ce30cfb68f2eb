r"""Row-sparse gradients (``torch.sparse_coo``, e.g. ``nn.Embedding(sparse=True)``) with lazy semantics.

Rows (indices along dim 0) absent from the gradient are not touched: no momentum decay, no weight
decay, no change to the parameter. Present rows are updated exactly as the dense rule would update them.
The SM3 accumulators end where the dense rule would leave them for a gradient that is zero outside the
present rows ``R``. With :math:`A = \max_{r \notin R} a^{(0)}_r`, that is:

- :math:`a^{(0)}_r` for an absent row is unchanged. (Its new value would be
  :math:`\min(a^{(0)}_r, \max_j a^{(k)}_j)`, and every accumulator's maximum is the same number, the
  largest :math:`\nu` of the last step, which bounds :math:`a^{(0)}_r`.)
- :math:`a^{(k)}`, :math:`k \ge 1`, becomes :math:`\max\big(\max_{r \in R} \nu_{r,\dots},\ \min(A, a^{(k)})\big)`:
  an absent row contributes its carried-over :math:`\mathrm{prev} = \min_k a^{(k)}`, whose maximum over
  the absent rows is :math:`\min(A, a^{(k)})`.

With ``cover="factored"`` (:mod:`fusedbun.factored`) an absent row ``r`` carries over
:math:`\mathrm{prev}_r = a^{(0)}_r\,\mathrm{rest}`, with :math:`\mathrm{rest} = \prod_{k \ge 1} a^{(k)} / S^{d-1}`
the same for every row, so its sums are closed forms:

- :math:`a^{(0)}_r \leftarrow a^{(0)}_r \operatorname{mean}(\mathrm{rest})` (the mean of its carried-over row);
- the column sums of :math:`\nu` are those of the present rows plus
  :math:`\mathrm{rest} \sum_{r \notin R} a^{(0)}_r`, and each :math:`a^{(k)}`, :math:`k \ge 1`, is their
  mean over the other dims.

Work and memory grow with the present rows (times the row size), plus O(n) work over the dim-0
accumulator (the maximum :math:`A`, or the sum over the absent rows).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedbun.adalite import centralize as centralize_grad
from fusedbun.adalite import decoupled_weight_decay_, eps_mask, momentum_, nonfinite_entries, rms_normalize
from fusedbun.engines.common import StepHyper, StepTensors, compute_dtype, signed_gradient, stack_flags, step_decay
from fusedbun.factored import factored_column_means_, factored_rest
from fusedbun.hessian import masked_ema
from fusedbun.rounding import flat_index, stochastic_round_at
from fusedbun.sm3 import sm3_min

__all__ = ["sparse_fusion"]


def _present_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    grad = grad.coalesce()
    if grad.sparse_dim() != 1:
        raise ValueError(
            "FusionOptimizer supports row-sparse gradients (sparse_dim == 1, as nn.Embedding gives); "
            f"got a sparse gradient with sparse_dim == {grad.sparse_dim()}"
        )
    return grad.indices()[0], grad.values()


def sparse_fusion(tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None:
    """One lazy step for each parameter whose gradient is sparse along dim 0 (the
    :class:`~fusedbun.engines.common.Engine` signature; the flags say whether the mask dropped a present
    entry for not being a usable number)."""
    params, grads, momentum_buffers, exp_hessians, state_steps = tensors[:5]
    found = []
    for i, (param, grad, buf, hess, step) in enumerate(zip(params, grads, momentum_buffers, exp_hessians, state_steps)):
        flag = _sparse_step_(param, grad, buf, hess, step, hyper, key=tensors.key(i), find_nonfinite=find_nonfinite)
        if find_nonfinite:
            found.append(flag)
    return stack_flags(found, params) if find_nonfinite else None


def _sparse_step_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    exp_hessian: Tensor | list[Tensor],
    step: Tensor,
    hyper: StepHyper,
    *,
    key: int | None,
    find_nonfinite: bool,
) -> Tensor | None:
    lr, eps, Lambda, momentum_beta = hyper.lr, hyper.eps, hyper.Lambda, hyper.momentum_beta
    rows, values = _present_rows(grad)
    step += 1
    beta = step_decay(step, beta_decay=hyper.beta_decay)
    dtype = compute_dtype(param)

    g = signed_gradient(values, dtype, hyper)
    if hyper.centralize and param.dim() > 1:
        g = centralize_grad(g)  # per row: local to the present rows
    found = nonfinite_entries(g).any() if find_nonfinite else None
    g, mask = eps_mask(g, eps=eps)

    row_len = math.prod(param.shape[1:])
    if hyper.dense(param):  # a dense v (0-D, 1-D, or cover="dense"): its present rows, as the parameter's
        prev = exp_hessian[rows].to(torch.float32)
        nu = masked_ema(prev, g, mask, beta=beta)
        hessian_keys = hyper.hessian_rounding(exp_hessian, key, step)
        if hessian_keys is None:
            exp_hessian[rows] = nu
        else:  # bf16: each present element rounded at its index in the whole tensor; the step uses it as stored
            exp_hessian[rows] = stochastic_round_at(nu, exp_hessian.dtype, hessian_keys, _row_index(rows, nu, row_len))
            nu = exp_hessian[rows].to(torch.float32)
    elif hyper.factored:
        nu = _factored_rows_(exp_hessian, rows, g, mask, beta=beta)
    else:
        acc = exp_hessian
        absent = acc[0].clone()
        absent[rows] = -torch.inf
        carried = absent.max()  # A: the largest dim-0 accumulator among absent rows (-inf if none)
        prev = sm3_min([acc[0][rows]] + list(acc[1:])).expand(g.shape)
        nu = masked_ema(prev, g, mask, beta=beta)
        dims = tuple(range(nu.dim()))
        acc[0][rows] = nu.amax(dim=dims[1:], keepdim=True)
        for k in range(1, len(acc)):
            present = nu.amax(dim=dims[:k] + dims[k + 1 :], keepdim=True)
            acc[k].copy_(torch.maximum(present, torch.minimum(acc[k], carried)))

    u = rms_normalize(g, nu, eps=eps).to(dtype) if hyper.use_rms else g
    if momentum_beta > 0:
        m = momentum_(momentum_buffer[rows], u, momentum_beta=momentum_beta)  # a gathered copy of the rows
        momentum_buffer[rows] = m
        u = m.to(dtype)

    p = param[rows].to(dtype)  # a gathered copy too
    decoupled_weight_decay_(p, lr=lr, Lambda=Lambda)
    p.add_(u, alpha=-lr)
    keys = hyper.rounding(param, key, step)
    if keys is None:
        param[rows] = p.to(param.dtype)
    else:  # each present element at its index in the whole parameter, as a dense step would round it
        param[rows] = stochastic_round_at(p, param.dtype, keys, _row_index(rows, p, row_len))
    return found


def _row_index(rows: Tensor, values: Tensor, row_len: int) -> Tensor:
    """The flat position in the whole tensor of each element of the gathered ``rows`` (shaped like ``values``)."""
    return rows.view(-1, *[1] * (values.dim() - 1)) * row_len + flat_index(values.shape[1:], values.device)


def _factored_rows_(acc: list[Tensor], rows: Tensor, g: Tensor, mask: Tensor, *, beta: float | Tensor) -> Tensor:
    """The factored second moment of the present ``rows`` (their ``nu``); every accumulator ends where the
    dense rule leaves it for a gradient that is zero outside those rows."""
    n0 = acc[0].shape[0]
    numel = n0 * math.prod(g.shape[1:])
    dims = tuple(range(g.dim()))
    rest = factored_rest(acc)
    nu = masked_ema((acc[0][rows] * rest).expand(g.shape), g, mask, beta=beta)
    if numel == 0:
        return nu
    present = torch.zeros(n0, dtype=torch.bool, device=acc[0].device)
    present[rows] = True
    a0 = acc[0].view(-1)
    absent_sum = torch.where(present, 0.0, a0).sum()
    column_sums = nu.sum(dim=0, keepdim=True) + rest * absent_sum
    a0.copy_(torch.where(present, 0.0, a0 * rest.mean()))  # absent rows: the mean of their carried-over prev
    a0[rows] = nu.mean(dim=dims[1:]).view(-1)
    factored_column_means_(acc[1:], column_sums, (n0, *g.shape[1:]))
    return nu
