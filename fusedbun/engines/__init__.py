"""Engines: interchangeable implementations of one FusionOptimizer step over lists of tensors.

Every engine has the signature of :class:`~fusedbun.engines.common.Engine`: the step's tensors
(:class:`~fusedbun.engines.common.StepTensors`) and its hyperparameters
(:class:`~fusedbun.engines.common.StepHyper`) and computes the same rule (see
:class:`fusedbun.FusionOptimizer`):

- :mod:`~fusedbun.engines.single_tensor`: a plain loop over tensors built from the component functions;
  the readable reference that every other engine is tested against.
- :mod:`~fusedbun.engines.foreach`: multi-tensor (``torch._foreach_*``) and cache-blocked, grouped by
  device and dtype; used where no fused engine can run.
- :mod:`~fusedbun.engines.fused_cpu` and :mod:`~fusedbun.engines.fused_cuda`: one pass over each tensor,
  in C and in Triton; the default where they can run. Their build and launch plumbing lives in
  :mod:`~fusedbun.engines._cbuild` and :mod:`~fusedbun.engines.triton_plan`.
- :mod:`~fusedbun.engines.sparse`: row-sparse gradients, with lazy semantics.
- :mod:`~fusedbun.engines.dtensor`: sharded parameters (FSDP2, tensor parallel), on their local shards.

:mod:`~fusedbun.engines.dispatch` routes each tensor to its engine. Everything here depends only on the
component modules (:mod:`fusedbun.adalite`, :mod:`fusedbun.sm3`, :mod:`fusedbun.hessian`) and
:mod:`fusedbun.distributed`; nothing here imports the optimizer.
"""

from __future__ import annotations

from fusedbun.engines.common import Engine, StepHyper, StepTensors, is_dtensor
from fusedbun.engines.dispatch import select_engine, step_tensors
from fusedbun.engines.foreach import foreach_fusion
from fusedbun.engines.single_tensor import single_tensor_fusion

__all__ = [
    "Engine",
    "StepHyper",
    "StepTensors",
    "select_engine",
    "step_tensors",
    "is_dtensor",
    "foreach_fusion",
    "single_tensor_fusion",
]
