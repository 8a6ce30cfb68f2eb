"""Non-finite gradients: the three modes of ``nonfinite=`` (``"mask"``, the default, ``"skip"``, ``"raise"``).

The rule of ``"mask"``, written from the decision (not from the implementation): a gradient entry, taken
after the ``maximize`` negation and after centralization, that is NaN, +Inf, -Inf or has ``|x| >= 2**64``
is masked exactly like an entry with ``|x| <= eps``. Checked here exactly:

- without centralization, a step on a gradient holding such entries equals, bit for bit, a step on the
  same gradient with those entries replaced by 0.0, for every engine (single-tensor, foreach, fused CPU,
  the default one, the fused CUDA engine on a GPU), dtype, rank (dense and SM3 second moment), with and
  without momentum, RMS normalization and maximize, and for sparse gradients;
- with centralization, a NaN/Inf makes its whole row (slice along dim 0) masked: the step equals a step
  with that row of the gradient zeroed, and the row's SM3 accumulator is carried over;
- the step count advances, parameters and state stay finite;
- a RuntimeWarning containing "non-finite" names the param group and the positions of the parameters;
- the functional ``fusedbun.fusion(..., find_nonfinite=True)`` reports one 0-d bool per parameter.

``"skip"`` leaves a parameter whose gradient holds such an entry as it is (value, state, step count) and
steps the others by the rule; ``"raise"`` raises ``FloatingPointError`` before anything changes, in any
group; modes differ per group. Finite extremes (fp16's largest values, fp64 gradients past fp32's range,
subnormals) never overflow the fp32 second moment. ``"mask"`` is the default and the three modes are
accepted in the constructor and in groups; other values are refused (``test_optim_contract.py``, with every
other argument). The component functions ``eps_mask`` and ``nonfinite_entries`` are in ``test_components.py``;
under ``torch.compile`` in ``test_compile.py``; across ranks in ``test_distributed.py``.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
import zlib

import pytest
import torch
from conftest import ENGINE_PARAMS
from helpers import accumulators, assert_tree_equal
from rule_check import expect_step, step_and_verify, steps_taken, verify
from torch import nn

import fusedbun
from fusedbun import FusionOptimizer

LIMIT = 2.0**64
HUGE = 3e19  # >= 2**64: its square overflows fp32; still finite in fp32, bf16 and fp64 (not in fp16)

# Engines: the three pinned ones of conftest plus the default pick (no engine keyword).
NF_ENGINES = [*ENGINE_PARAMS, pytest.param({}, id="default")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(), (7,), (5, 6), (3, 4, 5)]
# (momentum_beta, use_rms, maximize): every value of each flag and every pair of two flags' values.
FLAGS = [(0.0, False, False), (0.9, True, False), (0.9, False, True), (0.0, True, True)]


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def flag_id(flags) -> str:
    mom, rms, mx = flags
    return f"mom{mom:g}" + ("-rms" if rms else "") + ("-max" if mx else "")


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def bad_values(dtype) -> list[float]:
    """Entries that mask mode must treat as masked, representable in ``dtype``."""
    values = [float("nan"), float("inf"), float("-inf")]
    if dtype != torch.float16:
        values += [HUGE, -HUGE]
    return values


def hessians(opt, p) -> list[torch.Tensor]:
    h = opt.state[p]["exp_hessian"]
    return list(h) if isinstance(h, (list, tuple)) else [h]


def state_tensors(opt, p) -> dict:
    st = opt.state[p]
    out = {"step": st["step"], **{f"exp_hessian[{k}]": h for k, h in enumerate(hessians(opt, p))}}
    if "momentum_buffer" in st:
        out["momentum_buffer"] = st["momentum_buffer"]
    return out


def assert_same(opt_a, pa, opt_b, pb, what: str) -> None:
    """Parameter and every state tensor of ``pa`` (in ``opt_a``) equal those of ``pb``, bit for bit."""
    assert pa.dtype == pb.dtype and torch.equal(pa.detach(), pb.detach()), f"{what}: parameters differ"
    sa, sb = state_tensors(opt_a, pa), state_tensors(opt_b, pb)
    assert set(sa) == set(sb), f"{what}: state keys {sorted(sa)} != {sorted(sb)}"
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, f"{what}: {k} dtype/shape differ"
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


def assert_finite(opt, p, what: str = "") -> None:
    assert torch.isfinite(p.detach()).all(), f"{what}: non-finite parameter"
    for k, t in state_tensors(opt, p).items():
        assert torch.isfinite(t).all(), f"{what}: non-finite {k}"


def poison(g: torch.Tensor, values, positions) -> torch.Tensor:
    """A copy of ``g`` holding ``values`` at the flat ``positions``."""
    g = g.clone()
    flat = g.view(-1)
    for pos, v in zip(positions, values):
        flat[pos] = v
    return g


def spread_positions(numel: int, count: int) -> list[int]:
    if numel == 1:
        return [0] * count
    return sorted({(3 * i + 1) % numel for i in range(count)} | {numel - 1})[:count]


def mask_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)]


def step_warnings(opt) -> list[str]:
    """Take one step; the messages of the non-finite warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return mask_warnings(caught)


def group_and_positions(messages: list[str]) -> tuple[set[int], set[int]]:
    """The param group indices (the number after the word "group") and every number that follows one."""
    groups, numbers = set(), set()
    for message in messages:
        m = re.search(r"group\D{0,20}?(\d+)", message)
        assert m, f"the warning names no param group: {message!r}"
        groups.add(int(m.group(1)))
        numbers |= {int(x) for x in re.findall(r"\d+", message[m.end() :])}
    return groups, numbers


# ----------------------------------------------------------------------------------------------------------
# mask == replace by zero, bit for bit
# ----------------------------------------------------------------------------------------------------------


def _masked_equals_zeroed(shape, dtype, kwargs, device, flags, steps_before=2):
    momentum_beta, use_rms, maximize = flags
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(repr((shape, dtype, flags)).encode()))
    hyper = dict(lr=0.05, eps=1e-3, Lambda=0.01, momentum_beta=momentum_beta, use_rms=use_rms, maximize=maximize)
    p0 = torch.randn(shape, generator=gen).to(dtype)
    pa = p0.clone().to(device).requires_grad_()
    pb = p0.clone().to(device).requires_grad_()
    opt_a = FusionOptimizer([pa], **hyper, **kwargs)
    opt_b = FusionOptimizer([pb], **hyper, **kwargs)
    assert opt_a.param_groups[0]["nonfinite"] == "mask"
    bad = bad_values(dtype)
    numel = max(1, p0.numel())
    # finite steps first, then one step per bad value (all of them at once where the tensor has room),
    # then a finite step again: after each one the two runs agree exactly
    plans = [None] * steps_before
    if numel == 1:
        plans += [[v] for v in bad]
    else:
        plans += [bad, bad[:1], bad[1:3]]
    plans += [None]
    for t, values in enumerate(plans):
        g = torch.randn(shape, generator=gen).to(dtype)
        if numel > 1:
            g.view(-1)[2 % numel] = 0.0  # an exact zero next to the bad entries: masked in both runs
        if values is None:
            ga = gb = g
        else:
            pos = spread_positions(numel, len(values))
            ga = poison(g, values, pos)
            gb = poison(g, [0.0] * len(values), pos)
        pa.grad, pb.grad = ga.to(device), gb.to(device)
        what = f"step {t + 1} ({'finite' if values is None else values})"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt_a.step()
        if device == "cpu":  # on CUDA the warning comes a step later (test_cuda_warning_comes_at_a_later_step)
            assert bool(mask_warnings(caught)) == (values is not None), f"{what}: warnings {mask_warnings(caught)}"
        opt_b.step()
        assert_same(opt_a, pa, opt_b, pb, what)
        assert_finite(opt_a, pa, what)
        assert opt_a.state[pa]["step"].item() == t + 1, f"{what}: the step count did not advance"


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_masked_step_equals_the_step_with_those_entries_zeroed(kwargs, dtype, shape, flags):
    _masked_equals_zeroed(shape, dtype, kwargs, "cpu", flags)


@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_step_count_advances_and_everything_stays_finite_with_only_bad_entries(kwargs):
    """A gradient with no usable entry at all: the step still counts, nothing becomes non-finite."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [(4, 5), (6,), (), (2, 3, 2)]]
    opt = FusionOptimizer(params, lr=0.1, use_rms=True, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = {p: copy.deepcopy(state_tensors(opt, p)) for p in params}
    fills = [float("nan"), float("inf"), float("-inf"), HUGE]
    for p, fill in zip(params, fills):
        p.grad = torch.full(p.shape, fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    for p in params:
        assert opt.state[p]["step"].item() == 2
        assert_finite(opt, p, f"param of shape {tuple(p.shape)}")
        # every entry masked: the dense second moment is carried as is, the SM3 accumulators too
        for k, (h, h0) in enumerate(zip(hessians(opt, p), [v for n, v in before[p].items() if n.startswith("exp")])):
            assert torch.equal(h, h0), f"exp_hessian[{k}] of a fully masked param changed"
        m0 = before[p]["momentum_buffer"]
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.9 * m0, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------
# centralization: a bad entry masks its whole row
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("momentum_beta", [0.0, 0.9], ids=["mom0", "mom.9"])
@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 5)], ids=shape_id)
@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_centralize_masks_the_whole_row_of_a_nonfinite_entry(kwargs, shape, momentum_beta, bad):
    gen = torch.Generator().manual_seed(5)
    r = 2
    hyper = dict(lr=0.05, eps=1e-4, Lambda=0.1, momentum_beta=momentum_beta, use_rms=True, centralize=True)
    p0 = torch.randn(shape, generator=gen)
    pa, pb = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    opt_a, opt_b = FusionOptimizer([pa], **hyper, **kwargs), FusionOptimizer([pb], **hyper, **kwargs)
    for _ in range(2):
        g = torch.randn(shape, generator=gen)
        pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    row_acc = hessians(opt_a, pa)[0][r].clone()
    p_row, m_row = pa.detach()[r].clone(), None
    if momentum_beta > 0:
        m_row = opt_a.state[pa]["momentum_buffer"][r].clone()
    g = torch.randn(shape, generator=gen)
    ga, gb = g.clone(), g.clone()
    ga[(r,) + (1,) * (len(shape) - 1)] = bad
    gb[r] = 0.0  # a zero row is centralized to zeros: fully masked
    pa.grad, pb.grad = ga, gb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt_a.step()
    opt_b.step()
    assert_same(opt_a, pa, opt_b, pb, "step with a non-finite entry in row r vs row r zeroed")
    assert_finite(opt_a, pa)
    assert opt_a.state[pa]["step"].item() == 3
    assert torch.equal(hessians(opt_a, pa)[0][r], row_acc), "row r's SM3 accumulator was not carried over"
    # row r moved by weight decay and the momentum's decay only
    decayed = p_row * (1 - hyper["lr"] * hyper["Lambda"])
    if m_row is not None:
        torch.testing.assert_close(opt_a.state[pa]["momentum_buffer"][r], momentum_beta * m_row, rtol=1e-6, atol=0)
        decayed = decayed - hyper["lr"] * momentum_beta * m_row
    torch.testing.assert_close(pa.detach()[r], decayed, rtol=1e-6, atol=1e-7)
    # the other rows took a full step
    others = [i for i in range(shape[0]) if i != r]
    assert not torch.equal(pa.detach()[others], p0[others])


# ----------------------------------------------------------------------------------------------------------
# warnings
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_mask_mode_warns_in_the_same_step_naming_the_group_and_positions(kwargs):
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,), (2, 3), (), (4, 2, 2), (6,)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    # in the group, without a gradient: they shift the list indices of the bad params 3 and 5 to 7 and 9
    no_grad = [torch.randn(3, generator=gen).requires_grad_() for _ in range(4)]
    group_params = [params[0], *no_grad, *params[1:]]
    opt = FusionOptimizer(group_params, lr=0.1, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    assert not step_warnings(opt), "warned on finite gradients"

    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[3].grad = poison(params[3].grad, [float("nan")], [0])
    params[5].grad = poison(params[5].grad, [HUGE, float("-inf")], [1, 4])
    msgs = step_warnings(opt)
    assert msgs, "no non-finite warning"
    groups, numbers = group_and_positions(msgs)
    assert groups == {0}, msgs
    # positions among the parameters that have gradients: 3 and 5 (their list indices are 7 and 9)
    assert {3, 5} <= numbers, f"positions 3 and 5 not named: {msgs!r}"
    assert not {7, 9} & numbers, f"positions counted the parameters without a gradient: {msgs!r}"
    assert all(opt.state[p]["step"].item() == 2 for p in params)
    assert all(len(opt.state.get(x, {})) == 0 for x in no_grad)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert not mask_warnings(caught), "a finite step after a masked one warned"


@pytest.mark.parametrize("bad_group", [0, 1])
@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_mask_warning_names_the_group_that_held_the_bad_gradient(kwargs, bad_group):
    gen = torch.Generator().manual_seed(4)
    groups = [
        [torch.randn(s, generator=gen).requires_grad_() for s in ss] for ss in ([(4, 3), (5,)], [(6,), (2, 5), (3,)])
    ]
    opt = FusionOptimizer([{"params": groups[0]}, {"params": groups[1], "lr": 0.01}], lr=0.1, **kwargs)
    for ps in groups:
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
    bad_pos = 1
    target = groups[bad_group][bad_pos]
    target.grad = poison(target.grad, [float("inf")], [2])
    msgs = step_warnings(opt)
    assert msgs, "no non-finite warning"
    named, numbers = group_and_positions(msgs)
    assert named == {bad_group}, msgs
    assert bad_pos in numbers, msgs
    assert all(opt.state[p]["step"].item() == 1 for ps in groups for p in ps)


# ----------------------------------------------------------------------------------------------------------
# sparse gradients
# ----------------------------------------------------------------------------------------------------------


def _sparse(rows, values, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -HUGE], ids=["nan", "inf", "-huge"])
@pytest.mark.parametrize("momentum_beta,use_rms", [(0.0, False), (0.9, True)], ids=["mom0", "mom.9-rms"])
@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_sparse_gradient_with_a_bad_value_equals_the_step_with_it_zeroed(kwargs, momentum_beta, use_rms, bad):
    gen = torch.Generator().manual_seed(8)
    hyper = dict(lr=0.1, Lambda=0.05, momentum_beta=momentum_beta, use_rms=use_rms)
    ea, eb = nn.Embedding(8, 3, sparse=True), nn.Embedding(8, 3, sparse=True)
    with torch.no_grad():
        eb.weight.copy_(ea.weight)
    opt_a = FusionOptimizer(ea.parameters(), **hyper, **kwargs)
    opt_b = FusionOptimizer(eb.parameters(), **hyper, **kwargs)
    first = torch.randn(3, 3, generator=gen)
    ea.weight.grad = _sparse([0, 2, 5], first, (8, 3))
    eb.weight.grad = _sparse([0, 2, 5], first.clone(), (8, 3))
    opt_a.step()
    opt_b.step()
    absent = torch.tensor([r not in (1, 2) for r in range(8)])
    w_absent = ea.weight.detach()[absent].clone()
    values = torch.randn(2, 3, generator=gen)
    va, vb = values.clone(), values.clone()
    va[0, 1] = bad  # row 1 (present, and fresh) and row 2 (present, with state)
    va[1, 2] = bad
    vb[0, 1] = 0.0
    vb[1, 2] = 0.0
    ea.weight.grad = _sparse([1, 2], va, (8, 3))
    eb.weight.grad = _sparse([1, 2], vb, (8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_a.step()
    opt_b.step()
    assert mask_warnings(caught), "no non-finite warning for a sparse gradient"
    assert_same(opt_a, ea.weight, opt_b, eb.weight, "sparse step with a bad value vs that value zeroed")
    assert_finite(opt_a, ea.weight, "sparse")
    assert torch.equal(ea.weight.detach()[absent], w_absent), "absent rows changed"
    assert opt_a.state[ea.weight]["step"].item() == 2


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_sparse_gradient_with_nonfinite_values_is_skipped_or_refused(engine, mode, gen):
    emb = nn.Embedding(8, 3, sparse=True)
    opt = FusionOptimizer(emb.parameters(), lr=0.1, nonfinite=mode, **engine)
    (emb(torch.tensor([0, 2])) * torch.randn(2, 3, generator=gen)).sum().backward()
    opt.step()
    w_before = emb.weight.detach().clone()
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    (emb(torch.tensor([1, 2])) * torch.tensor([[1.0, float("nan"), 2.0], [1.0, 1.0, 1.0]])).sum().backward()
    if mode == "skip":
        with pytest.warns(RuntimeWarning, match="skipped"):
            opt.step()
    else:
        with pytest.raises(FloatingPointError):
            opt.step()
    assert torch.equal(emb.weight.detach(), w_before)
    assert_tree_equal(opt.state_dict()["state"], state_before)


# ----------------------------------------------------------------------------------------------------------
# functional API and components
# ----------------------------------------------------------------------------------------------------------


def _fusion_inputs(shapes, gen, momentum=True):
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    bufs = [torch.zeros(s) if momentum else None for s in shapes]
    hess = [torch.zeros(p.shape, dtype=torch.float32) if p.dim() <= 1 else fusedbun.sm3_accumulators(p) for p in params]
    steps = [torch.tensor(0.0) for _ in shapes]
    return params, grads, bufs, hess, steps


FUSION_HYPER = dict(
    lr=0.1, eps=1e-8, beta_decay=0.8, Lambda=0.01, momentum_beta=0.9, centralize=False, use_rms=True, maximize=False
)


@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_fusion_find_nonfinite_reports_one_bool_per_parameter(kwargs):
    gen = torch.Generator().manual_seed(9)
    shapes = [(4, 5), (6,), (), (2, 3, 4), (7,)]
    params, grads, bufs, hess, steps = _fusion_inputs(shapes, gen)
    zeroed = [g.clone() for g in grads]
    grads[1][3] = float("nan")
    zeroed[1][3] = 0.0
    grads[3][1, 2, 0] = -HUGE
    zeroed[3][1, 2, 0] = 0.0
    grads[4][0] = float("inf")
    zeroed[4][0] = 0.0
    grads[0][2, 2] = 1.5e19  # large but below 2**64: a usable entry
    zeroed[0][2, 2] = 1.5e19
    twin = copy.deepcopy((params, zeroed, bufs, hess, steps))
    found = fusedbun.fusion(params, grads, bufs, hess, steps, **FUSION_HYPER, **kwargs, find_nonfinite=True)
    assert isinstance(found, list) and len(found) == len(shapes)
    for f in found:
        assert isinstance(f, torch.Tensor) and f.dtype == torch.bool and f.dim() == 0
    assert [bool(f) for f in found] == [False, True, False, True, True]
    # the masked step is the zeroed step
    none = fusedbun.fusion(*twin, **FUSION_HYPER, **kwargs)
    assert none is None
    for k in range(len(shapes)):
        assert (
            torch.equal(params[k], twin[0][k])
            and torch.equal(bufs[k], twin[2][k])
            and torch.equal(steps[k], twin[4][k])
        )
        for a, b in zip(
            hess[k] if isinstance(hess[k], list) else [hess[k]],
            twin[3][k] if isinstance(twin[3][k], list) else [twin[3][k]],
        ):
            assert torch.equal(a, b)
    assert all(s.item() == 1.0 for s in steps)


@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_fusion_returns_none_by_default_and_all_false_on_finite_grads(kwargs):
    gen = torch.Generator().manual_seed(10)
    shapes = [(3, 4), (5,)]
    inputs = _fusion_inputs(shapes, gen, momentum=False)
    hyper = dict(FUSION_HYPER, momentum_beta=0.0)
    assert fusedbun.fusion(*inputs, **hyper, **kwargs) is None
    found = fusedbun.fusion(*inputs, **hyper, **kwargs, find_nonfinite=True)
    assert [bool(f) for f in found] == [False, False]


# ----------------------------------------------------------------------------------------------------------
# "skip" and "raise"
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum_beta", [0.0, 0.9], ids=["mom0", "mom.9"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_skip_mode_skips_a_nonfinite_param_warns_and_updates_the_others(engine, bad, momentum_beta, gen):
    a = torch.randn(4, 5, generator=gen).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_()
    c = torch.randn(3, 2, 2, generator=gen).requires_grad_()
    opt = FusionOptimizer([a, b, c], lr=0.1, use_rms=True, momentum_beta=momentum_beta, nonfinite="skip", **engine)
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
    with pytest.warns(RuntimeWarning, match="skipped 1 parameter"):
        opt.step()
    for e in exps:
        verify(opt, e, "finite param next to a skipped one, ")
    assert torch.equal(b.detach(), b_before), "skipped parameter changed"
    assert_tree_equal(dict(opt.state[b]), state_b, "skipped parameter's state")
    assert steps_taken(opt, b) == 1

    # step 3: b resumes as its own step 2
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    step_and_verify(opt, [a, b, c])
    assert steps_taken(opt, b) == 2 and steps_taken(opt, a) == 3


def test_skip_mode_on_the_first_step_leaves_the_param_fresh(engine, gen):
    a = torch.randn(3, 4, generator=gen).requires_grad_()
    a0 = a.detach().clone()
    opt = FusionOptimizer([a], lr=0.1, nonfinite="skip", **engine)
    a.grad = torch.randn(3, 4, generator=gen)
    a.grad[1, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert torch.equal(a.detach(), a0)
    assert steps_taken(opt, a) == 0
    a.grad = torch.randn(3, 4, generator=gen)
    step_and_verify(opt, [a], "first finite step after a skipped one: ")  # behaves as t = 1 (beta_1 = 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, HUGE], ids=["nan", "inf", "-inf", "huge"])
def test_raise_mode_raises_before_changing_anything_in_any_group(engine, bad, gen):
    a, b, c = (torch.randn(s, generator=gen).requires_grad_() for s in ((4, 5), (6,), (3, 2, 2)))
    opt = FusionOptimizer([{"params": [a]}, {"params": [b, c], "lr": 0.05}], lr=0.1, nonfinite="raise", **engine)
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    step_and_verify(opt, [a, b, c])
    before = copy.deepcopy(opt.state_dict())
    values = [x.detach().clone() for x in (a, b, c)]
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    c.grad[1, 1, 0] = bad  # last in the last group: the first group must not have stepped either
    with pytest.raises(FloatingPointError, match=r"param group 1 \(positions \[1\]"):
        opt.step()
    assert all(torch.equal(x.detach(), v) for x, v in zip((a, b, c), values)), "a parameter moved"
    assert_tree_equal(opt.state_dict(), before, "state after a refused step")
    c.grad = torch.randn(c.shape, generator=gen)
    step_and_verify(opt, [a, b, c], "after the refused step: ")


@pytest.mark.parametrize("mode", ["mask", "skip", "raise"])
def test_valid_modes_are_accepted_in_the_constructor_and_in_groups(mode):
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = FusionOptimizer([p], lr=0.1, nonfinite=mode)
    assert opt.defaults["nonfinite"] == mode and opt.param_groups[0]["nonfinite"] == mode
    opt.add_param_group({"params": [q], "nonfinite": mode})
    assert opt.param_groups[1]["nonfinite"] == mode


def test_the_default_mode_is_mask():
    p = torch.zeros(2, 3, requires_grad=True)
    opt = FusionOptimizer([p], lr=0.1)
    assert opt.defaults["nonfinite"] == "mask" and opt.param_groups[0]["nonfinite"] == "mask"
    opt.add_param_group({"params": [torch.zeros(4, requires_grad=True)]})
    assert opt.param_groups[1]["nonfinite"] == "mask"
    p.grad = torch.ones(2, 3)
    p.grad[1, 2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # no FloatingPointError, and the parameter is stepped (not skipped)
    assert mask_warnings(caught)
    assert opt.state[p]["step"].item() == 1 and torch.isfinite(p).all() and (p.detach()[0] != 0).all()


@pytest.mark.parametrize("kwargs", NF_ENGINES)
def test_modes_differ_per_group_in_one_step(kwargs):
    gen = torch.Generator().manual_seed(13)
    a, b, c = (torch.randn(s, generator=gen).requires_grad_() for s in ((4, 3), (5,), (2, 2)))
    opt = FusionOptimizer(
        [{"params": [a]}, {"params": [b], "nonfinite": "skip"}, {"params": [c], "nonfinite": "raise"}], lr=0.1, **kwargs
    )
    assert [g["nonfinite"] for g in opt.param_groups] == ["mask", "skip", "raise"]
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    opt.step()
    a0, b0, state_b = a.detach().clone(), b.detach().clone(), copy.deepcopy(dict(opt.state[b]))
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    a.grad[0, 0] = float("nan")
    b.grad[0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("masked" in m and "param group 0" in m for m in messages), messages
    assert any("skipped" in m and "param group 1" in m for m in messages), messages
    assert opt.state[a]["step"].item() == 2 and not torch.equal(a.detach()[1:], a0[1:]), "mask group: a was not stepped"
    assert opt.state[b]["step"].item() == 1 and torch.equal(b.detach(), b0), "skip group: b was stepped"
    assert_tree_equal(dict(opt.state[b]), state_b, "skip group: b's state")
    assert opt.state[c]["step"].item() == 2
    assert_finite(opt, a, "a")
    assert_finite(opt, b, "b")
    c.grad = torch.full((2, 2), float("inf"))
    a.grad, b.grad = torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)
    with pytest.raises(FloatingPointError):
        opt.step()
    # a group's mode can be changed between steps
    opt.param_groups[2]["nonfinite"] = "mask"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert opt.state[c]["step"].item() == 3 and torch.isfinite(c).all()


# ----------------------------------------------------------------------------------------------------------
# finite extremes: huge and tiny finite gradients never overflow the fp32 second moment
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (300, 300)], ids=["small", "90k-elements"])
def test_fp16_gradients_up_to_fp16_max_step_and_keep_a_finite_second_moment(engine, shape):
    """An fp16 gradient whose fp16 norm overflows (65504) is finite; its squares fit the fp32 statistic."""
    p = torch.zeros(shape, dtype=torch.float16, requires_grad=True)
    opt = FusionOptimizer([p], lr=1e-3, use_rms=True, **engine)
    p.grad = torch.full(shape, 65504.0, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "skipped" warning
        opt.step()
    for h in accumulators(opt.state[p]):
        assert torch.isfinite(h).all() and h.max().item() == pytest.approx(65504.0**2, rel=1e-6)
    assert torch.isfinite(p).all() and (p != 0).all()


@pytest.mark.parametrize("mode", ["skip", "mask"])
@pytest.mark.parametrize(
    "dtype,value,skipped",
    [
        (torch.float64, 1e18, False),  # g**2 = 1e36 fits the fp32 second moment
        (torch.float64, 1e20, True),  # g**2 = 1e40 does not: skipped, not stored as Inf
        (torch.float32, 1.5e19, False),
        (torch.float32, 3e19, True),
        (torch.bfloat16, 1e30, True),
    ],
    ids=["fp64-1e18", "fp64-1e20", "fp32-1.5e19", "fp32-3e19", "bf16-1e30"],
)
def test_gradients_past_the_fp32_second_moment_are_skipped_never_stored_as_inf(engine, dtype, value, skipped, mode):
    """ "skip" skips the parameter; "mask" (the default) masks the entry (|g| >= 2**64): the step counts, the
    entry takes no step, and its statistic stays zero."""
    p = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    q = torch.zeros(5, dtype=dtype, requires_grad=True)
    opt = FusionOptimizer([p, q], lr=1e-3, use_rms=True, nonfinite=mode, **engine)
    for x in (p, q):
        x.grad = torch.zeros(x.shape, dtype=dtype)
        x.grad.view(-1)[0] = value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    word = "skipped" if mode == "skip" else "non-finite"
    assert any(word in str(w.message) for w in caught) == skipped
    for x in (p, q):
        st = opt.state[x]
        hess = accumulators(st)
        assert all(torch.isfinite(h).all() for h in hess), "the second moment overflowed"
        assert torch.isfinite(x).all()
        assert st["step"].item() == (0 if skipped and mode == "skip" else 1)
        if skipped:  # skipped or masked: the (zero) parameter and its statistic did not move
            assert torch.count_nonzero(x) == 0 and all(torch.count_nonzero(h) == 0 for h in hess)
        else:
            assert x.view(-1)[0] < 0 and all(h.max() > 0 for h in hess)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_subnormal_gradients_give_finite_steps_and_a_nonnegative_second_moment(engine, dtype):
    """Gradients below fp32's normal range: their squares underflow the fp32 statistic to 0. Without RMS
    normalization eps may be as small as the gradients; with it, eps >= fp32's tiny keeps g / (sqrt(0) + eps)
    finite (a smaller eps is refused, see test_optim_contract.py's BAD_COMBINATIONS)."""
    tiny = torch.finfo(dtype).tiny
    cases = [
        (dict(use_rms=False, eps=tiny / 2**10), lambda t: tiny / 2 ** (t + 2)),  # subnormal in dtype
        (dict(use_rms=True, eps=torch.finfo(torch.float32).tiny), lambda t: 1e-30 / (t + 1)),  # squares underflow
    ]
    for kw, value in cases:
        p = torch.zeros(4, 3, dtype=dtype, requires_grad=True)
        q = torch.zeros(6, dtype=dtype, requires_grad=True)
        opt = FusionOptimizer([p, q], lr=1e-3, **kw, **engine)
        for t in range(3):
            for x in (p, q):
                x.grad = torch.full(x.shape, value(t), dtype=dtype)
                assert (x.grad != 0).all()
            opt.step()
        for x in (p, q):
            st = opt.state[x]
            hess = accumulators(st)
            assert all(torch.isfinite(h).all() and (h >= 0).all() for h in hess), kw
            assert torch.isfinite(x).all() and torch.isfinite(st["momentum_buffer"]).all(), kw
            assert (x < 0).all(), f"a positive gradient did not move the parameter down: {kw}"


# ----------------------------------------------------------------------------------------------------------
# CUDA: the fused engine
# ----------------------------------------------------------------------------------------------------------


def _cuda_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        from fusedbun.engines import fused_cuda

        return fused_cuda.unavailable_reason()
    except Exception as exc:  # noqa: BLE001
        return f"fusedbun.engines.fused_cuda failed: {type(exc).__name__}: {exc}"


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is available")


@pytest.mark.parametrize("flags", [(0.9, True, False), (0.0, False, True)], ids=flag_id)
@pytest.mark.parametrize("shape", [(), (1000,), (64, 96), (8, 16, 24)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@NO_CUDA
@pytest.mark.gpu
def test_cuda_fused_masked_step_equals_the_step_with_those_entries_zeroed(dtype, shape, flags):
    reason = _cuda_reason()
    if reason:
        pytest.skip(f"fused CUDA engine unavailable: {reason}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CUDA warning comes a step later: checked below
        _masked_equals_zeroed(shape, dtype, {"fused": True}, "cuda", flags)


@NO_CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [{"fused": True}, {}], ids=["fused", "default"])
def test_cuda_warning_comes_at_a_later_step(kwargs):
    reason = _cuda_reason()
    if reason and kwargs:
        pytest.skip(f"fused CUDA engine unavailable: {reason}")
    gen = torch.Generator(device="cuda").manual_seed(14)
    params = [torch.randn(s, generator=gen, device="cuda").requires_grad_() for s in [(64, 96), (1000,), (3,)]]
    opt = FusionOptimizer([{"params": params[:1]}, {"params": params[1:]}], lr=0.01, **kwargs)

    def finite_grads():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda")

    finite_grads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        torch.cuda.synchronize()
        opt.step()
    assert not mask_warnings(caught), "warned on finite gradients"

    finite_grads()
    params[2].grad[1] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        torch.cuda.synchronize()
        finite_grads()
        opt.step()
    msgs = mask_warnings(caught)
    assert len(msgs) == 1, f"expected one non-finite warning by the step after the synchronize: {msgs}"
    groups, numbers = group_and_positions(msgs)
    assert groups == {1} and 1 in numbers, msgs
    assert all(opt.state[p]["step"].item() == 4 for p in params)
    assert all(torch.isfinite(p).all() for p in params)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        finite_grads()
        opt.step()
        torch.cuda.synchronize()
        opt.step()
    assert not mask_warnings(caught), "the earlier warning was repeated"


@NO_CUDA
@pytest.mark.gpu
def test_cuda_fused_mask_mode_step_does_not_wait_for_the_device():
    """Mask mode has no host sync: a step, bad gradients included, runs under sync debug mode "error"."""
    reason = _cuda_reason()
    if reason:
        pytest.skip(f"fused CUDA engine unavailable: {reason}")
    gen = torch.Generator(device="cuda").manual_seed(15)
    params = [torch.randn(s, generator=gen, device="cuda").requires_grad_() for s in [(64, 96), (1000,), ()]]
    opt = FusionOptimizer(params, lr=0.01, use_rms=True, fused=True)
    for _ in range(2):  # compile and create the state outside the checked region
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda")
        opt.step()
    torch.cuda.synchronize()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device="cuda")
    params[0].grad[3, 4] = float("nan")
    params[2].grad.fill_(float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
