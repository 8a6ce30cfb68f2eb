"""Engines: interchangeable implementations of one FusionOptimizer step over a list of tensors.

Every engine takes the same arguments and computes the same rule (see :mod:`fusedbun.optimizer`):

- :mod:`~fusedbun.engines.single_tensor`: a plain loop over tensors built from the component functions;
  the readable reference that every other engine is tested against.
- :mod:`~fusedbun.engines.foreach`: multi-tensor (``torch._foreach_*``) and cache-blocked, grouped by
  device and dtype; used where no fused engine can run.
- :mod:`~fusedbun.engines.fused_cpu` and :mod:`~fusedbun.engines.fused_cuda`: one pass over each tensor,
  in C and in Triton; the default where they can run.

Each also takes ``find_nonfinite`` (default ``False``): with ``True`` it returns a 1-D bool tensor, one
entry per tensor (on the first tensor's device), saying whether the mask dropped an entry of its gradient
for being NaN, Inf or too large to square in fp32; otherwise ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fusedbun.engines.foreach import foreach_fusion
from fusedbun.engines.single_tensor import single_tensor_fusion

__all__ = ["select_engine", "is_dtensor", "foreach_fusion", "single_tensor_fusion"]

Engine = Callable[..., None]


_DTENSOR: type | tuple | None = None  # DTensor, or () where torch has none; looked up on first use


def is_dtensor(t: Tensor) -> bool:
    """Is ``t`` a DTensor (a parameter sharded by FSDP2 or tensor parallelism)?"""
    global _DTENSOR
    if _DTENSOR is None:  # this runs for every tensor of every step: import once, not per call
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch built without distributed support has no DTensors
            DTensor = ()
        _DTENSOR = DTensor
    return isinstance(t, _DTENSOR)


def _fused_engine(device_type: str) -> tuple[Engine | None, str]:
    """The fused engine for a device type, or ``None`` and the reason it cannot run here."""
    if device_type == "cpu":
        from fusedbun.engines import fused_cpu as module
    elif device_type == "cuda":
        from fusedbun.engines import fused_cuda as module
    else:
        return None, f"no fused engine exists for device type {device_type!r}"
    reason = module.unavailable_reason()
    return (None, reason) if reason else (module.fused_fusion, "")


def select_engine(device_type: str, *, distributed: bool = False, foreach: bool | None, fused: bool | None) -> Engine:
    """Pick the engine for a list of dense tensors on one device type.

    ``fused=True`` demands the fused engine (``RuntimeError`` with the reason if it cannot run);
    ``foreach=True`` or ``False`` demands the multi-tensor or the reference engine; with both ``None``
    the fused engine is used where it can run, else the multi-tensor one.
    """
    if fused and foreach:
        raise ValueError("fused=True and foreach=True are mutually exclusive")
    if distributed:
        from fusedbun.engines.dtensor import dtensor_fusion

        return dtensor_fusion
    if fused or (fused is None and foreach is None):
        engine, reason = _fused_engine(device_type)
        if engine is not None:
            return engine
        if fused:
            raise RuntimeError(f"fused=True, but the fused engine cannot run: {reason}")
    return single_tensor_fusion if foreach is False else foreach_fusion
