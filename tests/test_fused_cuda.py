"""The fused CUDA engine (``fusedbun/engines/fused_cuda.py``) and its Triton kernel (``triton_kernels.py``)
against the single-tensor reference (``foreach=False``).

The kernel runs in one of two ways, and each machine has one of them:

- compiled, on a CUDA device (``kernel_device == "cuda"``);
- under Triton's CPU interpreter (``kernel_device == "cpu"``): with ``TRITON_INTERPRET=1``, which
  ``tests/conftest.py`` sets before Triton is first imported on machines without CUDA, ``triton.jit``
  kernels run on CPU tensors, one program after the other, in NumPy. The optimizer routes CPU tensors to
  the C kernel, so the ``kernel_device`` fixture points the fused engine of the CPU at the Triton engine.
  The interpreter is slow: its shapes are smaller.

The tests parametrized by ``kernel_device`` run the same checks both ways (the other way is skipped with
its reason); the ones marked ``needs_gpu`` are about the compiled kernel on a device (the engine picked
by default, large tensors, step counts on the device, no host sync). Each comparison starts both
optimizers from the same parameters and state (the reference's, copied into the fused run's own
tensors), so that every step is compared on its own and a rounding difference in one step cannot grow
into a large one later.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest
import torch
from rule_check import STEP_SCALES, dtype_id, make_grad

from fusedbun import FusionOptimizer
from fusedbun.engines import dispatch, fused_cuda, select_engine
from fusedbun.engines.common import StepHyper, StepTensors
from fusedbun.engines.single_tensor import single_tensor_fusion
from fusedbun.optimizer import fusion
from fusedbun.sm3 import sm3_accumulators

REASON = fused_cuda.unavailable_reason()


def _interpreter_reason() -> str:
    if torch.cuda.is_available():
        return "a CUDA device is present: the kernel runs compiled here (the compiled-cuda cases)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 (tests/conftest.py sets it before Triton is first imported)"
    return fused_cuda._triton_import_error()


INTERPRETER_REASON = _interpreter_reason()


def needs_gpu(test):
    return pytest.mark.gpu(
        pytest.mark.skipif(bool(REASON), reason=f"the fused CUDA engine cannot run here: {REASON}")(test)
    )


pytestmark = [
    # The interpreter computes masked-out lanes too, in NumPy, which warns about NaN it then discards.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


@pytest.fixture(
    params=[
        pytest.param(
            "cuda",
            id="compiled-cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(bool(REASON), reason=f"the fused CUDA engine cannot run here: {REASON}"),
            ],
        ),
        pytest.param(
            "cpu",
            id="interpreted-cpu",
            marks=pytest.mark.skipif(
                bool(INTERPRETER_REASON), reason=f"the Triton kernel is not interpreted here: {INTERPRETER_REASON}"
            ),
        ),
    ]
)
def kernel_device(request, monkeypatch) -> str:
    """The device the Triton kernel runs on here: "cuda" (compiled) or "cpu" (interpreted; then
    ``fused=True`` on CPU tensors steps them with the Triton engine instead of the C kernel)."""
    if request.param == "cpu":
        real = dispatch._fused_engine
        monkeypatch.setattr(
            dispatch,
            "_fused_engine",
            lambda device_type: (fused_cuda.fused_fusion, "") if device_type == "cpu" else real(device_type),
        )
    return request.param


def test_module_imports_and_reports_a_reason_without_triton(monkeypatch):
    # With triton unimportable the module still imports (Triton is imported lazily), says why it cannot
    # run, and the optimizer falls back to the multi-tensor engine. Runs on CPU-only machines too.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    try:
        importlib.reload(fused_cuda)
        reason = fused_cuda._triton_import_error()
        assert reason.startswith("Triton is not importable")
        assert fused_cuda.unavailable_reason() in (reason, "no CUDA device is available")
        assert select_engine("cuda", foreach=None, fused=None).__name__ == "foreach_fusion"
        with pytest.raises(RuntimeError, match="fused engine cannot run"):
            select_engine("cuda", foreach=None, fused=True)
    finally:
        monkeypatch.undo()
        importlib.reload(fused_cuda)


# 0-D to 5-D, odd sizes, zero-size tensors, size-1 dims, rows shorter than a block, several blocks
SHAPES = {
    "cuda": [
        (),
        (1,),
        (7,),
        (1000,),
        (4099,),
        (0,),
        (3, 0),
        (1, 1),
        (5, 37),
        (64, 64),
        (17, 1),
        (1, 300),
        (3, 4, 5),
        (2, 3, 4, 5),
        (8, 3, 3, 3),
        (6, 1, 7),
        (300, 513),
        (2, 3, 1, 4, 5),
    ],
    "cpu": [(), (1,), (7,), (1100,), (0,), (3, 0), (1, 1), (5, 37), (17, 1), (1, 300), (3, 4, 5), (2, 3, 4, 5)]
    + [(2, 3, 1, 2, 5)],
}
SMALL_SHAPES = {"cuda": [(), (7,), (5, 37), (3, 4, 5), (64, 64)], "cpu": [(), (7,), (5, 37), (3, 4, 5)]}

# (parameter dtype, momentum dtype)
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float32, torch.bfloat16, id="fp32-bf16m"),
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.float16, torch.float32, id="fp16-fp32m"),
]
HYPER = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(centralize=True, use_rms=True), id="centralize-rms"),
    pytest.param(dict(maximize=True, Lambda=0.0, eps=1e-3), id="maximize-nodecay-eps"),
    pytest.param(dict(momentum_beta=0.0, use_rms=True, beta_decay=0.5), id="nomomentum-rms"),
    pytest.param(dict(momentum_beta=0.6, centralize=True, maximize=True, Lambda=0.2), id="lowmomentum-all"),
]


def tolerance(dtype: torch.dtype) -> dict:
    # fp32: a few roundings apart (FMA contraction, the order of the row-mean sum). Low precision: one unit
    # in the last place of the stored value, when the fp32 value before rounding sits near a tie.
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=1e-6)
    return dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-4)


def copy_state(src: FusionOptimizer, dst: FusionOptimizer, src_params, dst_params) -> None:
    """Make dst's parameters and state equal to src's, in dst's own tensors."""
    with torch.no_grad():
        for ps, pd in zip(src_params, dst_params):
            pd.copy_(ps)
            ss, sd = src.state[ps], dst.state[pd]
            for key, value in ss.items():
                if isinstance(value, list):
                    for a, b in zip(value, sd[key]):
                        b.copy_(a)
                else:
                    sd[key].copy_(value)


def assert_same_state(ref, fused, ref_params, fused_params, *, what: str) -> None:
    for k, (pr, pf) in enumerate(zip(ref_params, fused_params)):
        where = f"{what}, parameter {k} of shape {tuple(pr.shape)}"
        torch.testing.assert_close(pf, pr, **tolerance(pr.dtype), msg=lambda m, where=where: f"{where}: {m}")
        sr, sf = ref.state.get(pr, {}), fused.state.get(pf, {})
        assert sr.keys() == sf.keys(), where
        for key in sr:
            a, b = sr[key], sf[key]
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, f"{where}: {key}"
                tol = tolerance(x.dtype) if key != "exp_hessian" else dict(rtol=3e-5, atol=1e-12)
                torch.testing.assert_close(y, x, **tol, msg=lambda m, where=where, key=key: f"{where}: {key}: {m}")


def run_side_by_side(
    shapes, dtype, momentum_dtype, hyper: dict, *, device: str, steps: int = 3, seed: int = 0, nonfinite=False
):
    """Step the reference and the fused engine on ``device`` side by side, each step from the same state.

    ``nonfinite``: at step 2 the first entries of every gradient with more than 3 are NaN, Inf and 2**70
    (masked); the reference's own non-finite warning is silenced, so only the fused run's can be seen."""
    gen = torch.Generator(device=device).manual_seed(seed)
    init = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fused_params = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = {"lr": 0.05, **hyper}
    ref = FusionOptimizer(ref_params, foreach=False, momentum_dtype=momentum_dtype, **hyper)
    fused = FusionOptimizer(fused_params, fused=True, momentum_dtype=momentum_dtype, **hyper)
    for t in range(steps):
        for pr, pf in zip(ref_params, fused_params):
            g = torch.randn(pr.shape, device=device, generator=gen) * 10.0 ** torch.randint(
                -3, 1, (), generator=gen, device=device
            )
            if nonfinite and g.numel() > 3 and t == 1:
                g.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 2.0**70], device=device)
            g = g.to(dtype)
            pr.grad, pf.grad = g.clone(), g.clone()
        if t > 0:
            copy_state(ref, fused, ref_params, fused_params)
        with warnings.catch_warnings():
            if nonfinite:
                warnings.simplefilter("ignore", RuntimeWarning)
            ref.step()
        fused.step()
        assert_same_state(ref, fused, ref_params, fused_params, what=f"step {t + 1}")
    return ref, fused, ref_params, fused_params


@needs_gpu
def test_fused_engine_is_selected_automatically_on_cuda():
    assert select_engine("cuda", foreach=None, fused=None) is fused_cuda.fused_fusion
    assert select_engine("cuda", foreach=None, fused=True) is fused_cuda.fused_fusion


@pytest.mark.parametrize("dtype, momentum_dtype", DTYPES)
@pytest.mark.parametrize("hyper", HYPER)
def test_matches_reference_across_dtypes_and_hyperparameters(kernel_device, dtype, momentum_dtype, hyper):
    run_side_by_side(SMALL_SHAPES[kernel_device], dtype, momentum_dtype, hyper, device=kernel_device)


@pytest.mark.parametrize("hyper", [HYPER[0], HYPER[1]])
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(prefetch=False), id="load-then-work"),
        pytest.param(dict(prefetch=True, direct_launch=False), id="prefetch-next-rows-through-dispatch"),
        pytest.param(dict(prefetch=True, direct_launch=True), id="prefetch-next-rows-direct-launch"),
    ],
)
def test_matches_reference_on_many_shapes(kernel_device, hyper, config, monkeypatch):
    # 0-D to 5-D, odd sizes, zero-size tensors, size-1 dims, rows shorter than a block, several blocks;
    # both ways the kernel can walk its rows, and launches through Triton's dispatch or, after the first
    # step, past it (the interpreter has no compiled kernel to launch directly: there both are the dispatch).
    if kernel_device == "cpu" and config.get("direct_launch") is True:
        pytest.skip("the interpreter launches through Triton's dispatch only: the case above covers it")
    config = fused_cuda.KernelConfig(**{**fused_cuda.CONFIG.as_dict(), **config})
    monkeypatch.setattr(fused_cuda, "CONFIG", config)
    steps = 4 if kernel_device == "cuda" else 2
    run_side_by_side(SHAPES[kernel_device], torch.float32, None, hyper, device=kernel_device, steps=steps)


def test_masks_nonfinite_entries_like_the_reference_and_warns(kernel_device):
    # On CUDA the warning comes at a later step (the flags reach the host without a sync): the comparison
    # after step 2 waits for the device, so step 3 reports it.
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run_side_by_side([(9,), (6, 11)], torch.float32, None, dict(use_rms=True), device=kernel_device, nonfinite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_the_mask_is_strict_at_eps_like_the_reference(kernel_device, dtype):
    # Gradients with exact zeros, entries below eps and entries exactly at +-eps (eps = 1/64 is exact in
    # every dtype): |g| == eps is masked. A kept entry would show in the second moment (g**2 instead of
    # the carried-over value) far above the tolerance.
    eps = 1 / 64
    gen = torch.Generator().manual_seed(11)
    shapes = [(7,), (5, 37), (3, 4, 5)]
    init = [torch.randn(s, generator=gen).to(dtype).to(kernel_device) for s in shapes]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fused_params = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = dict(lr=0.05, eps=eps, use_rms=True, centralize=False)
    ref = FusionOptimizer(ref_params, foreach=False, **hyper)
    fused = FusionOptimizer(fused_params, fused=True, **hyper)
    for t, scale in enumerate(STEP_SCALES):
        for pr, pf in zip(ref_params, fused_params):
            g = make_grad(pr.shape, gen, eps, scale)
            g.view(-1)[t : t + 2] = torch.tensor([eps, -eps], dtype=g.dtype)  # at least two at the threshold
            g = g.to(dtype).to(kernel_device)
            pr.grad, pf.grad = g.clone(), g.clone()
        if t > 0:
            copy_state(ref, fused, ref_params, fused_params)
        ref.step()
        fused.step()
        assert_same_state(ref, fused, ref_params, fused_params, what=f"step {t + 1}")


@needs_gpu
@pytest.mark.parametrize("dtype, momentum_dtype", [DTYPES[1], DTYPES[2]])
def test_matches_reference_on_large_tensors(dtype, momentum_dtype):
    # Many tiles per tensor; one row length a multiple of 16 (16-byte accesses), one not.
    run_side_by_side(
        [(2048, 1024), (1536, 1029), (4096,)], dtype, momentum_dtype, dict(centralize=True), device="cuda", steps=2
    )


def test_misaligned_and_fallback_layouts_match_reference(kernel_device):
    # In the fused run: a parameter that starts 4 bytes into its storage (its accesses cannot be 16 bytes
    # wide), and tensors the kernel does not take, stepped by the multi-tensor engine inside the fused call:
    # fp64, non-contiguous (transposed), and 7 dims (past the kernel's 6).
    dev = kernel_device
    gen = torch.Generator(device=dev).manual_seed(3)
    values = [
        torch.randn(40, 48, device=dev, generator=gen),
        torch.randn(9, 11, device=dev, generator=gen, dtype=torch.float64),
        torch.randn(10, 12, device=dev, generator=gen),
        torch.randn(2, 1, 2, 3, 1, 2, 2, device=dev, generator=gen),
    ]
    storage = torch.empty(4 + 40 * 48, device=dev)
    start = next(i for i in range(4) if (storage.data_ptr() + 4 * i) % 16 == 4)
    misaligned = storage[start : start + 40 * 48].view(40, 48).copy_(values[0])
    transposed = torch.empty(12, 10, device=dev).t().copy_(values[2])
    fused_params = [torch.nn.Parameter(t) for t in (misaligned, values[1].clone(), transposed, values[3].clone())]
    ref_params = [torch.nn.Parameter(v.clone()) for v in values]
    assert fused_params[0].data_ptr() % 16 == 4 and not fused_params[2].is_contiguous()
    ref = FusionOptimizer(ref_params, lr=0.1, foreach=False, centralize=True)
    fused = FusionOptimizer(fused_params, lr=0.1, fused=True, centralize=True)
    for t in range(3):
        for pr, pf in zip(ref_params, fused_params):
            g = torch.randn(pr.shape, device=dev, generator=gen, dtype=pr.dtype)
            pr.grad, pf.grad = g.clone(), g.clone()
        ref.step()
        fused.step()
        assert_same_state(ref, fused, ref_params, fused_params, what=f"step {t + 1}")


def make_engine_inputs(
    shapes, *, dtype, grad_dtype, momentum_dtype, gen, steps_at: list[float], device: str, dense_v=None
):
    """Inputs of the functional step; ``dense_v`` (a dtype) gives every tensor a dense v of it (cover="dense")."""
    params, grads, bufs, hess, steps = [], [], [], [], []
    for s, count in zip(shapes, steps_at):
        p = torch.randn(s, device=device, generator=gen).to(dtype)
        params.append(p)
        grads.append(torch.randn(s, device=device, generator=gen).to(grad_dtype))
        bufs.append(
            None if momentum_dtype is None else (0.1 * torch.randn(s, device=device, generator=gen)).to(momentum_dtype)
        )
        if dense_v is not None:
            hess.append(torch.rand(s, device=device, generator=gen).to(dense_v))
        elif p.dim() <= 1:
            hess.append(torch.rand(s, device=device, generator=gen))
        else:
            hess.append([a.copy_(torch.rand(a.shape, device=device, generator=gen)) for a in sm3_accumulators(p)])
        steps.append(torch.tensor(count))
    return params, grads, bufs, hess, steps


def clone_inputs(inputs):
    def c(x):
        if x is None:
            return None
        return [a.clone() for a in x] if isinstance(x, list) else x.clone()

    return [[c(x) for x in seq] for seq in inputs]


def assert_inputs_close(a, b):
    """Parameters, momenta and second moments close; the gradients (inputs) untouched; the same step counts."""
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(gb, ga, rtol=0, atol=0, equal_nan=True)
    for seq_a, seq_b in (pair for k, pair in enumerate(zip(a[:4], b[:4])) if k != 1):
        for x, y in zip(seq_a, seq_b):
            for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                if u is not None:
                    torch.testing.assert_close(v, u, **tolerance(u.dtype))
    assert [s.item() for s in a[4]] == [s.item() for s in b[4]]


HYPER_ALL = dict(
    lr=0.03, eps=1e-2, beta_decay=0.8, Lambda=0.05, momentum_beta=0.9, centralize=True, use_rms=True, maximize=False
)


@pytest.mark.parametrize(
    "dtype, grad_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
    ids=["fp32", "bf16-fp32g", "fp32-fp16g"],
)
def test_gradients_of_another_dtype_per_tensor_step_counts_and_flags(kernel_device, dtype, grad_dtype):
    # The functional entry point allows gradients in another dtype than the parameter; the tensors are at
    # different step counts, so each has its own beta_t (one launch still serves them all); one gradient
    # holds a NaN, masked and flagged by the kernel itself.
    gen = torch.Generator(device=kernel_device).manual_seed(5)
    shapes = [(33, 48), (33, 48), (10,), (4, 5, 6)]
    inputs = make_engine_inputs(
        shapes,
        dtype=dtype,
        grad_dtype=grad_dtype,
        momentum_dtype=torch.float32,
        gen=gen,
        steps_at=[0.0, 7.0, 2.0, 40.0],
        device=kernel_device,
    )
    inputs[1][1].view(-1)[3] = float("nan")
    ref, fused = clone_inputs(inputs), clone_inputs(inputs)
    single_tensor_fusion(StepTensors(*ref), StepHyper(**HYPER_ALL))
    flags = fusion(*fused, **HYPER_ALL, fused=True, find_nonfinite=True)
    assert [bool(f) for f in flags] == [False, True, False, False]
    assert_inputs_close(ref, fused)


@needs_gpu
@pytest.mark.parametrize("dense_v", [None, torch.bfloat16], ids=["sm3", "dense-bf16v"])
def test_step_counts_on_the_device_give_the_same_step(dense_v):
    # torch.compile moves step counts to the parameters' device; the engine then computes beta_t there, and
    # the keys of a bf16 v's stochastic rounding too.
    gen = torch.Generator(device="cuda").manual_seed(6)
    shapes = [(20, 30), (30,), ()]
    inputs = make_engine_inputs(
        shapes,
        dtype=torch.float32 if dense_v is None else torch.bfloat16,
        grad_dtype=torch.float32,
        momentum_dtype=torch.float32,
        gen=gen,
        steps_at=[3.0, 9.0, 1.0],
        device="cuda",
        dense_v=dense_v,
    )
    host, device = clone_inputs(inputs), clone_inputs(inputs)
    device[4] = [s.to("cuda") for s in device[4]]
    hyper = HYPER_ALL if dense_v is None else {**HYPER_ALL, "centralize": False, "cover": "dense", "rounding_seed": 4}
    fusion(*host, **hyper, fused=True)
    fusion(*device, **hyper, fused=True)
    for seq_a, seq_b in zip(host[:4], device[:4]):
        for x, y in zip(seq_a, seq_b):
            for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert [s.item() for s in host[4]] == [s.item() for s in device[4]] == [4.0, 10.0, 2.0]


@needs_gpu
def test_step_is_deterministic_and_does_not_sync_with_the_host():
    # Atomic max is order-independent: two runs from one state agree bit for bit. The engine itself never
    # waits for the device (the non-finite check of "skip"/"raise" is then the step's one sync, outside the
    # engine; the default "mask" has none: test_nonfinite.py).
    gen = torch.Generator(device="cuda").manual_seed(7)
    shapes = [(512, 1000), (257, 3, 17), (1000,), ()]
    inputs = make_engine_inputs(
        shapes,
        dtype=torch.float32,
        grad_dtype=torch.float32,
        momentum_dtype=torch.bfloat16,
        gen=gen,
        steps_at=[4.0, 4.0, 9.0, 1.0],
        device="cuda",
    )
    runs = [clone_inputs(inputs) for _ in range(2)]
    fusion(*clone_inputs(inputs), **HYPER_ALL, fused=True)  # compile outside the checked region
    torch.cuda.synchronize()
    for run in runs:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fusion(*run, **HYPER_ALL, fused=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for seq_a, seq_b in zip(runs[0][:4], runs[1][:4]):
        for x, y in zip(seq_a, seq_b):
            for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                assert torch.equal(u, v)


@needs_gpu
def test_training_with_the_default_engine_on_cuda_matches_the_reference():
    # End to end: a small model on the GPU, FusionOptimizer with no engine named (the fused one is picked).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to("cuda")
    twin = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to("cuda")
    twin.load_state_dict(model.state_dict())
    opt = FusionOptimizer(model.parameters(), lr=1e-2, centralize=True)
    ref = FusionOptimizer(twin.parameters(), lr=1e-2, centralize=True, foreach=False)
    x, y = torch.randn(128, 32, device="cuda"), torch.randn(128, 8, device="cuda")
    for _ in range(5):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_is_exactly_stochastic_round_of_the_step(kernel_device, dtype):
    # With no momentum, decay or normalization and a power-of-two lr, a step is p - lr * g exactly in fp32,
    # so the stored value is fusedbun.stochastic_round of it, bit for bit (key: the position, step: the count).
    from fusedbun import stochastic_round

    gen = torch.Generator().manual_seed(21)
    shapes = [(), (7,), (5, 3), (2, 3, 4), (300,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(kernel_device)) for s in shapes]
    lr = 2.0**-5
    exact = dict(momentum_beta=0.0, Lambda=0.0, use_rms=False, eps=0.0)
    opt = FusionOptimizer(params, lr=lr, fused=True, stochastic_rounding=True, rounding_seed=77, **exact)
    for step in (1, 2):
        expected = []
        for k, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            g = torch.where(g == 0, torch.ones((), dtype=dtype), g)
            p.grad = g.to(kernel_device)
            exact_fp32 = p.detach().cpu().float() - lr * g.float()
            expected.append(stochastic_round(exact_fp32, dtype, seed=77, key=k, step=step))
        opt.step()
        for k, (p, e) in enumerate(zip(params, expected)):
            assert torch.equal(p.detach().cpu().view(torch.int16), e.view(torch.int16)), f"step {step}, parameter {k}"


def test_a_loss_scale_is_divided_out_in_the_pass(kernel_device):
    # GradScaler's protocol: grad_scale and found_inf set on the optimizer around step().
    gen = torch.Generator().manual_seed(22)
    shapes = [(6, 9), (9,), (2, 3, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for scale in (None, 2.0**10):
        params = [torch.nn.Parameter(t.clone().to(kernel_device)) for t in init]
        opt = FusionOptimizer(params, lr=0.01, fused=True, use_rms=True, centralize=True)
        for p, g in zip(params, grads):
            p.grad = (g if scale is None else g * scale).to(kernel_device)
        if scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a.detach(), b.detach())


def test_stepping_inside_backward_builds_each_launch_plan_once(kernel_device, monkeypatch):
    # Inside backward every parameter is stepped on its own, so a model of N tensors needs N launch plans.
    # They must all stay cached: building a plan is host work and a host-to-device copy per tensor and step.
    from fusedbun import step_in_backward
    from fusedbun.engines import triton_plan

    built = []
    real = triton_plan._StepPlan.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(triton_plan._StepPlan, "__init__", counting)
    monkeypatch.setattr(triton_plan, "_STEP_PLANS", triton_plan.OrderedDict())
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(20)]).to(kernel_device)  # 40 tensors
    opt = FusionOptimizer(model.parameters(), lr=1e-3, fused=True, use_rms=True)
    x = torch.randn(4, 8, device=kernel_device)
    with step_in_backward(opt):
        for step in range(3):
            model(x).square().mean().backward()
            if step == 0:
                first = len(built)
    assert first == 40
    assert len(built) == first, f"{len(built) - first} plans rebuilt after the first step"


@pytest.mark.parametrize("cover", ["sm3", "factored", "dense"])
def test_the_64_bit_index_path_gives_the_bits_of_the_32_bit_one(kernel_device, monkeypatch, cover):
    # A launch whose offsets all fit an int32 does its index arithmetic (addresses, the rounding's element
    # counter) in 32 bits; otherwise in 64. Forcing the 64-bit path (no tensor counts as small) must change
    # nothing: every number stored, the parameters' stochastically rounded bits included, is the same
    # (with cover="dense" the v of every tensor is bf16, rounded stochastically in the kernel's dense path,
    # which does not centralize).
    from fusedbun.engines import triton_plan

    gen = torch.Generator().manual_seed(23)
    shapes = [(37, 20), (5, 3, 7), (300,), ()]
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes] for _ in range(2)]
    runs, flags = [], []
    for limit in (triton_plan.INDEX32_LIMIT, 0):
        monkeypatch.setattr(triton_plan, "INDEX32_LIMIT", limit)
        monkeypatch.setattr(triton_plan, "_STEP_PLANS", type(triton_plan._STEP_PLANS)())
        params = [torch.nn.Parameter(t.clone().to(kernel_device)) for t in init]
        opt = FusionOptimizer(
            params,
            lr=0.01,
            fused=True,
            use_rms=True,
            centralize=cover != "dense",
            momentum_dtype=torch.bfloat16,
            stochastic_rounding=True,
            rounding_seed=3,
            cover=cover,
            hessian_dtype=torch.bfloat16 if cover == "dense" else None,
        )
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(kernel_device)
            opt.step()
        flags.append({plan.index32 for sp in triton_plan._STEP_PLANS.values() for plan, _ in sp.launches})
        runs.append((params, opt.state_dict()["state"]))
    assert flags == [{True}, {False}]
    for k, (a, b) in enumerate(zip(runs[0][0], runs[1][0])):
        assert torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16)), f"parameter {k}"
    for k in runs[0][1]:
        for key, value in runs[0][1][k].items():
            other = runs[1][1][k][key]
            pairs = zip(value, other) if isinstance(value, list) else [(value, other)]
            for u, v in pairs:
                assert torch.equal(u, v), f"parameter {k}: {key}"


# ----------------------------------------------------------------------------------------------------------
# a dense second moment for every tensor (cover="dense"), in fp32 or in bf16 (hessian_dtype)
# ----------------------------------------------------------------------------------------------------------

DENSE_SHAPES = {
    "cuda": [(), (7,), (4099,), (5, 37), (64, 64), (3, 4, 5), (300, 513), (2, 3, 1, 4, 5)],
    "cpu": [(), (7,), (1100,), (5, 37), (3, 4, 5), (2, 3, 1, 2, 5)],
}


def fresh_plans(monkeypatch):
    """An empty cache of launch plans for the test, returned so that the test can look at the plans."""
    from fusedbun.engines import triton_plan

    plans = triton_plan.OrderedDict()
    monkeypatch.setattr(triton_plan, "_STEP_PLANS", plans)
    return plans


def assert_bits_of_the_multi_tensor_engine(ref, fused, ref_params, fused_params, *, what: str) -> None:
    """Parameters and state of ``fused`` as those of ``ref`` (the multi-tensor engine): 16-bit tensors bit
    for bit, but for rare elements; fp32 ones within :func:`tolerance`.

    The fp32 arithmetic of the two sides cannot agree to the bit: torch's kernels fuse some multiply-adds
    (on the CPU ``lerp``, ``add`` with ``alpha``, ``addcmul``) that the interpreter's NumPy rounds twice, and
    the compiled kernel contracts others that torch's CUDA kernels round twice, so parameters, momentum and
    ``nu`` may differ in their last bits. A 16-bit value rounded from two such fp32 values differs only where
    a rounding boundary (a tie of the rounding to nearest, or the carry of the stochastic rounding) falls
    between them, about one element in 2**16 of those: then by one unit in the last place (ulp), or, where
    ``p - lr * u`` cancels to nearly zero, by a few fp32 ulps of the operands (on an H200, 7.5e-11 against
    0.0 from a weight of -5e-3), many 16-bit ulps of so small a result. The bound allows one element per
    8192 of a tensor, plus one, each one ulp apart or within 2**-21 of the tensor's largest magnitude."""
    for k, (pr, pf) in enumerate(zip(ref_params, fused_params)):
        where = f"{what}, parameter {k} of shape {tuple(pr.shape)}"
        sr, sf = ref.state.get(pr, {}), fused.state.get(pf, {})
        assert sr.keys() == sf.keys(), where
        for key, x, y in [("param", pr.detach(), pf.detach())] + [(key, sr[key], sf[key]) for key in sr]:
            assert x.dtype == y.dtype and x.shape == y.shape, f"{where}: {key}"
            if x.dtype == torch.float32:
                torch.testing.assert_close(y, x, **tolerance(x.dtype), msg=lambda m, w=where, k=key: f"{w}: {k}: {m}")
                continue
            differ = x != y
            ulps = (x.view(torch.int16).int() - y.view(torch.int16).int()).abs()
            cancelled = (x.float() - y.float()).abs() <= 2.0**-21 * x.float().abs().max()
            odd = int((differ & (ulps > 1) & ~cancelled).sum())
            count = int(differ.sum())
            assert odd == 0 and count <= 1 + x.numel() // 8192, f"{where}: {key}: {count} elements differ, {odd} far"


@pytest.mark.parametrize("dtype, momentum_dtype", DTYPES)
@pytest.mark.parametrize("hyper", [HYPER[0], HYPER[3]])
def test_a_dense_v_of_fp32_matches_the_reference_in_the_kernels_dense_path(
    kernel_device, dtype, momentum_dtype, hyper, monkeypatch
):
    # cover="dense": tensors of 2+ dims take the kernel's dense path, as 0-D and 1-D tensors always do.
    plans = fresh_plans(monkeypatch)
    hyper = {**hyper, "cover": "dense"}
    run_side_by_side(DENSE_SHAPES[kernel_device], dtype, momentum_dtype, hyper, device=kernel_device)
    assert all(not plan.fallback for plan in plans.values())
    assert {launch.rounds_v for plan in plans.values() for launch, _ in plan.launches} == {False}


BF16_V = [
    pytest.param(torch.float32, None, dict(use_rms=True), id="fp32-rms"),
    pytest.param(torch.float32, torch.bfloat16, dict(maximize=True), id="fp32-bf16m"),
    pytest.param(torch.bfloat16, None, dict(use_rms=True, Lambda=0.0), id="bf16-bf16m-nearest-rms"),
    pytest.param(torch.bfloat16, torch.float32, dict(use_rms=True, stochastic_rounding=True), id="bf16-stochastic-rms"),
    pytest.param(
        torch.bfloat16, None, dict(momentum_beta=0.0, stochastic_rounding=True), id="bf16-stochastic-nomomentum"
    ),
    pytest.param(torch.float32, None, dict(momentum_beta=0.0, use_rms=True, beta_decay=0.5), id="fp32-nomomentum-rms"),
    pytest.param(torch.float32, torch.bfloat16, dict(use_rms=True, centralize=True), id="fp32-bf16m-centralize"),
]


@pytest.mark.parametrize("dtype, momentum_dtype, hyper", BF16_V)
def test_a_dense_v_of_bf16_is_stepped_in_the_kernel_as_by_the_multi_tensor_engine(
    kernel_device, dtype, momentum_dtype, hyper, monkeypatch
):
    # hessian_dtype=torch.bfloat16: the kernel widens v, rounds nu into it stochastically on the v's own
    # stream and normalizes by the value as stored. The second tensor has no gradient at the first step, so
    # from then on one launch holds tensors at two step counts (beta_t and the v's keys from the table).
    # Centralized, the tensors of 2+ dims go to the multi-tensor engine (the dense path does not
    # centralize), their keys with them. Each step starts both from the multi-tensor engine's state.
    dev = kernel_device
    shapes = DENSE_SHAPES[dev]
    plans = fresh_plans(monkeypatch)
    gen = torch.Generator(device=dev).manual_seed(8)
    init = [torch.randn(s, device=dev, generator=gen).to(dtype) for s in shapes]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fused_params = [torch.nn.Parameter(t.clone()) for t in init]
    options = dict(lr=0.05, cover="dense", hessian_dtype=torch.bfloat16, rounding_seed=11, **hyper)
    ref = FusionOptimizer(ref_params, foreach=True, momentum_dtype=momentum_dtype, **options)
    fused = FusionOptimizer(fused_params, fused=True, momentum_dtype=momentum_dtype, **options)
    for t in range(3):
        for k, (pr, pf) in enumerate(zip(ref_params, fused_params)):
            scale = 10.0 ** torch.randint(-3, 1, (), generator=gen, device=dev)
            g = (torch.randn(pr.shape, device=dev, generator=gen) * scale).to(dtype)
            pr.grad, pf.grad = (None, None) if t == 0 and k == 1 else (g, g.clone())
        if t > 0:
            copy_state(ref, fused, ref_params, fused_params)
        ref.step()
        fused.step()
        assert_bits_of_the_multi_tensor_engine(ref, fused, ref_params, fused_params, what=f"step {t + 1}")
    assert [fused.state[p]["step"].item() for p in fused_params] == [3.0, 2.0] + [3.0] * (len(shapes) - 2)
    assert all(fused.state[p]["exp_hessian"].dtype == torch.bfloat16 for p in fused_params)
    plan = next(reversed(plans.values()))  # the last step's: every tensor
    assert plan.fallback == ([i for i, s in enumerate(shapes) if len(s) >= 2] if hyper.get("centralize") else [])
    (launch, idx), *others = plan.launches
    assert not others and launch.rounds_v and idx == plan.kernel_positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_a_dense_v_of_bf16_is_exactly_stochastic_round_of_its_first_step(kernel_device, dtype):
    # At step 1 beta_t is 0, so nu = g * g, exact in fp32 for a gradient that bf16 holds: the stored v is
    # fusedbun.rounding.stochastic_round_at of it, bit for bit, on the stream of the v (the parameter's
    # key, its position, through hessian_key), whatever the parameter's own rounding.
    from fusedbun.rounding import flat_index, hessian_key, rounding_keys, stochastic_round_at

    gen = torch.Generator().manual_seed(24)
    shapes = [(), (7,), (1100,), (5, 3), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(kernel_device)) for s in shapes]
    options = dict(eps=0.0, cover="dense", hessian_dtype=torch.bfloat16, rounding_seed=5, stochastic_rounding=True)
    opt = FusionOptimizer(params, lr=0.01, fused=True, **options)
    grads = [torch.randn(s, generator=gen).to(torch.bfloat16).float() for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.to(dtype).to(kernel_device)
    opt.step()
    for k, (p, g) in enumerate(zip(params, grads)):
        keys = rounding_keys(5, hessian_key(k), 1)
        expected = stochastic_round_at(g * g, torch.bfloat16, keys, flat_index(g.shape))
        v = opt.state[p]["exp_hessian"].cpu()
        assert torch.equal(v.view(torch.int16), expected.view(torch.int16)), f"parameter {k}"


def test_stepping_inside_backward_with_a_dense_v_of_bf16(kernel_device, monkeypatch):
    # fusedbun.step_in_backward steps each tensor on its own, in a launch of its own, keyed by its position
    # in the optimizer: a bf16 model (momentum and v in bf16 too) steps as the multi-tensor engine's
    # optimizer.step() steps it, each step from the same state.
    from fusedbun import step_in_backward

    plans = fresh_plans(monkeypatch)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)]
    model = torch.nn.Sequential(*layers).to(kernel_device, torch.bfloat16)
    twin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    twin = twin.to(kernel_device, torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    options = dict(lr=1e-2, use_rms=True, cover="dense", hessian_dtype=torch.bfloat16, stochastic_rounding=True)
    opt = FusionOptimizer(model.parameters(), fused=True, **options)
    ref = FusionOptimizer(twin.parameters(), foreach=True, **options)
    x = torch.randn(16, 8, device=kernel_device).to(torch.bfloat16)
    with step_in_backward(opt):
        for step in range(3):
            if step > 0:
                copy_state(ref, opt, list(twin.parameters()), list(model.parameters()))
            model(x).square().mean().backward()
            twin(x).square().mean().backward()
            ref.step()
            ref.zero_grad()
            ref_params, params = list(twin.parameters()), list(model.parameters())
            assert_bits_of_the_multi_tensor_engine(ref, opt, ref_params, params, what=f"step {step + 1}")
    assert len(plans) == 4 and all(not plan.fallback and plan.launches[0][0].rounds_v for plan in plans.values())


def test_the_plan_of_a_dense_v_depends_on_its_dtype(kernel_device, monkeypatch):
    # A bf16 v at the address of an fp32 one must not reuse its plan (the cache key holds the v's dtype), and
    # tensors whose v differ in dtype go to launches of their own (the kernel is compiled for one).
    from fusedbun.engines.triton_plan import step_plan

    plans = fresh_plans(monkeypatch)
    dev = kernel_device
    params = [torch.randn(40, device=dev) for _ in range(2)]
    grads = [torch.randn(40, device=dev) for _ in range(2)]
    storage = torch.zeros(80, device=dev)
    both_fp32 = [storage[:40], storage[40:]]
    mixed = [storage[:40], storage.view(torch.bfloat16)[80:120]]  # the second at the address of the fp32 one
    assert mixed[1].data_ptr() == both_fp32[1].data_ptr()
    kw = dict(centralize=False, config=fused_cuda.CONFIG)
    a = step_plan(params, grads, [None, None], both_fp32, **kw)
    b = step_plan(params, grads, [None, None], mixed, **kw)
    assert a is not b and len(plans) == 2 and not a.fallback and not b.fallback
    assert [launch.rounds_v for launch, _ in a.launches] == [False]
    assert sorted((launch.rounds_v, idx) for launch, idx in b.launches) == [(False, [0]), (True, [1])]
