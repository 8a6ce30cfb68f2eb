"""A plain float64 re-derivation of one FusionOptimizer step, written from the algorithm contract
(book/contract.md, "One step") alone.

Nothing here imports or mirrors the package: it is the oracle the rule tests compare against (through
``rule_check.py``).
Every line below names the contract's rule it implements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64

Hessian = torch.Tensor | list[torch.Tensor]

COVERS = ("sm3", "factored", "dense")
"""The covers of a tensor of 2 or more dims: SM3's maxima, the factored means, or a dense ``v`` (rule 4's
0-D/1-D rule applied to every tensor)."""

Store = Callable[[torch.Tensor], torch.Tensor]
"""How a dense second moment is stored: the float64 ``nu`` of the kept entries in, the value as stored (as
float64) out. ``None`` stands for fp32 storage, modelled in float64 like every other fp32 number here."""


@dataclass
class RefState:
    """The state of one parameter before a step, in float64 (``None`` fields: fresh, i.e. zeros)."""

    exp_hessian: Hessian | None = None
    momentum_buffer: torch.Tensor | None = None


@dataclass
class RefStep:
    """What one step produces, in float64."""

    param: torch.Tensor
    exp_hessian: Hessian  # dense v for dim <= 1 (every dim with cover="dense"), list of a_k for dim >= 2
    momentum_buffer: torch.Tensor | None  # None when momentum_beta == 0
    mask: torch.Tensor  # rule 3
    nu: torch.Tensor  # rule 4 (full size, temporary)
    g: torch.Tensor  # gradient after rules 1-3
    direction: torch.Tensor  # u after rule 5, before momentum
    u: torch.Tensor  # the direction actually applied in rule 8 (after momentum)


def beta_t(t: int, beta_decay: float) -> float:
    """Rule 4: ``beta_t = 1 - t ** (-beta_decay)`` (t is 1-based, so beta_1 == 0)."""
    return 1.0 - float(t) ** (-float(beta_decay))


def accumulator_shape(shape: Sequence[int], k: int) -> list[int]:
    """the contract's a_k: ``[1, ..., shape[k], ..., 1]``."""
    return [n if i == k else 1 for i, n in enumerate(shape)]


def dense_second_moment(
    v: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, b: float, store: Store | None = None
) -> torch.Tensor:
    """Rule 4's dense ``v`` (0-D/1-D tensors, and every tensor with ``cover="dense"``):
    ``v = where(mask, beta_t * v + (1 - beta_t) * g**2, v)``, and ``nu = v``.

    ``store`` (``hessian_dtype=torch.bfloat16``): ``prev = v`` as stored, ``nu32`` the rule's value from it,
    and the new ``v`` is ``store(nu32)`` on the kept entries, the previous ``v`` exactly on the masked ones;
    the rest of the step uses ``nu = v`` as stored."""
    nu = torch.where(mask, b * v + (1.0 - b) * g * g, v)
    if store is not None:
        stored = store(nu).to(F64)
        assert tuple(stored.shape) == tuple(nu.shape), "store must keep the shape"
        nu = torch.where(mask, stored, v)
    return nu


def sm3_prev(accumulators: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Rule 4, dim >= 2: ``prev = min_k a_k`` (broadcast to the full shape)."""
    prev = accumulators[0].to(F64)
    for a in accumulators[1:]:
        prev = torch.minimum(prev, a.to(F64))
    return prev.expand(*shape).clone()


def sm3_cover(nu: torch.Tensor) -> list[torch.Tensor]:
    """Rule 4, dim >= 2: ``a_k = nu.amax(over every dim but k, keepdim=True)``."""
    d = nu.dim()
    return [nu.amax(dim=tuple(i for i in range(d) if i != k), keepdim=True) for k in range(d)]


def factored_prev(accumulators: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Rule 4 with ``cover="factored"``, dim >= 2: ``S = mean(a_0)``,
    ``prev = a_0 * (a_1 * ... * a_{d-1}) / S**(d-1)`` (broadcast to the full shape), 0 everywhere where S == 0."""
    acc = [a.to(F64) for a in accumulators]
    s = acc[0].mean()
    if not bool(s > 0):  # S == 0 (an empty a_0 has no mean; the caller keeps an empty parameter's state)
        return torch.zeros(tuple(shape), dtype=F64)
    rest = acc[1]
    for a in acc[2:]:
        rest = rest * a
    rest = rest / s ** (len(acc) - 1)
    return (acc[0] * rest).expand(*shape).clone()


def factored_cover(nu: torch.Tensor) -> list[torch.Tensor]:
    """Rule 4 with ``cover="factored"``, dim >= 2: ``a_k = nu.mean(over every dim but k, keepdim=True)``."""
    d = nu.dim()
    return [nu.mean(dim=tuple(i for i in range(d) if i != k), keepdim=True) for k in range(d)]


def reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: RefState | None,
    t: int,
    *,
    lr: float,
    eps: float = 1e-8,
    beta_decay: float = 0.8,
    Lambda: float = 0.01,
    momentum_beta: float = 0.9,
    centralize: bool = False,
    use_rms: bool = False,
    maximize: bool = False,
    cover: str = "sm3",
    store_v: Store | None = None,
) -> RefStep:
    """One step of the contract's "One step, for one parameter p with dense gradient g, at step t", in float64.

    ``cover`` (dim >= 2 only): ``"sm3"`` (min of the accumulators, maxima kept), ``"factored"`` (the
    product of the accumulators over ``mean(a_0)**(d-1)``, means kept; an empty parameter keeps its state)
    or ``"dense"`` (a dense ``v`` shaped like the parameter, the 0-D/1-D rule).

    ``store_v``: how a dense ``v`` is stored (see :func:`dense_second_moment`); ``None``: fp32. SM3's and the
    factored accumulators are fp32 whatever it is."""
    if cover not in COVERS:
        raise ValueError(f"unknown cover {cover!r}")
    p = param.detach().to(F64).clone()
    g = grad.detach().to(F64).clone()
    if g.is_sparse:
        g = g.to_dense()
    state = state if state is not None else RefState()

    # 1. Maximize.
    if maximize:
        g = -g
    # 2. Gradient centralization (only for g.dim() > 1).
    if centralize and g.dim() > 1:
        g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
    # 3. Sparse update mask, on every parameter.
    mask = g.abs() > eps
    g = g * mask
    # 4. Second moment.
    b = beta_t(t, beta_decay)
    if p.dim() <= 1 or cover == "dense":
        v = state.exp_hessian.to(F64).clone() if state.exp_hessian is not None else torch.zeros_like(p)
        v = dense_second_moment(v, g, mask, b, store_v)
        nu = v
        new_hessian: Hessian = v
    else:
        if state.exp_hessian is None:
            acc = [torch.zeros(accumulator_shape(p.shape, k), dtype=F64) for k in range(p.dim())]
        else:
            acc = [a.to(F64) for a in state.exp_hessian]
        if cover == "sm3":
            prev = sm3_prev(acc, p.shape)
            nu = torch.where(mask, b * prev + (1.0 - b) * g * g, prev)
            new_hessian = sm3_cover(nu)
        elif cover == "factored":
            prev = factored_prev(acc, p.shape)
            nu = torch.where(mask, b * prev + (1.0 - b) * g * g, prev)
            new_hessian = factored_cover(nu) if p.numel() > 0 else acc
        else:  # pragma: no cover (checked above)
            raise ValueError(f"unknown cover {cover!r}")
    # 5. RMS normalization.
    u = g / (nu.sqrt() + eps) if use_rms else g
    direction = u
    # 6. Momentum (EMA form); the buffer is zeros before the first step.
    m = None
    if momentum_beta > 0:
        m = state.momentum_buffer.to(F64).clone() if state.momentum_buffer is not None else torch.zeros_like(p)
        m = momentum_beta * m + (1.0 - momentum_beta) * u
        u = m
    # 7. Decoupled weight decay.
    if Lambda != 0:
        p = p * (1.0 - lr * Lambda)
    # 8. Update.
    p = p - lr * u
    return RefStep(param=p, exp_hessian=new_hessian, momentum_buffer=m, mask=mask, nu=nu, g=g, direction=direction, u=u)
