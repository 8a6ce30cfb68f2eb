"""The reference engine: one tensor at a time, composed from the component functions.

This is the rule of the :class:`~fusedbun.FusionOptimizer` docstring, written as directly as PyTorch
allows; it favours clarity over speed and is what every faster engine is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedbun.adalite import centralize as centralize_grad
from fusedbun.adalite import decoupled_weight_decay_, eps_mask, momentum_, nonfinite_entries, rms_normalize
from fusedbun.hessian import dense_second_moment_, hessian_decay
from fusedbun.sm3 import sm3_second_moment_

__all__ = ["single_tensor_fusion", "compute_dtype", "step_decay", "stack_flags"]


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a step's arithmetic: fp64 for fp64 parameters, fp32 for every other float dtype."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def step_decay(step: Tensor, *, beta_decay: float) -> float | Tensor:
    """:math:`\beta_t` for a step count held in a 0-d tensor.

    Eagerly a Python float (the count is a CPU tensor, so reading it costs no device sync). Under
    ``torch.compile`` a 0-d fp64 tensor computed from the count: ``.item()`` would break the graph, and a
    Python float that changes every step would make the compiled step recompile every step.
    """
    if torch.compiler.is_compiling():
        return 1.0 - step.to(torch.float64).pow(-beta_decay)
    return hessian_decay(step.item(), beta_decay=beta_decay)


def single_tensor_fusion(
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
    """One step of the rule for each tensor in turn, composed from the component functions.

    The lists are parallel: ``momentum_buffers[i]`` is ``None`` when ``momentum_beta == 0``;
    ``exp_hessians[i]`` is a tensor shaped like ``params[i]`` (0-D, 1-D) or its list of SM3
    accumulators; ``state_steps[i]`` is a float32 0-d tensor, incremented here.

    With ``find_nonfinite``, returns one bool per tensor (on the first tensor's device): did the mask
    drop an entry of its gradient for not being a usable number (see :func:`~fusedbun.adalite.eps_mask`)?
    """
    found = []
    for param, grad, buf, hess, step in zip(params, grads, momentum_buffers, exp_hessians, state_steps):
        step += 1
        beta = step_decay(step, beta_decay=beta_decay)
        dtype = compute_dtype(param)

        # 1-3: maximize, centralize, mask; all on an fp32 (or fp64) copy, never on p.grad itself.
        g = grad.to(dtype)
        if maximize:
            g = -g
        if centralize:
            g = centralize_grad(g)
        if find_nonfinite:
            found.append(nonfinite_entries(g).any())
        g, mask = eps_mask(g, eps=eps)

        # 4: the second moment nu; dense for 0-D/1-D, SM3 accumulators for 2-D and up.
        if param.dim() <= 1:
            nu = dense_second_moment_(hess, g, mask, beta=beta)
        else:
            nu = sm3_second_moment_(hess, g, mask, beta=beta)

        # 5-6: normalize, then momentum; the update uses the momentum as stored.
        u = rms_normalize(g, nu, eps=eps).to(dtype) if use_rms else g
        if momentum_beta > 0:
            u = momentum_(buf, u, momentum_beta=momentum_beta).to(dtype)

        # 7-8: decoupled weight decay, then the step; low-precision params round once, at the end.
        p = param if param.dtype == dtype else param.to(dtype)
        decoupled_weight_decay_(p, lr=lr, Lambda=Lambda)
        p.add_(u, alpha=-lr)
        if p is not param:
            param.copy_(p)
    return stack_flags(found, params) if find_nonfinite else None


def stack_flags(flags: list[Tensor], params: list[Tensor]) -> Tensor:
    """Per-tensor 0-d bool flags as one 1-D tensor on the first tensor's device (empty lists included)."""
    device = params[0].device if params else torch.device("cpu")
    if not flags:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.stack([f.to(device) for f in flags])
