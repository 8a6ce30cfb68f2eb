"""FusionOptimizer under FSDP2 on several processes: the same training as one process, and its traffic.

    python -m benchmarks.scaling_out --out scaling_out.json                  # 2 CPU processes, gloo
    python -m benchmarks.scaling_out --backend nccl --world 2 --out ...      # 2 GPUs, NCCL

Run from the repository root. One job, three records (rank 0 writes them, with the machine, the library
versions, the date and the command):

1. ``equivalence``: a stack of transformer-style blocks of width ``--width`` (odd by default, so that
   FSDP2's shards are uneven) trained ``--steps`` steps with FSDP2 on ``--world`` ranks and on one
   process with plain tensors and the reference engine, per optimizer configuration: the largest
   ``|difference|`` of the parameters and of the optimizer state, and the largest ``|value|``.
2. ``collectives``: for blocks of each width in ``--widths``, every collective of one training step
   (forward, backward, ``optimizer.step()``): its kind, reduction op, number of elements and bytes, and
   whether the optimizer issued it. Recorded by wrapping the ``torch.distributed`` functions that FSDP2
   and fusedbun call.
3. ``local_shapes``: on every rank, the local shape of each parameter's shard and of its SM3
   accumulators' local slices (the ``--width`` model).

With ``--checkpoint DIR``, the model and optimizer state of the ``CHECKPOINT_CONFIG`` run are also saved
there with ``torch.distributed.checkpoint`` (one file per rank), for loading elsewhere.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fusedbun

CONFIGS = {
    "defaults": {},
    "use_rms + centralize": dict(use_rms=True, centralize=True),
    "no momentum, use_rms": dict(momentum_beta=0.0, use_rms=True),
}
CHECKPOINT_CONFIG = "use_rms + centralize"
BATCH, TOKENS, LR = 8, 6, 0.01
# The torch.distributed functions FSDP2 (torch 2.5 .. 2.13) and fusedbun use, by the kind of collective.
COLLECTIVES = {
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_reduce": "all_reduce",
}


class Block(nn.Module):
    """Pre-norm attention (one head) and a 4x MLP: weights (3d, d), (d, d), (4d, d), (d, 4d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def make_model(d: int, device, blocks: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(d) for _ in range(blocks)]).to(device)


def make_batches(d: int, steps: int, device):
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, TOKENS, d, generator=gen).to(device),
            torch.randn(BATCH, TOKENS, d, generator=gen).to(device),
        )
        for _ in range(steps)
    ]


def train(model, opt, batches, rank: int = 0, world: int = 1) -> None:
    rows = BATCH // world
    for x, y in batches:
        sl = slice(rank * rows, (rank + 1) * rows)
        F.mse_loss(model(x[sl]), y[sl]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def fsdp_model(d: int, device, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world,))
    model = make_model(d, device)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state_tensors(opt, p):
    s = opt.state[p]
    hess = s["exp_hessian"] if isinstance(s["exp_hessian"], list) else [s["exp_hessian"]]
    return [*hess, *([s["momentum_buffer"]] if "momentum_buffer" in s else [])]


def equivalence(d: int, steps: int, device, rank: int, world: int, checkpoint: str | None = None) -> dict:
    out = {}
    for name, cfg in CONFIGS.items():
        model = fsdp_model(d, device, world)
        opt = fusedbun.FusionOptimizer(model.parameters(), lr=LR, **cfg)
        train(model, opt, make_batches(d, steps, device), rank, world)
        if checkpoint and name == CHECKPOINT_CONFIG:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        ref = make_model(d, device)
        ref_opt = fusedbun.FusionOptimizer(ref.parameters(), lr=LR, foreach=False, **cfg)
        train(ref, ref_opt, make_batches(d, steps, device))
        dp = ds = value = state_value = 0.0
        for p, q in zip(model.parameters(), ref.parameters()):
            dp = max(dp, (_full(p) - q).abs().max().item())
            value = max(value, q.abs().max().item())
            for a, b in zip(_state_tensors(opt, p), _state_tensors(ref_opt, q)):
                ds = max(ds, (_full(a).float() - b.float()).abs().max().item())
                state_value = max(state_value, b.float().abs().max().item())
        out[name] = {
            "max_abs_param_diff": dp,
            "max_abs_state_diff": ds,
            "max_abs_param": value,
            "max_abs_state": state_value,
            "steps": steps,
        }
    return out


class _Recorder:
    """Wraps the collectives in torch.distributed; records the outermost call of each, by phase."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.phase = "forward+backward"
        self._depth = threading.local()
        self._real = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def _wrap(self, name, real):
        def wrapped(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                # all-gather: the output is the full tensor; reduce-scatter: the input is; all-reduce: the one tensor
                t = max(tensors, key=lambda x: x.numel())
                op = kwargs.get("op", next((a for a in args if isinstance(a, dist.ReduceOp.RedOpType)), None))
                self.records.append(
                    {
                        "phase": self.phase,
                        "kind": COLLECTIVES[name],
                        "op": None if op is None else str(op).rsplit(".", 1)[-1],
                        "numel": t.numel(),
                        "bytes": t.numel() * t.element_size(),
                    }
                )
            self._depth.n = depth + 1
            try:
                return real(*args, **kwargs)
            finally:
                self._depth.n = depth

        return wrapped

    def __enter__(self):
        for name, real in self._real.items():
            setattr(dist, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(dist, name, real)


def collectives(d: int, device, rank: int, world: int) -> list[dict]:
    model = fsdp_model(d, device, world)
    opt = fusedbun.FusionOptimizer(model.parameters(), lr=LR, use_rms=True)
    batches = make_batches(d, 2, device)
    train(model, opt, batches[:1], rank, world)  # the recorded step is a steady-state one
    rows = BATCH // world
    x, y = batches[1]
    with _Recorder() as rec:
        F.mse_loss(model(x[rank * rows : (rank + 1) * rows]), y[rank * rows : (rank + 1) * rows]).backward()
        rec.phase = "optimizer.step"
        opt.step()
    shapes = [list(p.shape) for p in model.parameters()]
    return {"records": rec.records, "param_shapes": shapes}


def local_shapes(d: int, device, rank: int, world: int) -> dict:
    model = fsdp_model(d, device, world)
    opt = fusedbun.FusionOptimizer(model.parameters(), lr=LR)
    train(model, opt, make_batches(d, 1, device), rank, world)
    out = {}
    for name, p in model.named_parameters():
        hess = opt.state[p]["exp_hessian"]
        out[name] = {
            "global": list(p.shape),
            "param": list(p.to_local().shape),
            "accumulators": [list(a.to_local().shape) for a in hess]
            if isinstance(hess, list)
            else [list(hess.to_local().shape)],
            "placements": [str(a.placements) for a in hess] if isinstance(hess, list) else [str(hess.placements)],
        }
    return out


def machine() -> dict:
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(), "gpu": gpu}


def job(rank: int, world: int, init_method: str, args: dict) -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if args["backend"] == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(
        args["backend"], init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    result = {
        "equivalence": equivalence(args["width"], args["steps"], device, rank, world, args["checkpoint"]),
        "collectives": {str(d): collectives(d, device, rank, world) for d in args["widths"]},
    }
    shapes = [None] * world
    dist.all_gather_object(shapes, local_shapes(args["width"], device, rank, world))
    result["local_shapes"] = shapes
    if rank == 0:
        record = {
            "command": args["command"],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "torch": torch.__version__,
            "fusedbun": fusedbun.__version__,
            "backend": args["backend"],
            "world": world,
            "width": args["width"],
            "widths": args["widths"],
            "lr": LR,
            "configs": {name: {k: str(v) for k, v in cfg.items()} for name, cfg in CONFIGS.items()},
            "checkpoint_config": CHECKPOINT_CONFIG,
            "batch": [BATCH, TOKENS],
            **result,
        }
        with open(args["out"], "w") as f:
            json.dump(record, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--width", type=int, default=13, help="block width of the equivalence run (default 13)")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[8, 13, 32, 64], help="block widths whose collectives are recorded"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--checkpoint", default=None, help=f"directory for a distributed checkpoint of the {CHECKPOINT_CONFIG!r} run"
    )
    ns = parser.parse_args(argv)
    if BATCH % ns.world:
        parser.error(f"--world must divide the batch of {BATCH}")
    if ns.backend == "nccl" and torch.cuda.device_count() < ns.world:
        parser.error(f"--backend nccl needs {ns.world} CUDA devices, found {torch.cuda.device_count()}")
    args = dict(
        vars(ns),
        command=shlex.join([os.path.basename(sys.executable), "-m", "benchmarks.scaling_out", *(argv or sys.argv[1:])]),
    )
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed.fsdp", "fusedbun"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            job, args=(ns.world, f"file://{tmp}/store", args), nprocs=ns.world, join=True, start_method=method
        )


if __name__ == "__main__":
    main()
