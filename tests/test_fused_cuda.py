"""The fused CUDA engine (``fusedbun/engines/fused_cuda.py`` + ``triton_kernels.py``) against the
single-tensor reference (``foreach=False``) on the same GPU.

Each step starts both optimizers from the same parameters and state (the reference's, copied into the
fused run's own tensors), so that every step is compared on its own and a rounding difference in one
step cannot grow into a large one later. Everything except the first test needs a CUDA device and
Triton, and is skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from fusedbun import FusionOptimizer
from fusedbun.engines import fused_cuda, select_engine
from fusedbun.engines.common import StepHyper, StepTensors
from fusedbun.engines.single_tensor import single_tensor_fusion
from fusedbun.optimizer import fusion
from fusedbun.sm3 import sm3_accumulators

REASON = fused_cuda.unavailable_reason()
needs_gpu = pytest.mark.skipif(bool(REASON), reason=f"the fused CUDA engine cannot run here: {REASON}")


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


DEV = "cuda"

SHAPES = [
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
]
SMALL_SHAPES = [(), (7,), (5, 37), (3, 4, 5), (64, 64)]

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
        torch.testing.assert_close(pf, pr, **tolerance(pr.dtype), msg=lambda m: f"{where}: {m}")
        sr, sf = ref.state.get(pr, {}), fused.state.get(pf, {})
        assert sr.keys() == sf.keys(), where
        for key in sr:
            a, b = sr[key], sf[key]
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, f"{where}: {key}"
                tol = tolerance(x.dtype) if key != "exp_hessian" else dict(rtol=3e-5, atol=1e-12)
                torch.testing.assert_close(y, x, **tol, msg=lambda m: f"{where}: {key}: {m}")


def run_side_by_side(shapes, dtype, momentum_dtype, hyper: dict, *, steps: int = 3, seed: int = 0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    init = [torch.randn(s, device=DEV, generator=gen).to(dtype) for s in shapes]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fused_params = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = {"lr": 0.05, **hyper}
    ref = FusionOptimizer(ref_params, foreach=False, momentum_dtype=momentum_dtype, **hyper)
    fused = FusionOptimizer(fused_params, fused=True, momentum_dtype=momentum_dtype, **hyper)
    for t in range(steps):
        for pr, pf in zip(ref_params, fused_params):
            g = (
                torch.randn(pr.shape, device=DEV, generator=gen)
                * 10.0 ** torch.randint(-3, 1, (), generator=gen, device=DEV)
            ).to(dtype)
            pr.grad, pf.grad = g.clone(), g.clone()
        if t > 0:
            copy_state(ref, fused, ref_params, fused_params)
        ref.step()
        fused.step()
        assert_same_state(ref, fused, ref_params, fused_params, what=f"step {t + 1}")
    return ref, fused, ref_params, fused_params


@needs_gpu
def test_fused_engine_is_selected_automatically_on_cuda():
    assert select_engine("cuda", foreach=None, fused=None) is fused_cuda.fused_fusion
    assert select_engine("cuda", foreach=None, fused=True) is fused_cuda.fused_fusion


@needs_gpu
@pytest.mark.parametrize("dtype, momentum_dtype", DTYPES)
@pytest.mark.parametrize("hyper", HYPER)
def test_matches_reference_across_dtypes_and_hyperparameters(dtype, momentum_dtype, hyper):
    run_side_by_side(SMALL_SHAPES, dtype, momentum_dtype, hyper)


@needs_gpu
@pytest.mark.parametrize("hyper", [HYPER[0], HYPER[1]])
@pytest.mark.parametrize(
    "config",
    [dict(prefetch=False), dict(prefetch=True), dict(direct_launch=True)],
    ids=["load-then-work", "prefetch-next-rows", "direct-launch"],
)
def test_matches_reference_on_many_shapes(hyper, config, monkeypatch):
    # 0-D to 5-D, odd sizes, zero-size tensors, size-1 dims, rows shorter than a block, several blocks;
    # both ways the kernel can walk its rows, and launches past Triton's dispatch after the first step.
    config = fused_cuda.KernelConfig(**{**fused_cuda.CONFIG.as_dict(), **config})
    monkeypatch.setattr(fused_cuda, "CONFIG", config)
    run_side_by_side(SHAPES, torch.float32, None, hyper, steps=4)


@needs_gpu
@pytest.mark.parametrize("dtype, momentum_dtype", [DTYPES[1], DTYPES[2]])
def test_matches_reference_on_large_tensors(dtype, momentum_dtype):
    # Many tiles per tensor; one row length a multiple of 16 (16-byte accesses), one not.
    run_side_by_side([(2048, 1024), (1536, 1029), (4096,)], dtype, momentum_dtype, dict(centralize=True), steps=2)


@needs_gpu
def test_misaligned_and_fallback_layouts_match_reference():
    # In the fused run: a parameter that starts 4 bytes into its storage (its accesses cannot be 16 bytes
    # wide), and tensors the kernel does not take, stepped by the multi-tensor engine inside the fused call:
    # fp64, non-contiguous (transposed), and 7 dims (past the kernel's 6).
    gen = torch.Generator(device=DEV).manual_seed(3)
    values = [
        torch.randn(40, 48, device=DEV, generator=gen),
        torch.randn(9, 11, device=DEV, generator=gen, dtype=torch.float64),
        torch.randn(10, 12, device=DEV, generator=gen),
        torch.randn(2, 1, 2, 3, 1, 2, 2, device=DEV, generator=gen),
    ]
    storage = torch.empty(1 + 40 * 48, device=DEV)
    misaligned = storage[1:].view(40, 48).copy_(values[0])
    transposed = torch.empty(12, 10, device=DEV).t().copy_(values[2])
    fused_params = [torch.nn.Parameter(t) for t in (misaligned, values[1].clone(), transposed, values[3].clone())]
    ref_params = [torch.nn.Parameter(v.clone()) for v in values]
    assert fused_params[0].data_ptr() % 16 == 4 and not fused_params[2].is_contiguous()
    ref = FusionOptimizer(ref_params, lr=0.1, foreach=False, centralize=True)
    fused = FusionOptimizer(fused_params, lr=0.1, fused=True, centralize=True)
    for t in range(3):
        for pr, pf in zip(ref_params, fused_params):
            g = torch.randn(pr.shape, device=DEV, generator=gen, dtype=pr.dtype)
            pr.grad, pf.grad = g.clone(), g.clone()
        ref.step()
        fused.step()
        assert_same_state(ref, fused, ref_params, fused_params, what=f"step {t + 1}")


def make_engine_inputs(shapes, *, dtype, grad_dtype, momentum_dtype, gen, steps_at: list[float]):
    params, grads, bufs, hess, steps = [], [], [], [], []
    for s, count in zip(shapes, steps_at):
        p = torch.randn(s, device=DEV, generator=gen).to(dtype)
        params.append(p)
        grads.append(torch.randn(s, device=DEV, generator=gen).to(grad_dtype))
        bufs.append(
            None if momentum_dtype is None else (0.1 * torch.randn(s, device=DEV, generator=gen)).to(momentum_dtype)
        )
        if p.dim() <= 1:
            hess.append(torch.rand(s, device=DEV, generator=gen))
        else:
            hess.append([a.copy_(torch.rand(a.shape, device=DEV, generator=gen)) for a in sm3_accumulators(p)])
        steps.append(torch.tensor(count))
    return params, grads, bufs, hess, steps


def clone_inputs(inputs):
    def c(x):
        if x is None:
            return None
        return [a.clone() for a in x] if isinstance(x, list) else x.clone()

    return [[c(x) for x in seq] for seq in inputs]


def assert_inputs_close(a, b):
    for seq_a, seq_b in zip(a[:4], b[:4]):
        for x, y in zip(seq_a, seq_b):
            for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                if u is not None:
                    torch.testing.assert_close(v, u, **tolerance(u.dtype))
    assert [s.item() for s in a[4]] == [s.item() for s in b[4]]


HYPER_ALL = dict(
    lr=0.03, eps=1e-2, beta_decay=0.8, Lambda=0.05, momentum_beta=0.9, centralize=True, use_rms=True, maximize=False
)


@needs_gpu
@pytest.mark.parametrize("dtype, grad_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_gradients_of_another_dtype_and_per_tensor_step_counts(dtype, grad_dtype):
    # The functional entry point allows gradients in another dtype than the parameter; the tensors are at
    # different step counts, so each has its own beta_t (one launch still serves them all).
    gen = torch.Generator(device=DEV).manual_seed(5)
    shapes = [(33, 48), (33, 48), (10,), (4, 5, 6)]
    inputs = make_engine_inputs(
        shapes,
        dtype=dtype,
        grad_dtype=grad_dtype,
        momentum_dtype=torch.float32,
        gen=gen,
        steps_at=[0.0, 7.0, 2.0, 40.0],
    )
    ref, fused = clone_inputs(inputs), clone_inputs(inputs)
    single_tensor_fusion(StepTensors(*ref), StepHyper(**HYPER_ALL))
    fusion(*fused, **HYPER_ALL, fused=True)
    assert_inputs_close(ref, fused)


@needs_gpu
def test_step_counts_on_the_device_give_the_same_step():
    # torch.compile moves step counts to the parameters' device; the engine then computes beta_t there.
    gen = torch.Generator(device=DEV).manual_seed(6)
    shapes = [(20, 30), (30,), ()]
    inputs = make_engine_inputs(
        shapes,
        dtype=torch.float32,
        grad_dtype=torch.float32,
        momentum_dtype=torch.float32,
        gen=gen,
        steps_at=[3.0, 9.0, 1.0],
    )
    host, device = clone_inputs(inputs), clone_inputs(inputs)
    device[4] = [s.to(DEV) for s in device[4]]
    fusion(*host, **HYPER_ALL, fused=True)
    fusion(*device, **HYPER_ALL, fused=True)
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
    gen = torch.Generator(device=DEV).manual_seed(7)
    shapes = [(512, 1000), (257, 3, 17), (1000,), ()]
    inputs = make_engine_inputs(
        shapes,
        dtype=torch.float32,
        grad_dtype=torch.float32,
        momentum_dtype=torch.bfloat16,
        gen=gen,
        steps_at=[4.0, 4.0, 9.0, 1.0],
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
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(DEV)
    twin = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(DEV)
    twin.load_state_dict(model.state_dict())
    opt = FusionOptimizer(model.parameters(), lr=1e-2, centralize=True)
    ref = FusionOptimizer(twin.parameters(), lr=1e-2, centralize=True, foreach=False)
    x, y = torch.randn(128, 32, device=DEV), torch.randn(128, 8, device=DEV)
    for _ in range(5):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
