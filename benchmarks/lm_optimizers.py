r"""The optimizers of the language-model benchmark, each built the way its library documents, and the
ablation prototypes that take FusionOptimizer apart.

Every entry builds an optimizer for a model at a peak learning rate ``lr`` with the field's recipe:
decoupled weight decay ``wd`` (0.1 by default) on tensors of 2 or more dims (the embeddings included),
none on biases and norm gains, and, for the Adam family, betas (0.9, 0.95). Peers come from their own
libraries and are imported when built, so a library that is not installed disables its entries only
(:func:`unavailable_reason` says why). ``lr_centre`` is the middle of the learning-rate grid: the usual
value for a model of this size, from the library's documentation or the literature (``note`` says which).
An entry may also fix how the run trains (``recipe``): the parameters' dtype (``param_dtype="bf16"``: the
model is cast to bfloat16 before the optimizer is built) and the step inside backward
(``step_in_backward=True``, FusionOptimizer only: :func:`fusedbun.step_in_backward`).

The ablations are prototypes kept here, not in the package: ``fusion_dense`` (a per-element second moment
instead of SM3's cover) and :class:`FusionVariant`, FusionOptimizer's ``use_rms=True`` rule written out in
plain torch with the momentum changed: bias correction, a Nesterov look-ahead, momentum taken before the
normalization (Adam's order) instead of after it, a constant :math:`\beta_2` instead of the
:math:`1 - t^{-c}` schedule, another O(n+m) cover of the second moment than SM3's (:data:`COVERS`), or
the momentum in 8 bits with block-wise scales (:class:`BlockInt8`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import fusedbun
from fusedbun.adalite import GRAD_LIMIT
from fusedbun.factored import factored_reduce_
from fusedbun.sm3 import sm3_accumulators, sm3_min, sm3_reduce_

__all__ = [
    "LMOptimizer",
    "LM_OPTIMIZERS",
    "get_lm_optimizer",
    "unavailable_reason",
    "decay_groups",
    "OptimizerChain",
    "FusionVariant",
    "COVERS",
    "BlockInt8",
    "optimizer_state_bytes",
    "steps_in_backward",
    "STEP_IN_BACKWARD_CLIP",
    "set_lr",
    "group_lrs",
]

ADAM_BETAS = (0.9, 0.95)

STEP_IN_BACKWARD_CLIP = 0.1
"""The per-tensor gradient-norm limit that stands in for the global clip 1.0 when each parameter is stepped
inside backward (the global norm needs every gradient at once). 0.1 = 1.0 / sqrt(100): the global limit shared
evenly over the GPU model's 100 parameter tensors, so that when every tensor is at its limit the global norm
is 1.0; a tensor can still be clipped while the global norm is below 1.0, and none is clipped in the plain
loop's sense (a common factor for all)."""


@dataclass(frozen=True)
class LMOptimizer:
    name: str
    label: str
    library: str  # the distribution that provides it ("torch", "fusedbun", "pytorch_optimizer", ...)
    lr_centre: float
    build: Callable[..., Any]  # build(model, lr, wd, **options) -> optimizer
    requires: tuple[str, ...] = ()  # importable modules it needs
    requires_cuda: bool = False
    ablation: bool = False
    note: str = ""
    options: dict = field(default_factory=dict)  # constructor keywords beyond the recipe, for the record
    # run options the entry implies (benchmarks.lm.RUN_OPTIONS: param_dtype, step_in_backward, clip_per_param)
    recipe: dict = field(default_factory=dict)


def decay_groups(model: nn.Module, wd: float, key: str = "weight_decay") -> list[dict]:
    """Two param groups: tensors of 2+ dims decay with ``wd`` (under the optimizer's name for it, ``key``),
    0-D and 1-D tensors (biases, norm gains) do not. Shared (tied) tensors appear once."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, key: wd}, {"params": no_decay, key: 0.0}]
    return [g for g in groups if g["params"]]


def hidden_matrices(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Muon's split: the 2-D weights inside the blocks, and everything else (token and position embeddings,
    the output head, biases, norm gains)."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in model.head.parameters()}
    hidden = [p for p in model.parameters() if p.dim() == 2 and id(p) not in skip]
    rest = [p for p in model.parameters() if not (p.dim() == 2 and id(p) not in skip)]
    return hidden, rest


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).is_cuda


class OptimizerChain:
    """Several optimizers over disjoint parameters, stepped as one (Muon with AdamW for the rest; a dense
    ablation built per param group). ``param_groups`` and ``state`` are those of all of them."""

    def __init__(self, *optimizers: Any) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def group_lrs(optimizer: Any) -> list[float]:
    """The learning rate of each param group, as Python floats (a tensor lr is read once, here)."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def set_lr(optimizer: Any, base_lrs: list[float], factor: float) -> None:
    """Set each group's lr to ``base * factor``; a tensor lr (torchao keeps one) is filled in place."""
    for g, base in zip(optimizer.param_groups, base_lrs):
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(base * factor)
        else:
            g["lr"] = base * factor


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        flatten = getattr(type(value), "__tensor_flatten__", None)
        if flatten is not None and type(value) is not torch.Tensor and type(value) is not nn.Parameter:
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from _tensors(getattr(value, name))
        else:
            yield value
    elif isinstance(value, BlockInt8):
        yield value.codes
        yield value.scales
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors in ``optimizer.state``: quantized states (torchao's tensor subclasses) counted by
    the tensors they hold, and a tensor shared by several parameters (bitsandbytes' quantization maps)
    counted once."""
    seen, total = set(), 0
    for s in optimizer.state.values():
        for t in _tensors(s):
            key = (t.device, t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- ablation prototypes


@dataclass(frozen=True)
class Cover:
    """How a tensor of 2+ dims keeps its second moment in O(sum of its dims): ``bound(accumulators)`` is the
    per-element estimate (broadcastable to the tensor) the step starts from, ``reduce_(accumulators, nu)``
    folds the new per-element values back into the accumulators."""

    bound: Callable[[list[Tensor]], Tensor]
    reduce_: Callable[[list[Tensor], Tensor], None]
    note: str
    copies: int = 1  # sets of per-dimension accumulators it keeps (SM3's layout each)


def _product(accumulators: list[Tensor], scale: Tensor) -> Tensor:
    # prod_k a_k / scale^(K-1), 0 where scale is 0 (before the first step)
    prod = accumulators[0]
    for acc in accumulators[1:]:
        prod = prod * acc
    k = len(accumulators) - 1
    return torch.where(scale > 0, prod / scale.clamp_min(torch.finfo(torch.float32).tiny) ** k, 0.0)


def _maxprod_bound(accumulators: list[Tensor]) -> Tensor:
    return _product(accumulators, accumulators[0].amax())


def _mean_bound(accumulators: list[Tensor]) -> Tensor:
    return _product(accumulators, accumulators[0].mean())


def _split(accumulators: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    half = len(accumulators) // 2
    return accumulators[:half], accumulators[half:]


def _capped_bound(accumulators: list[Tensor]) -> Tensor:
    means, maxima = _split(accumulators)
    return torch.minimum(_mean_bound(means), sm3_min(maxima))


def _capped_reduce_(accumulators: list[Tensor], nu: Tensor) -> None:
    means, maxima = _split(accumulators)
    factored_reduce_(means, nu)
    sm3_reduce_(maxima, nu)


COVERS: dict[str, Cover] = {
    "sm3": Cover(sm3_min, sm3_reduce_, "SM3: the minimum of the per-dimension maxima, an upper bound"),
    "maxprod": Cover(
        _maxprod_bound,
        sm3_reduce_,
        "the per-dimension maxima multiplied and divided by the tensor's maximum^(K-1): exact for a rank-1 "
        "second moment, never above SM3's bound",
    ),
    "factored": Cover(
        _mean_bound,
        factored_reduce_,
        "Adafactor's factorization: the per-dimension means multiplied and divided by the tensor's mean^(K-1)",
    ),
    "factored_capped": Cover(
        _capped_bound,
        _capped_reduce_,
        "the factored estimate, never above SM3's bound: both kept (per-dimension means and maxima, twice the "
        "n + m numbers), the smaller taken",
        copies=2,
    ),
}
"""The second-moment covers an ablation can take (``FusionVariant(cover=...)``)."""


MOMENTUM_BLOCK = 256
"""Elements per scale of the 8-bit momentum (``FusionVariant(momentum_bits=8)``)."""


class BlockInt8:
    """A tensor kept as int8 codes with one fp32 scale per block of :data:`MOMENTUM_BLOCK` elements (of the
    flattened tensor): ``value = code * absmax / 127``, where ``absmax`` is the block's largest magnitude,
    rounded to nearest. 1 + 4 / MOMENTUM_BLOCK bytes per element instead of 4. An ablation prototype of
    8-bit momentum (bitsandbytes keeps Adam's moments in blocks too, with a non-linear code)."""

    def __init__(self, like: Tensor) -> None:
        self.shape = like.shape
        n = like.numel()
        self.codes = torch.zeros(n, dtype=torch.int8, device=like.device)
        self.scales = torch.zeros(-(-n // MOMENTUM_BLOCK), dtype=torch.float32, device=like.device)

    def _blocks(self, flat: Tensor) -> Tensor:
        pad = self.scales.numel() * MOMENTUM_BLOCK - flat.numel()
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, MOMENTUM_BLOCK)

    def get(self) -> Tensor:
        """The fp32 values."""
        blocks = self._blocks(self.codes.float()) * (self.scales / 127.0)[:, None]
        return blocks.view(-1)[: self.codes.numel()].view(self.shape)

    def set_(self, value: Tensor) -> None:
        """Store ``value`` (fp32, this shape): new scales, then the codes rounded to nearest."""
        blocks = self._blocks(value.reshape(-1).float())
        self.scales.copy_(blocks.abs().amax(dim=1))
        safe = torch.where(self.scales > 0, self.scales, 1.0)[:, None]
        codes = torch.round(blocks * (127.0 / safe)).clamp_(-127, 127)
        self.codes.copy_(codes.view(-1)[: self.codes.numel()].to(torch.int8))


DENSE = "dense"
"""``FusionVariant(cover=DENSE)``: a per-element second moment for every tensor, as AdamW keeps (not O(n+m))."""


def _random_round_bf16(x: Tensor) -> Tensor:
    """Stochastic rounding of finite fp32 values into bf16 with torch's generator (a prototype: the package's
    :mod:`fusedbun.rounding` uses a counter hash instead): 16 random bits added below the kept bits, then
    truncated."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class FusionVariant(Optimizer):
    r"""FusionOptimizer's ``use_rms=True`` rule in plain torch (one tensor at a time), with the momentum
    and the second-moment decay changeable. An ablation prototype: with ``momentum="after"``,
    ``bias_correction=False``, ``nesterov=False`` and ``beta2=None`` it takes the package's step.

    .. math::
        \begin{aligned}
        &M_t \leftarrow \epsilon < |g_t| < 2^{64};\quad g_t \leftarrow M_t\,?\ g_t : 0 \\
        &\beta_t \leftarrow 1 - t^{-c} \text{, or } \beta_2 \text{ when given} \\
        &\nu_t \leftarrow M_t\,?\ \beta_t\,\mathrm{prev} + (1-\beta_t) g_t^2 : \mathrm{prev}
            \quad(\mathrm{prev} = v_{t-1} \text{ for 0-D/1-D, } \min_k a^{(k)}_{t-1} \text{ otherwise}) \\
        &\text{(cover="maxprod": } \mathrm{prev} = \prod_k a^{(k)} / (\max a^{(0)})^{K-1}\text{; "factored": }
            \prod_k a^{(k)} / (\mathrm{mean}\, a^{(0)})^{K-1}\text{, the accumulators then means of } \nu\text{;} \\
        &\quad\text{"factored\_capped": the smaller of that and SM3's bound, both kept)} \\
        &d_t \leftarrow \sqrt{\nu_t / b^{\nu}_t} + \epsilon,\quad b^{\nu}_t = 1 - \beta_2^t
            \text{ with } \beta_2 \text{, else } 1 \\
        &\textbf{after (default): } x_t = g_t / d_t;\ m_t \leftarrow \beta_m m_{t-1} + (1-\beta_m) x_t;\
            u_t = \hat m_t \\
        &\text{with update\_clip } c\text{ (after only): } x_t \leftarrow x_t / \max(1, \mathrm{RMS}(x_t) / c) \\
        &\textbf{before (Adam's order): } x_t = g_t;\ m_t \text{ as above};\ u_t = \hat m_t / d_t \\
        &\hat m_t = m_t / b_t,\quad b_t = 1 - \beta_m^t \text{ with bias correction, else } 1 \\
        &\textbf{nesterov: } \hat m_t = (\beta_m m_t + (1-\beta_m) x_t) / b'_t,\quad
            b'_t = 1 - \beta_m^{t+1} \text{ with bias correction, else } 1 \\
        &\theta_t \leftarrow \theta_{t-1}(1 - \eta\lambda) - \eta\, u_t
        \end{aligned}

    The Nesterov look-ahead is the momentum one step further with the same input, so its bias correction
    is that of step :math:`t+1`. ``cover="dense"`` keeps a per-element :math:`v` for every tensor, as 0-D/1-D
    tensors do (AdamW's layout, not O(n+m)). ``state_dtype=torch.bfloat16`` stores the momentum (rounded to
    nearest) and a dense :math:`v` (rounded stochastically, or to nearest with ``hessian_rounding="nearest"``)
    in bf16, and the step uses the stored values. The arithmetic is fp32; parameters are fp32.
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-8,
        beta_decay: float = 0.8,
        Lambda: float = 0.01,
        momentum_beta: float = 0.9,
        *,
        momentum: str = "after",
        bias_correction: bool = False,
        nesterov: bool = False,
        beta2: float | None = None,
        cover: str = "sm3",
        momentum_bits: int | None = None,
        update_clip: float | None = None,
        state_dtype: torch.dtype = torch.float32,
        hessian_rounding: str = "stochastic",
    ) -> None:
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r}; it must be torch.float32 or torch.bfloat16")
        if hessian_rounding not in ("stochastic", "nearest"):
            raise ValueError(f"Invalid hessian_rounding: {hessian_rounding!r}; it must be 'stochastic' or 'nearest'")
        if update_clip is not None and not update_clip > 0:
            raise ValueError(f"Invalid update_clip: {update_clip!r}; it must be > 0 or None")
        if momentum_bits not in (None, 8):
            raise ValueError(f"Invalid momentum_bits: {momentum_bits!r}; it must be None (fp32) or 8")
        if cover not in COVERS and cover != DENSE:
            raise ValueError(f"Invalid cover: {cover!r}; it must be one of {', '.join([*COVERS, DENSE])}")
        if momentum not in ("after", "before"):
            raise ValueError(f"Invalid momentum: {momentum!r}; it must be 'after' or 'before'")
        if not 0 < momentum_beta < 1:
            raise ValueError(f"Invalid momentum_beta: {momentum_beta!r}; it must be in (0, 1)")
        if not 0 < beta_decay <= 1:
            raise ValueError(f"Invalid beta_decay: {beta_decay!r}; it must be in (0, 1]")
        if beta2 is not None and not 0 <= beta2 < 1:
            raise ValueError(f"Invalid beta2: {beta2!r}; it must be in [0, 1) or None")
        defaults = dict(
            lr=lr,
            eps=eps,
            beta_decay=beta_decay,
            Lambda=Lambda,
            momentum_beta=momentum_beta,
            momentum=momentum,
            bias_correction=bias_correction,
            nesterov=nesterov,
            beta2=beta2,
            cover=cover,
            momentum_bits=momentum_bits,
            update_clip=update_clip,
            state_dtype=state_dtype,
            hessian_rounding=hessian_rounding,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, bm = group["lr"], group["eps"], group["momentum_beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                dense = p.dim() <= 1 or group["cover"] == DENSE
                sdtype = group["state_dtype"]
                if not state:
                    state["step"] = 0
                    state["exp_hessian"] = (
                        torch.zeros_like(p, dtype=sdtype)
                        if dense
                        else [a for _ in range(COVERS[group["cover"]].copies) for a in sm3_accumulators(p)]
                    )
                    if group["momentum_bits"] == 8:
                        state["momentum_codes"] = BlockInt8(p)
                    else:
                        state["momentum_buffer"] = torch.zeros_like(p, dtype=sdtype)
                state["step"] += 1
                t = state["step"]
                g = p.grad.to(torch.float32)
                magnitude = g.abs()
                mask = (magnitude > eps) & (magnitude < GRAD_LIMIT)
                g = torch.where(mask, g, 0.0)
                beta = group["beta2"] if group["beta2"] is not None else 1.0 - t ** (-group["beta_decay"])
                hess = state["exp_hessian"]
                prev = hess.float() if dense else COVERS[group["cover"]].bound(hess).expand(g.shape)
                nu = torch.where(mask, prev * beta + (1.0 - beta) * g * g, prev)
                if not dense:
                    COVERS[group["cover"]].reduce_(hess, nu)
                elif hess.dtype == torch.float32:
                    hess.copy_(nu)
                else:  # stored in bf16: the step goes on with what is stored
                    hess.copy_(_random_round_bf16(nu) if group["hessian_rounding"] == "stochastic" else nu)
                    nu = hess.float()
                if group["beta2"] is not None:
                    nu = nu / (1.0 - group["beta2"] ** t)
                denom = nu.sqrt().add_(eps)
                x = g / denom if group["momentum"] == "after" else g
                if group["update_clip"] is not None and group["momentum"] == "after":
                    # Adafactor's update clipping, on the normalized gradient: its RMS at most update_clip
                    rms = x.square().mean().sqrt()
                    x = x / torch.clamp(rms / group["update_clip"], min=1.0)
                if group["momentum_bits"] == 8:
                    q = state["momentum_codes"]
                    m = q.get().lerp_(x, 1.0 - bm)
                    q.set_(m)
                    m = q.get()  # the step uses what is stored, as with any momentum dtype
                elif sdtype == torch.float32:
                    m = state["momentum_buffer"].lerp_(x, 1.0 - bm)
                else:  # bf16, rounded to nearest as the package's momentum_dtype does; the step uses what is stored
                    buf = state["momentum_buffer"]
                    buf.copy_(buf.float().lerp_(x, 1.0 - bm))
                    m = buf.float()
                if group["nesterov"]:
                    u = m * bm + x * (1.0 - bm)
                    correction = 1.0 - bm ** (t + 1)
                else:
                    u = m
                    correction = 1.0 - bm**t
                if group["bias_correction"]:
                    u = u / correction
                if group["momentum"] == "before":
                    u = u / denom
                if group["Lambda"] != 0:
                    p.mul_(1.0 - lr * group["Lambda"])
                p.add_(u.to(p.dtype), alpha=-lr)
        return loss


# ---------------------------------------------------------------- builders


def _adamw(model, lr, wd, **kw):
    fused = True if _on_cuda(model) else None
    return torch.optim.AdamW(decay_groups(model, wd), lr=lr, betas=ADAM_BETAS, fused=fused, **kw)


def _adafactor(model, lr, wd, **kw):
    return torch.optim.Adafactor(decay_groups(model, wd), lr=lr, **kw)


def _bnb_adamw8bit(model, lr, wd, **kw):
    bnb = importlib.import_module("bitsandbytes")
    return bnb.optim.AdamW8bit(decay_groups(model, wd), lr=lr, betas=ADAM_BETAS, **kw)


def _torchao_optim(name):
    try:
        return getattr(importlib.import_module("torchao.optim"), name)
    except (ImportError, AttributeError):  # torchao before 0.11 kept them in the prototype namespace
        return getattr(importlib.import_module("torchao.prototype.low_bit_optim"), name)


def _ao_adamw8bit(model, lr, wd, **kw):
    return _torchao_optim("AdamW8bit")(decay_groups(model, wd), lr=lr, betas=ADAM_BETAS, **kw)


def _ao_adamw4bit(model, lr, wd, **kw):
    return _torchao_optim("AdamW4bit")(decay_groups(model, wd), lr=lr, betas=ADAM_BETAS, **kw)


LION_WD_SCALE = 10.0


def _lion(model, lr, wd, **kw):
    return importlib.import_module("pytorch_optimizer").Lion(decay_groups(model, wd * LION_WD_SCALE), lr=lr, **kw)


def _muon(model, lr, wd, **kw):
    hidden, rest = hidden_matrices(model)
    if hasattr(torch.optim, "Muon"):
        muon = torch.optim.Muon(hidden, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw", **kw)
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
        groups = [
            g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
        ]
        adamw = torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, fused=True if _on_cuda(model) else None)
        return OptimizerChain(muon, adamw)
    # torch before 2.9: pytorch_optimizer's Muon, with its AdamW for the rest, at the same lr
    po_muon = importlib.import_module("pytorch_optimizer").Muon
    groups = [
        dict(params=hidden, use_muon=True, lr=lr, weight_decay=wd),
        dict(params=rest, use_muon=False, lr=lr, weight_decay=0.0),
    ]
    return po_muon(groups, lr=lr, use_adjusted_lr=True, **kw)


def _sm3(model, lr, wd, **kw):
    # SM3 has no weight decay: wd is not used.
    return importlib.import_module("pytorch_optimizer").SM3(model.parameters(), lr=lr, **kw)


def _fusion(model, lr, wd, **kw):
    return fusedbun.FusionOptimizer(fusedbun.param_groups_no_decay(model, Lambda=wd), lr=lr, **kw)


def _fusion_defaults(model, lr, wd, **kw):
    # exactly the constructor's defaults, as a new user writes it: Lambda=0.01 on every tensor, use_rms=False
    return fusedbun.FusionOptimizer(model.parameters(), lr=lr, **kw)


_FUSION_BUILDERS = (_fusion, _fusion_defaults)


def steps_in_backward(spec: LMOptimizer) -> bool:
    """Whether ``spec`` builds a :class:`fusedbun.FusionOptimizer`, which :func:`fusedbun.step_in_backward` can
    step inside ``loss.backward()`` (the peers and the ablation prototypes cannot)."""
    return spec.build in _FUSION_BUILDERS


def _fusion_dense(model, lr, wd, **kw):
    from benchmarks.optimizers import DenseSecondMomentFusion

    parts = [
        DenseSecondMomentFusion(g["params"], lr=lr, Lambda=g["Lambda"], **{"use_rms": True, **kw})
        for g in fusedbun.param_groups_no_decay(model, Lambda=wd)
    ]
    return OptimizerChain(*parts)


def _fusion_factored_dense_ends(model, lr, wd, **kw):
    """The factored cover on the 2-D weights inside the blocks; a dense second moment (as 1-D tensors keep)
    on the rest: the token embedding (tied to the output head), the position embedding, biases and gains."""
    from benchmarks.optimizers import DenseSecondMomentFusion

    hidden, rest = hidden_matrices(model)
    options = {"use_rms": True, **kw}
    parts = [fusedbun.FusionOptimizer([{"params": hidden, "Lambda": wd}], lr=lr, cover="factored", **options)]
    for params, decay in (([p for p in rest if p.dim() >= 2], wd), ([p for p in rest if p.dim() < 2], 0.0)):
        if params:
            parts.append(DenseSecondMomentFusion(params, lr=lr, Lambda=decay, **options))
    return OptimizerChain(*parts)


def _fusion_variant(**fixed):
    def build(model, lr, wd, **kw):
        return FusionVariant(fusedbun.param_groups_no_decay(model, Lambda=wd), lr=lr, **{**fixed, **kw})

    return build


def _spec(name, label, library, lr_centre, build, **kw) -> LMOptimizer:
    return LMOptimizer(name, label, library, lr_centre, build, **kw)


_FUSION = "fusedbun"
_PO = ("pytorch_optimizer",)

_SPECS = [
    _spec(
        "adamw",
        "AdamW (torch, fused)",
        "torch",
        2e-3,
        _adamw,
        note="betas (0.9, 0.95), fused=True on CUDA; centre 2e-3, nanoGPT's 1e-3 for 10M models doubled for the "
        "shorter run",
    ),
    _spec(
        "adamw_bf16",
        "AdamW (torch, fused) on bf16 parameters",
        "torch",
        1e-3,
        _adamw,
        recipe=dict(param_dtype="bf16"),
        note="the model cast to bfloat16, then torch.optim.AdamW(fused=True on CUDA), betas (0.9, 0.95): its moments "
        "are bf16 like the parameters, and each step rounds to nearest; centre 1e-3, AdamW's best on the GPU "
        "benchmark",
    ),
    _spec(
        "fusion_rms",
        "FusionOptimizer (use_rms=True)",
        _FUSION,
        4e-3,
        _fusion,
        options=dict(use_rms=True),
        note="Lambda=wd on matrices (fusedbun.param_groups_no_decay); centre 4e-3, above AdamW's: the update is "
        "normalized before the momentum",
    ),
    _spec(
        "fusion_rms_bf16m",
        "FusionOptimizer (use_rms=True, bf16 momentum)",
        _FUSION,
        4e-3,
        _fusion,
        options=dict(use_rms=True, momentum_dtype=torch.bfloat16),
        note="as fusion_rms, the momentum buffer stored in bfloat16",
    ),
    _spec(
        "fusion_bf16_sr",
        "FusionOptimizer (use_rms=True) on bf16 parameters, stochastic rounding, bf16 momentum",
        _FUSION,
        2e-3,
        _fusion,
        options=dict(use_rms=True, momentum_dtype=torch.bfloat16, stochastic_rounding=True),
        recipe=dict(param_dtype="bf16"),
        note="the model cast to bfloat16; each step computed in fp32 and stochastically rounded into the bf16 "
        "parameters, the momentum stored in bf16, SM3's accumulators in fp32; centre 2e-3, the best of "
        "fusion_rms_bf16m on the GPU benchmark",
    ),
    _spec(
        "fusion_bf16_sr_sib",
        "FusionOptimizer (use_rms=True) on bf16 parameters, stochastic rounding, bf16 momentum, step in backward",
        _FUSION,
        2e-3,
        _fusion,
        options=dict(use_rms=True, momentum_dtype=torch.bfloat16, stochastic_rounding=True),
        recipe=dict(param_dtype="bf16", step_in_backward=True, clip_per_param=STEP_IN_BACKWARD_CLIP),
        note="as fusion_bf16_sr, each parameter stepped inside loss.backward() as soon as its gradient is ready "
        f"(fusedbun.step_in_backward) and its gradient freed; each gradient clipped to norm {STEP_IN_BACKWARD_CLIP:g} "
        "on its own instead of the global norm to 1.0, which needs every gradient at once",
    ),
    _spec(
        "fusion_rms_factored",
        'FusionOptimizer (use_rms=True, cover="factored")',
        _FUSION,
        1e-3,
        _fusion,
        options=dict(use_rms=True, cover="factored"),
        note="as fusion_rms with the factored second moment (fusedbun.factored: Adafactor's per-dimension means "
        "multiplied back), the same O(n+m) state; centre 1e-3, the best of its ablation prototype",
    ),
    _spec(
        "fusion_rms_dense_bf16",
        'FusionOptimizer (use_rms=True, cover="dense", bf16 second moment and momentum)',
        _FUSION,
        1e-3,
        _fusion,
        options=dict(use_rms=True, cover="dense", hessian_dtype=torch.bfloat16, momentum_dtype=torch.bfloat16),
        note="a per-element second moment, as AdamW keeps, stored in bfloat16 and rounded stochastically, and the "
        "momentum in bfloat16: 4 bytes per parameter, half of AdamW's; centre 1e-3, the best of its ablation "
        "prototype",
    ),
    _spec(
        "fusion_factored_bf16_sr",
        'FusionOptimizer (use_rms=True, cover="factored") on bf16 parameters, stochastic rounding, bf16 momentum',
        _FUSION,
        1e-3,
        _fusion,
        options=dict(use_rms=True, cover="factored", momentum_dtype=torch.bfloat16, stochastic_rounding=True),
        recipe=dict(param_dtype="bf16"),
        note="as fusion_bf16_sr with the factored second moment",
    ),
    _spec(
        "fusion_factored_bf16_sr_sib",
        'FusionOptimizer (use_rms=True, cover="factored") on bf16 parameters, stochastic rounding, bf16 momentum, '
        "step in backward",
        _FUSION,
        1e-3,
        _fusion,
        options=dict(use_rms=True, cover="factored", momentum_dtype=torch.bfloat16, stochastic_rounding=True),
        recipe=dict(param_dtype="bf16", step_in_backward=True, clip_per_param=STEP_IN_BACKWARD_CLIP),
        note="as fusion_bf16_sr_sib with the factored second moment: 4 persistent bytes per parameter",
    ),
    _spec(
        "fusion_dense_bf16_sr_sib",
        'FusionOptimizer (use_rms=True, cover="dense", bf16 second moment) on bf16 parameters, stochastic rounding, '
        "bf16 momentum, step in backward",
        _FUSION,
        1e-3,
        _fusion,
        options=dict(
            use_rms=True,
            cover="dense",
            hessian_dtype=torch.bfloat16,
            momentum_dtype=torch.bfloat16,
            stochastic_rounding=True,
        ),
        recipe=dict(param_dtype="bf16", step_in_backward=True, clip_per_param=STEP_IN_BACKWARD_CLIP),
        note="as fusion_factored_bf16_sr_sib with the dense second moment in bf16: 6 persistent bytes per parameter",
    ),
    _spec(
        "adafactor",
        "Adafactor (torch)",
        "torch",
        1e-2,
        _adafactor,
        note="torch.optim.Adafactor, its defaults (lr 1e-2 caps the relative step size); weight_decay decoupled",
    ),
    _spec(
        "adamw8bit_bnb",
        "AdamW 8-bit (bitsandbytes)",
        "bitsandbytes",
        1e-3,
        _bnb_adamw8bit,
        requires=("bitsandbytes",),
        note="bitsandbytes.optim.AdamW8bit, betas (0.9, 0.95); tensors under 4096 elements keep 32-bit state; "
        "centre 1e-3, AdamW's best on the GPU benchmark",
    ),
    _spec(
        "adamw8bit_ao",
        "AdamW 8-bit (torchao)",
        "torchao",
        1e-3,
        _ao_adamw8bit,
        requires=("torchao",),
        note="torchao.optim.AdamW8bit, betas (0.9, 0.95); its step is torch.compile'd per tensor shape on first use; "
        "centre 1e-3, AdamW's best on the GPU benchmark",
    ),
    _spec(
        "adamw4bit_ao",
        "AdamW 4-bit (torchao)",
        "torchao",
        1e-3,
        _ao_adamw4bit,
        requires=("torchao",),
        note="torchao.optim.AdamW4bit, betas (0.9, 0.95); its step is torch.compile'd per tensor shape on first use; "
        "centre 1e-3, AdamW's best on the GPU benchmark",
    ),
    _spec(
        "lion",
        "Lion (pytorch_optimizer)",
        "pytorch_optimizer",
        3e-4,
        _lion,
        requires=_PO,
        note=f"betas (0.9, 0.99); the Lion paper's advice: lr 3-10x below AdamW's and weight decay {LION_WD_SCALE:g}x "
        "above it, so wd x 10 on matrices",
    ),
    _spec(
        "muon",
        "Muon (torch) + AdamW",
        "torch",
        2e-3,
        _muon,
        note="torch.optim.Muon on the blocks' 2-D weights with adjust_lr_fn='match_rms_adamw' (Moonshot's scaling, "
        "which takes AdamW's lr and weight decay), AdamW (0.9, 0.95) on embeddings, head, biases and gains, one lr; "
        "the fused qkv weight is orthogonalized as one matrix",
    ),
    _spec(
        "sm3",
        "SM3 (pytorch_optimizer)",
        "pytorch_optimizer",
        1e-1,
        _sm3,
        requires=_PO,
        note="library defaults (momentum 0, beta 0: Adagrad-style accumulation over SM3 covers); SM3 has no weight "
        "decay, so wd is not applied",
    ),
    _spec(
        "sm3_momentum",
        "SM3 (pytorch_optimizer, momentum 0.9)",
        "pytorch_optimizer",
        1e-1,
        _sm3,
        requires=_PO,
        options=dict(momentum=0.9),
        note="as sm3 with momentum 0.9, as in the SM3 paper's experiments",
    ),
    _spec(
        "fusion_defaults",
        "FusionOptimizer (constructor defaults)",
        _FUSION,
        1e-1,
        _fusion_defaults,
        note="FusionOptimizer(model.parameters(), lr): use_rms=False, Lambda=0.01 on every tensor (the recipe's wd "
        "is not applied); the update is an EMA of the masked gradient, so the grid is centred at SGD-momentum's "
        "1e-1",
    ),
    _spec(
        "fusion_nomom",
        "FusionOptimizer (use_rms=True, momentum_beta=0)",
        _FUSION,
        2e-3,
        _fusion,
        options=dict(use_rms=True, momentum_beta=0.0),
        note="no momentum buffer: the state is SM3's accumulators (and dense vectors for biases and gains) only",
    ),
    # ablations
    _spec(
        "fusion_dense",
        "ablation: dense second moment",
        _FUSION,
        4e-3,
        _fusion_dense,
        ablation=True,
        note="benchmarks.optimizers.DenseSecondMomentFusion: the SM3 cover replaced by a per-element EMA (Adam-sized)",
    ),
    _spec(
        "fusion_dense_bf16m",
        "ablation: dense second moment, bf16 momentum",
        _FUSION,
        1e-3,
        _fusion_dense,
        ablation=True,
        options=dict(momentum_dtype=torch.bfloat16),
        note="fusion_dense with the momentum stored in bfloat16 (the package's momentum_dtype): 6 bytes per parameter",
    ),
    _spec(
        "fusion_dense_bf16",
        "ablation: dense second moment and momentum, both in bf16",
        _FUSION,
        1e-3,
        _fusion_variant(cover=DENSE, state_dtype=torch.bfloat16),
        ablation=True,
        note="FusionVariant with a per-element second moment stored in bfloat16, rounded stochastically, and the "
        "momentum in bfloat16, rounded to nearest: 4 bytes per parameter, half of AdamW's",
    ),
    _spec(
        "fusion_dense_bf16_clip",
        "ablation: dense second moment and momentum in bf16, with Adafactor's update clipping",
        _FUSION,
        1e-3,
        _fusion_variant(cover=DENSE, state_dtype=torch.bfloat16, update_clip=1.0),
        ablation=True,
        note="fusion_dense_bf16 with the normalized gradient's RMS clipped to 1 per tensor before the momentum",
    ),
    _spec(
        "fusion_dense_bf16_rne",
        "ablation: dense second moment and momentum in bf16, both rounded to nearest",
        _FUSION,
        1e-3,
        _fusion_variant(cover=DENSE, state_dtype=torch.bfloat16, hessian_rounding="nearest"),
        ablation=True,
        note="fusion_dense_bf16 with the second moment rounded to nearest: increments below half a bf16 unit "
        "are lost once beta_t is close to 1",
    ),
    _spec(
        "fusion_factored_dense_ends",
        "ablation: factored cover inside the blocks, dense second moment for the embeddings and head",
        _FUSION,
        1e-3,
        _fusion_factored_dense_ends,
        ablation=True,
        note="fusion_rms_factored on the blocks' matrices; the tied token embedding and head and the position "
        "embedding (1.5% of the parameters) keep a per-element second moment, as 1-D tensors do",
    ),
    _spec(
        "fusion_maxprod",
        "ablation: max-product cover",
        _FUSION,
        2e-3,
        _fusion_variant(cover="maxprod"),
        ablation=True,
        note=COVERS["maxprod"].note + "; O(n+m) like SM3",
    ),
    _spec(
        "fusion_factored",
        "ablation: factored (Adafactor) second moment",
        _FUSION,
        2e-3,
        _fusion_variant(cover="factored"),
        ablation=True,
        note=COVERS["factored"].note + "; O(n+m) like SM3",
    ),
    _spec(
        "fusion_m8",
        "ablation: 8-bit momentum",
        _FUSION,
        4e-3,
        _fusion_variant(momentum_bits=8),
        ablation=True,
        note="the momentum kept as int8 codes with one fp32 absmax scale per 256 elements (BlockInt8), rounded "
        "to nearest: 1.016 bytes per element instead of 4",
    ),
    _spec(
        "fusion_plain_variant",
        "ablation: the rule in plain torch (control)",
        _FUSION,
        4e-3,
        _fusion_variant(),
        ablation=True,
        note="FusionVariant with the package's rule: the control for the variants below (same numbers as "
        "fusion_rms, slower)",
    ),
    _spec(
        "fusion_mom_bc",
        "ablation: bias-corrected momentum",
        _FUSION,
        4e-3,
        _fusion_variant(bias_correction=True),
        ablation=True,
        note="m_t / (1 - beta_m^t)",
    ),
    _spec(
        "fusion_nesterov",
        "ablation: Nesterov momentum",
        _FUSION,
        4e-3,
        _fusion_variant(nesterov=True),
        ablation=True,
        note="beta_m m_t + (1 - beta_m) x_t",
    ),
    _spec(
        "fusion_nesterov_bc",
        "ablation: Nesterov, bias-corrected",
        _FUSION,
        4e-3,
        _fusion_variant(nesterov=True, bias_correction=True),
        ablation=True,
        note="(beta_m m_t + (1 - beta_m) x_t) / (1 - beta_m^(t+1))",
    ),
    _spec(
        "fusion_mom_before",
        "ablation: momentum before the normalization",
        _FUSION,
        2e-3,
        _fusion_variant(momentum="before"),
        ablation=True,
        note="Adam's order: m_t = EMA of g, update m_t / d_t",
    ),
    _spec(
        "fusion_mom_before_bc",
        "ablation: momentum before the normalization, bias-corrected",
        _FUSION,
        2e-3,
        _fusion_variant(momentum="before", bias_correction=True),
        ablation=True,
        note="Adam's order and bias correction, with SM3's second moment and the 1 - t^-c schedule",
    ),
    _spec(
        "fusion_beta2_095",
        "ablation: constant beta2 = 0.95 (bias-corrected)",
        _FUSION,
        4e-3,
        _fusion_variant(beta2=0.95),
        ablation=True,
        note="the second moment's decay fixed at AdamW's 0.95 with Adam's bias correction, instead of 1 - t^-0.8",
    ),
    _spec(
        "fusion_factored_capped",
        "ablation: factored cover capped by SM3's bound",
        _FUSION,
        1e-3,
        _fusion_variant(cover="factored_capped"),
        ablation=True,
        note=COVERS["factored_capped"].note,
    ),
    _spec(
        "fusion_factored_clip",
        "ablation: factored cover with Adafactor's update clipping",
        _FUSION,
        1e-3,
        _fusion_variant(cover="factored", update_clip=1.0),
        ablation=True,
        note="fusion_factored with the normalized gradient's RMS clipped to 1 per tensor before the momentum",
    ),
    _spec(
        "fusion_factored_mom_before",
        "ablation: factored cover, momentum before the normalization",
        _FUSION,
        1e-3,
        _fusion_variant(cover="factored", momentum="before"),
        ablation=True,
        note="fusion_factored with Adam's order: m_t = EMA of g, update m_t / d_t",
    ),
    _spec(
        "fusion_factored_adamlike",
        "ablation: Adam's momentum and beta2 on the factored cover",
        _FUSION,
        1e-3,
        _fusion_variant(cover="factored", momentum="before", bias_correction=True, beta2=0.95),
        ablation=True,
        note="everything Adam does but the dense second moment, on the factored cover",
    ),
    _spec(
        "fusion_adamlike",
        "ablation: Adam's momentum and beta2 on SM3",
        _FUSION,
        2e-3,
        _fusion_variant(momentum="before", bias_correction=True, beta2=0.95),
        ablation=True,
        note="everything Adam does but the dense second moment: what is left is the SM3 cover (and the eps mask)",
    ),
]

LM_OPTIMIZERS: dict[str, LMOptimizer] = {s.name: s for s in _SPECS}


def get_lm_optimizer(name: str) -> LMOptimizer:
    try:
        return LM_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(LM_OPTIMIZERS)}") from None


def unavailable_reason(spec: LMOptimizer, device: torch.device | str) -> str | None:
    """Why ``spec`` cannot run here (a library not installed, no CUDA device), or ``None``."""
    for module in spec.requires:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    if spec.requires_cuda and torch.device(device).type != "cuda":
        return "needs a CUDA device"
    return None


def build_optimizer(spec: LMOptimizer, model: nn.Module, lr: float, wd: float, overrides: dict | None = None):
    """Build ``spec`` for ``model`` at ``lr`` with weight decay ``wd``; ``overrides`` are extra constructor
    keywords (an ablation's ``beta_decay=0.5``), applied over the entry's own options."""
    reason = unavailable_reason(spec, next(model.parameters()).device)
    if reason:
        raise RuntimeError(f"{spec.name}: {reason}")
    return spec.build(model, lr, wd, **{**spec.options, **(overrides or {})})


def lr_grid(centre: float, points: int) -> list[float]:
    """``points`` learning rates a factor 2 apart, centred on ``centre`` (an even count leans low)."""
    low = -(points // 2)
    return [centre * 2.0**k for k in range(low, low + points)]


def canonical_lr(lr: float) -> float:
    """A learning rate rounded to 6 significant digits: the form records use to compare rates."""
    return float(f"{lr:.6g}") if lr > 0 and math.isfinite(lr) else lr
