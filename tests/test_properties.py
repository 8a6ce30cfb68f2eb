"""Property-based tests (hypothesis) over shapes, dtypes, gradient magnitudes and hyperparameters.

Each property is a consequence of the algorithm contract (book/contract.md) that must hold for every input, not only for the
hand-picked ones of ``test_spec.py``:

- finite inputs never give non-finite parameters or state (gradients from 1e-30 to 1e18, fp16's range);
- entries under the eps mask never move their second-moment statistic (dense: exactly; SM3: the
  per-element bound ``min_k a_k`` of a fully masked step is unchanged, and a masked entry's never drops);
- the state of an N-D tensor holds the sum of its dims (beyond the momentum), nothing of parameter size;
- centralized gradients have zero mean over every dim but the first;
- SM3: every ``nu`` element is <= each accumulator covering it, each accumulator is attained, they all
  share the same maximum; after the first step they are the slice maxima of the masked squared gradient;
- the engines agree with the reference loop.

The gradients are drawn from a seeded torch generator whose seed, scale and zero fraction hypothesis
chooses, so failing examples shrink to a (shape, dtype, scale, hyperparameters) tuple.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from conftest import AVAILABLE_ENGINES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedbun
from fusedbun import FusionOptimizer
from fusedbun.sm3 import sm3_accumulators, sm3_min

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
# FUSEDBUN_HYPOTHESIS_SCALE=50 runs 50 times as many examples (a soak run); the default keeps the file quick
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


def accumulators_of(state) -> list[torch.Tensor]:
    h = state["exp_hessian"]
    return list(h) if isinstance(h, (list, tuple)) else [h]


def all_finite(opt, params) -> bool:
    for p in params:
        if not torch.isfinite(p).all():
            return False
        st_ = opt.state.get(p, {})
        tensors = accumulators_of(st_) if st_ else []
        if "momentum_buffer" in st_:
            tensors.append(st_["momentum_buffer"])
        if not all(torch.isfinite(t).all() for t in tensors):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------
# finite in, finite out
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=80 * SCALE, **SETTINGS)
@given(
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    hyper=hyperparameters(),
    engine=st.sampled_from(AVAILABLE_ENGINES),
    seed=st.integers(0, 2**31 - 1),
    exp_frac=st.floats(0, 1),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
    steps=st.integers(1, 3),
)
def test_finite_inputs_never_give_nonfinite_params_or_state(
    shape, dtype, hyper, engine, seed, exp_frac, zero_frac, steps
):
    lo, hi = EXPONENTS[dtype]
    exponent = round(lo + exp_frac * (hi - lo))
    if dtype == torch.float16 and not hyper["use_rms"]:
        hyper["lr"] = min(hyper["lr"], 0.1)  # 3 raw steps of lr * |g| <= 3e4 must stay inside fp16's range
    p = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()
    opt = FusionOptimizer([p], **hyper, **engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sum of squares past fp32 is skipped, with a warning
        for t in range(steps):
            p.grad = gradient(shape, dtype, seed + t, exponent, zero_frac)
            opt.step()
    assert all_finite(opt, [p]), f"non-finite output from finite input (grad scale 1e{exponent})"


# ----------------------------------------------------------------------------------------------------------
# the eps mask and the second moment
# ----------------------------------------------------------------------------------------------------------


def masked_probe(shape, seed, eps, dtype):
    """A gradient whose entries are either clearly masked (0 or |g| <= eps/4) or clearly not (|g| >= 4 eps)."""
    gen = torch.Generator().manual_seed(seed)
    big = (
        (torch.rand(shape, generator=gen, dtype=torch.float64) * 3 + 4)
        * eps
        * 10.0 ** torch.randint(0, 4, shape, generator=gen)
    )
    tiny = torch.rand(shape, generator=gen, dtype=torch.float64) * eps / 4
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    r = torch.rand(shape, generator=gen)
    g = torch.where(r < 0.3, torch.zeros_like(big), torch.where(r < 0.6, tiny, big)) * sign
    masked = r < 0.6
    return g.to(dtype), masked


@settings(max_examples=50 * SCALE, **SETTINGS)
@given(
    shape=shapes(max_dims=1),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    hyper=hyperparameters(),
    engine=st.sampled_from(AVAILABLE_ENGINES),
    seed=st.integers(0, 2**31 - 1),
    history=st.integers(0, 3),
)
def test_masked_entries_of_a_dense_second_moment_never_move(shape, dtype, hyper, engine, seed, history):
    hyper["eps"] = max(hyper["eps"], 1e-20)
    p = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()
    opt = FusionOptimizer([p], **hyper, **engine)
    for t in range(history):
        p.grad = gradient(shape, dtype, seed + t, 0, 0.2)
        opt.step()
    g, masked = masked_probe(shape, seed ^ 0x5EED, hyper["eps"], dtype)
    p.grad = g
    before = opt.state[p]["exp_hessian"].clone() if history else torch.zeros(shape)
    opt.step()
    after = opt.state[p]["exp_hessian"]
    assert torch.equal(after[masked], before[masked]), "a masked entry's second moment moved"


@settings(max_examples=50 * SCALE, **SETTINGS)
@given(
    shape=shapes(min_dims=2, allow_empty=False),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    hyper=hyperparameters(),
    engine=st.sampled_from(AVAILABLE_ENGINES),
    seed=st.integers(0, 2**31 - 1),
    history=st.integers(1, 3),
    fully_masked=st.booleans(),
)
def test_masked_entries_never_lower_their_sm3_bound_and_a_fully_masked_step_keeps_it(
    shape, dtype, hyper, engine, seed, history, fully_masked
):
    hyper.update(centralize=False, eps=max(hyper["eps"], 1e-20))  # the probe's mask is then the gradient's own
    p = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()
    opt = FusionOptimizer([p], **hyper, **engine)
    for t in range(history):
        p.grad = gradient(shape, dtype, seed + t, 0, 0.2)
        opt.step()
    g, masked = masked_probe(shape, seed ^ 0x5EED, hyper["eps"], dtype)
    if fully_masked:
        g, masked = torch.where(masked, g, torch.zeros_like(g)), torch.ones(shape, dtype=torch.bool)
    accs_before = [a.clone() for a in accumulators_of(opt.state[p])]
    bound_before = sm3_min(accs_before).expand(shape)
    p.grad = g
    opt.step()
    accs_after = accumulators_of(opt.state[p])
    bound_after = sm3_min(accs_after).expand(shape)
    assert (bound_after[masked] >= bound_before[masked]).all(), "a masked entry's bound dropped"
    if fully_masked:
        assert torch.equal(bound_after, bound_before), "a fully masked step changed the per-element bound"
        for a, b in zip(accs_after, accs_before):
            assert (a <= b).all(), "a fully masked step raised an accumulator"


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    momentum_beta=st.sampled_from([0.0, 0.9]),
    momentum_dtype=st.sampled_from([None, torch.bfloat16]),
    engine=st.sampled_from(AVAILABLE_ENGINES),
)
def test_state_of_an_nd_tensor_holds_the_sum_of_its_dims(shape, dtype, momentum_beta, momentum_dtype, engine):
    p = torch.zeros(shape, dtype=dtype, requires_grad=True)
    opt = FusionOptimizer([p], lr=0.1, momentum_beta=momentum_beta, momentum_dtype=momentum_dtype, **engine)
    p.grad = torch.ones(shape, dtype=dtype)
    opt.step()
    state = opt.state[p]
    assert set(state) <= {"step", "exp_hessian", "momentum_buffer"}
    assert ("momentum_buffer" in state) == (momentum_beta > 0)
    numbers = sum(a.numel() for a in accumulators_of(state))
    assert numbers == (sum(shape) if p.dim() >= 2 else p.numel())
    if momentum_beta > 0:
        assert state["momentum_buffer"].shape == p.shape


# ----------------------------------------------------------------------------------------------------------
# centralization
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(
    shape=shapes(max_dims=5, allow_empty=False),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-20, 15),
    offset=st.floats(-10, 10),
)
def test_centralized_gradients_have_zero_mean_over_every_dim_but_the_first(shape, dtype, seed, exponent, offset):
    g = ((gradient(shape, torch.float64, seed, 0, 0.1) + offset) * 10.0**exponent).to(dtype)
    original = g.clone()
    c = fusedbun.centralize(g)
    assert torch.equal(g, original), "centralize modified its input"
    if g.dim() <= 1:
        assert c is g
        return
    dims = tuple(range(1, g.dim()))
    mean = c.double().mean(dim=dims)
    # each output element carries one rounding of the subtraction: |mean| <= ulp of the largest magnitude
    scale = g.double().abs().amax(dim=dims) + g.double().mean(dim=dims).abs()
    tol = 2 * torch.finfo(dtype).eps * scale + torch.finfo(dtype).tiny
    assert (mean.abs() <= tol).all(), f"max |mean| {mean.abs().max().item():.3g}"


# ----------------------------------------------------------------------------------------------------------
# SM3: nu under every cover, covers attained
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(
    shape=shapes(min_dims=2, max_dims=4),
    seed=st.integers(0, 2**31 - 1),
    history=st.integers(0, 4),
    beta=st.floats(0, 1, exclude_max=True),
    eps=st.sampled_from([0.0, 1e-3, 0.5]),
)
def test_sm3_nu_is_under_each_covering_accumulator_and_each_accumulator_is_attained(shape, seed, history, beta, eps):
    p = torch.zeros(shape)
    accs = sm3_accumulators(p)
    for t in range(history + 1):
        g = gradient(shape, torch.float32, seed + t, 0, 0.2)
        mask = g.abs() > eps
        g = g * mask
        prev = sm3_min(accs).expand(shape).clone()
        nu = fusedbun.sm3_second_moment_(accs, g, mask, beta=beta if t else 0.0)
        assert (nu >= 0).all()
        assert torch.equal(nu[~mask], prev[~mask]), "a masked entry's nu is not its carried-over bound"
        for k, a in enumerate(accs):
            assert (nu <= a).all(), f"nu exceeds accumulator {k}"
        if p.numel():
            dims = tuple(range(p.dim()))
            for k, a in enumerate(accs):
                attained = nu.amax(dim=dims[:k] + dims[k + 1 :], keepdim=True)
                assert torch.equal(a, attained), f"accumulator {k} is not the maximum of the nu it covers"
            top = {a.max().item() for a in accs}
            assert len(top) == 1, "the accumulators disagree on the largest nu"


@settings(max_examples=50 * SCALE, **SETTINGS)
@given(
    shape=shapes(min_dims=2, max_dims=4, allow_empty=False),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    engine=st.sampled_from(AVAILABLE_ENGINES),
    seed=st.integers(0, 2**31 - 1),
    eps=st.sampled_from([1e-8, 1e-3, 0.25]),
    maximize=st.booleans(),
)
def test_first_step_accumulators_are_the_slice_maxima_of_the_masked_squared_gradient(
    shape, dtype, engine, seed, eps, maximize
):
    g, _ = masked_probe(shape, seed, eps, dtype)  # no entry near the mask threshold
    p = torch.zeros(shape, dtype=dtype, requires_grad=True)
    opt = FusionOptimizer([p], lr=0.1, eps=eps, maximize=maximize, **engine)
    p.grad = g
    opt.step()
    g32 = g.to(torch.float64 if dtype == torch.float64 else torch.float32)
    sq = torch.where(g32.abs() > eps, g32 * g32, torch.zeros_like(g32)).float()
    dims = tuple(range(len(shape)))
    for k, a in enumerate(accumulators_of(opt.state[p])):
        expected = sq.amax(dim=dims[:k] + dims[k + 1 :], keepdim=True)
        if dtype == torch.float64:  # fp64 arithmetic, stored in fp32: one rounding apart
            torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)
        else:
            assert torch.equal(a, expected), f"accumulator {k}"


# ----------------------------------------------------------------------------------------------------------
# engines agree
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(
    shapes_=st.lists(shapes(), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    hyper=hyperparameters(),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-6, 4),
)
def test_every_engine_agrees_with_the_reference_loop(shapes_, dtype, hyper, seed, exponent):
    hyper["eps"] = max(hyper["eps"], 1e-12)  # far from the gradients' magnitudes: no entry sits at the threshold
    runs = []
    for engine in AVAILABLE_ENGINES:
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes_]
        # a bound on the magnitude of every intermediate of an entry's updates: |p0| + lr * sum_t |u_t|
        bound = [p.detach().double().abs() for p in params]
        opt = FusionOptimizer(params, **hyper, **engine)
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = gradient(p.shape, dtype, seed + 7 * t + i, exponent, 0.2)
                u = 2.0 if hyper["use_rms"] else p.grad.double().abs()  # |g / (sqrt(nu) + eps)| <= t ** (c / 2) < 2
                bound[i] = bound[i] + hyper["lr"] * u
            opt.step()
        runs.append((params, opt, bound))
    (ref, o_ref, bound), others = runs[0], runs[1:]
    low = dtype in (torch.bfloat16, torch.float16)
    for params, opt, _ in others:
        for a, b, m in zip(params, ref, bound):
            x, y = a.detach().double(), b.detach().double()
            # engines may round differently (FMA, order of operations): a few ulps of the largest intermediate,
            # and in low precision one ulp of the stored result on top
            tol = (4 * torch.finfo(dtype).eps if low else 1e-5) * (m + y.abs())
            assert ((x - y).abs() <= tol + 1e-30).all(), f"{tuple(a.shape)} max diff {(x - y).abs().max().item():.3g}"
            for u, v in zip(accumulators_of(opt.state[a]), accumulators_of(o_ref.state[b])):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=0)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
