"""What every engine shares: the hyperparameters of a step as one object, the engine signature, and the
small helpers each engine would otherwise write again (the arithmetic dtype, the decay of a step count,
the per-tensor non-finite flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from fusedbun.hessian import hessian_decay
from fusedbun.rounding import ROUNDED_DTYPES, hessian_key, rounding_keys, rounding_keys_at

__all__ = [
    "StepHyper",
    "StepTensors",
    "Engine",
    "compute_dtype",
    "signed_gradient",
    "step_decay",
    "stack_flags",
    "is_dtensor",
]


@dataclass(frozen=True)
class StepHyper:
    """The hyperparameters of one step of one param group, as the engines receive them.

    The names are the constructor's (see :class:`fusedbun.FusionOptimizer`); ``lr`` is a float, or a
    0-d tensor under ``torch.compile``. ``grad_unscale`` multiplies every gradient before the rule (the
    reciprocal of a loss scale, as ``torch.amp.GradScaler`` hands it over; 1 otherwise). ``cover`` is how
    a tensor of 2+ dims keeps its second moment (:data:`fusedbun.hessian.COVERS`).
    """

    lr: float | Tensor
    eps: float
    beta_decay: float
    Lambda: float
    momentum_beta: float
    centralize: bool
    use_rms: bool
    maximize: bool
    stochastic_rounding: bool = False
    rounding_seed: int = 0
    grad_unscale: float = 1.0
    cover: str = "sm3"

    @property
    def factored(self) -> bool:
        """Whether tensors of 2+ dims take the factored second moment (:mod:`fusedbun.factored`)."""
        return self.cover == "factored"

    def dense(self, param: Tensor) -> bool:
        """Whether ``param`` keeps a dense (per-element) second moment: 0-D and 1-D tensors always, every
        tensor with ``cover="dense"``."""
        return param.dim() <= 1 or self.cover == "dense"

    @classmethod
    def from_group(cls, group: dict[str, Any], **override: Any) -> StepHyper:
        """The step's hyperparameters from a param group (``override`` replaces entries, e.g. ``lr``)."""
        values = {name: group[name] for name in cls.__dataclass_fields__ if name in group}
        values.update(override)
        return cls(**values)

    def rounding(self, param: Tensor, key: int | None, step: Tensor | float) -> tuple | None:
        """The keys of the random stream that rounds ``param`` stochastically at this step (its step count
        already incremented), or ``None`` where it rounds to nearest (the option off, or an fp32 or fp64
        parameter)."""
        if not self.stochastic_rounding or param.dtype not in ROUNDED_DTYPES:
            return None
        return self._keys(key, step)

    def hessian_rounding(self, exp_hessian: Tensor | list, key: int | None, step: Tensor | float) -> tuple | None:
        """The keys of the random stream that rounds a dense second moment stored in bf16 at this step
        (``hessian_dtype=torch.bfloat16``; always stochastic, whatever ``stochastic_rounding`` says), or
        ``None`` for a statistic rounded to nearest (fp32, fp64) or a list of accumulators (always fp32): the
        dtypes :func:`fusedbun.hessian.store_dense_` rounds stochastically."""
        if not isinstance(exp_hessian, Tensor) or exp_hessian.dtype not in ROUNDED_DTYPES:
            return None
        return self._keys(None if key is None else hessian_key(key), step)

    def _keys(self, key: int | None, step: Tensor | float) -> tuple:
        if key is None:
            raise ValueError("stochastic rounding needs each parameter's key (its position in the optimizer)")
        if not isinstance(step, Tensor):
            return rounding_keys(self.rounding_seed, key, int(step))
        if torch.compiler.is_compiling() or not step.is_cpu:
            return rounding_keys_at(self.rounding_seed, key, step)
        return rounding_keys(self.rounding_seed, key, int(step.item()))


class StepTensors(NamedTuple):
    """The tensors of one step, as parallel lists (position ``i`` of each list belongs to ``params[i]``).

    ``momentum_buffers[i]`` is ``None`` when ``momentum_beta == 0``; ``exp_hessians[i]`` is a tensor shaped
    like ``params[i]`` (0-D, 1-D, or any shape with ``cover="dense"``; fp32 or bf16) or its list of SM3 (or
    factored) accumulators; ``state_steps[i]`` is a float32 0-d
    tensor, which the engine increments. ``keys[i]`` is the parameter's position in the optimizer (the
    numbering of ``state_dict()``), which keys its stochastic rounding and that of a bf16 second moment;
    ``None`` where nothing needs it.
    """

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Tensor | None]
    exp_hessians: list[Tensor | list[Tensor]]
    state_steps: list[Tensor]
    keys: list[int] | None = None

    def select(self, positions: list[int]) -> StepTensors:
        """The tensors at ``positions``, in that order."""
        return StepTensors(*([seq[i] for i in positions] if seq is not None else None for seq in self))

    def key(self, i: int) -> int | None:
        """The position in the optimizer of the ``i``-th parameter (what keys its stochastic rounding)."""
        return None if self.keys is None else self.keys[i]


class Engine(Protocol):
    """One FusionOptimizer step over the tensors of one param group.

    With ``find_nonfinite``, returns a 1-D bool tensor, one entry per tensor, on the first tensor's device
    (on the CPU for an empty list): did the mask drop an entry of its gradient for being NaN, Inf or too
    large to square in fp32? Otherwise ``None``.
    """

    def __call__(self, tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None: ...


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a step's arithmetic: fp64 for fp64 parameters, fp32 for every other float dtype."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def signed_gradient(grad: Tensor, dtype: torch.dtype, hyper: StepHyper) -> Tensor:
    """Step 1 of the rule on a copy of ``grad`` in the arithmetic dtype: the loss scale divided out (when
    GradScaler handed one over) and the sign flipped for ``maximize``. Centralization and the mask follow."""
    g = grad.to(dtype)
    if hyper.grad_unscale != 1.0:
        g = g * hyper.grad_unscale
    return -g if hyper.maximize else g


def step_decay(step: Tensor, *, beta_decay: float) -> float | Tensor:
    r""":math:`\beta_t` (:func:`fusedbun.hessian_decay`) for a step count held in a 0-d tensor.

    Eagerly a Python float (the count is a CPU tensor, so reading it costs no device sync). Under
    ``torch.compile`` a 0-d fp64 tensor computed from the count: ``.item()`` would break the graph, and a
    Python float that changes every step would make the compiled step recompile every step.
    """
    if torch.compiler.is_compiling():
        return hessian_decay(step, beta_decay=beta_decay)
    return hessian_decay(step.item(), beta_decay=beta_decay)


def stack_flags(flags: list[Tensor], params: list[Tensor]) -> Tensor:
    """Per-tensor 0-d bool flags as one 1-D tensor on the first tensor's device (empty lists included)."""
    device = params[0].device if params else torch.device("cpu")
    if not flags:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.stack([f.to(device) for f in flags])


_DTENSOR: type | tuple | None = None  # DTensor, or () where torch has none; looked up once (load_dtensor_type)


def load_dtensor_type() -> None:
    """Look up torch's DTensor class once (about half a second of import). The optimizer calls this when it
    is built, so that the lookup never happens inside a step that ``torch.compile`` traces: a module global
    set during the first compiled step would fail its guard at the next one and recompile the step."""
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch built without distributed support has no DTensors
            DTensor = ()
        _DTENSOR = DTensor


def is_dtensor(t: Tensor) -> bool:
    """Is ``t`` a DTensor (a parameter sharded by FSDP2 or tensor parallelism)?"""
    if _DTENSOR is None:  # this runs for every tensor of every step: import once, not per call
        load_dtensor_type()
    return isinstance(t, _DTENSOR)
