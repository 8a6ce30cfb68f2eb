"""The ``cover="factored"`` option of FusionOptimizer: Adafactor's factorization of the second moment, in
SM3's state.

Written from the option's statement, before the implementation. With ``cover="factored"`` only step 4 of
the rule changes, and only for parameters of two or more dims: from the accumulators ``a_k`` (SM3's
shapes ``[1, ..., n_k, ..., 1]``, fp32), ``S = mean(a_0)``, ``prev = a_0 * (a_1 * ... * a_{d-1}) / S**(d-1)``
(0 while S == 0), ``nu = where(mask, beta_t * prev + (1 - beta_t) * g**2, prev)`` and each ``a_k`` becomes
the mean of ``nu`` over every dim but k. The default ``cover="sm3"`` is the rule as it was; 0-D and 1-D
parameters keep their dense second moment whatever the cover.

The float64 oracle is ``spec_reference.reference_step(..., cover="factored")``. The checks of a step
against it are :func:`expect` / :func:`check` below: ``rule_check``'s, with the accumulators' tolerance of
a mean (an fp32 sum of N terms is exact to about N ulps; a maximum is exact) instead of SM3's.

What is here, by the statement's points: every engine against the oracle (a grid and a hypothesis
property), 0-D/1-D parameters and the explicit default, exactness on a rank-one squared gradient (where
SM3 is not exact), the state's layout and the equal means of the accumulators, validation and per-group
covers, row-sparse gradients, determinism (runs, the C kernel's thread count), state_dict resume,
stochastic rounding, ``step_in_backward``, the non-finite mask, the Triton kernel (compiled, or under
Triton's CPU interpreter as in ``test_fused_cuda.py``), the functional ``fusion``, and FSDP2/DTensor
sharding on two processes (as in ``test_distributed.py``).
"""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
import test_distributed as dist_tests
import test_fused_cuda as triton_tests
import test_step_in_backward as sib_tests
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import AVAILABLE_ENGINES, FUSED_CPU_REASON
from helpers import assert_same_run, assert_tree_equal, clone_params, launch, make_params, run, state_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from rule_check import (
    F64,
    LOW,
    SPARSE_BATCHES,
    STEP_SCALES,
    Expectation,
    assert_within,
    dense_twin_step,
    dtype_id,
    group_hp,
    group_of,
    hessian_of,
    make_grad,
    set_grad,
    shape_id,
    sparse_batch_grad,
    steps_taken,
    verify,
)
from spec_reference import (
    RefState,
    accumulator_shape,
    factored_cover,
    factored_prev,
    reference_step,
    sm3_prev,
)
from strategies import SCALE, SETTINGS, gradient, hyperparameters, shapes

import fusedbun
from fusedbun import FusionOptimizer

U32 = 2.0**-24  # the unit roundoff of fp32

# ----------------------------------------------------------------------------------------------------------
# a step against the float64 oracle, on any device
# ----------------------------------------------------------------------------------------------------------


def _cpu64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().to(device="cpu", dtype=F64).clone()


def cover_of(opt, p) -> str:
    return group_of(opt, p).get("cover", "sm3")


def expect(opt, p, momentum_dtype: torch.dtype | None = None) -> Expectation:
    """Call before ``opt.step()``: the oracle's result of the coming step for ``p``, with its group's cover
    (``rule_check.expect_step`` with the cover, and the state read to the CPU)."""
    group = group_of(opt, p)
    t0 = steps_taken(opt, p)
    pre = None
    if t0:
        st_ = opt.state[p]
        h = st_["exp_hessian"]
        h = _cpu64(h) if isinstance(h, torch.Tensor) else [_cpu64(a) for a in h]
        pre = RefState(exp_hessian=h, momentum_buffer=_cpu64(st_.get("momentum_buffer")))
    grad = p.grad.detach().cpu()
    grad = grad.to_dense() if grad.is_sparse else grad
    hp = group_hp(group)
    ref = reference_step(p.detach().cpu(), grad, pre, t0 + 1, cover=group.get("cover", "sm3"), **hp)
    pre_m = pre.momentum_buffer if pre is not None and pre.momentum_buffer is not None else None
    pre_m = pre_m if pre_m is not None else torch.zeros(p.shape, dtype=F64)
    return Expectation(p, t0 + 1, ref, hp, _cpu64(p), pre_m, momentum_dtype or p.dtype)


def accumulator_rtol(shape, k: int, cover: str) -> float:
    """Relative tolerance of a_k after one step from the same state. SM3's a_k is a maximum (exact after the
    fp32 rounding of nu: rule_check's 2e-6). The factored a_k is a mean of the N = numel / n_k entries of
    nu: an fp32 sum of N non-negative terms is within about N ulps of the exact sum, and each term (prev
    from n_0 + 2d roundings, then nu) within a few more; four times that bound."""
    if cover != "factored":
        return 2e-6
    n = math.prod(shape)
    terms = n // shape[k] if shape[k] else 0
    return 4 * (terms + shape[0] + 2 * len(shape) + 4) * U32


def check_hessian(opt, e: Expectation, what: str = "") -> None:
    p, ref = e.p, e.ref
    tag = f"{what}step {e.t} {tuple(p.shape)} {dtype_id(p.dtype)}"
    assert steps_taken(opt, p) == e.t, f"{tag}: state['step'] is {steps_taken(opt, p)}, expected {e.t}"
    h = hessian_of(opt, p)  # the documented layout: shapes and fp32 checked there
    if p.dim() <= 1:
        assert_within(f"{tag} exp_hessian", h.cpu(), ref.exp_hessian, 2e-6 * ref.exp_hessian.abs() + 1e-30)
        return
    cover = cover_of(opt, p)
    for k, (a, ra) in enumerate(zip(h, ref.exp_hessian)):
        rtol = accumulator_rtol(p.shape, k, cover)
        assert_within(f"{tag} exp_hessian a_{k} ({cover})", a.cpu(), ra, rtol * ra.abs() + 1e-30)


def check(opt, e: Expectation, what: str = "", rows: torch.Tensor | None = None) -> None:
    """Call after ``opt.step()``: step count, accumulators, momentum and parameter match the oracle
    (``rule_check.verify``, with the accumulator tolerance of :func:`accumulator_rtol` for the group's cover).

    ``rows`` (row-sparse gradients): a bool mask over dim 0 of the rows present in the gradient; the parameter
    and momentum are compared with the dense rule on those rows, and must be bit-for-bit unchanged on the others."""
    cover = cover_of(opt, e.p)
    tag = f"{what}{tuple(e.p.shape)} {dtype_id(e.p.dtype)} ({cover}) "
    verify(opt, e, tag, rows, accumulator_rtol=lambda shape, k: accumulator_rtol(shape, k, cover))


def step_and_check(opt, params, what: str = "", momentum_dtype=None) -> None:
    exps = [expect(opt, p, momentum_dtype) for p in params if p.grad is not None]
    opt.step()
    for e in exps:
        check(opt, e, what)


# ----------------------------------------------------------------------------------------------------------
# 1. every engine against the float64 oracle
# ----------------------------------------------------------------------------------------------------------

# 2-D to 4-D with size-1 dims, next to a 1-D and a 0-D parameter in the same group
RULE_SHAPES = [(7, 5), (1, 6), (6, 1), (1, 1), (3, 4, 5), (2, 1, 3, 1), (2, 3, 4, 5), (1, 3, 1, 2), (5,), ()]
RULE_HYPER = [
    pytest.param(dict(eps=0.25), id="eps.25-mom.9-wd.01"),
    pytest.param(dict(eps=0.25, centralize=True, use_rms=True), id="centralize-rms"),
    pytest.param(
        dict(eps=0.25, use_rms=True, maximize=True, momentum_beta=0.0, Lambda=0.0), id="rms-maximize-mom0-wd0"
    ),
    pytest.param(
        dict(eps=0.25, centralize=True, use_rms=True, maximize=True, momentum_beta=0.5, Lambda=0.1, beta_decay=0.5),
        id="all-flags-mom.5-wd.1-c.5",
    ),
    pytest.param(dict(eps=1e-8, use_rms=True, momentum_dtype=torch.bfloat16), id="eps1e-8-rms-bf16m"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("hyper", RULE_HYPER)
def test_every_engine_follows_the_factored_rule_step_by_step(engine, hyper, dtype, gen):
    """eps = 0.25 is exact in every dtype: many entries masked, |g| == eps among them (masked: the mask is
    strict). At step 2 every third parameter has no gradient, so the step counts (and beta_t) differ."""
    hyper = dict(hyper)
    momentum_dtype = hyper.pop("momentum_dtype", None)
    eps = hyper["eps"]
    params = [torch.randn(s, generator=gen, dtype=F64).to(dtype).requires_grad_() for s in RULE_SHAPES]
    opt = FusionOptimizer(params, lr=0.1, cover="factored", momentum_dtype=momentum_dtype, **hyper, **engine)
    assert all(g["cover"] == "factored" for g in opt.param_groups)
    for t, scale in enumerate(STEP_SCALES):
        for i, p in enumerate(params):
            if t == 1 and i % 3 == 0:
                p.grad = None
            else:
                set_grad(p, make_grad(p.shape, gen, eps, scale))
        step_and_check(opt, params, momentum_dtype=momentum_dtype)


@settings(max_examples=25 * SCALE, **SETTINGS)
@given(
    shapes_=st.lists(shapes(min_dims=2, max_dims=4, allow_empty=False), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    hyper=hyperparameters(),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-3, 2),
)
def test_every_engine_follows_the_factored_rule_on_random_inputs(shapes_, dtype, hyper, seed, exponent):
    hyper["eps"] = max(hyper["eps"], 1e-12)  # far below most gradients: few entries sit near the threshold
    for engine in AVAILABLE_ENGINES:
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes_]
        opt = FusionOptimizer(params, cover="factored", **hyper, **engine)
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = gradient(p.shape, dtype, seed + 7 * t + i, exponent, 0.2)
            step_and_check(opt, params, f"{engine} ")


def test_an_empty_parameter_keeps_its_accumulators_and_the_others_follow_the_rule(engine, gen):
    shapes_ = [(3, 0), (0, 4), (2, 0, 3), (5, 4)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes_]
    opt = FusionOptimizer(params, lr=0.1, eps=1e-3, use_rms=True, cover="factored", **engine)
    for scale in STEP_SCALES[:3]:
        for p in params:
            set_grad(p, make_grad(p.shape, gen, 1e-3, scale))
        exp = expect(opt, params[-1])
        opt.step()
        check(opt, exp)
        for p in params[:-1]:
            h = opt.state[p]["exp_hessian"]
            assert len(h) == p.dim()
            for k, a in enumerate(h):
                assert list(a.shape) == accumulator_shape(p.shape, k) and a.dtype == torch.float32
                assert torch.equal(a, torch.zeros_like(a)), f"a_{k} of the empty {tuple(p.shape)} changed: {a}"


# ----------------------------------------------------------------------------------------------------------
# 2-3. what the cover does not change
# ----------------------------------------------------------------------------------------------------------


def _train(shapes_, cover_kw: dict, engine: dict, *, steps: int = 4, dtype=torch.float32, **hyper):
    params = make_params(7, shapes_, dtype)
    opt = FusionOptimizer(params, lr=0.05, **hyper, **cover_kw, **engine)
    run(opt, params, range(steps), seed=3)
    return params, opt


def test_zero_and_one_dim_parameters_are_bit_identical_under_either_cover(engine):
    shapes_ = [(), (6,), (1,), (300,), (5, 4), (2, 3, 4)]  # with 2-D/3-D neighbours in the same group
    for hyper in (dict(use_rms=True, centralize=True), dict(momentum_beta=0.0, maximize=True, eps=0.3)):
        pa, oa = _train(shapes_, {"cover": "sm3"}, engine, **hyper)
        pb, ob = _train(shapes_, {"cover": "factored"}, engine, **hyper)
        for a, b in zip(pa, pb):
            if a.dim() <= 1:
                assert torch.equal(a.detach(), b.detach()), f"{tuple(a.shape)} param differs between the covers"
                assert_tree_equal(dict(oa.state[a]), dict(ob.state[b]), f"state of the {tuple(a.shape)} param")


def test_explicit_sm3_cover_is_the_default_bit_for_bit(engine):
    shapes_ = [(5, 4), (4,), (3, 2, 3), (), (1, 6), (2, 3, 4, 5), (6, 1)]
    default = FusionOptimizer(make_params(0, shapes_), lr=0.1, **engine)
    assert default.param_groups[0]["cover"] == "sm3"
    for hyper in (dict(), dict(use_rms=True, centralize=True, eps=1e-3)):
        pa, oa = _train(shapes_, {}, engine, **hyper)
        pb, ob = _train(shapes_, {"cover": "sm3"}, engine, **hyper)
        assert_same_run(pa, oa, pb, ob)
        assert_tree_equal(oa.state_dict(), ob.state_dict(), "state_dict")


# ----------------------------------------------------------------------------------------------------------
# 4. a rank-one squared gradient is fitted exactly
# ----------------------------------------------------------------------------------------------------------

LEVELS = torch.tensor([0.5, 0.75, 1.0, 1.25, 1.5, 2.0], dtype=F64)  # few mantissa bits: products are exact


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)], ids=shape_id)
def test_a_rank_one_squared_gradient_is_the_next_prev_exactly_with_factored_and_not_with_sm3(engine, shape, gen):
    """g1 = sign * (s_0 outer s_1 [outer s_2]), exact in fp32, so g1**2 is exactly an outer product. After step 1
    (beta_1 = 0, every entry kept) the factored accumulators are the means of g1**2 and give prev = g1**2 at
    step 2. Step 2 takes g1 again with some entries zeroed (masked): nu = g1**2 everywhere (masked: prev;
    kept: beta * g1**2 + (1 - beta) * g1**2), so with use_rms and no momentum or decay the update is
    lr * g2 / (|g1| + eps), and the accumulators do not move. SM3's min over maxima gives a larger prev
    away from the rows and columns that hold the maxima: there the update is smaller."""
    factors = []
    for n in shape:
        f = LEVELS[torch.randint(0, len(LEVELS), (n,), generator=gen)]
        f[0], f[-1] = 0.5, 2.0  # not constant along any dim
        factors.append(f)
    mag = torch.ones(shape, dtype=F64)
    for k, f in enumerate(factors):
        mag = mag * f.view(accumulator_shape(shape, k))
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    g1 = (sign * mag).float()
    sq = g1.double() ** 2  # exact: a rank-one tensor
    assert torch.equal(g1.double(), sign * mag)
    keep = torch.rand(shape, generator=gen) < 0.7
    keep.view(-1)[0], keep.view(-1)[-1] = True, False
    g2 = torch.where(keep, g1, torch.zeros_like(g1))
    lr, eps = 2.0**-4, 1e-8
    init = torch.randn(shape, generator=gen)
    runs = {}
    for cover in ("factored", "sm3"):
        p = init.clone().requires_grad_()
        opt = FusionOptimizer([p], lr=lr, eps=eps, momentum_beta=0.0, Lambda=0.0, use_rms=True, cover=cover, **engine)
        p.grad = g1.clone()
        opt.step()
        acc1 = [a.double().clone() for a in hessian_of(opt, p)]
        p1 = p.detach().double().clone()
        p.grad = g2.clone()
        opt.step()
        runs[cover] = (acc1, p1, p.detach().double().clone(), [a.double().clone() for a in hessian_of(opt, p)])

    move = lr * g2.double() / (sq.sqrt() + eps)  # the step 2 update when prev == g1**2
    acc1, p1, p2, acc2 = runs["factored"]
    for k, (a, want) in enumerate(zip(acc1, factored_cover(sq))):
        torch.testing.assert_close(a, want, rtol=4 * (sq.numel() + 8) * U32, atol=0, msg=f"a_{k} after step 1")
    torch.testing.assert_close(factored_prev(acc1, shape), sq, rtol=1e-5, atol=0, msg="prev of step 2 from a_k")
    assert torch.equal(p2[~keep], p1[~keep]), "masked entries moved"
    assert_within("factored: step 2 update (prev == g1**2)", p2, p1 - move, 1e-6 * p1.abs() + 1e-5 * lr)
    for k, (a, b) in enumerate(zip(acc2, acc1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, msg=f"a_{k} moved at step 2 though nu == g1**2")

    s_acc1, s1, s2, _ = runs["sm3"]
    assert torch.equal(s1, p1), "step 1 does not depend on the cover (prev = 0)"
    gap = (sm3_prev(s_acc1, shape) - sq).abs().max().item()
    assert gap > 0.1, "harness: SM3's prev must differ from g1**2 on this input"
    off = (s2 - (p1 - move)).abs().max().item()
    assert off > 1e-2 * lr, f"SM3 should not recover g1**2 on a rank-one input (off by only {off:.3g})"


# ----------------------------------------------------------------------------------------------------------
# 5. the state: SM3's layout and size; the accumulators share one mean
# ----------------------------------------------------------------------------------------------------------


def _layout(opt, params):
    out, total = [], 0
    for i, p in enumerate(params):
        for key in sorted(opt.state[p]):
            value = opt.state[p][key]
            for k, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                out.append((i, key, k, type(t).__name__, tuple(t.shape), t.dtype, t.device.type))
                total += t.numel() * t.element_size()
    return out, total


def test_state_layout_dtypes_and_bytes_equal_sm3_and_every_accumulator_has_the_same_mean(engine):
    shapes_ = [(7, 5), (3, 4, 5), (2, 3, 4, 5), (1, 6), (6, 1), (6,), ()]
    for dtype, momentum_dtype in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)):
        kw = dict(dtype=dtype, use_rms=True, momentum_dtype=momentum_dtype)
        pa, oa = _train(shapes_, {"cover": "sm3"}, engine, steps=3, **kw)
        pb, ob = _train(shapes_, {"cover": "factored"}, engine, steps=3, **kw)
        (la, ba), (lb, bb) = _layout(oa, pa), _layout(ob, pb)
        assert la == lb, f"{dtype}: state layouts differ"
        assert ba == bb, f"{dtype}: {bb} state bytes with factored, {ba} with sm3"
        for p in pb:
            if p.dim() < 2:
                continue
            means = [a.double().mean().item() for a in ob.state[p]["exp_hessian"]]
            assert means[0] > 0
            for k, m in enumerate(means):
                assert m == pytest.approx(means[0], rel=1e-5), f"{tuple(p.shape)}: mean(a_{k}) {m} vs mean(a_0)"


# ----------------------------------------------------------------------------------------------------------
# 6. validation and per-group covers
# ----------------------------------------------------------------------------------------------------------

BAD_COVERS = [
    ("SM3", ValueError),
    ("Factored", ValueError),
    ("", ValueError),
    ("adafactor", ValueError),
    ("min", ValueError),
    (None, (ValueError, TypeError)),
    (0, (ValueError, TypeError)),
    (True, (ValueError, TypeError)),
    (2.5, (ValueError, TypeError)),
]


def _assert_names_cover_and_valid_values(excinfo) -> None:
    msg = str(excinfo.value)
    assert "cover" in msg and "sm3" in msg and "factored" in msg, f"message does not name cover and its values: {msg}"


@pytest.mark.parametrize("where", ["constructor", "add_param_group", "group-between-steps"])
@pytest.mark.parametrize("value,exc", BAD_COVERS, ids=[repr(v) for v, _ in BAD_COVERS])
def test_invalid_cover_is_refused_naming_cover_and_the_valid_values(where, value, exc):
    if where == "constructor":
        with pytest.raises(exc) as excinfo:
            FusionOptimizer([torch.zeros(3, 2, requires_grad=True)], lr=0.1, cover=value)
        _assert_names_cover_and_valid_values(excinfo)
    elif where == "add_param_group":
        opt = FusionOptimizer([torch.zeros(3, requires_grad=True)], lr=0.1, cover="factored")
        with pytest.raises(exc) as excinfo:
            opt.add_param_group({"params": [torch.zeros(2, 2, requires_grad=True)], "cover": value})
        _assert_names_cover_and_valid_values(excinfo)
        assert len(opt.param_groups) == 1, "the refused group was kept"
    else:  # as every hyperparameter set in a group between steps (test_optim_contract.py)
        params = make_params(29)
        opt = FusionOptimizer(params, lr=0.01, cover="factored")
        run(opt, params, range(2))
        state = copy.deepcopy(opt.state_dict()["state"])
        values = [p.detach().clone() for p in params]
        opt.param_groups[0]["cover"] = value
        with pytest.raises(exc) as excinfo:
            opt.step()
        _assert_names_cover_and_valid_values(excinfo)
        assert all(torch.equal(p.detach(), v) for p, v in zip(params, values)), "a parameter moved"
        assert_tree_equal(opt.state_dict()["state"], state, "state after a refused step")
        opt.param_groups[0]["cover"] = "factored"
        opt.step()


@pytest.mark.parametrize("default", ["sm3", "factored"])
def test_each_param_group_follows_its_own_cover_and_a_change_between_steps_takes_effect(engine, default, gen):
    other = "factored" if default == "sm3" else "sm3"
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(7, 5), (6,), (3, 4, 5), (5, 6), (2, 3, 2, 2)]]
    groups = [{"params": ps[:3]}, {"params": ps[3:], "cover": other, "use_rms": True}]
    opt = FusionOptimizer(groups, lr=0.1, eps=1 / 64, cover=default, **engine)
    assert [g["cover"] for g in opt.param_groups] == [default, other]
    for t in range(4):
        if t == 2:  # swap the covers: the state layout is the same, the rule follows the group
            opt.param_groups[0]["cover"], opt.param_groups[1]["cover"] = other, default
        for x in ps:
            set_grad(x, make_grad(x.shape, gen, 1 / 64, STEP_SCALES[t]))
        step_and_check(opt, ps, f"covers {[g['cover'] for g in opt.param_groups]}: ")


def test_a_state_dict_without_the_cover_key_loads_with_the_default_sm3(engine):
    """As every newer group key (test_optim_contract.py): a checkpoint from before the option, loaded into an
    optimizer built with the defaults, gives sm3 groups that step."""
    params = make_params(6)
    opt = FusionOptimizer(params, lr=0.05, cover="factored", **engine)
    run(opt, params, range(2))
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["cover"]
    twin = clone_params(params)
    opt_twin = FusionOptimizer(twin, lr=0.05, **engine)
    opt_twin.load_state_dict(sd)
    assert opt_twin.param_groups[0]["cover"] == "sm3"
    run(opt_twin, twin, range(2, 3))
    assert all(opt_twin.state[p]["step"].item() == 3 for p in twin)


# ----------------------------------------------------------------------------------------------------------
# 7. row-sparse gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hyper",
    [
        pytest.param(dict(), id="plain"),
        pytest.param(dict(centralize=True, use_rms=True, maximize=True), id="centralize-rms-maximize"),
        pytest.param(dict(use_rms=True, momentum_beta=0.0, Lambda=0.0), id="rms-mom0-wd0"),
    ],
)
def test_sparse_gradient_is_lazy_and_the_accumulators_follow_the_dense_factored_rule(engine, hyper, gen):
    """Absent rows of the weight and momentum are not touched; present rows follow the dense rule; the
    accumulators end where the dense factored rule leaves them for the gradient that is zero outside the
    present rows (absent rows masked: their nu is their prev), compared with the oracle and with the
    engine's own dense step from the same state."""
    hp = dict(lr=0.1, eps=0.05, cover="factored", **hyper)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FusionOptimizer(emb.parameters(), **engine, **hp)
    w = emb.weight
    for rows in SPARSE_BATCHES:
        g_dense, present = sparse_batch_grad(emb, opt, rows, gen)
        e = expect(opt, w)  # the oracle on the dense gradient, zero outside the present rows
        wd, od = dense_twin_step(opt, w, g_dense, engine, hp)  # the engine's own dense rule, same state
        opt.step()
        tag = f"sparse rows {sorted(set(rows))}: "
        check(opt, e, tag, rows=present)
        for k, (a, da) in enumerate(zip(hessian_of(opt, w), hessian_of(od, wd))):
            rtol = accumulator_rtol(w.shape, k, "factored")
            assert_within(f"{tag}a_{k} vs the dense engine", a, da.double(), 2 * rtol * da.double().abs() + 1e-30)
        dense_rows = wd.detach()[present].double()
        assert_within(
            f"{tag}present rows vs dense engine", w.detach()[present], dense_rows, 1e-6 * (dense_rows.abs() + 1)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_sparse_and_dense_params_in_one_group_each_follow_the_factored_rule(dtype, engine):
    torch.manual_seed(5)
    emb = nn.Embedding(12, 5, sparse=True).to(dtype)
    lin = nn.Linear(5, 3).to(dtype)
    params = [emb.weight, *lin.parameters()]
    opt = FusionOptimizer(params, lr=0.05, eps=1 / 64, use_rms=True, centralize=True, cover="factored", **engine)
    for rows in SPARSE_BATCHES:
        rows = sorted(set(rows))  # unique: a bf16 sum of duplicates would be rounded in an unstated precision
        opt.zero_grad()
        lin(emb(torch.tensor(rows))).float().pow(2).mean().backward()
        exps = [expect(opt, p) for p in params]
        present = torch.zeros(12, dtype=torch.bool)
        present[emb.weight.grad.coalesce().indices()[0]] = True
        opt.step()
        check(opt, exps[0], f"sparse rows {rows} ", rows=present)
        for e in exps[1:]:
            check(opt, e, "dense param next to a sparse one, ")


# ----------------------------------------------------------------------------------------------------------
# 8-9. determinism and resume
# ----------------------------------------------------------------------------------------------------------

DET_SHAPES = [(33, 17), (7, 5), (3, 4, 5), (2, 3, 4, 5), (1, 6), (6, 1), (9,), ()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_the_same_run_twice_gives_the_same_bits(engine, dtype):
    hyper = dict(use_rms=True, centralize=True, eps=1e-3)
    pa, oa = _train(DET_SHAPES, {"cover": "factored"}, engine, dtype=dtype, **hyper)
    pb, ob = _train(DET_SHAPES, {"cover": "factored"}, engine, dtype=dtype, **hyper)
    assert_same_run(pa, oa, pb, ob)


@pytest.mark.skipif(bool(FUSED_CPU_REASON), reason=f"fused CPU engine unavailable: {FUSED_CPU_REASON}")
def test_the_fused_cpu_engine_does_not_depend_on_the_thread_count():
    """Tensors of 200k-260k elements, each over three times the kernel's minimum share of a thread (as in
    test_fused_cpu.py's thread tests): rows span several tiles and are split between threads, whose partial
    sums (the means over dim 0) must not depend on the split. 1, 2 and 3 threads give the same bits."""
    from fusedbun.engines import fused_cpu

    shapes_ = [(257, 1029), (1029, 257), (3, 100, 700), (2, 100_001)]
    per_thread = getattr(fused_cpu, "_MIN_ELEMS_PER_THREAD", 1 << 16)
    assert all(math.prod(s) >= 3 * per_thread for s in shapes_), "harness: tensors too small to be split"
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in shapes_]
    grads = [[torch.randn(s, generator=gen) * sc for s in shapes_] for sc in (1.0, 0.3)]
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params = [x.clone().requires_grad_() for x in init]
            opt = FusionOptimizer(params, lr=0.1, use_rms=True, centralize=True, cover="factored", fused=True)
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = g.clone()
                opt.step()
            runs.append((params, opt))
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    (p1, o1) = runs[0]
    ref = [x.clone().requires_grad_() for x in init]  # and the threaded kernel computes the rule
    o_ref = FusionOptimizer(ref, lr=0.1, use_rms=True, centralize=True, cover="factored", foreach=False)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g.clone()
        o_ref.step()
    for a, b in zip(runs[1][0], ref):
        assert_within(
            f"2 threads vs the reference loop {tuple(a.shape)}", a, b.detach().double(), 1e-5 * b.abs() + 1e-6
        )
        for k, (x, y) in enumerate(zip(runs[1][1].state[a]["exp_hessian"], o_ref.state[b]["exp_hessian"])):
            rtol = 2 * accumulator_rtol(a.shape, k, "factored")
            assert_within(f"2 threads vs the reference loop {tuple(a.shape)} a_{k}", x, y.double(), rtol * y.abs())
    for threads, (pn, on) in zip((2, 3), runs[1:]):
        for a, b in zip(p1, pn):
            assert torch.equal(a, b), f"{threads} threads: param {tuple(a.shape)} differs from 1 thread"
            assert_tree_equal(dict(o1.state[a]), dict(on.state[b]), f"{threads} threads: state of {tuple(a.shape)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_state_dict_round_trip_mid_run_resumes_bit_for_bit(engine, dtype):
    """Saved after 3 steps, loaded (directly and through torch.save / torch.load(weights_only=True)) into an
    optimizer built with the other cover: the checkpoint brings the group's cover back, and 3 more steps are
    identical to the uninterrupted run."""
    kw = dict(lr=2.0**-6, use_rms=True, centralize=True, eps=1e-3, **engine)
    params = make_params(1, dtype=dtype)
    opt = FusionOptimizer(params, cover="factored", **kw)
    run(opt, params, range(3))
    sd = opt.state_dict()
    assert [g["cover"] for g in sd["param_groups"]] == ["factored"]
    pristine = copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twins = []
    for source in (sd, loaded):
        twin = clone_params(params)
        opt_twin = FusionOptimizer(twin, cover="sm3", **kw)
        opt_twin.load_state_dict(source)
        assert opt_twin.param_groups[0]["cover"] == "factored", "the checkpoint's cover was not restored"
        twins.append((twin, opt_twin))
    assert_tree_equal(sd, pristine, "state dict after load_state_dict")
    run(opt, params, range(3, 6))
    for twin, opt_twin in twins:
        run(opt_twin, twin, range(3, 6))
        assert_same_run(params, opt, twin, opt_twin)
        assert_tree_equal(opt.state_dict(), opt_twin.state_dict(), "state_dict after resuming")


# ----------------------------------------------------------------------------------------------------------
# 10. stochastic rounding, step_in_backward, the non-finite mask
# ----------------------------------------------------------------------------------------------------------

# One step is exactly p - lr * g in fp32 (no momentum, decay or normalization, a power-of-two lr; eps = 0
# masks only zeros, and the gradients hold none): the update does not depend on the cover, the accumulators do.
EXACT = dict(momentum_beta=0.0, Lambda=0.0, use_rms=False, eps=0.0, centralize=False, maximize=False)
LR_EXACT = 2.0**-5
SR_SHAPES = [(), (7,), (5, 3), (2, 3, 4), (2, 3, 2, 2)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int16)


def _nonzero_grad(shape, dtype, gen) -> torch.Tensor:
    g = torch.randn(shape, generator=gen).to(dtype)
    return torch.where(g == 0, torch.ones((), dtype=dtype), g)


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_stochastic_rounding_with_factored_is_exactly_stochastic_round_of_the_fp32_step(engine, dtype):
    gen = torch.Generator().manual_seed(10)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SR_SHAPES]
    seed = 2024
    opt = FusionOptimizer(
        params, lr=LR_EXACT, stochastic_rounding=True, rounding_seed=seed, cover="factored", **EXACT, **engine
    )
    for step in (1, 2, 3):
        expected = []
        for k, p in enumerate(params):
            p.grad = _nonzero_grad(p.shape, dtype, gen)
            exact = p.detach().float() - LR_EXACT * p.grad.float()
            expected.append(fusedbun.stochastic_round(exact, dtype, seed=seed, key=k, step=step))
        exps = [expect(opt, p) for p in params]
        opt.step()
        for k, (p, want, e) in enumerate(zip(params, expected, exps)):
            assert torch.equal(_bits(p), _bits(want)), f"step {step}, parameter {k} {tuple(p.shape)}"
            check_hessian(opt, e, "stochastic rounding: ")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_stochastic_rounding_leaves_the_factored_state_bit_identical(engine, dtype):
    """With the gradients fixed in advance, momentum and accumulators do not depend on the parameter: they
    are the same bits with stochastic rounding on and off."""
    gen = torch.Generator().manual_seed(14)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SR_SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SR_SHAPES] for _ in range(3)]
    result = {}
    for rounding in (False, True):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = FusionOptimizer(
            params, lr=0.01, use_rms=True, centralize=True, stochastic_rounding=rounding, cover="factored", **engine
        )
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        result[rounding] = [t for p in params for t in state_tensors(opt, p)]
    assert len(result[False]) == len(result[True])
    for i, (a, b) in enumerate(zip(result[False], result[True])):
        assert_tree_equal(a, b, f"state tensor {i}")


@pytest.mark.parametrize("mode", ["one group", "three groups, one sm3"], ids=["one-group", "three-groups-mixed"])
def test_step_in_backward_with_factored_equals_the_plain_loop_step_for_step(engine, mode):
    """test_step_in_backward.py's equivalence, an LR scheduler changing every group's lr at every step."""

    def make_opt(net):
        groups = sib_tests.groups_of(net, "one group" if mode == "one group" else "three groups")
        if mode != "one group":
            groups[2]["cover"] = "sm3"  # fc2.weight (2-D), fc2.bias, the 0-D scale
        return FusionOptimizer(groups, lr=sib_tests.LR, cover="factored", **engine)

    batches = sib_tests.make_batches(sib_tests.STEPS)
    net_a, net_b = sib_tests.make_net(), sib_tests.make_net()
    opt_a, opt_b = make_opt(net_a), make_opt(net_b)
    sched_a, sched_b = sib_tests.make_scheduler(opt_a), sib_tests.make_scheduler(opt_b)
    handle = fusedbun.step_in_backward(opt_b)
    try:
        for i, batch in enumerate(batches):
            sib_tests.plain_step(net_a, opt_a, sched_a, [batch])
            sib_tests.backward_step(net_b, sched_b, [batch])
            sib_tests.assert_same_training(net_a, opt_a, net_b, opt_b, f"step {i + 1}: ")
    finally:
        handle.remove()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # nonfinite="mask" warns about the entries it masks
def test_a_nonfinite_entry_is_masked_like_a_zero_with_the_factored_cover(engine, gen):
    shapes_ = [(6, 5), (3, 4, 5), (2, 1, 3, 2)]
    init = [torch.randn(s, generator=gen) for s in shapes_]
    grads = [[torch.randn(s, generator=gen) for s in shapes_] for _ in range(3)]
    runs = []
    for fill in (float("nan"), 0.0):
        params = [x.clone().requires_grad_() for x in init]
        opt = FusionOptimizer(params, lr=0.05, use_rms=True, cover="factored", **engine)
        for t, gs in enumerate(grads):
            for p, g in zip(params, gs):
                g = g.clone()
                if t == 1:
                    g.view(-1)[[0, 3]] = fill
                    g.view(-1)[5] = float("inf") if fill != 0.0 else 0.0
                p.grad = g
            opt.step()
        runs.append((params, opt))
    assert_same_run(*runs[0], *runs[1])


# ----------------------------------------------------------------------------------------------------------
# 11. the Triton kernel: compiled on a GPU, or run by Triton's CPU interpreter (test_fused_cuda.py's fixture)
# ----------------------------------------------------------------------------------------------------------

kernel_device = triton_tests.kernel_device  # the fixture: "cuda" (compiled) or "cpu" (interpreted)
TRITON_SHAPES = [(), (7,), (5, 37), (1, 9), (9, 1), (3, 4, 5), (2, 1, 3, 4)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's masked lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "hyper",
    [
        pytest.param(dict(eps=1 / 64), id="eps1/64"),
        pytest.param(dict(eps=1 / 64, centralize=True, use_rms=True, maximize=True, Lambda=0.0), id="all-flags"),
        pytest.param(dict(eps=1e-8, use_rms=True, momentum_beta=0.0, beta_decay=0.5), id="rms-mom0"),
    ],
)
def test_the_triton_kernel_follows_the_factored_rule(kernel_device, hyper, dtype):
    gen = torch.Generator().manual_seed(31)
    eps = hyper["eps"]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(dtype).to(kernel_device)) for s in TRITON_SHAPES]
    opt = FusionOptimizer(params, lr=0.05, fused=True, cover="factored", **hyper)
    for scale in STEP_SCALES[:3]:
        for p in params:
            p.grad = make_grad(p.shape, gen, eps, scale).to(dtype).to(kernel_device)
        step_and_check(opt, params, f"triton on {kernel_device}: ")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_the_triton_kernel_matches_the_reference_loop_and_repeats_its_bits(kernel_device):
    """test_fused_cuda.py's side-by-side comparison (each step from the reference's state), with the cover;
    then the same fused run twice gives the same bits (its means are summed in an order fixed by the shape)."""
    hyper = dict(cover="factored", centralize=True, use_rms=True)
    shapes_ = triton_tests.SMALL_SHAPES[kernel_device] + [(2, 3, 4, 5)]
    triton_tests.run_side_by_side(shapes_, torch.float32, None, hyper, device=kernel_device, steps=3)
    finals = []
    for _ in range(2):
        _, fused, _, fused_params = triton_tests.run_side_by_side(
            shapes_, torch.float32, None, hyper, device=kernel_device, steps=1, seed=4
        )
        finals.append(
            [p.detach().cpu() for p in fused_params] + [t.cpu() for p in fused_params for t in state_tensors(fused, p)]
        )
    for i, (a, b) in enumerate(zip(*finals)):
        assert torch.equal(a, b), f"tensor {i}: two fused runs differ"


# ----------------------------------------------------------------------------------------------------------
# 12. the functional form
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cover", ["factored", "sm3"])
def test_functional_fusion_with_a_cover_equals_the_class(engine, cover, gen):
    """After one step of the class, its state is copied into plain lists; three more steps of
    ``fusedbun.fusion(..., cover=...)`` on them equal the class's steps bit for bit (same engine). The
    functional default is sm3."""
    shapes_ = [(7, 5), (3, 4, 5), (2, 1, 3, 4), (6,), ()]
    hyper = dict(lr=0.05, eps=1 / 64, beta_decay=0.8, Lambda=0.01, momentum_beta=0.9)
    hyper.update(centralize=True, use_rms=True, maximize=False)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes_]
    opt = FusionOptimizer(params, cover=cover, **hyper, **engine)
    for p in params:
        set_grad(p, make_grad(p.shape, gen, 1 / 64))
    opt.step()
    fp = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    hess = []
    for p in params:
        h = opt.state[p]["exp_hessian"]
        hess.append(h.clone() if isinstance(h, torch.Tensor) else [a.clone() for a in h])
    steps = [opt.state[p]["step"].clone() for p in params]
    cover_kw = {"cover": cover} if cover == "factored" else {}  # sm3: the functional default
    for scale in STEP_SCALES[1:]:
        grads = [make_grad(p.shape, gen, 1 / 64, scale).float() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        fusedbun.fusion(fp, [g.clone() for g in grads], bufs, hess, steps, **hyper, **cover_kw, **engine)
        for i, p in enumerate(params):
            where = f"param {i} {tuple(p.shape)}"
            assert torch.equal(fp[i], p.detach()), f"{where}: functional and class differ"
            assert_tree_equal(bufs[i], opt.state[p]["momentum_buffer"], f"{where} momentum")
            assert_tree_equal(hess[i], opt.state[p]["exp_hessian"], f"{where} exp_hessian")
            assert float(steps[i]) == float(opt.state[p]["step"]), f"{where}: step counts"


# ----------------------------------------------------------------------------------------------------------
# FSDP2 and DTensor sharding (test_distributed.py's jobs and comparisons, with the cover)
# ----------------------------------------------------------------------------------------------------------

DIST_CONFIGS = {
    "factored": dict(cover="factored"),
    "factored, rms+centralize": dict(cover="factored", use_rms=True, centralize=True),
    "factored, maximize, bf16 momentum, rms": dict(
        cover="factored", maximize=True, momentum_dtype=torch.bfloat16, use_rms=True, beta_decay=0.5
    ),
}
# shards along dim 0 and dim 1, replicas; (1, 3) over 2 ranks leaves a rank without rows, (0, 3) is empty
DTENSOR_SHAPES = [(5, 7), (3, 4, 2), (1, 3), (7, 3), (0, 3), (2, 3, 2, 3), (5,), ()]


def _dtensor_factored(mesh) -> dict[str, float]:
    """Parameters distributed by hand (Shard(0), Shard(1), Replicate) against plain tensors, 3 steps, with
    identical gradients: the largest relative difference of the parameters and accumulators."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    gen = torch.Generator().manual_seed(2)
    for label, placements in {"Shard(0)": [Shard(0)], "Shard(1)": [Shard(1)], "Replicate": [Replicate()]}.items():
        for cfg_name, cfg, dtype in [
            ("factored", dict(cover="factored"), torch.float32),
            ("factored, rms+centralize", dict(cover="factored", use_rms=True, centralize=True), torch.float32),
            ("factored, bf16 params, rms", dict(cover="factored", use_rms=True), torch.bfloat16),
        ]:
            init = [torch.randn(s, generator=gen).to(dtype) for s in DTENSOR_SHAPES]
            grads = [[torch.randn(s, generator=gen).to(dtype) for s in DTENSOR_SHAPES] for _ in range(3)]

            def fit(t, placements=placements):  # a placement sharding a dim t lacks falls back to Replicate
                return [pl if not hasattr(pl, "dim") or pl.dim < t.dim() else Replicate() for pl in placements]

            dps = [nn.Parameter(distribute_tensor(t.clone(), mesh, fit(t))) for t in init]
            rps = [nn.Parameter(t.clone()) for t in init]
            dopt = FusionOptimizer(dps, lr=0.1, **cfg)
            ropt = FusionOptimizer(rps, lr=0.1, foreach=False, **cfg)
            for gs in grads:
                for p, g in zip(dps, gs):
                    p.grad = distribute_tensor(g, mesh, p.placements)
                for p, g in zip(rps, gs):
                    p.grad = g.clone()
                dopt.step()
                ropt.step()
            worst = 0.0
            for p, q in zip(dps, rps):
                worst = max(worst, dist_tests.rel_diff(p, q))
                hs, hr = dopt.state[p]["exp_hessian"], ropt.state[q]["exp_hessian"]
                for a, b in zip(hs, hr) if isinstance(hr, list) else [(hs, hr)]:
                    worst = max(worst, dist_tests.rel_diff(a, b))
            out[f"{label} / {cfg_name}"] = worst
    return out


def factored_two_rank_job(rank: int, world: int, init_method: str, out_dir: str) -> None:
    device = dist_tests._init(rank, world, init_method, "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    results: dict = {"fsdp": {}, "placement_problems": {}}
    for name, cfg in DIST_CONFIGS.items():
        net = dist_tests._fsdp_net(device, world)
        opt = FusionOptimizer(net.parameters(), lr=dist_tests.LR, **cfg)
        dist_tests.train(net, opt, dist_tests.make_batches(dist_tests.STEPS, device), rank, world)
        results["fsdp"][name] = dist_tests.compare(net, opt, *dist_tests.reference(cfg, dist_tests.STEPS, device))
        results["placement_problems"][name] = dist_tests._placement_report(net, opt)
    results["dtensor"] = _dtensor_factored(init_device_mesh(torch.device(device).type, (world,)))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "factored.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def factored_two_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("factored_two_rank")
    launch(factored_two_rank_job, 2, out, str(out))
    return torch.load(out / "factored.pt", weights_only=False)


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.skipif(not dist_tests._HAS_GLOO, reason="torch.distributed with the gloo backend is not available")
def test_fsdp2_and_dtensor_sharding_with_factored_equal_one_process(factored_two_rank):
    """FSDP2 (uneven shards of dim 0) against the single-process reference engine, and parameters sharded
    by hand along dim 0 / dim 1 or replicated against plain tensors: parameters and accumulators agree to
    fp32 rounding (the means over sharded dims are all-reduced in another order), and the state is laid
    out as with sm3 (a_0 sharded like dim 0, the other a_k replicated)."""
    res = factored_two_rank
    bad = {}
    for name, got in res["fsdp"].items():
        if not (got["params"] <= dist_tests.REL_TOL and got["state"] <= dist_tests.REL_TOL):
            bad[f"FSDP2 / {name}"] = got
        if res["placement_problems"][name]:
            bad[f"FSDP2 layout / {name}"] = res["placement_problems"][name]
    for label, worst in res["dtensor"].items():
        if not worst <= dist_tests.REL_TOL:
            bad[f"DTensor {label}"] = worst
    assert len(res["fsdp"]) == len(DIST_CONFIGS) and len(res["dtensor"]) == 9
    assert not bad, f"sharded runs differ from one process (relative tolerance {dist_tests.REL_TOL}): {bad}"
