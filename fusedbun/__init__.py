"""fusedbun: a memory-efficient PyTorch optimizer built one component at a time.

``FusionOptimizer`` (also exported as ``Fusedbun``) fuses SM3's O(n+m) second-moment accumulator with
Adalite's gradient centralization, momentum, decoupled weight decay and RMS normalization, and masks
entries at or below ``eps`` out of each update (sparse updates); the second moment is an EMA of squared
gradients with Adafactor's decay schedule. With ``cover="factored"`` the same O(n+m) numbers hold Adafactor's
rank-one fit of the second moment instead of SM3's bound; ``cover="dense"`` keeps one number per element, as
AdamW does, and ``hessian_dtype=torch.bfloat16`` stores it in bf16 with stochastic rounding.
"""

from fusedbun.adalite import (
    centralize,
    decoupled_weight_decay_,
    eps_mask,
    momentum_,
    rms_normalize,
)
from fusedbun.backward import StepInBackward, step_in_backward
from fusedbun.factored import factored_second_moment_
from fusedbun.hessian import dense_second_moment_, hessian_decay, masked_ema
from fusedbun.optimizer import FusionOptimizer, fusion
from fusedbun.param_groups import param_groups_no_decay
from fusedbun.rounding import stochastic_round
from fusedbun.sm3 import sm3_accumulators, sm3_second_moment_

Fusedbun = FusionOptimizer

__all__ = [
    "FusionOptimizer",
    "Fusedbun",
    "fusion",
    "centralize",
    "eps_mask",
    "hessian_decay",
    "masked_ema",
    "dense_second_moment_",
    "sm3_accumulators",
    "sm3_second_moment_",
    "factored_second_moment_",
    "rms_normalize",
    "momentum_",
    "decoupled_weight_decay_",
    "param_groups_no_decay",
    "stochastic_round",
    "step_in_backward",
    "StepInBackward",
]

__version__ = "0.1.0"
