"""The fused CUDA engine: one FusionOptimizer step in a single pass over each tensor, in Triton.

An optimizer step is memory-bound: per element of a 2-D fp32 weight the rule must read ``p``, ``g`` and
the momentum ``m`` and write ``p`` and ``m``, 20 bytes (16 with a bf16 momentum), because the new SM3
accumulators are maxima of ``nu`` and ``nu`` needs only the previous accumulators and ``g``. The kernel
(:mod:`fusedbun.engines.triton_kernels`) does exactly that pass; the accumulator maxima are reduced in
the same pass with atomic max into a zeroed buffer (O(n + m) numbers), copied over the accumulators
afterwards. Gradient entries that are NaN, Inf or ``>= 2**64`` in magnitude are masked in the same pass
and flagged per tensor in a small device buffer, which the optimizer reads later without a sync.
Per step and per group of tensors that share dtypes and rank class there is one launch,
whatever the number of tensors, driven by a table of element offsets and sizes on the device.

- The host work of a step is small and never waits for the device. The tables of a set of tensors are
  built once and kept (a *plan*), keyed by the tensors' addresses, shapes and dtypes: while those stay the
  same (the usual case, also when gradients are freed and reallocated at the same addresses) a step only
  zeroes the new accumulators, launches the kernel and copies the accumulators back.
- ``beta_t`` is computed on the host from the step counts, which stay float32 CPU tensors, and passed as a
  kernel argument when all tensors of a launch share it; otherwise per tensor, through the table. The
  counts are incremented after the launch, while the device works. Step counts found on a CUDA device
  (as ``torch.compile`` leaves them) are handled there, still without a sync.
- Centralization needs the row means first: one ``torch.mean`` per centralized tensor of 2 or more dims
  (an extra read of its gradient), in fp32.
- fp32, bf16 and fp16 parameters, gradients and momentum in any combination; arithmetic in fp32; each
  store rounds to nearest even once; the update uses the momentum as stored.
- A dense second moment (0-D and 1-D tensors, every tensor with ``cover="dense"``) in fp32 or bf16
  (``hessian_dtype``): a bf16 one is rounded stochastically in the same pass, on its own random stream,
  and the update normalizes by it as stored, as in the reference.
- Tensors the kernel does not take (fp64 parameters, non-contiguous tensors or accumulators, more than
  ``MAX_NDIM`` dims, other dtypes) are stepped by the multi-tensor engine in the same call.
- With ``cover="factored"`` (:mod:`fusedbun.factored`) the same pass forms ``prev = a0 * prod_k (a_k / S)``
  (``S = mean(a0)`` from a small kernel before it) and stores, instead of atomic maxima, per-program sums
  of ``nu`` into slots that a finishing kernel adds in a fixed order: the means do not depend on the order
  in which programs finish, so a step is deterministic.

Triton is an optional dependency (``pip install fusedbun[triton]``); it is imported only when this engine
is first used, so :mod:`fusedbun` imports on machines without it.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache

import torch
from torch import Tensor

from fusedbun.engines.common import StepHyper, StepTensors
from fusedbun.engines.foreach import foreach_fusion
from fusedbun.engines.triton_plan import CONFIG, KernelConfig, step_plan  # noqa: F401 (re-exported)
from fusedbun.hessian import hessian_decay
from fusedbun.rounding import ROUNDED_DTYPES

__all__ = ["fused_fusion", "unavailable_reason", "KernelConfig", "CONFIG"]


@cache
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"Triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return ""


def unavailable_reason() -> str:
    """``""`` when Triton imports and a CUDA device is present, else why this engine cannot run."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _triton_import_error()


@torch.compiler.disable
def fused_fusion(tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None:
    """One step of the rule over lists of CUDA tensors (the :class:`~fusedbun.engines.common.Engine`
    signature). Under Triton's interpreter (``TRITON_INTERPRET=1``) it also steps CPU tensors, which is how
    the kernel is tested on machines without a GPU.

    The flags of ``find_nonfinite`` are the kernel's own (on the device): asking for them costs a few tiny
    copies, no extra read of the gradients and no sync."""
    params, grads, momentum_buffers, exp_hessians, state_steps = tensors[:5]
    if not params:
        return torch.zeros(0, dtype=torch.bool) if find_nonfinite else None
    beta_decay = hyper.beta_decay
    if hyper.momentum_beta <= 0:
        momentum_buffers = [None] * len(params)
    plan = step_plan(
        params,
        grads,
        momentum_buffers,
        exp_hessians,
        centralize=hyper.centralize,
        config=CONFIG,
        factored=hyper.factored,
    )
    for flags in plan.flags.values():
        flags.zero_()
    if plan.fallback:
        lists = StepTensors(params, grads, momentum_buffers, exp_hessians, state_steps, tensors.keys)
        found = foreach_fusion(lists.select(plan.fallback), hyper, find_nonfinite=find_nonfinite)
        if find_nonfinite:
            for i, flag in zip(plan.fallback, found.unbind()):
                plan.flags[params[i].device][i] = flag
    steps = [state_steps[i] for i in plan.kernel_positions]
    on_host = all(s.is_cpu for s in steps)
    if on_host:  # the counts after this step (read without a sync); the tensors are incremented after the launches
        counts = {i: float(state_steps[i]) + 1.0 for i in plan.kernel_positions}
    elif steps:  # counts on a device: incremented and turned into beta_t there (fp64, rounded to fp32)
        torch._foreach_add_(steps, 1)
        dev = params[plan.kernel_positions[0]].device
        b = hessian_decay(torch.stack([s.to(dev) for s in state_steps]), beta_decay=beta_decay)
        device_betas = (b.float(), (1.0 - b).float())
    for launch, idx in plan.launches:
        beta = None
        if not on_host:
            launch.set_betas(None, device_betas, idx)
        elif all(counts[i] == counts[idx[0]] for i in idx):
            beta = hessian_decay(counts[idx[0]], beta_decay=beta_decay)
        else:
            launch.set_betas([hessian_decay(counts[i], beta_decay=beta_decay) for i in idx], None, idx)
        after = counts if on_host else state_steps  # the counts after this step's increment key the random streams
        stochastic = hyper.stochastic_rounding and params[idx[0]].dtype in ROUNDED_DTYPES
        if stochastic:
            launch.set_rounding([hyper.rounding(params[i], tensors.key(i), after[i]) for i in idx])
        if launch.rounds_v:  # a bf16 v, rounded stochastically whatever stochastic_rounding says
            keys = [hyper.hessian_rounding(exp_hessians[i], tensors.key(i), after[i]) for i in idx]
            launch.set_rounding(keys, hessian=True)
        i0 = idx[0]
        device = params[i0].device
        switch = device.type == "cuda" and device.index != torch.cuda.current_device()
        with torch.cuda.device(device) if switch else nullcontext():
            launch.launch(
                params[i0],
                grads[i0],
                momentum_buffers[i0],
                exp_hessians[i0],
                [grads[i] for i in idx] if launch.centralize else (),
                [exp_hessians[i] for i in idx] if launch.ndim > 1 else (),
                beta=beta,
                hyper=hyper,
                stochastic=stochastic,
            )
    if on_host and steps:
        torch._foreach_add_(steps, 1)
    if not find_nonfinite:
        return None
    first, *others = plan.flags.values()  # a copy as bool: the buffers are zeroed at the next step
    found = first.bool()
    for flags in others:
        found |= flags.to(found.device, non_blocking=True).bool()
    return found
