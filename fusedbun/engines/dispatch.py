"""Which engine steps which tensors: the one place where a step is routed.

:func:`step_tensors` splits a param group's lists: row-sparse gradients go to the row-sparse engine,
DTensors (sharded parameters) to the DTensor engine, and the other tensors, grouped by device type, to the
engine that :func:`select_engine` picks from the group's ``foreach`` and ``fused`` options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedbun.engines.common import Engine, StepHyper, StepTensors, is_dtensor
from fusedbun.engines.foreach import foreach_fusion
from fusedbun.engines.single_tensor import single_tensor_fusion

__all__ = ["select_engine", "step_tensors"]


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
    the fused engine is used where it can run, else the multi-tensor one. ``distributed`` (DTensor
    parameters) always gets the DTensor engine.
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


def step_tensors(
    tensors: StepTensors, hyper: StepHyper, *, foreach: bool | None, fused: bool | None, find_nonfinite: bool
) -> list[tuple[list[int], Tensor]]:
    """One step of ``hyper``'s rule over ``tensors``, each tensor on the engine that fits it.

    Returns the engines' non-finite flags as they come, ``(positions, 1-D bool tensor)`` pairs, one per
    engine call (none without ``find_nonfinite``), so that callers pass them on without splitting them into
    one tensor per parameter.
    """
    found: list[tuple[list[int], Tensor]] = []
    if fused is None and foreach is None and torch.compiler.is_compiling():
        # The fused engines are kernels torch.compile cannot trace (a graph break, inside a loop, would make
        # it give up on the step); the multi-tensor engine it traces, and fuses by itself.
        foreach = True
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (p, g) in enumerate(zip(tensors.params, tensors.grads)):
        if g.is_sparse:
            key = ("sparse", "")
        else:  # is_cuda and is_cpu first: reading p.device builds a new object, for every tensor of every step
            key = (
                "dtensor" if is_dtensor(p) else "dense",
                "cuda" if p.is_cuda else "cpu" if p.is_cpu else p.device.type,
            )
        groups.setdefault(key, []).append(i)
    for (kind, device_type), idx in groups.items():
        if kind == "sparse":
            from fusedbun.engines.sparse import sparse_fusion as engine
        else:
            engine = select_engine(device_type, distributed=kind == "dtensor", foreach=foreach, fused=fused)
        chosen = tensors if len(idx) == len(tensors.params) else tensors.select(idx)
        flags = engine(chosen, hyper, find_nonfinite=find_nonfinite)
        if find_nonfinite:
            found.append((idx, flags))
    return found
