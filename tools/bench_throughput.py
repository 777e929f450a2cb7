"""Training throughput of a stage's steps on an experiment config, for the trainer source in SOURCE.

    python tools/bench_throughput.py configs/bench_cpu.yaml [--source DIR] [--steps 12] [key=value ...]

Runs the first task of data.order with the config's method, micro-batch and data settings (real rows,
drawn at random, seed 0) through forward + backward + AdamW in one process; prints the median step
time and real tokens/s, padded tokens/s, rows/s and tokens per row over `--steps` steps after 2 warm-up
steps. `--source` points at another checkout of this repository (e.g. `git worktree add ../old <commit>`)
to compare commits on one config; the same interpreter and packages run both.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--source", default=str(REPO), help="a checkout of this repository whose trainer/ to time")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_intermixed_args(argv)
    sys.path.insert(0, str(Path(args.source).resolve()))
    import torch

    from trainer.base import load_base
    from trainer.config import load_config
    from trainer.data import PromptFormat, collate, load_tasks
    from trainer.model import MoECLModel

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    base, tok, _ = load_base(cfg.model)
    task = load_tasks(cfg.data, 0)[0]
    enc = PromptFormat(tok, cfg.data).encode(task, "train")
    model = MoECLModel(base, cfg.data.order, cfg.experts)
    model.add_task(task.name)
    params = model.freeze_all_but(task.name)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = random.Random(0)
    times, real, padded = [], 0, 0
    for i in range(args.steps + 2):
        rows = [enc.rows[j] for j in rng.sample(range(len(enc.rows)), cfg.train.micro_batch_size)]
        batch = collate(rows, tok.pad_token_id)
        t0 = time.perf_counter()
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], task.name)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
    total = sum(times)
    figures = {"source": args.source, "config": args.config, "overrides": args.overrides,
               "dtype": str(base.dtype).removeprefix("torch."), "method": cfg.experts.method, "task": task.name,
               "steps": len(times), "median_step_seconds": statistics.median(times), "real_tokens_per_s": real / total,
               "padded_tokens_per_s": padded / total, "rows_per_s": len(times) * cfg.train.micro_batch_size / total,
               "tokens_per_row": real / len(times) / cfg.train.micro_batch_size}
    print(f"{args.config} {' '.join(args.overrides)} ({args.source}): {figures['dtype']}, {cfg.experts.method} on "
          f"{task.name}, median {figures['median_step_seconds']:.3f} s/step, {figures['real_tokens_per_s']:.0f} real "
          f"tokens/s, {figures['rows_per_s']:.2f} rows/s, {figures['tokens_per_row']:.1f} tokens/row")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
