"""The step inside backward: each parameter is stepped as soon as its gradient is ready, and the gradient
is freed, so the gradients of the whole model never exist at once.

A plain training step keeps every gradient until ``optimizer.step()``: one parameter-sized buffer per
parameter, 2 bytes per bf16 parameter and 4 per fp32 one, at the peak of every step. Stepping a parameter
from its post-accumulate-grad hook and dropping its gradient at once keeps only the gradients that backward
is still producing. The optimizer, its param groups, its state and its engines are the usual ones, so LR
schedulers, ``state_dict`` and bit-for-bit resume work as with the plain loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fusedbun.engines.common import is_dtensor

__all__ = ["step_in_backward", "StepInBackward"]


class StepInBackward:
    """The hooks that :func:`step_in_backward` registered; :meth:`remove` takes them away again. Like
    torch's hook handles it is also a context manager: ``with step_in_backward(opt): ...`` removes the hooks
    when the block ends."""

    def __init__(self, optimizer, *, accumulation_steps: int, max_norm_per_param: float | None):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_norm_per_param = max_norm_per_param
        self._accumulated: dict[Tensor, int] = {}
        self._handles = []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in dict.fromkeys(params):  # a parameter listed twice gets one hook
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        optimizer._in_backward = self

    @torch.no_grad()
    def _hook(self, param: Tensor) -> None:
        count = self._accumulated.get(param, 0) + 1
        if count < self.accumulation_steps:  # a micro-batch: let the gradient accumulate
            self._accumulated[param] = count
            return
        self._accumulated[param] = 0
        if self.max_norm_per_param is not None:
            norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32)
            factor = (self.max_norm_per_param / (norm + 1e-6)).clamp(max=1.0)
            param.grad.mul_(factor.to(param.grad.dtype))
        self.optimizer._step_parameter(param)
        param.grad = None

    def remove(self) -> None:
        """Remove the hooks: the optimizer is a plain optimizer again (``step()`` steps every parameter)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.optimizer._in_backward is self:
            self.optimizer._in_backward = None

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def step_in_backward(
    optimizer, *, accumulation_steps: int = 1, max_norm_per_param: float | None = None
) -> StepInBackward:
    """Step every parameter of ``optimizer`` inside ``loss.backward()``, as soon as its gradient is accumulated,
    and free the gradient right after.

    The training loop calls ``loss.backward()`` (and ``scheduler.step()`` as usual), never
    ``optimizer.step()`` (which raises while the hooks are in place) or ``zero_grad()``::

        opt = fusedbun.FusionOptimizer(model.parameters(), lr=3e-3, use_rms=True)
        handle = fusedbun.step_in_backward(opt)
        for x, y in batches:
            loss_fn(model(x), y).backward()  # steps and frees each gradient as backward reaches it
            scheduler.step()
        handle.remove()  # back to opt.step()

    Each parameter is stepped with its param group's hyperparameters, state and engine, exactly as
    ``optimizer.step()`` would step it: in fp32 the results are bit-identical to the plain loop. The
    optimizer's ``state_dict()`` and ``load_state_dict()`` work as usual.

    Args:
        optimizer: a :class:`fusedbun.FusionOptimizer`.
        accumulation_steps: gradients accumulate over this many ``backward()`` calls (micro-batches); each
            parameter is stepped, and its gradient freed, at the last of them. Only the gradients exist
            between micro-batches, as in the plain loop.
        max_norm_per_param: if set, each parameter's gradient is scaled to a 2-norm of at most this value
            before its step (``clip_grad_norm_`` applied to that one tensor).

    Clipping by the global norm cannot work here: the global norm needs every gradient, and each one is
    consumed before the next exists. Use ``max_norm_per_param``, or leave clipping out (with
    ``use_rms=True`` the update is normalized per element, which bounds its size anyway).
    ``torch.amp.GradScaler`` needs ``optimizer.step()``, so it cannot be used in this mode either; train
    bf16 with autocast, which needs no loss scale.

    Data parallelism is refused: under DDP the hooks fire before the gradients are all-reduced (each rank
    would step on its own gradients), and under FSDP2 (DTensor parameters) before they are
    reduce-scattered. ``RuntimeError`` is raised when ``torch.distributed`` is initialized with more than
    one rank or a parameter is a DTensor.
    """
    from fusedbun.optimizer import FusionOptimizer

    if not isinstance(optimizer, FusionOptimizer):
        raise TypeError(f"step_in_backward takes a fusedbun.FusionOptimizer, got {type(optimizer).__name__}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r}; it must be an int >= 1")
    if max_norm_per_param is not None and not max_norm_per_param > 0:
        raise ValueError(f"Invalid max_norm_per_param: {max_norm_per_param!r}; it must be None or > 0")
    if optimizer._in_backward is not None:
        raise RuntimeError("this optimizer already steps inside backward; remove() that handle first")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(is_dtensor(p) for p in params):
        raise RuntimeError(
            "step_in_backward does not support FSDP2 (DTensor parameters): the hooks would fire before the "
            "gradients are reduce-scattered; call optimizer.step() after backward instead (DDP is refused too)"
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "step_in_backward does not support data-parallel training (DDP, FSDP2, or any process group of "
            f"{dist.get_world_size()} ranks): the hooks fire before the gradients are all-reduced, so each rank "
            "would step on its own gradients; call optimizer.step() after backward instead"
        )
    return StepInBackward(optimizer, accumulation_steps=accumulation_steps, max_norm_per_param=max_norm_per_param)
