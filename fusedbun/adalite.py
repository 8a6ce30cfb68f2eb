r"""The per-element features: Adalite's gradient centralization, RMS normalization, momentum and decoupled
weight decay, and the epsilon mask of sparse updates that FusionOptimizer adds to them. Each is a small
pure function (or an in-place update of the one tensor it names); the optimizer composes them. Chapter 3
of the book derives this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "centralize",
    "eps_mask",
    "nonfinite_entries",
    "GRAD_LIMIT",
    "rms_normalize",
    "momentum_",
    "decoupled_weight_decay_",
]

GRAD_LIMIT = 2.0**64
"""The smallest gradient magnitude the mask refuses as too large: ``2**64`` squared is ``2**128``, just
past fp32's largest number, so every entry the mask keeps has a finite fp32 square."""


def centralize(grad: Tensor) -> Tensor:
    r"""Gradient centralization (Yong et al., 2020) for tensors of 2 or more dimensions.

    .. math:: g \leftarrow g - \operatorname{mean}_{\text{dims } 1..d-1}(g)

    Each output slice (row of a linear weight, filter of a convolution) loses its mean, which projects
    the update onto the hyperplane of zero-mean weight changes. 0-D and 1-D tensors are returned as they
    are. Returns a new tensor; ``grad`` is not modified.
    """
    if grad.dim() <= 1:
        return grad
    return grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


def eps_mask(grad: Tensor, *, eps: float) -> tuple[Tensor, Tensor]:
    r"""The sparse-update mask: entries whose magnitude does not exceed ``eps`` are zeroed, and so are
    entries that are not usable numbers (NaN, :math:`\pm\infty`, or :math:`|g| \ge 2^{64}`, whose square
    would overflow the fp32 second moment).

    .. math:: \mathrm{mask} = \epsilon < |g| < 2^{64}, \qquad g \leftarrow \mathrm{mask}\ ?\ g : 0

    Masked entries take no step and, in the second moment, keep their statistic unchanged. (``NaN``
    fails both comparisons, so it is masked too; a select rather than ``g * mask`` keeps it out.)

    Returns:
        ``(masked_grad, mask)``; ``grad`` is not modified.
    """
    magnitude = grad.abs()
    mask = (magnitude > eps) & (magnitude < GRAD_LIMIT)
    return torch.where(mask, grad, 0.0), mask


def nonfinite_entries(grad: Tensor) -> Tensor:
    r"""Where :func:`eps_mask` masks an entry for not being a usable number: NaN, :math:`\pm\infty` or
    :math:`|g| \ge 2^{64}` (``GRAD_LIMIT``). A boolean tensor shaped like ``grad``."""
    return ~(grad.abs() < GRAD_LIMIT)


def rms_normalize(grad: Tensor, nu: Tensor, *, eps: float) -> Tensor:
    r"""RMS normalization by the second moment: :math:`u = g / (\sqrt{\nu} + \epsilon)`.

    Computed in the wider of the two dtypes (``nu`` is fp32, so a bf16 or fp16 gradient is divided in fp32).
    """
    return grad / (nu.sqrt() + eps)


def momentum_(momentum_buffer: Tensor, update: Tensor, *, momentum_beta: float) -> Tensor:
    r"""EMA momentum, in place: :math:`m \leftarrow \beta_m m + (1-\beta_m)\, u`. Returns :math:`m`.

    The buffer may be kept in a lower precision than ``update`` (e.g. bf16); the EMA is computed in
    fp32 and rounded once when stored.
    """
    if momentum_buffer.dtype == update.dtype:
        return momentum_buffer.lerp_(update, 1.0 - momentum_beta)
    return momentum_buffer.copy_(momentum_buffer.to(update.dtype).lerp_(update, 1.0 - momentum_beta))


def decoupled_weight_decay_(param: Tensor, *, lr: float, Lambda: float) -> Tensor:
    r"""Decoupled weight decay (Loshchilov and Hutter, 2019), in place: :math:`p \leftarrow p\,(1 - \eta\lambda)`.

    It shrinks the weights directly instead of adding :math:`\lambda p` to the gradient, so the
    decay does not pass through the adaptive normalization.
    """
    if Lambda != 0:
        param.mul_(1.0 - lr * Lambda)
    return param
