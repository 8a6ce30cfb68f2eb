"""The ``torch.optim`` contract: FusionOptimizer behaves like a PyTorch optimizer in every corner, on every engine.

The checks follow the areas PyTorch's own optimizer suite covers: state_dict round trips and
serialization, copies, param groups and tensor lr, validation of every argument, edge-case tensors,
hooks, closures, LR schedulers, AMP, maximize, the order of the params and ``zero_grad``. The rule
itself (each step against a float64 re-derivation) is tested in ``test_rule.py`` and the engines against
each other in ``test_engines.py``; here the question is whether the optimizer composes with the rest of
PyTorch and keeps its promises when it is copied, saved, reloaded, extended, misconfigured or driven by
other tools. Where a test needs to know that a step is right (not only that two runs agree), it checks
it against the rule with ``rule_check``.

Every test that steps runs on each engine (``engine`` fixture, see conftest.py) and many on a grid of
configurations (``CONFIGS``). "Bit for bit" means ``helpers.assert_tree_equal``: the same engine on the
same inputs must reproduce itself exactly, whatever path the state took. State dicts that the optimizer
must refuse (another optimizer's, another layout's, impossible values) are in ``test_faults.py``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import random

import pytest
import torch
import torch.nn as nn
from helpers import (
    accumulators,
    assert_same_run,
    assert_tree_equal,
    clone_params,
    make_params,
    run,
    seeded_grad,
    set_grads,
)
from rule_check import dtype_id, group_hp, make_grad, set_grad, step_and_verify
from spec_reference import reference_step
from torch.optim import lr_scheduler as sched
from torch.optim.swa_utils import SWALR, AveragedModel

from fusedbun import FusionOptimizer

LR = 2.0**-6  # exactly representable, so a tensor lr and a float lr are the same number
CONFIGS = {
    "default": {},
    "rms-centralize": dict(use_rms=True, centralize=True, eps=1e-3),
    "no-momentum-no-decay": dict(momentum_beta=0.0, Lambda=0.0),
    "maximize-rms": dict(maximize=True, use_rms=True, beta_decay=0.5, Lambda=0.1),
    "bf16-momentum": dict(momentum_dtype=torch.bfloat16, use_rms=True, momentum_beta=0.5),
}
CONFIG_PARAMS = [pytest.param(v, id=k) for k, v in CONFIGS.items()]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def quadratic_loss(params, targets) -> torch.Tensor:
    return sum(((p - t) ** 2).sum() for p, t in zip(params, targets))


# ----------------------------------------------------------------------------------------------------------
# state_dict: round trips, serialization, before any step, dtype casts, devices, older checkpoints
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_state_dict_round_trip_resumes_bit_for_bit(engine, config, dtype):
    """Saved after 3 steps, loaded into a fresh optimizer (directly and through torch.save/torch.load with
    weights_only=True), resumed for 3 more: identical to the uninterrupted run. Every state tensor keeps
    its saved dtype (bf16 parameters keep fp32 accumulators; a bf16 momentum of fp32 parameters stays bf16)."""
    kw = {**engine, **config, "lr": LR}
    params = make_params(1, dtype=dtype)
    opt = FusionOptimizer(params, **kw)
    run(opt, params, range(3))

    sd = opt.state_dict()
    pristine = copy.deepcopy(sd)
    twin = clone_params(params)
    opt_twin = FusionOptimizer(twin, **kw)
    opt_twin.load_state_dict(sd)
    assert_tree_equal(sd, pristine, "state dict after load_state_dict")  # loading must not modify it
    assert_tree_equal(opt_twin.state_dict(), pristine, "reloaded state_dict")

    # the same checkpoint through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_tree_equal(loaded, pristine, "weights_only reload")
    third = clone_params(params)
    opt_third = FusionOptimizer(third, **kw)
    opt_third.load_state_dict(loaded)

    for o, ps in ((opt, params), (opt_twin, twin), (opt_third, third)):
        run(o, ps, range(3, 6))
    assert_same_run(params, opt, twin, opt_twin)
    assert_same_run(params, opt, third, opt_third)
    assert_tree_equal(opt.state_dict(), opt_twin.state_dict(), "state_dict after resuming")


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_state_dict_saved_before_any_step_loads_and_resumes(engine, config):
    kw = {**engine, **config, "lr": LR}
    params = make_params(2)
    opt = FusionOptimizer(params, **kw)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"] == {}
    twin = clone_params(params)
    opt_twin = FusionOptimizer(twin, **kw)
    opt_twin.load_state_dict(sd)
    assert len(opt_twin.state) == 0
    run(opt, params, range(3))
    run(opt_twin, twin, range(3))
    assert_same_run(params, opt, twin, opt_twin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
def test_state_dict_loads_into_params_cast_to_another_dtype(engine, dtype):
    """A fp32 checkpoint loaded after ``model.to(dtype)``: the state keeps its saved (fp32) dtype, and
    the next steps agree with fp32 training from the same (cast) values up to one rounding to ``dtype``."""
    kw = {**engine, "lr": LR, "use_rms": True}
    params = make_params(3)
    opt = FusionOptimizer(params, **kw)
    run(opt, params, range(3))
    sd = copy.deepcopy(opt.state_dict())

    cast = [p.detach().to(dtype).requires_grad_() for p in params]
    opt_cast = FusionOptimizer(cast, **kw)
    opt_cast.load_state_dict(copy.deepcopy(sd))
    for p in cast:
        st = opt_cast.state[p]
        assert st["momentum_buffer"].dtype == torch.float32, "the momentum kept its saved dtype"
        for a in st["exp_hessian"] if isinstance(st["exp_hessian"], list) else [st["exp_hessian"]]:
            assert a.dtype == torch.float32
    ref = [p.detach().float().requires_grad_() for p in cast]  # fp32 twin from the same starting values
    opt_ref = FusionOptimizer(ref, **kw)
    opt_ref.load_state_dict(copy.deepcopy(sd))

    for t in range(3, 5):
        set_grads(cast, t)
        for r, c in zip(ref, cast):
            r.grad = c.grad.float()
        opt_cast.step()
        opt_ref.step()
        for c, r in zip(cast, ref):
            assert c.dtype == dtype and torch.isfinite(c).all()
            if dtype == torch.float64:
                torch.testing.assert_close(c.detach(), r.detach().double(), rtol=1e-5, atol=1e-6)
            else:
                # one rounding to dtype per step, from values that were themselves rounded: 2 ulps
                ulp = torch.finfo(dtype).eps * r.detach().abs().clamp_min(torch.finfo(dtype).tiny)
                assert ((c.detach().float() - r.detach()).abs() <= 2 * ulp + 1e-7).all()
                r.data.copy_(c.detach().float())  # resynchronize: the comparison is per step
        assert opt_cast.state[cast[0]]["step"].item() == t + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a state dict between devices needs a CUDA GPU")
@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_state_dict_moves_between_cpu_and_gpu(config):
    kw = {**config, "lr": LR}
    params = make_params(4)
    opt = FusionOptimizer(params, foreach=True, **kw)
    run(opt, params, range(3))
    gpu = [p.detach().cuda().requires_grad_() for p in params]
    opt_gpu = FusionOptimizer(gpu, **kw)  # default engine selection on the GPU
    opt_gpu.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in gpu:
        st = opt_gpu.state[p]
        assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32
        assert all(t.device.type == "cuda" for t in accumulators(st) + [st.get("momentum_buffer", p)])
    for t in range(3, 6):
        set_grads(params, t)
        for g, p in zip(gpu, params):
            g.grad = p.grad.cuda()
        opt.step()
        opt_gpu.step()
    for p, g in zip(params, gpu):
        torch.testing.assert_close(g.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
    # and back: the GPU state resumes on the CPU
    back = [g.detach().cpu().requires_grad_() for g in gpu]
    opt_back = FusionOptimizer(back, foreach=True, **kw)
    opt_back.load_state_dict(opt_gpu.state_dict())
    assert all(t.device.type == "cpu" for p in back for t in accumulators(opt_back.state[p]))
    run(opt_back, back, range(6, 7))
    assert all(torch.isfinite(p).all() for p in back)


def test_state_dict_with_python_number_steps_resumes_like_tensor_steps(engine):
    """Older checkpoints store ``step`` as a number; loading one continues exactly like the tensor form."""
    params = make_params(5)
    opt = FusionOptimizer(params, lr=LR, **engine)
    run(opt, params, range(3))
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    twin = clone_params(params)
    opt_twin = FusionOptimizer(twin, lr=LR, **engine)
    opt_twin.load_state_dict(sd)
    for p in twin:
        st = opt_twin.state[p]["step"]
        assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.device.type == "cpu"
    run(opt, params, range(3, 5))
    run(opt_twin, twin, range(3, 5))
    assert_same_run(params, opt, twin, opt_twin)


def test_state_dict_without_newer_group_keys_loads_with_the_defaults(engine):
    params = make_params(6)
    opt = FusionOptimizer(params, lr=LR, **engine)
    run(opt, params, range(2))
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("nonfinite", "momentum_dtype", "fused", "foreach", "maximize"):
            group.pop(key, None)
    opt.load_state_dict(sd)
    g = opt.param_groups[0]
    assert g["nonfinite"] == "mask" and g["momentum_dtype"] is None and g["maximize"] is False
    run(opt, params, range(2, 3))
    assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_state_dict_keeps_param_names_of_named_parameters(engine):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    try:
        opt = FusionOptimizer(model.named_parameters(), lr=LR, **engine)
    except TypeError as exc:  # torch < 2.6 takes no (name, param) pairs
        pytest.skip(f"this torch does not accept named parameters: {exc}")
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = opt.state_dict()["param_groups"][0].get("param_names")
    assert names == [n for n, _ in model.named_parameters()]


# ----------------------------------------------------------------------------------------------------------
# copies: deepcopy, pickle, torch.save of the whole optimizer
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_copied_optimizer_continues_identically(engine, config, how):
    params = make_params(7)
    opt = FusionOptimizer(params, **engine, **config, lr=LR)
    run(opt, params, range(2))
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    elif how == "pickle":
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    else:
        buf = io.BytesIO()
        torch.save((params, opt), buf)
        buf.seek(0)
        params2, opt2 = torch.load(buf, weights_only=False)
    assert all(q is not p for q, p in zip(params2, params))
    assert all(any(q is x for x in opt2.param_groups[0]["params"]) for q in params2), "copy lost the param identity"
    public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731
    assert public(opt2) == public(opt)
    run(opt, params, range(2, 4))
    run(opt2, params2, range(2, 4))
    assert_same_run(params, opt, params2, opt2)


def test_repr_names_every_hyperparameter(engine):
    text = repr(FusionOptimizer(make_params(8), lr=LR, **engine))
    for key in ("lr", "eps", "beta_decay", "Lambda", "momentum_beta", "centralize", "use_rms", "maximize"):
        assert key in text


# ----------------------------------------------------------------------------------------------------------
# param groups and tensor lr
# ----------------------------------------------------------------------------------------------------------


def test_param_group_added_later_matches_a_separate_optimizer(engine):
    params = make_params(9)
    a, b = params[:3], params[3:]
    own = dict(lr=0.05, use_rms=True, momentum_beta=0.5, Lambda=0.0, beta_decay=0.6, centralize=True, eps=1e-4)
    twin_a, twin_b = clone_params(a), clone_params(b)
    opt = FusionOptimizer(a, lr=LR, **engine)
    opt_a = FusionOptimizer(twin_a, lr=LR, **engine)
    run(opt, a, range(2))
    run(opt_a, twin_a, range(2))
    opt.add_param_group({"params": b, **own})
    group = opt.param_groups[-1]
    assert all(group[k] == v for k, v in own.items()), "the group's own hyperparameters were not kept"
    assert group["nonfinite"] == "mask" and group["maximize"] is False, "missing keys take the defaults"
    opt_b = FusionOptimizer(twin_b, **own, **engine)
    for t in range(2, 5):
        set_grads(params, t)
        for x, y in zip(twin_a + twin_b, a + b):
            x.grad = y.grad.clone()
        opt.step()
        opt_a.step()
        opt_b.step()
    assert_same_run(a, opt, twin_a, opt_a)
    assert_same_run(b, opt, twin_b, opt_b)
    assert opt.state[b[0]]["step"].item() == 3 and opt.state[a[0]]["step"].item() == 5
    opt.add_param_group({"params": [torch.zeros(2, 2, requires_grad=True)]})
    bare = opt.param_groups[-1]
    assert {k: v for k, v in bare.items() if k != "params"} == opt.defaults, (
        "a group added without hyperparameters takes the optimizer's defaults"
    )


def test_param_group_with_tiny_lr_leaves_its_params_almost_still(engine):
    """As in torch's test_param_groups_lr: a group's own lr overrides the default."""
    params = make_params(10)
    opt = FusionOptimizer([{"params": params[:2], "lr": 0.05}, {"params": params[2:]}], lr=1e-30, Lambda=0.0, **engine)
    before = [p.detach().clone() for p in params]
    run(opt, params, range(3))
    assert all(not torch.equal(p.detach(), q) for p, q in zip(params[:2], before[:2]))
    for p, q in zip(params[2:], before[2:]):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-28)


def test_hyperparameters_changed_in_the_group_between_steps_take_effect(engine, gen):
    p = torch.randn(6, 5, generator=gen).requires_grad_()
    q = torch.randn(7, generator=gen).requires_grad_()
    opt = FusionOptimizer([p, q], lr=0.1, eps=1 / 64, Lambda=0.0, **engine)
    changes = [
        {},
        {"Lambda": 0.2},
        {"lr": 0.03, "use_rms": True},
        {"centralize": True, "maximize": True, "eps": 0.375},
        {"beta_decay": 0.4, "momentum_beta": 0.5},
        {"Lambda": 0.0, "use_rms": False, "maximize": False},
    ]
    for ch in changes:
        opt.param_groups[0].update(ch)
        for x in (p, q):
            set_grad(x, make_grad(x.shape, gen, opt.param_groups[0]["eps"]))
        step_and_verify(opt, [p, q], f"after setting {ch}: ")


def test_each_group_uses_its_own_hyperparameters(engine, gen):
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(5, 4), (4,), (3, 2, 3), (6, 2)]]
    groups = [
        {"params": [ps[0], ps[1]]},
        {"params": [ps[2]], "lr": 0.02, "Lambda": 0.0, "momentum_beta": 0.0, "use_rms": True, "centralize": True},
        {"params": [ps[3]], "eps": 0.375, "maximize": True, "beta_decay": 1.0, "Lambda": 0.3},
    ]
    opt = FusionOptimizer(groups, lr=0.1, **engine)
    for _ in range(3):
        for x in ps:
            set_grad(x, make_grad(x.shape, gen, 0.375))
        step_and_verify(opt, ps)


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_tensor_lr_gives_the_same_steps_as_a_float_lr(engine, config):
    pf, pt = make_params(11), make_params(11)
    opt_f = FusionOptimizer(pf, lr=LR, **engine, **config)
    opt_t = FusionOptimizer(pt, lr=torch.tensor(LR), **engine, **config)
    s_f = sched.ExponentialLR(opt_f, gamma=0.5)  # a power of two: the tensor and the float stay equal
    s_t = sched.ExponentialLR(opt_t, gamma=0.5)
    for t in range(4):
        set_grads(pf, t)
        set_grads(pt, t)
        opt_f.step()
        opt_t.step()
        s_f.step()
        s_t.step()
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)
    assert opt_t.param_groups[0]["lr"].item() == opt_f.param_groups[0]["lr"]
    assert_same_run(pf, opt_f, pt, opt_t)


# ----------------------------------------------------------------------------------------------------------
# validation: every argument, in the constructor, in add_param_group and set in a group between steps
# ----------------------------------------------------------------------------------------------------------

BAD_VALUES = [
    # (keyword, value, exception)
    ("lr", -1e-3, ValueError),
    ("lr", math.nan, ValueError),
    ("lr", math.inf, ValueError),
    ("lr", "0.1", TypeError),
    ("lr", None, TypeError),
    ("lr", 1j, TypeError),
    ("lr", True, TypeError),
    ("lr", torch.tensor([0.1, 0.2]), ValueError),
    ("lr", torch.tensor(-0.1), ValueError),
    ("lr", torch.tensor(0.1j), ValueError),
    ("eps", -1e-8, ValueError),
    ("eps", math.nan, ValueError),
    ("eps", math.inf, ValueError),
    ("eps", None, TypeError),
    ("beta_decay", 0.0, ValueError),
    ("beta_decay", -0.5, ValueError),
    ("beta_decay", 1.5, ValueError),
    ("beta_decay", math.nan, ValueError),
    ("beta_decay", "0.8", TypeError),
    ("Lambda", -0.01, ValueError),
    ("Lambda", math.inf, ValueError),
    ("Lambda", [0.01], TypeError),
    ("momentum_beta", -0.1, ValueError),
    ("momentum_beta", 1.0, ValueError),
    ("momentum_beta", 1.5, ValueError),
    ("momentum_beta", math.nan, ValueError),
    ("momentum_beta", (0.9,), TypeError),
    ("centralize", "yes", TypeError),
    ("centralize", None, TypeError),
    ("use_rms", 1, TypeError),
    ("maximize", "no", TypeError),
    ("foreach", "no", TypeError),
    ("fused", 1, TypeError),
    ("nonfinite", "ignore", ValueError),
    ("nonfinite", None, ValueError),
    ("nonfinite", "Mask", ValueError),
    ("nonfinite", "MASK", ValueError),
    ("nonfinite", "", ValueError),
    ("nonfinite", "zero", ValueError),
    ("nonfinite", 0, ValueError),
    ("nonfinite", True, ValueError),
    ("momentum_dtype", torch.int32, ValueError),
    ("momentum_dtype", "bfloat16", ValueError),
    ("momentum_dtype", torch.complex64, ValueError),
]
BAD_COMBINATIONS = [
    ({"use_rms": True, "eps": 0.0}, ValueError, "eps"),
    ({"use_rms": True, "eps": 1e-40}, ValueError, "eps"),  # a subnormal fp32 eps: refused with use_rms
    ({"fused": True, "foreach": True}, ValueError, "fused"),
]
BAD_IDS = [f"{k}={v!r}" for k, v, _ in BAD_VALUES]


@pytest.mark.parametrize("name,value,exc", BAD_VALUES, ids=BAD_IDS)
def test_invalid_argument_raises_naming_it(name, value, exc):
    p = torch.zeros(3, requires_grad=True)
    kwargs = {"lr": 0.1, name: value}
    with pytest.raises(exc, match=name):
        FusionOptimizer([p], **kwargs)


@pytest.mark.parametrize("kwargs,exc,name", BAD_COMBINATIONS, ids=["rms-eps0", "rms-eps1e-40", "fused+foreach"])
def test_invalid_combination_raises_naming_it(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        FusionOptimizer([torch.zeros(3, requires_grad=True)], lr=0.1, **kwargs)


@pytest.mark.parametrize("name,value,exc", BAD_VALUES, ids=BAD_IDS)
def test_invalid_param_group_value_is_refused_by_add_param_group(name, value, exc):
    opt = FusionOptimizer([torch.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises(exc, match=name):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], name: value})
    assert len(opt.param_groups) == 1, "the refused group was kept"


@pytest.mark.parametrize("name,value,exc", BAD_VALUES, ids=BAD_IDS)
def test_invalid_value_set_in_a_group_between_steps_is_refused_at_step(name, value, exc):
    params = make_params(29)
    opt = FusionOptimizer(params, lr=0.01)
    run(opt, params, range(2))
    good = opt.param_groups[0][name]
    state = copy.deepcopy(opt.state_dict()["state"])
    values = [p.detach().clone() for p in params]
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(0.0)

    opt.param_groups[0][name] = value
    with pytest.raises(exc, match=name):
        opt.step(closure)
    assert not calls, "the closure ran before the hyperparameters were checked"
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values)), "a parameter moved"
    assert_tree_equal(opt.state_dict()["state"], state, "state after a refused step")
    opt.param_groups[0][name] = good
    opt.step()


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda p: FusionOptimizer(p, lr=0.1), TypeError, "iterable"),
        (lambda p: FusionOptimizer([], lr=0.1), ValueError, "empty"),
        (lambda p: FusionOptimizer([{"params": {p}}], lr=0.1), TypeError, "ordered"),
        (lambda p: FusionOptimizer([p * 2], lr=0.1), ValueError, "leaf"),
        (lambda p: FusionOptimizer([{"params": [p]}, {"params": [p]}], lr=0.1), ValueError, "more than one"),
        (lambda p: FusionOptimizer([{"lr": 0.1}], lr=0.1), KeyError, "params"),
        (lambda p: FusionOptimizer([p], lr=0.1, betas=(0.9, 0.99)), TypeError, "betas"),
        (lambda p: FusionOptimizer([p]), ValueError, "lr"),
    ],
    ids=[
        "tensor-not-list",
        "empty",
        "set",
        "non-leaf",
        "duplicate-across-groups",
        "group-without-params",
        "unknown-keyword",
        "lr-missing",
    ],
)
def test_invalid_params_argument_is_refused(make, exc, match):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(exc, match=match):
        make(p)


def test_duplicate_param_in_a_group_warns():
    p = torch.zeros(3, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate"):
        FusionOptimizer([p, p], lr=0.1)


@pytest.mark.parametrize(
    "name,value", [("beta_decay", 1.0), ("momentum_beta", 0.0), ("lr", 0.0), ("Lambda", 0.0), ("eps", 0.0)]
)
def test_valid_edge_hyperparameters_are_accepted_and_follow_the_rule(engine, name, value, gen):
    p = torch.randn(4, 3, generator=gen).requires_grad_()
    p0 = p.detach().clone()
    kwargs = {"lr": 0.1, "Lambda": 0.5, name: value}
    opt = FusionOptimizer([p], **kwargs, **engine)
    assert opt.param_groups[0][name] == value
    p.grad = torch.randn(4, 3, generator=gen)
    step_and_verify(opt, [p])
    if name == "lr":
        assert torch.equal(p.detach(), p0), "lr=0 moved the parameter"


# ----------------------------------------------------------------------------------------------------------
# edge-case tensors: empty, zero-size, 0-D, no grad, zero grad, non-contiguous, complex
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_empty_and_zero_size_params_step_and_leave_the_others_unaffected(engine, config):
    normal = make_params(12)
    empty = [torch.zeros(s, requires_grad=True) for s in [(0,), (0, 3), (3, 0), (2, 0, 4)]]
    mixed = [x for pair in zip(normal, empty + [None]) for x in pair if x is not None]
    twin = clone_params(normal)
    opt = FusionOptimizer(mixed, lr=LR, **engine, **config)
    opt_twin = FusionOptimizer(twin, lr=LR, **engine, **config)
    for t in range(3):
        set_grads(mixed, t)
        for x, p in zip(twin, normal):
            x.grad = p.grad.clone()
        opt.step()
        opt_twin.step()
    assert_same_run(normal, opt, twin, opt_twin)
    for e in empty:
        assert e.numel() == 0
        st = opt.state[e]
        assert st["step"].item() == 3
        accs = st["exp_hessian"] if isinstance(st["exp_hessian"], list) else [st["exp_hessian"]]
        assert all(torch.isfinite(a).all() for a in accs)


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_zero_dim_param_steps_like_a_one_element_vector(engine, config):
    scalar = torch.tensor(0.75, requires_grad=True)
    vector = torch.tensor([0.75], requires_grad=True)
    o_s = FusionOptimizer([scalar], lr=LR, **engine, **config)
    o_v = FusionOptimizer([vector], lr=LR, **engine, **config)
    for t in range(4):
        g = seeded_grad((), t)
        scalar.grad, vector.grad = g.clone(), g.reshape(1).clone()
        o_s.step()
        o_v.step()
    assert scalar.shape == () and torch.equal(scalar.detach().reshape(1), vector.detach())
    assert o_s.state[scalar]["exp_hessian"].shape == ()
    assert torch.equal(o_s.state[scalar]["exp_hessian"].reshape(1), o_v.state[vector]["exp_hessian"])


def test_params_without_grads_are_untouched_and_join_later_at_their_own_step_one(engine):
    params = make_params(13)
    late = params[1]
    before = late.detach().clone()
    opt = FusionOptimizer(params, lr=LR, **engine)
    for t in range(2):
        set_grads(params, t)
        late.grad = None
        opt.step()
    assert torch.equal(late.detach(), before), "a param without a grad moved (weight decay must not apply)"
    assert late not in opt.state
    twin = late.detach().clone().requires_grad_()
    o_twin = FusionOptimizer([twin], lr=LR, **engine)
    set_grads(params, 2)
    twin.grad = late.grad.clone()
    opt.step()
    o_twin.step()
    assert torch.equal(late.detach(), twin.detach())
    assert opt.state[late]["step"].item() == 1 and opt.state[params[0]]["step"].item() == 3


def test_zero_grads_without_decay_leave_fresh_params_unchanged(engine):
    params = make_params(14)
    before = [p.detach().clone() for p in params]
    opt = FusionOptimizer(params, lr=LR, Lambda=0.0, use_rms=True, **engine)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_non_contiguous_params_step_like_contiguous_ones(engine, config):
    base = make_params(15, shapes=[(6, 5, 2), (7, 2), (3, 4, 2, 2)])
    strided = [b.detach()[..., 0].requires_grad_() for b in base]  # views with a stride of 2
    assert not any(s.is_contiguous() for s in strided)
    dense = [s.detach().contiguous().requires_grad_() for s in strided]
    o_s = FusionOptimizer(strided, lr=LR, **engine, **config)
    o_d = FusionOptimizer(dense, lr=LR, **engine, **config)
    for t in range(3):
        set_grads(dense, t)
        for s, d in zip(strided, dense):
            s.grad = d.grad.clone()
        o_s.step()
        o_d.step()
    for s, d in zip(strided, dense):
        if engine.get("fused"):  # the fused engine hands strided tensors to the multi-tensor engine: rounding differs
            torch.testing.assert_close(s.detach(), d.detach(), rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(s.detach(), d.detach())


@pytest.mark.parametrize("complex_dtype", [torch.complex64, torch.complex128], ids=dtype_id)
def test_complex_and_integer_params_are_refused_everywhere(engine, complex_dtype):
    z = torch.zeros(3, dtype=complex_dtype, requires_grad=True)
    with pytest.raises(TypeError, match="(?i)complex"):
        FusionOptimizer([z], lr=LR, **engine)
    real = torch.zeros(2, requires_grad=True)
    opt = FusionOptimizer([real], lr=LR, **engine)
    with pytest.raises(TypeError, match="(?i)complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1, "the refused group was left behind"
    # put into a group by hand, past add_param_group: refused at the first step, nothing changed
    opt.param_groups[0]["params"].append(z)
    z.grad = torch.ones(3, dtype=complex_dtype)
    real.grad = torch.ones(2)
    with pytest.raises(TypeError, match="view_as_real"):
        opt.step()
    assert torch.equal(z.detach(), torch.zeros(3, dtype=complex_dtype))
    ints = torch.ones(3, dtype=torch.int64)
    ints.grad = torch.ones(3, dtype=torch.int64)
    opt2 = FusionOptimizer([ints], lr=LR, **engine)
    with pytest.raises(TypeError, match="floating point"):
        opt2.step()


def test_view_as_real_is_the_documented_way_to_optimize_complex_values(engine):
    z = torch.randn(4, 3, dtype=torch.complex64)
    r = torch.view_as_real(z).clone().requires_grad_()  # (4, 3, 2) real parameter
    opt = FusionOptimizer([r], lr=LR, **engine)
    r.grad = torch.randn_like(r)
    opt.step()
    assert torch.isfinite(r).all() and len(opt.state[r]["exp_hessian"]) == 3


# ----------------------------------------------------------------------------------------------------------
# hooks
# ----------------------------------------------------------------------------------------------------------


def test_step_pre_and_post_hooks_fire_once_each_in_torch_order(engine):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = make_params(16)
    opt = FusionOptimizer(params, lr=LR, **engine)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global-pre")),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o is opt))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o.state[params[0]]["step"].item()))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global-post")),
    ]
    try:
        set_grads(params, 0)
        opt.step()
        assert calls == ["global-pre", ("pre", True), ("post", 1.0), "global-post"]
        for h in handles:
            h.remove()
        set_grads(params, 1)
        opt.step()
        assert len(calls) == 4, "a removed hook still fired"
    finally:
        for h in handles:
            h.remove()


def test_step_pre_hook_can_edit_gradients_and_replace_the_closure(engine):
    params = make_params(17)
    twin = clone_params(params)
    opt, o_twin = FusionOptimizer(params, lr=LR, **engine), FusionOptimizer(twin, lr=LR, **engine)

    def halve_and_wrap(o, args, kwargs):
        for group in o.param_groups:
            for p in group["params"]:
                p.grad.mul_(0.5)
        return args, {"closure": lambda: torch.tensor(42.0)}  # args holds the optimizer itself

    opt.register_step_pre_hook(halve_and_wrap)
    set_grads(params, 0)
    set_grads(twin, 0)
    for p in twin:
        p.grad.mul_(0.5)
    assert opt.step().item() == 42.0
    o_twin.step()
    assert_same_run(params, opt, twin, o_twin)


def test_state_dict_pre_and_post_hooks_run(engine):
    opt = FusionOptimizer(make_params(18), lr=LR, **engine)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("pre-ran", True))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "post-ran": sd["state"].pop("pre-ran", False)})
    sd = opt.state_dict()
    assert sd["post-ran"] is True and "pre-ran" not in sd["state"]


def test_load_state_dict_hooks_run_and_can_edit_the_groups(engine):
    params = make_params(19)
    opt = FusionOptimizer(params, lr=LR, **engine)
    run(opt, params, range(2))
    sd = copy.deepcopy(opt.state_dict())
    other = FusionOptimizer(clone_params(params), lr=LR, **engine)
    seen = []

    def pre(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        return state_dict

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(lambda o: seen.append(o.param_groups[0]["lr"]))
    other.load_state_dict(sd)
    assert seen == [0.003]
    assert sd["param_groups"][0]["lr"] == LR, "the caller's state dict was modified"


def test_load_state_dict_pre_hook_edits_to_the_state_are_kept(engine):
    params = make_params(20)
    opt = FusionOptimizer(params, lr=LR, **engine)
    run(opt, params, range(2))
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():  # an older layout that a migration hook renames
        st["hessian"] = st.pop("exp_hessian")

    def migrate(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for st in state_dict["state"].values():
            st["exp_hessian"] = st.pop("hessian")
            st["momentum_buffer"] = torch.zeros_like(st["momentum_buffer"])
        return state_dict

    other = FusionOptimizer(clone_params(params), lr=LR, **engine)
    other.register_load_state_dict_pre_hook(migrate)
    other.load_state_dict(sd)
    assert all(bool((st["momentum_buffer"] == 0).all()) for st in other.state.values())


# ----------------------------------------------------------------------------------------------------------
# closures
# ----------------------------------------------------------------------------------------------------------


def test_closure_is_called_once_per_step_with_grad_enabled_and_its_loss_returned(engine):
    params = make_params(21)
    targets = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in params]
    opt = FusionOptimizer(params, lr=0.05, **engine)
    calls, losses = [], []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = quadratic_loss(params, targets)
        loss.backward()
        losses.append(loss)
        return loss

    first = quadratic_loss(params, targets).item()
    before = [p.detach().clone() for p in params]
    with torch.no_grad():  # as in a training loop's evaluation context: step enables grad for the closure
        ret = opt.step(closure)
    assert calls == [True], f"closure calls (grad enabled?): {calls}"
    assert ret is losses[0], f"step returned {ret!r}, not the closure's loss {losses[0]!r}"
    # and the step used the gradient the closure produced
    for p, b in zip(params, before):
        ref = reference_step(b, p.grad, None, 1, **group_hp(opt.param_groups[0]))
        torch.testing.assert_close(p.detach().double(), ref.param, rtol=1e-6, atol=1e-7)
    for _ in range(9):
        assert opt.step(closure) is losses[-1]
    assert calls == [True] * 10
    assert losses[-1].item() < first
    set_grads(params, 0)
    assert opt.step() is None


# ----------------------------------------------------------------------------------------------------------
# LR schedulers
# ----------------------------------------------------------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3),
    "LinearLR": lambda o: sched.LinearLR(o, start_factor=0.25, total_iters=4),
    "ConstantLR": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=6, power=2.0),
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda e: 0.95),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=False),
    "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False),
    "SequentialLR": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.5, total_iters=3), sched.ExponentialLR(o, gamma=0.8)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: sched.ChainedScheduler(
        [sched.ExponentialLR(o, gamma=0.9), sched.StepLR(o, step_size=3, gamma=0.5)]
    ),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_scheduler_sets_the_lr_each_step_uses_and_training_goes_downhill(engine, name):
    params, twin = make_params(22), make_params(22)
    gen = torch.Generator().manual_seed(2)
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    opt = FusionOptimizer(params, lr=0.05, **engine)
    scheduler = SCHEDULERS[name](opt)
    o_twin = FusionOptimizer(twin, lr=0.05, **engine)
    first = quadratic_loss(params, targets).item()
    used = []
    for _ in range(20):
        for ps, o in ((params, opt), (twin, o_twin)):
            o.zero_grad()
            loss = quadratic_loss(ps, targets)
            loss.backward()
        lr = opt.param_groups[0]["lr"]
        used.append(lr)
        o_twin.param_groups[0]["lr"] = lr  # the twin is told the lr by hand
        opt.step()
        o_twin.step()
        if isinstance(scheduler, sched.ReduceLROnPlateau):
            scheduler.step(loss.item())
        else:
            scheduler.step()
    assert len(set(used)) > 1, f"{name} never changed the lr"
    assert_same_run(params, opt, twin, o_twin)
    assert quadratic_loss(params, targets).item() < first


def test_cycling_momentum_needs_a_momentum_key_and_says_so(engine):
    """FusionOptimizer's momentum is ``momentum_beta``; OneCycleLR's momentum cycling refuses it clearly."""
    opt = FusionOptimizer(make_params(23), lr=LR, **engine)
    with pytest.raises(ValueError, match="momentum"):
        sched.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)


def test_swa_utils_average_a_fusion_optimizer_run(engine):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = FusionOptimizer(model.parameters(), lr=0.05, **engine)
    swa_model = AveragedModel(model)
    swa_sched = SWALR(opt, swa_lr=0.01, anneal_epochs=2, anneal_strategy="linear")
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    snapshots = []
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        swa_model.update_parameters(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
        swa_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    for k, p in enumerate(swa_model.module.parameters()):
        torch.testing.assert_close(p.detach(), torch.stack([s[k] for s in snapshots]).mean(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# AMP: GradScaler with CPU bf16 autocast
# ----------------------------------------------------------------------------------------------------------


def test_grad_scaler_with_cpu_bf16_autocast_matches_unscaled_training_and_skips_inf(engine):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    opt = FusionOptimizer(model.parameters(), lr=0.01, use_rms=True, **engine)
    o_twin = FusionOptimizer(twin.parameters(), lr=0.01, use_rms=True, **engine)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for _ in range(4):
        for m, o, scaled in ((model, opt, True), (twin, o_twin, False)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(m(x).float(), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                o.step()
    # the scale is a power of two: scaling and unscaling the fp32 gradients is exact
    assert_same_run(list(model.parameters()), opt, list(twin.parameters()), o_twin)

    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    scale = scaler.get_scale()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
    assert_tree_equal(opt.state_dict(), state_before, "state after a step the scaler skipped")


# ----------------------------------------------------------------------------------------------------------
# maximize, engines, order, zero_grad
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [c for c in CONFIG_PARAMS if not c.values[0].get("maximize")])
def test_maximize_equals_minimizing_the_negated_gradient(engine, config):
    pm, pn = make_params(24), make_params(24)
    o_m = FusionOptimizer(pm, lr=LR, maximize=True, **engine, **config)
    o_n = FusionOptimizer(pn, lr=LR, **engine, **config)
    for t in range(3):
        set_grads(pm, t)
        for a, b in zip(pn, pm):
            a.grad = -b.grad
        o_m.step()
        o_n.step()
    assert_same_run(pm, o_m, pn, o_n)


def test_maximize_goes_uphill(engine):
    params = make_params(25)
    targets = [torch.zeros(p.shape) for p in params]
    opt = FusionOptimizer(params, lr=0.05, maximize=True, Lambda=0.0, **engine)
    first = quadratic_loss(params, targets).item()
    for _ in range(10):
        opt.zero_grad()
        quadratic_loss(params, targets).backward()
        opt.step()
    assert quadratic_loss(params, targets).item() > first


MIXED_DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32]
MIXED_SHAPES = [(7, 5), (6,), (3, 4, 5), (), (1, 9), (9, 1), (2, 3, 2, 2), (300,), (40, 40)]


@pytest.mark.parametrize("config", CONFIG_PARAMS)
def test_results_do_not_depend_on_the_order_of_the_params(engine, config):
    shapes = MIXED_SHAPES
    base = make_params(27, shapes)
    base = [p.detach().to(MIXED_DTYPES[i % len(MIXED_DTYPES)]).requires_grad_() for i, p in enumerate(base)]
    order = list(range(len(base)))
    random.Random(5).shuffle(order)
    shuffled = [base[i].detach().clone().requires_grad_() for i in order]
    o_a = FusionOptimizer(base, lr=LR, **engine, **config)
    o_b = FusionOptimizer(shuffled, lr=LR, **engine, **config)
    for t in range(3):
        set_grads(base, t)
        for j, i in enumerate(order):
            shuffled[j].grad = base[i].grad.clone()
        o_a.step()
        o_b.step()
    assert_same_run([base[i] for i in order], o_a, shuffled, o_b)


def test_zero_grad_sets_grads_to_none_or_to_zeros(engine):
    params = make_params(28)
    opt = FusionOptimizer(params, lr=LR, **engine)
    set_grads(params, 0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
