"""Fingerprints of what every engine computes, to show that a refactoring changed no bit.

Runs FusionOptimizer through its public API on fixed seeds, for every engine this machine can run
(the reference loop, the multi-tensor engine, the fused C kernel, the Triton kernel on CUDA or under
Triton's interpreter, row-sparse gradients, DTensor shards on a one-process gloo group) and a matrix of
configurations (dtypes, momentum dtypes, flags, non-finite entries, shapes of 0 to 4 dims, groups whose
step counts differ), and prints one SHA-256 per case over the bytes of every parameter and state tensor.

    python tests/engine_fingerprint.py --out before.json   # on the old code
    python tests/engine_fingerprint.py --compare before.json   # on the new code: exit 1 on any difference

The hashes depend on the machine (the C kernel is built with -march=native, so FMA contraction follows the
CPU); compare runs on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings

import torch
from torch import nn

import fusedbun

SHAPES = [(), (7,), (130,), (9, 33), (4, 5, 6), (3, 2, 4, 5), (0, 4)]
CONFIGS = {
    "defaults": {},
    "rms": dict(use_rms=True),
    "rms+centralize": dict(use_rms=True, centralize=True),
    "maximize+centralize": dict(maximize=True, centralize=True, Lambda=0.0),
    "no momentum": dict(momentum_beta=0.0, use_rms=True),
    "bf16 momentum": dict(momentum_dtype=torch.bfloat16, use_rms=True, beta_decay=0.5),
    "fp16 momentum": dict(momentum_dtype=torch.float16, momentum_beta=0.3),
    "eps large": dict(eps=0.3, use_rms=True),
}
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
STEPS = 4


SAVE_CUDA = [False]
SAVED: dict[str, list] = {}  # with --save: the tensors behind each fingerprint, to find what differs
_CASE: list[str] = [""]


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if hasattr(t, "to_local"):
            t = t.to_local()
        t = t.cpu().contiguous().reshape(-1)
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if _CASE[0]:
            SAVED.setdefault(_CASE[0], []).append(t.clone())
    return h.hexdigest()


def _state_tensors(opt) -> list:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p)
            state = opt.state.get(p, {})
            for key in sorted(state):
                value = state[key]
                out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def _dense_case(device, dtype, config, engine, *, nonfinite_entries: bool, staggered: bool):
    gen = torch.Generator().manual_seed(1234)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)) for s in SHAPES]
    groups = [{"params": params[:4]}, {"params": params[4:], "lr": 0.03, "Lambda": 0.0}]
    opt = fusedbun.FusionOptimizer(groups, lr=0.01, **config, **engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(STEPS):
            for i, p in enumerate(params):
                if staggered and i % 3 == 1 and step == 1:
                    p.grad = None  # this tensor skips a step: the groups' step counts differ
                    continue
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + i)
                if nonfinite_entries and g.numel() > 2 and step == 2:
                    flat = g.view(-1)
                    flat[0], flat[-1] = float("nan"), float("inf")
                    flat[1] = 2.0**70
                g.view(-1)[: max(0, g.numel() // 5)] *= 1e-12  # entries the eps mask drops
                p.grad = g.to(dtype).to(device)
            opt.step()
    return _digest(_state_tensors(opt))


def _sparse_case(config, engine):
    gen = torch.Generator().manual_seed(99)
    emb = nn.Embedding(40, 6, sparse=True)
    vec = nn.EmbeddingBag(30, 1, sparse=True)  # a (30, 1) table
    with torch.no_grad():
        emb.weight.copy_(torch.randn(40, 6, generator=gen))
        vec.weight.copy_(torch.randn(30, 1, generator=gen))
    opt = fusedbun.FusionOptimizer(list(emb.parameters()) + list(vec.parameters()), lr=0.05, **config, **engine)
    for _ in range(STEPS):
        opt.zero_grad()
        idx = torch.randint(0, 30, (12,), generator=gen)
        (emb(idx).pow(2).sum() + vec(idx.view(3, 4)).sum()).backward()
        opt.step()
    return _digest(_state_tensors(opt))


def _dtensor_case(config):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(delete=False)
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    gen = torch.Generator().manual_seed(7)
    params = [
        nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)]))
        for s in [(7,), (9, 33), (4, 5, 6)]
    ]
    opt = fusedbun.FusionOptimizer(params, lr=0.01, **config)
    for _ in range(STEPS):
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, [Shard(0)])
        opt.step()
    return _digest(_state_tensors(opt))


def _engines():
    engines = {"single": {"foreach": False}, "foreach": {"foreach": True}}
    from fusedbun.engines import fused_cpu

    if not fused_cpu.unavailable_reason():
        engines["fused_cpu"] = {"fused": True}
    return engines


def fingerprints() -> dict[str, str]:
    out = {}
    torch.set_num_threads(2)
    for name, engine in _engines().items():
        for cname, config in CONFIGS.items():
            for dtype in PARAM_DTYPES:
                if dtype == torch.float64 and config.get("momentum_dtype") is not None:
                    continue
                for nonfinite_entries in (False, True):
                    for staggered in (False, True):
                        key = f"{name}|{cname}|{str(dtype)[6:]}|nonfinite={nonfinite_entries}|staggered={staggered}"
                        out[key] = _dense_case(
                            "cpu", dtype, config, engine, nonfinite_entries=nonfinite_entries, staggered=staggered
                        )
            out[f"{name}|{cname}|sparse"] = _sparse_case(config, engine)
        for mode in ("skip",):
            out[f"{name}|nonfinite={mode}"] = _dense_case(
                "cpu", torch.float32, dict(use_rms=True, nonfinite=mode), engine, nonfinite_entries=True, staggered=True
            )
    if torch.cuda.is_available():
        for cname, config in CONFIGS.items():
            for dtype in PARAM_DTYPES:
                if dtype == torch.float64 and config.get("momentum_dtype") is not None:
                    continue
                for nonfinite_entries in (False, True):
                    key = f"fused_cuda|{cname}|{str(dtype)[6:]}|nonfinite={nonfinite_entries}"
                    _CASE[0] = key if SAVE_CUDA[0] else ""
                    out[key] = _dense_case(
                        "cuda", dtype, config, {"fused": True}, nonfinite_entries=nonfinite_entries, staggered=True
                    )
    _CASE[0] = ""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_gloo_available():
            for cname, config in CONFIGS.items():
                out[f"dtensor|{cname}"] = _dtensor_case(config)
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        out["dtensor"] = f"not run: {type(exc).__name__}: {exc}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the fingerprints to this JSON file")
    parser.add_argument("--compare", help="compare with fingerprints written earlier; exit 1 on a difference")
    parser.add_argument("--save", help="also save the CUDA cases' tensors to this file (torch.save), for a diff")
    args = parser.parse_args()
    SAVE_CUDA[0] = bool(args.save)
    prints = fingerprints()
    _CASE[0] = ""
    if args.save:
        torch.save(SAVED, args.save)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(prints, f, indent=1, sort_keys=True)
    print(f"{len(prints)} cases")
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = sorted(k for k in before if prints.get(k) != before[k])
        missing = sorted(set(prints) - set(before))
        for k in differ:
            print(f"DIFFERS: {k}")
        print(f"{len(before) - len(differ)} of {len(before)} cases bit-identical; {len(missing)} new cases")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
