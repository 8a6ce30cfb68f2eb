r"""SM3's second moment with cover sets per dimension: O(n + m) numbers for an (n, m) weight.

SM3 (Anil et al., 2019) keeps one accumulator per *cover set*; for a tensor the natural covers are its
slices along each dimension. An element's second moment is bounded above by every cover that holds it,
so the tightest bound is the minimum over its covers; after the update each cover keeps the maximum of
the new per-element values it holds, which keeps the bound valid:

.. math::
    \mathrm{prev}_{i_1 \dots i_d} = \min_k\, a^{(k)}_{i_k}, \qquad
    \nu = \begin{cases} \beta_t\, \mathrm{prev} + (1-\beta_t)\, g^2 & \text{where mask} \\
                        \mathrm{prev} & \text{elsewhere} \end{cases}, \qquad
    a^{(k)}_{j} = \max_{i:\, i_k = j} \nu_i .

The full-size :math:`\nu` is a temporary of the step; only the accumulators :math:`a^{(k)}` (shaped
``[1, ..., n_k, ..., 1]``) are kept. Chapter 2 of the book derives this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedbun.hessian import masked_ema

__all__ = ["sm3_accumulators", "sm3_min", "sm3_second_moment_", "sm3_reduce_"]


def sm3_accumulators(param: Tensor) -> list[Tensor]:
    """Zero fp32 accumulators, one per dimension of ``param``, the k-th shaped ``[1, ..., n_k, ..., 1]``."""
    shapes = [[1] * param.dim() for _ in range(param.dim())]
    for k, n in enumerate(param.shape):
        shapes[k][k] = n
    return [torch.zeros(s, dtype=torch.float32, device=param.device) for s in shapes]


def sm3_min(accumulators: Sequence[Tensor]) -> Tensor:
    r"""The per-element bound :math:`\mathrm{prev} = \min_k a^{(k)}`, broadcast to the full shape."""
    prev = accumulators[0]
    for acc in accumulators[1:]:
        prev = torch.minimum(prev, acc)
    return prev


def sm3_reduce_(accumulators: Sequence[Tensor], nu: Tensor) -> None:
    r"""Set each accumulator to the maximum of :math:`\nu` over every dimension but its own, in place."""
    if nu.numel() == 0:
        return  # an empty tensor has no values to reduce; its accumulators cover nothing
    dims = tuple(range(nu.dim()))
    for k, acc in enumerate(accumulators):
        acc.copy_(nu.amax(dim=dims[:k] + dims[k + 1 :], keepdim=True))


def sm3_second_moment_(accumulators: Sequence[Tensor], grad: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    r"""One SM3 step of the second moment: returns :math:`\nu` and updates the accumulators in place.

    Args:
        accumulators: :math:`a^{(k)}`, one fp32 tensor per dimension (see :func:`sm3_accumulators`).
        grad: the (masked) gradient :math:`g`, shaped like the parameter.
        mask: where the entry is kept, ``eps < |g| < 2**64`` (:func:`fusedbun.eps_mask`); masked-out entries
            keep :math:`\nu = \mathrm{prev}`.
        beta: :math:`\beta_t` from :func:`fusedbun.hessian_decay`.

    Returns:
        :math:`\nu`, fp32, shaped like ``grad``; a temporary, never stored.
    """
    prev = sm3_min(accumulators).expand(grad.shape)
    nu = masked_ema(prev, grad, mask, beta=beta)
    sm3_reduce_(accumulators, nu)
    return nu
