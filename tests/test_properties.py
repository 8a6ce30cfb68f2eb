"""Property-based tests (hypothesis) over shapes, dtypes, gradient magnitudes and hyperparameters.

Each property is a consequence of the algorithm contract (book/contract.md) that must hold for every
input, not only for the hand-picked ones of ``test_rule.py``:

- finite inputs never give non-finite parameters or state (gradients from 1e-30 to 1e18, fp16's range);
- entries under the eps mask never move their second-moment statistic (dense: exactly; SM3: a masked
  entry's per-element bound ``min_k a_k`` never drops, and a fully masked step leaves every accumulator
  exactly where it was, since min-then-amax of accumulators that are maxima gives them back);
- the state of an N-D tensor holds the sum of its dims (beyond the momentum), nothing of parameter size,
  and a one-number step count;
- centralized gradients have zero mean over every dim but the first;
- SM3: every ``nu`` element is <= each accumulator covering it, each accumulator is attained, they all
  share the same maximum; after the first step they are the slice maxima of the masked squared gradient.

Every property that steps an optimizer draws the engine too. The engines' agreement with the reference
loop, as a property, is in ``test_engines.py``; the strategies are in ``strategies.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import AVAILABLE_ENGINES
from helpers import accumulators
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, EXPONENTS, SCALE, SETTINGS, gradient, hyperparameters, shapes

import fusedbun
from fusedbun import FusionOptimizer
from fusedbun.sm3 import sm3_accumulators, sm3_min


def all_finite(opt, params) -> bool:
    for p in params:
        if not torch.isfinite(p).all():
            return False
        st_ = opt.state.get(p, {})
        tensors = accumulators(st_) if st_ else []
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
    accs_before = [a.clone() for a in accumulators(opt.state[p])]
    bound_before = sm3_min(accs_before).expand(shape)
    p.grad = g
    opt.step()
    accs_after = accumulators(opt.state[p])
    bound_after = sm3_min(accs_after).expand(shape)
    assert (bound_after[masked] >= bound_before[masked]).all(), "a masked entry's bound dropped"
    if fully_masked:
        assert torch.equal(bound_after, bound_before), "a fully masked step changed the per-element bound"
        for k, (a, b) in enumerate(zip(accs_after, accs_before)):
            assert torch.equal(a, b), f"a fully masked step moved accumulator {k} (nothing may decay)"


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
    numbers = sum(a.numel() for a in accumulators(state))
    assert numbers == (sum(shape) if p.dim() >= 2 else p.numel())
    assert state["step"].numel() == 1
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
    for k, a in enumerate(accumulators(opt.state[p])):
        expected = sq.amax(dim=dims[:k] + dims[k + 1 :], keepdim=True)
        if dtype == torch.float64:  # fp64 arithmetic, stored in fp32: one rounding apart
            torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)
        else:
            assert torch.equal(a, expected), f"accumulator {k}"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
