"""The step inside backward: ``fusedbun.step_in_backward(optimizer, *, accumulation_steps=1,
max_norm_per_param=None) -> handle``.

Written from the specification, before the implementation. The helper registers post-accumulate-grad hooks
on every parameter of the optimizer; during ``loss.backward()`` each parameter is stepped (same rule, state
and engine as ``optimizer.step()``) as soon as its gradient is accumulated, and its ``.grad`` is set to
``None``. The loop calls ``loss.backward()`` and ``scheduler.step()``, never ``optimizer.step()`` or
``zero_grad()``. In fp32 on CPU the result must be bit-identical, step for step, to the plain loop
``backward(); step(); zero_grad()``: with each engine, an LR scheduler, several param groups, gradient
accumulation and a save/resume in the middle. Under data parallelism (a process group of more than one
rank, or DTensor parameters) it refuses with a RuntimeError that names DDP/FSDP2.
"""

from __future__ import annotations

import copy
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import assert_tree_equal, launch
from torch import nn

import fusedbun

STEPS = 5
BATCH = 4
LR = 0.02


class Net(nn.Module):
    """Conv1d -> Linear -> LayerNorm -> Linear, times a 0-D scale: 0-D, 1-D, 2-D and 3-D parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.fc1 = nn.Linear(3 * 6, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.scale * self.fc2(self.norm(torch.tanh(self.fc1(h))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def make_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 2, 8, generator=gen), torch.randn(BATCH, 2, generator=gen)) for _ in range(n)]


def loss_of(net, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(net(x), y)


def groups_of(net: Net, mode: str) -> list:
    """The param layouts the tests use: one group, or three groups with different hyperparameters (the
    last one takes the top-level lr)."""
    if mode == "one group":
        return list(net.parameters())
    return [
        {"params": [net.conv.weight, net.fc1.weight], "lr": 0.03, "use_rms": True, "centralize": True},
        {"params": [net.conv.bias, net.fc1.bias, net.norm.weight, net.norm.bias], "Lambda": 0.0, "momentum_beta": 0.5},
        {"params": [net.fc2.weight, net.fc2.bias, net.scale], "eps": 1e-6},
    ]


def make_opt(net, mode, engine, **extra):
    return fusedbun.FusionOptimizer(groups_of(net, mode), lr=LR, **engine, **extra)


def make_scheduler(opt):
    """Per-group schedules that change the lr at every step."""
    lambdas = [lambda s: 0.9**s, lambda s: 1.0 / (1 + s), lambda s: 1.0 if s % 2 == 0 else 0.5][: len(opt.param_groups)]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def plain_step(net, opt, sched, micro_batches) -> None:
    for batch in micro_batches:
        loss_of(net, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()


def backward_step(net, sched, micro_batches) -> None:
    for batch in micro_batches:
        loss_of(net, batch).backward()
    if sched is not None:
        sched.step()


def assert_same_params(net_a, net_b, where="") -> None:
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a.detach(), b.detach()), f"{where}{name} differs"


def assert_same_training(net_a, opt_a, net_b, opt_b, where="") -> None:
    assert_same_params(net_a, net_b, where)
    assert_tree_equal(opt_a.state_dict(), opt_b.state_dict(), f"{where}state_dict")


# ----------------------------------------------------------------------------------------------------
# Equivalence with the plain loop


@pytest.mark.parametrize("mode", ["one group", "three groups"], ids=["one-group", "three-groups"])
def test_step_in_backward_equals_the_plain_optimizer_step_for_step(engine, mode):
    """With an LR scheduler that changes every group's lr at every step."""
    batches = make_batches(STEPS)
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a, mode, engine), make_opt(net_b, mode, engine)
    sched_a, sched_b = make_scheduler(opt_a), make_scheduler(opt_b)
    handle = fusedbun.step_in_backward(opt_b)
    for i, batch in enumerate(batches):
        plain_step(net_a, opt_a, sched_a, [batch])
        backward_step(net_b, sched_b, [batch])
        assert_same_training(net_a, opt_a, net_b, opt_b, f"step {i + 1}: ")
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
    handle.remove()


def test_gradients_are_freed_during_backward():
    net = make_net()
    opt = make_opt(net, "one group", {})
    before = [p.detach().clone() for p in net.parameters()]
    fusedbun.step_in_backward(opt)
    loss_of(net, make_batches(1)[0]).backward()
    assert all(p.grad is None for p in net.parameters()), "every .grad is None after backward"
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, net.parameters())), "every parameter moved"
    assert all(opt.state[p]["step"].item() == 1 for p in net.parameters())


def test_each_parameter_is_stepped_while_backward_is_still_running():
    """When the gradient reaches the conv layer's output, the last layer's parameters (whose gradients were
    complete earlier) are already stepped and their gradients freed; the conv weight is not stepped yet."""
    net = make_net()
    opt = make_opt(net, "one group", {})
    fc2_before, conv_before = net.fc2.weight.detach().clone(), net.conv.weight.detach().clone()
    seen = {}

    def at_conv_output(grad):
        seen["fc2 stepped"] = not torch.equal(net.fc2.weight.detach(), fc2_before)
        seen["fc2 grad freed"] = net.fc2.weight.grad is None
        seen["conv not yet stepped"] = torch.equal(net.conv.weight.detach(), conv_before)

    def watch(module, args, out):
        out.register_hook(at_conv_output)  # returns None: the output is unchanged

    net.conv.register_forward_hook(watch)
    fusedbun.step_in_backward(opt)
    loss_of(net, make_batches(1)[0]).backward()
    assert seen == {"fc2 stepped": True, "fc2 grad freed": True, "conv not yet stepped": True}


def test_lr_scheduler_does_not_warn_that_optimizer_step_was_skipped():
    """The scheduler's "lr_scheduler.step() before optimizer.step()" warning would be false here: the
    parameters were stepped inside backward."""
    net = make_net()
    opt = make_opt(net, "one group", {})
    sched = make_scheduler(opt)
    fusedbun.step_in_backward(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in make_batches(2):
            backward_step(net, sched, [batch])
    assert not [w for w in caught if "optimizer.step()" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("mode", ["one group", "three groups"], ids=["one-group", "three-groups"])
def test_accumulation_over_two_micro_batches_equals_plain_training_on_their_summed_gradients(engine, mode):
    batches = make_batches(2 * 3, seed=2)
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a, mode, engine), make_opt(net_b, mode, engine)
    sched_a, sched_b = make_scheduler(opt_a), make_scheduler(opt_b)
    fusedbun.step_in_backward(opt_b, accumulation_steps=2)
    for i in range(3):
        first, second = batches[2 * i], batches[2 * i + 1]
        plain_step(net_a, opt_a, sched_a, [first, second])
        before = [p.detach().clone() for p in net_b.parameters()]
        loss_of(net_b, first).backward()
        # The first micro-batch only accumulates: nothing stepped, every gradient kept.
        for a, p in zip(before, net_b.parameters()):
            assert torch.equal(a, p.detach()) and p.grad is not None
        loss_of(net_b, second).backward()
        assert all(p.grad is None for p in net_b.parameters())
        sched_b.step()
        assert_same_training(net_a, opt_a, net_b, opt_b, f"step {i + 1}: ")


@pytest.mark.parametrize("value", [0, -1])
def test_accumulation_steps_below_one_are_refused(value):
    opt = make_opt(make_net(), "one group", {})
    with pytest.raises(ValueError, match="accumulation_steps"):
        fusedbun.step_in_backward(opt, accumulation_steps=value)


def test_resume_from_a_checkpoint_in_the_middle_continues_bit_for_bit(engine):
    """3 steps, a checkpoint (model, optimizer, scheduler), 3 more: a fresh model, optimizer, scheduler and
    handle loaded from the checkpoint end bit-identical to the run that never stopped, and to plain training;
    the checkpoint also resumes under the plain loop."""
    mode = "three groups"
    batches = make_batches(6, seed=3)
    net = make_net()
    opt = make_opt(net, mode, engine)
    sched = make_scheduler(opt)
    fusedbun.step_in_backward(opt)
    for batch in batches[:3]:
        backward_step(net, sched, [batch])
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    for batch in batches[3:]:
        backward_step(net, sched, [batch])

    def restored():
        n = make_net()
        n.load_state_dict(ckpt["model"])
        o = make_opt(n, mode, engine)
        s = make_scheduler(o)  # before loading: a new scheduler resets the groups' lr
        o.load_state_dict(ckpt["opt"])
        s.load_state_dict(ckpt["sched"])
        return n, o, s

    net_r, opt_r, sched_r = restored()
    fusedbun.step_in_backward(opt_r)
    for batch in batches[3:]:
        backward_step(net_r, sched_r, [batch])
    assert_same_training(net, opt, net_r, opt_r, "resumed in backward: ")

    net_p, opt_p, sched_p = restored()
    for batch in batches[3:]:
        plain_step(net_p, opt_p, sched_p, [batch])
    assert_same_training(net, opt, net_p, opt_p, "resumed plainly: ")

    net_0 = make_net()
    opt_0 = make_opt(net_0, mode, engine)
    sched_0 = make_scheduler(opt_0)
    for batch in batches:
        plain_step(net_0, opt_0, sched_0, [batch])
    assert_same_training(net, opt, net_0, opt_0, "never stopped, plain: ")


def test_parameters_without_gradient_are_not_stepped_as_in_the_plain_loop(engine):
    """An unused parameter and a frozen one (requires_grad=False) in the optimizer: no state, no change,
    and the others train exactly as in the plain loop."""

    def build():
        net = make_net()
        net.unused = nn.Parameter(torch.ones(3))
        net.fc1.weight.requires_grad_(False)
        return net

    batches = make_batches(3, seed=4)
    net_a, net_b = build(), build()
    opt_a, opt_b = (fusedbun.FusionOptimizer(n.parameters(), lr=LR, **engine) for n in (net_a, net_b))
    fusedbun.step_in_backward(opt_b)
    for batch in batches:
        plain_step(net_a, opt_a, None, [batch])
        backward_step(net_b, None, [batch])
    assert_same_training(net_a, opt_a, net_b, opt_b)
    assert net_b.unused not in opt_b.state and net_b.fc1.weight not in opt_b.state
    assert torch.equal(net_b.unused.detach(), torch.ones(3))


# ----------------------------------------------------------------------------------------------------
# The handle, and optimizer.step() while it is active


def test_optimizer_step_while_the_handle_is_active_raises_runtime_error():
    net = make_net()
    opt = make_opt(net, "one group", {})
    fusedbun.step_in_backward(opt)
    loss_of(net, make_batches(1)[0]).backward()
    with pytest.raises(RuntimeError):
        opt.step()


def test_after_remove_the_optimizer_is_a_plain_optimizer_again(engine):
    """2 steps in backward, remove(), 2 plain steps == 4 plain steps; after remove() backward leaves the
    gradients and the parameters alone."""
    batches = make_batches(4, seed=5)
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a, "three groups", engine), make_opt(net_b, "three groups", engine)
    handle = fusedbun.step_in_backward(opt_b)
    for batch in batches[:2]:
        plain_step(net_a, opt_a, None, [batch])
        backward_step(net_b, None, [batch])
    handle.remove()
    before = [p.detach().clone() for p in net_b.parameters()]
    loss_of(net_b, batches[2]).backward()
    assert all(p.grad is not None for p in net_b.parameters())
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, net_b.parameters()))
    opt_b.step()
    opt_b.zero_grad(set_to_none=True)
    plain_step(net_a, opt_a, None, [batches[2]])
    plain_step(net_a, opt_a, None, [batches[3]])
    plain_step(net_b, opt_b, None, [batches[3]])
    assert_same_training(net_a, opt_a, net_b, opt_b)


def test_as_a_context_manager_the_hooks_are_removed_when_the_block_ends():
    # Like torch's hook handles: `with step_in_backward(opt):` steps inside backward within the block only.
    net = make_net()
    opt = make_opt(net, "one group", {})
    batch = make_batches(1)[0]
    with fusedbun.step_in_backward(opt) as handle:
        assert isinstance(handle, fusedbun.StepInBackward)
        loss_of(net, batch).backward()
        assert all(p.grad is None for p in net.parameters())
    loss_of(net, batch).backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()  # a plain optimizer again: no RuntimeError


# ----------------------------------------------------------------------------------------------------
# Per-parameter clipping (global-norm clipping cannot work in this mode)


def test_max_norm_per_param_clips_each_gradient_to_that_norm_and_leaves_smaller_ones_alone(engine):
    """Parameters at zero and a linear loss (gradient = c exactly), lr = 1, no momentum, decay, RMS or mask:
    the step is exactly -clip(c), so the clipped gradient can be read off the parameter."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(4, 5), (7,), (2, 3, 2), ()]
    cs = [torch.randn(s, generator=gen) * 3 for s in shapes]
    cs[1] = cs[1] / cs[1].norm() * 0.05  # below the limit: untouched
    max_norm = 0.5
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = fusedbun.FusionOptimizer(
        params, lr=1.0, momentum_beta=0.0, Lambda=0.0, use_rms=False, eps=0.0, centralize=False, **engine
    )
    fusedbun.step_in_backward(opt, max_norm_per_param=max_norm)
    sum((p * c).sum() for p, c in zip(params, cs)).backward()
    for p, c in zip(params, cs):
        step = -p.detach()
        norm = c.norm().item()
        if norm <= max_norm:
            assert torch.equal(step, c), "a gradient within the limit is not scaled"
        else:
            q = nn.Parameter(torch.zeros_like(c))
            q.grad = c.clone()
            torch.nn.utils.clip_grad_norm_([q], max_norm)  # clip_grad_norm_ applied to this one tensor
            torch.testing.assert_close(step, q.grad, rtol=1e-5, atol=1e-7)
            assert step.norm().item() <= max_norm * (1 + 1e-5)


def test_max_norm_per_param_equals_plain_training_with_clip_grad_norm_of_each_parameter(engine):
    batches = make_batches(3, seed=7)
    max_norm = 0.05
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = make_opt(net_a, "three groups", engine), make_opt(net_b, "three groups", engine)
    fusedbun.step_in_backward(opt_b, max_norm_per_param=max_norm)
    clipped = 0
    for batch in batches:
        loss_of(net_a, batch).backward()
        for p in net_a.parameters():
            clipped += int(p.grad.norm() > max_norm)
            torch.nn.utils.clip_grad_norm_([p], max_norm)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        backward_step(net_b, None, [batch])
    assert clipped > 0, "harness: some gradients exceed the limit"
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)


def test_docstring_says_global_norm_clipping_is_impossible_and_what_to_use_and_what_ddp_fsdp2_do():
    doc = fusedbun.step_in_backward.__doc__ or ""
    assert "global" in doc.lower() and "max_norm_per_param" in doc
    assert "DDP" in doc and "FSDP2" in doc
    assert "accumulation_steps" in doc


# ----------------------------------------------------------------------------------------------------
# Data parallelism: refused (gradients are not yet reduced when the hooks fire). One 2-rank gloo job.

_HAS_GLOO = dist.is_available() and dist.is_gloo_available()


def _outcome(fn) -> dict:
    """What fn() did: {"ok": True} or the exception it raised."""
    try:
        fn()
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": exc}


def refusal_job(rank: int, world: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}

    def plain_params_in_a_group_of_two():
        fusedbun.step_in_backward(fusedbun.FusionOptimizer(make_net().parameters(), lr=LR))

    def ddp():
        net = DDP(make_net())
        fusedbun.step_in_backward(fusedbun.FusionOptimizer(net.parameters(), lr=LR))

    def fsdp2():
        mesh = init_device_mesh("cpu", (world,))
        net = make_net()
        net.scale = nn.Parameter(torch.tensor([1.5]))  # fully_shard refuses 0-D parameters
        for module in (net.conv, net.fc1, net.fc2):
            fully_shard(module, mesh=mesh)
        fully_shard(net, mesh=mesh)
        fusedbun.step_in_backward(fusedbun.FusionOptimizer(net.parameters(), lr=LR))

    results["group of two"] = _outcome(plain_params_in_a_group_of_two)
    results["DDP"] = _outcome(ddp)
    results["FSDP2"] = _outcome(fsdp2)
    dist.barrier()
    dist.destroy_process_group()

    # Each process alone in a group of one: plain parameters work, DTensor parameters are refused.
    dist.init_process_group("gloo", init_method=f"{init_method}-alone-{rank}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))

    def plain_params_alone():
        net = make_net()
        opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR)
        fusedbun.step_in_backward(opt)
        loss_of(net, make_batches(1)[0]).backward()
        assert all(p.grad is None for p in net.parameters()), "not stepped in backward"

    def dtensor_alone():
        p = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        fusedbun.step_in_backward(fusedbun.FusionOptimizer([p], lr=LR))

    results["alone, plain"] = _outcome(plain_params_alone)
    results["alone, DTensor"] = _outcome(dtensor_alone)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"refusal-rank{rank}.pt"))


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    if not _HAS_GLOO:
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("step_in_backward_refusals")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        launch(refusal_job, 2, out, str(out))
    return [torch.load(out / f"refusal-rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_refused(outcome: dict, names: tuple[str, ...]) -> None:
    assert not outcome["ok"], "step_in_backward accepted it"
    exc = outcome["error"]
    if not isinstance(exc, RuntimeError):
        raise exc
    assert any(n in str(exc) for n in names), f"the message names none of {names}: {exc}"


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["group of two", "DDP", "FSDP2"], ids=["process-group", "ddp", "fsdp2"])
def test_under_a_two_process_group_it_refuses_with_runtime_error_naming_ddp_fsdp2(refusals, case):
    for rank in range(2):
        _assert_refused(refusals[rank][case], ("DDP", "FSDP2"))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_dtensor_parameters_are_refused_even_in_a_group_of_one(refusals):
    for rank in range(2):
        _assert_refused(refusals[rank]["alone, DTensor"], ("FSDP2", "DDP"))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_plain_parameters_in_a_group_of_one_work(refusals):
    for rank in range(2):
        outcome = refusals[rank]["alone, plain"]
        if not outcome["ok"]:
            raise outcome["error"]
