"""``torch.compile(optimizer.step)``: it compiles once, does not recompile as the step count (or a tensor
learning rate) changes, and computes what the eager step computes.

The step count lives in a float32 tensor; under compilation ``beta_t`` is computed from it as a tensor,
never read out as a Python number (a Python number that changes every step would be baked into the graph
and force a recompile every step). The recompile counts use the ``eager`` and ``aot_eager`` backends:
they run Dynamo's capture and guards (where recompiles come from) without Inductor's C++ code generation,
which takes about a minute per graph on a 2-core CPU and would not change what is counted.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fusedbun import FusionOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:.*record_function.*:UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 2-D weights (SM3 accumulators) and 1-D biases and norm weights (dense second moment).
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5), torch.nn.LayerNorm(5))


def set_fresh_grads(models: list[torch.nn.Module], step: int) -> None:
    """The same fresh random gradients (never zeros) on every model's parameters."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
    for model in models:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()


def run_compiled(steps: int, backend: str, opt_kwargs: dict, *, schedule: bool = False):
    """Step a compiled and an eager optimizer side by side; return models, optimizers, frames per step."""
    compiled_model = make_model()
    eager_model = copy.deepcopy(compiled_model)
    compiled_opt = FusionOptimizer(compiled_model.parameters(), **opt_kwargs)
    eager_opt = FusionOptimizer(eager_model.parameters(), **opt_kwargs)
    scheds = []
    if schedule:
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (compiled_opt, eager_opt)]
    counter = CompileCounterWithBackend(backend)
    compiled_step = torch.compile(compiled_opt.step, backend=counter)
    frames = []
    for t in range(steps):
        set_fresh_grads([compiled_model, eager_model], t)
        compiled_step()
        eager_opt.step()
        for s in scheds:
            s.step()
        frames.append(counter.frame_count)
    return (compiled_model, compiled_opt), (eager_model, eager_opt), frames


def assert_same_training(compiled, eager, *, rtol: float, atol: float) -> None:
    (cm, co), (em, eo) = compiled, eager
    for pc, pe in zip(cm.parameters(), em.parameters()):
        torch.testing.assert_close(pc, pe, rtol=rtol, atol=atol)
        sc, se = co.state[pc], eo.state[pe]
        assert sc["step"].item() == se["step"].item()
        hc, he = sc["exp_hessian"], se["exp_hessian"]
        for a, b in zip(hc if isinstance(hc, list) else [hc], he if isinstance(he, list) else [he]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        if "momentum_buffer" in se:
            torch.testing.assert_close(sc["momentum_buffer"], se["momentum_buffer"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("foreach", [None, False], ids=["default-engine", "reference-engine"])
def test_compiled_step_compiles_once_and_never_recompiles(foreach):
    compiled, eager, frames = run_compiled(6, "eager", dict(lr=1e-2, foreach=foreach))
    # One graph; the second step (state now exists) may not add any, nor may the steps after it.
    assert frames[0] >= 1
    assert frames[-1] == frames[0], f"graphs compiled after each step: {frames}"
    assert_same_training(compiled, eager, rtol=1e-6, atol=1e-7)


def test_tensor_learning_rate_changed_every_step_never_recompiles():
    compiled, eager, frames = run_compiled(6, "eager", dict(lr=torch.tensor(1e-2)), schedule=True)
    assert frames[-1] == frames[0], f"graphs compiled after each step: {frames}"
    assert_same_training(compiled, eager, rtol=1e-6, atol=1e-7)


def test_float_learning_rate_schedule_recompiles_at_most_once():
    # A float lr read from the param group is specialized on its first value; when it changes, Dynamo
    # marks it dynamic and recompiles once. After that no step compiles anything.
    compiled, eager, frames = run_compiled(7, "eager", dict(lr=1e-2), schedule=True)
    assert frames[-1] - frames[0] <= 2, f"graphs compiled after each step: {frames}"
    assert frames[-1] == frames[2], f"graphs compiled after each step: {frames}"
    assert_same_training(compiled, eager, rtol=1e-6, atol=1e-7)


def test_compiled_step_matches_eager_through_aot_autograd():
    # aot_eager functionalizes the in-place updates and decomposes the ops, as Inductor would see them.
    opts = dict(lr=3e-2, centralize=True, use_rms=True, maximize=True, momentum_dtype=torch.bfloat16, Lambda=0.1)
    compiled, eager, frames = run_compiled(4, "aot_eager", opts)
    assert frames[-1] == frames[0], f"graphs compiled after each step: {frames}"
    assert_same_training(compiled, eager, rtol=1e-5, atol=1e-6)


def test_default_step_compiles_as_one_full_graph_and_masks_a_nan():
    # nonfinite="mask" (the default) needs no check before the engines, so nothing breaks the graph:
    # fullgraph=True raises on any graph break. A NaN entry is masked inside the graph as in eager mode.
    model = make_model()
    opt = FusionOptimizer(model.parameters(), lr=1e-2, use_rms=True)
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    eager_model = copy.deepcopy(model)
    eager_opt = FusionOptimizer(eager_model.parameters(), lr=1e-2, use_rms=True)
    for t in range(4):
        set_fresh_grads([model, eager_model], t)
        if t == 3:
            for m in (model, eager_model):
                m[0].weight.grad[1, 2] = float("nan")
        step()
        with pytest.warns(RuntimeWarning, match="non-finite") if t == 3 else contextlib.nullcontext():
            eager_opt.step()
    assert counter.frame_count == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_same_training((model, opt), (eager_model, eager_opt), rtol=1e-6, atol=1e-7)


def test_skip_mode_still_compiles_with_its_check_outside_the_graph():
    # nonfinite="skip" reads the gradients' verdict on the host: a graph break, outside any loop.
    compiled, eager, frames = run_compiled(4, "eager", dict(lr=1e-2, nonfinite="skip"))
    assert frames[-1] == frames[1], f"graphs compiled after each step: {frames}"
    assert_same_training(compiled, eager, rtol=1e-6, atol=1e-7)


# cover="factored": its means are fp32 sums, so eager and compiled agree to fp32 rounding. cover="dense" with a
# bf16 second moment: its stochastic rounding takes keys from the step counts as tensors under torch.compile
# (no .item()), and a bf16 v may differ by one unit on rare elements, as between engines.
COVER_CASES = {
    "factored": (dict(cover="factored"), dict(rtol=1e-5, atol=1e-7)),
    "dense-bf16": (dict(cover="dense", hessian_dtype=torch.bfloat16), dict(rtol=1e-2, atol=1e-6)),
}


@pytest.mark.parametrize("case", list(COVER_CASES))
@pytest.mark.parametrize("foreach", [None, False], ids=["default-engine", "reference-engine"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_cover_compiles_as_one_graph_that_never_recompiles(case, foreach, backend):
    # The cover is a hyperparameter like the others: one full graph, no recompiles as the step count grows
    # (run first in its process, this also catches a global first set inside the traced step), and the
    # eager step's numbers.
    options, tolerance = COVER_CASES[case]
    opts = dict(lr=1e-2, use_rms=True, foreach=foreach, **options)
    compiled, eager, frames = run_compiled(5, backend, opts)
    assert frames[0] >= 1
    assert frames[-1] == frames[0], f"graphs compiled after each step: {frames}"
    assert_same_training(compiled, eager, **tolerance)
    model = make_model()
    opt = FusionOptimizer(model.parameters(), **opts)
    step = torch.compile(opt.step, backend="eager", fullgraph=True)  # raises on any graph break
    for t in range(2):
        set_fresh_grads([model], t)
        step()
