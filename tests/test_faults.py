"""Faults the package must survive or refuse: a crash mid-training, and state dicts that do not belong.

- SIGKILL at random points of a training run (between steps, in the middle of writing a checkpoint, at
  a random time) and resuming until done gives the final parameters and optimizer state of a run that
  was never interrupted, bit for bit (``fault_train.py`` is the training script; its checkpoint container
  is tested in ``test_fault_train.py``).
- A state dict of another optimizer or of another parameter layout, or one holding impossible values, is
  refused by ``load_state_dict`` with a clear ``ValueError`` and leaves the optimizer as it was (and able
  to step).

Invalid arguments are refused in ``test_optim_contract.py``; non-finite gradients are ``test_nonfinite.py``'s.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fault_train
import pytest
import torch
from helpers import assert_tree_equal

from fusedbun import FusionOptimizer

SCRIPT = Path(__file__).with_name("fault_train.py")
REPO = SCRIPT.parent.parent
STEPS, EVERY = 30, 4
FAULT_SEED = int(os.environ.get("FUSEDBUN_FAULT_SEED", "20240611"))


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
# state dicts that do not belong: other optimizers, other layouts, impossible values
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
