"""The multi-tensor engine: the reference rule with far fewer passes over memory.

An optimizer step is memory-bound: its time is the bytes it moves. Written as whole-tensor PyTorch ops,
each of the rule's dozen elementwise steps reads and writes full-size temporaries. This engine keeps the
arithmetic of :mod:`~fusedbun.engines.single_tensor` and changes only the order of work:

- Tensors of 2 or more dims are processed in blocks of whole rows (slices along dim 0), about
  ``BLOCK_ELEMS`` numbers each, so a block's temporaries stay in cache. Centralization reduces over
  dims 1.. and the dim-0 accumulator is a maximum over dims 1.., so both are local to a block; the other
  accumulators are running maxima across blocks, committed after the last block (their previous values
  are still needed for ``prev``). With ``cover="factored"`` the accumulators are means: the dim-0 one is
  again local to a block, and the others come from running column sums, added block after block in row
  order (an order fixed by the shape), then divided once. With ``cover="dense"`` each block reads and
  writes its own rows of ``v``. Extra memory is a few blocks, not a parameter's size. On a GPU a
  block is ``DEVICE_BLOCK_ELEMS`` numbers: there the cost is kernel launches, not cache misses, so
  blocks are as large as the peak-memory budget allows. Under ``torch.compile`` a tensor is one block:
  the compiler fuses the ops itself, and a loop over blocks would only unroll into a larger graph.
- Tensors of 0 or 1 dims with equal step counts are concatenated and processed as one flat vector, in
  chunks of at most ``BLOCK_ELEMS`` numbers when they are large, then copied back with ``_foreach_copy_``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedbun.adalite import GRAD_LIMIT, decoupled_weight_decay_, momentum_
from fusedbun.engines.common import StepHyper, StepTensors, compute_dtype, stack_flags, step_decay
from fusedbun.factored import factored_column_means_, factored_rest
from fusedbun.hessian import masked_ema, store_dense_
from fusedbun.rounding import stochastic_round_at

__all__ = ["foreach_fusion", "BLOCK_ELEMS", "DEVICE_BLOCK_ELEMS"]

BLOCK_ELEMS = 1 << 17  # 128 Ki numbers: 512 KiB in fp32, so a block and its temporaries fit in L2/L3
DEVICE_BLOCK_ELEMS = 1 << 23  # 8 Mi numbers (32 MiB in fp32): few launches, a few blocks of temporaries


def _block_elems(t: Tensor) -> int:
    """How many numbers one block of work holds for tensors on ``t``'s device."""
    if torch.compiler.is_compiling():
        return max(1, t.numel())
    return BLOCK_ELEMS if t.device.type == "cpu" else DEVICE_BLOCK_ELEMS


def _update_block(
    p: Tensor, g: Tensor, m: Tensor | None, second_moment, *, beta: float, hyper: StepHyper, rounding=None
) -> Tensor:
    """One step on a block of rows; ``second_moment(g, mask, beta) -> nu`` updates its own state.
    ``rounding``, ``(keys, first index)``, rounds the block into ``p`` stochastically: its elements are
    those of the parameter from ``first index`` on, in order.

    Returns where the block's gradient holds usable numbers (``|g| < GRAD_LIMIT``), which the caller
    reduces to the per-tensor non-finite flags when asked."""
    dtype = compute_dtype(p)
    lr, eps, momentum_beta = hyper.lr, hyper.eps, hyper.momentum_beta
    g = g.to(dtype, copy=True)
    if hyper.grad_unscale != 1.0:  # a loss scale handed over by torch.amp.GradScaler
        g.mul_(hyper.grad_unscale)
    if hyper.maximize:
        g.neg_()
    if hyper.centralize and g.dim() > 1:
        g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))
    magnitude = g.abs()
    usable = torch.lt(magnitude, GRAD_LIMIT)  # False for NaN, Inf and |g| >= 2**64 (see adalite.eps_mask)
    mask = torch.gt(magnitude, eps).logical_and_(usable)
    g.masked_fill_(mask.logical_not(), 0.0)  # a select: g * mask would keep a NaN
    nu = second_moment(g, mask, beta)
    if hyper.use_rms:
        g.div_(nu.sqrt_().add_(eps))  # nu is a temporary of this block: reuse it as the denominator
    if momentum_beta > 0:
        g = momentum_(m, g, momentum_beta=momentum_beta).to(dtype)  # the update uses the momentum as stored
    q = p if p.dtype == dtype else p.to(dtype)
    decoupled_weight_decay_(q, lr=lr, Lambda=hyper.Lambda)
    q.add_(g, alpha=-lr)
    if rounding is not None:
        keys, first = rounding
        p.copy_(stochastic_round_at(q, p.dtype, keys, _block_index(first, q)))
    elif q is not p:
        p.copy_(q)
    return usable


def _sm3_tensor_(p, g, m, accs: list[Tensor], *, beta: float, find: bool, hyper: StepHyper, keys=None) -> Tensor | None:
    """Blocked step for a tensor of 2 or more dims with SM3 accumulators ``accs``; with ``find``, returns
    whether its gradient held an entry that is not a usable number (a 0-d bool tensor)."""
    usable_blocks = []
    if p.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=p.device) if find else None
    rows = p.shape[0]
    per_block = max(1, _block_elems(p) // max(1, p[0].numel()))
    dims = tuple(range(p.dim()))
    # Running maxima for dims >= 1; the old accumulators stay intact until every block has used them.
    running = [torch.full_like(a, -torch.inf) for a in accs[1:]]

    for r0 in range(0, rows, per_block):
        rs = slice(r0, r0 + per_block)
        acc0 = accs[0][rs]

        def second_moment(gb: Tensor, mask: Tensor, beta: float, acc0: Tensor = acc0) -> Tensor:
            prev = acc0
            for a in accs[1:]:
                prev = torch.minimum(prev, a)
            nu = masked_ema(prev.expand(gb.shape), gb, mask, beta=beta)
            torch.amax(nu, dim=dims[1:], keepdim=True, out=acc0)
            for k, run in enumerate(running, start=1):
                torch.maximum(run, nu.amax(dim=dims[:k] + dims[k + 1 :], keepdim=True), out=run)
            return nu

        rounding = None if keys is None else (keys, r0 * p[0].numel())
        usable = _update_block(
            p[rs], g[rs], None if m is None else m[rs], second_moment, beta=beta, hyper=hyper, rounding=rounding
        )
        if find:
            usable_blocks.append(usable.all())

    for a, run in zip(accs[1:], running):
        a.copy_(run)
    return torch.stack(usable_blocks).all().logical_not() if find else None


def _factored_tensor_(
    p, g, m, accs: list[Tensor], *, beta: float, find: bool, hyper: StepHyper, keys=None
) -> Tensor | None:
    """Blocked step for a tensor of 2 or more dims with the factored accumulators ``accs``
    (:mod:`fusedbun.factored`); the arguments and the result are those of :func:`_sm3_tensor_`."""
    if p.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=p.device) if find else None
    rows, row_len = p.shape[0], p[0].numel()
    per_block = max(1, _block_elems(p) // max(1, row_len))
    dims = tuple(range(p.dim()))
    rest = factored_rest(accs)  # from the previous accumulators, before any block changes a0
    column_sums = torch.zeros_like(rest)  # sum of nu over the rows, shaped [1, n_1, ...]
    usable_blocks = []

    for r0 in range(0, rows, per_block):
        rs = slice(r0, r0 + per_block)
        acc0 = accs[0][rs]

        def second_moment(gb: Tensor, mask: Tensor, beta: float, acc0: Tensor = acc0) -> Tensor:
            nu = masked_ema((acc0 * rest).expand(gb.shape), gb, mask, beta=beta)
            torch.mean(nu, dim=dims[1:], keepdim=True, out=acc0)
            column_sums.add_(nu.sum(dim=0, keepdim=True))
            return nu

        rounding = None if keys is None else (keys, r0 * row_len)
        usable = _update_block(
            p[rs], g[rs], None if m is None else m[rs], second_moment, beta=beta, hyper=hyper, rounding=rounding
        )
        if find:
            usable_blocks.append(usable.all())

    factored_column_means_(accs[1:], column_sums, tuple(p.shape))
    return torch.stack(usable_blocks).all().logical_not() if find else None


def _block_index(first: int, like: Tensor) -> Tensor:
    """The flat positions, in the whole parameter, of a block's elements (``first`` on, shaped like it)."""
    return torch.arange(first, first + like.numel(), dtype=torch.int64, device=like.device).view(like.shape)


def _store_v(v: Tensor, nu: Tensor, keys, first: int) -> Tensor:
    """Store ``nu`` into the dense ``v`` (rounded stochastically with ``keys`` when ``v`` is bf16, its elements
    those of the parameter from ``first`` on) and return the statistic as stored, as a temporary the block
    may overwrite."""
    if keys is None:
        v.copy_(nu)
        return nu
    return store_dense_(v, nu, rounding=(keys, _block_index(first, v)))


def _dense_tensor_(
    p, g, m, v: Tensor, *, beta: float, find: bool, hyper: StepHyper, keys=None, hessian_keys=None
) -> Tensor | None:
    """Blocked step for a tensor of 2 or more dims with a dense second moment ``v`` (``cover="dense"``);
    ``hessian_keys`` round a bf16 ``v`` stochastically. The arguments and the result are those of
    :func:`_sm3_tensor_`."""
    if p.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=p.device) if find else None
    row_len = p[0].numel()
    per_block = max(1, _block_elems(p) // max(1, row_len))
    usable_blocks = []
    for r0 in range(0, p.shape[0], per_block):
        rs = slice(r0, r0 + per_block)
        vb = v[rs]

        def second_moment(gb: Tensor, mask: Tensor, beta: float, vb: Tensor = vb, first: int = r0 * row_len) -> Tensor:
            return _store_v(vb, masked_ema(vb.to(torch.float32), gb, mask, beta=beta), hessian_keys, first)

        rounding = None if keys is None else (keys, r0 * row_len)
        usable = _update_block(
            p[rs], g[rs], None if m is None else m[rs], second_moment, beta=beta, hyper=hyper, rounding=rounding
        )
        if find:
            usable_blocks.append(usable.all())
    return torch.stack(usable_blocks).all().logical_not() if find else None


def _dense_flat_(
    params, grads, bufs, hessians, *, beta: float, find: bool, hyper: StepHyper, keys=None, hessian_keys=None
) -> list[Tensor]:
    """Step 0-D and 1-D tensors together as one flat vector per chunk of at most a block of numbers;
    with ``find``, returns per tensor whether its gradient held an entry that is not a usable number.
    ``keys`` (one tensor only) rounds it stochastically, ``hessian_keys`` (one tensor only) its bf16 ``v``."""
    found = []
    chunks, chunk, size = [], [], 0
    limit = max(_block_elems(p) for p in params) if torch.compiler.is_compiling() else _block_elems(params[0])
    for i, p in enumerate(params):
        if chunk and size + p.numel() > limit:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(i)
        size += p.numel()
    if chunk:
        chunks.append(chunk)

    for idx in chunks:
        ps = [params[i] for i in idx]
        p = torch.cat([params[i].reshape(-1) for i in idx])
        g = torch.cat([grads[i].reshape(-1) for i in idx])
        v = torch.cat([hessians[i].reshape(-1) for i in idx])
        m = None if bufs[idx[0]] is None else torch.cat([bufs[i].reshape(-1) for i in idx])

        def second_moment(gb: Tensor, mask: Tensor, beta: float, v: Tensor = v) -> Tensor:
            return _store_v(v, masked_ema(v.to(torch.float32), gb, mask, beta=beta), hessian_keys, 0)

        usable = _update_block(
            p, g, m, second_moment, beta=beta, hyper=hyper, rounding=None if keys is None else (keys, 0)
        )
        sizes = [t.numel() for t in ps]
        if find:
            found.extend(u.all().logical_not() for u in usable.split(sizes))
        torch._foreach_copy_(ps, [x.view_as(t) for x, t in zip(p.split(sizes), ps)])
        torch._foreach_copy_([hessians[i] for i in idx], [x.view_as(t) for x, t in zip(v.split(sizes), ps)])
        if m is not None:
            torch._foreach_copy_([bufs[i] for i in idx], [x.view_as(t) for x, t in zip(m.split(sizes), ps)])
    return found


def foreach_fusion(tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None:
    """One step over lists of tensors: 2-D and larger in cache-sized row blocks, 0-D/1-D as flat vectors.

    The :class:`~fusedbun.engines.common.Engine` signature; the rule of
    :func:`~fusedbun.engines.single_tensor.single_tensor_fusion`.
    """
    params, grads, momentum_buffers, exp_hessians, state_steps = tensors[:5]
    found: list[Tensor | None] = [None] * len(params)
    if not params:
        return stack_flags([], params) if find_nonfinite else None
    torch._foreach_add_(state_steps, 1)
    betas = [step_decay(s, beta_decay=hyper.beta_decay) for s in state_steps]

    roundings = [hyper.rounding(p, tensors.key(i), s) for i, (p, s) in enumerate(zip(params, state_steps))]
    hessian_roundings = [
        hyper.hessian_rounding(h, tensors.key(i), s) for i, (h, s) in enumerate(zip(exp_hessians, state_steps))
    ]

    flat: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.dim() >= 2:
            kw = dict(beta=betas[i], find=find_nonfinite, hyper=hyper, keys=roundings[i])
            if hyper.cover == "dense":
                tensor_step, kw["hessian_keys"] = _dense_tensor_, hessian_roundings[i]
            else:
                tensor_step = _factored_tensor_ if hyper.factored else _sm3_tensor_
            found[i] = tensor_step(p, grads[i], momentum_buffers[i], exp_hessians[i], **kw)
        else:
            buf = momentum_buffers[i]
            # Tensors that share a beta are stepped as one flat vector. Under torch.compile beta is a
            # tensor, not a value to group by: each tensor is its own group (the compiler fuses them). A
            # tensor rounded stochastically (its parameter or its bf16 v) has a random stream of its own:
            # it is its own group too.
            own = roundings[i] is not None or hessian_roundings[i] is not None or not isinstance(betas[i], float)
            beta_key = ("own", i) if own else betas[i]
            key = (
                p.device,
                p.dtype,
                grads[i].dtype,
                None if buf is None else buf.dtype,
                exp_hessians[i].dtype,
                beta_key,
            )
            flat.setdefault(key, []).append(i)

    for idx in flat.values():
        flags = _dense_flat_(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [momentum_buffers[i] for i in idx],
            [exp_hessians[i] for i in idx],
            beta=betas[idx[0]],
            find=find_nonfinite,
            hyper=hyper,
            keys=roundings[idx[0]],
            hessian_keys=hessian_roundings[idx[0]],
        )
        for i, flag in zip(idx, flags):
            found[i] = flag
    return stack_flags(found, params) if find_nonfinite else None
