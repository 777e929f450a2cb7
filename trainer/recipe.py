"""The continual-learning recipe: one stage per task, `setup -> train -> evaluate -> save`.

Stage K loads the base, restores stage K-1's experts, adds task K's expert, trains it with the
shared expert, gate(s) and discriminators (earlier task experts frozen), evaluates every task of
the order, and writes `RUN_DIR/stages/<K>-<task>/` atomically. Stage 1 first evaluates the
untrained model (the forward-transfer baseline).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import math
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import atomic, checkpoint, runlock
from .base import base_fingerprint, load_base, same_model
from .checkpoint import ADAPTERS, CHECKPOINT_INFO, MANIFEST, CheckpointError, RunDir, StageRecord
from .config import Config, ConfigError, dump_yaml, to_dict
from .data import DataError, Encoded, PromptFormat, Task, collate, load_tasks, step_batches, steps_per_epoch
from .distributed import Interrupted, Strategy, rng_state, set_rng_state
from .evaluate import evaluate
from .metrics import cl_metrics, format_table, heatmap
from .model import NOISE, MoECLModel, answer_positions, checkpoint_layers
from .monitor import Monitor, Progress
from .perf import (PeakMemory, format_performance, format_time_split, memory_per_rank, peak_override,
                   stage_performance, tensorboard_scalars, time_split, token_params)
from .memory import MEMORY, Memory
from .router import ROUTER, Router, gather_features, request_ids, request_text


@dataclass
class Setup:
    """Everything a stage works with, built by `setup_stage`."""

    cfg: Config
    k: int
    task: str
    model: MoECLModel
    tokenizer: object
    fmt: PromptFormat
    tasks: dict
    tests: dict[str, Encoded]
    previous: StageRecord | None
    base_folder: Path
    restored: dict  # adapter tensors loaded from the previous stage (frozen ones are saved back as-is)
    load_seconds: float = 0.0  # building the base (partitioned under ZeRO-3) and restoring the experts
    router: Router | None = None  # the previous stage's task router
    route_features: dict = field(default_factory=dict)  # task -> router features of its test rows (cached)
    memory: Memory | None = None  # earlier tasks' rows for the discriminators (discriminator_extra=memory)


def run_sequence(cfg: Config, strategy: Strategy) -> dict:
    """Every stage of the order; stages already complete (and built on their predecessor) are kept."""
    run = RunDir(cfg.run.dir)
    done = len(run.completed(cfg.data.order))
    if done:
        strategy.print(f"stages 1..{done} already complete in {run.root}; continuing from stage {done + 1}")
    metrics = None
    for k in range(done + 1, len(cfg.data.order) + 1):
        if k > done + 1 and strategy.stop_requested():  # asked during the previous stage's evaluation or save
            raise Interrupted(f"stopped on {strategy.stop_reason()} after stage {k - 1}; run again to continue")
        metrics = run_stage(cfg, k, strategy)[1]  # each stage ends by reporting the matrix so far
    return metrics if metrics is not None else report(run.root, cfg.data.order, strategy)


def run_stage(cfg: Config, k: int, strategy: Strategy) -> tuple[StageRecord, dict | None]:
    """Stage k: (its record, the run's metrics so far). A stage already complete on the current stage
    k-1 is kept as it is (so a requeued or resubmitted job that finds it done exits at once)."""
    order = cfg.data.order
    if not 1 <= k <= len(order):
        raise ConfigError(f"--stage {k}: the order {order} has stages 1..{len(order)}")
    run = RunDir(cfg.run.dir)
    if len(run.completed(order)) >= k:
        strategy.print(f"stage {k} ({order[k - 1]}) is already complete in {run.stage_dir(k, order[k - 1])}; "
                       "nothing to do (delete that folder to train the stage again)")
        return run.require_stage(k, order), None
    cfg.train.accumulation(strategy.world_size)  # a global batch the ranks cannot split fails before any loading
    peak_tflops = peak_override()  # a malformed MOE_CL_PEAK_TFLOPS fails before any loading too
    t_stage, phases, peaks = time.time(), {}, PeakMemory(strategy.device)  # the stage's time split and peak memory
    s = setup_stage(cfg, k, strategy)
    tr = prepare_training(s, strategy)
    if strategy.is_main():
        atomic.write_text(run.root / "config.yaml", dump_yaml(cfg))
    monitor = Monitor(run.root / "tb", strategy.is_main())
    t0 = time.time()
    phases["setup"] = t0 - t_stage
    # Stage 1's new expert is still a no-op here (B = 0): this is the untrained model.
    try:
        if s.previous:
            baseline = s.previous.manifest["baseline"]
            baseline_rows = s.previous.manifest["eval"].get("baseline_rows")
        else:
            baseline, _, baseline_rows = evaluate_tasks(s, strategy, "untrained model", full=())
    except StopRequested:
        raise Interrupted(f"stage {k} ({s.task}) stopped on {strategy.stop_reason()} before training; "
                          "nothing is lost; run the stage again") from None
    phases["baseline_evaluation"] = time.time() - t0
    peaks.mark("setup_and_baseline")
    step0 = s.previous.manifest["global_step"] if s.previous else 0
    train_stats = train_stage(s, tr, strategy, monitor, step0)
    phases["training"] = train_stats["seconds"]
    peaks.mark("training")
    try:  # a stop asked for now keeps the trained experts in a checkpoint at the last step
        router, router_seconds = fit_router(s, strategy)
        phases["router"] = router_seconds
        inferred = cfg.eval.task_id == "inferred"
        t_eval = time.time()
        # ACC and BWT read this stage's own task and, after the last stage, every task: those on all test rows
        full = cfg.data.order if k == len(cfg.data.order) else (s.task,)
        test_acc, correct_rows, test_rows = evaluate_tasks(s, strategy, f"after stage {k} ({s.task})", per_row=inferred,
                                                           full=full)
        routed = (evaluate_inferred(s, strategy, router, correct_rows, time.time() - t_eval)
                  if inferred else None)
        val = None
        if cfg.eval.val:
            val = evaluate(s.model, encode(s.fmt, s.tasks[s.task], "val", strategy), s.tokenizer, cfg.eval.batch_size,
                           cfg.eval.max_new_tokens, strategy, option_pairs=cfg.eval.option_pairs)["accuracy"]
            strategy.print(f"validation accuracy on {s.task}: {val:.3f}")
    except StopRequested:
        save_checkpoint(s, tr, strategy, tr.total)
        raise Interrupted(f"stage {k} ({s.task}) stopped on {strategy.stop_reason()} while evaluating, after its "
                          f"{tr.total} training steps; checkpoint in {tr.ckpt_dir}; run the stage again to "
                          "evaluate and save it") from None
    phases["evaluation"] = time.time() - t_eval
    peaks.mark("evaluation")
    performance = stage_performance(  # collectives (every rank's peak memory): on every rank
        token_params(s.model, s.task, lambda p: strategy.local_numel(p)[1]), cfg.train.activation_checkpointing,
        train_stats["tokens"], sum(train_stats["step_seconds"]), strategy.world_size, strategy.device,
        s.model.base.dtype, memory_per_rank(peaks, strategy.per_rank), peak_tflops)
    strategy.print(f"saving stage {k} ({s.task})")
    record = save_stage(s, strategy, baseline, test_acc, val, train_stats, step0, time.time() - t0,
                        router, router_seconds, {**(routed or {}), "test_rows": test_rows, "baseline_rows": baseline_rows},
                        tr.train_set.rows, performance, t_stage, phases)
    performance, step = record.manifest["performance"], record.manifest["global_step"]
    strategy.print(format_time_split(k, performance["time"]))
    strategy.print(format_performance(k, performance))
    # Evaluation at the global optimizer step, so that stage boundaries show on the training scalars' axis;
    # the untrained model at step 0.
    if s.previous is None:
        monitor.scalars(0, {f"eval/accuracy/{t}": acc for t, acc in baseline.items()})
    monitor.scalars(step, {f"eval/accuracy/{t}": acc for t, acc in test_acc.items()})
    monitor.scalars(step, {"eval/val_accuracy": val})
    if routed is not None:
        monitor.scalars(step, {f"eval/inferred_accuracy/{t}": a for t, a in routed["inferred_accuracy"].items()})
        monitor.scalars(step, {f"routing/accuracy/{t}": a for t, a in routed["routing_accuracy"].items()})
    monitor.scalars(step, tensorboard_scalars(performance, performance["time"]))
    with atomic.full_disk_explained(run.root / "metrics.json", f"stage {k} is complete and intact",
                                    todo=f"Free some space and run `python -m trainer report {run.root}`"):
        metrics = report(run.root, order, strategy, monitor)
    monitor.close()
    return record, metrics


def encode(fmt: PromptFormat, task, split: str, strategy: Strategy) -> Encoded:
    """A task split tokenized; the cache file is built by the main rank, then read by the others."""
    with strategy.main_first():
        return fmt.encode(task, split)


def setup_stage(cfg: Config, k: int, strategy: Strategy) -> Setup:
    order, task = cfg.data.order, cfg.data.order[k - 1]
    run = RunDir(cfg.run.dir)
    previous = run.require_stage(k - 1, order) if k > 1 else None
    if previous is not None:
        _check_compatible(previous, cfg)
    tasks = {t.name: t for t in load_tasks(cfg.data, cfg.run.seed)}
    t0 = time.time()
    model, tokenizer, folder, restored = load_model(cfg, previous, strategy)
    load_seconds = time.time() - t0
    fmt = PromptFormat(tokenizer, cfg.data)
    tests = {t: encode(fmt, tasks[t], "test", strategy) for t in order}
    strategy.print(f"stage {k}/{len(order)}: {task} | base {folder} | {strategy.world_size} rank(s) | from "
                   f"{previous.folder if previous else 'the untrained model'}")
    router = load_router(previous) if previous is not None else None
    memory = None
    if cfg.experts.discriminator_extra == "memory":
        sha = previous.manifest["files"].get(MEMORY) if previous is not None else None
        memory = Memory.load(previous.folder / MEMORY, sha) if sha else Memory()
    return Setup(cfg, k, task, model, tokenizer, fmt, tasks, tests, previous, folder, restored, load_seconds, router,
                 memory=memory)


def load_model(cfg: Config, record: StageRecord | None, strategy: Strategy):
    """The base with MoE-CL layers, holding `record`'s experts (none: the untrained model).

    Returns (model, tokenizer, base folder, the adapter tensors restored)."""
    base, tokenizer, folder = load_base(cfg.model, strategy)
    seed_everything(cfg.run.seed)  # shared expert and discriminator init: the same on every rank and run
    model = MoECLModel(base, cfg.data.order, cfg.experts)
    tensors = {}
    if record is not None:
        for t in record.manifest["learned"]:
            model.add_task(t)
        tensors = record.read_adapters()
        restore_adapters(model, tensors, record.adapters, strategy)
    return model, tokenizer, folder, tensors  # strategy.setup places it on its device


def evaluate_stage(cfg: Config, k: int | None, split: str, strategy: Strategy) -> dict:
    """Accuracy per task of stage k's experts (k=0: the untrained model; None: the last complete stage);
    with eval.task_id=inferred also as served by the stage's task router (test split)."""
    run = RunDir(cfg.run.dir)
    k = len(run.completed(cfg.data.order)) if k is None else k
    record = run.require_stage(k, cfg.data.order) if k > 0 else None
    inferred = cfg.eval.task_id == "inferred"
    if inferred and (split != "test" or record is None):
        raise ConfigError("eval.task_id=inferred: evaluates a trained stage (--stage >= 1) on the test split only")
    router = load_router(record) if inferred else None
    if inferred and router is None:
        raise CheckpointError(f"{record.folder}: no task router (written before routers); run the stage again "
                              "to evaluate it with inferred task ids")
    router = router and replace(router, device=strategy.device)  # its arithmetic on this rank's device
    model, tokenizer, folder, _ = load_model(cfg, record, strategy)
    strategy.setup(model, None, None, cfg)  # inference only (under ZeRO-3 this installs the gather hooks)
    fmt = PromptFormat(tokenizer, cfg.data)
    tasks = {t.name: t for t in load_tasks(cfg.data, cfg.run.seed)}
    accuracy, rows, t0 = {}, {}, time.time()
    for name, task in tasks.items():
        result = evaluate(model, encode(fmt, task, split, strategy), tokenizer, cfg.eval.batch_size,
                          cfg.eval.max_new_tokens, strategy, per_row=inferred, option_pairs=cfg.eval.option_pairs)
        accuracy[name], rows[name] = result["accuracy"], result.get("correct_rows")
        strategy.print(f"{name}: {accuracy[name]:.4f}")
    out = {"stage": k, "split": split, "accuracy": accuracy}
    if inferred:
        s = Setup(cfg, k, record.task, model, tokenizer, fmt, tasks, {}, record, folder, {}, router=router)
        out.update(evaluate_inferred(s, strategy, router, rows, time.time() - t0))
    return out


@dataclass
class Training:
    """The optimisation set-up of a stage, built by `prepare_training`."""

    engine: object  # what to call for a training forward (the DeepSpeed engine, or the model)
    n_trainable: int
    train_set: Encoded
    total: int
    per_epoch: int
    global_batch: int  # rows per optimizer step over all ranks
    accum: int  # micro-batches per rank per optimizer step
    ckpt_dir: Path  # this stage's mid-stage checkpoints
    settings: dict  # what a checkpoint must agree on to be resumed (see _resume_settings)


def prepare_training(s: Setup, strategy: Strategy) -> Training:
    """Add the task's expert, freeze all else, build AdamW + schedule, and wrap the model."""
    cfg, tc = s.cfg, s.cfg.train
    seed_everything(cfg.run.seed * 1000 + s.k)
    s.model.add_task(s.task)  # the new expert starts as a no-op (B = 0)
    params = s.model.freeze_all_but(s.task)
    # Only the frozen experts' restored tensors are written back at save; drop the rest now (141 MB at 7B).
    named = s.model.adapter_parameters()
    s.restored = {k: v for k, v in s.restored.items() if not named[k].requires_grad}
    if tc.activation_checkpointing:
        checkpoint_layers(s.model)
    train_set = encode(s.fmt, s.tasks[s.task], "train", strategy)
    accum = tc.accumulation(strategy.world_size)
    global_batch = tc.micro_batch_size * accum * strategy.world_size
    per_epoch = steps_per_epoch(len(train_set.rows), global_batch)
    if per_epoch == 0:
        raise DataError(f"task {s.task}: {len(train_set.rows)} train rows are fewer than one global batch "
                         f"({tc.micro_batch_size} micro x {accum} accumulation x {strategy.world_size} ranks); "
                         "lower train.global_batch_size (or train.micro_batch_size / train.grad_accum)")
    total = tc.max_steps or tc.epochs * per_epoch
    if tc.global_batch_size is None and strategy.world_size > 1:
        strategy.print(f"note: train.global_batch_size is not set, so the global batch is {tc.micro_batch_size} micro "
                       f"x {accum} accumulation x {strategy.world_size} ranks = {global_batch} rows and changes with "
                       f"the number of ranks; set train.global_batch_size to keep it fixed")
    if total < tc.min_steps:
        budget = f"train.max_steps={tc.max_steps}" if tc.max_steps else f"{tc.epochs} epoch(s)"
        strategy.print(f"warning: stage {s.k} ({s.task}) has only {total} optimizer step(s) ({len(train_set.rows)} rows, "
                       f"{global_batch} per step, {budget}), fewer than train.min_steps={tc.min_steps}; lower "
                       f"train.global_batch_size or raise train.epochs")
    shared = {id(p) for p in s.model.shared_expert_parameters()}
    groups = [{"params": [p for p in params if id(p) in shared], "lr": tc.lr * tc.shared_expert_lr_scale},
              {"params": [p for p in params if id(p) not in shared], "lr": tc.lr}]
    groups = [g for g in groups if g["params"]]  # the baselines have no MoE-CL shared expert
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, tc))
    n_trainable = sum(p.numel() for p in params)  # before setup: ZeRO-3 then leaves empty local views
    engine = strategy.setup(s.model, optimizer, scheduler, cfg)
    return Training(engine, n_trainable, train_set, total, per_epoch, global_batch, accum,
                    RunDir(cfg.run.dir).checkpoint_dir(s.k, s.task), _resume_settings(s, strategy.world_size))


def train_stage(s: Setup, tr: Training, strategy: Strategy, monitor: Monitor, step0: int) -> dict:
    """The stage's training loop: task loss + adversarial discriminator loss, AdamW on the declared parameters."""
    cfg, tc = s.cfg, s.cfg.train
    engine, train_set, total = tr.engine, tr.train_set, tr.total
    s.model.train()
    seed_everything(cfg.run.seed * 1000 + s.k)  # the same dropout draws whether or not a baseline ran
    start = _resume(strategy, tr.ckpt_dir, tr.settings, total) if tc.resume == "auto" else 0
    strategy.print(f"training {s.task}: {len(train_set.rows)} rows, {total} optimizer steps of {tr.global_batch} rows "
                   f"({tc.micro_batch_size} micro x {tr.accum} accumulation x {strategy.world_size} ranks; "
                   f"{tr.per_epoch} steps per epoch), {tr.n_trainable:,} trainable parameters"
                   + (f", resuming at step {start}" if start else ""))
    pad = s.tokenizer.pad_token_id
    data_seed = cfg.run.seed * 1000 + s.k
    window: dict[str, float] = {}
    disc: dict[str, tuple[float, float]] = {}  # class -> (accuracy x steps, steps): the stage's mean
    # every class a rank may show the discriminators this stage (a rank's window may lack some: memory turns)
    disc_classes = ([s.task] + (cfg.data.order[: s.k - 1] if s.memory is not None else [])
                    + ([NOISE] if cfg.experts.discriminator_extra == "noise" else [])) if len(s.model.discriminators) else []
    first_loss = last_loss = None
    tokens_trained, loss_curve = 0.0, []  # over all ranks; [global step, task loss] of every logging window
    t_start = t_window = time.time()
    progress = Progress(start, total, f"stage {s.k} ({s.task})", strategy.is_main())
    step_seconds = []
    for step in range(start, total):
        t_step = time.time()
        for micro, rows in enumerate(step_batches(len(train_set.rows), step, tc.micro_batch_size, tr.accum,
                                                  strategy.world_size, strategy.rank, data_seed)):
            batch = collate([train_set.rows[i] for i in rows], pad)
            batch["answer_positions"] = answer_positions(batch["labels"])  # on the host: no device wait
            batch = {k: v.to(strategy.device, non_blocking=True) for k, v in batch.items()}
            # one draw per micro-batch of the global batch (its index j: micro * world + rank, as step_batches
            # deals them), so any number of ranks sees the memory rows one rank would
            turn = (step * tr.accum + micro) * strategy.world_size + strategy.rank
            memory = s.memory and s.memory.batch(cfg.data.order[: s.k - 1], turn, cfg.experts.memory_batch,
                                                 data_seed, pad)
            memory = memory and (memory[0].to(strategy.device), memory[1].to(strategy.device), memory[2])
            out = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], s.task, memory,
                         answer_positions=batch["answer_positions"])
            strategy.backward(out.loss)
            _accumulate(window, out, 1 / tr.accum)
        grad_norm = strategy.optimizer_step()
        release_freed_memory()  # a step's activations are freed: give the pages back before the next one
        step_seconds.append(time.time() - t_step)
        window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
        window["steps"] = window.get("steps", 0) + 1
        progress.step()
        if (step + 1) % tc.log_every == 0 or step + 1 == total:
            means = _window_means(window, strategy, disc_classes)
            now = time.time()
            tokens = means.pop("tokens")
            tokens_trained += tokens
            means["tokens_per_s"] = tokens / max(now - t_window, 1e-9)
            for c in [k.removeprefix("disc_steps/") for k in list(means) if k.startswith("disc_steps/")]:
                n = means.pop(f"disc_steps/{c}")
                disc[c] = (disc.get(c, (0.0, 0.0))[0] + n * means[f"disc_acc/{c}"], disc.get(c, (0.0, 0.0))[1] + n)
            last_loss = means["task_loss"]
            first_loss = last_loss if first_loss is None else first_loss
            loss_curve.append([step0 + step + 1, round(last_loss, 6)])
            monitor.scalars(step0 + step + 1, {f"train/{k}": v for k, v in means.items() if not k.startswith("gate")})
            monitor.scalars(step0 + step + 1, {f"gate_shared/layer_{k.split('_')[-1]}": v
                                               for k, v in means.items() if k.startswith("gate")})
            monitor.scalars(step0 + step + 1, {"train/lr": strategy.lr()})
            progress.log(step + 1, means["task_loss"], means.get("disc_loss"), strategy.lr())
            window, t_window = {}, now
        if strategy.stop_requested():  # SIGUSR1 (walltime near) or SIGTERM, on any rank
            save_checkpoint(s, tr, strategy, step + 1)
            raise Interrupted(f"stage {s.k} ({s.task}) stopped on {strategy.stop_reason()} after step {step + 1}/"
                              f"{total}; checkpoint in {tr.ckpt_dir}; run the stage again to continue")
        if tc.checkpoint_every and ((step + 1) % tc.checkpoint_every == 0 or step + 1 == total):
            save_checkpoint(s, tr, strategy, step + 1)  # also after the last step: evaluation may be cut short
    progress.close()
    return {"steps": total, "global_batch": tr.global_batch, "accumulation": tr.accum,
            "overflow_skipped_steps": strategy.skipped_steps(),  # float16: steps skipped by loss scaling
            "below_min_steps": total < tc.min_steps, "resumed_at": start, "seconds": time.time() - t_start, "rows": len(train_set.rows),
            "first_logged_task_loss": first_loss, "last_logged_task_loss": last_loss,
            "discriminator_accuracy": {c: round(a / n, 4) for c, (a, n) in disc.items()} or None,
            "trainable_parameters": tr.n_trainable, "step_seconds": [round(t, 3) for t in step_seconds],
            "tokens": int(tokens_trained), "logged_task_loss": loss_curve}


def save_checkpoint(s: Setup, tr: Training, strategy: Strategy, step: int) -> None:
    """A mid-stage checkpoint (trainable state, optimizer, scheduler, RNG, step), made durable before
    `latest` names it; only then is the previous one removed.

    Beside DeepSpeed's files, `moecl.json` maps module parameter names to adapter names, so the
    adapter tools can read the checkpoint (through zero_to_fp32) without building the model."""
    runlock.check_held(strategy)
    ckpt_dir, tag = tr.ckpt_dir, f"step-{step:07d}"
    latest = ckpt_dir / "latest"
    if latest.is_file() and latest.read_text().strip() == tag:
        return  # resumed at this very step: nothing trained since
    try:
        strategy.save_checkpoint(ckpt_dir, tag, {"step": step, "rng": rng_state(), "settings": tr.settings})
        atomic.fsync_tree(ckpt_dir / tag)  # on every rank: each makes its own files durable
    except BaseException as e:
        full = atomic.disk_full_error(e, ckpt_dir / tag, "the previous checkpoint and completed stages are intact")
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # `latest` still names the previous checkpoint
        if full is None:
            raise
        raise full from e
    strategy.barrier()  # every rank's files are written
    if strategy.is_main():
        atomic.write_json(ckpt_dir / tag / CHECKPOINT_INFO, {
            "stage": s.k, "task": s.task, "step": step, "order": s.cfg.data.order,
            "learned": s.cfg.data.order[: s.k], "config": to_dict(s.cfg), "adapter_names": s.model.adapter_names(),
            "base_model": base_record(s),
            "previous": s.previous.manifest["files"][ADAPTERS] if s.previous else None})
        atomic.fsync_dir(ckpt_dir / tag)
        atomic.write_text(latest, tag)  # only now: a kill before this resumes the previous one
        for old in ckpt_dir.glob("step-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def _resume(strategy: Strategy, ckpt_dir: Path, settings: dict, total: int) -> int:
    client = strategy.load_checkpoint(ckpt_dir)
    if client is None:
        return 0
    saved = client.get("settings") or {}
    if "model" in saved and same_model(saved["model"]["path"], settings["model"]["path"]):
        saved["model"]["path"] = settings["model"]["path"]  # the same folder, written relative or absolute
    if saved != settings:
        raise CheckpointError(f"{ckpt_dir}: the mid-stage checkpoint was written with other training settings "
                              f"({', '.join(_differences(saved, settings))} differ); use the same ones, or delete the folder (or set "
                              "train.resume=never) to restart the stage")
    set_rng_state(client["rng"])
    release_freed_memory()  # the checkpoint's tensors were read into temporary buffers
    strategy.print(f"resuming from {ckpt_dir / ('step-%07d' % client['step'])}")
    return min(int(client["step"]), total)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def _resume_settings(s: Setup, world_size: int) -> dict:
    """What a mid-stage checkpoint must agree on to be resumed: only what changes the training trajectory
    (model, experts, the stage's training data and its tokenization, training settings, seed, ranks, the
    previous stage). Not slurm.*, distributed.*, eval.*, run.dir or cache folders: a job resubmitted with a
    longer walltime, or a run folder moved elsewhere, resumes."""
    c = to_dict(s.cfg)
    train = {k: v for k, v in c["train"].items()
             if k not in ("checkpoint_every", "resume", "log_every", "activation_checkpointing", "min_steps")
             and not (k == "global_batch_size" and v is None)}  # as checkpoints written before it read
    data = {k: v for k, v in c["data"].items() if k not in ("root", "cache_dir", "max_eval_examples")}
    rows = hashlib.sha256(json.dumps(s.tasks[s.task].train, sort_keys=True).encode()).hexdigest()
    what = {"model": {k: c["model"][k] for k in ("path", "dtype")}, "experts": c["experts"], "data": data,
            "train": train, "seed": c["run"]["seed"], "rows": rows, "tokenizer": s.fmt.identity,
            "world_size": world_size, "previous": s.previous.manifest["files"][ADAPTERS] if s.previous else None,
            "stage": s.k}
    return json.loads(json.dumps(what))  # as it reads back from a checkpoint (tuples become lists)


class StopRequested(Exception):
    """A stop signal arrived during evaluation (seen between two tasks' evaluations)."""


def evaluate_tasks(s: Setup, strategy: Strategy, label: str, per_row: bool = False, full: Sequence[str] | None = None
                   ) -> tuple[dict[str, float], dict[str, list[bool]], dict[str, int]]:
    """Test accuracy of every task of the order with its task id given (tasks not learned yet use the
    shared expert alone), with `per_row` whether each test row was answered right, and the rows each
    accuracy is over: all test rows for the tasks in `full` (None: every task), the first
    eval.other_rows for the others. Raises StopRequested, on every rank, if a stop signal arrives
    (checked before each task)."""
    strategy.print(f"evaluating {len(s.tests)} task(s), {label}")
    acc, rows, counts = {}, {}, {}
    for t, enc in s.tests.items():
        if strategy.stop_requested():
            raise StopRequested()
        if full is not None and t not in full and s.cfg.eval.other_rows is not None:
            enc = replace(enc, rows=enc.rows[: s.cfg.eval.other_rows] if isinstance(enc.rows, list)
                          else enc.rows.select(range(min(len(enc.rows), s.cfg.eval.other_rows))))
        result = evaluate(s.model, enc, s.tokenizer, s.cfg.eval.batch_size, s.cfg.eval.max_new_tokens,
                          strategy, per_row=per_row, option_pairs=s.cfg.eval.option_pairs)
        acc[t], rows[t], counts[t] = result["accuracy"], result.get("correct_rows"), result["total"]
    if strategy.stop_requested():
        raise StopRequested()
    strategy.print(f"test accuracy, {label}: " + "  ".join(f"{t} {a:.3f}" for t, a in acc.items()))
    return acc, rows, counts


# -- the task router (trainer/router.py) ------------------------------------------------------------

def router_layers(cfg: Config, model: MoECLModel, strategy: Strategy) -> int:
    """router.layer, or the base's depth when the base has fewer layers (said once)."""
    depth = model.base.config.num_hidden_layers
    if cfg.router.layer > depth:
        strategy.print(f"note: router.layer={cfg.router.layer} but the base has {depth} layers; the router uses all {depth}")
    return min(cfg.router.layer, depth)


def load_router(record: StageRecord) -> Router | None:
    """The router saved with a stage (None for a stage written before routers existed)."""
    sha = record.manifest["files"].get(ROUTER)
    return Router.load(record.folder / ROUTER, sha) if sha else None


def fit_router(s: Setup, strategy: Strategy) -> tuple[Router, float]:
    """The previous stage's router plus this stage's task, from its training rows (and any learned task
    the previous router lacks: a run begun before routers existed). Returns (router, seconds)."""
    cfg, t0 = s.cfg, time.time()
    layers = router_layers(cfg, s.model, strategy)
    router = replace(s.router or Router(layers), shrinkage=cfg.router.shrinkage, min_confidence=cfg.router.min_confidence,
                     device=strategy.device)
    for t in cfg.data.order[: s.k]:
        if t not in router.tasks:
            rows = s.tasks[t].router_rows(cfg.router.max_rows, cfg.run.seed)
            feats = gather_features(s.model, request_ids(s.tokenizer, [request_text(r) for r in rows], cfg.data.max_length),
                                    layers, strategy, cfg.eval.batch_size, s.tokenizer.pad_token_id)
            router = router.with_task(t, feats)
    seconds = time.time() - t0
    strategy.print(f"task router: {len(router.tasks)} task(s), layer {layers}, "
                   f"{router.count[s.task]} rows of {s.task} ({seconds:.1f} s)")
    return router, seconds


def router_features_of(s: Setup, task: str, layers: int, strategy: Strategy) -> torch.Tensor:
    """Router features of a task's test rows, computed once per process (the base is frozen)."""
    if task not in s.route_features:
        ids = request_ids(s.tokenizer, [request_text(r) for r in s.tasks[task].test], s.cfg.data.max_length)
        s.route_features[task] = gather_features(s.model, ids, layers, strategy, s.cfg.eval.batch_size,
                                                 s.tokenizer.pad_token_id)
    return s.route_features[task]


def evaluate_inferred(s: Setup, strategy: Strategy, router: Router, given_rows: dict[str, list[bool]],
                      given_seconds: float) -> dict:
    """Accuracy with the router choosing each test row's task (its prompt and its experts), for the
    learned tasks and the next one (forward transfer reads it), and the share of rows routed right.

    A row routed to its own task is served exactly as with its id given, so its given-id result is
    reused; only the rows routed elsewhere are evaluated again, under the routed task. Such a row is
    right when the routed task's answer is the row's answer (label text, or output): e.g. a yelp review
    routed to amazon (the same five labels) can still be rated right."""
    order, learned = s.cfg.data.order, s.cfg.data.order[: s.k]
    columns = order[: s.k + 1]
    t0 = time.time()
    routes = {t: router.route(router_features_of(s, t, router.layer, strategy)) for t in columns}
    routing_seconds = time.time() - t0
    routing, inferred, flagged = {}, {}, {}
    for j in columns:
        if strategy.stop_requested():
            raise StopRequested()
        chosen, n = routes[j].tasks, len(routes[j].tasks)
        right = sum(ok for ok, r in zip(given_rows[j], chosen) if r == j)
        for other in sorted(set(chosen) - {j}):
            rows = [i for i, r in enumerate(chosen) if r == other]
            enc = routed_encoding(s, j, other, rows)
            right += evaluate(s.model, enc, s.tokenizer, s.cfg.eval.batch_size, s.cfg.eval.max_new_tokens,
                              strategy, option_pairs=s.cfg.eval.option_pairs)["correct"]
        routing[j] = sum(r == j for r in chosen) / n if j in learned else None
        inferred[j] = right / n
        flagged[j] = sum(routes[j].flagged(router.min_confidence)) / n
    if strategy.stop_requested():
        raise StopRequested()
    seconds = {"given": round(given_seconds, 3), "routing": round(routing_seconds, 3),
               "rerouted": round(time.time() - t0 - routing_seconds, 3)}
    strategy.print("routed to their own task: " + "  ".join(f"{t} {a:.3f}" for t, a in routing.items() if a is not None)
                   + f"  ({seconds['routing']:.1f} s, {100 * seconds['routing'] / max(given_seconds, 1e-9):.1f}% of the "
                   f"given-id evaluation's {given_seconds:.1f} s)")
    strategy.print("test accuracy, task id inferred: " + "  ".join(f"{t} {a:.3f}" for t, a in inferred.items()))
    return {"routing_accuracy": routing, "inferred_accuracy": inferred, "routing_flagged": flagged,
            "confusion": {j: {t: routes[j].tasks.count(t) for t in sorted(set(routes[j].tasks))} for j in columns},
            "seconds": seconds}


def routed_encoding(s: Setup, task: str, routed: str, rows: list[int]) -> Encoded:
    """Test rows of `task` (by index) as requests served under `routed`: its prompt around each row's text,
    its experts, and as target the row's own answer where `routed` can give it (else no answer is right)."""
    src, dst = s.tasks[task], s.tasks[routed]
    requests = [as_request(src.test[i], dst.kind) for i in rows]
    enc = s.fmt.encode_rows(replace(dst, train=[], val=[], test=[], train_all=[]), requests)
    for i, row in zip(rows, enc.rows):
        answer = answer_text(src, src.test[i])
        if dst.kind == "classification":
            row["label"] = dst.labels.index(answer) if answer in dst.labels else -1
        else:
            row["target"] = answer
    return enc


def as_request(row: dict, kind: str) -> dict:
    """A row of one task as a request row for a task of `kind` (its text only; no answer). A generation
    task's prompt is the row's own instruction; a classification row has none, so its text is the ask."""
    if kind == "classification":
        return {"text": request_text(row), "label": 0, "ref": row["ref"]}
    return {"instruction": row.get("instruction", ""), "text": row["text"], "output": "", "ref": row["ref"]}


def answer_text(task: Task, row: dict) -> str:
    """A row's answer as text: its label, or its output."""
    return task.labels[row["label"]] if task.kind == "classification" else row["output"].strip()


def save_stage(s: Setup, strategy: Strategy, baseline: dict, test_acc: dict, val: float | None,
               train_stats: dict, step0: int, seconds: float, router: Router, router_seconds: float,
               routed: dict | None, train_rows, performance: dict | None = None, t_stage: float | None = None,
               phases: dict[str, float] | None = None) -> StageRecord:
    """Write the stage folder (adapters + manifest + config) atomically; every rank returns its record.
    `performance` (trainer/perf.py) gets the stage's time split from `t_stage` (its start) and `phases`
    (seconds by phase, to which saving is added)."""
    run = RunDir(s.cfg.run.dir)
    named = s.model.adapter_parameters()
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    # Frozen experts are written back exactly as they were loaded: bit-identical whatever the precision.
    t0 = time.time()
    tensors = {k: s.restored[k] for k in named if k not in trainable}
    tensors.update(strategy.full_tensors(trainable))  # a collective: on every rank
    resources = footprint(s, strategy)  # a collective too
    folder = run.stage_dir(s.k, s.task)
    runlock.check_held(strategy)
    if strategy.is_main():
        with atomic.full_disk_explained(folder, "completed stages and the last checkpoint are intact"), \
                atomic.staged_dir(folder) as tmp:
            # One metadata key: safetensors writes several in a per-process random (hash map) order.
            sha = checkpoint.save_adapters(tmp / ADAPTERS, tensors, {"format": "moe-cl"})
            router_sha = router.save(tmp / ROUTER)
            files = {ADAPTERS: sha, ROUTER: router_sha}
            if s.memory is not None:  # this stage's task joins the memory the next stages read
                files[MEMORY] = s.memory.with_task(s.task, train_rows, s.cfg.experts.memory_rows,
                                                   s.cfg.run.seed).save(tmp / MEMORY)
            resources["save_seconds"] = round(time.time() - t0, 3)
            manifest = {
                "stage": s.k, "task": s.task, "order": s.cfg.data.order, "learned": s.cfg.data.order[: s.k],
                "config": to_dict(s.cfg),
                "base_model": base_record(s),
                "steps": train_stats["steps"], "global_step": step0 + train_stats["steps"],
                "train": train_stats, "seconds": seconds, "world_size": strategy.world_size, "resources": resources,
                "performance": performance and {**performance, "time": time_split(
                    {**phases, "save": resources["save_seconds"]}, time.time() - t_stage)},
                "distributed": strategy.describe(),  # strategy, DeepSpeed config, and with ds_config=auto the plan
                "eval": {"test_accuracy": test_acc, "val_accuracy": val, "task_id": s.cfg.eval.task_id,
                         **(routed or {})},
                "router": {"layer": router.layer, "rows": router.count, "seconds": round(router_seconds, 3)},
                "data": {t: task.provenance for t, task in s.tasks.items() if task.provenance},  # data.tasks sources
                "baseline": baseline,
                "files": files,
                "previous": ({"stage": s.previous.index, "sha256": s.previous.manifest["files"][ADAPTERS]}
                             if s.previous else None),
                "versions": _versions(),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            atomic.write_json(tmp / MANIFEST, manifest)
            atomic.write_text(tmp / "config.yaml", dump_yaml(s.cfg))
        shutil.rmtree(run.checkpoint_dir(s.k, s.task), ignore_errors=True)  # superseded by the stage output
        strategy.print(f"stage {s.k} written to {folder}")
    strategy.barrier()
    return run.require_stage(s.k, s.cfg.data.order)


def base_record(s: Setup) -> dict:
    """The base a stage or checkpoint was trained on: its folder, fingerprint and dtype in training
    (which the adapter tools serve in; a base may be stored in another, as Llama-2-7b-hf is in float16)."""
    return {"path": str(s.base_folder), "fingerprint": base_fingerprint(s.base_folder),
            "dtype": str(s.model.base.dtype).removeprefix("torch.")}


def footprint(s: Setup, strategy: Strategy) -> dict:
    """Bytes each rank holds of the frozen base and of the adapters (its ZeRO-3 partitions), and timings."""
    adapters = {id(p) for p in s.model.adapter_parameters().values()}
    held = {"base": 0, "adapters": 0, "base_total": 0}
    for p in s.model.parameters():
        local, full = strategy.local_numel(p)
        kind = "adapters" if id(p) in adapters else "base"
        held[kind] += local * p.element_size()
        held["base_total"] += full * p.element_size() if kind == "base" else 0
    base_params = sum(strategy.local_numel(p)[1] for p in s.model.parameters() if id(p) not in adapters)
    return {"world_size": strategy.world_size, "base_params": base_params, "base_bytes": held["base_total"],
            "frozen_bytes_per_rank": [int(b) for b in strategy.per_rank(held["base"])],
            "adapter_bytes_per_rank": [int(b) for b in strategy.per_rank(held["adapters"])],
            "load_seconds": round(s.load_seconds, 3)}


def report(run_root: Path, order: list[str] | None, strategy: Strategy, monitor: Monitor | None = None,
           write: bool = True) -> dict | None:
    """Accuracy matrix, ACC/BWT/FWT of the complete stages: printed, and written as metrics.json + accuracy.png."""
    run = RunDir(run_root)
    if order is None:
        order = _order_from_run(run)
    stages = run.completed(order)
    if not stages:
        strategy.print(f"{run.root}: no complete stage yet")
        return None
    baseline = [stages[0].manifest["baseline"][t] for t in order]
    accuracy = [[rec.manifest["eval"]["test_accuracy"][t] for t in order] for rec in stages]
    summary = cl_metrics(accuracy, baseline)
    metrics = {"tasks": order, "accuracy": accuracy, "baseline": baseline, **summary,
               "stages_complete": len(stages)}
    if all("test_rows" in rec.manifest["eval"] for rec in stages):  # (stages written before eval.other_rows lack them)
        metrics["test_rows"] = [[rec.manifest["eval"]["test_rows"][t] for t in order] for rec in stages]
        metrics["baseline_rows"] = [stages[0].manifest["eval"]["baseline_rows"][t] for t in order]
    # With eval.task_id=inferred (every stage): the same matrix with the router choosing each row's task.
    # The untrained baseline has no router, so its given-id figures stand for both.
    if all("inferred_accuracy" in rec.manifest["eval"] for rec in stages):
        inferred = [[rec.manifest["eval"]["inferred_accuracy"].get(t) for t in order] for rec in stages]
        metrics["routing_accuracy"] = [[rec.manifest["eval"]["routing_accuracy"].get(t) for t in order]
                                       for rec in stages]
        metrics["inferred"] = {"accuracy": inferred, **cl_metrics(inferred, baseline)}
    if strategy.is_main() and write:
        atomic.write_json(run.root / "metrics.json", metrics)
        fig = heatmap(order, accuracy, baseline, run.root / "accuracy.png")
        if monitor is not None:  # at the last complete stage's global optimizer step, as every evaluation scalar
            step = stages[-1].manifest["global_step"]
            monitor.scalars(step, {"cl/ACC": summary["ACC"], "cl/BWT": summary["BWT"], "cl/FWT": summary["FWT"]})
            monitor.figure("cl/accuracy_matrix", fig, step)
            if "inferred" in metrics:
                monitor.scalars(step, {f"cl_inferred/{k}": metrics["inferred"][k] for k in ("ACC", "BWT", "FWT")})
    strategy.print(format_table(order, accuracy, baseline, summary))
    if "inferred" in metrics:
        strategy.print("task id inferred by the router:\n" + format_table(order, metrics["inferred"]["accuracy"], baseline,
                                                                          metrics["inferred"]))
        strategy.print("routed to their own task:\n" + format_table(order, metrics["routing_accuracy"], None, None))
    return metrics


def restore_adapters(model: MoECLModel, tensors: dict[str, torch.Tensor], source: Path, strategy: Strategy) -> None:
    named = model.adapter_parameters()
    checkpoint.check_fits(tensors, {k: getattr(p, "ds_shape", p.shape) for k, p in named.items()}, source)
    with torch.no_grad(), strategy.gathered(named.values(), modify=True):
        for k, p in named.items():
            p.copy_(tensors[k].to(p.dtype))


def lr_lambda(total: int, tc):
    warmup = int(round(tc.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if tc.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * decay

    return f


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`): without it, memory freed after a step or
    a checkpoint read stays in the process's RSS, which counts against a host's memory at 7B on CPU."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _accumulate(window: dict, out, weight: float) -> None:
    """Add a micro-step's statistics to the logging window. The sums stay on the device (no host
    synchronisation per micro-step); `_window_means` reads them back once, at a logging step."""
    def add(key, value):
        window[key] = window.get(key, 0.0) + weight * value.detach()

    add("task_loss", out.task_loss)
    if out.disc_loss is not None:
        add("disc_loss", out.disc_loss)
        for c, acc in out.disc_acc.items():  # per class, with how often it was seen (memory: one task a step)
            add(f"disc_acc/{c}", acc)
            window[f"disc_seen/{c}"] = window.get(f"disc_seen/{c}", 0.0) + weight
    if out.orth_loss is not None:
        add("orth_loss", out.orth_loss)
    if out.match_loss is not None:
        add("match_loss", out.match_loss)
    for i, g in enumerate(out.gate_shared):
        add(f"gate_{i}", g)
    window["tokens"] = window.get("tokens", 0) + out.tokens


def _on_host(window: dict) -> dict:
    """The window with its device sums read back in one transfer."""
    keys = [k for k, v in window.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([window[k].double() for k in keys]).tolist() if keys else []
    return {**window, **dict(zip(keys, values))}


def _window_means(window: dict, strategy: Strategy, disc_classes: list[str] = ()) -> dict:
    window = _on_host(window)
    steps = window.pop("steps")
    tokens = window.pop("tokens")
    for c in disc_classes:  # the same keys on every rank for the reduction
        window.setdefault(f"disc_acc/{c}", 0.0)
        window.setdefault(f"disc_seen/{c}", 0.0)
    means = strategy.all_reduce({k: v / steps for k, v in window.items()}, op="mean")
    means["tokens"] = strategy.all_reduce({"tokens": tokens})["tokens"]
    seen = {k.removeprefix("disc_seen/"): means.pop(k) for k in list(means) if k.startswith("disc_seen/")}
    for c, n in list(seen.items()):
        if n == 0:  # not shown to the discriminators in this window (on any rank)
            del means[f"disc_acc/{c}"], seen[c]
            continue
        means[f"disc_acc/{c}"] /= n
        means[f"disc_steps/{c}"] = n * steps
    if seen:  # the mean over the classes seen in the window
        means["disc_acc"] = sum(means[f"disc_acc/{c}"] for c in seen) / len(seen)
    return means


def _check_compatible(previous: StageRecord, cfg: Config) -> None:
    """Stage K must use the experts config and base model of stage K-1."""
    before = previous.manifest["config"]
    diffs = [f"experts.{k}: {v!r} -> {getattr(cfg.experts, k)!r}" for k, v in before["experts"].items()
             if k not in ("adversarial_weight", "orthogonal_weight") and getattr(cfg.experts, k) != v]
    layer = before.get("router", {}).get("layer")
    if layer is not None and layer != cfg.router.layer:
        diffs.append(f"router.layer: {layer!r} -> {cfg.router.layer!r}")
    if not same_model(before["model"]["path"], cfg.model.path):
        diffs.append(f"model.path: {before['model']['path']!r} -> {cfg.model.path!r}")
    if diffs:
        raise CheckpointError(f"{previous.folder / MANIFEST}: stage {previous.index} ran with another model/experts "
                              f"config than this one ({'; '.join(diffs)}); use the same settings or a new run.dir")


def _order_from_run(run: RunDir) -> list[str]:
    manifests = sorted((run.root / "stages").glob(f"*/{MANIFEST}"))
    if not manifests:
        raise CheckpointError(f"{run.root}: no stage outputs (stages/*/{MANIFEST}); is this a run folder?")
    return json.loads(manifests[0].read_text())["order"]


def _versions() -> dict:
    return {"python": platform.python_version(), "commit": _source_commit(),
            **{pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformers", "deepspeed", "datasets")}}


def _source_commit() -> str | None:
    """The git commit of the trainer's source, "+dirty" if it has local changes; None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
