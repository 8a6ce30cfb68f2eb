"""FusionOptimizer on several processes: FSDP2 (DTensor shards), DDP and distributed checkpoints.

Each job starts its processes on this machine (gloo backend, a file store in pytest's tmp_path) and
trains the same small network as a single process does; the tests compare the two. The network has
odd shapes on purpose: dim 0 of its weights (5, 7, 3) does not divide by 2 or 4, so FSDP2's shards are
uneven, and on 4 ranks some ranks hold no rows of a weight at all.

Jobs are few and shared (one 2-rank job feeds most tests, one 4-rank job the resharding tests) because
starting processes is the expensive part; they start from a forkserver that has torch imported once.
The ``gpu`` variant runs the 2-rank job with NCCL on two CUDA devices and is skipped without them.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import launch
from torch import nn

import fusedbun

_HAS_GLOO = dist.is_available() and dist.is_gloo_available()
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not _HAS_GLOO, reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.timeout(600),
]

STEPS = 4  # steps of each FSDP2/DDP comparison
SAVE_AT, CONTINUE = 3, 3  # the checkpoint tests save after SAVE_AT steps and train CONTINUE more
BATCH = 8  # divisible by 1, 2 and 4 ranks
LR = 0.02
# fp32 tolerance for "the same training": largest |difference| relative to the largest |value| of the
# tensor. The reductions differ in order (FSDP2 averages per-rank gradients, the reference takes one
# mean), so the results agree to a few fp32 ulps (measured: up to about 3e-7), not bit for bit.
REL_TOL = 5e-6

CONFIGS = {
    "defaults": {},
    "rms+centralize": dict(use_rms=True, centralize=True),
    "no momentum, rms": dict(momentum_beta=0.0, use_rms=True),
    "maximize, centralize, no decay": dict(maximize=True, centralize=True, Lambda=0.0),
    "bf16 momentum, rms": dict(momentum_dtype=torch.bfloat16, use_rms=True, beta_decay=0.5),
}
CKPT_CONFIG = dict(use_rms=True, centralize=True)


# ----------------------------------------------------------------------------------------------------
# The model, the data and the single-process reference: identical in every process.


class Net(nn.Module):
    """Conv1d (5, 3, 3) -> Linear (7, 30) -> LayerNorm (7) -> Linear (3, 7): 1-D, 2-D and 3-D params."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.fc1 = nn.Linear(5 * 6, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(self.norm(torch.tanh(self.fc1(h))))


def make_net(device="cpu") -> Net:
    torch.manual_seed(0)
    return Net().to(device)


def make_batches(n: int, device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 3, 8, generator=gen).to(device), torch.randn(BATCH, 3, generator=gen).to(device))
        for _ in range(n)
    ]


def train(net, opt, batches, rank=0, world=1) -> None:
    """One step per batch; each rank takes its contiguous 1/world of the batch (FSDP2/DDP average)."""
    rows = BATCH // world
    for x, y in batches:
        sl = slice(rank * rows, (rank + 1) * rows)
        nn.functional.mse_loss(net(x[sl]), y[sl]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def reference(config: dict, steps: int, device="cpu"):
    """The single-process run: plain tensors, the reference (single-tensor) engine, the full batch."""
    net = make_net(device)
    opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, foreach=False, **config)
    train(net, opt, make_batches(steps, device))
    return net, opt


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel_diff(a, b) -> float:
    a, b = _full(a).detach().double().cpu(), _full(b).detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(net, opt, ref_net, ref_opt) -> dict[str, float]:
    """Largest relative difference of the parameters and of the optimizer state, over all tensors."""
    params, state = 0.0, 0.0
    ref_params = dict(ref_net.named_parameters())
    for name, p in net.named_parameters():
        q = ref_params[name]
        params = max(params, rel_diff(p, q))
        s, r = opt.state[p], ref_opt.state[q]
        assert s["step"].item() == r["step"].item(), f"{name}: step {s['step']} vs {r['step']}"
        hs, hr = s["exp_hessian"], r["exp_hessian"]
        for a, b in zip(hs, hr) if isinstance(hr, list) else [(hs, hr)]:
            state = max(state, rel_diff(a, b))
        if "momentum_buffer" in r:
            state = max(state, rel_diff(s["momentum_buffer"], r["momentum_buffer"]))
    return {"params": params, "state": state}


# ----------------------------------------------------------------------------------------------------
# Process launch


def _init(rank: int, world: int, init_method: str, backend: str) -> str:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
        # TF32 convolutions would round differently for the per-rank and the full batch.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    return device


def _fsdp_net(device: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world,))
    net = make_net(device)
    for module in (net.conv, net.fc1, net.norm, net.fc2):
        fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


# ----------------------------------------------------------------------------------------------------
# The jobs. Rank 0 writes what the tests check into out_dir.


def _placement_report(net, opt) -> list[str]:
    """Problems with the state layout: every state tensor must be a DTensor laid out as the rule says."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    problems = []
    for name, p in net.named_parameters():
        s = opt.state[p]
        hess = s["exp_hessian"]
        if p.dim() >= 2:
            want = [(Shard(0),)] + [(Replicate(),)] * (p.dim() - 1)
            got = [tuple(a.placements) if isinstance(a, DTensor) else "plain" for a in hess]
            local_rows = hess[0].to_local().shape[0]
            if local_rows != p.to_local().shape[0]:
                problems.append(
                    f"{name}: dim-0 accumulator holds {local_rows} local rows, the shard {p.to_local().shape[0]}"
                )
        else:
            want, got = [(Shard(0),)], [tuple(hess.placements) if isinstance(hess, DTensor) else "plain"]
        if got != want:
            problems.append(f"{name}: exp_hessian placements {got}, expected {want}")
        if "momentum_buffer" in s and tuple(s["momentum_buffer"].placements) != tuple(p.placements):
            problems.append(f"{name}: momentum placements {s['momentum_buffer'].placements}")
    return problems


def _collectives_of_one_step(net, opt, batch, rank, world) -> dict:
    """Record every all-reduce of one optimizer step, and fail on any gather of a whole tensor."""
    from torch.distributed.tensor import DTensor

    x, y = batch
    rows = BATCH // world
    nn.functional.mse_loss(net(x[rank * rows : (rank + 1) * rows]), y[rank * rows : (rank + 1) * rows]).backward()
    calls, gathers = [], []
    real_all_reduce, real_full, real_redistribute = dist.all_reduce, DTensor.full_tensor, DTensor.redistribute

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((str(op).rsplit(".", 1)[-1], tensor.numel()))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def gather(name, real):
        def wrapped(self, *args, **kwargs):
            gathers.append(name)
            return real(self, *args, **kwargs)

        return wrapped

    dist.all_reduce = all_reduce
    DTensor.full_tensor = gather("full_tensor", real_full)
    DTensor.redistribute = gather("redistribute", real_redistribute)
    try:
        opt.step()
    finally:
        dist.all_reduce, DTensor.full_tensor, DTensor.redistribute = real_all_reduce, real_full, real_redistribute
    opt.zero_grad(set_to_none=True)
    expected_max = sum(sum(p.shape[1:]) for p in net.parameters() if p.dim() >= 2)
    n_params = sum(1 for _ in net.parameters())
    return {"calls": calls, "gathers": gathers, "expected_max_numel": expected_max, "n_params": n_params}


def _nonfinite_on_one_rank(device, world, rank) -> dict:
    """Rank 1 alone sees an Inf in its shard of fc1.weight's gradient: in skip mode every rank must skip
    that param."""
    net = _fsdp_net(device, world)
    opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, nonfinite="skip")
    before = {n: _full(p).detach().clone() for n, p in net.named_parameters()}
    x, y = make_batches(1, device)[0]
    rows = BATCH // world
    nn.functional.mse_loss(net(x[rank * rows : (rank + 1) * rows]), y[rank * rows : (rank + 1) * rows]).backward()
    if rank == 1:
        net.fc1.weight.grad.to_local()[0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    after = {n: _full(p).detach() for n, p in net.named_parameters()}
    return {
        "warned": any(issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message) for w in caught),
        "fc1.weight unchanged": bool(torch.equal(before["fc1.weight"], after["fc1.weight"])),
        "fc1.weight has no state": len(opt.state[net.fc1.weight]) == 0 or opt.state[net.fc1.weight]["step"].item() == 0,
        "others changed": all(not torch.equal(before[n], after[n]) for n in before if n != "fc1.weight"),
    }


def _nonfinite_masked_on_one_rank(device, world, rank) -> dict:
    """Mask mode: rank 1 alone sees an Inf in its shard of fc1.weight's gradient. The step must equal, bit for
    bit, the step where that entry is 0.0 (the other entries of fc1.weight still step), on every rank."""
    nets = [_fsdp_net(device, world) for _ in range(2)]
    opts = [fusedbun.FusionOptimizer(net.parameters(), lr=LR, nonfinite="mask") for net in nets]
    x, y = make_batches(1, device)[0]
    rows = BATCH // world
    for net, opt in zip(nets, opts):
        train(net, opt, make_batches(2, device), rank, world)  # finite state first
        nn.functional.mse_loss(net(x[rank * rows : (rank + 1) * rows]), y[rank * rows : (rank + 1) * rows]).backward()
    before = _full(nets[0].fc1.weight).detach().clone()
    if rank == 1:
        nets[0].fc1.weight.grad.to_local()[0, 0] = float("inf")
        nets[1].fc1.weight.grad.to_local()[0, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for opt in opts:
            opt.step()

    def tensors(net, opt):
        out = {}
        for name, p in net.named_parameters():
            out[name] = _full(p).detach()
            for key, value in opt.state[p].items():
                for k, t in enumerate(value if isinstance(value, list) else [value]):
                    out[f"{name}/{key}/{k}"] = _full(t).detach()
        return out

    got, want = tensors(nets[0], opts[0]), tensors(nets[1], opts[1])
    return {
        "differ": sorted(k for k in want if not torch.equal(got[k], want[k])),
        "non-finite": sorted(k for k, t in got.items() if not torch.isfinite(t).all()),
        "fc1.weight steps": [opts[0].state[nets[0].fc1.weight]["step"].item()],
        "fc1.weight changed": bool(not torch.equal(before, got["fc1.weight"])),
    }


def _dtensor_placements(mesh, placement_sets, rank) -> dict[str, float]:
    """Optimizer-level check with identical gradients: parameters distributed by hand with each set of
    placements (shards along dim 0, dim 1, replicas, 2-D meshes) against plain tensors, 3 steps."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    shapes = [(5, 7), (3, 4, 2), (1, 3), (7, 3), (0, 3), (5,), ()]
    out = {}
    gen = torch.Generator().manual_seed(2)
    for label, placements in placement_sets.items():
        for cfg_name, cfg, dtype in [
            ("defaults", {}, torch.float32),
            ("rms+centralize", dict(use_rms=True, centralize=True), torch.float32),
            ("bf16 params, rms", dict(use_rms=True), torch.bfloat16),
        ]:
            init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3)]

            def fit(t, placements=placements):  # a placement sharding a dim t lacks falls back to Replicate
                return [pl if not hasattr(pl, "dim") or pl.dim < t.dim() else Replicate() for pl in placements]

            dps = [nn.Parameter(distribute_tensor(t.clone().to(mesh.device_type), mesh, fit(t))) for t in init]
            rps = [nn.Parameter(t.clone().to(mesh.device_type)) for t in init]
            dopt = fusedbun.FusionOptimizer(dps, lr=0.1, **cfg)
            ropt = fusedbun.FusionOptimizer(rps, lr=0.1, foreach=False, **cfg)
            for gs in grads:
                for p, g in zip(dps, gs):
                    p.grad = distribute_tensor(g.to(mesh.device_type), mesh, p.placements)
                for p, g in zip(rps, gs):
                    p.grad = g.clone().to(mesh.device_type)
                dopt.step()
                ropt.step()
            worst = 0.0
            for p, q in zip(dps, rps):
                worst = max(worst, rel_diff(p, q))
                hs, hr = dopt.state[p]["exp_hessian"], ropt.state[q]["exp_hessian"]
                for a, b in zip(hs, hr) if isinstance(hr, list) else [(hs, hr)]:
                    worst = max(worst, rel_diff(a, b))
            out[f"{label} / {cfg_name}"] = worst
    return out


def two_rank_job(rank: int, world: int, init_method: str, out_dir: str, backend: str) -> None:
    device = _init(rank, world, init_method, backend)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict = {"fsdp": {}, "placement_problems": {}}
    # FSDP2 against one process, per configuration.
    for name, cfg in CONFIGS.items():
        net = _fsdp_net(device, world)
        opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, **cfg)
        train(net, opt, make_batches(STEPS, device), rank, world)
        results["fsdp"][name] = compare(net, opt, *reference(cfg, STEPS, device))
        results["placement_problems"][name] = _placement_report(net, opt)

    # DDP: plain tensors, gradients all-reduced by DDP; the optimizer needs nothing.
    net = make_net(device)
    ddp = DDP(net, device_ids=[rank] if backend == "nccl" else None)
    opt = fusedbun.FusionOptimizer(ddp.parameters(), lr=LR, **CKPT_CONFIG)
    train(ddp, opt, make_batches(STEPS, device), rank, world)
    results["ddp"] = compare(net, opt, *reference(CKPT_CONFIG, STEPS, device))

    # What crosses the network in one step (the default "mask" mode, and "skip", which adds the finiteness
    # check); and a non-finite gradient seen by one rank only.
    for key, extra in (("collectives", {}), ("collectives-skip", {"nonfinite": "skip"})):
        net = _fsdp_net(device, world)
        opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, **extra)
        train(net, opt, make_batches(1, device), rank, world)  # state exists before the recorded step
        results[key] = _collectives_of_one_step(net, opt, make_batches(2, device)[1], rank, world)
    results["nonfinite"] = _nonfinite_on_one_rank(device, world, rank)
    results["nonfinite-mask"] = _nonfinite_masked_on_one_rank(device, world, rank)

    # Hand-distributed parameters with other placements than FSDP2's.
    mesh = init_device_mesh(torch.device(device).type, (world,))
    results["placements"] = _dtensor_placements(
        mesh, {"Shard(0)": [Shard(0)], "Shard(1)": [Shard(1)], "Replicate": [Replicate()]}, rank
    )

    # Distributed checkpoint after SAVE_AT steps, then CONTINUE more steps for the resharding tests.
    net = _fsdp_net(device, world)
    opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, **CKPT_CONFIG)
    batches = make_batches(SAVE_AT + CONTINUE, device)
    train(net, opt, batches[:SAVE_AT], rank, world)
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    train(net, opt, batches[SAVE_AT:], rank, world)
    continued = {n: _full(p).detach().cpu() for n, p in net.named_parameters()}

    if rank == 0:
        torch.save({"results": results, "continued": continued}, os.path.join(out_dir, "two_rank.pt"))
    dist.barrier()
    dist.destroy_process_group()


def four_rank_job(rank: int, world: int, init_method: str, out_dir: str, backend: str) -> None:
    """Resume the 2-rank checkpoint on 4 ranks (FSDP2 reshards: 3 rows over 4 ranks leaves one empty)."""
    device = _init(rank, world, init_method, backend)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    net = _fsdp_net(device, world)
    opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, **CKPT_CONFIG)
    model_sd, optim_sd = get_state_dict(net, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded_steps = sorted({opt.state[p]["step"].item() for p in net.parameters()})
    local_rows = {n: p.to_local().shape[0] for n, p in net.named_parameters() if p.dim() >= 2}
    problems = _placement_report(net, opt)
    train(net, opt, make_batches(SAVE_AT + CONTINUE, device)[SAVE_AT:], rank, world)
    resumed = {n: _full(p).detach().cpu() for n, p in net.named_parameters()}

    # 2-D meshes (2 x 2): a weight sharded on two dims, and HSDP's (Replicate, Shard(0)).
    mesh2 = init_device_mesh(torch.device(device).type, (2, 2))
    placements = _dtensor_placements(
        mesh2,
        {"2x2 (Shard(0), Shard(1))": [Shard(0), Shard(1)], "2x2 (Replicate, Shard(0))": [Replicate(), Shard(0)]},
        rank,
    )
    all_rows = [None] * world
    dist.all_gather_object(all_rows, local_rows)
    if rank == 0:
        torch.save(
            {
                "resumed": resumed,
                "loaded_steps": loaded_steps,
                "rows": all_rows,
                "problems": problems,
                "placements": placements,
            },
            os.path.join(out_dir, "four_rank.pt"),
        )
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_rank")
    launch(two_rank_job, 2, out, str(out), "gloo")
    record = torch.load(out / "two_rank.pt", weights_only=False)
    return {"out": out, **record}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_training_equals_one_process(two_rank, config):
    got = two_rank["results"]["fsdp"][config]
    assert got["params"] <= REL_TOL, f"parameters differ by {got['params']:.2e} (relative) from one process"
    assert got["state"] <= REL_TOL, f"optimizer state differs by {got['state']:.2e} (relative) from one process"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_state_is_sharded_like_the_parameters(two_rank, config):
    assert two_rank["results"]["placement_problems"][config] == []


def test_ddp_training_equals_one_process(two_rank):
    got = two_rank["results"]["ddp"]
    assert got["params"] <= REL_TOL and got["state"] <= REL_TOL, got


def test_one_step_gathers_nothing_and_sends_one_small_max_all_reduce(two_rank):
    rec = two_rank["results"]["collectives"]
    assert rec["gathers"] == [], f"the step gathered whole tensors: {rec['gathers']}"
    # "mask" (the default) needs no finiteness check: one MAX over the non-dim-0 accumulators, nothing else.
    assert rec["calls"] == [("MAX", rec["expected_max_numel"])]


def test_one_skip_mode_step_adds_one_small_sum_all_reduce_for_the_finiteness_check(two_rank):
    rec = two_rank["results"]["collectives-skip"]
    assert rec["gathers"] == [], f"the step gathered whole tensors: {rec['gathers']}"
    # The finiteness check (one number per parameter), then one MAX over the non-dim-0 accumulators.
    assert rec["calls"] == [("SUM", rec["n_params"]), ("MAX", rec["expected_max_numel"])]


def test_a_nonfinite_gradient_on_one_rank_is_skipped_on_every_rank(two_rank):
    rec = two_rank["results"]["nonfinite"]
    assert rec == {
        "warned": True,
        "fc1.weight unchanged": True,
        "fc1.weight has no state": True,
        "others changed": True,
    }


def test_a_nonfinite_gradient_on_one_rank_is_masked_as_a_zero_in_mask_mode(two_rank):
    rec = two_rank["results"]["nonfinite-mask"]
    assert rec == {"differ": [], "non-finite": [], "fc1.weight steps": [3.0], "fc1.weight changed": True}


@pytest.mark.parametrize(
    "label",
    [
        f"{p} / {c}"
        for p in ("Shard(0)", "Shard(1)", "Replicate")
        for c in ("defaults", "rms+centralize", "bf16 params, rms")
    ],
)
def test_dtensor_placements_match_plain_tensors(two_rank, label):
    assert two_rank["results"]["placements"][label] <= REL_TOL


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # no process group here, on purpose
def test_checkpoint_saved_on_2_ranks_resumes_on_1_process(two_rank):
    """Load the sharded checkpoint into a plain, undistributed model and optimizer; train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net = make_net()
    opt = fusedbun.FusionOptimizer(net.parameters(), lr=LR, **CKPT_CONFIG)
    model_sd, optim_sd = get_state_dict(net, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=two_rank["out"] / "ckpt")
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    # The state is what one process would have after SAVE_AT steps, in full, as plain tensors ...
    ref_net, ref_opt = reference(CKPT_CONFIG, SAVE_AT)
    for s in opt.state.values():
        hess = s["exp_hessian"] if isinstance(s["exp_hessian"], list) else [s["exp_hessian"]]
        assert all(type(t) is torch.Tensor for t in [s["momentum_buffer"], *hess])
    diff = compare(net, opt, ref_net, ref_opt)
    assert diff["params"] <= REL_TOL and diff["state"] <= REL_TOL, diff
    # ... and training continues as it did on the 2 ranks.
    train(net, opt, make_batches(SAVE_AT + CONTINUE)[SAVE_AT:])
    for n, p in net.named_parameters():
        assert rel_diff(p, two_rank["continued"][n]) <= REL_TOL, n


@pytest.fixture(scope="module")
def four_rank(two_rank):
    launch(four_rank_job, 4, two_rank["out"], str(two_rank["out"]), "gloo")
    return torch.load(two_rank["out"] / "four_rank.pt", weights_only=False)


def test_checkpoint_saved_on_2_ranks_resumes_on_4_ranks(two_rank, four_rank):
    assert four_rank["loaded_steps"] == [float(SAVE_AT)]
    # torch.chunk's split of 3 rows over 4 ranks: the last rank holds no row of fc2.weight.
    assert [r["fc2.weight"] for r in four_rank["rows"]] == [1, 1, 1, 0]
    assert four_rank["problems"] == []
    for n, p in four_rank["resumed"].items():
        assert rel_diff(p, two_rank["continued"][n]) <= REL_TOL, n


@pytest.mark.parametrize(
    "label",
    [
        f"2x2 ({p}) / {c}"
        for p in ("Shard(0), Shard(1)", "Replicate, Shard(0)")
        for c in ("defaults", "rms+centralize", "bf16 params, rms")
    ],
)
def test_two_dimensional_meshes_match_plain_tensors(four_rank, label):
    assert four_rank["placements"][label] <= REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="needs 2 CUDA devices and NCCL",
)
def test_fsdp2_and_ddp_on_two_gpus_with_nccl(tmp_path):
    launch(two_rank_job, 2, tmp_path, str(tmp_path), "nccl")
    results = torch.load(tmp_path / "two_rank.pt", weights_only=False)["results"]
    for name, got in {**results["fsdp"], "ddp": results["ddp"]}.items():
        assert got["params"] <= REL_TOL and got["state"] <= REL_TOL, (name, got)
    assert all(problems == [] for problems in results["placement_problems"].values())
    assert results["collectives"]["gathers"] == []
    assert max(results["placements"].values()) <= REL_TOL
