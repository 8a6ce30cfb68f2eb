r"""The Hessian-diagonal estimate: an EMA of squared gradients with Adafactor's decay schedule.

For a loss that is a sum of per-example negative log-likelihoods, the expected outer product of the
gradient is the Fisher information, which equals the expected Hessian at the optimum (and the
Gauss-Newton matrix for least squares). Its diagonal is :math:`\mathbb{E}[g \odot g]`, which an EMA of
:math:`g^2` tracks: an *indirect* Hessian-diagonal estimate that costs no second backward pass.

Chapter 4 of the book derives this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedbun.rounding import ROUNDED_DTYPES, stochastic_round_at

__all__ = ["hessian_decay", "masked_ema", "dense_second_moment_", "store_dense_", "HESSIAN_DTYPES", "COVERS"]

COVERS = ("sm3", "factored", "dense")
"""The values of ``FusionOptimizer(cover=...)``: how a tensor of 2+ dims keeps its second moment. ``"sm3"``
and ``"factored"`` keep O(sum of its dims) numbers (:mod:`fusedbun.sm3`, :mod:`fusedbun.factored`);
``"dense"`` keeps one per element, as 0-D and 1-D tensors always do (and as AdamW does)."""

HESSIAN_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes a dense second moment can be stored in (``FusionOptimizer(hessian_dtype=...)``)."""


def hessian_decay(step: float | Tensor, *, beta_decay: float) -> float | Tensor:
    r"""The EMA decay at step ``t`` (1-based): :math:`\beta_t = 1 - t^{-c}`, with :math:`c` = ``beta_decay``.

    :math:`\beta_1 = 0`, so the first estimate is :math:`g_1^2` itself and no bias correction is needed;
    :math:`\beta_t \to 1` as :math:`t` grows, so the average lengthens with training. With ``beta_decay=1``
    it is the running mean of every :math:`g_t^2` so far; smaller values forget faster.

    ``step`` is a number (returns a float) or a tensor of step counts (returns the decays as fp64 tensors
    of its shape, computed where the counts are, without reading them: the form ``torch.compile`` and
    counts kept on a device need). Every engine takes its decay from here.
    """
    if isinstance(step, Tensor):
        return 1.0 - step.to(torch.float64).pow(-beta_decay)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return 1.0 - float(step) ** (-beta_decay)


def masked_ema(prev: Tensor, grad: Tensor, mask: Tensor, *, beta: float | Tensor) -> Tensor:
    r"""The masked EMA of squared gradients, as a new fp32 tensor:

    .. math::
        \nu = \begin{cases} \beta_t\, \mathrm{prev} + (1-\beta_t)\, g^2 & \text{where mask} \\
                              \mathrm{prev} & \text{elsewhere} \end{cases}

    ``prev`` is the previous statistic (the dense ``v``, or SM3's per-element bound, possibly a broadcast
    view); every second-moment rule of the package (dense, SM3, row-sparse, sharded) goes through here.
    """
    g32 = grad.to(torch.float32)
    return torch.where(mask, torch.mul(prev, beta).addcmul_(g32, g32, value=1.0 - beta), prev)


def store_dense_(exp_hessian: Tensor, nu: Tensor, *, rounding: tuple[tuple, Tensor] | None = None) -> Tensor:
    """Store the new dense statistic ``nu`` into ``exp_hessian`` and return what the step goes on with:
    ``exp_hessian`` itself when it is fp32 (or fp64); for a bf16 one, ``nu`` rounded stochastically into
    bf16 with ``rounding = (keys, index)`` (:func:`fusedbun.rounding.stochastic_round_at`), read back as a
    new fp32 tensor, so that the update uses the statistic as stored."""
    if exp_hessian.dtype not in ROUNDED_DTYPES:
        return exp_hessian.copy_(nu)
    if rounding is None:
        raise ValueError("a second moment stored in bf16 is rounded stochastically: it needs its stream's keys")
    keys, index = rounding
    exp_hessian.copy_(stochastic_round_at(nu, exp_hessian.dtype, keys, index))
    return exp_hessian.to(torch.float32)


def dense_second_moment_(
    exp_hessian: Tensor, grad: Tensor, mask: Tensor, *, beta: float, rounding: tuple[tuple, Tensor] | None = None
) -> Tensor:
    r"""One masked EMA step of the dense second moment (0-D and 1-D parameters, every parameter with
    ``cover="dense"``), in place.

    .. math::
        v \leftarrow \begin{cases} \beta_t v + (1-\beta_t)\, g^2 & \text{where mask} \\
                                   v & \text{elsewhere (carried over, not decayed)} \end{cases}

    Args:
        exp_hessian: :math:`v`, fp32 or bf16 (:func:`store_dense_`), shaped like the parameter; updated in place.
        grad: the (masked) gradient :math:`g`, any float dtype.
        mask: where the entry is kept, ``eps < |g| < 2**64`` (:func:`fusedbun.eps_mask`), boolean.
        beta: :math:`\beta_t` from :func:`hessian_decay`.
        rounding: ``(keys, index)`` of the stochastic rounding of a bf16 ``exp_hessian``.

    Returns:
        :math:`\nu` as the step uses it: ``exp_hessian`` itself, or for a bf16 one its value in fp32.
    """
    prev = exp_hessian.to(torch.float32) if exp_hessian.dtype in ROUNDED_DTYPES else exp_hessian  # fp32, fp64 as is
    return store_dense_(exp_hessian, masked_ema(prev, grad, mask, beta=beta), rounding=rounding)
