r"""What a step does with gradients that hold NaN, Inf or numbers too large to square in fp32.

The algorithm contract (the book's page "The algorithm contract") asks only that the state is never
silently corrupted; this module makes the choice. Three modes, set per
param group with ``nonfinite=``:

- ``"mask"`` (default): such an entry is masked like an entry at or below ``eps`` (see
  :func:`fusedbun.adalite.eps_mask`): no step from it, and its second-moment statistic carried over. The
  mask is part of the step's single pass, so this mode reads nothing extra and never waits for the device.
  The engines report which gradients held such entries, and :class:`NonfiniteReports` turns that into a
  ``RuntimeWarning``: at once for CPU tensors, and for device tensors at a later ``step()``, once the
  device has finished with the step that found them (the flags are copied to pinned host memory without
  a sync, and an event says when they have arrived).
- ``"skip"``: a parameter whose gradient holds any such number is left as it is for the step (parameter,
  state and step count) and a ``RuntimeWarning`` says so. Deciding that before the update needs one
  extra read of every gradient (:func:`finite_gradients`) and one host sync per step.
- ``"raise"``: the same check, and ``FloatingPointError`` before anything changes.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import torch
from torch import Tensor

from fusedbun.engines.common import is_dtensor

__all__ = ["MODES", "finite_gradients", "NonfiniteReports"]

MODES = ("mask", "skip", "raise")
_SQRT_FP32_MAX = math.sqrt(torch.finfo(torch.float32).max)


def finite_gradients(grads: list[Tensor]) -> list[bool]:
    r"""One flag per gradient, for ``"skip"`` and ``"raise"``: is the sum of its squares finite?

    False for a NaN or Inf anywhere, and also for a gradient so large that its squares overflow fp32
    (about :math:`\|g\|_2 > 1.8 \cdot 10^{19}`): such a gradient would turn the second moment into Inf for good,
    so it is treated the same way. One foreach 2-norm per device (a single read of the gradients, much
    cheaper than an inf-norm on CPU) and one device-to-host sync per step.
    """
    flags: list[bool] = [True] * len(grads)
    by_device: dict = {}
    for i, g in enumerate(grads):
        if g.is_sparse:
            flags[i] = bool(torch.isfinite(g.coalesce().values().float().square().sum()))
        elif is_dtensor(g):
            by_device.setdefault("dtensor", []).append(i)
        else:  # fp16/bf16 norms are taken in fp32: an fp16 norm overflows at 65504, far below fp32's limit
            by_device.setdefault((g.device, g.dtype in (torch.float16, torch.bfloat16)), []).append(i)
    if "dtensor" in by_device:  # sharded: every rank must reach the same verdict (see dtensor_finite_flags)
        from fusedbun.distributed import dtensor_finite_flags

        idx = by_device.pop("dtensor")
        for i, ok in zip(idx, dtensor_finite_flags([grads[i] for i in idx])):
            flags[i] = ok
    for (_, half), idx in by_device.items():
        norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=torch.float32 if half else None)
        # below sqrt(fp32 max), the squares fit the fp32 second moment (a norm taken in fp64 included)
        for i, ok in zip(idx, torch.stack(norms).lt(_SQRT_FP32_MAX).tolist()):
            flags[i] = ok
    return flags


class NonfiniteReports:
    """Turns the engines' per-parameter flags of ``"mask"`` mode into warnings, without a device sync.

    :meth:`add` takes one step's flags for one param group; flags on the CPU are read at once, flags on
    a CUDA device are copied to pinned host memory behind the step's work and read by a later
    :meth:`poll` once an event says the copy is done. The step that found them is named by its number.
    """

    def __init__(self) -> None:
        self._pending: deque = deque()

    def add(self, step_number: int, group_index: int, flags: list[tuple[list[int], Tensor]]) -> None:
        """One step's flags for one param group: ``(positions, 1-D bool tensor)`` pairs as the engines return
        them (positions among the group's parameters that have gradients)."""
        for positions, found in flags:
            if found.device.type == "cuda":
                host = torch.empty(found.shape, dtype=torch.bool, pin_memory=True)
                host.copy_(found, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(found.device))
                self._pending.append((step_number, group_index, positions, host, event))
            else:  # the CPU (read at once), or another device type (read with a sync)
                self._pending.append((step_number, group_index, positions, found.cpu(), None))

    def poll(self, *, stacklevel: int = 3) -> None:
        """Warn about every report whose flags have reached the host, oldest first."""
        while self._pending and (self._pending[0][4] is None or self._pending[0][4].query()):
            step_number, group_index, idx, host, _ = self._pending.popleft()
            positions = [i for i, bad in zip(idx, host.tolist()) if bad]
            if positions:
                warnings.warn(
                    f"FusionOptimizer: in step() call {step_number}, the gradients of {len(positions)} "
                    f"parameter(s) of param group {group_index} (positions {positions} among those with gradients) "
                    "held non-finite entries (NaN, Inf or |g| >= 2**64); those entries were masked: no update "
                    "from them, their second moment carried over",
                    RuntimeWarning,
                    stacklevel=stacklevel,
                )
