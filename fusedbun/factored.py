r"""The factored second moment (``cover="factored"``): Adafactor's rank-one fit in SM3's O(n + m) state.

SM3 keeps, per dimension ``k`` of a tensor, the *maximum* of :math:`\nu` over every other dimension, and
bounds an element by the minimum of its covers: a safe upper bound, loose wherever a row's largest entry
is far above the rest. Adafactor (Shazeer and Stern, 2018) keeps the *means* instead and multiplies them
back: for a 2-D weight with row means :math:`r` and column means :math:`c`,
:math:`\hat\nu_{ij} = r_i c_j / \bar r` is exact when :math:`\nu` is an outer product and is the
minimizer of the I-divergence among rank-one fits otherwise. For a ``d``-dim tensor the same product
runs over every dimension:

.. math::
    S = \operatorname{mean}(a^{(0)}), \qquad
    \mathrm{prev}_{i_0 \dots i_{d-1}} = a^{(0)}_{i_0}\,
        \frac{\prod_{k \ge 1} a^{(k)}_{i_k}}{S^{\,d-1}} \quad (0 \text{ while } S = 0), \qquad
    a^{(k)} = \operatorname{mean}_{\text{every dim but } k}\, \nu .

The accumulators have exactly SM3's shapes (``[1, ..., n_k, ..., 1]``) and the mask rule is the same:
masked entries keep :math:`\nu = \mathrm{prev}`. The estimate is not an upper bound, so an entry's
``prev`` may lie below its own last :math:`\nu`; in exchange it follows the bulk of a row or a column
instead of its largest entry, which is what AdamW's dense second moment does. Chapter 10 of the book
measures what that is worth in training.

Means, unlike maxima, depend on the order of addition. Every engine sums in an order fixed by the
tensor's shape alone (never by thread count or by the order in which GPU programs finish), so a run is
reproducible and data-parallel replicas stay bit-identical; engines agree with each other to fp32
rounding, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusedbun.hessian import COVERS, masked_ema

__all__ = [
    "COVERS",  # defined in fusedbun.hessian, with the other covers; re-exported here, where it first lived
    "factored_rest",
    "factored_prev",
    "factored_reduce_",
    "factored_column_means_",
    "factored_second_moment_",
]


def factored_rest(accumulators: Sequence[Tensor], scale: Tensor | None = None) -> Tensor:
    r"""The column side of ``prev``: :math:`\prod_{k \ge 1} a^{(k)} / S^{d-1}`, shaped
    ``[1, n_1, ..., n_{d-1}]``, and 0 everywhere while :math:`S = \operatorname{mean}(a^{(0)})` is 0.

    ``scale`` is :math:`S` when the caller has it (a sharded :math:`a^{(0)}`, whose mean needs every
    rank's slice). It is applied per accumulator (each :math:`a^{(k)} / S` in turn), so no intermediate
    underflows or overflows before the ratio does."""
    if scale is None:
        scale = accumulators[0].mean()
    safe = torch.where(scale > 0, scale, 1.0)
    rest = accumulators[1] / safe
    for acc in accumulators[2:]:
        rest = rest * (acc / safe)
    return torch.where(scale > 0, rest, 0.0)


def factored_prev(accumulators: Sequence[Tensor]) -> Tensor:
    r"""The per-element estimate :math:`\mathrm{prev} = a^{(0)} \cdot` :func:`factored_rest`, broadcast."""
    return accumulators[0] * factored_rest(accumulators)


def factored_reduce_(accumulators: Sequence[Tensor], nu: Tensor) -> None:
    r"""Set each accumulator to the mean of :math:`\nu` over every dimension but its own, in place."""
    if nu.numel() == 0:
        return  # an empty tensor has no values to average; its accumulators cover nothing
    dims = tuple(range(nu.dim()))
    for k, acc in enumerate(accumulators):
        acc.copy_(nu.mean(dim=dims[:k] + dims[k + 1 :], keepdim=True))


def factored_column_means_(accumulators: Sequence[Tensor], column_sums: Tensor, shape) -> None:
    r"""Set the accumulators of dims ``1..`` of a tensor of ``shape`` from the sums of :math:`\nu` over
    its dim 0 (``column_sums``, one number per position of dims ``1..``): the means that
    :func:`factored_reduce_` takes, for engines that sum in their own (fixed) order."""
    numel = math.prod(shape)
    if numel == 0:
        return
    column_sums = column_sums.reshape(shape[1:])
    d = len(shape) - 1
    for k, acc in enumerate(accumulators):  # acc is the accumulator of dim k + 1
        others = tuple(j for j in range(d) if j != k)
        total = column_sums.sum(dim=others, keepdim=True) if others else column_sums
        acc.copy_((total / (numel // shape[k + 1])).view_as(acc))


def factored_second_moment_(accumulators: Sequence[Tensor], grad: Tensor, mask: Tensor, *, beta: float) -> Tensor:
    r"""One step of the factored second moment: returns :math:`\nu` and updates the accumulators in place.

    The arguments are those of :func:`fusedbun.sm3.sm3_second_moment_`; only the cover differs."""
    prev = factored_prev(accumulators).expand(grad.shape)
    nu = masked_ema(prev, grad, mask, beta=beta)
    factored_reduce_(accumulators, nu)
    return nu
