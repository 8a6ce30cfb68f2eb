"""The engines: which one steps which tensors, and that every one computes the reference loop's steps.

``test_rule.py`` checks each engine against the float64 oracle one parameter at a time. Here the engines
(multi-tensor ``foreach=True`` and, where it can run, the fused CPU kernel ``fused=True``) are compared
with the single-tensor reference loop (``foreach=False``) on many tensors in one param group, where the
faster engines group, concatenate and block their work: mixed shapes (0-D to 4-D, size-1 dims, tensors
larger than a block) and dtypes, parameters that miss a gradient for a step (so their step counts, and
their ``beta_t``, differ from their neighbours'), on a grid of hyperparameters and as a hypothesis property.

The kernels' own corners are in their files: ``test_fused_cpu.py`` (tiles, threads, conversions, the build)
and ``test_fused_cuda.py`` (the Triton kernel, compiled on a GPU or interpreted on CPU).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import AVAILABLE_ENGINES, ENGINE_PARAMS
from helpers import accumulators
from hypothesis import given, settings
from hypothesis import strategies as st
from rule_check import LOW, STEP_SCALES, as_list, assert_within, half_ulp, hessian_of, make_grad, steps_taken
from strategies import DTYPES, SCALE, SETTINGS, gradient, hyperparameters, shapes

from fusedbun import FusionOptimizer
from fusedbun.engines import select_engine
from fusedbun.engines.foreach import foreach_fusion
from fusedbun.engines.single_tensor import single_tensor_fusion

# ----------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------


def test_engine_selection_follows_foreach_and_fused():
    assert select_engine("cpu", foreach=False, fused=None) is single_tensor_fusion
    assert select_engine("cpu", foreach=True, fused=None) is foreach_fusion
    assert select_engine("cpu", foreach=None, fused=False) is foreach_fusion
    with pytest.raises(ValueError, match="mutually exclusive"):
        select_engine("cpu", foreach=True, fused=True)
    with pytest.raises(RuntimeError, match="no fused engine"):
        select_engine("meta", foreach=None, fused=True)


# ----------------------------------------------------------------------------------------------------------
# every engine against the reference loop: a grid
# ----------------------------------------------------------------------------------------------------------

OTHER_ENGINES = [p for p in ENGINE_PARAMS if p.id != "single"]
# 0-D to 4-D, size-1 dims, a row longer than most, (300,) and (40, 40) larger than a flat chunk of the others
SHAPES = [
    (),
    (1,),
    (5,),
    (1, 1),
    (7, 5),
    (1, 6),
    (6, 1),
    (3, 4, 5),
    (2, 3, 4, 5),
    (2, 1, 3, 1),
    (33, 17),
    (6,),
    (1, 9),
    (9, 1),
    (2, 3, 2, 2),
    (300,),
    (40, 40),
]
# cycled over SHAPES: one group holds every dtype, and each dtype several ranks
DTYPES_CYCLE = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32]
FLAGS = list(itertools.product([False, True], repeat=3))


def _hyper_id(h: dict) -> str:
    flags = [n for n in ("centralize", "use_rms", "maximize") if h.get(n)]
    return "-".join([*flags, f"mom{h['momentum_beta']:g}", f"wd{h['Lambda']:g}"])


# Every combination of the three flags, momentum and weight decay (eps = 1/64: entries at the threshold are
# drawn), then a few configurations off that grid: another beta_decay, a bf16 momentum, the default eps.
HYPER = [
    pytest.param(
        dict(lr=0.05, eps=1 / 64, centralize=c, use_rms=r, maximize=mx, momentum_beta=mb, Lambda=lam),
        id=_hyper_id(dict(centralize=c, use_rms=r, maximize=mx, momentum_beta=mb, Lambda=lam)),
    )
    for (c, r, mx), mb, lam in itertools.product(FLAGS, [0.0, 0.9], [0.0, 0.01])
] + [
    pytest.param(dict(lr=2.0**-6, eps=1e-8), id="defaults"),
    pytest.param(dict(lr=2.0**-6, eps=1e-3, use_rms=True, centralize=True), id="rms-centralize-eps1e-3"),
    pytest.param(
        dict(lr=2.0**-6, eps=1e-8, maximize=True, use_rms=True, beta_decay=0.5, Lambda=0.1), id="maximize-rms-c0.5"
    ),
    pytest.param(
        dict(lr=2.0**-6, eps=1e-8, use_rms=True, momentum_beta=0.5, momentum_dtype=torch.bfloat16), id="bf16-momentum"
    ),
]


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("other", OTHER_ENGINES)
def test_every_engine_matches_the_reference_loop_on_many_tensors_in_one_group(other, hyper, gen):
    init = [torch.randn(s, generator=gen).to(DTYPES_CYCLE[i % len(DTYPES_CYCLE)]) for i, s in enumerate(SHAPES)]
    grads = [[make_grad(s, gen, hyper["eps"], sc) for s in SHAPES] for sc in STEP_SCALES]
    runs = []
    for engine in ({"foreach": False}, other):
        params = [x.clone().requires_grad_() for x in init]
        opt = FusionOptimizer(params, **hyper, **engine)
        for t, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, gs)):
                # at step 2 a third of the parameters have no gradient
                p.grad = None if (t == 1 and i % 3 == 0) else g.to(p.dtype)
            opt.step()
        runs.append((params, opt))
    (ps, o_ref), (pf, o_other) = runs
    lr, momentum_dtype = hyper["lr"], hyper.get("momentum_dtype")
    for i, (a, b) in enumerate(zip(ps, pf)):
        tag = f"param {i} {tuple(a.shape)} {a.dtype}"
        assert steps_taken(o_ref, a) == steps_taken(o_other, b) == (3 if i % 3 == 0 else 4), f"{tag}: step counters"
        for k, (x, y) in enumerate(zip(as_list(hessian_of(o_ref, a)), as_list(hessian_of(o_other, b)))):
            assert_within(f"{tag} exp_hessian[{k}]", y, x.double(), 1e-5 * x.double().abs() + 1e-12)
        # engines may round differently (FMA, order of a sum): fp32 noise, and one ulp of a bf16/fp16 result;
        # the update uses the momentum as stored, so a parameter also inherits lr times the momentum's ulp
        tol = 1e-5 * a.detach().double().abs() + 1e-6
        if a.dtype in LOW:
            tol = tol + 2 * half_ulp(a.detach(), a.dtype)
        if hyper.get("momentum_beta", 0.9) > 0:
            ma, mb = o_ref.state[a]["momentum_buffer"], o_other.state[b]["momentum_buffer"]
            assert ma.dtype == mb.dtype == (momentum_dtype or a.dtype), f"{tag}: momentum dtype {ma.dtype}/{mb.dtype}"
            tol_m = (2 * half_ulp(ma, ma.dtype) if ma.dtype in LOW else 0) + 1e-5 * ma.double().abs() + 1e-6
            assert_within(f"{tag} momentum", mb, ma.double(), tol_m)
            if ma.dtype in LOW:
                tol = tol + 2 * lr * half_ulp(ma, ma.dtype)
        else:
            assert "momentum_buffer" not in o_other.state[b] and "momentum_buffer" not in o_ref.state[a]
        assert_within(f"{tag} {other} vs reference loop", b, a.detach().double(), tol)


# ----------------------------------------------------------------------------------------------------------
# every engine against the reference loop: a property
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(
    shapes_=st.lists(shapes(), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    hyper=hyperparameters(),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-6, 4),
)
def test_every_engine_agrees_with_the_reference_loop_on_random_inputs(shapes_, dtype, hyper, seed, exponent):
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
            # equal values agree, infinities of one sign included (their difference would be NaN)
            close = (x == y) | ((x - y).abs() <= tol + 1e-30)
            assert close.all(), f"{tuple(a.shape)} max diff {(x - y).abs()[~close].max().item():.3g}"
            for u, v in zip(accumulators(opt.state[a]), accumulators(o_ref.state[b])):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=0)
