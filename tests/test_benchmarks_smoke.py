"""Smoke test of the comparison harness: one tiny task, two optimizers, a few steps, the files it writes."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the benchmark tasks load their data from scikit-learn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks`

from benchmarks import compare  # noqa: E402
from benchmarks.optimizers import DenseSecondMomentFusion, state_bytes  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "compare_smoke.json"
    argv = [
        "--tasks",
        "tabular_diabetes",
        "--optimizers",
        "fusion_rms",
        "adamw",
        "--lr-factors",
        "0.5",
        "1",
        "--seeds",
        "1",
        "2",
        "--steps",
        "6",
        "--out",
        str(out),
        "--no-progress",
    ]
    compare.main(argv)
    return out, argv


def test_json_records_every_run_with_the_command_and_machine(results):
    out, argv = results
    doc = json.loads(out.read_text())
    assert doc["meta"]["command"].endswith(" ".join(argv))
    assert doc["meta"]["machine"]["device"] in ("cpu", "cuda")
    assert doc["meta"]["versions"]["torch"]
    # 2 optimizers x (2 sweep learning rates + 2 seeds)
    assert len(doc["runs"]) == 8
    for run in doc["runs"]:
        assert run["steps_done"] == 6 and not run["diverged"]
        assert math.isfinite(run["final_val_loss"]) and math.isfinite(run["final_test_loss"])
        assert run["ms_per_step"] > 0
        assert (run["memory"] is not None) == (run["phase"] == "seeds")
    assert {r["seed"] for r in doc["runs"] if r["phase"] == "sweep"} == {0}


def test_seed_runs_use_the_sweeps_best_learning_rate(results):
    out, _ = results
    doc = json.loads(out.read_text())
    for name in ("fusion_rms", "adamw"):
        sweep = [r for r in doc["runs"] if r["optimizer"] == name and r["phase"] == "sweep"]
        best = min(sweep, key=lambda r: r["final_val_loss"])["lr"]
        seeds = [r for r in doc["runs"] if r["optimizer"] == name and r["phase"] == "seeds"]
        assert {r["lr"] for r in seeds} == {best}
        summary = next(s for s in doc["summary"] if s["optimizer"] == name)
        assert summary["best_lr"] == best
        vals = [r["final_val_loss"] for r in seeds]
        assert summary["val"]["mean"] == pytest.approx(sum(vals) / 2)
        assert summary["val"]["n"] == 2


def test_state_bytes_per_param_match_the_state_layout(results):
    out, _ = results
    doc = json.loads(out.read_text())
    by_name = {s["optimizer"]: s for s in doc["summary"]}
    n = by_name["adamw"]["n_params"]
    # MLP 10-64-64-1: 6 tensors. AdamW: exp_avg + exp_avg_sq (8 B/param) + a 4-byte step per tensor.
    assert by_name["adamw"]["state_bytes_per_param"] == pytest.approx((8 * n + 4 * 6) / n)
    # FusionOptimizer: fp32 momentum (4 B/param), step, and n + m accumulators for the 3 weight matrices.
    hess = (10 + 64) + (64 + 64) + (64 + 1) + (64 + 64 + 1)
    assert by_name["fusion_rms"]["state_bytes_per_param"] == pytest.approx((4 * n + 4 * 6 + 4 * hess) / n)


def test_csv_files_sit_next_to_the_json(results):
    out, _ = results
    runs = list(csv.DictReader(open(out.with_name(out.stem + "_runs.csv"))))
    summary = list(csv.DictReader(open(out.with_name(out.stem + "_summary.csv"))))
    assert len(runs) == 8 and len(summary) == 2
    assert {r["optimizer"] for r in summary} == {"fusion_rms", "adamw"}


def test_resume_skips_runs_already_recorded(results, monkeypatch, tmp_path):
    out, argv = results
    copy = tmp_path / "resumed.json"
    copy.write_text(out.read_text())
    argv = [str(copy) if a == str(out) else a for a in argv]
    monkeypatch.setattr(compare, "run_one", lambda *a, **k: pytest.fail("a recorded run was run again"))
    compare.main(argv + ["--resume"])
    assert json.loads(copy.read_text())["runs"] == json.loads(out.read_text())["runs"]


def test_dense_second_moment_ablation_updates_the_real_parameters():
    import torch

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    before = w.detach().clone()
    opt = DenseSecondMomentFusion([w], lr=0.1, use_rms=True)
    w.grad = torch.randn(3, 4)
    opt.step()
    assert not torch.equal(w.detach(), before)
    opt.zero_grad()
    assert w.grad is None
    # a dense second moment: 3*4 numbers, not SM3's 3 + 4
    (view,) = opt.param_groups[0]["params"]
    assert opt.state[view]["exp_hessian"].numel() == 12
    assert state_bytes(opt) == 4 + 4 * 12 + 4 * 12


def test_resume_with_another_optimizer_keeps_the_recorded_ones(results, tmp_path):
    out, argv = results
    copy = tmp_path / "extended.json"
    copy.write_text(out.read_text())
    argv = [str(copy) if a == str(out) else a for a in argv]
    i = argv.index("--optimizers")
    argv[i + 1 : i + 3] = ["sgd_momentum"]
    doc = compare.main(argv + ["--resume"])
    assert {r["optimizer"] for r in doc["runs"]} == {"fusion_rms", "adamw", "sgd_momentum"}
    assert len(doc["runs"]) == 12
    assert {s["optimizer"] for s in doc["summary"]} == {"fusion_rms", "adamw", "sgd_momentum"}
    assert set(doc["optimizers"]) == {"fusion_rms", "adamw", "sgd_momentum"}
    assert doc["meta"]["history"][0]["command"].endswith(" ".join(results[1]))
