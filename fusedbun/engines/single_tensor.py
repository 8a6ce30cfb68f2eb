"""The reference engine: one tensor at a time, composed from the component functions.

This is the rule of the :class:`~fusedbun.FusionOptimizer` docstring, written as directly as PyTorch
allows; it favours clarity over speed and is what every faster engine is tested against.
"""

from __future__ import annotations

from torch import Tensor

from fusedbun.adalite import centralize as centralize_grad
from fusedbun.adalite import decoupled_weight_decay_, eps_mask, momentum_, nonfinite_entries, rms_normalize
from fusedbun.engines.common import StepHyper, StepTensors, compute_dtype, signed_gradient, stack_flags, step_decay
from fusedbun.factored import factored_second_moment_
from fusedbun.hessian import dense_second_moment_
from fusedbun.rounding import flat_index, stochastic_round_at
from fusedbun.sm3 import sm3_second_moment_

__all__ = ["single_tensor_fusion"]


def single_tensor_fusion(tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None:
    """One step of the rule for each tensor in turn, composed from the component functions (the
    :class:`~fusedbun.engines.common.Engine` signature)."""
    params, grads, momentum_buffers, exp_hessians, state_steps = tensors[:5]
    lr, eps, Lambda, momentum_beta = hyper.lr, hyper.eps, hyper.Lambda, hyper.momentum_beta
    found = []
    for i, (param, grad, buf, hess, step) in enumerate(zip(params, grads, momentum_buffers, exp_hessians, state_steps)):
        step += 1
        beta = step_decay(step, beta_decay=hyper.beta_decay)
        dtype = compute_dtype(param)

        # 1-3: maximize, centralize, mask; all on an fp32 (or fp64) copy, never on p.grad itself.
        g = signed_gradient(grad, dtype, hyper)
        if hyper.centralize:
            g = centralize_grad(g)
        if find_nonfinite:
            found.append(nonfinite_entries(g).any())
        g, mask = eps_mask(g, eps=eps)

        # 4: the second moment nu; dense for 0-D/1-D (and with cover="dense"), SM3's (or the factored)
        # accumulators for 2-D and up. A bf16 v is rounded stochastically on its own stream.
        if hyper.dense(param):
            keys = hyper.hessian_rounding(hess, tensors.key(i), step)
            rounding = None if keys is None else (keys, flat_index(param.shape, param.device))
            nu = dense_second_moment_(hess, g, mask, beta=beta, rounding=rounding)
        elif hyper.factored:
            nu = factored_second_moment_(hess, g, mask, beta=beta)
        else:
            nu = sm3_second_moment_(hess, g, mask, beta=beta)

        # 5-6: normalize, then momentum; the update uses the momentum as stored.
        u = rms_normalize(g, nu, eps=eps).to(dtype) if hyper.use_rms else g
        if momentum_beta > 0:
            u = momentum_(buf, u, momentum_beta=momentum_beta).to(dtype)

        # 7-8: decoupled weight decay, then the step; low-precision params round once, at the end (to
        # nearest, or stochastically).
        p = param if param.dtype == dtype else param.to(dtype)
        decoupled_weight_decay_(p, lr=lr, Lambda=Lambda)
        p.add_(u, alpha=-lr)
        keys = hyper.rounding(param, tensors.key(i), step)
        if keys is not None:
            param.copy_(stochastic_round_at(p, param.dtype, keys, flat_index(param.shape, param.device)))
        elif p is not param:
            param.copy_(p)
    return stack_flags(found, params) if find_nonfinite else None
