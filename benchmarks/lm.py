"""Language-model benchmark: a byte-level GPT trained the way transformers are trained, one optimizer at a time.

    python -m benchmarks.corpus build                                   # the corpus (once; needs apt-get)
    python -m benchmarks.lm train --optimizer fusion_rms --lr 8e-3      # one run
    python -m benchmarks.lm sweep --optimizers adamw fusion_rms --parallel 4 --results runs.jsonl
    python -m benchmarks.lm sweep --plan memory --parallel 4 --results memory.jsonl   # the memory plan
    python -m benchmarks.lm summarize --runs runs.jsonl --out benchmarks/results/lm_gpu.json

The recipe, the same for every optimizer: a GPT decoder over bytes (:mod:`benchmarks.gpt`; ``--size gpu``
is 25.6M parameters, context 512, 16,384 tokens a step) trained on the Python documentation corpus
(:mod:`benchmarks.corpus`) for ``--steps`` steps (1,500 by default, 24.6M tokens), the learning rate
warmed up linearly over ``--warmup-frac`` of the steps (5%) then cosine-decayed to ``--min-lr-ratio`` of
its peak (10%), gradients clipped to norm 1.0, bf16 autocast on CUDA, decoupled weight decay 0.1 on
tensors of 2+ dims only (:mod:`benchmarks.lm_optimizers` builds each optimizer with it). The seed sets the
initialisation and the order of the batches, so two optimizers with the same seed see the same data.

Two run options change how the model trains, and are part of a variant's name (``--param-dtype`` and
``--step-in-backward`` write them into it; some registry entries fix them): ``param_dtype=bf16`` casts the
initialised model to bfloat16 before the optimizer is built, so parameters, gradients and any state the
optimizer keeps "like the parameters" are bf16. Autocast stays on for CUDA runs: the matmuls run in bf16 as
they would anyway, and the ops autocast keeps in fp32 (layer norms, softmax) still do; the logits are cast
to fp32 for the cross-entropy, in training and evaluation. ``step_in_backward=True`` (FusionOptimizer only)
steps each parameter inside ``loss.backward()`` as soon as its gradient is ready and frees the gradient
(:func:`fusedbun.step_in_backward`); the global-norm clip cannot work there, so each gradient is clipped on
its own (``clip_per_param``, :data:`~benchmarks.lm_optimizers.STEP_IN_BACKWARD_CLIP` by default), and the
record says which clipping ran.

A run records the validation loss (nats per byte) every ``--eval-every`` steps on a fixed set of
validation windows, against tokens seen and against training wall-clock (evaluation excluded); at the end,
the loss over the whole validation split and the whole test split; tokens per second; peak GPU memory;
the bytes of the optimizer's state; and ``memory``, one step's memory after warm-up (``--memory-step``,
:class:`StepMemory`): the bytes of the parameters, of the gradients after backward and of the optimizer's
state, per parameter, and on CUDA the peak of that whole step and its transient part. The loop reads the
loss back from the device only every ``--log-every`` steps, which is also where a diverged run (a
non-finite loss, or one more than ``--divergence-margin`` nats above the first step's) is stopped.

``sweep`` runs the protocol: for each optimizer a grid of learning rates a factor 2 apart around its
centre, on seed 0; while the best lies at an edge of the grid, one more rate past that edge (up to
``--max-extend`` per side); then more seeds at the best rate (seed 0 counts as one). Each finished run is
appended to ``--results`` as one JSON line at once, runs already there are skipped, and ``--deadline-s``
stops the sweep in time, so a sweep cut short loses only the runs in flight and the same command resumes
it. ``--plan memory`` is the list of configurations whose whole run's memory the memory table compares,
each with its grid centre (:data:`PLANS`). ``summarize`` turns the runs into the table and a JSON file with
the curves, and, for runs that measured their memory, the memory table with the judgement of
:data:`MEMORY_TARGET`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import fusedbun
from benchmarks.corpus import DEFAULT_DIR, load_corpus
from benchmarks.gpt import GPT, flops_per_token, get_size
from benchmarks.lm_optimizers import (
    LM_OPTIMIZERS,
    STEP_IN_BACKWARD_CLIP,
    build_optimizer,
    canonical_lr,
    get_lm_optimizer,
    group_lrs,
    lr_grid,
    optimizer_state_bytes,
    set_lr,
    steps_in_backward,
    unavailable_reason,
)
from benchmarks.provenance import commit

__all__ = [
    "RunConfig",
    "parse_variant",
    "with_run_options",
    "PLANS",
    "StepMemory",
    "lr_factor",
    "train",
    "run_key",
    "arm_state",
    "sweep",
    "summarize",
    "main",
]

TRAIN_KEYS = ("wd", "warmup_frac", "min_lr_ratio", "clip")
# How a run trains beyond the recipe, set by a variant (or its registry entry) only, with their defaults:
# the parameters' dtype, the step inside backward, and per-tensor gradient clipping (which replaces the
# global clip when set).
RUN_OPTIONS = {"param_dtype": "fp32", "step_in_backward": False, "clip_per_param": 0.0}
RECIPE_KEYS = TRAIN_KEYS + tuple(RUN_OPTIONS)
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VERSION_DISTS = (
    "torch",
    "triton",
    "fusedbun",
    "bitsandbytes",
    "torchao",
    "pytorch_optimizer",
    "lion-pytorch",
    "transformers",
    "accelerate",
    "numpy",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on. ``optimizer`` is a variant: a registry name, optionally
    followed by ``:key=value,...`` (constructor keywords, the recipe's ``wd``, ``warmup_frac``,
    ``min_lr_ratio`` and ``clip``, or the run options of :data:`RUN_OPTIONS`), e.g.
    ``fusion_rms:beta_decay=0.5``, ``adamw:warmup_frac=0.1`` or ``fusion_rms:param_dtype=bf16``. The run
    options live in the variant's name only, so that a configuration that trains differently has a name of
    its own: ``param_dtype`` (``fp32`` or ``bf16``), ``step_in_backward`` (``True`` steps a FusionOptimizer
    inside ``loss.backward()``) and ``clip_per_param`` (each gradient clipped to this norm on its own, in
    place of the global clip). ``memory_step`` is the step whose memory the record reports."""

    optimizer: str
    lr: float
    seed: int = 0
    size: str = "gpu"
    steps: int = 1500
    data: str = str(DEFAULT_DIR)
    device: str = "auto"
    wd: float = 0.1
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 25
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "off"
    compile: bool = False
    divergence_margin: float = 1.0
    phase: str = "single"
    memory_step: int = 5

    def effective(self) -> dict:
        """The recipe after the registry entry's run options and the variant's overrides: ``{"wd": ...,
        "warmup_frac": ..., "min_lr_ratio": ..., "clip": ..., "param_dtype": ..., "step_in_backward": ...,
        "clip_per_param": ...}``.

        Per-tensor clipping replaces the global clip (``clip`` becomes 0). The step inside backward cannot
        clip by the global norm (each gradient is consumed before the next exists), so with it ``clip`` is 0
        and ``clip_per_param`` is :data:`~benchmarks.lm_optimizers.STEP_IN_BACKWARD_CLIP` unless the variant
        sets it; a variant that asks for both, or for the step inside backward of an optimizer that is not a
        FusionOptimizer, raises ``ValueError``."""
        name, _, overrides = parse_variant(self.optimizer)
        spec = get_lm_optimizer(name)
        given = {**spec.recipe, **overrides}
        out = {k: getattr(self, k) for k in TRAIN_KEYS}
        out.update(RUN_OPTIONS)
        out.update(given)
        if out["step_in_backward"]:
            if not steps_in_backward(spec):
                raise ValueError(
                    f"{self.optimizer!r}: step_in_backward=True steps a fusedbun.FusionOptimizer inside "
                    f"backward (fusedbun.step_in_backward); {name} ({spec.label}) is not one"
                )
            if "clip_per_param" not in given:
                out["clip_per_param"] = STEP_IN_BACKWARD_CLIP
        if out["step_in_backward"] or out["clip_per_param"]:
            if given.get("clip"):
                raise ValueError(
                    f"{self.optimizer!r}: clip={given['clip']} (the global gradient norm) cannot go with "
                    + (
                        "step_in_backward=True, which consumes each gradient before the next exists; "
                        "use clip_per_param=..."
                        if out["step_in_backward"]
                        else f"clip_per_param={out['clip_per_param']}; set one of them"
                    )
                )
            out["clip"] = 0.0
        return out

    def clipping(self) -> str:
        """The gradient clipping of the run, in words."""
        eff = self.effective()
        if eff["clip"]:
            return f"global norm {eff['clip']:g}"
        if eff["clip_per_param"]:
            return f"per tensor {eff['clip_per_param']:g}"
        return "none"


def _parse_value(text: str):
    if text.startswith("torch."):
        value = getattr(torch, text[len("torch.") :], None)
        if isinstance(value, torch.dtype):
            return value
        raise ValueError(f"{text!r} is not a torch dtype")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(variant: str) -> tuple[str, dict, dict]:
    """``"fusion_rms:beta_decay=0.5,warmup_frac=0.02"`` -> ``("fusion_rms", {"beta_decay": 0.5},
    {"warmup_frac": 0.02})``: the registry name, constructor overrides, recipe overrides."""
    name, _, rest = variant.partition(":")
    get_lm_optimizer(name)
    opt, recipe = {}, {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{variant!r}: {item!r} is not key=value")
        key = key.strip()
        if key in ("Lambda", "weight_decay"):
            # the param groups carry the decay (none on biases and gains), so a constructor keyword would not reach it
            raise ValueError(f"{variant!r}: set the weight decay on matrices with wd=..., not {key}=...")
        (recipe if key in RECIPE_KEYS else opt)[key] = _parse_value(value.strip())
    _check_run_options(variant, recipe)
    return name, opt, recipe


def _check_run_options(variant: str, recipe: dict) -> None:
    if "param_dtype" in recipe and recipe["param_dtype"] not in PARAM_DTYPES:
        raise ValueError(f"{variant!r}: param_dtype must be one of {', '.join(PARAM_DTYPES)}")
    if "step_in_backward" in recipe and not isinstance(recipe["step_in_backward"], bool):
        raise ValueError(f"{variant!r}: step_in_backward must be True or False")
    for key in ("clip", "clip_per_param"):
        value = recipe.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{variant!r}: {key} must be a number >= 0 (0: none)")


def with_run_options(variant: str, *, param_dtype: str | None = None, step_in_backward: bool = False) -> str:
    """``variant`` with the command line's ``--param-dtype`` and ``--step-in-backward`` written into its name
    (where they change what the variant does already), so that the run is recorded and summarized as a
    configuration of its own: ``with_run_options("fusion_rms", param_dtype="bf16")`` is
    ``"fusion_rms:param_dtype=bf16"``. Raises ``ValueError`` for the step inside backward of an optimizer
    that is not a FusionOptimizer."""
    eff = RunConfig(optimizer=variant, lr=0.0).effective()
    extra = {}
    if param_dtype is not None and param_dtype != eff["param_dtype"]:
        extra["param_dtype"] = param_dtype
    if step_in_backward and not eff["step_in_backward"]:
        extra["step_in_backward"] = True
    if not extra:
        return variant
    name, _, rest = variant.partition(":")
    items = [i for i in rest.split(",") if i and i.partition("=")[0].strip() not in extra]
    items += [f"{k}={v}" for k, v in extra.items()]
    out = canonical_variant(f"{name}:{','.join(items)}")
    RunConfig(optimizer=out, lr=0.0).effective()  # refuses what cannot run
    return out


def canonical_variant(variant: str) -> str:
    """The variant with its overrides sorted by key, so that one configuration has one name."""
    name, _, rest = variant.partition(":")
    items = sorted(filter(None, rest.split(",")))
    return f"{name}:{','.join(items)}" if items else name


def lr_factor(step: int, steps: int, warmup_frac: float, min_lr_ratio: float) -> float:
    """The learning-rate multiplier at ``step`` (1-based): linear warmup over ``round(warmup_frac * steps)``
    steps (at least 1), reaching 1 at the warmup's last step, then a cosine from 1 down to
    ``min_lr_ratio`` at the last step."""
    warmup = max(1, round(warmup_frac * steps))
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------- provenance


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    info = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    info.update({d: _version(d) for d in VERSION_DISTS})
    info["torch"] = torch.__version__
    return info


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    info = dict(
        host=platform.node(),
        platform=platform.platform(),
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
    )
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


# ---------------------------------------------------------------- one run


def _windows(split: torch.Tensor, block: int, count: int | None) -> torch.Tensor:
    """Start offsets of evaluation windows of ``block + 1`` bytes: every non-overlapping window of the
    split (``count=None``), or ``count`` of them spread evenly over it."""
    last = split.numel() - block - 1
    if last < 0:
        raise ValueError(f"a split of {split.numel()} bytes is shorter than one window of {block + 1}")
    every = torch.arange(0, last + 1, block)
    if count is None or count >= len(every):
        return every
    return every[torch.linspace(0, len(every) - 1, count).round().long()]


@torch.no_grad()
def evaluate(model, split: torch.Tensor, starts: torch.Tensor, block: int, batch: int, autocast) -> float:
    """Mean next-byte cross-entropy over the windows at ``starts`` (nats per byte)."""
    was_training = model.training
    model.eval()
    offsets = torch.arange(block + 1, device=split.device)
    starts = starts.to(split.device)
    total = torch.zeros((), dtype=torch.float64, device=split.device)
    count = 0
    for i in range(0, len(starts), batch):
        s = starts[i : i + batch]
        w = split[s[:, None] + offsets].long()
        with autocast():
            _, loss = model(w[:, :-1], w[:, 1:])
        total += loss.double() * len(s)
        count += len(s)
    model.train(was_training)
    return float(total) / count


def _finite_or_none(x: float) -> float | None:
    """A loss as a record keeps it: ``None`` for NaN and infinities (JSON has neither)."""
    return x if math.isfinite(x) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@torch.no_grad()
def clip_each_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """Scale each gradient to a 2-norm of at most ``max_norm``, each tensor on its own: the clipping of
    ``fusedbun.step_in_backward(..., max_norm_per_param=max_norm)``, the same arithmetic, for the plain loop."""
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        p.grad.mul_(factor.to(p.grad.dtype))


class StepMemory:
    """The memory of one training step, measured while it runs: :meth:`begin` before the step,
    :meth:`after_backward` once ``loss.backward()`` has returned, :meth:`end` after the optimizer step,
    then :meth:`record`.

    The persistent part (parameters, gradients, optimizer state) is counted from the live tensors after
    ``loss.backward()``, where the plain loop's optimizer step begins: the parameters, the gradients that
    exist there (every one in the plain loop; none with the step inside backward, which freed each as it
    stepped it) and every tensor in ``optimizer.state`` (counted after the step, so that a state created at
    the first step is there too). Between two steps the plain loop holds no gradients either
    (``zero_grad(set_to_none=True)``): after backward is where the two loops differ. During backward
    gradients exist in both; ``grads_live_max_bytes`` is the largest total of ``.grad`` tensors alive at
    once, the incoming gradient included, seen by a hook on every parameter (a partial sum that autograd
    keeps before it writes ``.grad``, such as the first half of a tied weight's gradient, is not a
    ``.grad`` tensor and is not in it; the CUDA peak sees it).

    On CUDA, ``peak_step_bytes`` is ``torch.cuda.max_memory_allocated`` over the whole step (batch, forward,
    backward, clipping, optimizer step, ``zero_grad``), its statistics reset just before the step, so
    allocations of the first steps (the optimizer's state, compilation) count only as far as they stay
    alive. ``data_on_device_bytes`` is what the corpus splits take on the device (allocated before the
    model is built); ``transient_bytes`` is the peak less the data and the persistent part: activations
    saved for backward, gradients in flight, temporaries. On a CPU there is no allocator peak: those are
    ``None`` and ``peak_available`` is false.
    """

    POINT = "after loss.backward(), before the optimizer step"

    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device, data_bytes: int | None) -> None:
        self.params = list(model.parameters())  # each tensor once (a tied weight is one parameter)
        self.optimizer, self.device, self.data_bytes = optimizer, device, data_bytes
        self.cuda = device.type == "cuda"
        self._hooks: list = []
        self.grads_live_max = 0
        self.params_bytes = self.grads_bytes = self.state_bytes = None
        self.peak_before = self.allocated_before = self.peak = self.peak_reserved = None

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_before = torch.cuda.max_memory_allocated(self.device)
            self.allocated_before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._hooks = [p.register_hook(self._on_grad) for p in self.params if p.requires_grad]

    def _on_grad(self, grad: torch.Tensor) -> None:
        live = sum(_nbytes(p.grad) for p in self.params if p.grad is not None)
        self.grads_live_max = max(self.grads_live_max, live + _nbytes(grad))

    def after_backward(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.params_bytes = sum(_nbytes(p) for p in self.params)
        self.grads_bytes = sum(_nbytes(p.grad) for p in self.params if p.grad is not None)

    def end(self) -> None:
        self.state_bytes = optimizer_state_bytes(self.optimizer)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_reserved = torch.cuda.max_memory_reserved(self.device)

    def record(self, n_params: int, step: int) -> dict:
        persistent = self.params_bytes + self.grads_bytes + self.state_bytes
        less_data = self.peak - (self.data_bytes or 0) if self.peak is not None else None
        out = dict(step=step, point=self.POINT)
        for name, value in (
            ("params", self.params_bytes),
            ("grads", self.grads_bytes),
            ("state", self.state_bytes),
            ("persistent", persistent),
            ("grads_live_max", self.grads_live_max),
        ):
            out[f"{name}_bytes"] = value
            out[f"{name}_bytes_per_param"] = value / n_params
        out.update(
            peak_available=self.peak is not None,
            peak_step_bytes=self.peak,
            peak_step_reserved_bytes=self.peak_reserved,
            data_on_device_bytes=self.data_bytes,
            allocated_before_step_bytes=self.allocated_before,
            peak_step_less_data_bytes=less_data,
            transient_bytes=less_data - persistent if less_data is not None else None,
            note=None if self.peak is not None else "no allocator peak off CUDA: the tensor-byte accounting only",
        )
        return out


def train(cfg: RunConfig, *, log=print, command: str | None = None, final_state: dict | None = None) -> dict:
    """Train one model as ``cfg`` says; return its record (see the module docstring). ``command`` is the
    command line recorded with it (default: ``FUSEDBUN_LM_COMMAND``, set by ``sweep`` for its runs, else
    this process's own). A dict passed as ``final_state`` receives the trained parameters (name -> tensor,
    on the CPU), to compare two runs exactly."""
    started = time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    device = resolve_device(cfg.device)
    name, opt_overrides, _ = parse_variant(cfg.optimizer)
    spec = get_lm_optimizer(name)
    recipe = cfg.effective()
    size = get_size(cfg.size)
    B, T = size.batch_size, size.block_size
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "off")

    def autocast():
        if amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    corpus = load_corpus(cfg.data)
    train_split = corpus.train.to(device)
    val_split, test_split = corpus.val.to(device), corpus.test.to(device)
    data_bytes = None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)
        data_bytes = torch.cuda.memory_allocated(device)

    torch.manual_seed(cfg.seed)
    model = GPT(size).to(device)  # initialised in fp32, so every parameter dtype starts from the same weights
    if recipe["param_dtype"] != "fp32":
        model.to(PARAM_DTYPES[recipe["param_dtype"]])
    n_params = model.num_params()
    optimizer = build_optimizer(spec, model, cfg.lr, recipe["wd"], opt_overrides)
    base_lrs = group_lrs(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    in_backward = None
    if recipe["step_in_backward"]:
        if not isinstance(optimizer, fusedbun.FusionOptimizer):
            raise ValueError(f"{cfg.optimizer}: step_in_backward needs a FusionOptimizer, got {type(optimizer)}")
        in_backward = fusedbun.step_in_backward(optimizer, max_norm_per_param=recipe["clip_per_param"] or None)
    step_model = torch.compile(model) if cfg.compile else model
    memory_step = min(max(1, cfg.memory_step), cfg.steps)
    probe = StepMemory(model, optimizer, device, data_bytes)
    memory = None

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    window = torch.arange(T + 1, device=device)
    high = train_split.numel() - T - 1

    def batch():
        starts = torch.randint(0, high, (B,), device=device, generator=gen)
        w = train_split[starts[:, None] + window].long()
        return w[:, :-1], w[:, 1:]

    eval_starts = _windows(val_split, T, cfg.eval_batches * B)
    curve = []
    loss_sum = torch.zeros((), device=device)
    window_steps = 0
    first_loss = None
    train_time = eval_time = 0.0
    steady_time, steady_tokens = 0.0, 0
    diverged, reason = False, None
    tokens_per_step = B * T
    step = 0
    _sync(device)
    seg_start = time.perf_counter()
    first_eval_done = False
    model.train()
    for step in range(1, cfg.steps + 1):
        measured = step == memory_step
        if measured:
            probe.begin()
        set_lr(optimizer, base_lrs, lr_factor(step, cfg.steps, recipe["warmup_frac"], recipe["min_lr_ratio"]))
        x, y = batch()
        with autocast():
            _, loss = step_model(x, y)
        loss.backward()  # with the step inside backward, this steps every parameter too
        if measured:
            probe.after_backward()
        if in_backward is None:
            if recipe["clip"]:
                torch.nn.utils.clip_grad_norm_(params, recipe["clip"])
            elif recipe["clip_per_param"]:
                clip_each_grad_norm_(params, recipe["clip_per_param"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if measured:
            probe.end()
            memory = probe.record(n_params, step)
        loss_sum += loss.detach()
        window_steps += 1
        if step == 1:
            first_loss = loss.detach().clone()
        is_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if not (is_eval or step % cfg.log_every == 0):
            continue
        # a read point: the one host sync of the loop
        train_loss = float(loss_sum) / window_steps
        _sync(device)
        now = time.perf_counter()
        train_time += now - seg_start
        if first_eval_done:
            steady_time += now - seg_start
            steady_tokens += window_steps * tokens_per_step
        loss_sum.zero_()
        window_steps = 0
        limit = float(first_loss) + cfg.divergence_margin
        point = dict(
            step=step,
            tokens=step * tokens_per_step,
            train_time_s=round(train_time, 4),
            wall_s=round(now - started, 4),
            lr=group_lrs(optimizer)[0],
            train_loss=_finite_or_none(train_loss),
        )
        if not math.isfinite(train_loss) or train_loss > limit:
            diverged = True
            reason = f"train loss {train_loss:.4g} at step {step} (limit {limit:.4g}: first loss + margin)"
        elif is_eval:
            val = evaluate(step_model, val_split, eval_starts, T, B, autocast)
            point["val_loss"] = _finite_or_none(val)
            if not math.isfinite(val):
                diverged, reason = True, f"validation loss {val} at step {step}"
            first_eval_done = True
        _sync(device)
        seg_start = time.perf_counter()
        eval_time += seg_start - now
        curve.append(point)
        if point.get("val_loss") is not None:
            log(
                f"  step {step}/{cfg.steps}  train {train_loss:.4f}  val {point['val_loss']:.4f}  "
                f"lr {point['lr']:.3g}  {step * tokens_per_step / max(train_time, 1e-9):,.0f} tok/s"
            )
        if diverged:
            log(f"  diverged: {reason}")
            break

    if in_backward is not None:
        in_backward.remove()
    if final_state is not None:
        final_state.update({k: v.detach().cpu().clone() for k, v in model.named_parameters()})
    final_val = final_test = None
    if not diverged:
        final_val = evaluate(step_model, val_split, _windows(val_split, T, None), T, B, autocast)
        final_test = evaluate(step_model, test_split, _windows(test_split, T, None), T, B, autocast)
        if not (math.isfinite(final_val) and math.isfinite(final_test)):
            diverged, reason, final_val, final_test = True, "non-finite final loss", None, None
    sbytes = optimizer_state_bytes(optimizer)
    tokens = step * tokens_per_step
    vals = [p["val_loss"] for p in curve if p.get("val_loss") is not None]
    record = dict(
        key=run_key(cfg, corpus.manifest),
        optimizer=canonical_variant(cfg.optimizer),
        base=name,
        label=spec.label,
        library=spec.library,
        ablation=spec.ablation,
        options={k: str(v) for k, v in {**spec.options, **opt_overrides}.items()},
        param_dtype=recipe["param_dtype"],
        step_in_backward=recipe["step_in_backward"],
        clipping=cfg.clipping(),
        lr=canonical_lr(cfg.lr),
        seed=cfg.seed,
        phase=cfg.phase,
        status="diverged" if diverged else "ok",
        diverged=diverged,
        divergence=reason,
        steps=cfg.steps,
        steps_done=step,
        tokens=tokens,
        final_val_loss=final_val,
        final_test_loss=final_test,
        best_curve_val_loss=min(vals) if vals else None,
        first_loss=_finite_or_none(float(first_loss)) if first_loss is not None else None,
        curve=curve,
        train_time_s=train_time,
        eval_time_s=eval_time,
        wall_s=time.perf_counter() - started,
        **run_figures(size, tokens=tokens, train_time=train_time, steps=step),
        tokens_per_s_steady=steady_tokens / steady_time if steady_time > 0 else None,
        peak_gpu_memory_bytes=(
            max(int(torch.cuda.max_memory_allocated(device)), probe.peak_before or 0) if device.type == "cuda" else None
        ),
        peak_rss_bytes=_peak_rss_bytes(),
        memory=memory,
        state_bytes=sbytes,
        state_bytes_per_param=sbytes / n_params,
        n_params=n_params,
        model=dict(size=cfg.size, **size.as_dict()),
        recipe=recipe_record(
            recipe,
            cfg,
            tokens_per_step=tokens_per_step,
            amp=amp,
            eval_windows=len(eval_starts),
            schedule="linear warmup, then cosine to min_lr_ratio x peak",
            clipping=cfg.clipping(),
            compile=cfg.compile,
        ),
        config=dict(asdict(cfg), data=portable(cfg.data)),
        concurrent_runs=int(os.environ.get("FUSEDBUN_LM_CONCURRENT", "1")),
        data=data_info(corpus),
        **provenance(device, command),
        date=date,
    )
    return record


def data_info(corpus) -> dict:
    """What a record says about its corpus: where, which source, each split's sha256 and size."""
    return dict(
        path=portable(str(corpus.path)),
        source=corpus.manifest["source"],
        sha256={s: corpus.manifest["splits"][s]["sha256"] for s in ("train", "val", "test")},
        bytes={s: corpus.manifest["splits"][s]["bytes"] for s in ("train", "val", "test")},
    )


def run_figures(size, *, tokens: int, train_time: float, steps: int) -> dict:
    """A record's throughput fields: tokens/s and model TFLOP/s over the training wall-clock, ms per step."""
    timed = train_time > 0
    return dict(
        tokens_per_s=tokens / train_time if timed else None,
        ms_per_step=1e3 * train_time / steps if steps else None,
        model_tflops_per_s=flops_per_token(size) * tokens / train_time / 1e12 if timed else None,
    )


def recipe_record(
    recipe: dict, cfg, *, tokens_per_step: int, amp: str, eval_windows: int, schedule: str, **extra
) -> dict:
    """A record's ``recipe``: the recipe's constants and how this run applied them (``extra``: fields only
    some training loops record, such as ``clipping``, and ``compile``)."""
    return dict(
        **recipe,
        steps=cfg.steps,
        tokens_per_step=tokens_per_step,
        warmup_steps=max(1, round(recipe["warmup_frac"] * cfg.steps)),
        schedule=schedule,
        amp=amp,
        **extra,
        eval_every=cfg.eval_every,
        eval_windows=eval_windows,
        final_eval="every non-overlapping window of the val and test splits",
    )


def portable(text: str) -> str:
    """``text`` (a command line or a path) without this machine's paths: paths inside the repository
    relative to it, other absolute paths reduced to their file names."""
    root = str(Path(__file__).resolve().parents[1])

    def one(token: str) -> str:
        if token.startswith(root + "/"):
            return token[len(root) + 1 :]
        return Path(token).name if token.startswith("/") else token

    return shlex.join(one(t) for t in shlex.split(text))


def provenance(device: torch.device, command: str | None = None) -> dict:
    """The machine, library versions, commit and command line that a record carries."""
    return dict(
        machine=machine(device),
        versions=versions(),
        commit=commit(),
        command=portable(command or os.environ.get("FUSEDBUN_LM_COMMAND") or shlex.join(["python", *sys.argv])),
    )


def run_key(cfg: RunConfig, manifest: dict) -> str:
    """What makes two runs the same run: the variant, lr, seed, model, steps, recipe, data, precision. The
    run options (:data:`RUN_OPTIONS`) enter only where they differ from their defaults, so that runs recorded
    before they existed keep their keys."""
    eff = cfg.effective()
    parts = dict(
        optimizer=canonical_variant(cfg.optimizer),
        lr=canonical_lr(cfg.lr),
        seed=cfg.seed,
        size=cfg.size,
        steps=cfg.steps,
        **{k: eff[k] for k in TRAIN_KEYS},
        **{k: eff[k] for k, default in RUN_OPTIONS.items() if eff[k] != default},
        data=manifest["splits"]["train"]["sha256"][:16],
        amp=cfg.amp,
        compile=cfg.compile,
    )
    return json.dumps(parts, sort_keys=True)


# ---------------------------------------------------------------- results files


def read_lines(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Every JSON line of the files ``paths`` (missing files are empty; a torn last line, left by a process
    stopped while writing, is ignored)."""
    runs = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return runs


def read_runs(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The run records of the JSON-lines files ``paths``."""
    return [r for r in read_lines(paths) if r.get("kind", "run") == "run"]


def read_not_run(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """The optimizers a sweep could not run, and why (the latest word for each)."""
    return {r["optimizer"]: r["reason"] for r in read_lines(paths) if r.get("kind") == "not_run"}


def append_run(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, allow_nan=False, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- the sweep


@dataclass
class Arm:
    """One optimizer variant of a sweep and its grid. An arm that ``follow``s another variant is centred
    at that variant's best lr, and waits until it is known (an ablation around the configuration it
    changes)."""

    variant: str
    centre: float | None
    points: int
    seeds: int
    max_extend: int
    follow: str | None = None

    def initial_grid(self) -> list[float]:
        return [canonical_lr(x) for x in lr_grid(self.centre, self.points)]


@dataclass
class Job:
    cfg: RunConfig
    key: str = ""
    arm: int = 0
    started: float = 0.0
    proc: subprocess.Popen | None = None
    record_path: Path | None = None
    log_path: Path | None = None
    log_file: object = None
    extra: dict = field(default_factory=dict)


def _loss_for_ranking(run: dict) -> float:
    v = run.get("final_val_loss")
    return v if (v is not None and run.get("status") == "ok") else math.inf


def arm_state(arm: Arm, base: RunConfig, runs: dict[str, dict], in_flight: set[str], manifest: dict) -> dict:
    """Where an arm stands: its grid so far, the best lr among its finished grid runs, whether the grid is
    settled, and the jobs it needs next as ``(lr, seed, phase)`` (none while it waits on a running one).

    The grid is the initial one plus the extensions already recorded or running, each a factor 2 past the
    last; a new extension is asked for only once every run of the grid has finished."""

    def key(lr: float, seed: int) -> str:
        return run_key(replace(base, optimizer=arm.variant, lr=lr, seed=seed), manifest)

    def known(lr: float) -> bool:
        k = key(lr, base.seed)
        return k in runs or k in in_flight

    initial = arm.initial_grid()
    low = [canonical_lr(min(initial) / 2**k) for k in range(1, arm.max_extend + 1)]
    high = [canonical_lr(max(initial) * 2**k) for k in range(1, arm.max_extend + 1)]
    grid = list(initial)
    for side in (low, high):
        for lr in side:
            if not known(lr):
                break
            grid.append(lr)
    grid.sort()
    n_low = sum(lr < min(initial) for lr in grid)
    n_high = sum(lr > max(initial) for lr in grid)

    def phase(lr: float) -> str:
        return "grid" if lr in initial else "extension"

    state = dict(grid=grid, best=None, at_edge=None, settled=False, needs=[])
    pending = [lr for lr in grid if key(lr, base.seed) not in runs]
    if pending:
        state["needs"] = [(lr, base.seed, phase(lr)) for lr in pending if key(lr, base.seed) not in in_flight]
        return state
    losses = {lr: _loss_for_ranking(runs[key(lr, base.seed)]) for lr in grid}
    best = min(grid, key=lambda lr: (losses[lr], lr))
    all_failed = math.isinf(losses[best])
    if (all_failed or best == grid[0]) and n_low < arm.max_extend:
        state["needs"] = [(low[n_low], base.seed, "extension")]
        return state
    if not all_failed and best == grid[-1] and n_high < arm.max_extend:
        state["needs"] = [(high[n_high], base.seed, "extension")]
        return state
    state.update(settled=True, best=None if all_failed else best)
    state["at_edge"] = all_failed or len(grid) < 3 or best in (grid[0], grid[-1])
    if not all_failed:
        seeds = [base.seed + i for i in range(1, arm.seeds)]
        state["needs"] = [
            (best, s, "seed") for s in seeds if key(best, s) not in runs and key(best, s) not in in_flight
        ]
    return state


def _best_lr_from(runs: list[dict], variant: str, size: str | None = None) -> float | None:
    """The lr of ``variant``'s best finished seed-0 run among ``runs`` (speed runs left out)."""
    grid = [
        r
        for r in runs
        if r["optimizer"] == canonical_variant(variant)
        and r["seed"] == 0
        and r.get("phase") != "speed"
        and (size is None or r.get("config", {}).get("size") == size)
    ]
    ok = [r for r in grid if r["status"] == "ok" and r["final_val_loss"] is not None]
    return min(ok, key=lambda r: r["final_val_loss"])["lr"] if ok else None


def _worker_command(cfg: RunConfig, record: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.lm",
        "train",
        "--config-json",
        json.dumps(asdict(cfg)),
        "--record",
        str(record),
    ]


def sweep(
    arms: Sequence[Arm],
    base: RunConfig,
    results: Path,
    *,
    parallel: int = 1,
    deadline_s: float | None = None,
    expect_job_s: float | None = None,
    retry_errors: bool = False,
    dry_run: bool = False,
    phase: str | None = None,
    command: str | None = None,
    log=print,
) -> list[dict]:
    """Run the protocol over ``arms`` (see the module docstring); return the records it added.

    ``parallel`` runs that many jobs at once as subprocesses (0: one at a time in this process). With
    ``deadline_s``, no job starts unless the typical duration of a finished job (or ``expect_job_s``
    before any has finished) fits before the deadline, and jobs still running at the deadline are stopped
    and not recorded. ``phase`` names the runs' phase instead of grid/extension/seed (``"speed"``).
    """
    t0 = time.perf_counter()
    manifest = load_corpus(base.data, verify=False).manifest
    recorded = {}
    for r in read_runs([results]):
        if r.get("key") and (retry_errors is False or r.get("status") != "error"):
            recorded[r["key"]] = r
    added: list[dict] = []
    running: dict[str, Job] = {}
    durations: list[float] = []
    logs_dir = results.with_name(results.stem + "_logs")
    done_count = 0

    def resolved_arms(in_flight: set[str]) -> list[Arm | None]:
        """The arms with their centres; a following arm is ``None`` while its anchor's best is unknown."""
        states = {}
        for arm in arms:
            if arm.follow is None:
                states[arm.variant] = arm_state(arm, base, recorded, in_flight, manifest)
        out = []
        for arm in arms:
            if arm.follow is None:
                out.append(arm)
                continue
            anchor = canonical_variant(arm.follow)
            if anchor in states:
                best = states[anchor]["best"] if states[anchor]["settled"] else None
            else:
                best = _best_lr_from(list(recorded.values()), anchor, base.size)
            out.append(replace(arm, centre=best) if best else None)
        return out

    if dry_run:
        jobs = []
        for arm, live in zip(arms, resolved_arms(set())):
            if live is None:
                log(f"waits: {arm.variant} (centred at the best lr of {arm.follow}, not known yet)")
                continue
            st = arm_state(live, base, recorded, set(), manifest)
            jobs += [(arm.variant, lr, seed, phase) for lr, seed, phase in st["needs"]]
        for variant, lr, seed, phase in jobs:
            log(f"would run: {variant} lr={lr:.3g} seed={seed} ({phase})")
        log(f"{len(jobs)} job(s) ready now; extensions, seeds and ablations follow from their results")
        return []

    def estimate() -> float | None:
        return statistics.median(durations) if durations else expect_job_s

    def finish(job: Job, record: dict) -> None:
        nonlocal done_count
        append_run(results, record)
        recorded[job.key] = record
        added.append(record)
        done_count += 1
        val = record.get("final_val_loss")
        tps = record.get("tokens_per_s")
        elapsed = time.perf_counter() - t0
        log(
            f"[{done_count} done, {len(running)} running, {elapsed:,.0f}s] {record['optimizer']} "
            f"lr={record['lr']:.3g} seed={record['seed']} {record.get('phase')}: "
            + (f"val {val:.4f}" if val is not None else record["status"])
            + (f", {tps:,.0f} tok/s" if tps else "")
            + f", {record.get('wall_s', 0):.0f}s"
        )

    def next_jobs() -> list[Job]:
        in_flight = set(running)
        ready = []
        for i, arm in enumerate(resolved_arms(in_flight)):
            if arm is None:
                continue
            st = arm_state(arm, base, recorded, in_flight, manifest)
            for lr, seed, job_phase in st["needs"]:
                cfg = replace(base, optimizer=arm.variant, lr=lr, seed=seed, phase=phase or job_phase)
                ready.append(Job(cfg=cfg, key=run_key(cfg, manifest), arm=i))
        order = {"grid": 0, "extension": 1, "seed": 2}
        ready.sort(key=lambda j: (j.arm, order.get(j.cfg.phase, 0), j.cfg.lr, j.cfg.seed))
        return ready

    def time_left() -> float:
        return math.inf if deadline_s is None else deadline_s - (time.perf_counter() - t0)

    def may_start() -> bool:
        est = estimate()
        if deadline_s is None:
            return True
        if est is None:
            return time_left() > 0
        return time_left() > 1.1 * est

    def start(job: Job) -> None:
        job.started = time.perf_counter()
        log(
            f"start {job.cfg.optimizer} lr={job.cfg.lr:.3g} seed={job.cfg.seed} ({job.cfg.phase}); "
            f"{len(running) + 1} running"
        )
        if parallel == 0:
            record = train(job.cfg, log=lambda s: log("  " + s.strip()), command=command)
            durations.append(time.perf_counter() - job.started)
            finish(job, record)
            return
        logs_dir.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in job.cfg.optimizer)
        stem = f"{name}_lr{job.cfg.lr:.3g}_s{job.cfg.seed}"
        job.record_path = Path(tempfile.mkdtemp(prefix="lmrun_")) / "record.json"
        job.log_path = logs_dir / f"{stem}.log"
        job.log_file = open(job.log_path, "w")
        env = dict(os.environ, FUSEDBUN_LM_CONCURRENT=str(parallel))
        if command:
            env["FUSEDBUN_LM_COMMAND"] = command
        if resolve_device(base.device).type == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
        job.proc = subprocess.Popen(
            _worker_command(job.cfg, job.record_path),
            stdout=job.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        running[job.key] = job

    def reap() -> None:
        for key, job in list(running.items()):
            rc = job.proc.poll()
            if rc is None:
                continue
            del running[key]
            job.log_file.close()
            durations.append(time.perf_counter() - job.started)
            if rc == 0 and job.record_path.exists():
                record = json.loads(job.record_path.read_text())
            else:
                tail = job.log_path.read_text().splitlines()[-15:] if job.log_path.exists() else []
                record = dict(
                    key=job.key,
                    optimizer=canonical_variant(job.cfg.optimizer),
                    base=parse_variant(job.cfg.optimizer)[0],
                    lr=canonical_lr(job.cfg.lr),
                    seed=job.cfg.seed,
                    phase=job.cfg.phase,
                    status="error",
                    diverged=False,
                    final_val_loss=None,
                    error=f"exit code {rc}",
                    log_tail=tail,
                    config=asdict(job.cfg),
                    wall_s=time.perf_counter() - job.started,
                )
            with contextlib.suppress(OSError):
                job.record_path.unlink()
                job.record_path.parent.rmdir()
            finish(job, record)

    stopped_at_deadline = False
    while True:
        reap()
        ready = [] if stopped_at_deadline else next_jobs()
        while ready and len(running) < max(1, parallel) and may_start():
            start(ready.pop(0))
            if parallel == 0:
                ready = next_jobs()
        if not running and (not ready or not may_start()):
            if ready:
                log(
                    f"deadline: {len(ready)} ready run(s) not started "
                    f"({time_left():.0f}s left, a run takes ~{estimate():.0f}s)"
                )
            break
        if time_left() <= 0 and running:
            log(f"deadline reached: stopping {len(running)} run(s) in flight (not recorded)")
            for job in running.values():
                job.proc.terminate()
            for job in running.values():
                try:
                    job.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
                job.log_file.close()
            running.clear()
            stopped_at_deadline = True
            break
        time.sleep(0.2)
    total = time.perf_counter() - t0
    waiting = [a.variant for a, live in zip(arms, resolved_arms(set())) if live is None]
    if waiting:
        log(f"not started, their anchor's best lr unknown: {', '.join(waiting)}")
    log(f"sweep: {len(added)} run(s) added to {results} in {total:,.0f}s")
    return added


# ---------------------------------------------------------------- summary


def _spread(values: list[float]) -> dict:
    if not values:
        return dict(mean=None, std=None, n=0, values=[])
    return dict(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        n=len(values),
        values=values,
    )


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _size_steps(run: dict) -> tuple:
    cfg = run.get("config", {})
    return cfg.get("size"), cfg.get("steps")


def summarize(
    runs: Sequence[dict],
    *,
    reference: str = "adamw",
    anchor: str = "fusion_rms",
    size: str | None = None,
    steps: int | None = None,
) -> dict:
    """One row per optimizer variant: the lr grid (seed 0), the best lr and whether the grid brackets it,
    the final validation and test loss over the seeds at that lr, the ratio to ``reference``, speed,
    memory, state, and the validation curves at the best lr.

    Only runs of one model ``size`` and one number of ``steps`` are compared (by default the most common
    pair among the runs that are not speed runs); speed runs (``phase == "speed"``) of that size give
    ``tokens_per_s_alone`` and are left out of everything else."""
    main_runs = [r for r in runs if r.get("phase") != "speed"]
    pairs = [_size_steps(r) for r in main_runs]
    if pairs and (size is None or steps is None):
        common = max(set(pairs), key=pairs.count)
        size = size or common[0]
        steps = steps or common[1]
    runs = [r for r in runs if _size_steps(r)[0] == size and (r.get("phase") == "speed" or _size_steps(r)[1] == steps)]
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["optimizer"], []).append(r)
    registry_order = list(LM_OPTIMIZERS)

    def order(v):
        base = v.split(":")[0]
        return (registry_order.index(base) if base in registry_order else 99, v)

    rows = []
    for variant in sorted(by_variant, key=order):
        rs = [r for r in by_variant[variant] if r.get("phase") != "speed"]
        grid = sorted((r for r in rs if r["seed"] == min(x["seed"] for x in rs)), key=lambda r: r["lr"])
        if not grid:
            continue
        ok_grid = [r for r in grid if r["status"] == "ok" and r.get("final_val_loss") is not None]
        best = min(ok_grid, key=lambda r: (r["final_val_loss"], r["lr"]))["lr"] if ok_grid else None
        lrs = [r["lr"] for r in grid]
        inside = best is not None and len(lrs) >= 3 and min(lrs) < best < max(lrs)
        at_best = [r for r in rs if best is not None and r["lr"] == best]
        ok = [r for r in at_best if r["status"] == "ok" and r.get("final_val_loss") is not None]
        ok.sort(key=lambda r: r["seed"])
        first = rs[0]
        speed = [r for r in by_variant[variant] if r.get("phase") == "speed" and r["status"] == "ok"]
        row = dict(
            optimizer=variant,
            base=first.get("base"),
            label=first.get("label"),
            library=first.get("library"),
            ablation=first.get("ablation", False),
            options=first.get("options"),
            param_dtype=first.get("param_dtype", "fp32"),
            step_in_backward=first.get("step_in_backward", False),
            clipping=first.get("clipping") or _old_clipping(first),
            grid=[
                dict(lr=r["lr"], status=r["status"], final_val_loss=r.get("final_val_loss"), phase=r.get("phase"))
                for r in grid
            ],
            best_lr=best,
            best_lr_inside_grid=inside,
            best_lr_note=(
                None
                if inside
                else (
                    "every run of the grid diverged or failed"
                    if best is None
                    else f"one learning rate only ({best:.3g}): no grid"
                    if len(lrs) == 1
                    else f"the best lr {best:.3g} is at the edge of the grid tried ({min(lrs):.3g} to {max(lrs):.3g})"
                )
            ),
            val=_spread([r["final_val_loss"] for r in ok]),
            test=_spread([r["final_test_loss"] for r in ok]),
            seeds=[r["seed"] for r in ok],
            failed_runs_at_best=len(at_best) - len(ok),
            errors=sorted({r.get("error", "") for r in rs if r["status"] == "error"}),
            tokens_per_s=_median([r.get("tokens_per_s_steady") or r.get("tokens_per_s") for r in ok]),
            tokens_per_s_alone=_median([r.get("tokens_per_s_steady") or r.get("tokens_per_s") for r in speed]),
            ms_per_step=_median([r.get("ms_per_step") for r in ok]),
            concurrent_runs=_median([r.get("concurrent_runs") for r in ok]),
            peak_gpu_memory_bytes=_median([r.get("peak_gpu_memory_bytes") for r in ok + speed]),
            state_bytes=_median([r.get("state_bytes") for r in ok or grid]),
            state_bytes_per_param=_median([r.get("state_bytes_per_param") for r in ok or grid]),
            memory=_memory_of([r for r in ok + speed if r.get("memory")] or [r for r in rs if r.get("memory")]),
            n_params=first.get("n_params"),
            tokens=_median([r.get("tokens") for r in ok]),
            curves=[
                dict(
                    seed=r["seed"],
                    tokens=[p["tokens"] for p in r["curve"] if p.get("val_loss") is not None],
                    train_time_s=[p["train_time_s"] for p in r["curve"] if p.get("val_loss") is not None],
                    val_loss=[p["val_loss"] for p in r["curve"] if p.get("val_loss") is not None],
                    train_tokens=[p["tokens"] for p in r["curve"]],
                    train_loss=[p["train_loss"] for p in r["curve"]],
                )
                for r in ok
            ],
        )
        rows.append(row)
    ref = next((r for r in rows if r["optimizer"] == reference), None)
    anc = next((r for r in rows if r["optimizer"] == anchor), None)
    for row in rows:
        m = row["val"]["mean"]
        row["ratio_to_" + reference] = m / ref["val"]["mean"] if (m and ref and ref["val"]["mean"]) else None
        row["delta_to_" + anchor] = m - anc["val"]["mean"] if (m and anc and anc["val"]["mean"]) else None
        # the same seed means the same initialisation and batches: differences seed by seed are less noisy
        common = sorted(set(row["seeds"]) & set(anc["seeds"])) if anc else []
        mine = dict(zip(row["seeds"], row["val"]["values"]))
        theirs = dict(zip(anc["seeds"], anc["val"]["values"])) if anc else {}
        row["paired_delta_to_" + anchor] = _spread([mine[s] - theirs[s] for s in common]) if common else None

    def distinct(key):
        seen = []
        for r in runs:
            v = r.get(key)
            if v is not None and v not in seen:
                seen.append(v)
        return seen

    return dict(
        reference=reference,
        anchor=anchor,
        rows=rows,
        memory=memory_table(rows, reference, size=size, tokens=_median([r["tokens"] for r in rows if r["tokens"]])),
        runs=len(runs),
        machines=distinct("machine"),
        versions=distinct("versions"),
        commits=distinct("commit"),
        commands=sorted({r["command"] for r in runs if r.get("command")}),
        data=distinct("data")[:1],
        recipe=distinct("recipe"),
        model=distinct("model"),
        size=size,
        steps=steps,
    )


def _old_clipping(run: dict) -> str | None:
    """The clipping of a run recorded before records said it in words (the global norm, or none)."""
    clip = (run.get("recipe") or {}).get("clip")
    return None if clip is None else (f"global norm {clip:g}" if clip else "none")


MEMORY_FIELDS = (
    "params_bytes_per_param",
    "grads_bytes_per_param",
    "state_bytes_per_param",
    "persistent_bytes_per_param",
    "grads_live_max_bytes_per_param",
    "peak_step_bytes",
    "peak_step_less_data_bytes",
    "peak_step_reserved_bytes",
    "transient_bytes",
    "data_on_device_bytes",
)

MEMORY_TARGET = dict(persistent_bytes_per_param=4.1, loss_ratio=1.015, seeds=3)
"""The memory target: at most 4.1 persistent bytes per parameter (bf16 parameters and momentum, the O(n+m)
accumulators, no gradients kept), with a final validation loss within 1.5% of the reference's (AdamW fp32),
each the mean of 3 seeds at its best lr, on the GPU benchmark (``--size gpu``)."""


def _memory_of(runs: list[dict]) -> dict | None:
    """The median of each memory field over ``runs`` (the accounting is the same in every run of a
    configuration; the peak may differ by an allocator block), or ``None`` when none measured it."""
    if not runs:
        return None
    out = {k: _median([r["memory"].get(k) for r in runs]) for k in MEMORY_FIELDS}
    out.update(runs=len(runs), step=runs[0]["memory"].get("step"), point=runs[0]["memory"].get("point"))
    return out


def memory_table(rows: list[dict], reference: str, *, size: str | None = None, tokens: float | None = None) -> dict:
    """The memory table: for each row with a memory record, the persistent bytes per parameter split into
    parameters, gradients and optimizer state, the largest gradient bytes alive during backward, the peak
    of a training step and its transient part (CUDA), the final validation loss and its ratio to
    ``reference``'s, and the judgement of :data:`MEMORY_TARGET` ("yes", "no" or "not known", with the
    reasons it is provisional: fewer seeds than the target asks, a best lr at the edge of its grid, another
    model size than the GPU benchmark's)."""
    t = MEMORY_TARGET

    def own_caveats(r: dict) -> list[str]:
        out = []
        if r["val"]["n"] and r["val"]["n"] < t["seeds"]:
            out.append(f"{r['val']['n']} seed(s) of {t['seeds']}")
        if r["best_lr"] is not None and not r["best_lr_inside_grid"]:
            out.append("best lr at the edge of its grid")
        return out

    ref = next((r for r in rows if r["optimizer"] == reference), None)
    shared = [f"{reference}: {c}" for c in own_caveats(ref)] if ref else []
    if size is not None and size != "gpu":
        shared.append(f"model size {size}, not the GPU benchmark's")
    out_rows = []
    for r in rows:
        mem = r.get("memory")
        if not mem:
            continue
        ratio = r.get("ratio_to_" + reference)
        persistent = mem["persistent_bytes_per_param"]
        memory_ok = None if persistent is None else persistent <= t["persistent_bytes_per_param"]
        loss_ok = None if ratio is None else ratio <= t["loss_ratio"]
        if memory_ok is False or loss_ok is False:
            verdict = "no"
        elif memory_ok and loss_ok:
            verdict = "yes"
        else:
            verdict = "not known"
        caveats = own_caveats(r) if r is not ref else []
        if loss_ok is None:
            caveats.insert(0, "no validation loss" if r["val"]["mean"] is None else f"no {reference} loss to compare")
        out_rows.append(
            dict(
                optimizer=r["optimizer"],
                label=r["label"],
                param_dtype=r.get("param_dtype"),
                step_in_backward=r.get("step_in_backward"),
                clipping=r.get("clipping"),
                **{k: mem[k] for k in MEMORY_FIELDS},
                measured_runs=mem["runs"],
                best_lr=r["best_lr"],
                val=r["val"],
                **{"ratio_to_" + reference: ratio},
                memory_target_met=memory_ok,
                loss_target_met=loss_ok,
                target_met=verdict,
                provisional=caveats + shared,
                provisional_own=caveats,
            )
        )
    return dict(
        reference=reference,
        target=dict(t, reference=reference),
        size=size,
        tokens=tokens,
        point=StepMemory.POINT,
        provisional=shared,
        rows=out_rows,
        met=[r["optimizer"] for r in out_rows if r["target_met"] == "yes"],
        not_met=[r["optimizer"] for r in out_rows if r["target_met"] == "no"],
        not_known=[r["optimizer"] for r in out_rows if r["target_met"] == "not known"],
    )


def _bpp(x) -> str:
    return f"{x:.2f}" if x is not None else "-"


def format_memory_table(summary: dict) -> str:
    """The memory table (:func:`memory_table`) as plain text, with the target's judgement under it."""
    mem = summary.get("memory") or {}
    if not mem.get("rows"):
        return ""
    ref, t = mem["reference"], mem["target"]
    tokens = f", {mem['tokens']:,.0f} tokens" if mem.get("tokens") else ""
    lines = [
        f"memory (bytes per parameter; size {mem.get('size')}{tokens}; persistent counted {mem['point']})",
    ]
    head = (
        f"{'optimizer':<24} {'dtype':>5} {'in bwd':>6} {'clipping':>16} {'params':>6} {'grads':>6} {'state':>6} "
        f"{'persist':>7} {'grad pk':>7} {'peak MiB':>9} {'trans MiB':>9} {'final val loss':>22} {'x ' + ref:>8} "
        f"{'target':>9}"
    )
    lines += [head, "-" * len(head)]
    for r in mem["rows"]:
        v = r["val"]
        val = f"{v['mean']:.4f} ± {v['std']:.4f} ({v['n']})" if v["mean"] is not None else "-"
        ratio = r.get("ratio_to_" + ref)
        lines.append(
            f"{r['optimizer'][:24]:<24} {r['param_dtype'] or '-':>5} {'yes' if r['step_in_backward'] else 'no':>6} "
            f"{(r['clipping'] or '-')[:16]:>16} {_bpp(r['params_bytes_per_param']):>6} "
            f"{_bpp(r['grads_bytes_per_param']):>6} {_bpp(r['state_bytes_per_param']):>6} "
            f"{_bpp(r['persistent_bytes_per_param']):>7} {_bpp(r['grads_live_max_bytes_per_param']):>7} "
            f"{_mib(r['peak_step_less_data_bytes']):>9} {_mib(r['transient_bytes']):>9} {val:>22} "
            f"{(f'{ratio:.3f}' if ratio else '-'):>8} {r['target_met']:>9}"
        )
    words = (
        f"persistent <= {t['persistent_bytes_per_param']:g} B/param and final val loss within "
        f"{100 * (t['loss_ratio'] - 1):g}% of {ref}'s (mean of {t['seeds']} seeds, each at its best lr)"
    )
    notes = [
        "- params, grads, state, persist: bytes per parameter of the parameters, of the gradients that exist after "
        "backward (none when each parameter is stepped inside backward), of the optimizer's state, and their sum",
        "- grad pk: the largest bytes of gradients alive at once during backward, per parameter",
        "- peak MiB: torch.cuda.max_memory_allocated over one training step after warm-up, less the corpus on the "
        "device; trans MiB: that peak less the persistent part (activations, gradients in flight, temporaries); "
        "'-' where not measured on CUDA",
        f"- {words}: "
        + "; ".join(
            f"{label}: {', '.join(names)}"
            for label, names in (("yes", mem["met"]), ("no", mem["not_met"]), ("not known", mem["not_known"]))
            if names
        ),
    ]
    if mem["provisional"]:
        notes.append(f"- every judgement is provisional: {'; '.join(mem['provisional'])}")
    notes += [
        f"- {r['optimizer']}: provisional ({'; '.join(r['provisional_own'])})"
        for r in mem["rows"]
        if r["provisional_own"]
    ]
    return "\n".join(lines + [""] + notes)


def _mib(x):
    return f"{x / 2**20:,.0f}" if x else "-"


def format_table(summary: dict) -> str:
    """The summary as a plain-text table, with notes on what it cannot show in its cells."""
    ref, anchor = summary["reference"], summary["anchor"]
    head = (
        f"{'optimizer':<36} {'best lr':>8} {'grid':>6} {'final val loss':>22} {'x ' + ref:>8} "
        f"{'vs ' + anchor + ' (paired)':>24} {'tok/s':>11} {'peak MiB':>9} {'state B/p':>9}"
    )
    lines = [head, "-" * len(head)]
    shared = False
    for r in summary["rows"]:
        v = r["val"]
        val = f"{v['mean']:.4f} ± {v['std']:.4f} ({v['n']})" if v["mean"] is not None else "-"
        ratio = r.get("ratio_to_" + ref)
        paired = r.get("paired_delta_to_" + anchor)
        if paired and paired["n"] and r["optimizer"] != anchor:
            delta = f"{paired['mean']:+.4f} ± {paired['std']:.4f} ({paired['n']})"
        else:
            delta = "-"
        grid = "inside" if r["best_lr_inside_grid"] else "EDGE"
        lr = f"{r['best_lr']:.3g}" if r["best_lr"] else "-"
        if r["tokens_per_s_alone"]:
            tps = f"{r['tokens_per_s_alone']:,.0f}"
        elif r["tokens_per_s"]:
            tps, shared = f"{r['tokens_per_s']:,.0f}*", True
        else:
            tps = "-"
        bpp = f"{r['state_bytes_per_param']:.2f}" if r["state_bytes_per_param"] is not None else "-"
        lines.append(
            f"{r['optimizer'][:36]:<36} {lr:>8} {grid:>6} {val:>22} {(f'{ratio:.3f}' if ratio else '-'):>8} "
            f"{delta:>24} {tps:>11} {_mib(r['peak_gpu_memory_bytes']):>9} {bpp:>9}"
        )
    notes = [f"- {r['optimizer']}: {r['best_lr_note']}" for r in summary["rows"] if r["best_lr_note"]]
    notes += [f"- {r['optimizer']}: errors: {'; '.join(r['errors'])}" for r in summary["rows"] if r["errors"]]
    if summary.get("not_run"):
        notes += [f"- {k}: not run ({v})" for k, v in summary["not_run"].items()]
    if shared:
        conc = max((r["concurrent_runs"] or 1) for r in summary["rows"])
        notes.append(f"- * tok/s measured with up to {conc:g} runs sharing the device (no run alone recorded)")
    notes.append(
        f"- paired: the final val loss minus {anchor}'s at its best lr, seed by seed (same initialisation and batches)"
    )
    return "\n".join(lines + [""] + notes)


# ---------------------------------------------------------------- command line


def _add_run_args(p: argparse.ArgumentParser) -> None:
    d = RunConfig(optimizer="adamw", lr=0.0)
    p.add_argument("--size", default=d.size, help="model size (benchmarks.gpt.SIZES): tiny, cpu, gpu, gpu_large")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--data", default=d.data, help="a corpus built by benchmarks.corpus (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--wd", type=float, default=d.wd, help="weight decay on tensors of 2+ dims")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping (0: none)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches of the periodic validation")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between reads of the loss")
    p.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--divergence-margin", type=float, default=d.divergence_margin)
    p.add_argument(
        "--memory-step",
        type=int,
        default=d.memory_step,
        help="the step whose memory is measured, after warm-up (the last one of a shorter run)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_variant_args(p: argparse.ArgumentParser) -> None:
    """The run options that become part of each variant's name (:func:`with_run_options`)."""
    p.add_argument(
        "--param-dtype",
        choices=list(PARAM_DTYPES),
        default=None,
        help="the parameters' dtype (default: the variant's own, fp32 but for the *bf16* entries); bf16 casts the "
        "model before the optimizer is built, autocast still runs the matmuls in bf16 and its fp32 ops in fp32",
    )
    p.add_argument(
        "--step-in-backward",
        action="store_true",
        help="step each parameter inside loss.backward() (fusedbun.step_in_backward; FusionOptimizer only), each "
        f"gradient clipped to norm {STEP_IN_BACKWARD_CLIP:g} on its own in place of the global clip",
    )


def _base_config(args, optimizer="adamw", lr=0.0, seed=0) -> RunConfig:
    return RunConfig(
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        size=args.size,
        steps=args.steps,
        data=str(args.data),
        device=args.device,
        wd=args.wd,
        warmup_frac=args.warmup_frac,
        min_lr_ratio=args.min_lr_ratio,
        clip=args.clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        log_every=args.log_every,
        amp=args.amp,
        compile=args.compile,
        divergence_margin=args.divergence_margin,
        memory_step=args.memory_step,
    )


DEFAULT_ORDER = [
    "adamw",
    "fusion_rms",
    "fusion_rms_bf16m",
    "adafactor",
    "adamw8bit_bnb",
    "adamw8bit_ao",
    "adamw4bit_ao",
    "lion",
    "muon",
    "sm3",
    "fusion_defaults",
    "fusion_nomom",
]


PLANS: dict[str, list[tuple[str, float, int]]] = {
    # The whole run's memory: each configuration's persistent bytes per parameter, the peak of a training
    # step and the validation loss at the same tokens. (variant, lr grid centre, grid points): the centres
    # are the best lrs of the GPU benchmark where one is known (AdamW 1e-3, fusion_rms 4e-3, FusionOptimizer
    # with bf16 momentum 2e-3, taken for the bf16 configurations), else the registry's centre; three points
    # a factor 2 apart, extended at an edge as usual. The reference and the target come first.
    "memory": [
        ("adamw", 1e-3, 3),  # AdamW, fp32 parameters, bf16 autocast: the reference
        ("fusion_bf16_sr_sib", 2e-3, 3),  # bf16 parameters, stochastic rounding, bf16 momentum, step in backward
        ("fusion_bf16_sr", 2e-3, 3),  # the same with the plain loop
        ("adamw_bf16", 1e-3, 3),  # torch's fused AdamW on bf16 parameters
        ("fusion_rms", 4e-3, 3),  # FusionOptimizer, fp32
        ("fusion_nomom", 2e-3, 3),  # momentum_beta=0: the O(n+m) state alone
        ("adamw8bit_bnb", 1e-3, 3),
        ("adamw4bit_ao", 1e-3, 3),
        ("adafactor", 1e-2, 3),
    ],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one training run")
    t.add_argument("--optimizer", default="fusion_rms", help="a registry name, optionally :key=value,...")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the entry's centre)")
    t.add_argument("--seed", type=int, default=0)
    _add_run_args(t)
    _add_variant_args(t)
    t.add_argument("--record", type=Path, default=None, help="write the record (JSON) here")
    t.add_argument("--results", type=Path, default=None, help="append the record to this JSON-lines file")
    t.add_argument("--config-json", default=None, help=argparse.SUPPRESS)

    s = sub.add_parser("sweep", help="lr grid, extension at the edges, then seeds, for each optimizer")
    s.add_argument("--optimizers", nargs="+", default=None, help="variants, in priority order")
    s.add_argument(
        "--plan",
        choices=list(PLANS),
        default=None,
        help="a named list of variants with their grid centres and points, instead of --optimizers "
        "(memory: the whole run's memory of AdamW, its 8-bit and 4-bit and bf16 forms, Adafactor and FusionOptimizer "
        "in fp32, pure bf16 with and without the step in backward, and without momentum)",
    )
    s.add_argument("--points", type=int, default=5, help="lr grid points, a factor 2 apart (default 5)")
    s.add_argument("--seeds", type=int, default=3, help="seeds at the best lr, the grid's seed included")
    s.add_argument("--max-extend", type=int, default=2, help="extensions of the grid per edge")
    s.add_argument("--points-for", nargs="+", default=[], metavar="VARIANT=N", help="grid points for some variants")
    s.add_argument("--seeds-for", nargs="+", default=[], metavar="VARIANT=N", help="seeds at the best lr for some")
    s.add_argument("--lr-centre", type=float, default=None, help="grid centre for every optimizer listed")
    s.add_argument(
        "--ablations",
        nargs="+",
        default=[],
        metavar="VARIANT",
        help="variants run after --optimizers, centred at the best lr of what they change: BASE for BASE:key=value, "
        "--centre-from for the registry's ablation entries",
    )
    s.add_argument("--centre-from", default="fusion_rms", help="the anchor of the registry's ablation entries")
    s.add_argument("--ablation-points", type=int, default=3)
    s.add_argument("--ablation-seeds", type=int, default=1)
    s.add_argument("--parallel", type=int, default=1, help="concurrent runs (0: in this process)")
    s.add_argument("--deadline-s", type=float, default=None, help="start no run that would end after this")
    s.add_argument("--expect-job-s", type=float, default=None, help="a run's duration before one has finished")
    s.add_argument("--retry-errors", action="store_true", help="run again the runs recorded as errors")
    s.add_argument("--dry-run", action="store_true", help="list the runs that are ready, run nothing")
    s.add_argument("--results", type=Path, default=RESULTS_DIR / "lm_runs.jsonl")
    _add_run_args(s)
    _add_variant_args(s)

    v = sub.add_parser("speed", help="each optimizer alone on the device for a few steps: tokens/s and memory")
    v.add_argument("--optimizers", nargs="+", default=None)
    v.add_argument("--plan", choices=list(PLANS), default=None, help="the variants of a sweep plan")
    v.add_argument("--lr-from", type=Path, default=None, help="take each one's best lr from these runs")
    v.add_argument("--results", type=Path, default=RESULTS_DIR / "lm_speed.jsonl")
    v.add_argument("--deadline-s", type=float, default=None)
    v.add_argument("--in-process", action="store_true", help="run in this process, not a subprocess each")
    _add_run_args(v)
    _add_variant_args(v)
    v.set_defaults(steps=200)

    m = sub.add_parser("summarize", help="the table and the JSON summary of recorded runs")
    m.add_argument("--runs", nargs="+", type=Path, required=True, help="JSON-lines files of runs")
    m.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    m.add_argument("--size", default=None, help="only runs of this model size (default: the most common)")
    m.add_argument("--steps", type=int, default=None, help="only runs of this many steps (default: the most common)")
    m.add_argument("--reference", default="adamw")
    m.add_argument("--anchor", default="fusion_rms")
    return p


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    def variant_of(v: str) -> str:
        try:
            return with_run_options(v, param_dtype=args.param_dtype, step_in_backward=args.step_in_backward)
        except ValueError as e:
            parser.error(str(e))

    if args.command == "train":
        if args.config_json:
            cfg = RunConfig(**json.loads(args.config_json))
        else:
            variant = variant_of(args.optimizer)
            name = parse_variant(variant)[0]
            lr = args.lr if args.lr is not None else get_lm_optimizer(name).lr_centre
            cfg = _base_config(args, optimizer=variant, lr=lr, seed=args.seed)
        print(f"{cfg.optimizer} lr={cfg.lr:.3g} seed={cfg.seed} size={cfg.size} steps={cfg.steps}", flush=True)
        own = None if args.config_json else shlex.join(["python", "-m", "benchmarks.lm", *argv])
        record = train(cfg, log=lambda s: print(s, flush=True), command=own)
        if args.record:
            tmp = args.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, allow_nan=False, default=str))
            os.replace(tmp, args.record)
        if args.results:
            append_run(args.results, record)
        val = record["final_val_loss"]
        print(
            f"{record['status']}: final val {val if val is None else round(val, 4)}, test "
            f"{record['final_test_loss'] if val is None else round(record['final_test_loss'], 4)}, "
            f"{record['tokens_per_s'] or 0:,.0f} tok/s, state {record['state_bytes_per_param']:.2f} B/param"
            + (
                f", persistent {record['memory']['persistent_bytes_per_param']:.2f} B/param"
                if record.get("memory")
                else ""
            ),
            flush=True,
        )
        return record

    command = shlex.join(["python", "-m", "benchmarks.lm", *argv])
    if args.command in ("sweep", "speed"):
        base = _base_config(args)
        device = resolve_device(args.device)
        previous = read_runs([args.results] + ([args.lr_from] if getattr(args, "lr_from", None) else []))
        points_for, seeds_for = {}, {}
        for option, table in (("points_for", points_for), ("seeds_for", seeds_for)):
            for item in getattr(args, option, []):
                variant, _, n = item.rpartition("=")
                if not variant or not n.isdigit():
                    parser.error(f"--{option.replace('_', '-')} takes VARIANT=N, not {item!r}")
                table[canonical_variant(variant_of(variant))] = int(n)
        if args.plan and args.optimizers:
            parser.error("give --plan or --optimizers, not both")
        plan = {}  # folded variant -> (centre, points)
        if args.plan:
            for v, centre, points in PLANS[args.plan]:
                plan[variant_of(v)] = (centre, points)
        optimizers = list(plan) or [variant_of(v) for v in (args.optimizers or DEFAULT_ORDER)]
        ablations = [variant_of(v) for v in getattr(args, "ablations", [])]
        arms = []
        for variant in optimizers + ablations:
            name, opt_overrides, recipe_overrides = parse_variant(variant)
            spec = get_lm_optimizer(name)
            reason = unavailable_reason(spec, device)
            if reason:
                print(f"not run: {variant} ({reason})")
                append_run(
                    args.results,
                    dict(
                        kind="not_run",
                        optimizer=canonical_variant(variant),
                        reason=reason,
                        machine=machine(device),
                        versions=versions(),
                        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    ),
                )
                continue
            v = canonical_variant(variant)
            plan_centre, plan_points = plan.get(variant, (None, None))
            if args.command == "speed":
                best = _best_lr_from(previous, variant, args.size) if args.lr_from else None
                arms.append(Arm(v, best or plan_centre or spec.lr_centre, 1, 1, 0))
            elif variant in ablations:
                follow = name if (opt_overrides or recipe_overrides) and not spec.ablation else args.centre_from
                arms.append(
                    Arm(v, None, points_for.get(v, args.ablation_points), args.ablation_seeds, args.max_extend, follow)
                )
            else:
                centre = args.lr_centre or plan_centre or spec.lr_centre
                points = points_for.get(v, plan_points or args.points)
                arms.append(Arm(v, centre, points, seeds_for.get(v, args.seeds), args.max_extend))
        return sweep(
            arms,
            base,
            args.results,
            parallel=(0 if args.in_process else 1) if args.command == "speed" else args.parallel,
            deadline_s=args.deadline_s,
            expect_job_s=getattr(args, "expect_job_s", None),
            retry_errors=getattr(args, "retry_errors", False),
            dry_run=getattr(args, "dry_run", False),
            phase="speed" if args.command == "speed" else None,
            command=command,
            log=lambda s: print(s, flush=True),
        )

    runs = read_runs(args.runs)
    summary = summarize(runs, reference=args.reference, anchor=args.anchor, size=args.size, steps=args.steps)
    summary["not_run"] = {
        name: reason
        for name, reason in read_not_run(args.runs).items()
        if not any(r["optimizer"] == name for r in runs)
    }
    summary["meta"] = dict(
        summarized_by=shlex.join(["python", "-m", "benchmarks.lm", *argv]),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        commit=commit(),
        run_files=[str(p) for p in args.runs],
        loss="cross-entropy in nats per byte; final_val_loss over every non-overlapping window of the val split",
        speed=(
            "tokens_per_s: training tokens over training wall-clock (evaluation excluded; the first "
            f"{RunConfig.eval_every} steps, with warm-up and compilation, excluded when later ones exist), "
            "measured with concurrent_runs runs sharing the device; tokens_per_s_alone from runs alone"
        ),
        memory=(
            "peak_gpu_memory_bytes: torch.cuda.max_memory_allocated of the run's process; memory table: "
            f"parameters, gradients and optimizer state counted from the live tensors {StepMemory.POINT} at step "
            "memory_step, the peak and its transient part from torch.cuda.max_memory_allocated over that step"
        ),
        state="state_bytes: tensors in optimizer.state (quantized states by the tensors they hold; shared once)",
    )
    print(format_table(summary))
    if summary["memory"]["rows"]:
        print("\n" + format_memory_table(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1, allow_nan=False, default=str) + "\n")
        print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
