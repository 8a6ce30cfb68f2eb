r"""Stochastic rounding of fp32 values into bf16 and fp16, with a counter-based random stream.

Rounded to nearest, an update smaller than half a unit in the last place (ulp) of a bf16 parameter is lost,
and a model trained in pure bf16 stops learning once its updates shrink below that. Stochastic rounding
rounds each value up (away from zero) with probability equal to its fractional distance between the two
neighbouring bf16 values, so that the rounding is unbiased: the expected stored value is the fp32 value,
and small updates accumulate on average.

The random numbers come from a counter-based generator: a hash of (seed, key, step, element index), with
no state to keep or advance. The same inputs give the same bits on every engine and every device, so a
run is reproducible for its seed, data-parallel replicas (which see the same gradients) stay bit-identical,
and a resumed run continues exactly. In :class:`fusedbun.FusionOptimizer` the key of a parameter is its
position in the optimizer (the numbering of ``state_dict()``), the step is its step count after the step's
increment, and the index is the element's flat row-major position in the whole parameter. A second moment
stored in bf16 (``hessian_dtype=torch.bfloat16``) is rounded the same way, on a stream of its own: its key
is the parameter's plus :data:`HESSIAN_STREAM`.

The hash is built from MurmurHash3's 32-bit finalizer :math:`f` (a bijection of 32-bit words with good
avalanche):

.. math::
    h = f(f(f(f(f(f(0 \oplus s_{lo}) \oplus s_{hi}) \oplus k_{lo}) \oplus k_{hi}) \oplus t_{lo}) \oplus t_{hi})
        \quad\text{(seed } s\text{, key } k\text{, step } t\text{, in 32-bit halves)} \\
    k_0 &= h, \qquad k_1 = f(h \oplus \mathtt{0x9E3779B9}) \\
    r_i &= f\big(((i_{lo} + \mathtt{0x9E3779B9}\, i_{hi}) \cdot (k_1 \mathbin{|} 1) + k_0) \bmod 2^{32}\big)

(the stream's keys choose an odd multiplier and an offset for the element counter, and one finalizer
scrambles it; two elements of one tensor share a word only if their indices are :math:`2^{32}` or more
apart), and the top bits of :math:`r_i` decide the rounding: for bf16 the top 16 are added to the fp32 bit pattern
below the 16 kept bits, which then carry into the kept bits with exactly the wanted probability; fp16 keeps
13 fewer mantissa bits, and in its subnormal range (below :math:`2^{-14}`, a fixed spacing of
:math:`2^{-24}`) the top 24 bits of :math:`r_i` are compared with the fraction. The C and Triton kernels
compute the same numbers with 32-bit integer arithmetic; this module computes them with torch's int64
tensors (every product kept below :math:`2^{48}`), as the reference for every engine.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "stochastic_round",
    "stochastic_round_at",
    "rounding_keys",
    "rounding_keys_at",
    "random_bits",
    "flat_index",
    "ROUNDED_DTYPES",
    "HESSIAN_STREAM",
    "hessian_key",
]

ROUNDED_DTYPES = (torch.bfloat16, torch.float16)

HESSIAN_STREAM = 2**63
"""Added to a parameter's key for the stream that rounds its second moment when that is stored in bf16
(``FusionOptimizer(hessian_dtype=torch.bfloat16)``): the parameter's own rounding and its statistic's never
share random bits."""


def hessian_key(key: int) -> int:
    """The key of the random stream that rounds the bf16 second moment of the parameter keyed ``key``."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < HESSIAN_STREAM:
        raise ValueError(f"a parameter's key must be an int in [0, 2**63), got {key!r}")
    return key + HESSIAN_STREAM


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3's finalizer constants


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int (a bijection of 32-bit words)."""
    h &= _M32
    h ^= h >> 16
    h = (h * _C1) & _M32
    h ^= h >> 13
    h = (h * _C2) & _M32
    h ^= h >> 16
    return h


def _halves(x: int, name: str) -> tuple[int, int]:
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {x!r}")
    return x & _M32, x >> 32


def rounding_keys(seed: int, key: int, step: int) -> tuple[int, int]:
    """The two 32-bit words :math:`(k_0, k_1)` that select the random stream of one tensor at one step."""
    # The (seed, key) part of the hash is the same at every step: kept per tensor, so that a step of the
    # fused CPU engine (which computes these keys for each tensor in Python) does two finalizers, not six.
    h = _seed_key_hash(seed, key) if type(seed) is int and type(key) is int else _seed_key_hash.__wrapped__(seed, key)
    lo, hi = _halves(step, "step")
    h = _fmix32(_fmix32(h ^ lo) ^ hi)
    return h, _fmix32(h ^ _GOLDEN)


@functools.lru_cache(maxsize=1 << 14)
def _seed_key_hash(seed: int, key: int) -> int:
    """The hash of :func:`rounding_keys` after the seed and the key (ints only in the cache: a bool equals
    its int, and must still be refused by :func:`_halves`)."""
    h = 0
    for name, value in (("seed", seed), ("key", key)):
        lo, hi = _halves(value, name)
        h = _fmix32(_fmix32(h ^ lo) ^ hi)
    return h


def rounding_keys_at(seed: int, key: int, step: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`rounding_keys` with the step count a tensor (int64 results on its device, computed without
    reading it: the form ``torch.compile`` and step counts kept on a device need)."""
    h = 0
    for name, value in (("seed", seed), ("key", key)):
        lo, hi = _halves(value, name)
        h = _fmix32(_fmix32(h ^ lo) ^ hi)
    t = step.to(torch.int64)
    h = _fmix32_tensor(_fmix32_tensor((t & _M32) ^ h) ^ (t >> 32))
    return h, _fmix32_tensor(h ^ _GOLDEN)


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for int64 tensors holding 32-bit words, with no product above 2**48."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mul32_var(h: Tensor, c) -> Tensor:
    """``h * c mod 2**32`` where ``c`` is a 32-bit word given as an int or an int64 tensor."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32_tensor(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def random_bits(index: Tensor, keys: tuple[int, int]) -> Tensor:
    """:math:`r_i` for the int64 element indices ``index``, as int64 tensors holding 32-bit words."""
    k0, k1 = keys
    counter = ((index & _M32) + _mul32(index >> 32, _GOLDEN)) & _M32
    return _fmix32_tensor((_mul32_var(counter, k1 | 1) + k0) & _M32)


def _as_bits(x: Tensor) -> Tensor:
    return x.view(torch.int32).to(torch.int64) & _M32


def _as_float(u: Tensor) -> Tensor:
    """fp32 values from int64 tensors holding 32-bit patterns."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def _from_bits16(b: Tensor, dtype: torch.dtype) -> Tensor:
    b = torch.where(b >= 0x8000, b - 0x10000, b)
    return b.to(torch.int16).view(dtype)


def _round_bits_bf16(u: Tensor, r: Tensor, finite: Tensor, nearest: Tensor) -> Tensor:
    return torch.where(finite, (u + (r >> 16)) >> 16, nearest)


def _round_bits_f16(x: Tensor, u: Tensor, r: Tensor, finite: Tensor, nearest: Tensor) -> Tensor:
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # Normal fp16 range: add 13 random bits below the kept ones and truncate; the result is an fp16 value
    # (or 2**16 and beyond, which the conversion turns into infinity).
    kept = ((a + (r >> 19)) & ~0x1FFF) & _M32
    normal = _as_float(kept | (sign << 16)).to(torch.float16)
    # Subnormal range: a fixed grid of 2**-24; up with probability frac, from the top 24 random bits.
    n = x.abs() * 2.0**24
    low = n.floor()
    up = (r >> 8).to(torch.float32) < (n - low) * 2.0**24
    sub = ((low + up.to(torch.float32)) * 2.0**-24).to(torch.float16)
    sub = torch.where(sign != 0, -sub, sub)
    value = torch.where(a < 0x38800000, sub, normal)
    out = value.view(torch.int16).to(torch.int64) & 0xFFFF
    return torch.where(finite, out, nearest)


def stochastic_round_at(x: Tensor, dtype: torch.dtype, keys: tuple[int, int], index: Tensor) -> Tensor:
    """:func:`stochastic_round` with the random stream's keys and the element indices given (``index`` is an
    int64 tensor shaped like ``x``): the form the engines use for rows of a sparse gradient or a shard."""
    if dtype not in ROUNDED_DTYPES:
        raise ValueError(f"stochastic rounding goes into torch.bfloat16 or torch.float16, not {dtype}")
    x = x.to(torch.float32)
    u = _as_bits(x)
    r = random_bits(index.to(torch.int64), keys)
    finite = x.isfinite()
    nearest = x.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    if dtype == torch.bfloat16:
        b = _round_bits_bf16(u, r, finite, nearest)
    else:
        b = _round_bits_f16(x, u, r, finite, nearest)
    return _from_bits16(b, dtype)


def flat_index(shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """The flat row-major position of every element of a tensor of ``shape`` (int64, shaped ``shape``)."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=device).view(shape)


def stochastic_round(x: Tensor, dtype: torch.dtype, *, seed: int, key: int = 0, step: int = 1) -> Tensor:
    r"""Round the fp32 tensor ``x`` into ``dtype`` (``torch.bfloat16`` or ``torch.float16``) stochastically.

    Each finite element becomes one of the two ``dtype`` values that bracket it, the one away from zero with
    probability equal to its fractional distance between them (to :math:`2^{-16}` for bf16, exactly, and
    :math:`2^{-13}` or :math:`2^{-24}` for fp16), so :math:`\mathbb{E}[\text{result}] = x`. Values the dtype
    holds are unchanged; NaN and infinities convert as they would to nearest; values beyond the largest
    finite one round to it or to infinity. The result is a deterministic function of ``seed``, ``key``,
    ``step``, each element's flat row-major index and its value (see the module's docstring for the hash).
    """
    if dtype not in ROUNDED_DTYPES:
        raise ValueError(f"stochastic rounding goes into torch.bfloat16 or torch.float16, not {dtype}")
    keys = rounding_keys(seed, key, step)
    return stochastic_round_at(x, dtype, keys, flat_index(x.shape, x.device))
