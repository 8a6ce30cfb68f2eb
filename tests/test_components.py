"""The component functions each chapter introduces, checked against their one-line rules.

The mask's bounds are checked on hand-picked values: ``eps`` (strict: ``|g| == eps`` is masked) and
``GRAD_LIMIT = 2**64`` (NaN, Inf and ``|g| >= 2**64`` are masked too, and reported by ``nonfinite_entries``).
How the optimizer composes these functions into a step is ``test_rule.py``'s subject.
"""

from __future__ import annotations

import pytest
import torch
from rule_check import dtype_id

import fusedbun
from fusedbun import FusionOptimizer

LIMIT = 2.0**64
HUGE = 3e19  # >= 2**64: its square overflows fp32; still finite in fp32, bf16 and fp64 (not in fp16)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (4, 1, 2, 3)])
def test_centralize_removes_the_mean_over_every_dim_but_the_first(shape, gen):
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = fusedbun.centralize(g)
    torch.testing.assert_close(c.mean(dim=tuple(range(1, len(shape)))), torch.zeros(shape[0], dtype=torch.float64))
    torch.testing.assert_close(g - c, g.mean(dim=tuple(range(1, len(shape))), keepdim=True).expand(shape))


@pytest.mark.parametrize("shape", [(), (5,)])
def test_centralize_leaves_0d_and_1d_tensors_alone(shape, gen):
    g = torch.randn(shape, generator=gen)
    assert torch.equal(fusedbun.centralize(g), g)


def test_grad_limit_is_two_to_the_64():
    from fusedbun import adalite

    assert adalite.GRAD_LIMIT == 2.0**64 and isinstance(adalite.GRAD_LIMIT, float)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_eps_mask_keeps_exactly_the_entries_between_eps_and_2_to_the_64(dtype):
    below = torch.nextafter(torch.tensor(LIMIT, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()
    eps = 0.5
    above_eps = torch.nextafter(torch.tensor(eps, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()
    cases = [  # (value, kept)
        (0.0, False),
        (-0.0, False),
        (eps, False),
        (-eps, False),
        (above_eps, True),
        (-above_eps, True),
        (1.0, True),
        (-3.0, True),
        (below, True),
        (-below, True),
        (LIMIT, False),
        (-LIMIT, False),
        (HUGE, False),
        (float("nan"), False),
        (float("inf"), False),
        (float("-inf"), False),
    ]
    g = torch.tensor([v for v, _ in cases], dtype=dtype)
    g_copy = g.clone()
    out, mask = fusedbun.eps_mask(g, eps=eps)
    want = torch.tensor([k for _, k in cases])
    assert mask.dtype == torch.bool and torch.equal(mask, want), [(v, m) for (v, _), m in zip(cases, mask.tolist())]
    assert out.dtype == dtype and torch.equal(out, torch.where(want, g, torch.zeros((), dtype=dtype)))
    assert not torch.signbit(out[~want]).any(), "masked entries must be +0.0 (torch.where(mask, g, 0))"
    assert torch.equal(g.isnan(), g_copy.isnan()) and torch.equal(g.nan_to_num(), g_copy.nan_to_num()), (
        "eps_mask modified g"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
def test_nonfinite_entries_on_hand_picked_values(dtype):
    from fusedbun.adalite import nonfinite_entries

    values = [0.0, -0.0, 1.0, -2.5, float("nan"), float("inf"), float("-inf")]
    flags = [False, False, False, False, True, True, True]
    if dtype != torch.float16:
        below = torch.nextafter(torch.tensor(LIMIT, dtype=torch.float32), torch.tensor(0.0)).item()
        values += [LIMIT, -LIMIT, HUGE, 1e30]
        flags += [True, True, True, True]
        if dtype != torch.bfloat16:
            values += [below, -below]
            flags += [False, False]
    else:
        values += [65504.0, -65504.0]
        flags += [False, False]
    g = torch.tensor(values, dtype=dtype)
    got = nonfinite_entries(g)
    assert got.dtype == torch.bool and got.shape == g.shape
    assert got.tolist() == flags, list(zip(values, got.tolist()))
    g2 = g.reshape(1, -1, 1)
    assert torch.equal(nonfinite_entries(g2), got.reshape(1, -1, 1))


@pytest.mark.parametrize("beta_decay", [0.5, 0.8, 1.0])
def test_hessian_decay_starts_at_zero_and_grows_towards_one(beta_decay):
    betas = [fusedbun.hessian_decay(t, beta_decay=beta_decay) for t in range(1, 200)]
    assert betas[0] == 0.0
    assert all(b1 < b2 < 1 for b1, b2 in zip(betas, betas[1:]))
    assert betas[9] == pytest.approx(1 - 10 ** (-beta_decay))


def test_hessian_decay_refuses_step_zero():
    with pytest.raises(ValueError, match="step"):
        fusedbun.hessian_decay(0, beta_decay=0.8)


def test_dense_second_moment_carries_masked_entries_over(gen):
    v = torch.rand(6, generator=gen)
    g = torch.randn(6, generator=gen)
    mask = torch.tensor([True, False, True, False, True, False])
    out = fusedbun.dense_second_moment_(v.clone(), g, mask, beta=0.7)
    torch.testing.assert_close(out[mask], 0.7 * v[mask] + 0.3 * g[mask] ** 2)
    assert torch.equal(out[~mask], v[~mask])


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4), (2, 1, 3, 2)])
def test_sm3_accumulators_hold_the_sum_of_dims(shape):
    accs = fusedbun.sm3_accumulators(torch.empty(shape))
    assert sum(a.numel() for a in accs) == sum(shape)
    for k, a in enumerate(accs):
        assert a.dtype == torch.float32 and a.shape[k] == shape[k] and a.numel() == shape[k]


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4)])
def test_sm3_second_moment_is_min_then_max(shape, gen):
    accs = [a.uniform_(0, 1, generator=gen) for a in fusedbun.sm3_accumulators(torch.empty(shape))]
    before = [a.clone() for a in accs]
    g = torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.3
    nu = fusedbun.sm3_second_moment_(accs, g * mask, mask, beta=0.6)
    prev = before[0]
    for a in before[1:]:
        prev = torch.minimum(prev, a)
    expected = torch.where(mask, 0.6 * prev + 0.4 * (g * mask) ** 2, prev.expand(shape))
    torch.testing.assert_close(nu, expected)
    for k, a in enumerate(accs):
        other = tuple(d for d in range(len(shape)) if d != k)
        torch.testing.assert_close(a, expected.amax(dim=other, keepdim=True))


def test_sm3_second_moment_of_an_empty_tensor_is_empty():
    accs = fusedbun.sm3_accumulators(torch.empty(0, 3))
    nu = fusedbun.sm3_second_moment_(accs, torch.empty(0, 3), torch.empty(0, 3, dtype=torch.bool), beta=0.5)
    assert nu.shape == (0, 3)


def test_momentum_is_an_ema_and_rounds_once_into_a_bf16_buffer(gen):
    m = torch.randn(8, generator=gen)
    u = torch.randn(8, generator=gen)
    torch.testing.assert_close(fusedbun.momentum_(m.clone(), u, momentum_beta=0.9), 0.9 * m + 0.1 * u)
    m16 = m.bfloat16()
    out = fusedbun.momentum_(m16, u, momentum_beta=0.9)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, m.bfloat16().float().lerp(u, 0.1).bfloat16()), "fp32 EMA, one rounding"


def test_decoupled_weight_decay_shrinks_by_one_minus_lr_lambda(gen):
    p = torch.randn(5, generator=gen)
    torch.testing.assert_close(fusedbun.decoupled_weight_decay_(p.clone(), lr=0.1, Lambda=0.2), p * 0.98)
    assert torch.equal(fusedbun.decoupled_weight_decay_(p.clone(), lr=0.1, Lambda=0.0), p)


def test_rms_normalize_divides_by_sqrt_nu_plus_eps(gen):
    g = torch.randn(4, 3, generator=gen, dtype=torch.bfloat16)
    nu = torch.rand(4, 3, generator=gen)
    u = fusedbun.rms_normalize(g, nu, eps=1e-3)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, g.float() / (nu.sqrt() + 1e-3))


def test_param_groups_no_decay_puts_biases_and_norms_in_a_group_without_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    groups = fusedbun.param_groups_no_decay(model, Lambda=0.05, use_rms=True)
    decay, no_decay = groups
    assert decay["Lambda"] == 0.05 and no_decay["Lambda"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.dim() <= 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert decay["use_rms"] and no_decay["use_rms"]
    opt = FusionOptimizer(groups, lr=0.1, momentum_beta=0.0)
    assert [g["Lambda"] for g in opt.param_groups] == [0.05, 0.0]
    # zero gradients are masked everywhere: only weight decay moves a parameter, and only a weight
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        expected = b if p.dim() <= 1 else b * (1 - 0.1 * 0.05)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


def test_fusedbun_alias_is_the_same_class():
    assert fusedbun.Fusedbun is fusedbun.FusionOptimizer
