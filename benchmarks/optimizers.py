"""The registry of optimizers the comparison runs: FusionOptimizer, torch's own, and peers from
``pytorch_optimizer`` (used as published, never re-implemented here).

Each entry says how to build the optimizer for a model at a learning rate, where the sweep is centred
(``default_lr``: the library's default, or the documented usual value), and what the training loop must
do for it: SophiaH needs ``loss.backward(create_graph=True)`` (its Hutchinson Hessian estimate
differentiates the gradient), Schedule-Free AdamW needs ``optimizer.eval()`` before evaluating and
``optimizer.train()`` after. Every other hyperparameter keeps its library default.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

import fusedbun
from benchmarks.tasks import matrix_params

__all__ = ["OptimizerSpec", "OPTIMIZERS", "NOT_RUN", "get_optimizer", "state_bytes", "DenseSecondMomentFusion"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str
    source: str  # "fusedbun", "torch.optim", "pytorch_optimizer" or "bitsandbytes"
    default_lr: float
    build: Callable[[nn.Module, float], Optimizer]
    create_graph: bool = False  # backward with create_graph=True (Hessian-vector products)
    schedule_free: bool = False  # .eval() / .train() around evaluation
    note: str = ""


def _po(name: str):
    import pytorch_optimizer

    return getattr(pytorch_optimizer, name)


class DenseSecondMomentFusion(fusedbun.FusionOptimizer):
    """Ablation, not a product: FusionOptimizer's rule with a dense (per-element) second moment for every
    tensor instead of SM3's per-dimension accumulators.

    It runs the package's own step on flat views: each parameter ``p`` is replaced by ``p.detach().view(-1)``
    (the same storage), and before each step the view receives ``p.grad.view(-1)``. For 1-D tensors the
    rule keeps a dense second moment (rule 7 of the book's algorithm contract), so this is the same algorithm
    with only the SM3 cover removed. Centralization would see the flat view, so it is refused.
    """

    def __init__(self, params, lr: float, **kwargs):
        if kwargs.get("centralize"):
            raise ValueError("DenseSecondMomentFusion flattens tensors, so centralize=True is not supported")
        self._originals = [p for p in params]
        self._views = [p.detach().view(-1) for p in self._originals]
        super().__init__(self._views, lr, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._originals:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, v in zip(self._originals, self._views):
            v.grad = None if p.grad is None else p.grad.view(-1)
        super().step()
        return loss


def _muon(model: nn.Module, lr: float) -> Optimizer:
    # Muon's documented pairing: Muon for hidden weights of 2+ dims, its built-in AdamW for the rest
    # (embeddings, output head, biases, norm gains). Both learning rates move together; their ratio is
    # the library's defaults' ratio (lr=2e-2, adamw_lr=3e-4).
    hidden, rest = matrix_params(model)
    groups = [dict(params=hidden, use_muon=True, lr=lr)]
    if rest:
        groups.append(dict(params=rest, use_muon=False, lr=lr * (3e-4 / 2e-2)))
    return _po("Muon")(groups)


_FUSION_NOTE = "lr has no library default; "

_SPECS = [
    OptimizerSpec(
        "fusion",
        "FusionOptimizer",
        "fusedbun",
        1e-1,
        lambda m, lr: fusedbun.FusionOptimizer(m.parameters(), lr=lr),
        note=_FUSION_NOTE + "seed defaults (use_rms=False): the update is an EMA of the masked gradient, "
        "so the sweep is centred at SGD-momentum's 1e-2 in EMA units (x 1/(1-0.9))",
    ),
    OptimizerSpec(
        "fusion_rms",
        "FusionOptimizer (use_rms)",
        "fusedbun",
        1e-3,
        lambda m, lr: fusedbun.FusionOptimizer(m.parameters(), lr=lr, use_rms=True),
        note=_FUSION_NOTE + "centred at the README's lr=1e-3 for use_rms=True",
    ),
    OptimizerSpec(
        "fusion_rms_bf16",
        "FusionOptimizer (use_rms, bf16 momentum)",
        "fusedbun",
        1e-3,
        lambda m, lr: fusedbun.FusionOptimizer(m.parameters(), lr=lr, use_rms=True, momentum_dtype=torch.bfloat16),
        note="as fusion_rms, momentum stored in bfloat16",
    ),
    OptimizerSpec(
        "fusion_rms_dense_bf16",
        'FusionOptimizer (use_rms, cover="dense", bf16 second moment and momentum)',
        "fusedbun",
        1e-3,
        lambda m, lr: fusedbun.FusionOptimizer(
            m.parameters(),
            lr=lr,
            use_rms=True,
            cover="dense",
            hessian_dtype=torch.bfloat16,
            momentum_dtype=torch.bfloat16,
        ),
        note="the package's dense second moment stored in bfloat16 (rounded stochastically), bf16 momentum",
    ),
    OptimizerSpec(
        "fusion_rms_dense",
        "ablation: FusionOptimizer (use_rms), dense 2nd moment",
        "fusedbun",
        1e-3,
        lambda m, lr: DenseSecondMomentFusion(m.parameters(), lr=lr, use_rms=True),
        note="ablation: the SM3 cover replaced by a per-element second moment (Adam-sized state)",
    ),
    OptimizerSpec(
        "fusion_rms_nomomentum",
        "ablation: FusionOptimizer (use_rms), no momentum",
        "fusedbun",
        1e-3,
        lambda m, lr: fusedbun.FusionOptimizer(m.parameters(), lr=lr, use_rms=True, momentum_beta=0.0),
        note="ablation: momentum_beta=0, so the state is the n+m accumulators (and dense vectors) only",
    ),
    OptimizerSpec("adamw", "AdamW", "torch.optim", 1e-3, lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr)),
    OptimizerSpec("adam", "Adam", "torch.optim", 1e-3, lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr)),
    OptimizerSpec(
        "adafactor", "Adafactor", "torch.optim", 1e-2, lambda m, lr: torch.optim.Adafactor(m.parameters(), lr=lr)
    ),
    OptimizerSpec(
        "sgd_momentum",
        "SGD (momentum 0.9)",
        "torch.optim",
        1e-2,
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        note="torch's default lr (1e-3) is for momentum 0; centred at the usual 1e-2",
    ),
    OptimizerSpec("sm3", "SM3", "pytorch_optimizer", 1e-1, lambda m, lr: _po("SM3")(m.parameters(), lr=lr)),
    OptimizerSpec("adalite", "Adalite", "pytorch_optimizer", 1e-3, lambda m, lr: _po("Adalite")(m.parameters(), lr=lr)),
    OptimizerSpec("came", "CAME", "pytorch_optimizer", 2e-4, lambda m, lr: _po("CAME")(m.parameters(), lr=lr)),
    OptimizerSpec("lion", "Lion", "pytorch_optimizer", 1e-4, lambda m, lr: _po("Lion")(m.parameters(), lr=lr)),
    OptimizerSpec(
        "sophiah",
        "SophiaH",
        "pytorch_optimizer",
        6e-2,
        lambda m, lr: _po("SophiaH")(m.parameters(), lr=lr),
        create_graph=True,
        note="backward(create_graph=True) every step, as documented; Hessian estimate every 10 steps",
    ),
    OptimizerSpec(
        "prodigy",
        "Prodigy",
        "pytorch_optimizer",
        1.0,
        lambda m, lr: _po("Prodigy")(m.parameters(), lr=lr),
        note="lr multiplies the estimated step size d",
    ),
    OptimizerSpec(
        "ademamix", "AdEMAMix", "pytorch_optimizer", 1e-3, lambda m, lr: _po("AdEMAMix")(m.parameters(), lr=lr)
    ),
    OptimizerSpec("laprop", "LaProp", "pytorch_optimizer", 4e-4, lambda m, lr: _po("LaProp")(m.parameters(), lr=lr)),
    OptimizerSpec(
        "muon",
        "Muon (+AdamW)",
        "pytorch_optimizer",
        2e-2,
        _muon,
        note="Muon on hidden weights of 2+ dims, its AdamW on the rest at lr x 3e-4/2e-2",
    ),
    OptimizerSpec(
        "schedulefree_adamw",
        "Schedule-Free AdamW",
        "pytorch_optimizer",
        2.5e-3,
        lambda m, lr: _po("ScheduleFreeAdamW")(m.parameters(), lr=lr),
        schedule_free=True,
        note="optimizer.eval() for evaluation, optimizer.train() for training",
    ),
]

# Named in the brief but not run here, with the reason.
NOT_RUN: dict[str, str] = {}

# 8-bit AdamW (bitsandbytes' blockwise-quantized states; its defaults, among them weight_decay=1e-2 as
# torch's AdamW, and min_8bit_size=4096: smaller tensors keep 32-bit states). CUDA only.
if importlib.util.find_spec("bitsandbytes") is None:
    NOT_RUN["adamw_8bit"] = "8-bit AdamW needs a CUDA GPU and bitsandbytes; bitsandbytes is not installed"
elif not torch.cuda.is_available():
    NOT_RUN["adamw_8bit"] = "8-bit AdamW (bitsandbytes) needs a CUDA GPU; none is available"
else:
    _SPECS.append(
        OptimizerSpec(
            "adamw_8bit",
            "AdamW 8-bit (bitsandbytes)",
            "bitsandbytes",
            1e-3,
            lambda m, lr: importlib.import_module("bitsandbytes").optim.AdamW8bit(m.parameters(), lr=lr),
            note="bitsandbytes.optim.AdamW8bit, library defaults (tensors under 4096 elements keep 32-bit state)",
        )
    )

OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}
if importlib.util.find_spec("pytorch_optimizer") is None:  # pragma: no cover - it is in requirements-dev
    for _s in _SPECS:
        if _s.source == "pytorch_optimizer":
            NOT_RUN[_s.name] = "pytorch_optimizer is not installed"
            del OPTIMIZERS[_s.name]


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}") from None


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested lists and dicts included; Python numbers are
    not tensors and are not counted)."""
    return sum(_tensor_bytes(s) for s in optimizer.state.values())
