"""Continual-learning baselines side by side: the same trainer, data, budget, base model and seeds.

    python tools/benchmark_cl.py configs/bench_cpu.yaml [--methods moe_cl,olora,...] [--orders 1,2,3]
                                 [--seeds 0,1] [--out runs/bench] [--launcher "torchrun --nproc_per_node 8"]
                                 [--task-id given|inferred] [key=value ...]

For every order x method x seed it runs `python -m trainer sequence CONFIG` with `experts.method`,
`data.order` and `run.seed` set (one run folder each, `OUT/order<o>/<method>/seed<s>`, log beside it);
finished runs are kept, so rerunning after an interruption continues where it stopped. Then it writes
`OUT/results.json` and `OUT/results.md` (ACC, BWT, FWT per method and order: mean and spread over
seeds, and the mean ACC over orders with its test-set standard error) and `OUT/heatmaps.png` (every
run's accuracy matrix).

The standard error says how far two ACCs may differ by the luck of a finite test set alone: each
final accuracy a on n test rows is a binomial proportion, so ACC (the mean over T tasks) has
s.e. = sqrt(sum a (1 - a) / n) / T; means over seeds and orders combine their runs' errors.
Orders are the MTL5 orders of O-LoRA / MoE-CL; `--orders config` uses the config's own data.order.

`--task-id inferred` runs every method with `eval.task_id=inferred`: each test row is served as a
deployment without task ids would serve it, the run's task router choosing the task (its prompt, and
the experts of methods that pick experts by task). O-LoRA never needed the id for its experts, but its
prompts name the task's options: with inferred ids every method stands on the same footing. The
tables then report the inferred-id figures; `results.json` keeps the given-id ones and the routing
accuracy beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import atomic  # noqa: E402
from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.data import load_tasks  # noqa: E402
from trainer.metrics import draw_matrix, save_png  # noqa: E402
from trainer.model import METHODS  # noqa: E402

ORDERS = {
    "1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "3": ["yahoo", "amazon", "agnews", "dbpedia"],
}
# As reported in a secondary summary of the MoE-CL paper (its own tables were not at hand):
# Llama-2-7B on MTL5, mean accuracy over orders 1-3; and O-LoRA's own paper on T5-large.
REFERENCE = [("MoE-CL", "Llama-2-7B", 80.5), ("MoCL", "Llama-2-7B", 78.2), ("O-LoRA", "Llama-2-7B", 76.1),
             ("per-task LoRA", "Llama-2-7B", 76.6), ("sequential LoRA", "Llama-2-7B", 26.7),
             ("O-LoRA (its own paper)", "T5-large", 75.8)]


def run_one(cmd: list[str], run_dir: Path, log: Path) -> float:
    """Run one sequence, its output to `log`; returns seconds. Raises with the log's tail on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{run_dir}: the sequence failed (exit {rc}); finished runs are kept, rerun to "
                           f"continue. Last lines of {log}:\n{tail}")
    return time.time() - t0


def complete(run_dir: Path, order: list[str], task_id: str = "given") -> dict | None:
    """The metrics of a finished run (None: not finished); with inferred ids, those figures in their place."""
    path = run_dir / "metrics.json"
    if path.is_file():
        m = json.loads(path.read_text())
        if m["tasks"] == order and len(m["accuracy"]) == len(order):
            if task_id == "given":
                return m
            if "inferred" not in m:
                raise SystemExit(f"error: {run_dir} was run with given task ids only; use another --out for "
                                 f"--task-id inferred")
            return {**m, **{k: m["inferred"][k] for k in ("ACC", "BWT", "FWT", "accuracy")},
                    "given": {k: m[k] for k in ("ACC", "BWT", "FWT", "accuracy")}}
    return None


def test_rows(run_dir: Path) -> dict[str, int]:
    """Test rows per task as the run evaluated them: its saved config through the trainer's data loader."""
    cfg = load_config(run_dir / "config.yaml")
    root = Path(cfg.data.root).expanduser()
    data = dataclasses.replace(cfg.data, root=str(root if root.is_absolute() else REPO / root))
    return {t.name: len(t.test) for t in load_tasks(data, cfg.run.seed)}


def acc_standard_error(m: dict, rows: dict[str, int]) -> float:
    """Binomial standard error of ACC (the mean of the final accuracy row) from the test-set sizes."""
    final = m["accuracy"][-1]
    return math.sqrt(sum(a * (1 - a) / rows[t] for t, a in zip(m["tasks"], final))) / len(final)


def summarize(runs: dict[tuple[str, str, int], dict], orders: dict[str, list[str]], methods: list[str]) -> dict:
    """Per method and order: mean and spread (population std; 0 for one seed) of ACC, BWT, FWT over seeds,
    and the test-set standard error of the mean ACC (each run's metrics carry their `ACC_se`)."""
    table = {}
    for method in methods:
        per_order = {}
        for o in orders:
            ms = [m for (mm, oo, _), m in sorted(runs.items()) if mm == method and oo == o]
            if not ms:
                continue
            per_order[o] = {k: {"mean": statistics.fmean(m[k] for m in ms), "std": statistics.pstdev(m[k] for m in ms)}
                            for k in ("ACC", "BWT", "FWT")}
            per_order[o]["seeds"] = len(ms)
            per_order[o]["ACC_se"] = math.sqrt(sum(m["ACC_se"] ** 2 for m in ms)) / len(ms)
        if per_order:
            table[method] = {"orders": per_order,
                             "mean_ACC": statistics.fmean(v["ACC"]["mean"] for v in per_order.values()),
                             "mean_ACC_se": math.sqrt(sum(v["ACC_se"] ** 2 for v in per_order.values())) / len(per_order)}
    return table


def markdown(table: dict, orders: dict[str, list[str]], header: str) -> str:
    o_names = [o for o in orders if any(o in t["orders"] for t in table.values())]
    cols = " | ".join(f"order {o}: ACC / BWT / FWT" for o in o_names)
    lines = [header, "", f"| method | {cols} | mean ACC ± test s.e. |", "|---|" + "---|" * len(o_names) + "---|"]
    pm = lambda v: f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["std"] else "")  # noqa: E731
    for method, t in table.items():
        cells = []
        for o in o_names:
            r = t["orders"].get(o)
            cells.append(f"{pm(r['ACC'])} / {pm(r['BWT'])} / {pm(r['FWT'])}" if r else "-")
        lines.append(f"| {method} | {' | '.join(cells)} | {100 * t['mean_ACC']:.1f} ± {100 * t['mean_ACC_se']:.1f} |")
    lines += ["", "Orders: " + "; ".join(f"{o} = {' → '.join(orders[o])}" for o in o_names),
              "Accuracy in %; BWT/FWT in points; ± in the order columns is the spread over seeds; the test s.e. is "
              "the binomial standard error from the finite test sets: a gap between two methods smaller than "
              "2 sqrt(s1² + s2²) is within what the test sets alone produce.", "",
              "Reference (a secondary summary of the papers, not measured here; mean ACC over MTL5 orders 1-3):", "",
              "| method | base | mean ACC |", "|---|---|---|"]
    lines += [f"| {m} | {b} | {a} |" for m, b, a in REFERENCE]
    return "\n".join(lines) + "\n"


def routing_table(runs: dict) -> str:
    """Per run: ACC with task ids given and inferred, and the routing accuracy after the last stage."""
    lines = ["", "With task ids given vs inferred (last stage; routing = share of each task's test rows routed to it):",
             "", "| run | ACC given | ACC inferred | difference | routing, worst task | routing, mean |", "|---|---|---|---|---|---|"]
    for (method, o, seed), m in sorted(runs.items()):
        last = [x for x in m["routing_accuracy"][-1] if x is not None]
        lines.append(f"| {method}, order {o}, seed {seed} | {100 * m['given']['ACC']:.1f} | {100 * m['ACC']:.1f} | "
                     f"{100 * (m['ACC'] - m['given']['ACC']):+.1f} | {100 * min(last):.1f} | {100 * sum(last) / len(last):.1f} |")
    return "\n".join(lines) + "\n"


def heatmaps(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(runs)
    cols = min(len(keys), 5)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        m = runs[key]
        draw_matrix(ax, m["tasks"], m["accuracy"], m["baseline"],
                    f"{key[0]}, order {key[1]}, seed {key[2]}\nACC {m['ACC']:.3f} BWT {m['BWT']:+.3f}")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--orders", default="1", help="comma-separated MTL5 orders (1, 2, 3), or 'config'")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--launcher", default="", help='e.g. "torchrun --nproc_per_node 8" (default: one process)')
    ap.add_argument("--task-id", choices=("given", "inferred"), default="given",
                    help="evaluate with each row's task id given, or inferred by the run's task router")
    args = ap.parse_intermixed_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    try:
        cfg = load_config(args.config, args.overrides)
        if unknown:
            raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        names = args.orders.split(",")
        if names == ["config"]:
            orders = {"config": cfg.data.order}
        elif bad := [o for o in names if o not in ORDERS]:
            raise ConfigError(f"--orders: unknown {bad}; use 1, 2, 3 (the MTL5 orders) or 'config'")
        else:
            orders = {o: ORDERS[o] for o in names}
        seeds = [int(s) for s in args.seeds.split(",")]
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    launcher = shlex.split(args.launcher) + ["-m", "trainer"] if args.launcher else [sys.executable, "-m", "trainer"]
    runs, seconds = {}, {}
    todo = [(m, o, s) for o in orders for m in methods for s in seeds]
    t_all = time.time()
    for i, (method, o, seed) in enumerate(todo, start=1):
        run_dir = out / f"order{o}" / method / f"seed{seed}"
        label = f"[{i}/{len(todo)}] {method}, order {o}, seed {seed}"
        if (m := complete(run_dir, orders[o], args.task_id)) is None:
            print(f"{label}: running ({run_dir}) ...", flush=True)
            cmd = launcher + ["sequence", str(args.config), *args.overrides, f"run.dir={run_dir}",
                              f"experts.method={method}", f"data.order=[{','.join(orders[o])}]", f"run.seed={seed}",
                              f"eval.task_id={args.task_id}"]
            try:
                seconds[f"{method}/order{o}/seed{seed}"] = run_one(cmd, run_dir, run_dir.parent / f"seed{seed}.log")
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(1) from None
            m = complete(run_dir, orders[o], args.task_id)
        else:
            print(f"{label}: already complete", flush=True)
        m["ACC_se"] = acc_standard_error(m, test_rows(run_dir))
        runs[(method, o, seed)] = m
        print(f"{label}: ACC {m['ACC']:.3f} (test s.e. {m['ACC_se']:.3f})  BWT {m['BWT']:+.3f}  FWT {m['FWT']:+.3f}"
              + (f"  (task ids inferred; given: ACC {m['given']['ACC']:.3f})" if "given" in m else ""), flush=True)
    table = summarize(runs, orders, methods)
    header = (f"Continual learning on MTL5, {Path(cfg.model.path).name if not cfg.model.path.startswith('builtin:') else cfg.model.path}, "
              f"{cfg.train.max_steps or cfg.train.epochs} {'steps' if cfg.train.max_steps else 'epochs'} of "
              f"{cfg.train.global_batch(1)} per task, "
              f"{cfg.data.max_train_examples or 'all'} train / {cfg.data.max_eval_examples or 'all'} test rows per task, "
              f"seeds {','.join(map(str, seeds))} ({args.config})"
              + ("; task ids inferred by each run's router" if args.task_id == "inferred" else ""))
    result = {"config": str(args.config), "overrides": args.overrides, "orders": orders, "seeds": seeds,
              "task_id": args.task_id, "methods": table,
              "runs": {f"{m}/order{o}/seed{s}": {k: r[k] for k in ("ACC", "ACC_se", "BWT", "FWT", "accuracy", "baseline",
                                                                   "tasks", "given", "routing_accuracy") if k in r}
                       for (m, o, s), r in runs.items()},
              "seconds": seconds, "reference": [{"method": m, "base": b, "mean_ACC": a} for m, b, a in REFERENCE]}
    atomic.write_json(out / "results.json", result)
    md = markdown(table, orders, header) + (routing_table(runs) if args.task_id == "inferred" else "")
    atomic.write_text(out / "results.md", md)
    heatmaps(runs, out / "heatmaps.png")
    print("\n" + md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'heatmaps.png'} "
          f"({(time.time() - t_all) / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
