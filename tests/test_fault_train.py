"""The test helper ``fault_train.py`` (the training script of the SIGKILL test in ``test_faults.py``): its
checkpoint container refuses a damaged file instead of resuming from wrong state.

These test the helper, not the package: ``torch.load`` alone accepts many corrupted files (a flipped bit
inside a tensor is just another number), so the container's magic bytes, length and SHA-256 are what make
"resumed from the checkpoint" in the SIGKILL test mean "resumed from the state that was saved".
"""

from __future__ import annotations

import random
from pathlib import Path

import fault_train
import pytest
import torch
from helpers import make_params, run

from fusedbun import FusionOptimizer


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    params = make_params(0, shapes=[(4, 6), (6,)])
    opt = FusionOptimizer(params, lr=0.01)
    run(opt, params, range(2))
    path = tmp_path / "ckpt"
    fault_train.save_checkpoint({"step": 2, "optimizer": opt.state_dict()}, str(path))
    return path


def test_an_intact_checkpoint_loads_back_as_saved(checkpoint):
    loaded = fault_train.load_checkpoint(str(checkpoint))
    assert loaded["step"] == 2 and set(loaded["optimizer"]) == {"state", "param_groups"}


@pytest.mark.parametrize("keep", [0, 5, 20, 40, 0.5, -1], ids=lambda k: f"keep{k}")
def test_truncated_checkpoint_is_refused(checkpoint, keep):
    data = checkpoint.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    checkpoint.write_bytes(data[:n])
    with pytest.raises(fault_train.CheckpointError, match="truncated"):
        fault_train.load_checkpoint(str(checkpoint))


def test_every_flipped_bit_is_refused(checkpoint):
    data = checkpoint.read_bytes()
    rng = random.Random(7)
    positions = rng.sample(range(len(data)), 60) + list(range(len(fault_train.MAGIC) + 40))  # header included
    for i in positions:
        damaged = bytearray(data)
        damaged[i] ^= 1 << rng.randrange(8)
        checkpoint.write_bytes(bytes(damaged))
        with pytest.raises(fault_train.CheckpointError):
            fault_train.load_checkpoint(str(checkpoint))


def test_padded_or_foreign_files_are_refused(checkpoint, tmp_path):
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(fault_train.CheckpointError, match="padded"):
        fault_train.load_checkpoint(str(checkpoint))
    plain = tmp_path / "plain.pt"
    torch.save({"step": 1}, plain)  # a torch file without the header
    with pytest.raises(fault_train.CheckpointError, match="not a fusedbun checkpoint"):
        fault_train.load_checkpoint(str(plain))


def test_training_refuses_to_resume_from_a_damaged_checkpoint(tmp_path):
    ckpt, out = tmp_path / "c", tmp_path / "o"
    fault_train.save_checkpoint({"step": 4}, str(ckpt))
    damaged = bytearray(ckpt.read_bytes())
    damaged[-1] ^= 0x10
    ckpt.write_bytes(bytes(damaged))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(fault_train.CheckpointError, match="checksum"):
            fault_train.train(fault_train.parse(["--ckpt", str(ckpt), "--out", str(out), "--steps", "8"]))
    finally:
        torch.set_num_threads(threads)
    assert ckpt.read_bytes() == bytes(damaged), "the damaged checkpoint was overwritten"
    assert not out.exists()
