"""The language-model benchmark's model trained once through Hugging Face ``Trainer``, FusionOptimizer handed in.

    python -m benchmarks.lm_trainer_hf --lr 8e-3 --results benchmarks/results/lm_hf.jsonl
    python -m benchmarks.lm_trainer_hf --size tiny --steps 20 --data /tmp/smoke --compare-with runs.jsonl

This is the integration that chapter 5 of the book shows: ``Trainer(..., optimizers=(opt, scheduler))`` with
``opt = fusedbun.FusionOptimizer(fusedbun.param_groups_no_decay(model, Lambda=...), lr=..., use_rms=True)``
and a ``LambdaLR`` stepped once per optimizer step. Everything else is the benchmark's recipe
(:mod:`benchmarks.lm`): the same GPT, corpus, initialisation, batches (the same windows in the same
order), warmup and cosine schedule, clipping (``max_grad_norm``), bf16 on CUDA, and the same evaluation.
So the run should land where ``python -m benchmarks.lm train --optimizer fusion_rms`` lands at the same lr
and seed; ``--compare-with`` prints the difference from such a run when one is recorded.

The record has the format of :func:`benchmarks.lm.train`'s, with ``client="hf_trainer"``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

import fusedbun
from benchmarks.corpus import load_corpus
from benchmarks.gpt import GPT, get_size
from benchmarks.lm import (
    RunConfig,
    _add_run_args,
    _base_config,
    _finite_or_none,
    _windows,
    append_run,
    data_info,
    lr_factor,
    portable,
    provenance,
    read_runs,
    recipe_record,
    resolve_device,
    run_figures,
    run_key,
)
from benchmarks.lm_optimizers import canonical_lr, optimizer_state_bytes

__all__ = ["CausalLM", "TrainWindows", "EvalWindows", "lm_schedule", "train_with_trainer", "main"]

CLIENT = "hf_trainer"


class CausalLM(nn.Module):
    """The benchmark's GPT with the interface ``Trainer`` expects: ``forward(input_ids, labels)`` returns a
    dict holding ``loss`` (labels are the next bytes already, so no shift happens here)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        if labels is None:
            return {"logits": self.gpt(input_ids)}
        logits, loss = self.gpt(input_ids, labels)
        return {"loss": loss, "logits": logits}


class TrainWindows(torch.utils.data.IterableDataset):
    """The training windows of :func:`benchmarks.lm.train`, in its order: the start offsets are drawn with
    the same generator, seed, device and calls (one ``randint`` of ``batch`` offsets per step)."""

    def __init__(self, split: torch.Tensor, block: int, batch: int, steps: int, seed: int, device) -> None:
        self.split, self.block = split.cpu(), block
        gen = torch.Generator(device=device).manual_seed(seed)
        high = split.numel() - block - 1
        self.starts = torch.cat(
            [torch.randint(0, high, (batch,), device=device, generator=gen) for _ in range(steps)]
        ).cpu()

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self):
        offsets = torch.arange(self.block + 1)
        for s in self.starts.tolist():
            w = self.split[s + offsets].long()
            yield {"input_ids": w[:-1], "labels": w[1:]}


class EvalWindows(torch.utils.data.Dataset):
    """Fixed evaluation windows (start offsets from :func:`benchmarks.lm._windows`)."""

    def __init__(self, split: torch.Tensor, starts: torch.Tensor, block: int) -> None:
        self.split, self.starts, self.block = split.cpu(), starts.cpu(), block

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        s = int(self.starts[i])
        w = self.split[s : s + self.block + 1].long()
        return {"input_ids": w[:-1], "labels": w[1:]}


def lm_schedule(optimizer, steps: int, warmup_frac: float, min_lr_ratio: float):
    """The benchmark's warmup + cosine as a ``LambdaLR``. ``Trainer`` steps it after every optimizer step,
    so the k-th step (from 0) runs at ``lr_factor(k + 1)``, as in :func:`benchmarks.lm.train`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k + 1, steps, warmup_frac, min_lr_ratio))


def train_with_trainer(
    cfg: RunConfig, output_dir: str | None = None, command: str | None = None, concurrent_runs: int = 1
) -> dict:
    """Train ``cfg``'s model with FusionOptimizer (use_rms=True) through ``transformers.Trainer``; return
    the record. ``cfg.optimizer`` is recorded as given; the optimizer is the one built here."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    started = time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    device = resolve_device(cfg.device)
    recipe = cfg.effective()
    size = get_size(cfg.size)
    B, T = size.batch_size, size.block_size
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    corpus = load_corpus(cfg.data)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(cfg.seed)
    model = CausalLM(GPT(size)).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    # Chapter 5's integration, with the benchmark's recipe for lr, Lambda and the schedule.
    opt = fusedbun.FusionOptimizer(fusedbun.param_groups_no_decay(model, Lambda=recipe["wd"]), lr=cfg.lr, use_rms=True)
    scheduler = lm_schedule(opt, cfg.steps, recipe["warmup_frac"], recipe["min_lr_ratio"])

    train_data = TrainWindows(corpus.train, T, B, cfg.steps, cfg.seed, device)
    val_periodic = EvalWindows(corpus.val, _windows(corpus.val, T, cfg.eval_batches * B), T)
    val_full = EvalWindows(corpus.val, _windows(corpus.val, T, None), T)
    test_full = EvalWindows(corpus.test, _windows(corpus.test, T, None), T)

    class Clock(TrainerCallback):
        """Training time with evaluation left out, and the learning rate at each logged step."""

        def __init__(self) -> None:
            self.eval_time = 0.0
            self.points: dict[int, dict] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            now = time.perf_counter()
            point = self.points.setdefault(state.global_step, {"step": state.global_step})
            point["train_time_s"] = round(now - started - setup_s - self.eval_time, 4)
            point["wall_s"] = round(now - started, 4)
            if logs and "loss" in logs:
                point["train_loss"] = _finite_or_none(float(logs["loss"]))
            if logs and "eval_loss" in logs:
                point["val_loss"] = _finite_or_none(float(logs["eval_loss"]))

    clock = Clock()

    class TimedTrainer(Trainer):
        def evaluate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                clock.eval_time += time.perf_counter() - t0

    tmp = tempfile.TemporaryDirectory() if output_dir is None else contextlib.nullcontext(output_dir)
    with tmp as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=cfg.steps,
            per_device_train_batch_size=B,
            per_device_eval_batch_size=B,
            max_grad_norm=recipe["clip"] or 0.0,
            bf16=amp == "bf16",
            eval_strategy="steps",
            eval_steps=cfg.eval_every,
            logging_steps=cfg.log_every,
            save_strategy="no",
            report_to="none",
            prediction_loss_only=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=cfg.seed,
            use_cpu=device.type == "cpu",
        )
        trainer = TimedTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=val_periodic,
            optimizers=(opt, scheduler),
            callbacks=[clock],
        )
        setup_s = time.perf_counter() - started
        result = trainer.train()
        train_time = time.perf_counter() - started - setup_s - clock.eval_time
        final_val = trainer.evaluate(val_full, metric_key_prefix="val")["val_loss"]
        final_test = trainer.evaluate(test_full, metric_key_prefix="test")["test_loss"]

    steps_done = int(result.global_step)
    tokens_per_step = B * T
    curve = []
    for step in sorted(clock.points):
        p = clock.points[step]
        p["tokens"] = step * tokens_per_step
        p["lr"] = cfg.lr * lr_factor(max(step, 1), cfg.steps, recipe["warmup_frac"], recipe["min_lr_ratio"])
        if "train_loss" in p or "val_loss" in p:
            curve.append(p)
    diverged = not (math.isfinite(final_val) and math.isfinite(final_test))
    vals = [p["val_loss"] for p in curve if p.get("val_loss") is not None]
    tokens = steps_done * tokens_per_step
    sbytes = optimizer_state_bytes(opt)
    return dict(
        key=run_key(cfg, corpus.manifest) + f" client={CLIENT}",
        client=CLIENT,
        optimizer=f"fusion_rms[{CLIENT}]",
        base="fusion_rms",
        label="FusionOptimizer (use_rms=True) through transformers.Trainer",
        library="fusedbun",
        ablation=False,
        options={"use_rms": "True"},
        lr=canonical_lr(cfg.lr),
        seed=cfg.seed,
        phase="single",
        status="diverged" if diverged else "ok",
        diverged=diverged,
        divergence="non-finite final loss" if diverged else None,
        steps=cfg.steps,
        steps_done=steps_done,
        tokens=tokens,
        final_val_loss=None if diverged else final_val,
        final_test_loss=None if diverged else final_test,
        best_curve_val_loss=min(vals) if vals else None,
        curve=curve,
        train_time_s=train_time,
        eval_time_s=clock.eval_time,
        wall_s=time.perf_counter() - started,
        **run_figures(size, tokens=tokens, train_time=train_time, steps=steps_done),
        tokens_per_s_steady=None,
        peak_gpu_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        state_bytes=sbytes,
        state_bytes_per_param=sbytes / n_params,
        n_params=n_params,
        model=dict(size=cfg.size, **size.as_dict()),
        recipe=recipe_record(
            recipe,
            cfg,
            tokens_per_step=tokens_per_step,
            amp=amp,
            eval_windows=len(val_periodic),
            schedule="linear warmup, then cosine to min_lr_ratio x peak (LambdaLR)",
            compile=False,
        ),
        config=dict(asdict(cfg), data=portable(cfg.data)),
        trainer=dict(train_runtime_s=result.metrics.get("train_runtime"), train_loss=result.metrics.get("train_loss")),
        concurrent_runs=concurrent_runs,  # runs that shared the device (its tokens/s is not a speed when > 1)
        data=data_info(corpus),
        **provenance(device, command),
        date=date,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_trainer_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: the best of fusion_rms in --lr-from)")
    p.add_argument("--lr-from", type=Path, default=None, help="runs of benchmarks.lm to take fusion_rms's best lr from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=None, help="append the record to this JSON-lines file")
    p.add_argument("--compare-with", type=Path, default=None, help="runs of benchmarks.lm to compare with")
    p.add_argument(
        "--concurrent-runs", type=int, default=1, help="how many runs share the device with this one (recorded)"
    )
    _add_run_args(p)
    args = p.parse_args(argv)
    lr = args.lr
    if lr is None and args.lr_from:
        ok = [
            r
            for r in read_runs([args.lr_from])
            if r["optimizer"] == "fusion_rms" and r["status"] == "ok" and r["seed"] == 0
        ]
        lr = min(ok, key=lambda r: r["final_val_loss"])["lr"] if ok else None
    if lr is None:
        from benchmarks.lm_optimizers import get_lm_optimizer

        lr = get_lm_optimizer("fusion_rms").lr_centre
    cfg = replace(_base_config(args, optimizer="fusion_rms", lr=lr, seed=args.seed), phase="single")
    print(f"transformers.Trainer + FusionOptimizer(use_rms=True), lr={lr:.3g}, seed={cfg.seed}, size={cfg.size}")
    command = shlex.join(["python", "-m", "benchmarks.lm_trainer_hf", *argv])
    record = train_with_trainer(cfg, command=command, concurrent_runs=args.concurrent_runs)
    print(
        f"{record['status']}: final val {record['final_val_loss']}, test {record['final_test_loss']}, "
        f"{record['tokens_per_s'] or 0:,.0f} tok/s"
    )
    if args.results:
        append_run(args.results, record)
    if args.compare_with:
        key = run_key(cfg, load_corpus(cfg.data, verify=False).manifest)
        same = [r for r in read_runs([args.compare_with]) if r.get("key") == key]
        if same and same[-1]["final_val_loss"] is not None and record["final_val_loss"] is not None:
            ref = same[-1]["final_val_loss"]
            print(
                f"benchmarks.lm at the same lr and seed: final val {ref:.4f}; "
                f"difference {record['final_val_loss'] - ref:+.4f}"
            )
        else:
            print("no run of benchmarks.lm with the same configuration to compare with")
    return record


if __name__ == "__main__":
    main()
