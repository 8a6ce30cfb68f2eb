"""Compare FusionOptimizer with its peers: tasks x optimizers x learning rates x seeds.

    python -m benchmarks.compare                          # everything, CPU (CUDA when present)
    python -m benchmarks.compare --tasks digits_cnn --optimizers fusion_rms adamw --seeds 1 2 3

Protocol. For every task and optimizer: a learning-rate sweep on one seed (``--sweep-seed``) over the
same relative grid (``--lr-factors`` times the optimizer's ``default_lr``), the best learning rate by
final validation loss, then fresh seeds (``--seeds``) at that learning rate, which give the reported mean
and spread. The learning rate is constant; every other hyperparameter is the library's default.

Per run: train loss, validation loss every ``eval_every`` steps, final validation and test loss, time
per step (median over steps after a warm-up, evaluation excluded; the whole step and ``optimizer.step()``
alone), bytes of every tensor in ``optimizer.state`` per model parameter, and peak memory of one more
training step measured at the end (see :func:`peak_step_memory`).

Results go to ``--out`` (JSON, rewritten after every run so that ``--resume`` can pick up), plus two CSV
files next to it (``*_runs.csv``, ``*_summary.csv``). The JSON records the machine, library versions,
date, the seeds and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from benchmarks.optimizers import NOT_RUN, OPTIMIZERS, OptimizerSpec, get_optimizer, state_bytes
from benchmarks.tasks import TASKS, Task, TaskData, get_task

__all__ = ["run_one", "peak_step_memory", "summarize", "machine_info", "main", "LR_FACTORS"]

# The same grid for every optimizer: 6 points, half a decade apart, from default/10 to default*31.6.
# Short runs on small models favour learning rates above the libraries' defaults (set for large models),
# and the tabular tasks, which overfit, favour lower ones; this grid brackets both.
LR_FACTORS = tuple(10 ** (k / 2) for k in range(-2, 4))
WARMUP_STEPS = 5  # steps left out of the timing medians
MEMORY_METHOD = (
    "peak bytes of one more training step after the run (gradients set to None first), measured in the "
    "seed runs only. CPU: live tensor bytes at the start (parameters + optimizer.state) plus the highest "
    "running total of allocations minus frees recorded by torch.profiler(profile_memory=True); CUDA: "
    "torch.cuda.max_memory_allocated. See peak_step_memory in benchmarks/compare.py."
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compare_cpu.json"


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return params + grads + state_bytes(optimizer)


def _profiled_peak(prof) -> tuple[int, int]:
    """(peak, peak inside the ``optimizer.step`` range) of the running total of CPU allocations minus
    frees, relative to the start of a profile recorded with ``profile_memory=True``.

    Every allocation and free is an event with its own timestamp in the profiler's event tree, so the
    running total is exact in time. Blocks allocated before the profile started and freed during it are
    not reported by the profiler; they can only make the true peak lower.
    """
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    window = next(((n.start_time_ns, n.end_time_ns) for n in nodes if n.name == "optimizer.step"), None)
    allocations = sorted(
        (n.start_time_ns, n.extra_fields.alloc_size)
        for n in nodes
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"
    )
    running = peak = 0
    step_base = None
    step_peak = 0
    for t, size in allocations:
        if window is not None and step_base is None and t >= window[0]:
            step_base = running
        running += size
        peak = max(peak, running)
        if step_base is not None and t <= window[1]:
            step_peak = max(step_peak, running - step_base)
    return peak, step_peak


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a moment: torch's CPU profiler prints start/stop lines from C++
    (``profiler_start``, ``profiler_stop``) that would clutter logs and notebook outputs."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> dict:
    """Peak memory of one training step ``step()`` (forward, backward, ``optimizer.step()``), gradients
    set to ``None`` before it, in bytes.

    - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching allocator's
      own count of live tensor bytes).
    - CPU: live tensor bytes at the start (parameters and ``optimizer.state``, counted tensor by tensor)
      plus the highest running total of allocations minus frees that ``torch.profiler`` records with
      ``profile_memory=True`` during the step, each allocation and free at its own time (see
      :func:`_profiled_peak`). ``opt_step_extra_bytes`` is the same running total inside the range that
      ``step`` marks with ``torch.profiler.record_function("optimizer.step")``, above its value when that
      range began: the optimizer step's temporaries and any state it creates. ``rss_delta_bytes`` is the rise of
      the process's peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) over its
      size at the start: what the OS saw, allocator caching included; ``None`` where that is not available.
    """
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    live = _model_state_bytes(model, optimizer)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return dict(
            method="torch.cuda.max_memory_allocated",
            live_start_bytes=live,
            peak_bytes=int(torch.cuda.max_memory_allocated(device)),
            step_extra_bytes=int(torch.cuda.max_memory_allocated(device) - base),
            opt_step_extra_bytes=None,
            rss_delta_bytes=None,
        )
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak, in_step = _profiled_peak(prof)
    optimizer.zero_grad(set_to_none=True)
    rss_delta = None
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        step()
        after = _rss_kib("VmHWM")
        if before is not None and after is not None:
            rss_delta = (after - before) * 1024
    except OSError:
        pass
    return dict(
        method="torch.profiler(profile_memory=True), live tensors at start + peak of allocations - frees",
        live_start_bytes=live,
        peak_bytes=live + peak,
        step_extra_bytes=peak,
        opt_step_extra_bytes=in_step,
        rss_delta_bytes=rss_delta,
    )


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: tuple[torch.Tensor, torch.Tensor], chunk: int = 512) -> float:
    """Mean loss over a whole split (in chunks of rows, weighted by their size)."""
    x, y = split
    total, count = 0.0, 0
    for i in range(0, len(x), chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        total += float(task.loss_fn(model(xb), yb)) * len(xb)
        count += len(xb)
    return total / count


# ---------------------------------------------------------------- one run


def run_one(
    task: Task,
    spec: OptimizerSpec,
    lr: float,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    steps: int | None = None,
    measure_memory: bool = True,
    data: TaskData | None = None,
) -> dict:
    """Train ``task``'s model with ``spec`` at ``lr`` from ``seed``; return the run's record."""
    device = torch.device(device)
    data = (data or task.load()).to(device)
    steps = steps or task.steps
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = task.build_model(data).to(device)
    optimizer = spec.build(model, lr)
    n_params = sum(p.numel() for p in model.parameters())

    def set_mode(train: bool) -> None:
        model.train(train)
        if spec.schedule_free:
            optimizer.train() if train else optimizer.eval()

    def training_step(xb, yb) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(xb), yb)
        loss.backward(create_graph=spec.create_graph)
        return loss

    set_mode(True)
    step_ms, opt_ms, step_cpu_ms, opt_cpu_ms, train_window = [], [], [], [], []
    curve = []  # (step, mean train loss since the last evaluation, validation loss)
    diverged = False
    with warnings.catch_warnings():
        # create_graph=True makes a parameter/gradient reference cycle; gradients are set to None each step.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        for step in range(1, steps + 1):
            xb, yb = task.sample(data, task.batch_size, gen)
            _sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            loss = training_step(xb, yb)
            _sync(device)
            t1, c1 = time.perf_counter(), time.thread_time()
            optimizer.step()
            _sync(device)
            t2, c2 = time.perf_counter(), time.thread_time()
            if step > WARMUP_STEPS:
                step_ms.append((t2 - t0) * 1e3)
                opt_ms.append((t2 - t1) * 1e3)
                step_cpu_ms.append((c2 - c0) * 1e3)
                opt_cpu_ms.append((c2 - c1) * 1e3)
            value = float(loss.detach())
            train_window.append(value)
            if not math.isfinite(value):
                diverged = True
                break
            if step % task.eval_every == 0 or step == steps:
                set_mode(False)
                val = evaluate(model, task, data.val)
                set_mode(True)
                curve.append((step, statistics.fmean(train_window), val))
                train_window = []
                if not math.isfinite(val):
                    diverged = True
                    break

        final_val = final_test = None
        if not diverged:
            set_mode(False)
            final_val = evaluate(model, task, data.val)
            final_test = evaluate(model, task, data.test)
            set_mode(True)
            if not (math.isfinite(final_val) and math.isfinite(final_test)):
                diverged, final_val, final_test = True, None, None
        sbytes = state_bytes(optimizer)
        memory = None
        if measure_memory and not diverged:
            xb, yb = task.sample(data, task.batch_size, gen)

            def one_step():
                loss = task.loss_fn(model(xb), yb)
                loss.backward(create_graph=spec.create_graph)
                with torch.profiler.record_function("optimizer.step"):
                    optimizer.step()

            memory = peak_step_memory(model, optimizer, one_step)

    return dict(
        task=task.name,
        optimizer=spec.name,
        lr=lr,
        seed=seed,
        steps=steps,
        steps_done=step,
        diverged=diverged,
        final_val_loss=final_val,
        final_test_loss=final_test,
        curve=[list(c) for c in curve],
        ms_per_step=statistics.median(step_ms) if step_ms else None,
        ms_per_step_mean=statistics.fmean(step_ms) if step_ms else None,
        ms_per_opt_step=statistics.median(opt_ms) if opt_ms else None,
        ms_per_opt_step_mean=statistics.fmean(opt_ms) if opt_ms else None,
        cpu_ms_per_step=statistics.median(step_cpu_ms) if step_cpu_ms else None,
        cpu_ms_per_opt_step=statistics.median(opt_cpu_ms) if opt_cpu_ms else None,
        n_params=n_params,
        state_bytes=sbytes,
        state_bytes_per_param=sbytes / n_params,
        memory=memory,
    )


# ---------------------------------------------------------------- the sweep


def best_lr(runs: Sequence[dict]) -> float:
    """The learning rate with the lowest final validation loss (diverged runs rank last)."""
    ranked = sorted(runs, key=lambda r: (r["final_val_loss"] is None, r["final_val_loss"] or 0.0, r["lr"]))
    return ranked[0]["lr"]


def _spread(values: list[float]) -> dict:
    if not values:
        return dict(mean=None, std=None, min=None, max=None, n=0)
    return dict(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        min=min(values),
        max=max(values),
        n=len(values),
    )


def summarize(runs: Sequence[dict], lr_factors: Sequence[float]) -> list[dict]:
    """One row per (task, optimizer): the sweep, the chosen lr, and mean/spread over the seed runs."""
    rows = []
    keys = sorted(
        {(r["task"], r["optimizer"]) for r in runs},
        key=lambda k: (k[0], list(OPTIMIZERS).index(k[1]) if k[1] in OPTIMIZERS else 99),
    )
    for task, opt in keys:
        sweep = sorted(
            (r for r in runs if (r["task"], r["optimizer"], r["phase"]) == (task, opt, "sweep")), key=lambda r: r["lr"]
        )
        seeds = [r for r in runs if (r["task"], r["optimizer"], r["phase"]) == (task, opt, "seeds")]
        if not sweep:
            continue
        chosen = best_lr(sweep)
        lrs = [r["lr"] for r in sweep]
        ok = [r for r in seeds if not r["diverged"]]

        def med(key, ok=ok):
            return statistics.median([r[key] for r in ok if r[key] is not None]) if ok else None

        peaks = [r["memory"]["peak_bytes"] for r in ok if r.get("memory")]
        extras = [
            r["memory"]["opt_step_extra_bytes"]
            for r in ok
            if r.get("memory") and r["memory"]["opt_step_extra_bytes"] is not None
        ]
        rows.append(
            dict(
                task=task,
                optimizer=opt,
                best_lr=chosen,
                best_lr_at_grid_edge=chosen in (min(lrs), max(lrs)) and len(lrs) > 1,
                sweep=[dict(lr=r["lr"], val=r["final_val_loss"]) for r in sweep],
                val=_spread([r["final_val_loss"] for r in ok]),
                test=_spread([r["final_test_loss"] for r in ok]),
                diverged_seeds=len(seeds) - len(ok),
                ms_per_step=med("ms_per_step"),
                ms_per_opt_step=med("ms_per_opt_step"),
                cpu_ms_per_step=med("cpu_ms_per_step"),
                cpu_ms_per_opt_step=med("cpu_ms_per_opt_step"),
                state_bytes_per_param=(ok or seeds or sweep)[0]["state_bytes_per_param"],
                n_params=sweep[0]["n_params"],
                peak_bytes=statistics.median(peaks) if peaks else None,
                opt_step_extra_bytes=statistics.median(extras) if extras else None,
            )
        )
    return rows


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(
        platform=platform.platform(),
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        torch_threads=torch.get_num_threads(),
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _fusion_engine(device: torch.device) -> str:
    """The engine FusionOptimizer's defaults select on ``device`` (its function's qualified name)."""
    from fusedbun.engines import select_engine

    engine = select_engine(device.type, distributed=False, foreach=None, fused=None)
    return f"{engine.__module__}.{engine.__qualname__}"


# ---------------------------------------------------------------- files

_RUN_COLUMNS = [
    "task",
    "optimizer",
    "phase",
    "lr",
    "seed",
    "steps",
    "steps_done",
    "diverged",
    "final_val_loss",
    "final_test_loss",
    "ms_per_step",
    "ms_per_opt_step",
    "cpu_ms_per_step",
    "cpu_ms_per_opt_step",
    "n_params",
    "state_bytes",
    "state_bytes_per_param",
]
_SUMMARY_COLUMNS = [
    "task",
    "optimizer",
    "best_lr",
    "best_lr_at_grid_edge",
    "val_mean",
    "val_std",
    "val_n",
    "test_mean",
    "test_std",
    "diverged_seeds",
    "ms_per_step",
    "ms_per_opt_step",
    "cpu_ms_per_step",
    "cpu_ms_per_opt_step",
    "state_bytes_per_param",
    "n_params",
    "peak_bytes",
    "opt_step_extra_bytes",
]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, doc: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    stem = out.with_suffix("")
    with open(f"{stem}_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, _RUN_COLUMNS + ["peak_bytes", "opt_step_extra_bytes"], extrasaction="ignore")
        w.writeheader()
        for r in doc["runs"]:
            mem = r.get("memory") or {}
            w.writerow(
                {**r, "peak_bytes": mem.get("peak_bytes"), "opt_step_extra_bytes": mem.get("opt_step_extra_bytes")}
            )
    with open(f"{stem}_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, _SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for s in doc["summary"]:
            flat = dict(s)
            for split in ("val", "test"):
                for k in ("mean", "std", "n"):
                    flat[f"{split}_{k}"] = s[split][k]
            w.writerow(flat)


# ---------------------------------------------------------------- command line

GPU_SIZED_TASKS = ("char_lm_large",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    # char_lm_large is sized for a GPU (about 3 s a step on one CPU thread): left out of the CPU default.
    default_tasks = list(TASKS) if torch.cuda.is_available() else [t for t in TASKS if t not in GPU_SIZED_TASKS]
    p.add_argument(
        "--tasks",
        nargs="+",
        default=default_tasks,
        choices=list(TASKS),
        metavar="TASK",
        help=f"tasks to run (default: {', '.join(default_tasks)})",
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        metavar="OPT",
        help=f"optimizers to run (default: all of {', '.join(OPTIMIZERS)})",
    )
    p.add_argument(
        "--lr-factors",
        nargs="+",
        type=float,
        default=list(LR_FACTORS),
        help="learning-rate grid, as multiples of each optimizer's default_lr",
    )
    p.add_argument("--sweep-seed", type=int, default=0, help="the seed of the learning-rate sweep")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds run at the best learning rate")
    p.add_argument("--steps", type=int, default=None, help="override every task's number of steps")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (CSV files go next to it)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for name in args.optimizers:
        get_optimizer(name)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.set_num_threads(args.threads)

    previous_doc = json.loads(args.out.read_text()) if args.resume and args.out.exists() else None
    previous = previous_doc["runs"] if previous_doc else []
    doc = dict(
        meta=dict(
            command="python -m benchmarks.compare " + shlex.join(argv),
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            git_commit=_git("rev-parse", "HEAD"),
            # package files that differ from that commit when the run started (empty: none)
            git_uncommitted_package_files=(_git("status", "--porcelain", "--", "fusedbun") or "").splitlines(),
            fusion_engine=_fusion_engine(device),
            machine=machine_info(device),
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                **{d: _version(d) for d in ("fusedbun", "pytorch-optimizer", "scikit-learn", "numpy")},
            },
            lr_factors=args.lr_factors,
            sweep_seed=args.sweep_seed,
            seeds=args.seeds,
            warmup_steps=WARMUP_STEPS,
            timing=(
                "median over steps after the warm-up, evaluation excluded: ms_* are wall clock "
                "(time.perf_counter), cpu_ms_* the CPU time of the training thread (time.thread_time), "
                "which other processes on a shared machine disturb less"
            ),
            memory=MEMORY_METHOD,
        ),
        tasks={
            name: dict(
                description=get_task(name).description,
                loss=get_task(name).loss_name,
                steps=args.steps or get_task(name).steps,
                batch_size=get_task(name).batch_size,
                eval_every=get_task(name).eval_every,
                data=get_task(name).load().info,
            )
            for name in args.tasks
        },
        optimizers={
            name: dict(
                label=s.label,
                source=s.source,
                default_lr=s.default_lr,
                note=s.note,
                create_graph=s.create_graph,
                schedule_free=s.schedule_free,
            )
            for name, s in OPTIMIZERS.items()
            if name in args.optimizers
        },
        not_run=NOT_RUN,
        runs=[],
        summary=[],
    )

    if previous_doc:
        # Resuming may also add tasks or optimizers to an existing file: what this command does not plan
        # to run is kept as it was, and the earlier commands stay on record.
        old_meta = {k: v for k, v in previous_doc["meta"].items() if k != "history"}
        doc["meta"]["history"] = previous_doc["meta"].get("history", []) + [old_meta]
        doc["tasks"] = {**previous_doc["tasks"], **doc["tasks"]}
        doc["optimizers"] = {**previous_doc["optimizers"], **doc["optimizers"]}
        planned = {(t, o) for t in args.tasks for o in args.optimizers}
        doc["runs"] = [r for r in previous if (r["task"], r["optimizer"]) not in planned]

    def key(task, opt, phase, lr, seed):
        return (task, opt, phase, round(math.log10(lr), 6), seed)

    done = {
        key(r["task"], r["optimizer"], r["phase"], r["lr"], r["seed"]): r
        for r in previous
        if r["task"] in TASKS and r["steps"] == (args.steps or get_task(r["task"]).steps)
    }
    total = len(args.tasks) * len(args.optimizers) * (len(args.lr_factors) + len(args.seeds))
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, disable=args.no_progress, unit="run", dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is in requirements-dev
        bar = None

    def record(task: Task, spec: OptimizerSpec, lr: float, seed: int, phase: str, data: TaskData) -> dict:
        k = key(task.name, spec.name, phase, lr, seed)
        if k in done:
            run = done[k]
        else:
            # Peak memory does not depend on the learning rate: it is measured in the seed runs only.
            measure = phase == "seeds" and not args.no_memory
            run = dict(
                phase=phase,
                **run_one(task, spec, lr, seed, device=device, steps=args.steps, measure_memory=measure, data=data),
            )
        doc["runs"].append(run)
        doc["summary"] = summarize(doc["runs"], args.lr_factors)
        write_results(args.out, doc)
        if bar is not None:
            bar.set_postfix_str(f"{task.name} {spec.name} lr={lr:.3g} seed={seed}", refresh=False)
            bar.update(1)
        return run

    for task_name in args.tasks:
        task = get_task(task_name)
        data = task.load()
        for name in args.optimizers:
            spec = get_optimizer(name)
            sweep = [record(task, spec, spec.default_lr * f, args.sweep_seed, "sweep", data) for f in args.lr_factors]
            lr = best_lr(sweep)
            for seed in args.seeds:
                record(task, spec, lr, seed, "seeds", data)
    if bar is not None:
        bar.close()
    return doc


if __name__ == "__main__":
    main()
