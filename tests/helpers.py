"""Helpers shared by the test files: seeded parameters and gradients, and exact comparison of state.

"Bit for bit" in the tests means :func:`assert_tree_equal`: the same keys, and every tensor of the same
dtype, shape and value (``torch.equal``).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

# Shapes of a small model's parameters: 2-D and 3-D (SM3 accumulators), 1-D and 0-D (dense second moment).
SHAPES = [(5, 4), (4,), (3, 2, 3), (), (1, 6)]


def assert_tree_equal(a, b, where: str = "state") -> None:
    """Bit-for-bit equality of nested state (tensors: dtype, shape and bits, compared on the CPU)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        a, b = a.cpu(), b.cpu()
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs()
            where_max = tuple(int(i) for i in (d == d.max()).nonzero()[0]) if d.dim() and d.numel() else ()
            raise AssertionError(f"{where}: not bit-identical, max |diff| {d.max().item():.3g} at {where_max}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def accumulators(state) -> list[torch.Tensor]:
    """A parameter's second-moment tensors as a list (one dense tensor, or the SM3 accumulators)."""
    h = state["exp_hessian"]
    return list(h) if isinstance(h, (list, tuple)) else [h]


def state_tensors(opt, p) -> list[torch.Tensor]:
    """The tensors of ``p``'s optimizer state, key by key in sorted order (lists of accumulators flattened)."""
    out = []
    for key in sorted(opt.state[p]):
        value = opt.state[p][key]
        out += list(value) if isinstance(value, (list, tuple)) else [value]
    return out


def make_params(seed: int, shapes=SHAPES, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def seeded_grad(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A gradient with exact zeros and tiny entries, so the eps mask is exercised."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen)
    r = torch.rand(shape, generator=gen)
    g = torch.where(r < 0.1, torch.zeros_like(g), g)
    g = torch.where((r >= 0.1) & (r < 0.2), g * 1e-9, g)
    return g.to(dtype)


def set_grads(params, step: int, seed: int = 0) -> None:
    """The same gradients for the same (step, seed), whatever run asks: twins see identical inputs."""
    for i, p in enumerate(params):
        p.grad = seeded_grad(p.shape, seed * 100_003 + step * 101 + i, p.dtype)


def run(opt, params, steps: range, seed: int = 0) -> None:
    for t in steps:
        set_grads(params, t, seed)
        opt.step()


def assert_same_run(pa, oa, pb, ob) -> None:
    """Two (params, optimizer) pairs hold identical parameters and identical per-parameter state."""
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a.detach(), b.detach()), f"param {i} {tuple(a.shape)} differs"
        assert_tree_equal(dict(oa.state[a]), dict(ob.state[b]), f"state of param {i}")


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def launch(job, nprocs: int, tmp_path: Path, *args) -> None:
    """Run ``job(rank, world, init_method, *args)`` in ``nprocs`` processes; a failure in any re-raises."""
    if _start_method() == "forkserver":
        # Children fork from a server that imported these once (seconds instead of a re-import each).
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed.fsdp", "fusedbun"])
    store = tmp_path / f"store-{job.__name__}-{nprocs}"
    torch.multiprocessing.start_processes(
        job, args=(nprocs, f"file://{store}", *args), nprocs=nprocs, join=True, start_method=_start_method()
    )
