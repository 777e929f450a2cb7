"""The benchmark tools run end to end on a tiny model and report what they claim to measure.
(They measure speed; these tests check their plumbing and arithmetic, never a timing.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def _tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_benchmark_cl_runs_methods_tabulates_pairs_commits_and_resumes(tmp_path, model_cache):
    """Two methods x two seeds, two runs at a time (--jobs 2): per-method means and spreads, the binomial s.e. of ACC from the rows each final
    entry was evaluated on (eval.other_rows shrinks only the entries ACC and BWT do not read), the paired
    differences against moe_cl with their t interval, one git commit per finished run, and a rerun on a
    machine without the run folders that takes every run from the committed results."""
    out, repo = tmp_path / "bench", tmp_path / "repo"
    results = repo / "results" / "tiny"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for k, v in (("user.email", "bench@example.com"), ("user.name", "bench")):
        subprocess.run(["git", "-C", str(repo), "config", k, v], check=True)
    args = ["tools/benchmark_cl.py", "configs/tiny.yaml", "--orders", "config", "--methods", "moe_cl,per_task_lora",
            "--seeds", "0,1", "--out", str(out), "--results", str(results), "--commit", "--jobs", "2",
            f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path / 'c'}", "data.max_train_examples=32",
            "data.max_eval_examples=12", "eval.other_rows=4"]
    first = _tool(*args)
    assert first.stdout.count("running") == 4
    result = json.loads((results / "results.json").read_text())
    assert set(result["methods"]) == {"moe_cl", "per_task_lora"}
    runs = result["runs"]
    for method, row in result["methods"].items():
        metrics = [json.loads((out / "orderconfig" / method / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        acc = [m["ACC"] for m in metrics]
        assert row["orders"]["config"]["ACC"]["mean"] == pytest.approx(sum(acc) / 2)
        assert row["orders"]["config"]["ACC"]["std"] == pytest.approx(abs(acc[0] - acc[1]) / 2)
        assert row["orders"]["config"]["seeds"] == 2 and row["step_seconds"] > 0
        for s, m in enumerate(metrics):
            run = runs[f"{method}/orderconfig/seed{s}"]
            assert run["accuracy"] == m["accuracy"] and run["test_rows"] == [[12, 4], [12, 12]]
            assert run["baseline_rows"] == [4, 4] and run["seconds"] > 0 and run["step_seconds"] > 0
            assert run["jobs"] == 2 and run["threads"] == 1  # how it ran: side by side, OMP_NUM_THREADS as set
            se = math.sqrt(sum(a * (1 - a) / 12 for a in m["accuracy"][-1])) / 2
            assert run["ACC_se"] == pytest.approx(se)
            # The discriminators' accuracy per stage and class: moe_cl's only (the baseline has none).
            disc = run["discriminator_accuracy"]
            assert ([set(d) for d in disc] == [{"agnews"}, {"yelp"}] and all(0 <= a <= 1 for d in disc for a in d.values())
                    if method == "moe_cl" else disc == [None, None])
    diffs = [runs[f"per_task_lora/orderconfig/seed{s}"]["ACC"] - runs[f"moe_cl/orderconfig/seed{s}"]["ACC"] for s in (0, 1)]
    pair = result["paired"]["moe_cl"]["per_task_lora"]
    assert pair["pairs"] == ["orderconfig/seed0", "orderconfig/seed1"] and pair["ACC"]["n"] == 2
    half = 12.706 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)  # t(1) x sample sd / sqrt(n)
    assert pair["ACC"]["mean"] == pytest.approx(sum(diffs) / 2)
    if diffs[0] == diffs[1]:  # the tiny model's two seeds may differ by the same amount: no spread, no interval
        assert pair["ACC"]["low"] is None and pair["ACC"]["resolved"] is False
    else:
        assert pair["ACC"]["low"] == pytest.approx(sum(diffs) / 2 - half)
        assert pair["ACC"]["high"] == pytest.approx(sum(diffs) / 2 + half)
    md = (results / "results.md").read_text()
    assert "| moe_cl |" in md and "Paired against moe_cl" in md and "| per_task_lora | 2 |" in md
    assert "(2 side by side) |" in md  # no run of these methods ran alone: their s/step says so
    assert "MoE-CL | Llama-2-7B | 80.5" in md and (results / "heatmaps.png").read_bytes()[:4] == b"\x89PNG"
    log = subprocess.run(["git", "-C", str(repo), "log", "--format=%s"], capture_output=True, text=True, check=True).stdout
    assert log.count(" ACC ") == 4 and "per_task_lora/orderconfig/seed1 ACC" in log  # one commit per run
    assert log.splitlines()[0] == "Benchmark tiny: 4 runs, heatmaps"  # the figure once, at the end
    # Another machine: the committed results, no run folders. Nothing runs again.
    import shutil

    shutil.rmtree(out)
    again = _tool(*args, "--against", "per_task_lora")  # and the tables paired the other way round too
    assert "running" not in again.stdout and again.stdout.count("already in") == 4
    result = json.loads((results / "results.json").read_text())
    assert result["runs"] == runs and list(result["paired"]) == ["moe_cl", "per_task_lora"]
    assert result["paired"]["per_task_lora"]["moe_cl"]["ACC"]["mean"] == pytest.approx(-sum(diffs) / 2)
    assert "Paired against per_task_lora " in (results / "results.md").read_text()
    # Other settings, or other task-id handling, cannot be mixed into the same results.
    for extra in (["data.max_eval_examples=10"], ["--task-id", "inferred"]):
        proc = subprocess.run([sys.executable, *args, *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and "was measured with other settings" in proc.stderr, proc.stderr[-2000:]


def test_benchmark_cl_with_inferred_task_ids_and_predict_throughput(tmp_path, model_cache):
    """--task-id inferred tabulates the inferred-id figures (given ones kept beside them); bench_predict
    serves the run's bundle with ids given and routed."""
    out = tmp_path / "bench"
    _tool("tools/benchmark_cl.py", "configs/tiny.yaml", "--orders", "config", "--methods", "olora", "--out", str(out),
          "--task-id", "inferred", f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path / 'c'}",
          "data.max_train_examples=32", "data.max_eval_examples=12")
    metrics = json.loads((out / "orderconfig" / "olora" / "seed0" / "metrics.json").read_text())
    run = json.loads((out / "results.json").read_text())["runs"]["olora/orderconfig/seed0"]
    assert run["ACC"] == metrics["inferred"]["ACC"] and run["given"]["ACC"] == metrics["ACC"]
    assert run["routing_accuracy"] == metrics["routing_accuracy"]
    md = (out / "results.md").read_text()
    assert "task ids inferred" in md and f"| olora, order config, seed 0 | {100 * metrics['ACC']:.1f} |" in md
    bundle = tmp_path / "bundle"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "trainer", "export", str(out / "orderconfig" / "olora" / "seed0"), "--out",
                    str(bundle)], cwd=REPO, env=env, check=True, capture_output=True)
    proc = _tool("tools/bench_predict.py", str(bundle), "--data", "data/mtl5", "--rows", "4", "--reps", "1")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["requests"] == 8 and all(v > 0 for v in figures["examples_per_s"].values())
    assert figures["ratio"] == pytest.approx(figures["examples_per_s"]["routed"] / figures["examples_per_s"]["given"])
    assert 0 <= figures["routing_accuracy"] <= 1 and 0 <= figures["same_prediction"] <= 1
    assert set(figures["flagged"]) == {"mtl5", "foreign"} and all(0 <= v <= 1 for v in figures["flagged"].values())


def test_router_study_reports_each_layer_and_statistic(model_cache):
    proc = _tool("tools/router_study.py", "--model", "builtin:tiny-llama", "--cache-dir", str(model_cache), "--data",
                 "data/mtl5", "--tasks", "agnews,yelp,dbpedia", "--rows", "20", "--eval-rows", "8", "--layers", "0,1,2",
                 "--confusion-layer", "1")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["split"] == "val" and set(figures["cost_vs_full_forward"]) == {"0", "1", "2"}
    assert all(v > 0 for v in figures["cost_vs_full_forward"].values())
    for rows in figures["sets"].values():
        assert set(rows) == {"0", "1", "2"}
        for stats in rows.values():
            assert set(stats) == {"lda0.05", "lda0.1", "lda0.2", "diag", "mean"}
            assert all(0 <= a <= 1 for acc in stats.values() for a in acc.values())
    confusion = figures["confusion"]["counts"]
    assert set(confusion) == {"agnews", "yelp", "dbpedia"} and all(sum(c.values()) == 8 for c in confusion.values())
    # the diagonal of the confusion matrix is the routing accuracy at that layer
    assert all(confusion[t].get(t, 0) / 8 == figures["sets"]["all 3"]["1"]["lda0.1"][t] for t in confusion)


def test_paired_intervals_never_resolve_without_spread():
    spec = importlib.util.spec_from_file_location("benchmark_cl", REPO / "tools" / "benchmark_cl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.interval([0.02, 0.04])["low"] == pytest.approx(0.03 - 12.706 * 0.01)
    assert bench.interval([-0.01, 0.03])["resolved"] is False
    assert bench.interval([0.02, 0.03, 0.025])["resolved"] is True  # t(2) 4.303 x 0.005 / sqrt(3) = 0.0124
    same = bench.interval([-0.047, -0.047])  # e.g. FWT: 0 by construction against a repeated +4.7
    assert same["mean"] == pytest.approx(-0.047) and same["low"] is None and same["resolved"] is False
    runs = {(m, "1", s): {"ACC": a, "BWT": 0.0, "FWT": f, "ACC_se": 0.01}
            for m, s, a, f in (("moe_cl", 0, 0.70, 0.047), ("moe_cl", 1, 0.71, 0.047),
                               ("per_task_lora", 0, 0.73, 0.0), ("per_task_lora", 1, 0.72, 0.0))}
    methods = ["moe_cl", "per_task_lora"]
    pairs = {ref: bench.paired(runs, methods, ref) for ref in methods}  # --against per_task_lora: the other way round
    md = bench.markdown(bench.summarize(runs, {"1": ["a", "b"]}, methods), pairs, {"1": ["a", "b"]}, "header")
    assert "| per_task_lora | 2 | +2.0 [-10.7, +14.7] | +0.0 [no spread] | -4.7 [no spread] |" in md
    assert md.index("Paired against moe_cl ") < md.index("Paired against per_task_lora ")
    assert "| moe_cl | 2 | -2.0 [-14.7, +10.7] | +0.0 [no spread] | +4.7 [no spread] |" in md


def test_benchmark_entries_mean_the_same_runs_whatever_the_configs_discriminator_extra():
    """configs/mtl5_7b.yaml and demo.yaml pick discriminator_extra: noise. Under them every entry still builds a valid config
    (methods without discriminators would refuse noise), `moe_cl` and its ablations stay the paper's form,
    and only the noise and memory entries add a class."""
    spec = importlib.util.spec_from_file_location("benchmark_cl", REPO / "tools" / "benchmark_cl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from trainer.config import load_config
    for config in ("mtl5_7b.yaml", "demo.yaml"):
        assert load_config(REPO / "configs" / config, []).experts.discriminator_extra == "noise", config
    for name, (method, extra) in bench.ENTRIES.items():
        for config in ("mtl5_7b.yaml", "demo.yaml", "bench_cpu.yaml"):
            cfg = load_config(REPO / "configs" / config, [*extra, f"experts.method={method}"])
            want = {"moe_cl_noise": "noise", "moe_cl_memory": "memory"}.get(name, "none")
            assert (cfg.experts.method, cfg.experts.discriminator_extra) == (method, want), (name, config)


def test_benchmark_cl_rejects_unknown_methods_orders_and_jobs():
    for flag, value, message in (("--methods", "lora2", "unknown ['lora2']"), ("--orders", "4", "unknown ['4']"),
                                 ("--jobs", "0", "--jobs 0: use 1 or more"), ("--against", "moe", "unknown ['moe']"),
                                 ("--jobs", "2 --launcher torchrun", "and 1 with --launcher")):
        proc = subprocess.run([sys.executable, "tools/benchmark_cl.py", "configs/tiny.yaml", flag, *value.split()], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr


def test_benchmark_cl_starts_no_run_after_one_failed(tmp_path):
    """Two runs side by side fail (a model path that does not exist); the third is never started, and the
    error names each run's log."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "tools/benchmark_cl.py", "configs/tiny.yaml", "--orders", "config",
                           "--methods", "moe_cl", "--seeds", "0,1,2", "--jobs", "2", "--out", str(out),
                           f"data.cache_dir={tmp_path / 'c'}", f"model.path={tmp_path / 'missing'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stdout.count("running") == 2 and "seed 2" not in proc.stdout, proc.stdout
    assert proc.stderr.count("the sequence failed (exit 2); finished runs are kept") == 2
    for seed in (0, 1):
        assert f"Last lines of {out / 'orderconfig' / 'moe_cl' / f'seed{seed}.log'}" in proc.stderr
    assert "has no config.json" in proc.stderr and not (out / "orderconfig" / "moe_cl" / "seed2").exists()


def test_bench_step_reports_every_ratio_in_its_last_line(model_cache):
    proc = _tool("tools/bench_step.py", "--model", "builtin:tiny-llama", "--cache-dir", str(model_cache),
                 "--reps", "1", "--batch", "2", "--seq", "64", "--eval-rows", "4")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = figures["step_seconds"]
    assert set(steps) == {"lora", "lora_ours", "moe_cl", "naive", "tasks4", "tasks16", "stage2", "noise", "memory"}
    assert all(t > 0 for t in steps.values())
    assert figures["moe_cl_over_lora"] == pytest.approx(steps["moe_cl"] / steps["lora"])
    assert figures["moe_cl_over_lora_ours"] == pytest.approx(steps["moe_cl"] / steps["lora_ours"])
    assert figures["naive_over_lora"] == pytest.approx(steps["naive"] / steps["lora"])
    assert figures["tasks16_over_tasks1"] == pytest.approx(steps["tasks16"] / steps["moe_cl"])
    assert figures["memory_over_stage2"] == pytest.approx(steps["memory"] / steps["stage2"])
    assert figures["noise_over_stage2"] == pytest.approx(steps["noise"] / steps["stage2"])
    assert figures["memory_rows"] == 1  # a quarter of --batch 2, at least one
    # Two experts keep more activations than one LoRA; the count is deterministic, not a timing.
    assert figures["saved_bytes"]["moe_cl"] > figures["saved_bytes"]["lora"] > 0
    # The memory rows' own forward keeps its activations for the reversed gradient.
    assert figures["saved_bytes"]["memory"] > figures["saved_bytes"]["stage2"]
    assert figures["scoring_examples_per_s"] > 0 and figures["generation_examples_per_s"] > 0


def test_bench_throughput_times_a_configs_steps_for_a_source_tree(tmp_path, model_cache):
    proc = _tool("tools/bench_throughput.py", "configs/tiny.yaml", "--steps", "2", "--source", str(REPO),
                 f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path / 'c'}", "data.max_train_examples=32")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 2 and figures["method"] == "moe_cl" and figures["task"] == "agnews"
    assert figures["dtype"] == "float32"  # auto: the tiny base is narrower than bf16 pays for on a CPU
    assert figures["padded_tokens_per_s"] >= figures["real_tokens_per_s"] > 0
    assert figures["rows_per_s"] * figures["tokens_per_row"] == pytest.approx(figures["real_tokens_per_s"])
