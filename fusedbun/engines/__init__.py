"""Engines: interchangeable implementations of one FusionOptimizer step over a list of tensors.

Every engine takes the same arguments and computes the same rule (see :mod:`fusedbun.optimizer`):

- :mod:`~fusedbun.engines.single_tensor`: a plain loop over tensors built from the component functions;
  the readable reference that every other engine is tested against.
- :mod:`~fusedbun.engines.foreach`: multi-tensor (``torch._foreach_*``) and cache-blocked, grouped by
  device and dtype; the default for dense gradients.
"""
