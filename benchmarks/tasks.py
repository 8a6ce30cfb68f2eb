"""Benchmark tasks on real data that ships with installed packages: nothing is downloaded at run time.

Every task has three fixed splits: ``train`` (the only data the optimizer sees), ``val`` (picks each
optimizer's learning rate) and ``test`` (reported, used for nothing else). The splits do not depend on
the run's seed; the seed sets the model's initialization and the order of the training batches.

- ``digits_cnn``: scikit-learn's 8x8 handwritten digits (``load_digits``, 1,797 images, 10 classes),
  a small CNN, cross-entropy in nats.
- ``char_lm``: a character-level causal transformer on the English text of Python's own documentation
  topics (``pydoc_data.topics.topics``), cross-entropy in nats per character. The text is cut into
  contiguous train / val / test stretches, so held-out characters never appear in training.
- ``char_lm_large``: the same text and splits with a larger transformer (4 layers, d=256, context 128,
  about 3.2M parameters) and longer runs, sized for a GPU (about 15 s a run on an H100; about 3 s a step
  on one CPU thread).
- ``tabular_diabetes``: scikit-learn's diabetes regression (``load_diabetes``, 442 patients, 10
  features), an MLP, mean squared error of the standardized target.
- ``tabular_cancer``: scikit-learn's breast-cancer classification (``load_breast_cancer``, 569 tumours,
  30 features), an MLP, cross-entropy in nats.

Each run of the others is a few seconds on one CPU thread.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Task", "TaskData", "TASKS", "get_task", "matrix_params"]

SPLIT_SEED = 0  # the splits are fixed; a run's seed never changes them


@dataclass
class TaskData:
    """Tensors of one task: ``(inputs, targets)`` for each split."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    info: dict

    def to(self, device: torch.device | str) -> TaskData:
        move = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
        return TaskData(move(self.train), move(self.val), move(self.test), self.info)


@dataclass(frozen=True)
class Task:
    """One benchmark problem: data, model, loss, batch sampler and run length."""

    name: str
    description: str
    loss_name: str  # what the reported loss is, with its unit
    steps: int
    batch_size: int
    eval_every: int
    load: Callable[[], TaskData]
    build_model: Callable[[TaskData], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    sample: Callable[[TaskData, int, torch.Generator], tuple[Tensor, Tensor]]


def matrix_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters the way Muon's documentation asks: hidden weights of 2 or more dims, and the rest
    (embeddings, the output head ``model.head``, biases and norm gains)."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in model.head.parameters()}
    hidden = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in skip]
    rest = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in skip)]
    return hidden, rest


def _stratified_split(y: Tensor, fractions=(0.6, 0.2, 0.2)) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a fixed split, stratified by class when ``y`` holds class labels."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(y)).numpy()
    strat = y.numpy() if not torch.is_floating_point(y) else None
    rest_frac = fractions[1] + fractions[2]
    train, rest = train_test_split(idx, test_size=rest_frac, random_state=SPLIT_SEED, stratify=strat)
    strat_rest = strat[rest] if strat is not None else None
    val, test = train_test_split(rest, test_size=fractions[2] / rest_frac, random_state=SPLIT_SEED, stratify=strat_rest)
    return tuple(torch.as_tensor(i) for i in (train, val, test))


def _sample_rows(data: TaskData, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = data.train
    idx = torch.randint(len(x), (batch_size,), generator=gen).to(x.device)
    return x[idx], y[idx]


# ---------------------------------------------------------------- digits: a small CNN


@functools.cache
def load_digits_data() -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va, te = _stratified_split(y)
    info = dict(source="sklearn.datasets.load_digits", n_train=len(tr), n_val=len(va), n_test=len(te))
    return TaskData((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), info)


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


# ---------------------------------------------------------------- text: a character-level transformer

CONTEXT = 32
LARGE_CONTEXT = 128  # char_lm_large


@functools.cache
def load_text_data(context: int = CONTEXT, eval_windows: int = 256) -> TaskData:
    """Python's documentation topics, concatenated in key order: 80% train, 10% val, 10% test."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n = len(ids)
    train, val, test = ids[: int(0.8 * n)], ids[int(0.8 * n) : int(0.9 * n)], ids[int(0.9 * n) :]

    def windows(stream: Tensor) -> tuple[Tensor, Tensor]:
        # Non-overlapping windows from the start of the stretch: the same ones for every run.
        k = min(eval_windows, (len(stream) - 1) // context)
        w = stream[: k * context + 1]
        x = torch.stack([w[i * context : (i + 1) * context] for i in range(k)])
        y = torch.stack([w[i * context + 1 : (i + 1) * context + 1] for i in range(k)])
        return x, y

    info = dict(
        source="pydoc_data.topics.topics",
        chars=n,
        vocab=len(vocab),
        context=context,
        n_train=len(train),
        n_val=int(windows(val)[0].numel()),
        n_test=int(windows(test)[0].numel()),
    )
    # The training "inputs" are the whole training stream; batches are random windows of it.
    return TaskData((train, train), windows(val), windows(test), info)


def _sample_windows(data: TaskData, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    stream = data.train[0]
    context = data.info["context"]
    starts = torch.randint(len(stream) - context - 1, (batch_size,), generator=gen)
    offsets = torch.arange(context + 1)
    w = stream[(starts[:, None] + offsets).to(stream.device)]
    return w[:, :-1], w[:, 1:]


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, context: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        # Written out (not F.scaled_dot_product_attention) so that SophiaH's Hessian-vector products,
        # which differentiate the backward pass, work with every backend.
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, context: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, context)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """A pre-LayerNorm GPT-style decoder: token and position embeddings, blocks, a linear head."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4, context: int = CONTEXT):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, context) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---------------------------------------------------------------- tabular: MLPs


def _standardized(x: Tensor, train_idx: Tensor) -> Tensor:
    mean, std = x[train_idx].mean(0), x[train_idx].std(0)
    return (x - mean) / std


@functools.cache
def load_diabetes_data() -> TaskData:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32)
    tr, va, te = _stratified_split(y)
    x, y = _standardized(x, tr), _standardized(y[:, None], tr)  # statistics of the training split only
    info = dict(source="sklearn.datasets.load_diabetes", n_train=len(tr), n_val=len(va), n_test=len(te))
    return TaskData((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), info)


@functools.cache
def load_cancer_data() -> TaskData:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va, te = _stratified_split(y)
    x = _standardized(x, tr)
    info = dict(source="sklearn.datasets.load_breast_cancer", n_train=len(tr), n_val=len(va), n_test=len(te))
    return TaskData((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), info)


class MLP(nn.Module):
    def __init__(self, inputs: int, outputs: int, hidden: int = 64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            name="digits_cnn",
            description="sklearn digits (8x8 images, 10 classes), 2 conv + 2 linear layers",
            loss_name="cross-entropy (nats)",
            steps=200,
            batch_size=64,
            eval_every=25,
            load=load_digits_data,
            build_model=lambda data: DigitsCNN(),
            loss_fn=F.cross_entropy,
            sample=_sample_rows,
        ),
        Task(
            name="char_lm",
            description="character-level causal transformer (2 layers, d=64, context 32) on pydoc topics text",
            loss_name="cross-entropy (nats/char)",
            steps=200,
            batch_size=16,
            eval_every=40,
            load=load_text_data,
            build_model=lambda data: CharTransformer(data.info["vocab"]),
            loss_fn=_lm_loss,
            sample=_sample_windows,
        ),
        Task(
            name="char_lm_large",
            description="character-level causal transformer (4 layers, d=256, 8 heads, context 128) on pydoc "
            "topics text; for GPU runs",
            loss_name="cross-entropy (nats/char)",
            steps=1000,
            batch_size=32,
            eval_every=200,
            load=functools.partial(load_text_data, context=LARGE_CONTEXT),
            build_model=lambda data: CharTransformer(
                data.info["vocab"], d=256, layers=4, heads=8, context=LARGE_CONTEXT
            ),
            loss_fn=_lm_loss,
            sample=_sample_windows,
        ),
        Task(
            name="tabular_diabetes",
            description="sklearn diabetes regression (10 features), MLP 10-64-64-1",
            loss_name="MSE (standardized target)",
            steps=300,
            batch_size=32,
            eval_every=25,
            load=load_diabetes_data,
            build_model=lambda data: MLP(10, 1),
            loss_fn=F.mse_loss,
            sample=_sample_rows,
        ),
        Task(
            name="tabular_cancer",
            description="sklearn breast-cancer classification (30 features), MLP 30-64-64-2",
            loss_name="cross-entropy (nats)",
            steps=300,
            batch_size=32,
            eval_every=25,
            load=load_cancer_data,
            build_model=lambda data: MLP(30, 2),
            loss_fn=F.cross_entropy,
            sample=_sample_rows,
        ),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
