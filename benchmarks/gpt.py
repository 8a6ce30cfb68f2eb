"""A GPT-style byte-level decoder for the language-model benchmark.

Pre-LayerNorm blocks (causal self-attention through ``F.scaled_dot_product_attention``, then a GELU MLP 4x
wide), learned position embeddings, a final LayerNorm and a linear head over the 256 byte values, tied to
the token embedding by default. Initialisation follows GPT-2: normal(0, 0.02) for weights, zeros for
biases, and the residual projections scaled by ``1/sqrt(2 * n_layer)``.

The sizes (:data:`SIZES`) run from a smoke-test model that trains a few steps in seconds on a CPU to
GPU models of 25M-85M parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "SIZES", "get_size", "flops_per_token"]


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int  # context length, in bytes
    batch_size: int  # sequences per step; tokens per step = batch_size * block_size
    vocab_size: int = 256
    tie_weights: bool = True
    bias: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def as_dict(self) -> dict:
        return asdict(self)


SIZES: dict[str, GPTConfig] = {
    # a few steps in a few seconds on one CPU core: the smoke test
    "tiny": GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4),
    # about 0.8M parameters: a CPU run of a few hundred steps
    "cpu": GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=128, batch_size=16),
    # 25.3M parameters, 16,384 tokens a step: the GPU benchmark
    "gpu": GPTConfig(n_layer=8, n_embd=512, n_head=8, block_size=512, batch_size=32),
    # 85M parameters (GPT-2 small's body), 16,384 tokens a step
    "gpu_large": GPTConfig(n_layer=12, n_embd=768, n_head=12, block_size=512, batch_size=32),
}


def get_size(name: str) -> GPTConfig:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; known: {sorted(SIZES)}") from None


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token (forward and backward, 3x the forward): 6 per weight of the matrices the
    tokens pass through, plus the attention scores and their weighted sum (``2 * 2 * T * d`` per layer in
    the forward pass, counted over the full T x T square; causal kernels skip about half of it)."""
    d, L, T, V = cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.vocab_size
    matmul_weights = L * 12 * d * d + V * d  # qkv (3d^2), proj (d^2), MLP (8d^2), head
    return 6 * matmul_weights + 3 * L * 4 * T * d


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``GPT(cfg)(idx)`` gives logits ``(B, T, vocab)``; ``GPT(cfg)(idx, targets)`` gives the mean
    next-byte cross-entropy (nats per byte) as well, as ``(logits, loss)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters, each counted once (the tied head shares the token embedding)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context of {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
