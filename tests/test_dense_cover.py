"""The ``cover="dense"`` and ``hessian_dtype`` options of FusionOptimizer: a per-element second moment for
every tensor, and dense second moments stored in bf16, rounded stochastically on a stream of their own.

Written from the options' statement, not from the implementation. With ``cover="dense"`` every parameter,
whatever its number of dims, keeps rule 4's dense ``v`` (the 0-D/1-D rule): ``v = where(mask, beta_t * v +
(1 - beta_t) * g**2, v)``, ``nu = v``, stored as one tensor shaped like the parameter; centralization of
tensors of 2+ dims is unchanged. ``hessian_dtype`` (``None`` = fp32, ``torch.float32`` or
``torch.bfloat16``) is the dtype of the dense second moments (0-D/1-D parameters always, every parameter
under ``cover="dense"``); SM3's and the factored accumulators stay fp32. A bf16 ``v`` is updated at step t
(the parameter's own count) as ``nu32 = where(mask, beta_t * v.float() + (1 - beta_t) * g**2, v.float())``
in fp32, then ``v = stochastic_round_at(nu32, bf16, rounding_keys(rounding_seed, hessian_key(position),
t), flat_index(p.shape))``, always stochastically, and the rest of the step uses ``nu = v.float()`` as
stored; masked entries keep their ``v`` exactly.

The float64 oracle is ``spec_reference.reference_step(..., cover="dense", store_v=...)``: ``store_v`` is how a
dense ``v`` is stored, here :func:`bf16_store` (the statement's rounding, applied to the oracle's ``nu``
rounded once to fp32). The checks of a step against it are :func:`expect` / :func:`check` below
(``rule_check.verify``'s tolerances, with the state layouts of this option). A stored bf16 ``v`` is
compared with :class:`UlpTally`: the stochastic decision compares fp32 bits, and an engine's fp32
arithmetic may differ from the correctly rounded value in the last bit, so an element may be one bf16
unit off, never more, and only rarely; the rest of the step is then checked from ``v`` as the engine
stored it.

What is here, by the statement's points:

1. ``cover="dense"``: every engine against the oracle (fp32 and bf16 parameters, bf16 momentum, the
   flags, 1-D to 4-D, odd sizes, zero-size tensors, fp32 and bf16 ``v``), a 2-D/3-D parameter equals its
   flattened 1-D twin, centralization before the mask, ``COVERS``, refused covers.
2. ``hessian_dtype``: validation (constructor, ``add_param_group``, set between steps), per-group values,
   ``torch.float32`` equal to ``None``, SM3's and the factored accumulators stay fp32.
3. The bf16 ``v``'s rounding: exactly ``stochastic_round_at`` on the ``hessian_key(position)`` stream at
   the parameter's own step (steps where fp32 arithmetic is exact), independent of
   ``stochastic_rounding``, deterministic for the seed.
4. Why stochastic: a slowly moving EMA at t > 1000, followed by the mean of the stored bf16 ``v``.
5. Engines: reference loop, multi-tensor, fused C, the Triton engine (compiled, or under
   ``TRITON_INTERPRET=1`` as in ``test_fused_cuda.py``), row-sparse gradients, DTensor (one process, a
   one-rank gloo group as in ``engine_fingerprint.py``); engine against engine on larger tensors.
6. State layout, dtypes and bytes per element; ``state_dict`` round trips and bit-for-bit resume.
7. The functional ``fusion(..., cover="dense")`` with fp32 and bf16 ``exp_hessians``.
8. The regression of the Triton engine's fallback for bf16 parameters with stochastic rounding.
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from typing import Any

import pytest
import test_fused_cuda as triton_tests
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import FUSED_CPU_REASON
from helpers import assert_same_run, assert_tree_equal, clone_params, launch, make_params, run
from rule_check import (
    F64,
    LOW,
    SPARSE_BATCHES,
    STEP_SCALES,
    assert_within,
    check_momentum_and_param,
    dtype_id,
    group_hp,
    group_of,
    make_grad,
    set_grad,
    sparse_batch_grad,
    steps_taken,
)
from spec_reference import RefState, RefStep, accumulator_shape, reference_step

import fusedbun
import fusedbun.hessian
from fusedbun import FusionOptimizer
from fusedbun.rounding import HESSIAN_STREAM, flat_index, hessian_key, rounding_keys, stochastic_round_at

BF16 = torch.bfloat16
U32 = 2.0**-24  # the unit roundoff of fp32
HESSIAN_DTYPES = [pytest.param(None, id="v-fp32"), pytest.param(BF16, id="v-bf16")]

pytestmark = [
    # The Triton interpreter computes masked-out lanes too, in NumPy, which warns about NaN it then discards.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# ----------------------------------------------------------------------------------------------------------
# reading the state, the bf16 store of the oracle, one-unit differences
# ----------------------------------------------------------------------------------------------------------


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of a tensor's value on the CPU (a DTensor's full value)."""
    if t is None:
        return None
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().clone()


def _cpu64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _full(t).to(F64).clone()


def position_of(opt, p) -> int:
    """The parameter's position in the optimizer: the numbering of ``state_dict()["state"]`` (every param of
    every group, in order)."""
    i = 0
    for group in opt.param_groups:
        for q in group["params"]:
            if q is p:
                return i
            i += 1
    raise AssertionError("parameter not in the optimizer")


def stored_dtype(group) -> torch.dtype:
    """The dtype of the group's dense second moments: ``hessian_dtype``, ``None`` meaning fp32."""
    return group.get("hessian_dtype") or torch.float32


def is_dense(p, cover: str) -> bool:
    return p.dim() <= 1 or cover == "dense"


def bf16_store(seed: int, position: int, t: int, shape):
    """The statement's storage of a bf16 ``v`` at step t, for the oracle: ``nu`` (float64) rounded to fp32,
    then ``stochastic_round_at`` on the stream ``rounding_keys(seed, hessian_key(position), t)`` with the
    flat row-major index of every element in the whole parameter."""
    keys = rounding_keys(seed, hessian_key(position), t)
    index = flat_index(tuple(shape))

    def store(nu64: torch.Tensor) -> torch.Tensor:
        return stochastic_round_at(nu64.to(torch.float32), BF16, keys, index).to(F64)

    return store


def _ordinal(x: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in value order (adjacent bf16 numbers differ by 1; -0 and +0 are both 0)."""
    bits = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


class UlpTally:
    """bf16 tensors against what they should be: never more than one bf16 unit apart, and one unit apart on
    a tiny fraction of the elements only (at most ``max_fraction`` of those compared, or ``slack`` elements
    when few were compared). Wrong keys, a wrong index or rounding to nearest put about half of them off."""

    def __init__(self, max_fraction: float = 2e-3, slack: int = 2) -> None:
        self.max_fraction, self.slack = max_fraction, slack
        self.n = self.off = 0
        self.first: str | None = None

    def add(self, got: torch.Tensor, want: torch.Tensor, tag: str) -> torch.Tensor:
        """Compare; returns the mask of the elements that are bit-identical."""
        got, want = _full(got), _full(want)
        assert got.dtype == BF16 and want.dtype == BF16, f"{tag}: dtypes {got.dtype}, {want.dtype} (bf16 expected)"
        assert got.shape == want.shape, f"{tag}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        d = (_ordinal(got) - _ordinal(want)).abs()
        if d.numel() and int(d.max()) > 1:
            idx = tuple(int(i) for i in (d == d.max()).nonzero()[0]) if d.dim() else ()
            raise AssertionError(
                f"{tag}: {int((d > 1).sum())} of {d.numel()} bf16 entries more than one unit off; at {idx}: "
                f"got {got[idx].item():.8g}, expected {want[idx].item():.8g} ({int(d[idx])} units)"
            )
        off = int((d == 1).sum())
        if off and self.first is None:
            self.first = tag
        self.n += d.numel()
        self.off += off
        return d == 0

    def check(self, what: str = "") -> None:
        allowed = max(self.slack, self.max_fraction * self.n)
        assert self.off <= allowed, (
            f"{what}{self.off} of {self.n} bf16 entries one unit off (more than {allowed:g}; first: {self.first})"
        )


# ----------------------------------------------------------------------------------------------------------
# a step against the float64 oracle, on any engine
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DenseExpectation:
    p: torch.Tensor
    t: int
    hp: dict[str, Any]
    cover: str
    dense: bool  # a dense v (a tensor shaped like p)
    hessian_dtype: torch.dtype  # the dtype that v must have (dense only)
    store: Any  # the bf16 store of v, or None (fp32)
    pre: RefState | None
    grad: torch.Tensor  # float64, dense
    ref: RefStep  # the oracle's step, with the expected storage of v
    pre_p: torch.Tensor
    pre_m: torch.Tensor
    pre_v: torch.Tensor | None  # the dense v before the step (float64), zeros when fresh
    momentum_dtype: torch.dtype
    stochastic: bool  # the parameter itself is rounded stochastically


def expect(opt, p, momentum_dtype: torch.dtype | None = None) -> DenseExpectation:
    """Call before ``opt.step()``: the oracle's result of the coming step for ``p`` (its group's cover and
    hessian_dtype, its position and step count for the bf16 stream)."""
    group = group_of(opt, p)
    cover = group.get("cover", "sm3")
    t0 = steps_taken(opt, p)
    pre = None
    if t0:
        st = opt.state[p]
        h = st["exp_hessian"]
        h = _cpu64(h) if isinstance(h, torch.Tensor) else [_cpu64(a) for a in h]
        pre = RefState(exp_hessian=h, momentum_buffer=_cpu64(st.get("momentum_buffer")))
    grad = p.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    grad = _cpu64(grad)
    dense = is_dense(p, cover)
    hdtype = stored_dtype(group)
    store = None
    if dense and hdtype == BF16:
        store = bf16_store(int(group.get("rounding_seed", 0)), position_of(opt, p), t0 + 1, p.shape)
    hp = group_hp(group)
    ref = reference_step(_full(p), grad, pre, t0 + 1, cover=cover, store_v=store, **hp)
    pre_m = pre.momentum_buffer if pre is not None and pre.momentum_buffer is not None else None
    pre_m = pre_m if pre_m is not None else torch.zeros(p.shape, dtype=F64)
    pre_v = None
    if dense:
        pre_v = pre.exp_hessian if pre is not None else torch.zeros(p.shape, dtype=F64)
    stochastic = bool(group.get("stochastic_rounding", False)) and p.dtype in LOW
    return DenseExpectation(
        p, t0 + 1, hp, cover, dense, hdtype, store, pre, grad, ref, _cpu64(p), pre_m, pre_v,
        momentum_dtype or p.dtype, stochastic,
    )  # fmt: skip


def accumulator_rtol(shape, k: int, cover: str) -> float:
    """As in test_factored_cover.py: SM3's a_k is a maximum (exact after nu's fp32 rounding); a factored a_k is
    a mean of numel / n_k entries (about N ulps for an fp32 sum of N terms, four times that bound)."""
    if cover != "factored":
        return 2e-6
    n = math.prod(shape)
    terms = n // shape[k] if shape[k] else 0
    return 4 * (terms + shape[0] + 2 * len(shape) + 4) * U32


def centralization_error(grad: torch.Tensor, hp: dict) -> torch.Tensor:
    """A bound of the fp32 error of a centralized gradient entry, ``g - mean(g over dims 1..)``: the mean of a
    row's N entries is within about N ulps of the row's mean magnitude, the subtraction one more rounding.
    It is absolute, not relative to the (possibly much smaller) centralized entry. 0 without centralization."""
    if not hp["centralize"] or grad.dim() < 2 or grad.numel() == 0:
        return torch.zeros((), dtype=F64)
    dims = tuple(range(1, grad.dim()))
    n = grad[0].numel()
    a = grad.abs()
    return 4 * U32 * (a + grad.mean(dim=dims, keepdim=True).abs() + (n + 2) * a.mean(dim=dims, keepdim=True))


def check(opt, e: DenseExpectation, what: str = "", rows: torch.Tensor | None = None, tally=None) -> None:
    """Call after ``opt.step()``: step count, second moment (layout, dtype, values), momentum and parameter
    match the oracle. A bf16 ``v`` is compared with ``tally`` (one unit off on rare elements), its masked
    entries must keep their bits, and the rest of the step is checked from ``v`` as stored.

    ``rows`` (row-sparse gradients): a bool mask over dim 0 of the rows present; the parameter and momentum
    are compared with the dense rule on those rows and must be bit-for-bit unchanged on the others, and so
    must ``v`` on the absent rows (lazy semantics)."""
    own_tally = tally is None
    tally = UlpTally() if own_tally else tally
    p, ref, hp = e.p, e.ref, e.hp
    dg = centralization_error(e.grad, hp)  # what fp32 centralization may add to g's error
    tag = f"{what}{tuple(p.shape)} {dtype_id(p.dtype)} cover={e.cover} v={dtype_id(e.hessian_dtype)} step {e.t}"
    assert steps_taken(opt, p) == e.t, f"{tag}: state['step'] is {steps_taken(opt, p)}, expected {e.t}"
    st = opt.state[p]
    assert "exp_hessian" in st, f"{tag}: no exp_hessian in the state (keys {sorted(st)})"
    h = st["exp_hessian"]
    nu_rel = 0.0
    if e.dense:
        assert isinstance(h, torch.Tensor), f"{tag}: a dense exp_hessian must be one tensor, got {type(h)}"
        assert tuple(h.shape) == tuple(p.shape), f"{tag}: exp_hessian shape {tuple(h.shape)} != {tuple(p.shape)}"
        assert h.dtype == e.hessian_dtype, f"{tag}: exp_hessian dtype {h.dtype}, expected {e.hessian_dtype}"
        got = _full(h)
        kept = ref.mask
        if e.store is not None:
            tally.add(got, ref.exp_hessian.to(BF16), f"{tag} bf16 v")
            # the rest of the step normalizes by v as stored
            ref = reference_step(e.pre_p, e.grad, e.pre, e.t, cover=e.cover, store_v=lambda nu: got.to(F64), **hp)
        else:
            b = 1.0 - float(e.t) ** (-float(hp["beta_decay"]))
            tol_v = 2e-6 * ref.exp_hessian.abs() + 2 * (1 - b) * (2 * ref.g.abs() * dg + dg * dg) + 1e-30
            assert_within(f"{tag} exp_hessian", got, ref.exp_hessian, tol_v)
        assert torch.equal(got.to(F64)[~kept], e.pre_v[~kept]), f"{tag}: masked entries of v changed"
        if rows is not None:
            assert torch.equal(got.to(F64)[~rows], e.pre_v[~rows]), f"{tag}: v of rows absent from the gradient changed"
    else:
        assert isinstance(h, (list, tuple)), f"{tag}: exp_hessian of a {p.dim()}-D param must be a list, got {type(h)}"
        assert len(h) == p.dim(), f"{tag}: {len(h)} accumulators"
        for k, (a, ra) in enumerate(zip(h, ref.exp_hessian)):
            assert list(a.shape) == accumulator_shape(p.shape, k), f"{tag}: a_{k} shape {list(a.shape)}"
            assert a.dtype == torch.float32, f"{tag}: a_{k} dtype {a.dtype}: accumulators stay fp32"
            rtol = accumulator_rtol(p.shape, k, e.cover)
            assert_within(f"{tag} a_{k}", _full(a), ra, rtol * ra.abs() + 1e-30)
        if e.cover == "factored" and p.dim() >= 2:
            nu_rel = max(accumulator_rtol(p.shape, k, e.cover) for k in range(p.dim()))

    u_err = (1e-5 + nu_rel) * (ref.u.abs() + e.pre_m.abs() + ref.direction.abs() + ref.g.abs())
    u_err = u_err + 2 * (dg / (ref.nu.sqrt() + hp["eps"]) if hp["use_rms"] else dg)
    # one rounding of the parameter: half a unit to nearest, up to one unit stochastically
    check_momentum_and_param(
        tag,
        st,
        e,
        ref,
        lr=hp["lr"],
        momentum_beta=hp["momentum_beta"],
        u_err=u_err,
        rel=1e-6,
        rows=rows,
        param=_full(p),
        param_units=2.02 if e.stochastic else 1.01,
        full=_full,
    )
    if own_tally:
        tally.check(f"{tag}: ")


def step_and_check(opt, params, what: str = "", momentum_dtype=None, tally=None) -> None:
    exps = [expect(opt, p, momentum_dtype) for p in params if p.grad is not None]
    opt.step()
    for e in exps:
        check(opt, e, what, tally=tally)


# ----------------------------------------------------------------------------------------------------------
# 1. cover="dense": every engine against the float64 oracle
# ----------------------------------------------------------------------------------------------------------

# 1-D to 4-D, odd sizes, size-1 dims, a 0-D and zero-size tensors, in one group
RULE_SHAPES = [(7, 5), (1, 6), (6, 1), (3, 4, 5), (2, 1, 3, 1), (13,), (), (1,), (0,), (3, 0)]
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
    pytest.param(dict(eps=1e-8, use_rms=True, momentum_dtype=BF16), id="eps1e-8-rms-bf16m"),
    pytest.param(dict(eps=0.25, centralize=True, momentum_dtype=BF16), id="centralize-bf16m"),
]


def _sr(dtype) -> dict:
    """bf16/fp16 parameters are rounded stochastically in these tests (the statement's coverage)."""
    return {"stochastic_rounding": True} if dtype in LOW else {}


def test_covers_are_sm3_factored_and_dense_and_the_defaults_are_sm3_and_none():
    assert fusedbun.hessian.COVERS == ("sm3", "factored", "dense")
    assert HESSIAN_STREAM == 2**63
    assert all(hessian_key(k) == k + 2**63 for k in (0, 1, 7, 12345))
    opt = FusionOptimizer([torch.zeros(3, 2, requires_grad=True)], lr=0.1)
    assert opt.param_groups[0]["cover"] == "sm3" and opt.param_groups[0]["hessian_dtype"] is None
    opt = FusionOptimizer([torch.zeros(3, 2, requires_grad=True)], lr=0.1, cover="dense", hessian_dtype=BF16)
    assert opt.param_groups[0]["cover"] == "dense" and opt.param_groups[0]["hessian_dtype"] == BF16


@pytest.mark.parametrize("hessian_dtype", HESSIAN_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=dtype_id)
@pytest.mark.parametrize("hyper", RULE_HYPER)
def test_every_engine_follows_the_dense_rule_step_by_step(engine, hyper, dtype, hessian_dtype, gen):
    """eps = 0.25 is exact in every dtype: many entries masked, |g| == eps among them (masked: the mask is
    strict). At step 2 every third parameter has no gradient, so the step counts (beta_t, and the step of the
    bf16 v's stream) differ between parameters."""
    hyper = dict(hyper)
    momentum_dtype = hyper.pop("momentum_dtype", None)
    eps = hyper["eps"]
    params = [torch.randn(s, generator=gen, dtype=F64).to(dtype).requires_grad_() for s in RULE_SHAPES]
    opt = FusionOptimizer(
        params, lr=0.1, cover="dense", hessian_dtype=hessian_dtype, momentum_dtype=momentum_dtype, rounding_seed=11,
        **_sr(dtype), **hyper, **engine,
    )  # fmt: skip
    tally = UlpTally()
    for t, scale in enumerate(STEP_SCALES):
        for i, p in enumerate(params):
            if t == 1 and i % 3 == 0:
                p.grad = None
            else:
                set_grad(p, make_grad(p.shape, gen, eps, scale))
        step_and_check(opt, params, momentum_dtype=momentum_dtype, tally=tally)
    tally.check()


@pytest.mark.parametrize("hessian_dtype", HESSIAN_DTYPES)
def test_a_tensor_of_several_dims_under_dense_equals_its_flattened_one_dim_twin(engine, hessian_dtype, gen):
    """The 0-D/1-D rule applied to all: without centralization (the one thing that looks at the shape), a
    (5, 7) and a (3, 2, 4) parameter under cover="dense" step exactly as their flattened 1-D twins, at the
    same positions (so a bf16 v draws the same stream: the key is the position, the index the flat row-major
    one): the same bits of parameter, momentum and v."""
    shapes_ = [(5, 7), (9,), (3, 2, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes_]
    grads = [[make_grad(s, gen, 1e-3, sc).float() for s in shapes_] for sc in STEP_SCALES]
    hyper = dict(lr=0.05, eps=1e-3, use_rms=True, maximize=True, hessian_dtype=hessian_dtype, rounding_seed=5)
    nd = [x.clone().requires_grad_() for x in init]
    flat = [x.clone().reshape(-1).requires_grad_() for x in init]
    o_nd = FusionOptimizer(nd, cover="dense", **hyper, **engine)
    o_flat = FusionOptimizer(flat, **hyper, **engine)  # 1-D tensors keep a dense v whatever the cover
    for gs in grads:
        for a, b, g in zip(nd, flat, gs):
            a.grad, b.grad = g.clone(), g.reshape(-1).clone()
        o_nd.step()
        o_flat.step()
    for a, b in zip(nd, flat):
        where = f"{tuple(a.shape)} vs its flattened twin"
        assert torch.equal(a.detach().reshape(-1), b.detach()), f"{where}: parameters differ"
        for key in ("exp_hessian", "momentum_buffer"):
            x, y = o_nd.state[a][key], o_flat.state[b][key]
            assert isinstance(x, torch.Tensor), f"{where}: {key} is a {type(x)}"
            assert_tree_equal(x.reshape(-1), y, f"{where}: {key}")


def test_centralization_still_applies_to_dense_tensors_of_two_or_more_dims_before_the_mask(engine):
    """A gradient constant along every row (dims 1..) is all zeros once centralized: every entry is masked,
    v stays zero and the parameter only decays. The same gradient on the flattened 1-D twin (never
    centralized) moves v. 3-D too: the mean is over dims 1 and 2."""
    for shape in [(4, 6), (3, 2, 5)]:
        rows = torch.tensor([0.5, -1.5, 2.0, 3.0])[: shape[0]]
        g = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous()
        for hd in (None, BF16):
            p = torch.randn(shape).requires_grad_()
            p0 = p.detach().clone()
            opt = FusionOptimizer([p], lr=0.1, Lambda=0.5, centralize=True, cover="dense", hessian_dtype=hd, **engine)
            for _ in range(2):
                p.grad = g.clone()
                opt.step()
            v = opt.state[p]["exp_hessian"]
            assert isinstance(v, torch.Tensor) and v.shape == p.shape
            assert torch.equal(v, torch.zeros_like(v)), f"{shape} v={hd}: v moved though every entry is masked"
            m = opt.state[p]["momentum_buffer"]
            assert torch.equal(m, torch.zeros_like(m)), f"{shape}: momentum moved"
            torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * 0.5) ** 2, rtol=1e-6, atol=0)
            q = p0.clone().reshape(-1).requires_grad_()
            oq = FusionOptimizer([q], lr=0.1, centralize=True, hessian_dtype=hd, **engine)
            q.grad = g.reshape(-1).clone()
            oq.step()
            assert bool((oq.state[q]["exp_hessian"].float() > 0).all()), "harness: the 1-D twin's v must move"


BAD_COVERS = [
    ("Dense", ValueError),
    ("DENSE", ValueError),
    ("dense ", ValueError),
    ("adam", ValueError),
    ("", ValueError),
    (None, (ValueError, TypeError)),
    (0, (ValueError, TypeError)),
    (True, (ValueError, TypeError)),
    (("dense",), (ValueError, TypeError)),
]


@pytest.mark.parametrize("where", ["constructor", "add_param_group", "group-between-steps"])
@pytest.mark.parametrize("value,exc", BAD_COVERS, ids=[repr(v) for v, _ in BAD_COVERS])
def test_an_invalid_cover_is_refused_naming_cover(where, value, exc):
    _assert_refused("cover", value, exc, where, good="dense")


# ----------------------------------------------------------------------------------------------------------
# 2. hessian_dtype: validation, per-group values, fp32 equal to None, SM3's and factored accumulators fp32
# ----------------------------------------------------------------------------------------------------------

BAD_HESSIAN_DTYPES = [torch.float16, torch.float64, torch.int8, torch.complex64, "bf16", "bfloat16", "float32", 16]


def _assert_refused(name: str, value, exc, where: str, good) -> None:
    """``name=value`` is refused with ``exc`` naming ``name``: in the constructor, in ``add_param_group`` (the
    group not kept), or set in a group between steps (at ``step``, changing nothing)."""
    if where == "constructor":
        with pytest.raises(exc, match=name):
            FusionOptimizer([torch.zeros(3, 2, requires_grad=True)], lr=0.1, **{name: value})
    elif where == "add_param_group":
        opt = FusionOptimizer([torch.zeros(3, requires_grad=True)], lr=0.1, **{name: good})
        with pytest.raises(exc, match=name):
            opt.add_param_group({"params": [torch.zeros(2, 2, requires_grad=True)], name: value})
        assert len(opt.param_groups) == 1, "the refused group was kept"
    else:
        params = make_params(29)
        opt = FusionOptimizer(params, lr=0.01, **{name: good})
        run(opt, params, range(2))
        state = copy.deepcopy(opt.state_dict()["state"])
        values = [p.detach().clone() for p in params]
        opt.param_groups[0][name] = value
        with pytest.raises(exc, match=name):
            opt.step()
        assert all(torch.equal(p.detach(), v) for p, v in zip(params, values)), "a parameter moved"
        assert_tree_equal(opt.state_dict()["state"], state, "state after a refused step")
        opt.param_groups[0][name] = good
        opt.step()


@pytest.mark.parametrize("where", ["constructor", "add_param_group", "group-between-steps"])
@pytest.mark.parametrize("value", BAD_HESSIAN_DTYPES, ids=repr)
def test_an_invalid_hessian_dtype_is_refused_naming_it(where, value):
    _assert_refused("hessian_dtype", value, ValueError, where, good=BF16)


@pytest.mark.parametrize("value", [None, torch.float32, BF16], ids=repr)
def test_the_valid_hessian_dtypes_are_accepted_in_the_constructor_and_in_a_group(value):
    opt = FusionOptimizer([torch.zeros(3, requires_grad=True)], lr=0.1, hessian_dtype=value)
    assert opt.param_groups[0]["hessian_dtype"] == value
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "hessian_dtype": value})
    assert opt.param_groups[1]["hessian_dtype"] == value
    with pytest.raises(TypeError):  # keyword-only
        FusionOptimizer([torch.zeros(3, requires_grad=True)], 0.1, 1e-8, 0.8, 0.01, 0.9, False, False, value)


def test_hessian_dtype_float32_is_none_bit_for_bit(engine):
    shapes_ = [(5, 4), (4,), (3, 2, 3), (), (1, 6)]
    for cover in ("sm3", "dense"):
        kw = dict(lr=0.05, use_rms=True, centralize=True, eps=1e-3, cover=cover, **engine)
        pa, pb = make_params(3, shapes_), make_params(3, shapes_)
        oa = FusionOptimizer(pa, **kw)
        ob = FusionOptimizer(pb, hessian_dtype=torch.float32, **kw)
        run(oa, pa, range(4))
        run(ob, pb, range(4))
        assert_same_run(pa, oa, pb, ob)


@pytest.mark.parametrize("cover", ["sm3", "factored"])
def test_with_sm3_or_factored_hessian_dtype_rounds_only_the_dense_moments(engine, cover, gen):
    """hessian_dtype=bf16 under the other covers: 0-D/1-D parameters keep a bf16 v (the statement's rounding),
    tensors of 2+ dims keep fp32 accumulators following their cover's rule."""
    shapes_ = [(7, 5), (3, 4, 5), (2, 1, 3, 1), (67,), (), (1,), (0,)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes_]
    opt = FusionOptimizer(params, lr=0.1, eps=1 / 64, use_rms=True, cover=cover, hessian_dtype=BF16, **engine)
    tally = UlpTally()
    for scale in STEP_SCALES:
        for p in params:
            set_grad(p, make_grad(p.shape, gen, 1 / 64, scale))
        step_and_check(opt, params, tally=tally)
    tally.check()
    for p in params:
        h = opt.state[p]["exp_hessian"]
        if p.dim() <= 1:
            assert isinstance(h, torch.Tensor) and h.dtype == BF16
        else:
            assert isinstance(h, list) and all(a.dtype == torch.float32 for a in h)


def test_each_group_keeps_its_own_hessian_dtype_and_cover(engine, gen):
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(7, 5), (6,), (3, 4, 5), (5, 6), (9,), ()]]
    groups = [
        {"params": ps[:2], "cover": "dense", "hessian_dtype": BF16},
        {"params": ps[2:4], "cover": "dense"},
        {"params": ps[4:], "hessian_dtype": BF16, "rounding_seed": 99},
    ]
    opt = FusionOptimizer(groups, lr=0.1, eps=1 / 64, use_rms=True, hessian_dtype=torch.float32, **engine)
    assert [g["hessian_dtype"] for g in opt.param_groups] == [BF16, torch.float32, BF16]
    assert [g["cover"] for g in opt.param_groups] == ["dense", "dense", "sm3"]
    tally = UlpTally()
    for scale in STEP_SCALES:
        for x in ps:
            set_grad(x, make_grad(x.shape, gen, 1 / 64, scale))
        step_and_check(opt, ps, tally=tally)
    tally.check()
    dtypes = [opt.state[x]["exp_hessian"].dtype for x in ps[:2] + ps[2:4] + ps[4:]]
    assert dtypes == [BF16, BF16, torch.float32, torch.float32, BF16, BF16]


# ----------------------------------------------------------------------------------------------------------
# 3. the bf16 v's rounding: its stream, its step, always stochastic, deterministic
# ----------------------------------------------------------------------------------------------------------


def _level_grad(shape, gen, dtype) -> torch.Tensor:
    """Entries +-[0.5, 2) with 8 significant bits (exact in bf16 and fp32; g**2 has up to 16, so its rounding
    to bf16 matters), and about a fifth exact zeros (masked)."""
    g = (0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=F64)).to(BF16).to(F64)
    g = g * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    g = torch.where(torch.rand(shape, generator=gen) < 0.2, torch.zeros_like(g), g)
    return g.to(dtype)


def _expected_v(prev: torch.Tensor, g: torch.Tensor, t: int, seed: int, position: int, key=None):
    """The statement's bf16 v with beta_decay = 1 (beta_1 = 0, beta_2 = 1/2): nu = g**2, then (prev + g**2) / 2,
    of at most 16 + 4 significant bits, is exact in fp32 (asserted), so every engine must store exactly this.
    Returns (v, nu32)."""
    b = 1.0 - 1.0 / t
    assert t in (1, 2)
    prev64, g64 = prev.to(F64), g.to(F64)
    mask = g64.abs() > 1e-8
    nu64 = torch.where(mask, b * prev64 + (1 - b) * g64 * g64, prev64)
    nu32 = nu64.float()
    assert torch.equal(nu32.double(), nu64), "harness: nu must be exact in fp32"
    key = hessian_key(position) if key is None else key
    v = stochastic_round_at(nu32, BF16, rounding_keys(seed, key, t), flat_index(tuple(prev.shape)))
    return torch.where(mask, v, prev.to(BF16)), nu32


@pytest.mark.parametrize("dtype,rounding", [(torch.float32, False), (BF16, False), (BF16, True)], ids=str)
def test_the_bf16_v_is_exactly_the_stochastic_rounding_on_the_hessian_stream_of_its_position(engine, dtype, rounding):
    """beta_decay = 1 and gradients of 8 bits make nu exact in fp32 at steps 1 and 2, so the stored v is
    exactly ``stochastic_round_at(nu32, bf16, rounding_keys(seed, hessian_key(position), t), flat_index)``
    on every engine, bit for bit. Two groups (positions count across them) with their own rounding_seed, and
    step counts that differ: call 2 leaves the first group without gradients, call 3 gives it its second
    step while the second group's gradients are all zeros (all masked: v keeps its bits). Whatever
    ``stochastic_rounding`` says (it rounds only bf16 parameters). The harness shows that rounding to
    nearest, or the parameter's own stream, would give other bits."""
    gen = torch.Generator().manual_seed(8)
    shapes_ = [(5, 7), (3, 4, 5), (13,), (), (2, 9)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes_]
    g0, g1 = params[:2], params[2:]
    seeds = (7, 2024)
    opt = FusionOptimizer(
        [{"params": g0, "rounding_seed": seeds[0]}, {"params": g1, "rounding_seed": seeds[1]}],
        lr=0.01, eps=1e-8, beta_decay=1.0, use_rms=True, maximize=True, cover="dense", hessian_dtype=BF16,
        stochastic_rounding=rounding, **engine,
    )  # fmt: skip
    assert [position_of(opt, p) for p in params] == list(range(5))
    seed_of = [seeds[0]] * 2 + [seeds[1]] * 3
    v = [torch.zeros(s, dtype=BF16) for s in shapes_]
    t = [0] * 5
    nearest_differs = own_differs = 0
    for call in range(3):
        grads = []
        for i, p in enumerate(params):
            if call == 1 and i < 2:
                grads.append(None)
            elif call == 2 and i >= 2:
                grads.append(torch.zeros(p.shape, dtype=dtype))
            else:
                grads.append(_level_grad(p.shape, gen, dtype))
            p.grad = None if grads[-1] is None else grads[-1].clone()
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            t[i] += 1
            h = opt.state[p]["exp_hessian"]
            assert isinstance(h, torch.Tensor) and h.dtype == BF16 and h.shape == p.shape
            assert int(opt.state[p]["step"]) == t[i]
            if t[i] == 3:  # all masked: the previous bits
                assert torch.equal(h.view(torch.int16), v[i].view(torch.int16)), f"param {i}: masked v changed"
                continue
            want, nu32 = _expected_v(v[i], g, t[i], seed_of[i], i)
            assert torch.equal(h.view(torch.int16), want.view(torch.int16)), (
                f"param {i} {tuple(p.shape)} step {t[i]}: {int((h != want).sum())} of {h.numel()} entries are not "
                f"stochastic_round_at(nu, hessian_key({i}), step {t[i]})"
            )
            kept = g.to(F64).abs() > 1e-8
            nearest_differs += int(((nu32.to(BF16) != want) & kept).sum())
            own, _ = _expected_v(v[i], g, t[i], seed_of[i], i, key=i)
            own_differs += int((own != want).sum())
            v[i] = want
    assert t == [2, 2, 3, 3, 3]
    assert nearest_differs > 20 and own_differs > 20, "harness: nearest and the parameter's own stream must differ"


def test_the_bf16_v_ignores_stochastic_rounding_and_is_deterministic_for_its_seed(engine):
    """With the gradients fixed in advance, v does not depend on the parameter: the same bits with stochastic
    rounding of the bf16 parameters on and off; the same run twice gives the same bits everywhere; another
    rounding_seed gives another v (on about half of the entries that moved)."""
    gen = torch.Generator().manual_seed(14)
    shapes_ = [(6, 5), (3, 4, 5), (17,), ()]
    init = [torch.randn(s, generator=gen).to(BF16) for s in shapes_]
    grads = [[torch.randn(s, generator=gen).to(BF16) for s in shapes_] for _ in range(4)]

    def train(rounding: bool, seed: int):
        params = [nn.Parameter(x.clone()) for x in init]
        opt = FusionOptimizer(
            params, lr=0.01, use_rms=True, centralize=True, cover="dense", hessian_dtype=BF16,
            stochastic_rounding=rounding, rounding_seed=seed, **engine,
        )  # fmt: skip
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    pa, oa = train(False, 3)
    pb, ob = train(True, 3)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_tree_equal(oa.state[a]["exp_hessian"], ob.state[b]["exp_hessian"], f"v of param {i}")
    pc, oc = train(True, 3)
    assert_same_run(pb, ob, pc, oc)
    pd, od = train(True, 4)
    differs = sum(int((ob.state[b]["exp_hessian"] != od.state[d]["exp_hessian"]).sum()) for b, d in zip(pb, pd))
    total = sum(p.numel() for p in pb)
    assert differs > 0.2 * total, f"another rounding_seed changed only {differs} of {total} entries of v"


# ----------------------------------------------------------------------------------------------------------
# 4. why stochastic: a slow EMA at t > 1000
# ----------------------------------------------------------------------------------------------------------

SLOW_N = 2048
SLOW_FROM, SLOW_STEPS = 1000, 200
G_LOW, G_HIGH = 1.0, 1.25  # g**2: 1.0, then 1.5625


def _slow_ema(engine_kw: dict, device: str = "cpu") -> tuple[list[float], float, float]:
    """Parameters with a bf16 v under lr = 0, no momentum or decay: one step with g**2 = 1 (beta_1 = 0: v = 1
    exactly), the step count (the documented ``state["step"]``) set to 1000 in place, then 200 steps with
    g**2 = 1.5625. Returns the means of the stored v, the float64 EMA, and where v rounded to nearest
    would be."""
    params = [nn.Parameter(torch.zeros(s, device=device)) for s in [(SLOW_N,), (64, SLOW_N // 64)]]
    groups = [{"params": params[:1]}, {"params": params[1:], "cover": "dense"}]
    opt = FusionOptimizer(groups, lr=0.0, Lambda=0.0, momentum_beta=0.0, use_rms=True, hessian_dtype=BF16, **engine_kw)
    for p in params:
        p.grad = torch.full_like(p, G_LOW)
    opt.step()
    assert all(torch.equal(opt.state[p]["exp_hessian"].float().cpu(), torch.ones(p.shape)) for p in params)
    for p in params:
        opt.state[p]["step"].fill_(float(SLOW_FROM))
    ema, nearest = 1.0, torch.ones((), dtype=BF16)
    for t in range(SLOW_FROM + 1, SLOW_FROM + SLOW_STEPS + 1):
        for p in params:
            p.grad = torch.full_like(p, G_HIGH)
        opt.step()
        b = 1.0 - t**-0.8
        ema = b * ema + (1 - b) * G_HIGH**2
        nearest = (b * nearest.float() + (1 - b) * G_HIGH**2).to(BF16)
    assert all(int(opt.state[p]["step"]) == SLOW_FROM + SLOW_STEPS for p in params)
    means = []
    for p in params:
        v = opt.state[p]["exp_hessian"].cpu()
        assert v.dtype == BF16
        assert bool(((v.float() >= 1.0) & (v.float() <= G_HIGH**2)).all()), "v left [1, g**2]"
        means.append(v.double().mean().item())
    assert torch.equal(params[0].detach().cpu(), torch.zeros(SLOW_N)), "lr = 0: the parameter must not move"
    return means, ema, float(nearest)


def _assert_follows_the_ema(means, ema, nearest) -> None:
    assert ema > 1.25, f"harness: the EMA must move ({ema})"
    assert nearest == 1.0, f"harness: rounded to nearest, v would stay at 1.0 (got {nearest})"
    for k, m in enumerate(means):
        assert abs(m - ema) < 5e-3, f"param {k}: mean of the stored bf16 v {m:.5f}, the float64 EMA {ema:.5f}"


def test_the_mean_of_a_stochastically_rounded_bf16_v_follows_a_slow_ema(engine):
    """From step 1000 on ``1 - beta_t`` < 2**-8: each increment of v is below half a bf16 unit (2**-8 at 1.0),
    so rounding to nearest would keep v at 1.0 for ever, while the mean over the elements of the
    stochastically rounded v follows the float64 EMA (the mean of 2048 elements: about 1e-3 of noise)."""
    _assert_follows_the_ema(*_slow_ema(engine))


# ----------------------------------------------------------------------------------------------------------
# 5. engines: engine against engine, row-sparse gradients, DTensor
# ----------------------------------------------------------------------------------------------------------

SIDE_SHAPES = [(129, 65), (2053,), (5, 17, 9), (), (0, 4)]
SIDE_CONFIGS = [
    pytest.param(torch.float32, dict(hessian_dtype=BF16, use_rms=True, centralize=True), id="fp32-v-bf16-rms-c"),
    pytest.param(torch.float32, dict(hessian_dtype=BF16, momentum_dtype=BF16, maximize=True), id="fp32-bf16v-bf16m"),
    pytest.param(BF16, dict(hessian_dtype=BF16, use_rms=True, stochastic_rounding=True), id="bf16-sr-v-bf16-rms"),
    pytest.param(torch.float32, dict(use_rms=True, centralize=True), id="fp32-v-fp32-rms-c"),
]


def _copy_state(src, dst, src_params, dst_params) -> None:
    with torch.no_grad():
        for ps, pd in zip(src_params, dst_params):
            pd.copy_(ps)
            for key, value in src.state[ps].items():
                target = dst.state[pd][key]
                for a, b in zip(value, target) if isinstance(value, list) else [(value, target)]:
                    b.copy_(a)


def side_by_side(engine_kw: dict, dtype, hyper: dict, *, shapes_, device="cpu", steps=3, seed=0) -> UlpTally:
    """The reference loop and another engine, each step from the reference's state (copied into the other's
    tensors), so each step is compared on its own: a stored bf16 v one unit off on rare elements (counted in
    the returned tally), never more; everything else where v agrees to fp32 tolerances (bf16 parameters:
    one unit, rarely, counted too)."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes_]
    rp = [nn.Parameter(x.clone().to(device)) for x in init]
    op = [nn.Parameter(x.clone().to(device)) for x in init]
    kw = dict(lr=0.05, cover="dense", rounding_seed=seed + 1, **hyper)
    ref = FusionOptimizer(rp, foreach=False, **kw)
    oth = FusionOptimizer(op, **engine_kw, **kw)
    tally, ptally = UlpTally(max_fraction=1e-3), UlpTally(max_fraction=1e-3)
    for t in range(steps):
        for a, b in zip(rp, op):
            g = (torch.randn(a.shape, generator=gen) * 10.0 ** float(torch.randint(-2, 1, (), generator=gen))).to(dtype)
            a.grad, b.grad = g.to(device), g.clone().to(device)
        if t:
            _copy_state(ref, oth, rp, op)
        ref.step()
        oth.step()
        for k, (a, b) in enumerate(zip(rp, op)):
            where = f"step {t + 1}, param {k} {tuple(a.shape)}"
            sa, sb = ref.state[a], oth.state[b]
            assert sa.keys() == sb.keys(), f"{where}: state keys {sorted(sa)} vs {sorted(sb)}"
            va, vb = _full(sa["exp_hessian"]), _full(sb["exp_hessian"])
            assert va.dtype == vb.dtype and va.shape == vb.shape, f"{where}: v {va.dtype} {vb.dtype}"
            if va.dtype == BF16:
                same = tally.add(vb, va, f"{where} v")
            else:
                torch.testing.assert_close(vb, va, rtol=3e-5, atol=1e-12, msg=lambda m, w=where: f"{w} v: {m}")
                same = torch.ones(va.shape, dtype=torch.bool)
            if "momentum_buffer" in sa:
                ma, mb_ = _full(sa["momentum_buffer"]), _full(sb["momentum_buffer"])
                tol = dict(rtol=2e-5, atol=1e-6) if ma.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
                torch.testing.assert_close(mb_[same], ma[same], **tol, msg=lambda m, w=where: f"{w} momentum: {m}")
            xa, xb = _full(a), _full(b)
            if dtype == BF16:
                ptally.add(xb[same], xa[same], f"{where} param")
            else:
                torch.testing.assert_close(xb[same], xa[same], rtol=2e-5, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")
    tally.check("bf16 v: ")
    ptally.check("bf16 parameters: ")
    return tally


OTHER_ENGINES = [
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param(
        {"fused": True},
        id="fused",
        marks=pytest.mark.skipif(bool(FUSED_CPU_REASON), reason=f"fused CPU engine unavailable: {FUSED_CPU_REASON}"),
    ),
]


@pytest.mark.parametrize("dtype,hyper", SIDE_CONFIGS)
@pytest.mark.parametrize("other", OTHER_ENGINES)
def test_engines_agree_with_the_reference_loop_a_bf16_v_one_unit_off_on_rare_elements_only(other, dtype, hyper):
    tally = side_by_side(other, dtype, hyper, shapes_=SIDE_SHAPES)
    if hyper.get("hessian_dtype") == BF16:
        assert tally.n == 3 * sum(math.prod(s) for s in SIDE_SHAPES)


SPARSE_HYPER = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(centralize=True, use_rms=True, maximize=True), id="centralize-rms-maximize"),
    pytest.param(dict(use_rms=True, momentum_beta=0.0, Lambda=0.0), id="rms-mom0-wd0"),
]


@pytest.mark.parametrize("hessian_dtype", HESSIAN_DTYPES)
@pytest.mark.parametrize("hyper", SPARSE_HYPER)
def test_a_sparse_gradient_is_lazy_and_present_rows_follow_the_dense_rule(engine, hyper, hessian_dtype, gen):
    """nn.Embedding(sparse=True) under cover="dense": rows absent from the gradient keep parameter, momentum
    and v bit for bit; present rows follow the dense rule (the oracle on the dense gradient, whose absent rows
    are zeros, and the engine's own dense step from the same state). A bf16 v is indexed in the whole
    parameter (row * columns + column), keyed by the position."""
    hp = dict(lr=0.1, eps=0.05, cover="dense", hessian_dtype=hessian_dtype, rounding_seed=3, **hyper)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FusionOptimizer(emb.parameters(), **engine, **hp)
    w = emb.weight
    tally, twin_tally = UlpTally(), UlpTally()
    for rows in SPARSE_BATCHES:
        g_dense, present = sparse_batch_grad(emb, opt, rows, gen)
        e = expect(opt, w)
        wd = w.detach().clone().requires_grad_()
        od = FusionOptimizer([wd], **engine, **hp)
        if steps_taken(opt, w):  # the same state (copied: load_state_dict is tested on its own)
            od.state[wd] = copy.deepcopy(dict(opt.state[w]))
        wd.grad = g_dense.clone()
        od.step()
        opt.step()
        tag = f"sparse rows {sorted(set(rows))}: "
        check(opt, e, tag, rows=present, tally=tally)
        v, vd = opt.state[w]["exp_hessian"], od.state[wd]["exp_hessian"]
        if v.dtype == BF16:
            same = twin_tally.add(v[present], vd[present], f"{tag}v vs the dense engine")
        else:
            assert_within(f"{tag}v vs the dense engine", v[present], vd[present].double(), 2e-6 * vd[present].abs())
            same = torch.ones(v[present].shape, dtype=torch.bool)
        dense_rows = wd.detach()[present].double()
        assert_within(
            f"{tag}present rows vs the dense engine", w.detach()[present][same], dense_rows[same],
            1e-6 * (dense_rows[same].abs() + 1),
        )  # fmt: skip
    tally.check()
    twin_tally.check()


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=dtype_id)
def test_sparse_and_dense_params_in_one_group_each_follow_the_dense_rule(dtype, engine):
    torch.manual_seed(5)
    emb = nn.Embedding(12, 5, sparse=True).to(dtype)
    lin = nn.Linear(5, 3).to(dtype)
    params = [emb.weight, *lin.parameters()]
    opt = FusionOptimizer(
        params, lr=0.05, eps=1 / 64, use_rms=True, centralize=True, cover="dense", hessian_dtype=BF16,
        momentum_dtype=BF16, **_sr(dtype), **engine,
    )  # fmt: skip
    tally = UlpTally()
    for rows in SPARSE_BATCHES:
        rows = sorted(set(rows))  # unique: a bf16 sum of duplicates would be rounded in an unstated precision
        opt.zero_grad()
        lin(emb(torch.tensor(rows))).float().pow(2).mean().backward()
        exps = [expect(opt, p, BF16) for p in params]
        present = torch.zeros(12, dtype=torch.bool)
        present[emb.weight.grad.coalesce().indices()[0]] = True
        opt.step()
        check(opt, exps[0], f"sparse rows {rows} ", rows=present, tally=tally)
        for e in exps[1:]:
            check(opt, e, "dense param next to a sparse one, ", tally=tally)
    tally.check()


# ------------------------------------------- the Triton engine -------------------------------------------

kernel_device = triton_tests.kernel_device  # the fixture: "cuda" (compiled) or "cpu" (interpreted)
TRITON_SHAPES = [(), (7,), (5, 37), (1, 9), (9, 1), (3, 4, 5), (2, 1, 3, 4), (0,), (3, 0)]


@pytest.mark.parametrize("hessian_dtype", HESSIAN_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=dtype_id)
@pytest.mark.parametrize(
    "hyper",
    [
        pytest.param(dict(eps=1 / 64), id="eps1/64"),
        pytest.param(dict(eps=1 / 64, centralize=True, use_rms=True, maximize=True, Lambda=0.0), id="all-flags"),
        pytest.param(dict(eps=1e-8, use_rms=True, momentum_beta=0.0, beta_decay=0.5), id="rms-mom0"),
        pytest.param(dict(eps=1e-8, use_rms=True, centralize=True, momentum_dtype=BF16), id="rms-c-bf16m"),
    ],
)
def test_the_triton_engine_follows_the_dense_rule(kernel_device, hyper, dtype, hessian_dtype):
    gen = torch.Generator().manual_seed(31)
    hyper = dict(hyper)
    momentum_dtype = hyper.pop("momentum_dtype", None)
    eps = hyper["eps"]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(dtype).to(kernel_device)) for s in TRITON_SHAPES]
    opt = FusionOptimizer(
        params, lr=0.05, fused=True, cover="dense", hessian_dtype=hessian_dtype, momentum_dtype=momentum_dtype,
        **_sr(dtype), **hyper,
    )  # fmt: skip
    tally = UlpTally()
    for t, scale in enumerate(STEP_SCALES[:3]):
        for i, p in enumerate(params):
            if t == 1 and i % 4 == 1:
                p.grad = None
            else:
                p.grad = make_grad(p.shape, gen, eps, scale).to(dtype).to(kernel_device)
        step_and_check(opt, params, f"triton on {kernel_device}: ", momentum_dtype=momentum_dtype, tally=tally)
    tally.check()


@pytest.mark.parametrize("dtype,hyper", SIDE_CONFIGS)
def test_the_triton_engine_agrees_with_the_reference_loop(kernel_device, dtype, hyper):
    side_by_side({"fused": True}, dtype, hyper, shapes_=[(33, 65), (1029,), (3, 7, 9), ()], device=kernel_device)


def test_the_mean_of_a_bf16_v_follows_a_slow_ema_on_the_triton_engine(kernel_device):
    _assert_follows_the_ema(*_slow_ema({"fused": True}, kernel_device))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("non-contiguous", id="non-contiguous-leaf"),
        pytest.param("dense-centralize", id="dense-centralize-2d"),
        pytest.param("dense-centralize-bf16v", id="dense-centralize-2d-bf16v"),
    ],
)
def test_a_bf16_parameter_the_kernel_does_not_take_is_rounded_like_the_reference_loop(kernel_device, case):
    """The regression: bf16 parameters with stochastic_rounding=True that the Triton kernel does not take (a
    non-contiguous leaf; tensors of 2+ dims under cover="dense", centralize=True) are stepped by the
    multi-tensor engine inside the same fused call, with their rounding keys (the positions), next to
    tensors the kernel does take: the result is the reference loop's (a bf16 unit apart on rare elements
    at most), and the call does not raise."""
    gen = torch.Generator().manual_seed(23)
    dev = kernel_device
    vals = [torch.randn(s, generator=gen).to(BF16) for s in [(7,), (5, 6), (4, 9), (3, 4, 5)]]
    hyper = dict(lr=0.05, use_rms=True, stochastic_rounding=True, rounding_seed=41)
    if case.startswith("dense"):
        hyper.update(cover="dense", centralize=True)
    if case.endswith("bf16v"):
        hyper.update(hessian_dtype=BF16)
    ref_params = [x.clone().to(dev).requires_grad_() for x in vals]
    fused_params = []
    for x in vals:
        if case == "non-contiguous" and x.shape == (5, 6):  # as torch.randn(6, 5).t().detach().requires_grad_()
            leaf = torch.empty(6, 5, dtype=BF16, device=dev).t().detach()
            leaf.copy_(x)
            fused_params.append(leaf.requires_grad_())
        else:
            fused_params.append(x.clone().to(dev).requires_grad_())
    if case == "non-contiguous":
        assert not fused_params[1].is_contiguous() and fused_params[1].is_leaf
    ref = FusionOptimizer(ref_params, foreach=False, **hyper)
    fused = FusionOptimizer(fused_params, fused=True, **hyper)
    tally = UlpTally()
    for t in range(3):
        for a, b in zip(ref_params, fused_params):
            g = torch.randn(a.shape, generator=gen).to(BF16)
            a.grad, b.grad = g.to(dev), g.clone().to(dev)
        ref.step()
        fused.step()  # raised before the fix
        for k, (a, b) in enumerate(zip(ref_params, fused_params)):
            tally.add(b, a, f"step {t + 1}, param {k} {tuple(a.shape)}")
            assert int(fused.state[b]["step"]) == t + 1
    tally.check()


# ------------------------------------------- DTensor, one process -------------------------------------------


def _dtensor_reason() -> str:
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with the gloo backend is not available"
    try:
        import torch.distributed.tensor  # noqa: F401
    except ImportError as exc:
        return f"torch.distributed.tensor is not importable: {exc}"
    return ""


DTENSOR_REASON = _dtensor_reason()


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-rank gloo process group in this process (as tests/engine_fingerprint.py runs the DTensor
    engine), torn down after the test. One rank: the DTensor engine's path, not sharding across ranks
    (test_distributed.py's jobs start several processes)."""
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.skipif(bool(DTENSOR_REASON), reason=DTENSOR_REASON or "-")
@pytest.mark.parametrize("hessian_dtype", HESSIAN_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=dtype_id)
def test_the_dtensor_engine_follows_the_dense_rule_on_one_rank(one_rank_mesh, dtype, hessian_dtype):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(17)
    layout = [((7, 5), Shard(0)), ((6, 4), Shard(1)), ((3, 4, 5), Replicate()), ((9,), Shard(0)), ((), Replicate())]
    layout += [((0, 3), Shard(0))]
    params = [
        nn.Parameter(distribute_tensor(torch.randn(s, generator=gen).to(dtype), one_rank_mesh, [pl]))
        for s, pl in layout
    ]
    opt = FusionOptimizer(
        params, lr=0.05, eps=1 / 64, use_rms=True, centralize=True, cover="dense", hessian_dtype=hessian_dtype,
        rounding_seed=9, **_sr(dtype),
    )  # fmt: skip
    tally = UlpTally()
    for scale in STEP_SCALES[:3]:
        for p in params:
            g = make_grad(p.shape, gen, 1 / 64, scale).to(dtype)
            p.grad = distribute_tensor(g, one_rank_mesh, p.placements)
        step_and_check(opt, params, "DTensor: ", tally=tally)
    tally.check()
    for p in params:
        h = opt.state[p]["exp_hessian"]
        assert isinstance(h, torch.Tensor) and h.dtype == stored_dtype(opt.param_groups[0])


# ------------------------------------------- DTensor, two ranks -------------------------------------------

# shards along dim 0 and dim 1, replicas; (1, 3) over 2 ranks leaves a rank without rows, (0, 3) is empty
DIST_SHAPES = [(5, 7), (3, 4, 2), (1, 3), (7, 3), (0, 3), (9,), ()]
DIST_CONFIGS = {
    "fp32, v bf16": (torch.float32, dict(hessian_dtype=BF16, use_rms=True)),
    "fp32, v bf16, centralize, bf16 momentum": (
        torch.float32, dict(hessian_dtype=BF16, use_rms=True, centralize=True, momentum_dtype=BF16)
    ),
    "bf16 sr, v bf16": (BF16, dict(hessian_dtype=BF16, use_rms=True, stochastic_rounding=True)),
    "fp32, v fp32, centralize": (torch.float32, dict(use_rms=True, centralize=True)),
}  # fmt: skip


def dense_two_rank_job(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """Parameters distributed by hand (Shard(0), Shard(1), Replicate) and plain tensors on the reference loop,
    3 steps with identical gradients; rank 0 saves every step's v of both and the final parameters."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for label, placement in {"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Replicate": Replicate()}.items():
        for name, (dtype, cfg) in DIST_CONFIGS.items():
            gen = torch.Generator().manual_seed(2)
            init = [torch.randn(s, generator=gen).to(dtype) for s in DIST_SHAPES]
            grads = [[torch.randn(s, generator=gen).to(dtype) for s in DIST_SHAPES] for _ in range(3)]

            def fit(t, pl=placement):  # a placement sharding a dim t lacks falls back to Replicate
                return [pl if not hasattr(pl, "dim") or pl.dim < t.dim() else Replicate()]

            dps = [nn.Parameter(distribute_tensor(t.clone(), mesh, fit(t))) for t in init]
            rps = [nn.Parameter(t.clone()) for t in init]
            kw = dict(lr=0.05, cover="dense", rounding_seed=5, **cfg)
            dopt, ropt = FusionOptimizer(dps, **kw), FusionOptimizer(rps, foreach=False, **kw)
            vs = []
            for gs in grads:
                for p, g in zip(dps, gs):
                    p.grad = distribute_tensor(g.clone(), mesh, p.placements)
                for p, g in zip(rps, gs):
                    p.grad = g.clone()
                dopt.step()
                ropt.step()
                vs.append(
                    [
                        (_full(dopt.state[p]["exp_hessian"]), _full(ropt.state[q]["exp_hessian"]))
                        for p, q in zip(dps, rps)
                    ]
                )
            final = [(_full(p), _full(q)) for p, q in zip(dps, rps)]
            out[f"{label} / {name}"] = dict(v=vs, params=final)
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "dense.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dense_two_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_two_rank")
    launch(dense_two_rank_job, 2, out, str(out))
    return torch.load(out / "dense.pt", weights_only=False)


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(DTENSOR_REASON), reason=DTENSOR_REASON or "-")
@pytest.mark.parametrize("case", [f"{p} / {c}" for p in ("Shard(0)", "Shard(1)", "Replicate") for c in DIST_CONFIGS])
def test_dtensor_shards_on_two_ranks_equal_plain_tensors(dense_two_rank, case):
    """A shard's bf16 v is rounded with the flat index of each element in the whole parameter (and the
    position's key): the sharded run's v equals the plain tensors' (one unit off on rare elements), and so
    do the parameters wherever v agreed at every step. The dense rule is elementwise; centralization over a
    sharded dim 1 is a cross-rank mean."""
    res = dense_two_rank[case]
    tally = UlpTally()
    agree = None
    for t, step in enumerate(res["v"]):
        same_t = []
        for k, (dv, rv) in enumerate(step):
            assert dv.dtype == rv.dtype and dv.shape == rv.shape, f"step {t + 1}, param {k}: v {dv.dtype} {rv.dtype}"
            if rv.dtype == BF16:
                same_t.append(tally.add(dv, rv, f"step {t + 1}, param {k} {tuple(rv.shape)} v"))
            else:
                torch.testing.assert_close(dv, rv, rtol=3e-5, atol=1e-12)
                same_t.append(torch.ones(rv.shape, dtype=torch.bool))
        agree = same_t if agree is None else [a & b for a, b in zip(agree, same_t)]
    tally.check()
    ptally = UlpTally()
    for k, ((dp, rp), same) in enumerate(zip(res["params"], agree)):
        if rp.dtype == BF16:
            ptally.add(dp[same], rp[same], f"param {k} {tuple(rp.shape)}")
        else:
            torch.testing.assert_close(dp[same], rp[same], rtol=2e-5, atol=1e-6)
    ptally.check()


# ----------------------------------------------------------------------------------------------------------
# 6. state: layout, dtypes, bytes; state_dict round trips and resume
# ----------------------------------------------------------------------------------------------------------

LAYOUT_SHAPES = [(7, 5), (3, 4, 5), (1, 6), (6,), (), (0,), (2, 0)]


@pytest.mark.parametrize("hessian_dtype", [None, torch.float32, BF16], ids=repr)
@pytest.mark.parametrize("cover", ["sm3", "factored", "dense"])
def test_the_state_layout_and_dtypes_per_cover_and_hessian_dtype(engine, cover, hessian_dtype):
    for dtype in (torch.float32, BF16):
        params = make_params(4, LAYOUT_SHAPES, dtype)
        opt = FusionOptimizer(params, lr=0.05, cover=cover, hessian_dtype=hessian_dtype, **engine)
        run(opt, params, range(2))
        want_v = hessian_dtype or torch.float32
        for p in params:
            where = f"{cover}, v={hessian_dtype}, {tuple(p.shape)} {dtype_id(dtype)}"
            st = opt.state[p]
            assert set(st) == {"step", "exp_hessian", "momentum_buffer"}, f"{where}: keys {sorted(st)}"
            h = st["exp_hessian"]
            if is_dense(p, cover):
                assert isinstance(h, torch.Tensor), f"{where}: a dense v must be one tensor, got {type(h)}"
                assert h.shape == p.shape and h.dtype == want_v, f"{where}: v {tuple(h.shape)} {h.dtype}"
            else:
                assert isinstance(h, list) and len(h) == p.dim(), f"{where}: {type(h)}"
                for k, a in enumerate(h):
                    assert list(a.shape) == accumulator_shape(p.shape, k) and a.dtype == torch.float32, where
            assert st["momentum_buffer"].dtype == dtype and st["momentum_buffer"].shape == p.shape


@pytest.mark.parametrize(
    "hessian_dtype,momentum_dtype,per_element",
    [(BF16, BF16, 4), (None, None, 8), (torch.float32, torch.float32, 8), (BF16, None, 6), (None, BF16, 6)],
    ids=["bf16-v-bf16-m", "fp32-both", "fp32-both-explicit", "bf16-v-fp32-m", "fp32-v-bf16-m"],
)
def test_state_bytes_per_element_of_a_dense_weight(engine, hessian_dtype, momentum_dtype, per_element):
    w = torch.randn(64, 48, requires_grad=True)
    opt = FusionOptimizer(
        [w], lr=0.01, cover="dense", hessian_dtype=hessian_dtype, momentum_dtype=momentum_dtype, **engine
    )
    w.grad = torch.randn(64, 48)
    opt.step()
    per_tensor = sum(t.numel() * t.element_size() for key, t in opt.state[w].items() if key != "step")
    assert per_tensor == per_element * w.numel(), f"{per_tensor / w.numel()} bytes per element"
    assert opt.state[w]["step"].numel() == 1


@pytest.mark.parametrize("built_with", ["same-options", "defaults"])
@pytest.mark.parametrize(
    "dtype,hyper",
    [
        pytest.param(torch.float32, dict(cover="dense", hessian_dtype=BF16), id="dense-fp32-v-bf16"),
        pytest.param(torch.float32, dict(cover="dense", hessian_dtype=BF16, momentum_dtype=BF16), id="dense-v-m-bf16"),
        pytest.param(
            BF16, dict(cover="dense", hessian_dtype=BF16, stochastic_rounding=True), id="dense-bf16-sr-v-bf16"
        ),
        pytest.param(BF16, dict(cover="dense", hessian_dtype=None), id="dense-bf16-v-fp32"),
        pytest.param(torch.float32, dict(cover="sm3", hessian_dtype=BF16), id="sm3-fp32-v-bf16"),
        pytest.param(BF16, dict(cover="sm3", hessian_dtype=None), id="sm3-bf16-v-fp32"),
    ],
)
def test_state_dict_round_trip_mid_run_resumes_bit_for_bit(engine, dtype, hyper, built_with):
    """Saved after 3 steps, loaded (directly and through torch.save / torch.load(weights_only=True)) into an
    optimizer built with the same options, or with the defaults (the checkpoint brings the groups' cover and
    hessian_dtype back): every state tensor keeps its dtype and bits (a bf16 v of an fp32 parameter, an fp32 v
    of a bf16 one), and 3 more steps are identical to the uninterrupted run (the v stream depends only on
    the seed, the position, the step and the index)."""
    shapes_ = [(5, 4), (4,), (3, 2, 3), (), (1, 6), (0, 2)]
    kw = dict(lr=2.0**-6, use_rms=True, centralize=True, eps=1e-3, rounding_seed=12, **engine)
    params = make_params(1, shapes_, dtype)
    opt = FusionOptimizer(params, **hyper, **kw)
    run(opt, params, range(3))
    sd = opt.state_dict()
    assert [(g["cover"], g["hessian_dtype"]) for g in sd["param_groups"]] == [(hyper["cover"], hyper["hessian_dtype"])]
    pristine = copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_tree_equal(loaded, pristine, "state dict through torch.save / torch.load")
    twins = []
    for source in (sd, loaded):
        twin = clone_params(params)
        opt_twin = FusionOptimizer(twin, **(hyper if built_with == "same-options" else {}), **kw)
        opt_twin.load_state_dict(source)
        g = opt_twin.param_groups[0]
        assert (g["cover"], g["hessian_dtype"]) == (hyper["cover"], hyper["hessian_dtype"]), "groups not restored"
        for p, q in zip(params, twin):
            assert_tree_equal(dict(opt.state[p]), dict(opt_twin.state[q]), f"loaded state of {tuple(p.shape)}")
        twins.append((twin, opt_twin))
    assert_tree_equal(sd, pristine, "state dict after load_state_dict")
    run(opt, params, range(3, 6))
    for twin, opt_twin in twins:
        run(opt_twin, twin, range(3, 6))
        assert_same_run(params, opt, twin, opt_twin)
        assert_tree_equal(opt.state_dict(), opt_twin.state_dict(), "state_dict after resuming")


# ----------------------------------------------------------------------------------------------------------
# 7. the functional form
# ----------------------------------------------------------------------------------------------------------

FUNC_HYPER = dict(lr=0.05, eps=1 / 64, beta_decay=0.8, Lambda=0.01, momentum_beta=0.9)
FUNC_HYPER.update(centralize=True, use_rms=True, maximize=False)


def _functional_copy(opt, params):
    fp = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    hess = [opt.state[p]["exp_hessian"].clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    return fp, bufs, hess, steps


@pytest.mark.parametrize("hessian_dtype", HESSIAN_DTYPES)
def test_functional_fusion_with_dense_equals_the_class(engine, hessian_dtype, gen):
    """After one step of the class, its state is copied into plain lists; three more steps of
    ``fusedbun.fusion(..., cover="dense", rounding_seed=...)`` on them equal the class's steps bit for bit (same
    engine): a bf16 exp_hessian is rounded on the stream of the parameter's position in ``params``."""
    shapes_ = [(7, 5), (3, 4, 5), (6,), (), (0, 3)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes_]
    opt = FusionOptimizer(params, cover="dense", hessian_dtype=hessian_dtype, rounding_seed=21, **FUNC_HYPER, **engine)
    for p in params:
        set_grad(p, make_grad(p.shape, gen, 1 / 64))
    opt.step()
    fp, bufs, hess, steps = _functional_copy(opt, params)
    assert all(h.dtype == (hessian_dtype or torch.float32) for h in hess)
    for scale in STEP_SCALES[1:]:
        grads = [make_grad(p.shape, gen, 1 / 64, scale).float() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        fusedbun.fusion(
            fp, [g.clone() for g in grads], bufs, hess, steps, cover="dense", rounding_seed=21, **FUNC_HYPER, **engine
        )
        for i, p in enumerate(params):
            where = f"param {i} {tuple(p.shape)}"
            assert torch.equal(fp[i], p.detach()), f"{where}: functional and class differ"
            assert_tree_equal(bufs[i], opt.state[p]["momentum_buffer"], f"{where} momentum")
            assert_tree_equal(hess[i], opt.state[p]["exp_hessian"], f"{where} exp_hessian")
            assert float(steps[i]) == float(opt.state[p]["step"]), f"{where}: step counts"


def test_functional_fusion_keys_a_bf16_v_by_the_position_in_params(engine, gen):
    """The same two tensors given to ``fusion`` in either order: each follows the class built with that order
    (its v on the stream of its position there), and the order changes the bits of v."""
    shapes_ = [(6, 5), (11,)]
    init = [torch.randn(s, generator=gen) for s in shapes_]
    grads = [[make_grad(s, gen, 1 / 64, sc).float() for s in shapes_] for sc in STEP_SCALES]
    results = {}
    for order in ((0, 1), (1, 0)):
        params = [init[i].clone().requires_grad_() for i in order]
        opt = FusionOptimizer(params, cover="dense", hessian_dtype=BF16, **FUNC_HYPER, **engine)
        fp = [init[i].clone() for i in order]
        bufs = [torch.zeros_like(x) for x in fp]
        hess = [torch.zeros(x.shape, dtype=BF16) for x in fp]
        steps = [torch.zeros((), dtype=torch.float32) for _ in fp]
        for gs in grads:
            for p, i in zip(params, order):
                p.grad = gs[i].clone()
            opt.step()
            fusedbun.fusion(
                fp, [gs[i].clone() for i in order], bufs, hess, steps, cover="dense", **FUNC_HYPER, **engine
            )
            for j, p in enumerate(params):
                assert torch.equal(fp[j], p.detach()), f"order {order}, position {j}: parameters differ"
                assert_tree_equal(hess[j], opt.state[p]["exp_hessian"], f"order {order}, position {j}: v")
        results[order] = {i: hess[j] for j, i in enumerate(order)}
    for i in (0, 1):
        assert not torch.equal(results[(0, 1)][i], results[(1, 0)][i]), f"tensor {i}: v does not depend on its position"
