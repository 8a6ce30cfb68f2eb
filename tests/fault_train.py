"""Train a small model with FusionOptimizer, checkpointing atomically, and resume after a crash.

``tests/test_faults.py`` starts this script, kills it with SIGKILL at random points and starts it again
until it finishes; the final parameters must equal those of a run that was never interrupted, bit for
bit. The script is also a minimal pattern for crash-safe training:

- Every ``--every`` steps it writes a checkpoint (model, optimizer, LR scheduler and the step count).
  The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file is
  renamed over the checkpoint with ``os.replace`` (atomic on POSIX), then the directory is fsynced. A
  crash leaves either the old checkpoint or the new one, never a mix.
- The file carries a magic string, the payload length and its SHA-256. ``torch.load`` alone accepts
  many corrupted files without complaint (a flipped bit inside a tensor is just another number), so
  :func:`load_checkpoint` verifies the digest first and raises :class:`CheckpointError` (a
  ``ValueError``) for a truncated or corrupted file: resuming from a damaged checkpoint is refused,
  never silently wrong.
- The data of step ``t`` comes from a generator seeded by ``(seed, t)``, so a resumed run sees the
  same batches as an uninterrupted one without saving any RNG state.

Usage: ``python tests/fault_train.py --ckpt CKPT --out FINAL [--steps 40] [--every 4] [--engine auto]``.
It prints ``step N`` after each step, ``saving N`` before and ``saved N`` after each checkpoint,
``resumed N`` when it starts from a checkpoint and ``done`` at the end (stdout, flushed).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import struct
import sys
import time

import torch
import torch.nn as nn

from fusedbun import FusionOptimizer

MAGIC = b"FUSEDBUN-CKPT-1\n"
HEADER = struct.Struct("<32sQ")  # sha256 digest, payload length
ENGINES = {"auto": {}, "single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted or not a checkpoint at all."""


def save_checkpoint(obj, path: str, *, slow: float = 0.0) -> None:
    """Write ``obj`` to ``path`` atomically: temporary file, fsync, ``os.replace``, fsync of the directory.

    ``slow`` (seconds) spreads the write over 8 chunks with pauses in between; the fault test uses it to
    make a kill land in the middle of a write.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    data = MAGIC + HEADER.pack(hashlib.sha256(payload).digest(), len(payload)) + payload
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        if slow:
            chunk = -(-len(data) // 8)
            for i in range(0, len(data), chunk):
                f.write(data[i : i + chunk])
                f.flush()
                time.sleep(slow / 8)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str):
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` if it is damaged."""
    with open(path, "rb") as f:
        data = f.read()
    head = len(MAGIC) + HEADER.size
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise CheckpointError(f"checkpoint {path} is truncated: {len(data)} bytes, not even a header")
        raise CheckpointError(f"{path} is not a fusedbun checkpoint (wrong magic bytes)")
    if len(data) < head:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(data)} bytes, the header alone has {head}")
    digest, length = HEADER.unpack_from(data, len(MAGIC))
    payload = data[head:]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path} is truncated or padded: payload of {len(payload)} bytes, expected {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 checksum does not match")
    return torch.load(io.BytesIO(payload), weights_only=True)


def build(seed: int, steps: int, engine: str):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    weights = [p for p in model.parameters() if p.dim() >= 2]
    biases = [p for p in model.parameters() if p.dim() < 2]
    opt = FusionOptimizer(
        [{"params": weights}, {"params": biases, "Lambda": 0.0}],
        lr=0.02,
        use_rms=True,
        centralize=True,
        **ENGINES[engine],
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return model, opt, scheduler


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(32, 8, generator=gen)
    y = torch.stack([x[:, :4].sum(1), x[:, 4:].prod(1), x[:, 0].sin(), x[:, 1] * x[:, 2]], dim=1)
    return x, y


def train(args) -> None:
    torch.set_num_threads(1)  # one thread: the same reduction order in every run
    model, opt, scheduler = build(args.seed, args.steps, args.engine)
    for stale in glob.glob(f"{glob.escape(args.ckpt)}.tmp.*"):  # left by a run killed mid-write
        os.remove(stale)
    start = 0
    if os.path.exists(args.ckpt):
        ckpt = load_checkpoint(args.ckpt)  # a damaged checkpoint raises: never resume from wrong state
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        print(f"resumed {start}", flush=True)
    for t in range(start, args.steps):
        x, y = batch(args.seed, t)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        scheduler.step()
        print(f"step {t + 1}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
        if (t + 1) % args.every == 0 or t + 1 == args.steps:
            state = {
                "step": t + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
            print(f"saving {t + 1}", flush=True)
            save_checkpoint(state, args.ckpt, slow=args.slow_save)
            print(f"saved {t + 1}", flush=True)
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.out)
    print("done", flush=True)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint path (resumed from when it exists)")
    parser.add_argument("--out", required=True, help="where the final model and optimizer state go")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="auto")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--slow-save", type=float, default=0.0, help="seconds over which each checkpoint is written")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        train(parse())
    except CheckpointError as exc:
        print(f"fault_train: refusing to resume: {exc}", file=sys.stderr)
        sys.exit(3)
