"""Hypothesis strategies and seeded inputs shared by the property tests (``test_properties.py``) and the
engine-agreement property (``test_engines.py``).

The gradients are drawn from a seeded torch generator whose seed, scale and zero fraction hypothesis
chooses, so failing examples shrink to a (shape, dtype, scale, hyperparameters) tuple.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
# FUSEDBUN_HYPOTHESIS_SCALE=50 runs 50 times as many examples (a soak run); the default keeps the files quick
SCALE = max(1, int(os.environ.get("FUSEDBUN_HYPOTHESIS_SCALE", "1")))
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# decimal exponent range of gradients per dtype: fp16 stays inside its own range (6e-8 .. 65504)
EXPONENTS = {torch.float32: (-30, 18), torch.float64: (-30, 18), torch.bfloat16: (-30, 18), torch.float16: (-6, 4)}
MAX_NUMEL = 400


@st.composite
def shapes(draw, min_dims=0, max_dims=4, allow_empty=True):
    dims = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.integers(0 if allow_empty else 1, 7)) for _ in range(dims))
    if math.prod(shape) > MAX_NUMEL:
        shape = tuple(min(n, 3) for n in shape)
    return shape


@st.composite
def hyperparameters(draw):
    use_rms = draw(st.booleans())
    return dict(
        lr=draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.1, 1.0])),
        eps=10.0 ** draw(st.integers(-30, -1)),
        beta_decay=draw(st.sampled_from([0.05, 0.3, 0.8, 1.0])),
        Lambda=draw(st.sampled_from([0.0, 0.01, 0.5])),
        momentum_beta=draw(st.sampled_from([0.0, 0.5, 0.9, 0.999])),
        centralize=draw(st.booleans()),
        use_rms=use_rms,
        maximize=draw(st.booleans()),
    )


def gradient(shape, dtype, seed: int, exponent: int, zero_frac: float) -> torch.Tensor:
    """randn * 10**exponent, each entry spread over a further 1e+-3, with a fraction of exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    spread = 10.0 ** (torch.rand(shape, generator=gen, dtype=torch.float64) * 6 - 3)
    g = g * spread * 10.0**exponent
    g = torch.where(torch.rand(shape, generator=gen) < zero_frac, torch.zeros_like(g), g)
    lo, hi = EXPONENTS[dtype]
    g = g.clamp(-(10.0 ** (hi + 0.5)), 10.0 ** (hi + 0.5))
    return g.to(dtype)
