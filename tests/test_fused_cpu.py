"""The fused CPU engine (``fusedbun/engines/fused_cpu.py`` + ``fusedbun/_csrc/fused_step.c``).

It must compute the rule of the single-tensor reference engine (``foreach=False``) on every input: the
parameters and the whole state (step counts, accumulators, momentum) agree after several steps, up to
fp32 rounding (the kernel's float operations are the reference's, but the row mean is summed in another
order) and, for bf16/fp16 tensors, one unit in the last place where an fp32 result lies on a rounding
boundary. A dense second moment stored in bf16 is compared with the multi-tensor engine bit for bit, but
for rare entries where such a rounding went the other way. Tests that need the compiled kernel skip, with
the reason, where no C compiler works.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fusedbun
from fusedbun import FusionOptimizer
from fusedbun.engines import _cbuild, fused_cpu, select_engine
from fusedbun.engines.common import StepHyper, StepTensors

LOW = (torch.bfloat16, torch.float16)


@pytest.fixture
def kernel():
    reason = fused_cpu.unavailable_reason()
    if reason:
        pytest.skip(f"the fused CPU engine cannot run here: {reason}")


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the process's loaded kernel for one test (monkeypatch restores it afterwards)."""
    monkeypatch.setattr(fused_cpu.LIBRARY, "_loaded", None)


def assert_matches(name: str, got: torch.Tensor, expected: torch.Tensor, extra: torch.Tensor | float = 0.0) -> None:
    """Equal up to fp32 rounding, plus one ulp of a bf16/fp16 result (a rounding boundary crossed),
    plus ``extra`` (a difference inherited from another rounded tensor)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    g, e = got.double(), expected.double()
    tol = 1e-5 * e.abs() + 1e-7 + extra
    if expected.dtype in LOW:
        tol = tol + torch.finfo(expected.dtype).eps * e.abs() + 1e-6
    err = (g - e).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {e.numel()} entries differ, worst {float(err.max()):.3g} "
        f"at {tuple(int(i) for i in bad.nonzero()[0]) if e.dim() else ()}"
    )


def as_list(h):
    return h if isinstance(h, list) else [h]


def assert_same_state(ref, fused, *, lr: float) -> None:
    """Parameters and every state tensor of two runs agree (see :func:`assert_matches`). A parameter may
    also differ by ``lr`` times one ulp of a low-precision momentum, since the update uses the momentum
    as stored."""
    (ps, os_), (pf, of) = ref, fused
    for i, (a, b) in enumerate(zip(ps, pf)):
        tag = f"param {i} {a.dtype}{tuple(a.shape)}"
        sa, sb = os_.state[a], of.state[b]
        assert sa.keys() == sb.keys(), f"{tag}: state keys {sorted(sa)} vs {sorted(sb)}"
        extra = 0.0
        if "momentum_buffer" in sa:
            m = sa["momentum_buffer"]
            assert_matches(f"{tag} momentum_buffer", sb["momentum_buffer"], m)
            if m.dtype in LOW:
                extra = lr * torch.finfo(m.dtype).eps * m.double().abs()
        assert_matches(tag, b.detach(), a.detach(), extra)
        if not sa:
            continue
        assert sb["step"].item() == sa["step"].item(), f"{tag}: step count"
        for k, (x, y) in enumerate(zip(as_list(sa["exp_hessian"]), as_list(sb["exp_hessian"]))):
            assert_matches(f"{tag} exp_hessian[{k}]", y, x)


def compare_stepwise(init, grads, *, lr: float, momentum_dtype=None, reference=None, check=None, **hyper) -> None:
    """Step the reference (``reference``, the engine options: by default the reference engine) and the fused
    engine side by side; before each step the fused run is given copies of the reference's parameters and
    state, so each comparison is of one step from identical inputs. ``check(ref, fused)`` compares the two
    runs (default: :func:`assert_same_state`)."""
    check = check or functools.partial(assert_same_state, lr=lr)
    pr = [x.clone().requires_grad_() for x in init]
    pf = [x.clone().requires_grad_() for x in init]
    ref = FusionOptimizer(pr, lr=lr, momentum_dtype=momentum_dtype, **(reference or dict(foreach=False)), **hyper)
    fused = FusionOptimizer(pf, lr=lr, momentum_dtype=momentum_dtype, fused=True, **hyper)
    for step_grads in grads:
        with torch.no_grad():
            for a, b in zip(pr, pf):
                b.copy_(a)
                fused.state[b] = {
                    k: [x.clone() for x in v] if isinstance(v, list) else v.clone() for k, v in ref.state[a].items()
                }
        for a, b, g in zip(pr, pf, step_grads):
            a.grad = None if g is None else g.to(a.dtype)
            b.grad = None if g is None else g.to(b.dtype)
        ref.step()
        fused.step()
        check((pr, ref), (pf, fused))
    return pf, fused


def run_steps(init, grads, *, engine: dict, **hyper):
    """Step fresh copies of ``init`` through ``grads`` (one list per step; None = no gradient)."""
    params = [x.clone().requires_grad_() for x in init]
    opt = FusionOptimizer(params, **engine, **hyper)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
    return params, opt


SHAPES = [
    (),
    (1,),
    (7,),
    (0,),
    (1, 1),
    (7, 5),
    (1, 6),
    (6, 1),
    (3, 0),
    (33, 17),
    (3, 4, 5),
    (2, 3, 4, 5),
    (2, 1, 3, 1),
    (5, 600),
]  # (5, 600): rows longer than one 512-element tile
DTYPES = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
HYPER = [
    dict(centralize=c, use_rms=r, maximize=mx, momentum_beta=mb, Lambda=lam, eps=eps)
    for (c, r, mx), mb, lam, eps in itertools.product(
        [(False, False, False), (True, True, False), (False, True, True), (True, False, True)],
        [0.0, 0.9, 0.3],
        [0.0, 0.05],
        [1e-8, 0.5],  # 0.5 masks about 40% of standard-normal gradients
    )
]


def make_grads(shapes, steps, gen, *, skip_second=True):
    out = []
    for t in range(steps):
        scale = [1.0, 0.3, 3.0, 1.0][t % 4]
        out.append(
            [
                None if (skip_second and t == 1 and i % 3 == 0) else scale * torch.randn(s, generator=gen)
                for i, s in enumerate(shapes)
            ]
        )
    return out


@pytest.mark.parametrize("cover", ["sm3", "dense"])  # dense: every tensor takes the kernel's dense kind, fp32 v
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_fused_engine_matches_the_reference_on_many_shapes_dtypes_and_hyperparameters(kernel, hyper, cover):
    gen = torch.Generator().manual_seed(hash(tuple(hyper.values())) % 2**31)
    init = [torch.randn(s, generator=gen).to(DTYPES[i % len(DTYPES)]) for i, s in enumerate(SHAPES)]
    grads = make_grads(SHAPES, 4, gen)
    compare_stepwise(init, grads, lr=0.05, beta_decay=0.8, cover=cover, **hyper)


@pytest.mark.parametrize(
    "pdtype,momentum_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_momentum_kept_in_another_dtype_matches_the_reference(kernel, pdtype, momentum_dtype):
    gen = torch.Generator().manual_seed(7)
    shapes = [(9, 13), (4, 3, 5), (11,), ()]
    init = [torch.randn(s, generator=gen).to(pdtype) for s in shapes]
    grads = make_grads(shapes, 3, gen)
    hyper = dict(lr=0.1, eps=0.1, use_rms=True, centralize=True, momentum_beta=0.9)
    params, opt = compare_stepwise(init, grads, momentum_dtype=momentum_dtype, **hyper)
    assert opt.state[params[0]]["momentum_buffer"].dtype == momentum_dtype


@pytest.mark.parametrize("momentum_dtype", LOW)
def test_the_update_uses_the_momentum_as_stored(kernel, momentum_dtype):
    # fp32 parameter, low-precision momentum: p_new = p (1 - lr Lambda) - lr m, m as rounded into the buffer.
    # Using the unrounded fp32 momentum instead moves p by up to lr * half an ulp of m, far above fp32 noise.
    gen = torch.Generator().manual_seed(19)
    p = torch.randn(64, 48, generator=gen).requires_grad_()
    p.grad = torch.randn(64, 48, generator=gen)
    before = p.detach().clone()
    opt = FusionOptimizer([p], lr=0.1, Lambda=0.01, use_rms=True, momentum_dtype=momentum_dtype, fused=True)
    opt.step()
    m = opt.state[p]["momentum_buffer"]
    expected = before.double() * (1 - 0.1 * 0.01) - 0.1 * m.double()
    torch.testing.assert_close(p.detach().double(), expected, rtol=4e-7, atol=1e-8)


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_tensors_larger_than_a_tile_and_a_thread_share_match_the_reference(kernel, three_threads):
    # ~130k elements each: rows span several tiles with a ragged tail, and the rows (or elements) are
    # split between threads, whose column maxima must be combined.
    shapes = [(129, 1031), (5, 67, 401), (140_001,), (2, 70_001)]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = make_grads(shapes, 3, gen, skip_second=False)
    hyper = dict(lr=0.05, eps=0.3, use_rms=True, centralize=True, momentum_beta=0.9)
    ref = run_steps(init, grads, engine=dict(foreach=False), **hyper)
    fused = run_steps(init, grads, engine=dict(fused=True), **hyper)
    assert_same_state(ref, fused, lr=hyper["lr"])


@pytest.mark.parametrize(
    "second_moment",
    [dict(centralize=True), dict(cover="dense", hessian_dtype=torch.bfloat16)],  # (the dense kind never centralizes)
    ids=["sm3", "dense-bf16"],
)
def test_result_does_not_depend_on_the_thread_count(kernel, second_moment):
    # dense-bf16: each thread rounds its range of v on the tensor's stream, counted from the tensor's start
    shapes = [(131, 1029), (3, 50, 700), (150_000,)]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = make_grads(shapes, 2, gen, skip_second=False)
    hyper = dict(lr=0.1, use_rms=True, **second_moment)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(run_steps(init, grads, engine=dict(fused=True), **hyper))
    finally:
        torch.set_num_threads(before)
    (p1, o1), (p3, o3) = runs
    for a, b in zip(p1, p3):
        assert torch.equal(a, b)
        for x, y in zip(
            *(h if isinstance(h, list) else [h] for h in (o1.state[a]["exp_hessian"], o3.state[b]["exp_hessian"]))
        ):
            assert torch.equal(x, y)
        assert torch.equal(o1.state[a]["momentum_buffer"], o3.state[b]["momentum_buffer"])


def _identity_step(p: torch.Tensor, g: torch.Tensor, lr: float = 1.0) -> None:
    """p <- 0 + lr * g exactly for a power-of-two lr (maximize, no decay, momentum or normalization; eps = 0,
    so only zeros, NaN, Inf and |g| >= 2**64 are masked): the kernel's load of g's dtype and store to p's
    dtype, with fp32 in between."""
    fused_cpu.fused_fusion(
        StepTensors([p], [g], [None], [torch.zeros(p.shape)], [torch.tensor(0.0)]),
        StepHyper(
            lr=lr,
            eps=0.0,
            beta_decay=0.8,
            Lambda=0.0,
            momentum_beta=0.0,
            centralize=False,
            use_rms=False,
            maximize=True,
        ),
    )


@pytest.mark.parametrize("dtype", LOW)
def test_stores_round_fp32_to_nearest_even_like_torch(kernel, dtype):
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)  # every kind of fp32: subnormal, huge, Inf, NaN
    lo = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype).float()
    ties = lo[:-1] + (lo[1:] - lo[:-1]) / 2  # exact midpoints between neighbouring values of dtype
    g = torch.cat([values, ties[torch.isfinite(ties)], torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.99])])
    small = g.abs() < 2.0**64
    huge = torch.isfinite(g) & ~small
    # The mask drops |g| >= 2**64, so those values reach p as (g / 2**64) * 2**64: both products are exact.
    p_small, p_huge = torch.zeros(g.shape, dtype=dtype), torch.zeros(g.shape, dtype=dtype)
    _identity_step(p_small, torch.where(small, g, 0.0))
    _identity_step(p_huge, torch.where(huge, g / 2.0**64, 0.0), lr=2.0**64)
    p = torch.where(small, p_small, p_huge)
    tested = (small | huge) & (g != 0)  # a zero gradient is masked (|g| > 0 fails): p stays +0
    expected = g.to(dtype)
    assert torch.equal(p[tested].view(torch.int16), expected[tested].view(torch.int16))
    assert huge.sum() > 1000 and small.sum() > 1000


@pytest.mark.parametrize("dtype", LOW)
def test_loads_of_every_bf16_and_fp16_value_are_exact(kernel, dtype):
    g = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    p = torch.zeros(g.shape, dtype=torch.float32)
    _identity_step(p, g)
    expected = g.float()
    keep = (expected.abs() < 2.0**64) & (expected != 0)  # the mask drops the rest: NaN, Inf, zeros, |g| >= 2**64
    assert torch.equal(p[keep].view(torch.int32), expected[keep].view(torch.int32))
    assert torch.equal(p[~keep], torch.zeros_like(p[~keep]))
    assert (~keep & (expected != 0)).sum() > 100  # bf16 and fp16 both hold NaNs and Infs; bf16 also huge values


def test_fp64_and_non_contiguous_tensors_go_to_the_foreach_engine_with_the_same_result(kernel, monkeypatch):
    gen = torch.Generator().manual_seed(13)
    init = [
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
        torch.randn(5, 7, generator=gen).t(),  # transposed view
        torch.randn(2, 3, 4, 4, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(8, 9, generator=gen),  # fused
        torch.randn(9, generator=gen, dtype=torch.float64),
    ]
    shapes = [tuple(x.shape) for x in init]
    grads = make_grads(shapes, 3, gen)

    seen = []
    real = fused_cpu.foreach_fusion

    def spy(tensors, *args, **kwargs):
        seen.extend((p.dtype, p.is_contiguous()) for p in tensors.params)
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(fused_cpu, "foreach_fusion", spy)
    hyper = dict(lr=0.05, eps=0.2, use_rms=True, centralize=True)
    ref = run_steps(init, grads, engine=dict(foreach=False), **hyper)
    fused = run_steps(init, grads, engine=dict(fused=True), **hyper)
    assert_same_state(ref, fused, lr=hyper["lr"])
    assert (torch.float32, True) not in seen, "a contiguous fp32 tensor went to the foreach engine"
    assert {(torch.float64, True), (torch.float32, False)} <= set(seen)


# ---- a dense second moment stored in bf16 (cover="dense", hessian_dtype=torch.bfloat16) ----------------------

DENSE_SHAPES = [(), (7,), (1000,), (33, 17), (5, 600), (3, 4, 5), (2, 3, 4, 5), (0,), (3, 0)]


def bf16_v(**hyper) -> dict:
    """The options of a dense second moment in bf16 for every tensor."""
    return dict(cover="dense", hessian_dtype=torch.bfloat16, **hyper)


def rare(numel: int, steps: int) -> int:
    """How many entries of a tensor may differ between the kernel and the multi-tensor engine after
    ``steps`` steps. Their fp32 results differ in the last bit on many entries (the kernel's FMA contraction
    is not torch's, e.g. beta * prev + (1 - beta) * (g * g) against torch's fma((1 - beta) * g, g, beta *
    prev), and torch's CPU sqrt is not always correctly rounded); a rounding into bf16 (stochastic, of v or
    p, or to nearest) then goes the other way with a probability of about 2^-16 per entry and rounding.
    This allows 2^-14 per entry and step, plus 2."""
    return 2 + numel * steps // 2**14


def assert_same_but_rare(name: str, got: torch.Tensor, expected: torch.Tensor, *, steps: int) -> None:
    """bf16/fp16 tensors equal bit for bit and fp32 ones to fp32 rounding, except on at most
    ``rare(numel, steps)`` entries, where a rounding went the other way (and what followed from it in later
    steps): those agree to 2^-6 of the tensor's largest magnitude."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    g, e = got.double(), expected.double()
    if expected.dtype in LOW:
        off = got.view(torch.int16) != expected.view(torch.int16)
    else:
        off = ~((g - e).abs() <= 1e-5 * e.abs() + 1e-7)
    count, allowed = int(off.sum()), rare(expected.numel(), steps)
    assert count <= allowed, f"{name}: {count} of {expected.numel()} entries differ (at most {allowed} may)"
    if count:
        err, scale = float((g - e).abs().max()), float(e.abs().max())
        assert err <= 2**-6 * scale, f"{name}: an entry differs by {err:.3g}, the largest magnitude is {scale:.3g}"


def assert_same_state_but_rare(ref, fused, *, steps: int = 1) -> None:
    """:func:`assert_same_but_rare` on the parameters and every state tensor of two runs. After one step from
    identical inputs (``steps=1``) a bf16 v that differs does so by one unit in the last place."""
    (ps, os_), (pf, of) = ref, fused
    for i, (a, b) in enumerate(zip(ps, pf)):
        tag = f"param {i} {a.dtype}{tuple(a.shape)}"
        sa, sb = os_.state[a], of.state[b]
        assert sa.keys() == sb.keys(), f"{tag}: state keys {sorted(sa)} vs {sorted(sb)}"
        assert_same_but_rare(tag, b.detach(), a.detach(), steps=steps)
        if not sa:
            continue
        assert sb["step"].item() == sa["step"].item(), f"{tag}: step count"
        if "momentum_buffer" in sa:
            assert_same_but_rare(f"{tag} momentum_buffer", sb["momentum_buffer"], sa["momentum_buffer"], steps=steps)
        v, w = sa["exp_hessian"], sb["exp_hessian"]
        assert v.dtype == w.dtype == torch.bfloat16, f"{tag}: exp_hessian is {v.dtype} and {w.dtype}"
        assert_same_but_rare(f"{tag} exp_hessian", w, v, steps=steps)
        if steps == 1 and v.numel():  # v >= 0: one unit in the last place is one step of the bit pattern
            ulps = int((w.view(torch.int16).int() - v.view(torch.int16).int()).abs().max())
            assert ulps <= 1, f"{tag} exp_hessian: an entry differs by {ulps} units in the last place"


DENSE_CASES = [
    (pdtype, stochastic, momentum_beta, momentum_dtype)
    for pdtype, stochastic in [
        (torch.float32, False),
        (torch.bfloat16, False),
        (torch.bfloat16, True),
        (torch.float16, True),
    ]
    for momentum_beta, momentum_dtype in [
        (0.0, None),
        (0.9, torch.float32),
        (0.9, torch.bfloat16),
        (0.3, torch.float32),  # momentum_beta <= 0.5: the kernel's general path (lerp's other form)
        (0.3, torch.bfloat16),
    ]
]


@pytest.mark.parametrize("use_rms", [True, False], ids=["rms", "no-rms"])
@pytest.mark.parametrize(
    "pdtype,stochastic,momentum_beta,momentum_dtype",
    DENSE_CASES,
    ids=[
        f"p={str(p)[6:]}{'-sr' if sr else ''}-momentum_beta={mb}" + (f"-m={str(m)[6:]}" if m else "")
        for p, sr, mb, m in DENSE_CASES
    ],
)
def test_a_bf16_dense_second_moment_matches_the_foreach_engine_but_for_rare_roundings(
    kernel, pdtype, stochastic, momentum_beta, momentum_dtype, use_rms
):
    # fp16 parameters take the kernel's general path (second_moment_tile + update_tile), the others its fast
    # loop, except with momentum_beta = 0.3. Tensors 0, 3 and 6 get no gradient at the second step: their step
    # counts, and so their decay and rounding streams, differ from the others' in every later step.
    gen = torch.Generator().manual_seed(29)
    init = [torch.randn(s, generator=gen).to(pdtype) for s in DENSE_SHAPES]
    grads = make_grads(DENSE_SHAPES, 4, gen)
    hyper = bf16_v(lr=0.05, eps=0.3, use_rms=use_rms, momentum_beta=momentum_beta, stochastic_rounding=stochastic)
    foreach = dict(foreach=True)
    compare_stepwise(
        init, grads, momentum_dtype=momentum_dtype, reference=foreach, check=assert_same_state_but_rare, **hyper
    )
    ref = run_steps(init, grads, engine=foreach, momentum_dtype=momentum_dtype, **hyper)
    fused = run_steps(init, grads, engine=dict(fused=True), momentum_dtype=momentum_dtype, **hyper)
    assert_same_state_but_rare(ref, fused, steps=len(grads))
    params, opt = fused
    assert {opt.state[p]["step"].item() for p in params} == {3.0, 4.0}


@pytest.mark.parametrize("centralize", [False, True])
def test_a_bf16_dense_second_moment_is_stepped_by_the_kernel(kernel, monkeypatch, centralize):
    gen = torch.Generator().manual_seed(31)
    shapes = [(9, 13), (4, 3, 5), (11,), ()]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = make_grads(shapes, 3, gen)
    seen = []
    real = fused_cpu.foreach_fusion

    def spy(tensors, *args, **kwargs):
        seen.extend(tuple(p.shape) for p in tensors.params)
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(fused_cpu, "foreach_fusion", spy)
    hyper = bf16_v(lr=0.05, eps=0.2, use_rms=True, centralize=centralize)
    params, opt = run_steps(init, grads, engine=dict(fused=True), **hyper)
    # the kernel's dense kind does not centralize: with centralization the tensors of 2+ dims go to foreach
    assert set(seen) == ({(9, 13), (4, 3, 5)} if centralize else set())
    for p in params:
        assert opt.state[p]["exp_hessian"].dtype == torch.bfloat16 and bool((opt.state[p]["exp_hessian"] > 0).any())
    monkeypatch.undo()
    assert_same_state_but_rare(run_steps(init, grads, engine=dict(foreach=True), **hyper), (params, opt), steps=3)


@pytest.mark.parametrize("flags", [dict(), dict(maximize=True, Lambda=0.0)], ids=["plain", "maximize-no-decay"])
def test_bf16_dense_second_moments_larger_than_a_thread_share_match_the_foreach_engine(kernel, three_threads, flags):
    # ~130k elements each: a tensor's elements are split between threads, each of which rounds its own range
    # of v on the tensor's stream (the flat index counts from the tensor's first element).
    shapes = [(129, 1031), (5, 67, 401), (140_001,)]
    gen = torch.Generator().manual_seed(37)
    init = [torch.randn(s, generator=gen).to(dtype) for s, dtype in zip(shapes, (torch.float32, torch.bfloat16) * 2)]
    grads = make_grads(shapes, 3, gen, skip_second=False)
    hyper = bf16_v(lr=0.05, eps=0.3, use_rms=True, momentum_beta=0.9, stochastic_rounding=True, **flags)
    ref = run_steps(init, grads, engine=dict(foreach=True), **hyper)
    fused = run_steps(init, grads, engine=dict(fused=True), **hyper)
    assert_same_state_but_rare(ref, fused, steps=len(grads))


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rms", [True, False])
def test_the_general_path_and_the_fast_loop_give_the_same_bits_for_a_dense_v(kernel, v_dtype, use_rms):
    # An fp32 parameter with a bf16 gradient takes the general path, with an fp32 gradient of the same values
    # the fast loop; 1300 elements: two whole tiles and a ragged one.
    gen = torch.Generator().manual_seed(43)
    g16 = torch.randn(1300, generator=gen).to(torch.bfloat16)
    p0, m0 = torch.randn(1300, generator=gen), torch.randn(1300, generator=gen)
    v0 = torch.rand(1300, generator=gen).to(v_dtype)
    hyper = StepHyper(
        lr=0.05,
        eps=0.3,
        beta_decay=0.8,
        Lambda=0.01,
        momentum_beta=0.9,
        centralize=False,
        use_rms=use_rms,
        maximize=False,
        cover="dense",
    )
    runs = []
    for g in (g16, g16.float()):
        p, m, v, step = p0.clone(), m0.clone(), v0.clone(), torch.tensor(4.0)
        fused_cpu.fused_fusion(StepTensors([p], [g], [m], [v], [step], [5]), hyper)
        runs.append((p, m, v))
    for name, a, b in zip(("p", "m", "v"), *runs):
        assert torch.equal(a, b), f"{name}: the two paths differ"
    assert not torch.equal(runs[0][2], v0)


def test_autograd_sees_the_in_place_update_as_with_torch_optimizers(kernel):
    p = torch.randn(4, 3, requires_grad=True)
    loss = (p * p).sum()  # saves p for backward
    p.grad = torch.randn(4, 3)
    opt = FusionOptimizer([p], lr=0.1, fused=True)
    versions = (p._version,)
    opt.step()
    assert p._version > versions[0]
    assert opt.state[p]["momentum_buffer"]._version > 0 and all(a._version > 0 for a in opt.state[p]["exp_hessian"])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_default_engine_on_cpu_is_the_fused_one_when_it_can_run(kernel):
    assert select_engine("cpu", foreach=None, fused=None) is fused_cpu.fused_fusion
    assert select_engine("cpu", foreach=True, fused=None) is not fused_cpu.fused_fusion


def test_without_a_compiler_the_optimizer_falls_back_and_fused_true_says_why(fresh_loader, monkeypatch):
    monkeypatch.setattr(_cbuild, "find_compiler", lambda: None)
    reason = fused_cpu.unavailable_reason()
    assert "no C compiler" in reason
    gen = torch.Generator().manual_seed(17)
    init = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = make_grads([(6, 5), (5,)], 2, gen, skip_second=False)
    ref = run_steps(init, grads, engine=dict(foreach=False), lr=0.1, use_rms=True)
    default = run_steps(init, grads, engine=dict(), lr=0.1, use_rms=True)  # picks the foreach engine
    assert_same_state(ref, default, lr=0.1)
    with pytest.raises(RuntimeError, match="no C compiler"):
        run_steps(init, grads, engine=dict(fused=True), lr=0.1)
    with pytest.raises(RuntimeError, match="no C compiler"):
        fused_cpu.fused_fusion(
            StepTensors([], [], [], [], []),
            StepHyper(
                lr=0.1,
                eps=1e-8,
                beta_decay=0.8,
                Lambda=0.0,
                momentum_beta=0.0,
                centralize=False,
                use_rms=False,
                maximize=False,
            ),
        )


@pytest.mark.skipif(os.name != "posix", reason="the stand-in compiler is a POSIX shell script")
def test_a_failing_compile_is_reported_with_the_compilers_message(fresh_loader, monkeypatch, tmp_path):
    fake = tmp_path / "fake-cc"
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "fake-cc 1.0"; exit 0; fi\n'
        'echo "fake-cc: error: this compiler compiles nothing" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("FUSEDBUN_CACHE_DIR", str(tmp_path / "cache"))
    reason = fused_cpu.unavailable_reason()
    assert "compiles nothing" in reason and "failed" in reason
    with pytest.raises(RuntimeError, match="compiles nothing"):
        select_engine("cpu", foreach=None, fused=True)
    assert select_engine("cpu", foreach=None, fused=None) is fusedbun.engines.foreach_fusion
    assert not list((tmp_path / "cache").glob("*.so*")), "a failed build left a file in the cache"


def test_concurrent_builds_into_one_cache_directory_give_one_working_library(kernel, tmp_path):
    cc = fused_cpu.find_compiler()
    flags = _cbuild.FLAG_SETS[-1] + tuple(f"-D{k}={v}" for k, v in fused_cpu.DEFINES.items())
    paths, errors = [], []

    def build():
        try:
            paths.append(_cbuild.compile_source(fused_cpu.SOURCE, cc, tmp_path, flags))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(paths)) == 1 and paths[0].parent == tmp_path
    assert sorted(f.name for f in tmp_path.iterdir()) == [paths[0].name], "temporary files were left behind"
    assert _cbuild.compile_source(fused_cpu.SOURCE, cc, tmp_path, flags) == paths[0]  # the second use is a cache hit
    import ctypes

    assert ctypes.CDLL(str(paths[0])).fb_abi_version() == fused_cpu.ABI_VERSION


def test_an_openmp_build_that_would_bring_a_second_runtime_is_refused_for_posix_threads(
    kernel, fresh_loader, monkeypatch
):
    # Pretend that loading the OpenMP build mapped another OpenMP library into the process.
    calls = []

    def runtimes():
        calls.append(None)
        return {"/torch/lib/libgomp.so.1"} | ({"/elsewhere/libomp.so"} if len(calls) % 2 == 0 else set())

    monkeypatch.setattr(_cbuild, "_openmp_runtimes", runtimes)
    assert fused_cpu.unavailable_reason() == ""
    assert fused_cpu.threading_backend() == "pthreads"
    assert "-fopenmp" not in _cbuild.FLAG_SETS[2]


def test_openmp_and_posix_thread_builds_give_identical_steps(kernel, fresh_loader, monkeypatch, three_threads):
    shapes = [(131, 1029), (3, 50, 700), (150_000,)]
    gen = torch.Generator().manual_seed(23)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = make_grads(shapes, 2, gen, skip_second=False)
    runs = {}
    for name, flag_sets in (("first choice", _cbuild.FLAG_SETS), ("pthreads", _cbuild.FLAG_SETS[2:])):
        monkeypatch.setattr(fused_cpu.LIBRARY, "flag_sets", flag_sets)
        monkeypatch.setattr(fused_cpu.LIBRARY, "_loaded", None)
        runs[name] = (
            fused_cpu.threading_backend(),
            run_steps(init, grads, engine=dict(fused=True), lr=0.1, use_rms=True, centralize=True),
        )
    assert runs["pthreads"][0] == "pthreads"
    (pa, oa), (pb, ob) = runs["first choice"][1], runs["pthreads"][1]
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        assert torch.equal(oa.state[a]["momentum_buffer"], ob.state[b]["momentum_buffer"])


def test_importing_fusedbun_compiles_nothing(tmp_path):
    env = dict(os.environ, FUSEDBUN_CACHE_DIR=str(tmp_path / "cache"))
    code = "import fusedbun, fusedbun.engines.fused_cpu; import os, sys; sys.exit(os.path.exists(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr or "the cache directory was created at import"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDBUN_CACHE_DIR", str(tmp_path / "here"))
    assert fused_cpu.cache_dir() == Path(tmp_path / "here")
    monkeypatch.delenv("FUSEDBUN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fused_cpu.cache_dir() == tmp_path / "xdg" / "fusedbun"
