"""Checking a FusionOptimizer step against the float64 oracle (``spec_reference.reference_step``).

``spec_reference`` re-derives the rule from the algorithm contract and knows nothing of the package;
this module is the bridge: it reads an optimizer's state in the documented layout, asks the oracle what
the coming step must produce, and compares after the step, with tolerances that follow the contract's
"fp32 arithmetic, one rounding to the parameter dtype". Used by ``test_rule.py`` and by the tests of the
``torch.optim`` contract and of the non-finite modes that check a step's result against the rule.

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
from dataclasses import dataclass
from typing import Any

import torch
from spec_reference import RefState, RefStep, accumulator_shape, reference_step

F64 = torch.float64
LOW = (torch.bfloat16, torch.float16)
HP_KEYS = ("lr", "eps", "beta_decay", "Lambda", "momentum_beta", "centralize", "use_rms", "maximize")
# Gradient scale per step: nu evolves, more or fewer entries are masked.
STEP_SCALES = [1.0, 0.5, 2.0, 1.0]


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


def set_grad(p: torch.Tensor, g64: torch.Tensor) -> None:
    p.grad = g64.to(p.dtype).clone()


def as_list(h):
    return [h] if isinstance(h, torch.Tensor) else list(h)


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


def verify(opt, e: Expectation, what: str = "", rows: torch.Tensor | None = None, accumulator_rtol=None) -> None:
    """Call after ``opt.step()``: parameter, step counter, exp_hessian and momentum match the reference.

    ``rows`` (sparse gradients): a bool mask over dim 0 of the rows present in the gradient; the parameter and
    momentum are then compared with the dense rule on those rows only, and must be bit-for-bit unchanged on
    the others; the accumulators are compared everywhere. ``accumulator_rtol(shape, k)`` is the relative
    tolerance of ``a_k`` (default 2e-6: SM3's maxima are exact after nu's fp32 rounding); a larger one also
    widens u's, since the error of nu reaches u through a square root. Tensors on a device are compared on
    the CPU."""
    p, ref, hp = e.p, e.ref, e.hp
    nu_rel = 0.0
    if accumulator_rtol is not None and p.dim() >= 2:
        nu_rel = max(accumulator_rtol(p.shape, k) for k in range(p.dim()))
    tag = f"{what}step {e.t}"
    lr, mb = hp["lr"], hp["momentum_beta"]
    rel = 1e-12 if p.dtype == F64 else 1e-6
    # u's own error (fp32 accumulators, fp32 arithmetic), relative to the terms that make it.
    u_err = (1e-5 + nu_rel) * (ref.u.abs() + e.pre_m.abs() + ref.direction.abs() + ref.g.abs())

    assert steps_taken(opt, p) == e.t, f"{tag}: state['step'] is {steps_taken(opt, p)}, expected {e.t}"

    # exp_hessian: fp32, no cancellation in rule 4 -> relative tolerance. Centralization (rule 2) cancels,
    # though: the fp32 g - mean(g) is off by about (row length + 2) ulps of the row's largest |g|, so an entry
    # whose centred gradient is small gets g^2's error as an absolute term, 2 |g| dg (+ dg^2), not a relative one.
    h = hessian_of(opt, p)
    centred = 0.0
    if hp["centralize"] and p.dim() > 1 and p.numel():
        raw = e.p.grad.detach().cpu().to(F64)
        dg = (p.numel() // p.shape[0] + 2) * 2.0**-24 * raw.to_dense().abs().max().item()
        centred = 2 * ref.g.abs().max().item() * dg + dg * dg
    if p.dim() <= 1:
        assert_within(f"{tag} exp_hessian", h.cpu(), ref.exp_hessian, 2e-6 * ref.exp_hessian.abs() + 1e-30)
    else:
        for k, (a, ra) in enumerate(zip(h, ref.exp_hessian)):
            rtol = 2e-6 if accumulator_rtol is None else accumulator_rtol(p.shape, k)
            assert_within(f"{tag} exp_hessian a_{k}", a.cpu(), ra, rtol * ra.abs() + centred + 1e-30)

    check_momentum_and_param(
        tag, opt.state[p], e, ref, lr=lr, momentum_beta=mb, u_err=u_err, rel=rel, rows=rows, param=p.detach().cpu()
    )


def check_momentum_and_param(
    tag: str,
    st: dict,
    e: Expectation,
    ref: RefStep,
    *,
    lr: float,
    momentum_beta: float,
    u_err: torch.Tensor,
    rel: float,
    rows: torch.Tensor | None,
    param: torch.Tensor,
    param_units: float = 1.01,
    full=lambda t: t.detach().cpu(),
) -> None:
    """Rules 9 to 11 after a step: the momentum buffer (its dtype, and the reference within ``u_err`` plus
    one rounding into a 16-bit dtype) and the parameter (``param``, on the CPU: one final rounding to its
    dtype, ``param_units`` half units of it, fp32 arithmetic before it). ``rows`` (row-sparse gradients):
    both are compared on the present rows and must be unchanged, bit for bit, on the others. ``full`` brings
    a state tensor to the CPU (a sharded one whole)."""
    sel = (lambda x: x[rows]) if rows is not None else (lambda x: x)
    m_round = torch.zeros((), dtype=F64)
    if momentum_beta > 0:
        assert st.get("momentum_buffer") is not None, f"{tag}: no momentum_buffer with momentum_beta={momentum_beta}"
        m = full(st["momentum_buffer"])
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
            assert torch.equal(m.to(F64)[~rows], e.pre_m[~rows]), (
                f"{tag}: momentum rows absent from the sparse gradient changed"
            )
    else:
        assert st.get("momentum_buffer") is None, f"{tag}: a momentum_buffer exists with momentum_beta=0"

    tol_p = rel * (e.pre_p.abs() + ref.param.abs()) + lr * (u_err + m_round)
    if param.dtype in LOW:
        tol_p = tol_p + param_units * torch.maximum(half_ulp(ref.param, param.dtype), half_ulp(param, param.dtype))
    assert_within(f"{tag} param ({param.dtype})", sel(param), sel(ref.param), sel(tol_p))
    if rows is not None:
        assert torch.equal(param.to(F64)[~rows], e.pre_p[~rows]), (
            f"{tag}: param rows absent from the sparse gradient changed"
        )


def step_and_verify(opt, params, what: str = "", momentum_dtype=None) -> None:
    """One ``opt.step()``; every parameter in ``params`` that has a gradient is checked against the rule."""
    exps = [expect_step(opt, p, momentum_dtype) for p in params if p.grad is not None]
    opt.step()
    for e in exps:
        verify(opt, e, what)


# ----------------------------------------------------------------------------------------------------------
# row-sparse gradients
# ----------------------------------------------------------------------------------------------------------

SPARSE_BATCHES = [[0, 1, 1, 3], [2, 3, 7, 7, 7], [0, 9, 9, 5], [1], [4, 6, 0, 2, 8, 8]]
"""The rows looked up at each step of the row-sparse tests: repeated rows, and rows absent for a while."""


def sparse_batch_grad(emb, opt, rows, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``emb.weight`` (``nn.Embedding(sparse=True)``) the row-sparse gradient of looking up ``rows``,
    one entry of the first row small enough to be masked; return it dense and the mask of present rows."""
    w = emb.weight
    idx = torch.tensor(rows)
    coef = torch.randn(len(rows), w.shape[1], generator=gen)
    coef[0, 0] = 0.01  # one small entry: masked in a present row
    opt.zero_grad()
    (emb(idx) * coef).sum().backward()
    assert w.grad.is_sparse
    present = torch.zeros(w.shape[0], dtype=torch.bool)
    present[idx] = True
    return w.grad.to_dense(), present


def dense_twin_step(opt, w, g_dense, engine: dict, hp: dict):
    """The engine's own dense rule as a second witness: a copy of ``w`` with ``opt``'s state, stepped once
    with ``g_dense``. Returns the copy and its optimizer."""
    from fusedbun import FusionOptimizer

    wd = w.detach().clone().requires_grad_()
    od = FusionOptimizer([wd], **engine, **hp)
    if steps_taken(opt, w):
        od.load_state_dict(copy.deepcopy(opt.state_dict()))
    wd.grad = g_dense.clone()
    od.step()
    return wd, od
