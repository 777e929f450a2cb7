"""Continual-learning methods side by side: the same trainer, data, budget, base model and seeds.

    python tools/benchmark_cl.py configs/bench_cpu.yaml [--methods moe_cl,per_task_lora,...] [--orders 1,2,3]
                                 [--seeds 0,1] [--out runs/bench] [--results results/NAME] [--commit]
                                 [--launcher "torchrun --nproc_per_node 8"] [--task-id given|inferred]
                                 [--jobs 2] [--against moe_cl,moe_cl_noise] [key=value ...]

For every order x method x seed it runs `python -m trainer sequence CONFIG` with the method's settings
(`ENTRIES`: a trainer method, or a variant of one), `data.order` and `run.seed` set; one run folder
each, `OUT/order<o>/<method>/seed<s>`, its log beside it. After each run it rewrites, under RESULTS
(default: OUT), `results.json` (every run's accuracy matrix and metrics, keyed `method/orderN/seedS`),
`results.md` and `heatmaps.png`; with `--commit` it also commits RESULTS to git, run by run. Runs
already in RESULTS/results.json (or complete in OUT) are not run again, so a benchmark stopped
anywhere continues from what is committed, on this machine or another. A RESULTS folder holds one
setting: the config and overrides must match those it was measured with.

What the tables say:
- per method and order, ACC / BWT / FWT: the mean over seeds and its spread;
- paired against moe_cl, and against each other entry named by `--against` (same order and seed, so
  the same test rows and data order): the mean difference of each metric and its t-based 95% interval
  over the pairs; a gap is resolved when the interval excludes 0 (never from one pair, nor from pairs
  that all differ by the same amount). `--against` only changes the tables, never what runs;
- the test-set standard error of ACC: each final accuracy a on n rows is a binomial proportion, so
  ACC (the mean over T tasks) has s.e. sqrt(sum a (1 - a) / n) / T;
- seconds per training step (the median over the run's steps; meaningful when nothing else ran).

`--jobs N` runs N single-process runs side by side on a CPU machine, each with cores/N threads (or the
OMP_NUM_THREADS you set). Whether that pays depends on the machine: on this project's 2 cores a short
probe (not kept) of training steps gained 1.25x, but the benchmark's real runs only 1.09-1.13x (their
evaluation slowed more than twofold; docs/benchmarks/cl-benchmark.md). A run records how it ran (`jobs`, `threads`),
and the s/step column takes runs that ran alone where a method has any.

Orders are the MTL5 orders of O-LoRA / MoE-CL; `--orders config` uses the config's own data.order.
`--task-id inferred` runs every method with `eval.task_id=inferred`: each test row is served as a
deployment without task ids would serve it, the run's task router choosing the task (its prompt and
the experts of methods that pick experts by task). The tables then report the inferred-id figures;
`results.json` keeps the given-id ones and the routing accuracy beside them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import atomic  # noqa: E402
from trainer.config import ConfigError, load_config, to_dict  # noqa: E402
from trainer.data import load_tasks  # noqa: E402
from trainer.metrics import draw_matrix, save_png  # noqa: E402
from trainer.model import METHODS  # noqa: E402

ORDERS = {
    "1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "3": ["yahoo", "amazon", "agnews", "dbpedia"],
}
# What a table row runs: a trainer method, or a variant of one (its overrides come after the user's).
# Every trainer method runs without a discriminator extra whatever the config says (configs/mtl5_7b.yaml picks
# noise, the measured best): `moe_cl` is the paper's form (one discriminator class per stage), its ablations
# that form plus one change, and the other methods have no discriminators to give a class to.
PAPER = ["experts.discriminator_extra=none"]
ENTRIES: dict[str, tuple[str, list[str]]] = {
    **{m: (m, PAPER) for m in METHODS},
    "moe_cl_noise": ("moe_cl", ["experts.discriminator_extra=noise"]),
    "moe_cl_memory": ("moe_cl", ["experts.discriminator_extra=memory"]),
    "moe_cl_shared_lr1": ("moe_cl", [*PAPER, "train.shared_expert_lr_scale=1.0"]),
    "moe_cl_gate_task": ("moe_cl", [*PAPER, "experts.gate_task_bias=2.0"]),
    "moe_cl_fp32": ("moe_cl", [*PAPER, "model.dtype=float32"]),  # what the faster dtype costs in accuracy
}
REFERENCE_ENTRY = "moe_cl"
# As reported in a secondary summary of the MoE-CL paper (its own tables were not at hand):
# Llama-2-7B on MTL5, mean accuracy over orders 1-3; and O-LoRA's own paper on T5-large.
REFERENCE = [("MoE-CL", "Llama-2-7B", 80.5), ("MoCL", "Llama-2-7B", 78.2), ("O-LoRA", "Llama-2-7B", 76.1),
             ("per-task LoRA", "Llama-2-7B", 76.6), ("sequential LoRA", "Llama-2-7B", 26.7),
             ("O-LoRA (its own paper)", "T5-large", 75.8)]
# Student's t, 97.5% quantile, by degrees of freedom (a 95% two-sided interval); beyond 30, the normal's.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
PER_RUN = ("run.dir", "run.seed", "experts.method", "data.order", "eval.task_id")  # set by this tool per run


def run_one(cmd: list[str], run_dir: Path, log: Path, env: dict | None = None) -> float:
    """Run one sequence, its output to `log`; returns seconds. Raises with the log's tail on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
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


def run_record(run_dir: Path, m: dict, seconds: float | None, how: dict | None = None) -> dict:
    """What results.json keeps of one finished run: its metrics and matrices, the test rows behind each
    entry, the ACC standard error, seconds per step (and `how` it ran: jobs side by side, threads) and
    the discriminators' accuracy per stage."""
    rows = m["test_rows"] if "test_rows" in m else [list(test_rows(run_dir).values())] * len(m["accuracy"])
    stages = sorted((run_dir / "stages").glob("*/stage.json"), key=lambda p: int(p.parent.name.split("-")[0]))
    manifests = [json.loads(p.read_text()) for p in stages]
    steps = [t for s in manifests for t in s["train"].get("step_seconds", [])]
    record = {k: m[k] for k in ("ACC", "BWT", "FWT", "accuracy", "baseline", "tasks", "baseline_rows", "given",
                                "routing_accuracy") if k in m}
    record.update({"test_rows": rows, "ACC_se": acc_standard_error(m["accuracy"][-1], rows[-1]),
                   "step_seconds": statistics.median(steps) if steps else None, "seconds": seconds,
                   "discriminator_accuracy": [s["train"].get("discriminator_accuracy") for s in manifests],
                   "commit": manifests[-1]["versions"].get("commit") if manifests else None, **(how or {})})
    return record


def test_rows(run_dir: Path) -> dict[str, int]:
    """Test rows per task as the run evaluated them: its saved config through the trainer's data loader
    (runs written before stage.json recorded them)."""
    cfg = load_config(run_dir / "config.yaml")
    root = Path(cfg.data.root).expanduser()
    data = dataclasses.replace(cfg.data, root=str(root if root.is_absolute() else REPO / root))
    return {t.name: len(t.test) for t in load_tasks(data, cfg.run.seed)}


def acc_standard_error(final: list[float], rows: list[int]) -> float:
    """Binomial standard error of ACC (the mean of the final accuracy row) from the test-set sizes."""
    return math.sqrt(sum(a * (1 - a) / n for a, n in zip(final, rows))) / len(final)


def interval(diffs: list[float]) -> dict:
    """Mean of paired differences with its t-based 95% interval (None with fewer than 2 pairs, or when the
    pairs differ by exactly the same amount: a few pairs without spread give a zero-width interval that
    says nothing, e.g. a metric one method has as 0 by construction against one that repeated by chance)."""
    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2 or statistics.stdev(diffs) == 0:
        return {"n": n, "mean": mean, "low": None, "high": None, "resolved": False}
    half = T975.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half,
            "resolved": mean - half > 0 or mean + half < 0}


def paired(runs: dict[tuple[str, str, int], dict], methods: list[str], ref: str = REFERENCE_ENTRY) -> dict:
    """Per method: its ACC, BWT and FWT minus the reference's, over the (order, seed) pairs both ran."""
    out = {}
    for method in methods:
        pairs = sorted((o, s) for (mm, o, s) in runs if mm == method and (ref, o, s) in runs)
        if method == ref or not pairs:
            continue
        out[method] = {k: interval([runs[(method, o, s)][k] - runs[(ref, o, s)][k] for o, s in pairs])
                       for k in ("ACC", "BWT", "FWT")}
        out[method]["pairs"] = [f"order{o}/seed{s}" for o, s in pairs]
    return out


def summarize(runs: dict[tuple[str, str, int], dict], orders: dict[str, list[str]], methods: list[str]) -> dict:
    """Per method and order: mean and spread (population std; 0 for one seed) of ACC, BWT, FWT over seeds,
    the test-set standard error of the mean ACC, and the median seconds per training step (over the runs
    that ran alone if the method has any; `step_jobs` says how many ran side by side in the ones taken)."""
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
            timed = [m for (mm, _, _), m in runs.items() if mm == method and m.get("step_seconds")]
            jobs = min((m.get("jobs", 1) for m in timed), default=1)
            steps = [m["step_seconds"] for m in timed if m.get("jobs", 1) == jobs]
            table[method] = {"orders": per_order, "step_jobs": jobs,
                             "mean_ACC": statistics.fmean(v["ACC"]["mean"] for v in per_order.values()),
                             "mean_ACC_se": math.sqrt(sum(v["ACC_se"] ** 2 for v in per_order.values())) / len(per_order),
                             "step_seconds": statistics.median(steps) if steps else None}
    return table


def markdown(table: dict, pairs: dict[str, dict], orders: dict[str, list[str]], header: str) -> str:
    """results.md: per-method figures, then one paired table per reference in `pairs` (reference -> method ->
    differences), then the papers' reference figures."""
    o_names = [o for o in orders if any(o in t["orders"] for t in table.values())]
    cols = " | ".join(f"order {o}: ACC / BWT / FWT" for o in o_names)
    lines = [header, "", f"| method | {cols} | mean ACC ± test s.e. | s/step |",
             "|---|" + "---|" * len(o_names) + "---|---|"]
    pm = lambda v: f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["std"] else "")  # noqa: E731
    for method, t in table.items():
        cells = []
        for o in o_names:
            r = t["orders"].get(o)
            cells.append(f"{pm(r['ACC'])} / {pm(r['BWT'])} / {pm(r['FWT'])} ({r['seeds']})" if r else "-")
        step = (f"{t['step_seconds']:.2f}" + (f" ({t['step_jobs']} side by side)" if t["step_jobs"] > 1 else "")
                if t["step_seconds"] else "-")
        lines.append(f"| {method} | {' | '.join(cells)} | {100 * t['mean_ACC']:.1f} ± {100 * t['mean_ACC_se']:.1f} | {step} |")
    lines += ["", "Orders: " + "; ".join(f"{o} = {' → '.join(orders[o])}" for o in o_names),
              "Accuracy in %; BWT/FWT in points; (n) seeds, ± their spread; the test s.e. is the binomial standard "
              "error from the finite test sets; s/step: median seconds per optimizer step of the runs that ran alone "
              "(or side by side, as marked, when a method has no run alone)."]
    cell = lambda d: (f"{100 * d['mean']:+.1f}" + (f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"  # noqa: E731
                                                   if d["low"] is not None
                                                   else " [one pair]" if d["n"] < 2 else " [no spread]")
                      + (" **resolved**" if d["resolved"] else ""))
    for ref, against in pairs.items():
        if not against:
            continue
        lines += ["", f"Paired against {ref} (same order and seed), the method's minus {ref}'s, mean difference in "
                  "points and its t-based 95% interval over the pairs; resolved = the interval excludes 0:", "",
                  "| method | pairs | ΔACC | ΔBWT | ΔFWT |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {len(d['pairs'])} | {cell(d['ACC'])} | {cell(d['BWT'])} | {cell(d['FWT'])} |"
                  for m, d in against.items()]
    lines += ["", "Reference (a secondary summary of the papers, not measured here; mean ACC over MTL5 orders 1-3):", "",
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
    cols = min(len(keys), 6)
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


def settings_of(config: str, overrides: list[str]) -> dict:
    """The resolved config minus what this tool sets per run: what a RESULTS folder is measured with."""
    flat = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k != "tasks" and k != "instructions":
                walk(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in PER_RUN:
                flat[f"{prefix}{k}"] = v

    walk(to_dict(load_config(config, overrides)))
    return flat


def load_results(path: Path, settings: dict) -> dict[tuple[str, str, int], dict]:
    """The runs already recorded in RESULTS/results.json, after checking they were measured the same way."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("settings") is not None and old["settings"] != settings:
        was = old["settings"]
        diff = sorted(k for k in set(was) | set(settings) if was.get(k) != settings.get(k))
        changes = ", ".join(f"{k}: {was.get(k)!r} -> {settings.get(k)!r}" for k in diff[:6])
        raise SystemExit(f"error: {path} was measured with other settings ({changes}); use the same config and "
                         f"overrides, or another --results")
    runs = {}
    for key, r in old.get("runs", {}).items():
        method, order, seed = key.split("/")
        runs[(method, order.removeprefix("order"), int(seed.removeprefix("seed")))] = r
    return runs


def commit(results: Path, message: str, attempts: int = 5) -> None:
    """Commit the RESULTS folder alone (whatever else is staged stays out of this commit). A repository busy
    with another git command is retried; if it stays busy, a warning, and the next run's commit takes these
    files along."""
    for attempt in range(attempts):
        changed = subprocess.run(["git", "-C", str(results), "status", "--porcelain", "--", "."], capture_output=True,
                                 text=True)
        if changed.returncode == 0 and not changed.stdout.strip():
            return  # nothing new to commit
        add = subprocess.run(["git", "-C", str(results), "add", "--", "."], capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(["git", "-C", str(results), "commit", "-q", "-m", message, "--", "."],
                                                      capture_output=True, text=True).returncode == 0
        if done:
            return
        time.sleep(2 * (attempt + 1))
    print(f"warning: --commit: could not commit {results} ({(add.stderr or 'git commit failed').strip()}); the "
          f"results are written, the next finished run commits them", file=sys.stderr, flush=True)


def write_results(results: Path, runs: dict, orders: dict, methods: list[str], header: str, base: dict,
                  task_id: str, plots: bool = True, against: tuple[str, ...] = (REFERENCE_ENTRY,)) -> str:
    table = summarize(runs, orders, methods)
    pairs = {ref: paired(runs, methods, ref) for ref in against}  # reference -> method -> differences
    result = {**base, "methods": table, "paired": pairs,
              "runs": {f"{m}/order{o}/seed{s}": r for (m, o, s), r in sorted(runs.items())},
              "reference": [{"method": m, "base": b, "mean_ACC": a} for m, b, a in REFERENCE]}
    results.mkdir(parents=True, exist_ok=True)
    atomic.write_json(results / "results.json", result)
    md = markdown(table, pairs, orders, header) + (routing_table(runs) if task_id == "inferred" else "")
    atomic.write_text(results / "results.md", md)
    if plots:
        heatmaps(runs, results / "heatmaps.png")
    return md


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(ENTRIES)}")
    ap.add_argument("--orders", default="1", help="comma-separated MTL5 orders (1, 2, 3), or 'config'")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/bench", help="run folders and their logs")
    ap.add_argument("--results", default=None, help="results.json/md and heatmaps (default: --out)")
    ap.add_argument("--commit", action="store_true", help="git-commit the results folder after each finished run")
    ap.add_argument("--launcher", default="", help='e.g. "torchrun --nproc_per_node 8" (default: one process)')
    ap.add_argument("--task-id", choices=("given", "inferred"), default="given",
                    help="evaluate with each row's task id given, or inferred by the run's task router")
    ap.add_argument("--against", default=REFERENCE_ENTRY,
                    help=f"comma-separated entries to pair every method against (tables only; default {REFERENCE_ENTRY})")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs side by side (CPU, one process each; each gets cores/N threads unless OMP_NUM_THREADS is set)")
    args = ap.parse_intermixed_args(argv)
    methods = args.methods.split(",")
    against = tuple(dict.fromkeys([REFERENCE_ENTRY, *args.against.split(",")]))
    unknown = [m for m in methods if m not in ENTRIES]
    try:
        cfg = load_config(args.config, args.overrides)
        if unknown:
            raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(ENTRIES)}")
        if bad := [m for m in against if m not in ENTRIES]:
            raise ConfigError(f"--against: unknown {bad}; choose from {', '.join(ENTRIES)}")
        if args.jobs < 1 or (args.jobs > 1 and args.launcher):
            raise ConfigError(f"--jobs {args.jobs}: use 1 or more, and 1 with --launcher (side-by-side runs are "
                              "single-process CPU runs; give a distributed benchmark its own nodes)")
        names = args.orders.split(",")
        if names == ["config"]:
            orders = {"config": cfg.data.order}
        elif bad := [o for o in names if o not in ORDERS]:
            raise ConfigError(f"--orders: unknown {bad}; use 1, 2, 3 (the MTL5 orders) or 'config'")
        else:
            orders = {o: ORDERS[o] for o in names}
        seeds = [int(s) for s in args.seeds.split(",")]
        settings = {**settings_of(args.config, args.overrides), "eval.task_id": args.task_id}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    results = Path(args.results) if args.results else out
    existing = next(p for p in [results, *results.resolve().parents] if p.exists())
    if args.commit and subprocess.run(["git", "-C", str(existing), "rev-parse"], capture_output=True).returncode != 0:
        print(f"error: --commit: {results} is not inside a git repository", file=sys.stderr)
        raise SystemExit(2)
    recorded = load_results(results / "results.json", settings)
    launcher = shlex.split(args.launcher) + ["-m", "trainer"] if args.launcher else [sys.executable, "-m", "trainer"]
    header = (f"Continual learning on MTL5, {cfg.model.path}, "
              f"{cfg.train.max_steps or cfg.train.epochs} {'steps' if cfg.train.max_steps else 'epochs'} of "
              f"{cfg.train.global_batch(1)} rows per task, {cfg.data.max_train_examples or 'all'} train / "
              f"{cfg.data.max_eval_examples or 'all'} test rows per task"
              + (f" ({cfg.eval.other_rows} for the entries ACC and BWT do not read)" if cfg.eval.other_rows else "")
              + f" ({args.config})" + ("; task ids inferred by each run's router" if args.task_id == "inferred" else ""))
    base = {"config": str(args.config), "overrides": args.overrides, "settings": settings, "task_id": args.task_id,
            "orders": {o: ORDERS.get(o, cfg.data.order) for o in {o for (_, o, _) in recorded} | set(orders)}}
    runs = dict(recorded)

    def tables(plots: bool) -> str:
        """results.json/md (and the heatmaps when `plots`) over every run so far, in the methods' order."""
        listed = [m for m in dict.fromkeys([m for (m, _, _) in sorted(runs)] + methods) if any(k[0] == m for k in runs)]
        return write_results(results, runs, {**{o: ORDERS.get(o, cfg.data.order) for (_, o, _) in runs}, **orders},
                             listed, header, base, args.task_id, plots, against)

    todo = [(m, o, s) for o in orders for s in seeds for m in methods]  # each (order, seed) pair completes in turn
    env = dict(os.environ)
    if args.jobs > 1 and not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    how = {"jobs": args.jobs, "threads": int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None}

    def run_dir_of(method: str, o: str, seed: int) -> Path:
        return out / f"order{o}" / method / f"seed{seed}"

    failed = threading.Event()  # after a failure no run starts; those running finish and are kept

    def launch(label: str, method: str, o: str, seed: int) -> tuple[dict | None, float | None]:
        """One run (in a worker thread): its metrics (None: not started after a failure), and its seconds
        if it ran now (None: found complete)."""
        if failed.is_set():
            return None, None
        run_dir = run_dir_of(method, o, seed)
        if (m := complete(run_dir, orders[o], args.task_id)) is not None:
            print(f"{label}: already complete", flush=True)
            return m, None
        print(f"{label}: running ({run_dir}) ...", flush=True)
        trainer_method, extra = ENTRIES[method]
        cmd = launcher + ["sequence", str(args.config), *args.overrides, *extra, f"run.dir={run_dir}",
                          f"experts.method={trainer_method}", f"data.order=[{','.join(orders[o])}]",
                          f"run.seed={seed}", f"eval.task_id={args.task_id}"]
        try:
            seconds = run_one(cmd, run_dir, run_dir.parent / f"seed{seed}.log", env)
        except RuntimeError:
            failed.set()
            raise
        return complete(run_dir, orders[o], args.task_id), seconds

    t_all = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for i, (method, o, seed) in enumerate(todo, start=1):
            label = f"[{i}/{len(todo)}] {method}, order {o}, seed {seed}"
            if (method, o, seed) in recorded:
                print(f"{label}: already in {results / 'results.json'}", flush=True)
            else:
                futures[pool.submit(launch, label, method, o, seed)] = (label, method, o, seed)
        for future in concurrent.futures.as_completed(futures):  # recorded and committed as each finishes
            label, method, o, seed = futures[future]
            try:
                m, seconds = future.result()
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            if m is None:
                continue
            runs[(method, o, seed)] = r = run_record(run_dir_of(method, o, seed), m, seconds,
                                                     how if seconds is not None else None)
            print(f"{label}: ACC {r['ACC']:.3f} (test s.e. {r['ACC_se']:.3f})  BWT {r['BWT']:+.3f}  FWT {r['FWT']:+.3f}"
                  + (f"  (task ids inferred; given: ACC {r['given']['ACC']:.3f})" if "given" in r else ""), flush=True)
            tables(plots=False)  # the tables after every run; the heatmaps (a binary file) once, at the end
            if args.commit:
                commit(results, f"Benchmark {results.name}: {method}/order{o}/seed{seed} ACC {100 * r['ACC']:.1f} "
                                f"BWT {100 * r['BWT']:+.1f} FWT {100 * r['FWT']:+.1f}")
    if failed.is_set():
        raise SystemExit(1)
    md = tables(plots=True)
    if args.commit:
        commit(results, f"Benchmark {results.name}: {len(runs)} runs, heatmaps")
    print("\n" + md)
    print(f"written: {results / 'results.md'}, {results / 'results.json'}, {results / 'heatmaps.png'} "
          f"({(time.time() - t_all) / 60:.1f} min)")
    return json.loads((results / "results.json").read_text())


if __name__ == "__main__":
    main()
