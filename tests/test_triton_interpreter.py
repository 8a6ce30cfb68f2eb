"""The Triton kernel of the fused CUDA engine, run by Triton's CPU interpreter against the reference.

``TRITON_INTERPRET=1`` makes ``triton.jit`` kernels run on CPU tensors (each program in turn, in NumPy),
so the kernel's copy of the rule is checked on machines without a GPU. The optimizer routes CPU tensors
to the C kernel, so these tests point the fused engine of the CPU at the Triton engine. The interpreter
is slow: the shapes are small. ``tests/test_fused_cuda.py`` runs the same kernel compiled, on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the Triton kernel is checked under its interpreter)")

from fusedbun import FusionOptimizer  # noqa: E402
from fusedbun.engines import dispatch, fused_cuda  # noqa: E402
from fusedbun.optimizer import fusion  # noqa: E402
from fusedbun.sm3 import sm3_accumulators  # noqa: E402


def _interpreted_kernels():
    """The kernel module, run by the interpreter (``tests/conftest.py`` switches it on before Triton is
    first imported, on machines without a GPU); ``None`` where the kernel runs compiled."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    from fusedbun.engines import triton_kernels

    return triton_kernels


KERNELS = _interpreted_kernels()
pytestmark = [
    pytest.mark.skipif(
        KERNELS is None,
        reason="the kernel runs compiled here (a CUDA device, or TRITON_INTERPRET unset); see test_fused_cuda.py",
    ),
    # The interpreter computes masked-out lanes too, in NumPy, which warns about NaN it then discards.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """``fused=True`` on CPU tensors steps them with the Triton engine, under the interpreter."""
    real = dispatch._fused_engine
    monkeypatch.setattr(
        dispatch,
        "_fused_engine",
        lambda device_type: (fused_cuda.fused_fusion, "") if device_type == "cpu" else real(device_type),
    )


SHAPES = [
    (),
    (1,),
    (7,),
    (1100,),
    (0,),
    (3, 0),
    (1, 1),
    (5, 37),
    (17, 1),
    (1, 300),
    (3, 4, 5),
    (2, 3, 4, 5),
    (2, 3, 1, 2, 5),
]
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
]


def tolerance(dtype: torch.dtype) -> dict:
    # fp32: a few roundings apart (FMA contraction, the order of the row-mean sum). Low precision: one unit
    # in the last place of the stored value, when the fp32 value before rounding sits near a tie.
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=1e-6)
    return dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-4)


def assert_same(ref, fused, ref_params, fused_params, *, what: str) -> None:
    for k, (pr, pf) in enumerate(zip(ref_params, fused_params)):
        where = f"{what}, parameter {k} of shape {tuple(pr.shape)}"
        torch.testing.assert_close(pf, pr, **tolerance(pr.dtype), msg=lambda m, where=where: f"{where}: {m}")
        sr, sf = ref.state.get(pr, {}), fused.state.get(pf, {})
        assert sr.keys() == sf.keys(), where
        for key in sr:
            a, b = sr[key], sf[key]
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                tol = tolerance(x.dtype) if key != "exp_hessian" else dict(rtol=3e-5, atol=1e-12)
                torch.testing.assert_close(y, x, **tol, msg=lambda m, where=where, key=key: f"{where}: {key}: {m}")


def run_side_by_side(shapes, dtype, momentum_dtype, hyper: dict, *, steps: int = 3, seed: int = 0, nonfinite=False):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    fused_params = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = {"lr": 0.05, **hyper}
    ref = FusionOptimizer(ref_params, foreach=False, momentum_dtype=momentum_dtype, **hyper)
    fused = FusionOptimizer(fused_params, fused=True, momentum_dtype=momentum_dtype, **hyper)
    for t in range(steps):
        for pr, pf in zip(ref_params, fused_params):
            g = torch.randn(pr.shape, generator=gen) * 10.0 ** torch.randint(-3, 1, (), generator=gen)
            if nonfinite and g.numel() > 3 and t == 1:
                g.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 2.0**70])
            pr.grad, pf.grad = g.to(dtype), g.to(dtype)
        ref.step()
        fused.step()
        assert_same(ref, fused, ref_params, fused_params, what=f"step {t + 1}")


@pytest.mark.parametrize("dtype, momentum_dtype", DTYPES)
@pytest.mark.parametrize("hyper", HYPER)
def test_interpreted_kernel_matches_the_reference(triton_on_cpu, dtype, momentum_dtype, hyper):
    run_side_by_side([(), (7,), (5, 37), (3, 4, 5)], dtype, momentum_dtype, hyper)


def test_interpreted_kernel_matches_the_reference_on_odd_shapes(triton_on_cpu):
    # 0-D to 5-D, zero-size tensors, size-1 dims, rows shorter and longer than a block.
    run_side_by_side(SHAPES, torch.float32, None, dict(centralize=True, use_rms=True), steps=2)


def test_interpreted_kernel_masks_and_flags_nonfinite_entries(triton_on_cpu):
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run_side_by_side([(9,), (6, 11)], torch.float32, None, dict(use_rms=True), nonfinite=True)


def test_interpreted_kernel_takes_per_tensor_step_counts_and_reports_flags():
    # The functional entry point with tensors at different step counts (each its own beta_t in one launch).
    gen = torch.Generator().manual_seed(5)
    shapes, counts = [(6, 8), (6, 8), (10,), (4, 5, 6)], [0.0, 7.0, 2.0, 40.0]

    def inputs():
        g = torch.Generator().manual_seed(9)
        params = [torch.randn(s, generator=g) for s in shapes]
        grads = [torch.randn(s, generator=g) for s in shapes]
        grads[1].view(-1)[3] = float("nan")
        bufs = [0.1 * torch.randn(s, generator=g) for s in shapes]
        hess = [
            torch.rand(s, generator=g)
            if len(s) <= 1
            else [a.copy_(torch.rand(a.shape, generator=g)) for a in sm3_accumulators(p)]
            for s, p in zip(shapes, params)
        ]
        return params, grads, bufs, hess, [torch.tensor(c) for c in counts]

    del gen
    hyper = dict(
        lr=0.03, eps=1e-2, beta_decay=0.8, Lambda=0.05, momentum_beta=0.9, centralize=True, use_rms=True, maximize=False
    )
    ref, tri = inputs(), inputs()
    fusion(*ref, **hyper, foreach=False)
    from fusedbun.engines.common import StepHyper, StepTensors

    flags = fused_cuda.fused_fusion(StepTensors(*tri), StepHyper(**hyper), find_nonfinite=True)
    assert flags.tolist() == [False, True, False, False]
    for a, b in zip([ref[0], *ref[2:4]], [tri[0], *tri[2:4]]):  # parameters, momenta, second moments
        for x, y in zip(a, b):
            for u, v in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                torch.testing.assert_close(v, u, rtol=2e-5, atol=1e-6)
    assert [s.item() for s in ref[4]] == [s.item() for s in tri[4]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreted_kernel_rounds_exactly_as_stochastic_round(triton_on_cpu, dtype):
    # With no momentum, decay or normalization and a power-of-two lr, a step is p - lr * g exactly in fp32,
    # so the stored value is fusedbun.stochastic_round of it, bit for bit (key: the position, step: the count).
    from fusedbun import stochastic_round

    gen = torch.Generator().manual_seed(21)
    shapes = [(), (7,), (5, 3), (2, 3, 4), (300,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    lr = 2.0**-5
    exact = dict(momentum_beta=0.0, Lambda=0.0, use_rms=False, eps=0.0)
    opt = FusionOptimizer(params, lr=lr, fused=True, stochastic_rounding=True, rounding_seed=77, **exact)
    for step in (1, 2):
        expected = []
        for k, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            g = torch.where(g == 0, torch.ones((), dtype=dtype), g)
            p.grad = g
            expected.append(stochastic_round(p.detach().float() - lr * g.float(), dtype, seed=77, key=k, step=step))
        opt.step()
        for k, (p, e) in enumerate(zip(params, expected)):
            assert torch.equal(p.detach().view(torch.int16), e.view(torch.int16)), f"step {step}, parameter {k}"


def test_interpreted_kernel_divides_out_a_loss_scale(triton_on_cpu):
    # GradScaler's protocol: grad_scale and found_inf set on the optimizer around step().
    gen = torch.Generator().manual_seed(22)
    shapes = [(6, 9), (9,), (2, 3, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for scale in (None, 2.0**10):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = FusionOptimizer(params, lr=0.01, fused=True, use_rms=True, centralize=True)
        for p, g in zip(params, grads):
            p.grad = g if scale is None else g * scale
        if scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a.detach(), b.detach())
