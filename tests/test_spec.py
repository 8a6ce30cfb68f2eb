"""Specification tests for ``fusedbun.FusionOptimizer``, written from the algorithm contract (book/contract.md) alone.

Each test's name states the property of the contract it checks; each body checks it on fresh random inputs,
seeded per test (from the test id). The float64 oracle is ``spec_reference.reference_step``.

Reading of the contract used where it is terse (the places an implementer may want to check first):
- The momentum buffer is zeros before the first step (the EMA form of rule 6, like Adam's first moment),
  so the first step moves by ``(1 - momentum_beta) * u``.
- "fp32 arithmetic" for bf16/fp16 parameters is checked as: the new parameter is the float64 result of
  the rules rounded once to the parameter dtype (half an ulp), plus, when the momentum buffer is itself
  low precision, the rounding of that buffer (scaled by lr).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_reference import (  # noqa: E402
    RefState,
    RefStep,
    accumulator_shape,
    reference_step,
)

import fusedbun  # noqa: E402
from fusedbun import FusionOptimizer  # noqa: E402

F64 = torch.float64
LOW = (torch.bfloat16, torch.float16)
HP_KEYS = ("lr", "eps", "beta_decay", "Lambda", "momentum_beta", "centralize", "use_rms", "maximize")
ENGINES = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id (and the global RNG too, for nn.Module initialisation)."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def exactly_representable(eps: float) -> bool:
    return all(float(torch.tensor(eps, dtype=d)) == eps for d in (torch.float32, torch.bfloat16, torch.float16))


def make_grad(shape, gen: torch.Generator, eps: float, scale: float = 1.0) -> torch.Tensor:
    """A float64 gradient whose entries include exact zeros, tiny values (|g| < eps) and, when eps is exactly
    representable in every parameter dtype, |g| == eps exactly, so the mask of rule 3 matters (its strict
    ``>`` included). (For an eps such as 0.3, fp32(0.3) > 0.3: whether such a g is masked would depend on the
    precision of the comparison, which the contract does not pin down, so those boundary entries are not drawn.)"""
    g = torch.randn(shape, generator=gen, dtype=F64) * scale
    r = torch.rand(shape, generator=gen, dtype=F64)
    tiny = (torch.rand(shape, generator=gen, dtype=F64) * 2 - 1) * eps * 0.9
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    g = torch.where(r < 0.2, torch.zeros_like(g), g)
    g = torch.where((r >= 0.2) & (r < 0.35), tiny, g)
    if exactly_representable(eps):
        g = torch.where((r >= 0.35) & (r < 0.42), sign * eps, g)
    return g


def group_of(opt, p) -> dict[str, Any]:
    for group in opt.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise AssertionError("parameter not in any group")


def group_hp(group) -> dict[str, Any]:
    return {k: group[k] for k in HP_KEYS}


def steps_taken(opt, p) -> int:
    st = opt.state.get(p, None)
    if not st or "step" not in st:
        return 0
    return int(float(st["step"]))


def hessian_of(opt, p):
    """The exp_hessian state in the documented layout (checked)."""
    st = opt.state[p]
    assert "exp_hessian" in st, f"no 'exp_hessian' in state (keys: {sorted(st)})"
    h = st["exp_hessian"]
    if p.dim() <= 1:
        assert isinstance(h, torch.Tensor), f"exp_hessian of a {p.dim()}-D param must be a tensor, got {type(h)}"
        assert tuple(h.shape) == tuple(p.shape), f"exp_hessian shape {tuple(h.shape)} != param shape {tuple(p.shape)}"
        assert h.dtype == torch.float32, f"exp_hessian dtype {h.dtype}, the contract keeps accumulators in fp32"
        return h
    assert isinstance(h, (list, tuple)), f"exp_hessian of a {p.dim()}-D param must be a list of a_k, got {type(h)}"
    assert len(h) == p.dim(), f"{len(h)} accumulators for a {p.dim()}-D param"
    for k, a in enumerate(h):
        assert list(a.shape) == accumulator_shape(p.shape, k), (
            f"a_{k} shape {list(a.shape)} != {accumulator_shape(p.shape, k)}"
        )
        assert a.dtype == torch.float32, f"a_{k} dtype {a.dtype}, the contract keeps accumulators in fp32"
    return list(h)


def snapshot(opt, p) -> tuple[int, RefState | None]:
    """(steps taken, state as float64 copies), read before a step."""
    t = steps_taken(opt, p)
    if t == 0:
        return 0, None
    st = opt.state[p]
    h = st.get("exp_hessian")
    if isinstance(h, torch.Tensor):
        h = h.detach().to(F64).clone()
    elif h is not None:
        h = [a.detach().to(F64).clone() for a in h]
    m = st.get("momentum_buffer")
    m = m.detach().to(F64).clone() if m is not None else None
    return t, RefState(exp_hessian=h, momentum_buffer=m)


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` numbers around |x| (x in float64); subnormal spacing near zero."""
    fi = torch.finfo(dtype)
    nmant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]
    emin = int(round(math.log2(fi.tiny))) + 1
    _, e = torch.frexp(x.detach().to(F64).abs())
    e = torch.clamp(e, min=emin)
    return torch.ldexp(torch.full_like(x, 0.5, dtype=F64), (e - 1 - nmant).to(torch.int64))


def assert_within(name: str, got: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> None:
    got64 = got.detach().to(F64)
    expected = expected.to(F64)
    assert tuple(got64.shape) == tuple(expected.shape), f"{name}: shape {tuple(got64.shape)} != {tuple(expected.shape)}"
    err = (got64 - expected).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0]) if got64.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {got64.numel()} entries off. First at {idx}: "
            f"got {got64[idx].item():.10g}, expected {expected[idx].item():.10g}, "
            f"|diff| {err[idx].item():.3g} > tol {tol.expand_as(err)[idx].item():.3g}"
        )


@dataclass
class Expectation:
    p: torch.Tensor
    t: int
    ref: RefStep
    hp: dict[str, Any]
    pre_p: torch.Tensor
    pre_m: torch.Tensor | None
    momentum_dtype: torch.dtype


def expect_step(opt, p, momentum_dtype: torch.dtype | None = None) -> Expectation:
    """Call before ``opt.step()``: the reference result of the coming step for ``p``."""
    hp = group_hp(group_of(opt, p))
    t0, pre = snapshot(opt, p)
    ref = reference_step(p, p.grad, pre, t0 + 1, **hp)
    pre_m = (
        pre.momentum_buffer if pre is not None and pre.momentum_buffer is not None else torch.zeros(p.shape, dtype=F64)
    )
    return Expectation(p, t0 + 1, ref, hp, p.detach().to(F64).clone(), pre_m, momentum_dtype or p.dtype)


def verify(opt, e: Expectation, what: str = "", rows: torch.Tensor | None = None) -> None:
    """Call after ``opt.step()``: parameter, step counter, exp_hessian and momentum match the reference.

    ``rows`` (sparse gradients): a bool mask over dim 0 of the rows present in the gradient; the parameter and
    momentum are then compared with the dense rule on those rows only, and must be bit-for-bit unchanged on
    the others; the accumulators are compared everywhere."""
    p, ref, hp = e.p, e.ref, e.hp
    sel = (lambda x: x[rows]) if rows is not None else (lambda x: x)
    tag = f"{what}step {e.t}"
    lr, mb = hp["lr"], hp["momentum_beta"]
    rel = 1e-12 if p.dtype == F64 else 1e-6
    # u's own error (fp32 accumulators, fp32 arithmetic), relative to the terms that make it.
    u_err = 1e-5 * (ref.u.abs() + e.pre_m.abs() + ref.direction.abs() + ref.g.abs())

    assert steps_taken(opt, p) == e.t, f"{tag}: state['step'] is {steps_taken(opt, p)}, expected {e.t}"

    # exp_hessian: fp32, no cancellation in rule 4 -> relative tolerance.
    h = hessian_of(opt, p)
    if p.dim() <= 1:
        assert_within(f"{tag} exp_hessian", h, ref.exp_hessian, 2e-6 * ref.exp_hessian.abs() + 1e-30)
    else:
        for k, (a, ra) in enumerate(zip(h, ref.exp_hessian)):
            assert_within(f"{tag} exp_hessian a_{k}", a, ra, 2e-6 * ra.abs() + 1e-30)

    # momentum
    m_round = torch.zeros((), dtype=F64)
    st = opt.state[p]
    if mb > 0:
        assert "momentum_buffer" in st, f"{tag}: no momentum_buffer with momentum_beta={mb}"
        m = st["momentum_buffer"]
        assert m.dtype == e.momentum_dtype, f"{tag}: momentum_buffer dtype {m.dtype}, expected {e.momentum_dtype}"
        tol_m = u_err.clone()
        if e.momentum_dtype in LOW:
            m_round = 1.01 * torch.maximum(
                half_ulp(ref.momentum_buffer, e.momentum_dtype), half_ulp(m, e.momentum_dtype)
            )
            tol_m = tol_m + m_round
        elif e.momentum_dtype == torch.float32:
            tol_m = tol_m + 1e-6 * ref.momentum_buffer.abs()
        assert_within(f"{tag} momentum_buffer", sel(m), sel(ref.momentum_buffer), sel(tol_m))
        if rows is not None:
            assert torch.equal(m.detach().to(F64)[~rows], e.pre_m[~rows]), (
                f"{tag}: momentum rows absent from the sparse gradient changed"
            )
    else:
        assert st.get("momentum_buffer") is None, f"{tag}: a momentum_buffer exists with momentum_beta=0"

    # parameter: one final rounding to its dtype, fp32 arithmetic before it
    tol_p = rel * (e.pre_p.abs() + ref.param.abs()) + lr * (u_err + m_round)
    if p.dtype in LOW:
        tol_p = tol_p + 1.01 * torch.maximum(half_ulp(ref.param, p.dtype), half_ulp(p, p.dtype))
    assert_within(f"{tag} param ({p.dtype})", sel(p), sel(ref.param), sel(tol_p))
    if rows is not None:
        assert torch.equal(p.detach().to(F64)[~rows], e.pre_p[~rows]), (
            f"{tag}: param rows absent from the sparse gradient changed"
        )


def step_and_verify(opt, params, what: str = "", momentum_dtype=None) -> None:
    exps = [expect_step(opt, p, momentum_dtype) for p in params if p.grad is not None]
    opt.step()
    for e in exps:
        verify(opt, e, what)


def set_grad(p: torch.Tensor, g64: torch.Tensor) -> None:
    p.grad = g64.to(p.dtype).clone()


def as_list(h):
    return [h] if isinstance(h, torch.Tensor) else list(h)


def assert_same_tree(a, b, path="state") -> None:
    """Bit-for-bit equality of nested state (tensors: dtype, shape and bits)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs()
            where = tuple(int(i) for i in (d == d.max()).nonzero()[0])
            raise AssertionError(f"{path}: not bit-identical, max |diff| {d.max().item():.3g} at {where}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# ----------------------------------------------------------------------------------------------------------
# 4. Optimizer protocol: closure, schedulers, param groups, deepcopy, zero_grad, GradScaler, grad None
# ----------------------------------------------------------------------------------------------------------


@ENGINES
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_sparse_gradient_with_nonfinite_values_is_skipped_or_refused(mode, foreach, gen):
    emb = nn.Embedding(8, 3, sparse=True)
    opt = FusionOptimizer(emb.parameters(), lr=0.1, nonfinite=mode, foreach=foreach)
    (emb(torch.tensor([0, 2])) * torch.randn(2, 3, generator=gen)).sum().backward()
    opt.step()
    w_before = emb.weight.detach().clone()
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    (emb(torch.tensor([1, 2])) * torch.tensor([[1.0, float("nan"), 2.0], [1.0, 1.0, 1.0]])).sum().backward()
    if mode == "skip":
        with pytest.warns(RuntimeWarning):
            opt.step()
    else:
        with pytest.raises(FloatingPointError):
            opt.step()
    assert torch.equal(emb.weight.detach(), w_before)
    assert_same_tree(opt.state_dict()["state"], state_before)


# ----------------------------------------------------------------------------------------------------------
# 6. Bad hyperparameters
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# 7. Non-finite gradients
# ----------------------------------------------------------------------------------------------------------


@ENGINES
@pytest.mark.parametrize("momentum_beta", [0.0, 0.9], ids=["mom0", "mom.9"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_skip_mode_skips_a_nonfinite_param_warns_and_updates_the_others(bad, momentum_beta, foreach, gen):
    a = torch.randn(4, 5, generator=gen).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_()
    c = torch.randn(3, 2, 2, generator=gen).requires_grad_()
    opt = FusionOptimizer(
        [a, b, c], lr=0.1, use_rms=True, momentum_beta=momentum_beta, nonfinite="skip", foreach=foreach
    )
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    step_and_verify(opt, [a, b, c])

    # step 2: b's gradient holds one non-finite entry
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    b.grad[2] = bad
    b_before = b.detach().clone()
    state_b = copy.deepcopy(dict(opt.state[b]))
    exps = [expect_step(opt, x) for x in (a, c)]
    with pytest.warns(RuntimeWarning):
        opt.step()
    for e in exps:
        verify(opt, e, "finite param next to a skipped one, ")
    assert torch.equal(b.detach(), b_before), "skipped parameter changed"
    assert_same_tree(dict(opt.state[b]), state_b, "skipped parameter's state")
    assert steps_taken(opt, b) == 1

    # step 3: b resumes as its own step 2
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    step_and_verify(opt, [a, b, c])
    assert steps_taken(opt, b) == 2 and steps_taken(opt, a) == 3


@ENGINES
def test_skip_mode_on_the_first_step_leaves_the_param_fresh(foreach, gen):
    a = torch.randn(3, 4, generator=gen).requires_grad_()
    a0 = a.detach().clone()
    opt = FusionOptimizer([a], lr=0.1, nonfinite="skip", foreach=foreach)
    a.grad = torch.randn(3, 4, generator=gen)
    a.grad[1, 1] = float("nan")
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(a.detach(), a0)
    assert steps_taken(opt, a) == 0
    a.grad = torch.randn(3, 4, generator=gen)
    step_and_verify(opt, [a], "first finite step after a skipped one: ")  # behaves as t = 1 (beta_1 = 0)


@ENGINES
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_raise_mode_raises_floating_point_error_before_changing_anything(bad, foreach, gen):
    a = torch.randn(4, 5, generator=gen).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_()
    opt = FusionOptimizer([a, b], lr=0.1, nonfinite="raise", foreach=foreach)
    for x in (a, b):
        x.grad = torch.randn(x.shape, generator=gen)
    opt.step()
    params_before = [a.detach().clone(), b.detach().clone()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    a.grad = torch.randn(a.shape, generator=gen)  # finite, and first in the group
    b.grad = torch.randn(b.shape, generator=gen)
    b.grad[-1] = bad
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(a.detach(), params_before[0]) and torch.equal(b.detach(), params_before[1]), (
        "a parameter changed"
    )
    assert_same_tree(opt.state_dict()["state"], state_before)
    b.grad = torch.randn(b.shape, generator=gen)
    step_and_verify(opt, [a, b], "after the refused step: ")


# ----------------------------------------------------------------------------------------------------------
# 8. state_dict round trip
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# 9. Hyperparameters per group, changed between steps
# ----------------------------------------------------------------------------------------------------------


def test_param_groups_no_decay_gives_one_d_params_zero_lambda(gen):
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    groups = fusedbun.param_groups_no_decay(model, Lambda=0.05)
    seen = [p for g in groups for p in g["params"]]
    assert len(seen) == len(list(model.parameters())) and {id(p) for p in seen} == {id(p) for p in model.parameters()}
    opt = FusionOptimizer(groups, lr=0.1, momentum_beta=0.0)
    for p in model.parameters():
        lam = group_of(opt, p)["Lambda"]
        assert lam == (0.0 if p.dim() <= 1 else 0.05), f"{tuple(p.shape)}: Lambda {lam}"
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # all masked: only weight decay moves a parameter
    opt.step()
    for p, b in zip(model.parameters(), before):
        expected = b if p.dim() <= 1 else b * (1 - 0.1 * 0.05)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
