"""Stochastic rounding of bf16/fp16 parameters: ``fusedbun.stochastic_round`` and the optimizer option.

Written from the specification, before the implementation:

* ``fusedbun.stochastic_round(x, dtype, *, seed, key=0, step=1)`` rounds each finite fp32 element to one of
  the two ``dtype`` values that bracket it, the one away from zero with probability equal to x's fractional
  distance between them; values the dtype holds are unchanged, NaN/Inf stay, and the result is a
  deterministic function of (seed, key, step, flat row-major index, value).
* ``FusionOptimizer(..., stochastic_rounding=True, rounding_seed=s)``: every bf16/fp16 parameter gets its new
  value by one stochastic rounding of the fp32 result of the step, with ``key`` = the parameter's position in
  the optimizer's order, ``step`` = its step count after the increment, and the element index in the full
  tensor (row-sparse gradients and DTensor shards included). fp32/fp64 parameters and momentum buffers are
  never stochastically rounded.

The statistical tests compare a mean of many independent roundings with the exact value, within a few
standard errors computed from the Bernoulli variance of each rounding. Every input comes from a fixed seed,
so each test is deterministic: a correct implementation passes it always.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import launch, state_tensors
from torch import nn

import fusedbun

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bf16", "fp16"]
Z = 4.0  # standard errors allowed between a mean of roundings and the exact value

# The regime in which one step is exactly p - lr * g before the rounding: no momentum, no weight decay, no
# RMS division, no centralization; eps = 0 masks only zeros (tests give none), and lr is a power of two,
# so lr * g is exact in fp32 and every engine computes the same fp32 value.
EXACT = dict(momentum_beta=0.0, Lambda=0.0, use_rms=False, eps=0.0, centralize=False, maximize=False)
LR_EXACT = 2.0**-5
SHAPES = [(), (7,), (5, 3), (2, 3, 4), (2, 3, 2, 2)]  # 0-D to 4-D
GENERAL_CONFIGS = {
    "defaults": {},
    "rms-centralize": dict(use_rms=True, centralize=True),
    "maximize-rms-no-momentum": dict(maximize=True, use_rms=True, momentum_beta=0.0, Lambda=0.05),
}


# ----------------------------------------------------------------------------------------------------
# Helpers: bit patterns of 16-bit floats, and the two values of a dtype that bracket an fp32 value.


def bits(t: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of a bf16/fp16 tensor as int32 in [0, 65535]."""
    return t.detach().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = torch.where(b >= 0x8000, b - 0x10000, b)
    return b.to(torch.int16).view(dtype)


def ordered(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns mapped to integers that order like the values: neighbours differ by 1 (+0 and -0 are 0)."""
    b = bits(t)
    mag = b & 0x7FFF
    return torch.where(b >= 0x8000, -mag, mag)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype in LOW:
        return torch.equal(bits(a), bits(b))
    return torch.equal(
        a.detach().contiguous().view(-1).view(torch.uint8), b.detach().contiguous().view(-1).view(torch.uint8)
    )


def bracket(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(toward zero, away from zero): the two ``dtype`` values around each finite fp32 ``x``; both are x where
    the dtype holds x. Beyond the largest finite value, "away from zero" is the infinity of x's sign."""
    n = x.to(dtype)  # round to nearest even: one of the two
    b = bits(n)
    sign, mag = b & 0x8000, b & 0x7FFF
    nf = n.float()
    exact = nf == x
    down = torch.where(nf.abs() > x.abs(), mag - 1, mag)  # RNE went away from zero: step back one
    up = torch.where(exact, down, down + 1)
    return from_bits(sign | down, dtype), from_bits(sign | up, dtype)


def fraction_away(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """x's fractional distance from ``down`` to ``up`` (float64; 0 where they are equal)."""
    d, u, xv = down.double().abs(), up.double().abs(), x.double().abs()
    gap = u - d
    return torch.where(gap > 0, (xv - d) / torch.where(gap > 0, gap, 1.0), 0.0)


def sr(x: torch.Tensor, dtype: torch.dtype, **kw) -> torch.Tensor:
    return fusedbun.stochastic_round(x, dtype, **kw)


def finfo_bits(dtype: torch.dtype) -> dict[str, int]:
    """Bit patterns of special values: smallest/largest subnormal, smallest normal, largest finite."""
    if dtype == torch.bfloat16:
        return {"min_sub": 0x0001, "max_sub": 0x007F, "min_normal": 0x0080, "max": 0x7F7F}
    return {"min_sub": 0x0001, "max_sub": 0x03FF, "min_normal": 0x0400, "max": 0x7BFF}


def random_values(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random finite fp32 values spread over many binades of ``dtype`` (fp16: its subnormals included)."""
    lo, hi = (-30, 30) if dtype == torch.bfloat16 else (-27, 14)
    scale = torch.exp2(torch.randint(lo, hi, (n,), generator=gen).float())
    x = torch.randn(n, generator=gen) * scale
    if dtype == torch.float16:
        x = x.clamp(-60000.0, 60000.0)
    return x


def grid_values(dtype: torch.dtype, gen: torch.Generator, n: int) -> torch.Tensor:
    """Random finite ``dtype`` values (as fp32), none of them the largest finite one, both signs; for fp16
    a quarter of them subnormal."""
    v = random_values(dtype, n, gen).to(dtype)
    if dtype == torch.float16:
        sub = torch.randint(1, 0x03FF, (n // 4,), generator=gen, dtype=torch.int32)
        sub = torch.where(torch.rand(n // 4, generator=gen) < 0.5, sub, sub | 0x8000)
        v[: n // 4] = from_bits(sub, dtype)
    m = bits(v) & 0x7FFF
    keep = (m != finfo_bits(dtype)["max"]) & (m < 0x7C00 if dtype == torch.float16 else m < 0x7F80)
    return v[keep].float()


def next_away(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The next ``dtype`` value away from zero of each (finite, non-maximal) ``dtype`` value v (fp32)."""
    b = bits(v.to(dtype))
    return from_bits((b & 0x8000) | ((b & 0x7FFF) + 1), dtype).float()


# ----------------------------------------------------------------------------------------------------
# The harness itself (runs today): the bracketing helper on hand-computed cases.


def test_harness_bracket_helper_on_hand_computed_values():
    x = torch.tensor([1.0 + 2.0**-9, -(1.0 + 2.0**-9), 1.0, 0.0, 3.4e38, 2.0**-140])
    down, up = bracket(x, torch.bfloat16)
    assert down.float().tolist() == [1.0, -1.0, 1.0, 0.0, 3.3895313892515355e38, 0.0]
    assert up.float().tolist()[:4] == [1.0 + 2.0**-7, -(1.0 + 2.0**-7), 1.0, 0.0]
    assert up[4].float().item() == math.inf and up[5].float().item() == 2.0**-133
    x = torch.tensor([65510.0, 1.0 + 2.0**-12, 2.0**-26, -(2.0**-26)])
    down, up = bracket(x, torch.float16)
    assert down.float().tolist() == [65504.0, 1.0, 0.0, 0.0]
    assert up.float().tolist() == [math.inf, 1.0 + 2.0**-10, 2.0**-24, -(2.0**-24)]
    assert fraction_away(x, down, up).tolist()[1:] == [0.25, 0.25, 0.25]


# ----------------------------------------------------------------------------------------------------
# fusedbun.stochastic_round


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 3, 4)])
def test_stochastic_round_returns_the_dtype_and_shape_and_leaves_its_input_alone(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    r = sr(x, dtype, seed=1)
    assert r.dtype == dtype and r.shape == x.shape
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_each_result_is_one_of_the_two_bracketing_values(dtype):
    gen = torch.Generator().manual_seed(1)
    x = random_values(dtype, 20000, gen)
    down, up = bracket(x, dtype)
    for seed, key, step in [(0, 0, 1), (7, 3, 2), (2**62 + 1, 11, 10**6)]:
        r = sr(x, dtype, seed=seed, key=key, step=step).float()
        ok = (r == down.float()) | (r == up.float())
        assert ok.all(), (
            f"{(~ok).sum()} results outside the bracket, e.g. x={x[~ok][:3].tolist()} -> {r[~ok][:3].tolist()}"
        )


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_random_values_round_without_bias(dtype):
    """Mean of 32 independent roundings of each of 4096 random values: its deviation from x, summed over
    the values of each sign and quarter of the fractional distance, within Z standard errors."""
    gen = torch.Generator().manual_seed(2)
    x = random_values(dtype, 4096, gen)
    down, up = bracket(x, dtype)
    frac = fraction_away(x, down, up)
    gap = (up.double() - down.double()).abs()
    draws = 32
    total = torch.zeros_like(x, dtype=torch.float64)
    for key in range(draws):
        r = sr(x, dtype, seed=3, key=key, step=1 + key % 5)
        total += r.double()
    dev = total / draws - x.double()
    var = gap**2 * frac * (1 - frac) / draws  # variance of the mean of `draws` Bernoulli roundings
    for positive in (True, False):
        for q in range(4):
            sel = (x > 0 if positive else x < 0) & (frac > q / 4) & (frac <= (q + 1) / 4)
            assert sel.sum() > 100
            # Normalize each value's deviation by its gap so that values of all binades weigh alike.
            z = (dev[sel] / gap[sel]).sum() / (var[sel] / gap[sel] ** 2).sum().sqrt()
            assert abs(z) <= Z, f"{'positive' if positive else 'negative'} values, fraction in quarter {q}: z = {z:.2f}"


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_values_at_a_fraction_of_an_ulp_round_away_with_that_probability(dtype, fraction):
    """x = v + fraction * (next value away from zero - v) for random dtype values v (fp16: subnormals too):
    over 2048 copies of each x (different element indices) and 4 keys, the fraction rounded away from zero,
    pooled and per value, matches ``fraction`` (Z standard errors pooled, Z + 1 per value)."""
    gen = torch.Generator().manual_seed(3)
    v = grid_values(dtype, gen, 64)
    w = next_away(v, dtype)
    x64 = v.double() + fraction * (w.double() - v.double())
    x = x64.float()
    assert torch.equal(x.double(), x64), "harness: x must be exact in fp32"
    copies, keys = 2048, 4
    xs = x[:, None].expand(-1, copies).contiguous()
    away = torch.zeros(len(x), dtype=torch.float64)
    for key in range(keys):
        r = sr(xs, dtype, seed=5, key=key).float()
        assert ((r == v[:, None]) | (r == w[:, None])).all()
        away += (r == w[:, None]).double().sum(dim=1)
    n = copies * keys
    p_each = away / n
    se_each = math.sqrt(fraction * (1 - fraction) / n)
    worst = (p_each - fraction).abs().argmax()
    assert (p_each - fraction).abs().max() <= (Z + 1) * se_each, (
        f"v={v[worst].item()!r}: rounded away {p_each[worst].item():.4f} of the time, expected {fraction}"
    )
    pooled = away.sum() / (n * len(x))
    assert abs(pooled - fraction) <= Z * math.sqrt(fraction * (1 - fraction) / (n * len(x)))
    # The mean of the roundings equals x within its standard error (the statement of unbiasedness).
    mean = v.double() + p_each * (w.double() - v.double())
    assert ((mean - x64).abs() <= (Z + 1) * se_each * (w.double() - v.double()).abs()).all()


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_values_the_dtype_holds_are_unchanged(dtype):
    gen = torch.Generator().manual_seed(4)
    special = finfo_bits(dtype)
    pats = [0x0000, 0x8000] + [s | v for v in special.values() for s in (0, 0x8000)]
    specials = from_bits(torch.tensor(pats, dtype=torch.int32), dtype)
    held = torch.cat([specials, torch.randn(5000, generator=gen).to(dtype), random_values(dtype, 5000, gen).to(dtype)])
    for seed, key, step in [(0, 0, 1), (9, 4, 3), (2**63 - 1, 2**20, 2**40)]:
        r = sr(held.float(), dtype, seed=seed, key=key, step=step)
        assert same_bits(r, held), f"changed: {held[bits(r) != bits(held)][:5].tolist()}"


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_nan_stays_nan_and_infinities_stay_infinite(dtype):
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0, -math.nan] * 100)
    r = sr(x, dtype, seed=0).float()
    assert torch.isnan(r[0::5]).all() and torch.isnan(r[4::5]).all()
    assert (r[1::5] == math.inf).all() and (r[2::5] == -math.inf).all() and (r[3::5] == 1.0).all()


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_values_beyond_the_largest_finite_round_to_it_or_to_infinity(dtype):
    big = torch.finfo(dtype).max
    over = [big * (1 + 2.0**-12), big * 1.001, 3.4e38] if dtype == torch.bfloat16 else [65505.0, 65519.0, 65536.0, 1e9]
    x = torch.tensor(over * 50)
    x = torch.cat([x, -x])
    r = sr(x, dtype, seed=2).float()
    pos, neg = r[: len(r) // 2], r[len(r) // 2 :]
    assert ((pos == big) | (pos == math.inf)).all()
    assert ((neg == -big) | (neg == -math.inf)).all()


def test_fp16_subnormal_range_and_below_the_smallest_subnormal():
    """fp16's subnormals are 2**-24 apart: 2**-26 rounds to 0 or 2**-24 (1/4 away), 3 * 2**-25 to 2**-24
    or 2**-23 (1/2), in both signs; nothing is flushed to zero."""
    n = 16384
    for value, low, high, p in [
        (2.0**-26, 0.0, 2.0**-24, 0.25),
        (3 * 2.0**-25, 2.0**-24, 2.0**-23, 0.5),
        (2.0**-15 + 2.0**-26, 2.0**-15, 2.0**-15 + 2.0**-24, 0.25),
    ]:
        for sign in (1.0, -1.0):
            r = sr(torch.full((n,), sign * value), torch.float16, seed=6).float()
            assert ((r == sign * low) | (r == sign * high)).all(), (value, r.unique())
            frac = (r == sign * high).double().mean().item()
            assert abs(frac - p) <= Z * math.sqrt(p * (1 - p) / n), (sign * value, frac, p)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_same_arguments_give_the_same_bits(dtype):
    x = random_values(dtype, 10000, torch.Generator().manual_seed(7))
    for kw in [dict(seed=0), dict(seed=123, key=4, step=9)]:
        assert same_bits(sr(x, dtype, **kw), sr(x.clone(), dtype, **kw))
    assert same_bits(sr(x, dtype, seed=0), sr(x, dtype, seed=0, key=0, step=1)), "defaults are key=0, step=1"


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize(
    "other",
    [dict(seed=11), dict(seed=10 + 2**40), dict(key=1), dict(key=2**31 + 3), dict(step=2), dict(step=2**31 + 1)],
    ids=["seed", "seed-high-bits", "key", "key-high-bits", "step", "step-high-bits"],
)
def test_a_different_seed_key_or_step_gives_an_independent_stream(dtype, other):
    """Midpoints round away with probability 1/2; two independent streams disagree on half of them."""
    n = 8192
    x = (torch.ones(n) + 2.0**-8) if dtype == torch.bfloat16 else (torch.ones(n) + 2.0**-11)  # half an ulp above 1
    base = dict(seed=10, key=0, step=1)
    a = sr(x, dtype, **base).float()
    b = sr(x, dtype, **{**base, **other}).float()
    se = math.sqrt(0.25 / n)
    assert abs((a > 1).double().mean().item() - 0.5) <= Z * se, "about half of the midpoints round up"
    assert abs((b > 1).double().mean().item() - 0.5) <= Z * se
    disagree = (a != b).double().mean().item()
    assert abs(disagree - 0.5) <= Z * se, f"the streams disagree on {disagree:.3f} of the elements, not about 1/2"


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_rounding_depends_on_the_flat_row_major_index_not_on_shape_layout_or_neighbours(dtype):
    x = random_values(dtype, 24 * 35, torch.Generator().manual_seed(8))
    kw = dict(seed=4, key=2, step=3)
    flat = sr(x, dtype, **kw)
    assert same_bits(sr(x.view(24, 35), dtype, **kw), flat.view(24, 35))
    assert same_bits(sr(x.view(2, 3, 4, 35), dtype, **kw), flat.view(2, 3, 4, 35))
    t = x.view(35, 24).t()  # non-contiguous: element [i, j] has row-major index i * 35 + j in t
    assert same_bits(sr(t, dtype, **kw), sr(t.contiguous(), dtype, **kw))
    y = x.clone()
    y[100] = 12.345  # one element changes: no other result does
    other = sr(y, dtype, **kw)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[100] = False
    assert same_bits(other[keep], flat[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.complex64, torch.float8_e4m3fn])
def test_other_dtypes_are_refused_with_value_error(dtype):
    with pytest.raises(ValueError):
        sr(torch.randn(4), dtype, seed=0)


# ----------------------------------------------------------------------------------------------------
# The optimizer option


def low_param(shape, dtype, gen) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


def nonzero_grad(shape, dtype, gen) -> torch.Tensor:
    g = torch.randn(shape, generator=gen).to(dtype)
    return torch.where(g == 0, torch.ones((), dtype=dtype), g)


def test_options_are_param_group_entries_with_defaults_off_and_seed_zero():
    p = nn.Parameter(torch.randn(3).bfloat16())
    opt = fusedbun.FusionOptimizer([p], lr=0.1)
    assert opt.param_groups[0]["stochastic_rounding"] is False
    assert opt.param_groups[0]["rounding_seed"] == 0
    opt = fusedbun.FusionOptimizer(
        [{"params": [p]}, {"params": [nn.Parameter(torch.randn(2))], "rounding_seed": 5, "stochastic_rounding": False}],
        lr=0.1,
        stochastic_rounding=True,
        rounding_seed=3,
    )
    assert [(g["stochastic_rounding"], g["rounding_seed"]) for g in opt.param_groups] == [(True, 3), (False, 5)]


@pytest.mark.parametrize("value", ["yes", 1, 0.0, None])
def test_stochastic_rounding_that_is_not_a_bool_raises_type_error(value):
    for ok in (True, False):  # the keyword exists: the TypeError below is about the value
        fusedbun.FusionOptimizer([nn.Parameter(torch.randn(2))], lr=0.1, stochastic_rounding=ok)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        fusedbun.FusionOptimizer([nn.Parameter(torch.randn(2))], lr=0.1, stochastic_rounding=value)


@pytest.mark.parametrize("value", [1.5, "3", None, -1, 2**63, -(2**70)])
def test_rounding_seed_outside_the_ints_in_0_to_2_63_is_refused_naming_it(value):
    fusedbun.FusionOptimizer([nn.Parameter(torch.randn(2))], lr=0.1, rounding_seed=0)  # the keyword exists
    with pytest.raises((TypeError, ValueError), match="rounding_seed"):
        fusedbun.FusionOptimizer([nn.Parameter(torch.randn(2))], lr=0.1, rounding_seed=value)
    with pytest.raises((TypeError, ValueError), match="rounding_seed"):
        fusedbun.FusionOptimizer([{"params": [nn.Parameter(torch.randn(2))], "rounding_seed": value}], lr=0.1)


def test_largest_rounding_seed_is_accepted():
    fusedbun.FusionOptimizer([nn.Parameter(torch.randn(2))], lr=0.1, rounding_seed=2**63 - 1, stochastic_rounding=True)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_one_step_is_exactly_stochastic_round_of_the_fp32_update_in_every_engine(engine, dtype):
    """Point 3 of the API: key = position in the optimizer, step = the step count after the increment, the
    seed from the group; 0-D to 4-D parameters, two steps."""
    gen = torch.Generator().manual_seed(10)
    params = [low_param(s, dtype, gen) for s in SHAPES]
    seed = 2024
    opt = fusedbun.FusionOptimizer(params, lr=LR_EXACT, stochastic_rounding=True, rounding_seed=seed, **EXACT, **engine)
    differs_from_nearest = 0
    for step in (1, 2):
        grads = [nonzero_grad(s, dtype, gen) for s in SHAPES]
        expected = []
        for k, (p, g) in enumerate(zip(params, grads)):
            exact = p.detach().float() - LR_EXACT * g.float()
            expected.append(sr(exact, dtype, seed=seed, key=k, step=step))
            differs_from_nearest += int((bits(expected[-1]) != bits(exact.to(dtype))).sum())
            p.grad = g
        opt.step()
        for k, (p, e) in enumerate(zip(params, expected)):
            assert same_bits(p.detach(), e), f"step {step}, parameter {k} {tuple(p.shape)}"
    assert differs_from_nearest > 0, "harness: some roundings must differ from round-to-nearest"


def test_keys_follow_the_optimizer_order_across_groups_and_each_group_uses_its_own_seed(engine):
    gen = torch.Generator().manual_seed(11)
    dtype = torch.bfloat16
    shapes = [(4, 5), (6,), (3, 2, 2), (), (8,)]
    params = [low_param(s, dtype, gen) for s in shapes]
    groups = [
        {"params": params[0:2], "rounding_seed": 11},
        {"params": params[2:4], "rounding_seed": 12},
        {"params": params[4:5], "stochastic_rounding": False},
    ]
    opt = fusedbun.FusionOptimizer(groups, lr=LR_EXACT, stochastic_rounding=True, **EXACT, **engine)
    seeds = [11, 11, 12, 12, None]
    grads = [nonzero_grad(s, dtype, gen) for s in shapes]
    expected = []
    for k, (p, g, seed) in enumerate(zip(params, grads, seeds)):
        exact = p.detach().float() - LR_EXACT * g.float()
        expected.append(exact.to(dtype) if seed is None else sr(exact, dtype, seed=seed, key=k, step=1))
        p.grad = g
    opt.step()
    for k, (p, e) in enumerate(zip(params, expected)):
        assert same_bits(p.detach(), e), f"parameter {k}"


def test_turning_stochastic_rounding_off_in_a_group_between_steps_rounds_to_nearest_again():
    gen = torch.Generator().manual_seed(12)
    p = low_param((40, 3), torch.bfloat16, gen)
    opt = fusedbun.FusionOptimizer([p], lr=LR_EXACT, stochastic_rounding=True, rounding_seed=1, **EXACT)
    p.grad = nonzero_grad(p.shape, p.dtype, gen)
    expected = sr(p.detach().float() - LR_EXACT * p.grad.float(), p.dtype, seed=1, key=0, step=1)
    opt.step()
    assert same_bits(p.detach(), expected)
    opt.param_groups[0]["stochastic_rounding"] = False
    p.grad = nonzero_grad(p.shape, p.dtype, gen)
    expected = (p.detach().float() - LR_EXACT * p.grad.float()).to(p.dtype)
    opt.step()
    assert same_bits(p.detach(), expected)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_updates_below_half_an_ulp_move_the_parameter_on_average_where_round_to_nearest_is_stuck(engine, dtype):
    """Why stochastic rounding exists: 1.5 + 1/8 ulp rounds to nearest back to 1.5 forever; rounded
    stochastically, 16 such steps move the mean of 4096 elements by 2 ulps (within Z standard errors)."""
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # spacing in [1, 2)
    lr, steps, n = ulp / 8, 16, 4096
    runs = {}
    for rounding in (False, True):
        p = nn.Parameter(torch.full((n,), 1.5, dtype=dtype))
        opt = fusedbun.FusionOptimizer(
            [p], lr=lr, stochastic_rounding=rounding, rounding_seed=3, **{**EXACT, "eps": 1e-8}, **engine
        )
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
        runs[rounding] = p.detach().double()
    assert (runs[False] == 1.5).all(), "round to nearest: the parameter never moves"
    # Each step adds one ulp with probability 1/8, independently: the mean's variance follows.
    se = ulp * math.sqrt(steps * (1 / 8) * (7 / 8) / n)
    moved = runs[True].mean().item() - 1.5
    assert abs(moved - steps * lr) <= Z * se, f"moved {moved / ulp:.3f} ulps on average, expected {steps * lr / ulp}"
    grid = (runs[True] - 1.5) / ulp
    assert torch.equal(grid, grid.round()), "every value stays a value of the dtype"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", ["defaults", "rms-centralize", "bf16-momentum"])
def test_fp32_and_fp64_parameters_are_bit_identical_with_and_without_the_option(engine, dtype, config):
    cfg = {
        "defaults": {},
        "rms-centralize": dict(use_rms=True, centralize=True),
        "bf16-momentum": dict(momentum_dtype=torch.bfloat16, use_rms=True),
    }[config]
    gen = torch.Generator().manual_seed(13)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(3)]
    result = {}
    for rounding in (False, True):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = fusedbun.FusionOptimizer(params, lr=0.01, stochastic_rounding=rounding, rounding_seed=7, **cfg, **engine)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        result[rounding] = [p.detach().clone() for p in params] + [t for p in params for t in state_tensors(opt, p)]
    assert len(result[False]) == len(result[True])
    for a, b in zip(result[False], result[True]):
        assert same_bits(a, b)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_momentum_and_second_moment_are_never_stochastically_rounded(engine, dtype):
    """With gradients fixed in advance, momentum and second moment do not depend on the parameter: they are
    bit-identical with the option on and off (the momentum buffer of a bf16 parameter is bf16, rounded to
    nearest)."""
    gen = torch.Generator().manual_seed(14)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(3)]
    result = {}
    for rounding in (False, True):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = fusedbun.FusionOptimizer(params, lr=0.01, use_rms=True, stochastic_rounding=rounding, **engine)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        result[rounding] = [t for p in params for t in state_tensors(opt, p)]
    for a, b in zip(result[False], result[True]):
        assert same_bits(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # nonfinite="mask" warns about the NaN/Inf entries
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_masked_and_nonfinite_entries_keep_their_value_and_the_rest_follows_the_exact_rule(engine, dtype):
    eps = 2.0**-10
    gen = torch.Generator().manual_seed(15)
    p = low_param((6, 11), dtype, gen)
    g = nonzero_grad((6, 11), dtype, gen) + torch.sign(torch.randn((6, 11), generator=gen)).to(dtype)  # |g| > eps
    g = torch.where(g.abs() <= eps, torch.ones((), dtype=dtype), g)
    specials = [0.0, eps, -eps, eps / 2, math.nan, math.inf, -math.inf]
    if dtype == torch.bfloat16:
        specials += [2.0**64, -(2.0**70)]  # |g| >= 2**64 is masked (its square overflows fp32)
    flat = g.view(-1)
    for i, v in enumerate(specials):
        flat[5 * i + 1] = v
    gf = g.float()
    mask = (gf.abs() > eps) & (gf.abs() < 2.0**64)  # NaN fails both
    assert int((~mask).sum()) == len(specials), "harness: exactly the special entries are masked"
    before = p.detach().clone()
    expected = sr(p.detach().float() - LR_EXACT * torch.where(mask, gf, 0.0), dtype, seed=8, key=0, step=1)
    opt = fusedbun.FusionOptimizer(
        [p], lr=LR_EXACT, stochastic_rounding=True, rounding_seed=8, **{**EXACT, "eps": eps}, **engine
    )
    p.grad = g
    opt.step()
    assert torch.equal(bits(p)[~mask], bits(before)[~mask]), "masked entries changed"
    assert same_bits(p.detach(), expected)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_same_seed_same_result_and_a_different_seed_a_different_one(engine, dtype):
    gen = torch.Generator().manual_seed(16)
    init = torch.randn(64, 33, generator=gen).to(dtype)
    grads = [torch.randn(64, 33, generator=gen).to(dtype) for _ in range(3)]

    def train(**kw):
        p = nn.Parameter(init.clone())
        opt = fusedbun.FusionOptimizer([p], lr=0.01, use_rms=True, stochastic_rounding=True, **kw, **engine)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    a = train(rounding_seed=3)
    assert same_bits(a, train(rounding_seed=3))
    assert same_bits(train(), train(rounding_seed=0)), "the default seed is 0"
    differ = (bits(a) != bits(train(rounding_seed=4))).double().mean().item()
    assert differ > 0.05, f"only {differ:.3f} of the elements differ between seeds 3 and 4"


def test_row_sparse_lazy_step_equals_the_dense_step_on_a_gradient_zero_elsewhere(engine):
    """nn.Embedding(sparse=True) in bf16, distinct rows per step, momentum_beta=0 and Lambda=0: the sparse
    parameter, its state and the exact rule agree bit for bit (element index = index in the whole table)."""
    dtype, lr, seed = torch.bfloat16, LR_EXACT, 77
    gen = torch.Generator().manual_seed(17)
    emb = nn.Embedding(20, 6, sparse=True).to(dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(20, 6, generator=gen).to(dtype))
    dense = nn.Parameter(emb.weight.detach().clone())
    kw = dict(lr=lr, stochastic_rounding=True, rounding_seed=seed, **EXACT, **engine)
    opt_sparse = fusedbun.FusionOptimizer(emb.parameters(), **kw)
    opt_dense = fusedbun.FusionOptimizer([dense], **kw)
    for step, rows in enumerate([[1, 4, 7, 15], [0, 4, 19], [7, 8, 9, 10, 11]], start=1):
        idx = torch.tensor(rows)
        w = nonzero_grad((len(rows), 6), dtype, gen)
        (emb(idx) * w).sum().backward()
        assert emb.weight.grad.is_sparse
        dense.grad = emb.weight.grad.to_dense()
        expected = sr(dense.detach().float() - lr * dense.grad.float(), dtype, seed=seed, key=0, step=step)
        opt_sparse.step()
        opt_dense.step()
        emb.zero_grad(set_to_none=True)
        assert same_bits(emb.weight.detach(), dense.detach()), f"step {step}: sparse and dense steps differ"
        assert same_bits(emb.weight.detach(), expected), f"step {step}: not the exact rule"
        for a, b in zip(state_tensors(opt_sparse, emb.weight), state_tensors(opt_dense, dense)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_resume_from_state_dict_continues_bit_for_bit_with_stochastic_rounding(engine, dtype):
    gen = torch.Generator().manual_seed(18)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(6)]
    kw = dict(lr=0.01, use_rms=True, centralize=True, stochastic_rounding=True, rounding_seed=99, **engine)

    def run(params, opt, gs):
        for step_grads in gs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    params = [nn.Parameter(t.clone()) for t in init]
    opt = fusedbun.FusionOptimizer(params, **kw)
    run(params, opt, grads[:3])
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(params, opt, grads[3:])

    resumed = [nn.Parameter(t.clone()) for t in saved_params]
    opt2 = fusedbun.FusionOptimizer(resumed, **{**kw, "rounding_seed": 0})  # the checkpoint brings the seed back
    opt2.load_state_dict(saved_state)
    assert opt2.param_groups[0]["rounding_seed"] == 99
    run(resumed, opt2, grads[3:])
    for a, b in zip(params, resumed):
        assert same_bits(a.detach(), b.detach())
    for a, b in zip(params, resumed):
        for s, t in zip(state_tensors(opt, a), state_tensors(opt2, b)):
            assert same_bits(s, t)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("config", list(GENERAL_CONFIGS))
def test_every_engine_agrees_with_the_reference_within_one_ulp_on_few_elements(engine, dtype, config):
    """Outside the exact regime engines may differ by fp32 rounding (fused multiply-add): after 3 steps at
    most 1% of the elements may differ, each by one unit in the last place."""
    gen = torch.Generator().manual_seed(19)
    shapes = [(), (33,), (17, 12), (3, 5, 7), (2, 3, 4, 5)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3)]
    results = []
    for kw in ({"foreach": False}, engine):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = fusedbun.FusionOptimizer(
            params, lr=0.01, stochastic_rounding=True, rounding_seed=5, **GENERAL_CONFIGS[config], **kw
        )
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in params]))
    ref, got = results
    dist_ulps = (ordered(ref) - ordered(got)).abs()
    assert dist_ulps.max() <= 1, f"an element differs by {dist_ulps.max()} ulps"
    assert (dist_ulps > 0).double().mean() <= 0.01, f"{(dist_ulps > 0).sum()} of {len(ref)} elements differ"


# ----------------------------------------------------------------------------------------------------
# CUDA (the Triton kernel): the same bits as on the CPU, since the rounding is a function of its arguments.

CUDA_ENGINES = [
    pytest.param({"foreach": False}, id="single"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"fused": True}, id="fused"),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_stochastic_round_of_a_cuda_tensor_gives_the_bits_of_the_cpu(dtype):
    x = random_values(dtype, 10000, torch.Generator().manual_seed(20)).view(100, 100)
    got = sr(x.cuda(), dtype, seed=12, key=3, step=7)
    assert got.device.type == "cuda"
    assert same_bits(got.cpu(), sr(x, dtype, seed=12, key=3, step=7))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_engine", CUDA_ENGINES)
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_cuda_engines_give_exactly_stochastic_round_of_the_fp32_update(cuda_engine, dtype):
    gen = torch.Generator().manual_seed(21)
    shapes = SHAPES + [(1000, 257)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [nonzero_grad(s, dtype, gen) for s in shapes]
    params = [nn.Parameter(t.cuda()) for t in init]
    opt = fusedbun.FusionOptimizer(
        params, lr=LR_EXACT, stochastic_rounding=True, rounding_seed=5, **EXACT, **cuda_engine
    )
    for p, g in zip(params, grads):
        p.grad = g.cuda()
    opt.step()
    for k, (p, t, g) in enumerate(zip(params, init, grads)):
        want = sr(t.float() - LR_EXACT * g.float(), dtype, seed=5, key=k, step=1)
        assert same_bits(p.detach().cpu(), want), f"parameter {k} {tuple(t.shape)}"


# ----------------------------------------------------------------------------------------------------
# Data parallel replicas (DDP, gloo, 2 processes) and DTensor shards, in one job.

_HAS_GLOO = dist.is_available() and dist.is_gloo_available()
DDP_STEPS, DDP_BATCH, DDP_LR, DDP_SEED = 4, 8, 0.05, 31337
DDP_CONFIG = dict(use_rms=True, centralize=True, stochastic_rounding=True, rounding_seed=DDP_SEED)
DTENSOR_SHAPES = [(5, 7), (7, 3), (3, 4, 2), (6,)]


def ddp_engines() -> list[dict]:
    engines = [{"foreach": False}, {"foreach": True}]
    try:
        from fusedbun.engines import fused_cpu

        if not fused_cpu.unavailable_reason():
            engines.append({"fused": True})
    except Exception:  # noqa: BLE001
        pass
    return engines


class BfNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_bf_net() -> BfNet:
    torch.manual_seed(0)
    return BfNet().to(torch.bfloat16)


def ddp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(DDP_BATCH, 6, generator=gen).bfloat16(), torch.randn(DDP_BATCH, 3, generator=gen).bfloat16())
        for _ in range(DDP_STEPS)
    ]


def ddp_loss(net, x, y, rank, world):
    rows = DDP_BATCH // world
    sl = slice(rank * rows, (rank + 1) * rows)
    return nn.functional.mse_loss(net(x[sl]), y[sl])


def ddp_single_process_reference(engine: dict) -> dict[str, torch.Tensor]:
    """What DDP computes, in one process: each rank's half-batch gradient divided by the world size, the two
    summed (in fp32, rounded once to bf16, as gloo's bf16 sum of two values does), then the same step."""
    net = make_bf_net()
    opt = fusedbun.FusionOptimizer(net.parameters(), lr=DDP_LR, **DDP_CONFIG, **engine)
    for x, y in ddp_batches():
        halves = []
        for rank in range(2):
            ddp_loss(net, x, y, rank, 2).backward()
            halves.append({n: p.grad / 2 for n, p in net.named_parameters()})
            net.zero_grad(set_to_none=True)
        for n, p in net.named_parameters():
            p.grad = (halves[0][n].float() + halves[1][n].float()).to(torch.bfloat16)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def dtensor_inputs() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial bf16 values and 2 steps of nonzero gradients, the same in every process (the DTensor job)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen).bfloat16() for s in DTENSOR_SHAPES]
    grads = [[nonzero_grad(s, torch.bfloat16, gen) for s in DTENSOR_SHAPES] for _ in range(2)]
    return init, grads


def _attempt(results: dict, name: str, fn, *args) -> None:
    """Record fn(*args)'s value, or the exception it raised (re-raised by the test that reads it)."""
    try:
        results[name] = {"value": fn(*args)}
    except Exception as exc:  # noqa: BLE001
        results[name] = {"error": exc}


def sr_replica_job(rank: int, world: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict = {}

    def ddp_run(engine):
        net = make_bf_net()
        ddp = DDP(net)  # gloo all-reduces bf16 gradients (checked on torch 2.13)
        opt = fusedbun.FusionOptimizer(ddp.parameters(), lr=DDP_LR, **DDP_CONFIG, **engine)
        # Different global RNG states on the ranks: rounding must not draw from torch's generator.
        torch.manual_seed(1000 + rank)
        for x, y in ddp_batches():
            ddp_loss(ddp, x, y, rank, world).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {n: p.detach().clone() for n, p in net.named_parameters()}

    for i, engine in enumerate(ddp_engines()):
        _attempt(results, f"ddp-{i}", ddp_run, engine)

    mesh = init_device_mesh("cpu", (world,))

    def dtensor_run(placement):
        init, grads = dtensor_inputs()
        place = {"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Replicate": Replicate()}[placement]

        def fit(t):
            return [place if not hasattr(place, "dim") or place.dim < t.dim() else Replicate()]

        params = [nn.Parameter(distribute_tensor(t.clone(), mesh, fit(t))) for t in init]
        opt = fusedbun.FusionOptimizer(params, lr=LR_EXACT, stochastic_rounding=True, rounding_seed=DDP_SEED, **EXACT)
        torch.manual_seed(2000 + rank)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = distribute_tensor(g.clone(), mesh, p.placements)
            opt.step()
        return [p.full_tensor().detach().clone() for p in params]

    for placement in ("Shard(0)", "Shard(1)", "Replicate"):
        _attempt(results, f"dtensor-{placement}", dtensor_run, placement)

    torch.save(results, os.path.join(out_dir, f"sr-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    if not _HAS_GLOO:
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("sr_replicas")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        launch(sr_replica_job, 2, out, str(out))
    return [torch.load(out / f"sr-rank{r}.pt", weights_only=False) for r in range(2)]


def _value(record: dict):
    if "error" in record:
        raise record["error"]
    return record["value"]


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("i", range(3), ids=["single", "foreach", "fused"])
def test_ddp_replicas_stay_bit_identical_and_equal_one_process(replicas, i):
    """2 gloo processes, a bf16 model under DDP, stochastic rounding on, each rank seeding torch's global
    generator differently: after 4 steps the ranks' parameters are bit-identical, and equal to one process
    that reduces the two half-batch gradients the same way."""
    engines = ddp_engines()
    if i >= len(engines):
        pytest.skip("fused CPU engine unavailable")
    rank0, rank1 = _value(replicas[0][f"ddp-{i}"]), _value(replicas[1][f"ddp-{i}"])
    for name in rank0:
        assert same_bits(rank0[name], rank1[name]), f"{name}: the replicas differ"
    ref = ddp_single_process_reference(engines[i])
    for name in rank0:
        assert same_bits(rank0[name], ref[name]), f"{name}: DDP differs from one process"


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("placement", ["Shard(0)", "Shard(1)", "Replicate"])
def test_dtensor_shards_round_with_the_index_in_the_full_tensor(replicas, placement):
    """Hand-distributed bf16 DTensors on 2 ranks, the exact regime: the full tensors equal, bit for bit,
    stochastic_round of the fp32 update of the unsharded tensors."""
    init, grads = dtensor_inputs()
    expected = [t.clone() for t in init]
    for step, gs in enumerate(grads, start=1):
        expected = [
            sr(p.float() - LR_EXACT * g.float(), torch.bfloat16, seed=DDP_SEED, key=k, step=step)
            for k, (p, g) in enumerate(zip(expected, gs))
        ]
    for rank in range(2):
        got = _value(replicas[rank][f"dtensor-{placement}"])
        for k, (a, b) in enumerate(zip(got, expected)):
            assert same_bits(a, b), f"rank {rank}, parameter {k} {tuple(b.shape)}"
