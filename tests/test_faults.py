"""Faults: crashes, damaged checkpoints, foreign state dicts and bad input of every kind.

- SIGKILL at random points of a training run (between steps, in the middle of writing a checkpoint, at
  a random time) and resuming until done gives the final parameters and optimizer state of a run that
  was never interrupted, bit for bit (``fault_train.py`` is the training script).
- A truncated or corrupted checkpoint, a state dict of another optimizer or of another parameter
  layout, or one holding impossible values, is refused with a clear error and leaves the optimizer as
  it was.
- Every invalid argument raises ``ValueError`` or ``TypeError`` naming it: in the constructor, in
  ``add_param_group``, and when it is set in a param group between steps (checked at ``step``).
- Non-finite gradients follow ``nonfinite="mask"`` (the default) / ``"skip"`` / ``"raise"`` and never
  corrupt the state (``test_nonfinite.py`` holds the mask-mode tests); very large and very small finite
  gradients (fp16's range, fp64 past fp32's, subnormals) do not overflow the second moment.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import fault_train
import pytest
import torch

from fusedbun import FusionOptimizer

SCRIPT = Path(__file__).with_name("fault_train.py")
REPO = SCRIPT.parent.parent
STEPS, EVERY = 30, 4
FAULT_SEED = int(os.environ.get("FUSEDBUN_FAULT_SEED", "20240611"))


def assert_tree_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------------------------------------
# SIGKILL and resume
# ----------------------------------------------------------------------------------------------------------


def launch(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--every",
        str(EVERY),
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def checkpoint_step(ckpt: Path) -> int:
    return fault_train.load_checkpoint(str(ckpt))["step"] if ckpt.exists() else 0


@pytest.mark.timeout(600)
def test_sigkill_at_random_points_then_resuming_matches_an_uninterrupted_run(tmp_path):
    rng = random.Random(FAULT_SEED)
    reference = launch(tmp_path / "ref.ckpt", tmp_path / "ref.out")  # runs alongside the faulted runs
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "run.out"
    # each kind at least once, then a random mix: after step N, mid-write of a checkpoint, after a random delay
    modes = ["step", "mid-save", "timer", rng.choice(["step", "mid-save", "timer"])]
    log, kills, resumes, stale_tmp_seen = [], 0, 0, 0
    for mode in modes + [None]:
        before = checkpoint_step(ckpt)
        extra = {"mid-save": ["--slow-save", "0.4"], "timer": ["--step-delay", "0.02"]}.get(mode, [])
        proc = launch(ckpt, out, *extra)
        timer = None
        target = rng.randint(before + 1, min(STEPS - 1, before + 2 * EVERY + 1))
        save_at = min(STEPS - 2, before + rng.randint(1, 2) * EVERY)
        save_at -= save_at % EVERY
        last_step, last_saved, resumed = 0, 0, None
        for line in proc.stdout:
            word, _, num = line.strip().partition(" ")
            if mode == "timer" and timer is None:  # a random moment of the training, once start-up is over
                timer = threading.Timer(rng.uniform(0.0, 0.5), proc.send_signal, (signal.SIGKILL,))
                timer.start()
            if word == "resumed":
                resumed = int(num)
            elif word == "step":
                last_step = int(num)
                if mode == "step" and last_step == target:
                    proc.send_signal(signal.SIGKILL)
            elif word == "saved":
                last_saved = int(num)
            elif word == "saving" and mode == "mid-save" and int(num) >= save_at:
                time.sleep(rng.uniform(0.0, 0.3))  # the write is spread over 0.4 s
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        if timer is not None:
            timer.cancel()
        err = proc.stderr.read()
        log.append(f"{mode}: resumed={resumed} last_step={last_step} last_saved={last_saved} rc={proc.returncode}")
        if before and (resumed is not None or last_step):  # (a kill during start-up prints nothing)
            assert resumed == before, f"did not resume from the checkpoint at step {before}: {log}"
            resumes += 1
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            stale_tmp_seen += bool(list(tmp_path.glob("run.ckpt.tmp.*")))
            # the checkpoint on disk is whole: never older than the last completed save, never newer than the last step
            assert last_saved <= checkpoint_step(ckpt) <= max(last_step, before), log
        else:
            assert proc.returncode == 0, f"{log}\n{err}"
            if mode is not None:
                continue  # finished before the kill landed: nothing left to resume
            break
    assert proc.returncode == 0 and out.exists(), log
    assert not list(tmp_path.glob("run.ckpt.tmp.*")), "a stale temporary checkpoint was left behind"
    reference.communicate(timeout=300)
    assert reference.returncode == 0

    final, ref = fault_train.load_checkpoint(str(out)), fault_train.load_checkpoint(str(tmp_path / "ref.out"))
    assert_tree_equal(final["model"], ref["model"], "model")
    assert_tree_equal(final["optimizer"], ref["optimizer"], "optimizer")
    assert kills >= 3 and resumes >= 3, log
    print(f"faults injected: {kills}, resumes: {resumes}, kills mid-write leaving a temp file: {stale_tmp_seen}; {log}")


# ----------------------------------------------------------------------------------------------------------
# damaged checkpoints
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(shapes=((4, 6), (6,)), seed=0, steps=2, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    opt = FusionOptimizer(params, lr=0.01, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    params, opt = make_optimizer()
    path = tmp_path / "ckpt"
    fault_train.save_checkpoint({"step": 2, "optimizer": opt.state_dict()}, str(path))
    return path


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


def test_raw_torch_files_damaged_fail_in_the_loader(tmp_path):
    """Without the checksum a truncated torch file still fails loudly in torch.load (the loader's error)."""
    path = tmp_path / "raw.pt"
    torch.save(make_optimizer()[1].state_dict(), path)
    data = path.read_bytes()
    for n in (0, 10, len(data) // 2):
        path.write_bytes(data[:n])
        with pytest.raises((RuntimeError, EOFError, ValueError, OSError)):
            torch.load(path, weights_only=True)


def test_training_refuses_to_resume_from_a_damaged_checkpoint(tmp_path):
    ckpt, out = tmp_path / "c", tmp_path / "o"
    params, opt = make_optimizer()
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


# ----------------------------------------------------------------------------------------------------------
# state dicts that do not belong: other optimizers, other layouts, impossible values
# ----------------------------------------------------------------------------------------------------------


def other_optimizer_state(cls, **kw):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(4, 6, generator=gen).requires_grad_(), torch.randn(6, generator=gen).requires_grad_()]
    opt = cls(params, lr=0.01, **kw)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return opt.state_dict()


def refused_and_unchanged(opt, params, state_dict, match: str) -> None:
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert_tree_equal(opt.state_dict(), before, "optimizer after a refused load")
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    for p in params:  # and it still steps
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda: other_optimizer_state(torch.optim.Adam), id="Adam"),
        pytest.param(lambda: other_optimizer_state(torch.optim.AdamW, weight_decay=0.1), id="AdamW"),
        pytest.param(lambda: other_optimizer_state(torch.optim.SGD, momentum=0.9), id="SGD-momentum"),
        pytest.param(lambda: other_optimizer_state(torch.optim.Adagrad), id="Adagrad"),
    ],
)
def test_state_dict_of_another_optimizer_is_refused(source):
    params, opt = make_optimizer()
    refused_and_unchanged(opt, params, source(), "does not look like FusionOptimizer")


LAYOUTS = {
    "transposed": ((6, 4), (6,)),
    "flattened": ((24,), (6,)),
    "swapped": ((6,), (4, 6)),
    "other-width": ((4, 7), (6,)),
    "3-D": ((4, 6, 1), (6,)),
    "fewer-params": ((4, 6),),
    "more-params": ((4, 6), (6,), (3,)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_state_dict_of_another_parameter_layout_is_refused(layout):
    _, other = make_optimizer(LAYOUTS[layout], seed=3)
    params, opt = make_optimizer()
    refused_and_unchanged(opt, params, copy.deepcopy(other.state_dict()), "fit|parameters|param groups")


def test_state_dict_with_another_number_of_groups_is_refused():
    params, opt = make_optimizer()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"] = [dict(sd["param_groups"][0], params=[0]), dict(sd["param_groups"][0], params=[1])]
    refused_and_unchanged(opt, params, sd, "param groups")


def _poison(field: str, value):
    def edit(sd):
        st = sd["state"][0]
        if field == "step":
            st["step"] = value
        elif field == "exp_hessian":
            st["exp_hessian"][1][0, 2] = value
        elif field == "exp_hessian-dtype":
            st["exp_hessian"] = [a.to(torch.int32) for a in st["exp_hessian"]]
        else:
            st["momentum_buffer"][1, 1] = value
        return sd

    return edit


POISON = {
    "step-negative": _poison("step", torch.tensor(-1.0)),
    "step-fraction": _poison("step", 1.5),
    "step-nan": _poison("step", torch.tensor(float("nan"))),
    "step-string": _poison("step", "two"),
    "hessian-nan": _poison("exp_hessian", float("nan")),
    "hessian-negative": _poison("exp_hessian", -1.0),
    "hessian-inf": _poison("exp_hessian", float("inf")),
    "hessian-int": _poison("exp_hessian-dtype", None),
    "momentum-inf": _poison("momentum_buffer", float("-inf")),
    "momentum-nan": _poison("momentum_buffer", float("nan")),
}


@pytest.mark.parametrize("poison", list(POISON))
def test_state_dict_with_impossible_values_is_refused(poison):
    params, opt = make_optimizer()
    sd = POISON[poison](copy.deepcopy(opt.state_dict()))
    refused_and_unchanged(opt, params, sd, "invalid")


# ----------------------------------------------------------------------------------------------------------
# non-finite, huge and tiny gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_raise_mode_changes_nothing_in_any_group(engine, bad):
    gen = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(s, generator=gen).requires_grad_() for s in ((4, 5), (6,), (3, 2, 2)))
    opt = FusionOptimizer([{"params": [a]}, {"params": [b, c], "lr": 0.05}], lr=0.1, nonfinite="raise", **engine)
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [x.detach().clone() for x in (a, b, c)]
    for x in (a, b, c):
        x.grad = torch.randn(x.shape, generator=gen)
    c.grad[1, 1, 0] = bad  # in the last group: the first group must not have stepped either
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(x.detach(), v) for x, v in zip((a, b, c), values)), "a parameter moved"
    assert_tree_equal(opt.state_dict(), before, "state after a refused step")


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_skip_mode_per_group_leaves_the_skipped_state_untouched_and_raise_groups_raise(engine, bad):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 3, generator=gen).requires_grad_(), torch.randn(7, generator=gen).requires_grad_()
    opt = FusionOptimizer(
        [{"params": [a]}, {"params": [b], "nonfinite": "raise"}], lr=0.1, use_rms=True, nonfinite="skip", **engine
    )
    for _ in range(2):
        a.grad, b.grad = torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)
        opt.step()
    state_a, value_a = copy.deepcopy(dict(opt.state[a])), a.detach().clone()
    a.grad, b.grad = torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)
    a.grad[0, 0] = bad
    value_b = b.detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert torch.equal(a.detach(), value_a)
    assert_tree_equal(dict(opt.state[a]), state_a, "skipped parameter's state")
    assert not torch.equal(b.detach(), value_b), "the finite group did not step"
    b.grad = torch.full((7,), bad)
    a.grad = torch.ones(5, 3)
    with pytest.raises(FloatingPointError):
        opt.step()


@pytest.mark.parametrize("shape", [(4,), (300, 300)], ids=["small", "90k-elements"])
def test_fp16_gradients_up_to_fp16_max_step_and_keep_a_finite_second_moment(engine, shape):
    """An fp16 gradient whose fp16 norm overflows (65504) is finite; its squares fit the fp32 statistic."""
    p = torch.zeros(shape, dtype=torch.float16, requires_grad=True)
    opt = FusionOptimizer([p], lr=1e-3, use_rms=True, **engine)
    p.grad = torch.full(shape, 65504.0, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "skipped" warning
        opt.step()
    hess = opt.state[p]["exp_hessian"]
    for h in hess if isinstance(hess, list) else [hess]:
        assert torch.isfinite(h).all() and h.max().item() == pytest.approx(65504.0**2, rel=1e-6)
    assert torch.isfinite(p).all() and (p != 0).all()


@pytest.mark.parametrize("mode", ["skip", "mask"])
@pytest.mark.parametrize(
    "dtype,value,skipped",
    [
        (torch.float64, 1e18, False),  # g**2 = 1e36 fits the fp32 second moment
        (torch.float64, 1e20, True),  # g**2 = 1e40 does not: skipped, not stored as Inf
        (torch.float32, 1.5e19, False),
        (torch.float32, 3e19, True),
        (torch.bfloat16, 1e30, True),
    ],
    ids=["fp64-1e18", "fp64-1e20", "fp32-1.5e19", "fp32-3e19", "bf16-1e30"],
)
def test_gradients_past_the_fp32_second_moment_are_skipped_never_stored_as_inf(engine, dtype, value, skipped, mode):
    """ "skip" skips the parameter; "mask" (the default) masks the entry (|g| >= 2**64): the step counts, the
    entry takes no step, and its statistic stays zero."""
    p = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    q = torch.zeros(5, dtype=dtype, requires_grad=True)
    opt = FusionOptimizer([p, q], lr=1e-3, use_rms=True, nonfinite=mode, **engine)
    for x in (p, q):
        x.grad = torch.zeros(x.shape, dtype=dtype)
        x.grad.view(-1)[0] = value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    word = "skipped" if mode == "skip" else "non-finite"
    assert any(word in str(w.message) for w in caught) == skipped
    for x in (p, q):
        st = opt.state[x]
        hess = st["exp_hessian"] if isinstance(st["exp_hessian"], list) else [st["exp_hessian"]]
        assert all(torch.isfinite(h).all() for h in hess), "the second moment overflowed"
        assert torch.isfinite(x).all()
        assert st["step"].item() == (0 if skipped and mode == "skip" else 1)
        if skipped:  # skipped or masked: the (zero) parameter and its statistic did not move
            assert torch.count_nonzero(x) == 0 and all(torch.count_nonzero(h) == 0 for h in hess)
        else:
            assert x.view(-1)[0] < 0 and all(h.max() > 0 for h in hess)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_subnormal_gradients_give_finite_steps_and_a_nonnegative_second_moment(engine, dtype):
    """Gradients below fp32's normal range: their squares underflow the fp32 statistic to 0. Without RMS
    normalization eps may be as small as the gradients; with it, eps >= fp32's tiny keeps g / (sqrt(0) + eps)
    finite (a smaller eps is refused, see BAD_COMBINATIONS)."""
    tiny = torch.finfo(dtype).tiny
    cases = [
        (dict(use_rms=False, eps=tiny / 2**10), lambda t: tiny / 2 ** (t + 2)),  # subnormal in dtype
        (dict(use_rms=True, eps=torch.finfo(torch.float32).tiny), lambda t: 1e-30 / (t + 1)),  # squares underflow
    ]
    for kw, value in cases:
        p = torch.zeros(4, 3, dtype=dtype, requires_grad=True)
        q = torch.zeros(6, dtype=dtype, requires_grad=True)
        opt = FusionOptimizer([p, q], lr=1e-3, **kw, **engine)
        for t in range(3):
            for x in (p, q):
                x.grad = torch.full(x.shape, value(t), dtype=dtype)
                assert (x.grad != 0).all()
            opt.step()
        for x in (p, q):
            st = opt.state[x]
            hess = st["exp_hessian"] if isinstance(st["exp_hessian"], list) else [st["exp_hessian"]]
            assert all(torch.isfinite(h).all() and (h >= 0).all() for h in hess), kw
            assert torch.isfinite(x).all() and torch.isfinite(st["momentum_buffer"]).all(), kw
            assert (x < 0).all(), f"a positive gradient did not move the parameter down: {kw}"
