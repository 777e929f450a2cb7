"""Why does MoCL route the way it does? Its task keys, trained as the trainer trains them, measured.

    python tools/mocl_study.py CONFIG [--run RUN_DIR] [--lr-mults 1,10,100] [--scales 8,32,128]
                               [--eval-rows 300] [key=value ...]

MoCL (`experts.method: mocl`) weighs every learned LoRA of a row by softmax(mocl_scale x cos(query, key_t)),
the query being the mean frozen token embedding of the row's prompt. The query never depends on a
trained parameter, so the matching loss mean(1 - cos(query, key_t)) of a key's own stage can be
trained here on the queries alone, in seconds, as a stage trains it: the key initialised from the
stage's seed (`add_task` after `seed_everything(seed * 1000 + k)`), AdamW at train.lr x MULT with the
stage's schedule, the stage's batches (`step_batches`). What this leaves out: the step's global gradient
clipping, and from stage 2 on the task loss, which reaches the new key through the weights (with one
learned task the softmax is 1 and passes none). `--run` measures the gap. For every MULT, after the last stage of
data.order, per task: the share of `--eval-rows` test rows whose largest weight is their own task's LoRA
(`top`: independent of the scale), the mean weight on it at each `--scales` value (`own@S`; 1/T for
uniform weights over T tasks) and the mean cos(query, own key). Also the mean cosine between the
queries of every pair of tasks, and with `--run` (a finished mocl run of this config) the same figures
for the run's own keys and, per task, |run's key - the key trained here at x1| / |run's key - its
initial value| (0: this script reproduces the run's key training; 1: no closer than the initial key).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.checkpoint import RunDir  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import PromptFormat, collate, load_tasks, step_batches, steps_per_epoch  # noqa: E402
from trainer.distributed import LocalStrategy  # noqa: E402
from trainer.model import IGNORE, MoECLModel  # noqa: E402
from trainer.recipe import encode, load_model, lr_lambda, seed_everything  # noqa: E402


def queries(model: MoECLModel, rows: list[dict], pad: int, batch: int = 64) -> torch.Tensor:
    """(rows, hidden) float32: each row's MoCL query over its prompt tokens, as a training step takes it."""
    out = []
    for start in range(0, len(rows), batch):
        b = collate(rows[start:start + batch], pad)
        out.append(model.mocl_query(b["input_ids"], b["attention_mask"] * (b["labels"] == IGNORE)))
    return torch.cat(out)


def initial_keys(model: MoECLModel, cfg) -> dict[str, torch.Tensor]:
    """Each task's key as its stage initialises it: `add_task` (LoRA inits first, then the key) right
    after the stage's `seed_everything`, as `prepare_training` calls them."""
    keys = {}
    for k, task in enumerate(cfg.data.order, start=1):
        seed_everything(cfg.run.seed * 1000 + k)
        model.add_task(task)
        keys[task] = model.task_keys[task].vector.detach().float().clone()
    return keys


def train_keys(initial: dict[str, torch.Tensor], cfg, train_q: dict[str, torch.Tensor], mult: float
               ) -> dict[str, torch.Tensor]:
    """Every task's key, stage by stage, as a stage of `cfg` trains it, at train.lr x mult."""
    tc, keys = cfg.train, {}
    for k, task in enumerate(cfg.data.order, start=1):
        key = torch.nn.Parameter(initial[task].clone())
        opt = torch.optim.AdamW([key], lr=tc.lr * mult, weight_decay=tc.weight_decay)
        accum = tc.accumulation(1)
        total = tc.max_steps or tc.epochs * steps_per_epoch(len(train_q[task]), tc.micro_batch_size * accum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, tc))
        for step in range(total):
            opt.zero_grad()
            for rows in step_batches(len(train_q[task]), step, tc.micro_batch_size, accum, 1, 0,
                                     cfg.run.seed * 1000 + k):
                loss = (1 - F.cosine_similarity(train_q[task][rows], key.unsqueeze(0), dim=-1)).mean()
                (loss / accum).backward()
            opt.step()
            sched.step()
        keys[task] = key.detach().clone()
    return keys


def routing(keys: dict[str, torch.Tensor], test_q: dict[str, torch.Tensor], scales: list[float]) -> dict:
    """Per task: top (share of rows whose largest weight is their own task's), own@S, cos_own."""
    names = list(keys)
    K = torch.stack([keys[t] for t in names])
    out = {}
    for j, t in enumerate(names):
        cos = F.cosine_similarity(test_q[t].unsqueeze(1), K.unsqueeze(0), dim=-1)
        fig = {"top": float((cos.argmax(-1) == j).float().mean()), "cos_own": float(cos[:, j].mean())}
        fig.update({f"own@{s:g}": float(torch.softmax(s * cos, -1)[:, j].mean()) for s in scales})
        out[t] = fig
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value, as for python -m trainer")
    ap.add_argument("--run", help="a finished mocl run of this config: report its own keys too")
    ap.add_argument("--lr-mults", default="1,10,100", help="key learning rates to try, as multiples of train.lr")
    ap.add_argument("--scales", default="8,32,128", help="softmax scales to report the own weight at")
    ap.add_argument("--eval-rows", type=int, default=300, help="test rows per task")
    args = ap.parse_intermixed_args(argv)
    mults = [float(m) for m in args.lr_mults.split(",")]
    scales = [float(s) for s in args.scales.split(",")]
    cfg = load_config(args.config, [*args.overrides, "experts.method=mocl", "run.dir=/nonexistent/mocl_study"])
    strategy = LocalStrategy("cpu")
    model, tok, _, _ = load_model(cfg, None, strategy)  # the base as a run of this config loads it (dtype too)
    fmt = PromptFormat(tok, cfg.data)
    tasks = {t.name: t for t in load_tasks(cfg.data, cfg.run.seed)}
    order = cfg.data.order
    pad = tok.pad_token_id
    train_q = {t: queries(model, list(encode(fmt, tasks[t], "train", strategy).rows), pad) for t in order}
    test_rows = {t: encode(fmt, tasks[t], "test", strategy).rows for t in order}
    test_q = {t: queries(model, [test_rows[t][i] for i in range(min(args.eval_rows, len(test_rows[t])))], pad)
              for t in order}
    normed = {t: F.normalize(q, dim=-1) for t, q in test_q.items()}
    pairs = {t: {u: float((normed[t] @ normed[u].T).mean()) for u in order} for t in order}
    print(f"mean cos(query, query) over {args.eval_rows} test rows per task (row: task, column: other task)")
    print(" " * 10 + "".join(f"{u:>10}" for u in order))
    for t in order:
        print(f"{t:<10}" + "".join(f"{pairs[t][u]:10.3f}" for u in order))
    result = {"config": args.config, "order": order, "query_cos": pairs, "lr_mults": {}}

    def show(label: str, figures: dict) -> None:
        print(f"{label}: per task top / " + " / ".join(f"own@{s:g}" for s in scales) + " / cos_own")
        print("    " + "  ".join(f"{t}: {f['top']:.2f} / " + " / ".join(f"{f[f'own@{s:g}']:.2f}" for s in scales)
                                 + f" / {f['cos_own']:.2f}" for t, f in figures.items()))

    initial, replicated = initial_keys(model, cfg), None
    for mult in mults:
        keys = train_keys(initial, cfg, train_q, mult)
        replicated = keys if mult == 1 else replicated
        figures = routing(keys, test_q, scales)
        result["lr_mults"][f"{mult:g}"] = figures
        show(f"keys trained at train.lr x {mult:g}, after stage {len(order)}", figures)
    if args.run:
        record = RunDir(args.run).require_stage(len(order), order)
        if record.manifest["config"]["experts"]["method"] != "mocl":
            sys.exit(f"error: --run {args.run}: not a mocl run")
        tensors = record.read_adapters()
        keys = {t: tensors[f"keys.{t}.vector"].float() for t in order}
        figures = routing(keys, test_q, scales)
        result["run"] = {"dir": args.run, "routing": figures}
        show(f"the keys of {args.run}", figures)
        if replicated is not None:  # how far this script's x1 key is from the run's, per unit the run's key moved
            off = {t: float((keys[t] - replicated[t]).norm() / (keys[t] - initial[t]).norm().clamp_min(1e-12))
                   for t in order}
            result["run"]["x1_error"] = off
            print("|run's key - key trained here at x1| / |run's key - its initial value|: "
                  + "  ".join(f"{t} {e:.3f}" for t, e in off.items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
