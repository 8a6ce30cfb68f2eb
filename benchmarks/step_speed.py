"""CPU time and memory of one optimizer step: FusionOptimizer's engines against torch's optimizers and SM3.

For each optimizer, on its own copy of the same model (2-D weights plus biases, about ``--params``
numbers, fp32) with fixed random gradients:

- ms/step: the wall time of ``step()``, the median over ``--repeats`` timed steps after warm-up, with the
  25th-75th percentile spread. The optimizers are timed round-robin (one step each per round, in a
  rotating order), so that background load on a shared machine falls on all of them alike.
- state bytes per parameter: every tensor in ``optimizer.state`` (momentum, second moments, step counts).
- the floor: bytes a step must move divided by the memory bandwidth measured here (the best rate of an
  in-place scale and an in-place add over 256 MiB, before and after the steps), for 16, 20 and 28 bytes
  per parameter (FusionOptimizer with bf16 or fp32 momentum, AdamW).
- diagnostics (same rounds): the fused engine alone (``fused_fusion`` on the optimizer's lists), and the
  finite-gradient check that ``nonfinite="skip"`` and ``"raise"`` add before it, alone, to show where the
  time of a step goes. The default ``nonfinite="mask"`` needs no such check: the kernel masks non-finite
  entries in its one pass; the ``use_rms, nonfinite="skip"`` row measures the difference.
- extra peak memory during ``step``: the high-water mark of memory allocated during one step, above what
  was allocated when it started. Measured with ``torch.profiler`` (``profile_memory=True``), which records
  every allocation and free of torch's CPU allocator, so the peak is exact and does not depend on how the
  C library returns memory to the OS (a child process's resident set would). It does not see ``malloc``
  calls outside torch; the fused engine makes none (its scratch space is a torch tensor).

Writes a table to stdout and a JSON file (machine, torch version, thread count, date, command, results).

    python benchmarks/step_speed.py                 # about 10M parameters, 30 repeats
    python benchmarks/step_speed.py --quick         # about 1M parameters, 5 repeats, no JSON unless --out
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's benchmarks

import fusedbun  # noqa: E402
from benchmarks.provenance import commit  # noqa: E402
from fusedbun import FusionOptimizer  # noqa: E402
from fusedbun.engines import StepHyper, StepTensors, fused_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_speed.json"
WIDTH = 1024


def model_shapes(params: float) -> list[tuple[int, ...]]:
    """Square weights of side WIDTH (smaller for small models), each with a bias, about `params` numbers."""
    width = WIDTH if params >= 2 * (WIDTH * WIDTH + WIDTH) else max(8, int((params / 2) ** 0.5))
    layers = max(1, round(params / (width * width + width)))
    return [s for _ in range(layers) for s in ((width, width), (width,))]


def make_params(shapes, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Parameters and gradients of ``shapes``, both in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).mul_(0.02).to(dtype).requires_grad_()
        p.grad = torch.randn(s, generator=gen).to(dtype)
        params.append(p)
    return params


def _sm3(params):
    from pytorch_optimizer import SM3

    return SM3(params, lr=1e-2)  # its defaults: no momentum, no beta


def _fusion(**options):
    return lambda params, engine: FusionOptimizer(params, lr=1e-3, **options, **{engine: True})


# (optimizer, engines, factory(params, engine), note); FusionOptimizer runs on both of its CPU engines.
OPTIMIZERS: list[tuple[str, tuple[str, ...], Callable, str]] = [
    ("FusionOptimizer (defaults)", ("foreach", "fused"), _fusion(), "use_rms=False"),
    ("FusionOptimizer use_rms", ("foreach", "fused"), _fusion(use_rms=True), ""),
    (
        "FusionOptimizer use_rms, nonfinite='skip'",
        ("fused",),
        _fusion(use_rms=True, nonfinite="skip"),
        "a finite check before the step",
    ),
    (
        "FusionOptimizer use_rms, bf16 momentum",
        ("foreach", "fused"),
        _fusion(use_rms=True, momentum_dtype=torch.bfloat16),
        "",
    ),
    (
        "FusionOptimizer use_rms, cover='factored'",
        ("foreach", "fused"),
        _fusion(use_rms=True, cover="factored"),
        "the factored second moment (fusedbun.factored)",
    ),
    (
        "FusionOptimizer use_rms, cover='dense', bf16 second moment and momentum",
        ("foreach", "fused"),
        _fusion(use_rms=True, cover="dense", hessian_dtype=torch.bfloat16, momentum_dtype=torch.bfloat16),
        "a per-element second moment in bf16: reads p, g, m, v, writes p, m, v, 20 bytes",
    ),
    ("AdamW", ("foreach", "fused"), lambda ps, e: torch.optim.AdamW(ps, lr=1e-3, **{e: True}), "torch.optim.AdamW"),
    ("Adafactor", ("default",), lambda ps, e: torch.optim.Adafactor(ps, lr=1e-2), "torch.optim.Adafactor"),
    (
        "SGD momentum",
        ("foreach",),
        lambda ps, e: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
        "torch.optim.SGD, momentum=0.9",
    ),
    ("SM3", ("default",), lambda ps, e: _sm3(ps), "pytorch_optimizer.SM3, momentum=0 (its default)"),
]
# Pure bf16: parameters, gradients and momentum in bf16 (the entries' names say "bf16 params").
BF16: list[tuple[str, tuple[str, ...], Callable, str]] = [
    ("FusionOptimizer use_rms, bf16 params", ("fused",), _fusion(use_rms=True), "rounded to nearest"),
    (
        "FusionOptimizer use_rms, bf16 params, stochastic rounding",
        ("fused",),
        _fusion(use_rms=True, stochastic_rounding=True),
        "stochastic_rounding=True",
    ),
    ("AdamW, bf16 params", ("fused",), lambda ps, e: torch.optim.AdamW(ps, lr=1e-3, **{e: True}), "torch.optim.AdamW"),
]


def build_runs(shapes, only: str | None = None) -> list[dict]:
    runs = []
    for name, engines, factory, note in OPTIMIZERS + BF16:
        dtype = torch.bfloat16 if "bf16 params" in name else torch.float32
        for engine in engines:
            if only and only.lower() not in f"{name} [{engine}]".lower():
                continue
            if name.startswith("FusionOptimizer") and engine == "fused" and fused_cpu.unavailable_reason():
                print(f"skipping {name} [fused]: {fused_cpu.unavailable_reason()}", file=sys.stderr)
                continue
            params = make_params(shapes, seed=0, dtype=dtype)
            try:
                opt = factory(params, engine)
            except ImportError as e:
                print(f"skipping {name}: {e}", file=sys.stderr)
                continue
            runs.append(dict(name=name, engine=engine, note=note, params=params, opt=opt))
    return runs


class _Call:
    """A timed callable in the round-robin, standing in for an optimizer (``step`` is what is timed)."""

    def __init__(self, fn):
        self.step = fn
        self.state = {}


def diagnostic_runs(shapes) -> list[dict]:
    """Where the fused step's time goes: its engine alone (``fused_fusion`` on the optimizer's lists) and the
    finite-gradient check of ``nonfinite="skip"``/``"raise"`` alone (``torch._foreach_norm``)."""
    if fused_cpu.unavailable_reason():
        return []
    params = make_params(shapes, seed=0)
    opt = FusionOptimizer(params, lr=1e-3, use_rms=True, fused=True)
    opt.step()
    group = opt.param_groups[0]
    lists = (
        [p for p in params],
        [p.grad for p in params],
        [opt.state[p]["momentum_buffer"] for p in params],
        [opt.state[p]["exp_hessian"] for p in params],
        [opt.state[p]["step"] for p in params],
    )
    hyper = StepHyper.from_group(group)
    engine = _Call(lambda: fused_cpu.fused_fusion(StepTensors(*lists), hyper))
    check = _Call(lambda: torch._foreach_norm(lists[1], 2))
    return [
        dict(
            name="FusionOptimizer use_rms: fused engine alone",
            engine="fused",
            note="no optimizer bookkeeping",
            params=params,
            opt=engine,
            diagnostic=True,
        ),
        dict(
            name="nonfinite='skip': finite-gradient check alone",
            engine="",
            note="torch._foreach_norm(grads)",
            params=params,
            opt=check,
            diagnostic=True,
        ),
    ]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(y) for y in x)
        if isinstance(x, dict):
            return sum(size(y) for y in x.values())
        return 0

    return sum(size(s) for s in opt.state.values())


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's tracing library writes a line to file descriptor 2 at every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(opt: torch.optim.Optimizer) -> int:
    """High-water mark of torch CPU allocations during one step, above the level when it started."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def stream_bandwidth(numel: int, repeats: int = 10) -> float:
    """The best streaming rate of the memory, in bytes per second: the faster of an in-place scale
    ``x.mul_(c)`` (8 bytes per element) and an in-place add ``x.add_(y)`` (12 bytes per element) on at
    least 64M floats (256 MiB, far more than the caches), best of ``repeats`` each. A floor is what the
    memory can do at best; a copy or a reduction, or the median on a shared machine, can be far below it."""
    numel = max(numel, 1 << 26)
    x, y = torch.ones(numel), torch.ones(numel)
    best = 0.0
    for nbytes, op in ((8 * numel, lambda: x.mul_(0.999)), (12 * numel, lambda: x.add_(y, alpha=1e-6))):
        op()
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def time_steps(runs: list[dict], repeats: int, warmup: int) -> None:
    for r in runs:
        for _ in range(warmup):
            r["opt"].step()
        r["times"] = []
    for k in range(repeats):
        order = runs[k % len(runs) :] + runs[: k % len(runs)]
        for r in order:
            t0 = time.perf_counter()
            r["opt"].step()
            r["times"].append(time.perf_counter() - t0)


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        system=platform.system(),
        machine=platform.machine(),
        cpu=model,
        logical_cpus=os.cpu_count(),
        cpus_usable=usable,  # fewer than logical_cpus when pinned (taskset)
        memory_gib=None if mem is None else round(mem / 2**30, 1),
        python=platform.python_version(),
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=10e6, help="about this many parameters (default 10e6)")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--only", default=None, help="run only the optimizers whose 'name [engine]' contains this")
    ap.add_argument("--quick", action="store_true", help="1e6 parameters, 5 repeats, no JSON unless --out")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/step_speed.json; none with --quick)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.repeats = min(args.params, 1e6), min(args.repeats, 5)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)

    torch.manual_seed(0)
    shapes = model_shapes(args.params)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    largest = max(torch.Size(s).numel() for s in shapes) * 4
    print(
        f"{len(shapes)} tensors, {n_params / 1e6:.2f}M fp32 parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.repeats} timed steps each, medians",
        flush=True,
    )

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    bandwidth_before = stream_bandwidth(n_params)
    runs = build_runs(shapes, args.only)
    if not args.only:
        runs += diagnostic_runs(shapes)
    time_steps(runs, args.repeats, args.warmup)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    results, diagnostics = [], []
    for r in runs:
        if r.get("diagnostic"):
            ts = sorted(1e3 * t for t in r["times"])
            q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
            diagnostics.append(
                dict(
                    name=r["name"],
                    engine=r["engine"],
                    note=r["note"],
                    ms_median=statistics.median(ts),
                    ms_p25=q[0],
                    ms_p75=q[2],
                    ms_min=ts[0],
                )
            )
            continue
        ts = sorted(1e3 * t for t in r["times"])
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        peak = peak_extra_bytes(r["opt"])
        finite = all(bool(torch.isfinite(p).all()) for p in r["params"])
        results.append(
            dict(
                optimizer=r["name"],
                engine=r["engine"],
                note=r["note"],
                ms_median=statistics.median(ts),
                ms_p25=q[0],
                ms_p75=q[2],
                ms_min=ts[0],
                state_bytes=state_bytes(r["opt"]),
                state_bytes_per_param=state_bytes(r["opt"]) / n_params,
                peak_extra_bytes=peak,
                peak_extra_vs_largest_param=peak / largest,
                params_finite=finite,
            )
        )
        del r["opt"], r["params"]

    header = f"{'optimizer':40s} {'engine':8s} {'ms/step':>8s} {'p25-p75':>13s} "
    header += f"{'state B/param':>13s} {'peak extra MB':>13s}"
    print(header)
    print("-" * len(header))
    for x in results:
        print(
            f"{x['optimizer']:40s} {x['engine']:8s} {x['ms_median']:8.2f} {x['ms_p25']:6.2f}-{x['ms_p75']:<6.2f} "
            f"{x['state_bytes_per_param']:13.3f} {x['peak_extra_bytes'] / 2**20:13.2f}"
        )

    bandwidth = max(bandwidth_before, stream_bandwidth(n_params))  # before and after the steps: the better
    floor_ms = {f"{b}_bytes_per_param": 1e3 * b * n_params / bandwidth for b in (16, 20, 28)}
    print(
        f"\nmemory bandwidth (best streaming rate) {bandwidth / 1e9:.1f} GB/s; "
        f"floor for {n_params / 1e6:.2f}M parameters: "
        + ", ".join(f"{k.split('_')[0]} B/param {v:.2f} ms" for k, v in floor_ms.items())
    )

    for x in diagnostics:
        print(f"{x['name']:58s} {x['ms_median']:8.2f} {x['ms_p25']:6.2f}-{x['ms_p75']:<6.2f}")

    targets = check_targets(results, shapes, largest)
    print()
    for t in targets:
        print(f"[{'reached' if t['met'] else 'missed'}] {t['target']}: {t['measured']}")

    record = dict(
        benchmark="step_speed",
        command="python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine(),
        torch=torch.__version__,
        fusedbun=fusedbun.__version__,
        commit=commit(),
        threads=torch.get_num_threads(),
        fused_cpu_threading=fused_cpu.threading_backend(),
        fused_cpu_unavailable_reason=fused_cpu.unavailable_reason(),
        stream_bandwidth_bytes_per_s=bandwidth,
        floor_ms=floor_ms,
        load_average_before=load_before,
        load_average_after=load_after,
        params=n_params,
        shapes=[list(s) for s in shapes],
        largest_param_bytes=largest,
        repeats=args.repeats,
        warmup=args.warmup,
        results=results,
        diagnostics=diagnostics,
        targets=targets,
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {out}")
    return record


def check_targets(results: list[dict], shapes, largest: int) -> list[dict]:
    """The design goals of the step (time, state, peak memory), each with what was measured."""

    def get(opt, engine):
        return next((x for x in results if x["optimizer"] == opt and x["engine"] == engine), None)

    n_params = sum(torch.Size(s).numel() for s in shapes)
    # O(n+m): one fp32 number per row and per column of each weight, one per bias entry, one step count per tensor
    small = 4 * sum(sum(s) for s in shapes) + 4 * len(shapes)
    out = []
    for eng, base in (("foreach", ("AdamW", "foreach")), ("fused", ("AdamW", "fused"))):
        ours, ref = get("FusionOptimizer use_rms", eng), get(*base)
        if ours and ref:
            out.append(
                dict(
                    target=f"use_rms=True [{eng}] ms/step <= AdamW [{base[1]}]",
                    met=ours["ms_median"] <= ref["ms_median"],
                    measured=f"{ours['ms_median']:.2f} vs {ref['ms_median']:.2f} ms (medians)",
                )
            )
    for name, momentum_bytes in (("FusionOptimizer use_rms", 4), ("FusionOptimizer use_rms, bf16 momentum", 2)):
        for x in results:
            if x["optimizer"] == name:
                bound = momentum_bytes + small / n_params
                out.append(
                    dict(
                        target=f"{name} [{x['engine']}] state <= {momentum_bytes} B/param + O(n+m) "
                        f"(= {bound:.4f} B/param here)",
                        met=x["state_bytes_per_param"] <= bound + 1e-12,
                        measured=f"{x['state_bytes_per_param']:.4f} B/param",
                    )
                )
    for x in results:
        if x["optimizer"].startswith("FusionOptimizer"):
            out.append(
                dict(
                    target=f"{x['optimizer']} [{x['engine']}] extra peak memory during step <= largest parameter "
                    f"({largest / 2**20:.1f} MB)",
                    met=x["peak_extra_bytes"] <= largest,
                    measured=f"{x['peak_extra_bytes'] / 2**20:.3f} MB",
                )
            )
    return out


if __name__ == "__main__":
    main()
