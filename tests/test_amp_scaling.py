"""Two ``torch.optim`` contract gaps on the memory path of mixed precision.

Written from the specification, before the implementation:

(a) GradScaler: ``FusionOptimizer._step_supports_amp_scaling`` is True, so ``scaler.step(opt)`` hands the
    optimizer ``grad_scale`` and ``found_inf`` (as torch's fused AdamW takes them) and the engine unscales
    and checks inside its one pass. The result equals unscaling the gradients by hand (divide by the scale)
    and calling ``opt.step()``, bit for bit when the scale is a power of two and nothing overflows; with an
    Inf/NaN in the scaled gradients the step is skipped entirely (parameters, state, step counts) and the
    scaler lowers its scale; ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` does not unscale twice.
(b) ``lr``: param groups that each carry their own ``lr`` need no top-level ``lr`` (torch's ``required``
    semantics: no default; the error names ``lr`` and the group that lacks one).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from helpers import assert_tree_equal
from torch import nn

import fusedbun

SCALE = 2.0**12
STEPS = 4
CUDA = torch.cuda.is_available()
# One step is exactly p - lr * g in this regime (lr a power of two): lets a test read the step off.
EXACT = dict(momentum_beta=0.0, Lambda=0.0, use_rms=False, eps=0.0, centralize=False)


def make_net(device="cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).to(device)


def make_batches(n: int, device="cpu", seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 6, generator=gen).to(device), torch.randn(5, 3, generator=gen).to(device)) for _ in range(n)
    ]


def loss_of(net, batch):
    x, y = batch
    return nn.functional.mse_loss(net(x), y)


def make_opt(params, engine, **extra):
    return fusedbun.FusionOptimizer(params, lr=0.01, use_rms=True, **engine, **extra)


def make_scaler(device="cpu", scale=SCALE):
    # growth_interval: the scale stays put while nothing overflows (the tests control every change).
    return torch.amp.GradScaler(device, init_scale=scale, growth_interval=10**6)


def scaler_step(net, opt, scaler, batch, *, unscale_first=False, clip=None, poison=None) -> None:
    scaler.scale(loss_of(net, batch)).backward()
    if poison is not None:
        poison(net)
    if unscale_first:
        scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def manual_step(net, opt, batch, scale, *, clip=None) -> None:
    """The reference: scaled backward, gradients divided by the scale by hand, then a plain step."""
    (loss_of(net, batch) * scale).backward()
    for p in net.parameters():
        p.grad.div_(scale)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def assert_same_training(net_a, opt_a, net_b, opt_b, where="") -> None:
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a.detach(), b.detach()), f"{where}{name} differs"
    assert_tree_equal(opt_a.state_dict(), opt_b.state_dict(), f"{where}state_dict")


def poison_with(value: float):
    def poison(net):
        net[3].bias.grad[1] = value  # one entry of one parameter's gradient

    return poison


# ----------------------------------------------------------------------------------------------------
# (a) GradScaler


def test_fusion_optimizer_declares_step_supports_amp_scaling(engine):
    assert getattr(fusedbun.FusionOptimizer, "_step_supports_amp_scaling", False) is True
    opt = fusedbun.FusionOptimizer([nn.Parameter(torch.randn(3))], lr=0.1, **engine)
    assert opt._step_supports_amp_scaling is True


def test_optimizer_reads_grad_scale_and_found_inf_like_torch_fused_adamw(engine):
    """The protocol GradScaler.step uses for such optimizers: the attributes ``grad_scale`` (None after
    ``unscale_``) and ``found_inf`` (a 0-D fp32 tensor, nonzero to skip) are set around ``step()``."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(4, 5), (7,), ()]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]

    def run(grad_scale, found_inf, grad_factor):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = make_opt(params, engine)
        for p, g in zip(params, grads):  # a first plain step, so that there is state to keep
            p.grad = g.clone()
        opt.step()
        before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g * grad_factor
        opt.grad_scale, opt.found_inf = grad_scale, found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        return params, opt, before

    ref_params, ref_opt, _ = run(None, torch.tensor(0.0), 1.0)  # found_inf 0, nothing to unscale
    got_params, got_opt, _ = run(torch.tensor(SCALE), torch.tensor(0.0), SCALE)
    for a, b in zip(ref_params, got_params):
        assert torch.equal(a.detach(), b.detach()), "grad_scale is not divided out"
    assert_tree_equal(ref_opt.state_dict(), got_opt.state_dict())

    skipped_params, skipped_opt, (state_before, params_before) = run(torch.tensor(SCALE), torch.tensor(1.0), SCALE)
    for a, b in zip(params_before, skipped_params):
        assert torch.equal(a, b.detach()), "found_inf did not skip the step"
    assert_tree_equal(state_before, skipped_opt.state_dict())


def test_grad_scaler_step_equals_unscaling_by_hand_then_step(engine):
    batches = make_batches(STEPS)
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a.parameters(), engine), make_opt(net_b.parameters(), engine)
    scaler = make_scaler()
    for i, batch in enumerate(batches):
        scaler_step(net_a, opt_a, scaler, batch)
        manual_step(net_b, opt_b, batch, SCALE)
        assert scaler.get_scale() == SCALE, "harness: nothing overflowed"
        assert_same_training(net_a, opt_a, net_b, opt_b, f"step {i + 1}: ")


def fp16_problem(gen):
    """fp16 parameters (and one fp32) with a linear loss: the gradient is c exactly, the scaled gradient
    c * scale exactly (|c| < 8, so c * 2**12 stays far below fp16's largest value)."""
    shapes = [(6, 5), (9,), (2, 3, 4), ()]
    init = [torch.randn(s, generator=gen).half() for s in shapes] + [torch.randn(4, generator=gen)]
    cs = [(torch.randn(t.shape, generator=gen).clamp(-7.9, 7.9)).to(t.dtype) for t in init]
    return init, cs


def linear_loss(params, cs):
    return sum((p.float() * c.float()).sum() for p, c in zip(params, cs))


def test_grad_scaler_with_fp16_parameters_equals_unscaling_by_hand(engine):
    """fp16 training: GradScaler unscales fp16 gradients only through an optimizer that takes grad_scale
    (its own unscale_ refuses fp16 gradients)."""
    init, cs = fp16_problem(torch.Generator().manual_seed(3))
    params_a = [nn.Parameter(t.clone()) for t in init]
    params_b = [nn.Parameter(t.clone()) for t in init]
    opt_a, opt_b = make_opt(params_a, engine), make_opt(params_b, engine)
    scaler = make_scaler()
    for step in range(3):
        scaler.scale(linear_loss(params_a, cs)).backward()
        assert torch.equal(params_a[0].grad, cs[0] * SCALE), "harness: the scaled fp16 gradient is exact"
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad(set_to_none=True)
        for p, c in zip(params_b, cs):
            p.grad = c.clone()
        opt_b.step()
        assert scaler.get_scale() == SCALE
        for k, (a, b) in enumerate(zip(params_a, params_b)):
            assert torch.equal(a.detach(), b.detach()), f"step {step + 1}, parameter {k}"
        assert_tree_equal(opt_a.state_dict(), opt_b.state_dict())


def test_fp16_gradients_that_overflow_skip_the_step_and_lower_the_scale(engine):
    init, cs = fp16_problem(torch.Generator().manual_seed(4))
    params = [nn.Parameter(t.clone()) for t in init]
    opt = make_opt(params, engine)
    scaler = make_scaler(scale=2.0**16)  # c * 2**16 overflows fp16 for |c| >= 1
    scaler.scale(linear_loss(params, cs)).backward()
    assert torch.isinf(params[0].grad).any(), "harness: the scaled gradient overflows"
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    for p, t in zip(params, init):
        assert torch.equal(p.detach(), t)
    assert all(opt.state[p].get("step", torch.tensor(0.0)).item() == 0 for p in params)
    assert scaler.get_scale() == 2.0**15


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_found_inf_skips_the_step_entirely_and_lowers_the_scale(engine, bad):
    """2 steps, then a step whose scaled gradients hold a non-finite entry: parameters, state and step
    counts unchanged and the scale halved; the next step equals a run that never saw that batch."""
    batches = make_batches(4, seed=5)
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a.parameters(), engine), make_opt(net_b.parameters(), engine)
    scaler = make_scaler()
    for batch in batches[:2]:
        scaler_step(net_a, opt_a, scaler, batch)
        manual_step(net_b, opt_b, batch, SCALE)
    params_before = [p.detach().clone() for p in net_a.parameters()]
    state_before = copy.deepcopy(opt_a.state_dict())
    scaler_step(net_a, opt_a, scaler, batches[2], poison=poison_with(bad))
    for a, p in zip(params_before, net_a.parameters()):
        assert torch.equal(a, p.detach()), "a parameter changed in the skipped step"
    assert_tree_equal(state_before, opt_a.state_dict(), "state after the skipped step")
    assert scaler.get_scale() == SCALE / 2
    scaler_step(net_a, opt_a, scaler, batches[3])
    manual_step(net_b, opt_b, batches[3], SCALE / 2)
    assert_same_training(net_a, opt_a, net_b, opt_b, "after the skipped step: ")


def test_unscale_before_step_with_clipping_does_not_unscale_twice(engine):
    batches = make_batches(STEPS, seed=6)
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a.parameters(), engine), make_opt(net_b.parameters(), engine)
    scaler = make_scaler()
    for i, batch in enumerate(batches):
        scaler_step(net_a, opt_a, scaler, batch, unscale_first=True, clip=0.1)
        manual_step(net_b, opt_b, batch, SCALE, clip=0.1)
        assert_same_training(net_a, opt_a, net_b, opt_b, f"step {i + 1}: ")


def test_unscale_before_step_still_skips_a_step_with_inf(engine):
    batches = make_batches(3, seed=7)
    net = make_net()
    opt = make_opt(net.parameters(), engine)
    scaler = make_scaler()
    scaler_step(net, opt, scaler, batches[0], unscale_first=True)
    params_before = [p.detach().clone() for p in net.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    scaler_step(net, opt, scaler, batches[1], unscale_first=True, poison=poison_with(math.inf))
    for a, p in zip(params_before, net.parameters()):
        assert torch.equal(a, p.detach())
    assert_tree_equal(state_before, opt.state_dict())
    assert scaler.get_scale() == SCALE / 2


CUDA_ENGINES = [
    pytest.param({"foreach": False}, id="single"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"fused": True}, id="fused"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_engine", CUDA_ENGINES)
def test_grad_scaler_on_cuda_equals_unscaling_by_hand_and_skips_on_inf(cuda_engine):
    batches = make_batches(STEPS + 1, device="cuda")
    net_a, net_b = make_net("cuda"), make_net("cuda")
    opt_a, opt_b = make_opt(net_a.parameters(), cuda_engine), make_opt(net_b.parameters(), cuda_engine)
    scaler = make_scaler("cuda")
    for i, batch in enumerate(batches[:STEPS]):
        scaler_step(net_a, opt_a, scaler, batch)
        manual_step(net_b, opt_b, batch, SCALE)
        assert_same_training(net_a, opt_a, net_b, opt_b, f"step {i + 1}: ")
    params_before = [p.detach().clone() for p in net_a.parameters()]
    state_before = copy.deepcopy(opt_a.state_dict())
    scaler_step(net_a, opt_a, scaler, batches[STEPS], poison=poison_with(math.inf))
    for a, p in zip(params_before, net_a.parameters()):
        assert torch.equal(a, p.detach())
    assert_tree_equal(state_before, opt_a.state_dict())
    assert scaler.get_scale() == SCALE / 2
    init, cs = fp16_problem(torch.Generator().manual_seed(3))
    params = [nn.Parameter(t.clone().cuda()) for t in init]
    ref = [nn.Parameter(t.clone().cuda()) for t in init]
    opt, ref_opt = make_opt(params, cuda_engine), make_opt(ref, cuda_engine)
    scaler = make_scaler("cuda")
    scaler.scale(linear_loss(params, [c.cuda() for c in cs])).backward()
    scaler.step(opt)
    scaler.update()
    for p, c in zip(ref, cs):
        p.grad = c.clone().cuda()
    ref_opt.step()
    for a, b in zip(params, ref):
        assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------------------------------------
# (b) lr in the param groups, torch's `required` semantics


def two_params(seed=8):
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(4, 3, generator=gen)), nn.Parameter(torch.randn(5, generator=gen))


def test_groups_that_each_carry_lr_need_no_top_level_lr_and_each_uses_its_own(engine):
    a, b = two_params()
    opt = fusedbun.FusionOptimizer([{"params": [a], "lr": 0.125}, {"params": [b], "lr": 2.0**-7}], **EXACT, **engine)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 2.0**-7]
    gen = torch.Generator().manual_seed(9)
    ga, gb = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
    want_a, want_b = a.detach() - 0.125 * ga, b.detach() - 2.0**-7 * gb
    a.grad, b.grad = ga, gb
    opt.step()
    assert torch.equal(a.detach(), want_a) and torch.equal(b.detach(), want_b)


@pytest.mark.parametrize("missing", [0, 1, 2])
def test_a_group_without_lr_and_no_top_level_lr_raises_value_error_naming_lr_and_that_group(missing):
    params = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    groups = [{"params": [p], "lr": 0.1} for p in params]
    del groups[missing]["lr"]
    with pytest.raises(ValueError) as info:
        fusedbun.FusionOptimizer(groups)
    message = str(info.value)
    assert "lr" in message, message
    assert re.search(rf"\b{missing}\b", message), f"the message does not name group {missing}: {message}"


def test_no_lr_anywhere_raises_naming_lr():
    with pytest.raises((ValueError, TypeError), match="lr"):
        fusedbun.FusionOptimizer([nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="lr"):
        fusedbun.FusionOptimizer([{"params": [nn.Parameter(torch.randn(3))]}])


def test_add_param_group_without_lr_and_no_default_raises_naming_lr():
    a, b = two_params()
    opt = fusedbun.FusionOptimizer([{"params": [a], "lr": 0.1}])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [b]})
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_a_top_level_lr_is_still_the_default_for_groups_without_one():
    a, b = two_params()
    opt = fusedbun.FusionOptimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    c = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [c]})
    assert opt.param_groups[2]["lr"] == 0.1


def test_a_group_lr_is_still_validated_without_a_top_level_lr():
    a, b = two_params()
    with pytest.raises(ValueError, match="lr"):
        fusedbun.FusionOptimizer([{"params": [a], "lr": -1.0}, {"params": [b], "lr": 0.1}])


def test_state_dict_round_trip_keeps_each_groups_lr(engine):
    a, b = two_params()
    opt = fusedbun.FusionOptimizer([{"params": [a], "lr": 0.125}, {"params": [b], "lr": 0.25}], **engine)
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        a.grad, b.grad = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = fusedbun.FusionOptimizer([{"params": [a2], "lr": 1.0}, {"params": [b2], "lr": 1.0}], **engine)
    opt2.load_state_dict(saved)
    assert [g["lr"] for g in opt2.param_groups] == [0.125, 0.25]
    assert_tree_equal(opt.state_dict(), opt2.state_dict())
    ga, gb = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
    for (p, q), g in zip([(a, a2), (b, b2)], [ga, gb]):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(b.detach(), b2.detach())


def test_lr_scheduler_works_with_group_lrs_only():
    a, b = two_params()
    opt = fusedbun.FusionOptimizer([{"params": [a], "lr": 0.125}, {"params": [b], "lr": 0.25}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0625, 0.125]
