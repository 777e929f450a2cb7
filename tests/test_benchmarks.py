"""The benchmark tools run end to end on a tiny model and report what they claim to measure.
(They measure speed; these tests check their plumbing and arithmetic, never a timing.)"""

from __future__ import annotations

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


def test_benchmark_cl_runs_methods_and_tabulates_their_metrics(tmp_path, model_cache):
    out = tmp_path / "bench"
    args = ["tools/benchmark_cl.py", "configs/tiny.yaml", "--orders", "config", "--methods", "seq_lora,per_task_lora",
            "--seeds", "0,1", "--out", str(out), f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path / 'c'}",
            "data.max_train_examples=32", "data.max_eval_examples=12"]
    first = _tool(*args)
    result = json.loads((out / "results.json").read_text())
    assert set(result["methods"]) == {"seq_lora", "per_task_lora"}
    for method, row in result["methods"].items():
        runs = [json.loads((out / "orderconfig" / method / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        acc = [r["ACC"] for r in runs]
        assert row["orders"]["config"]["ACC"]["mean"] == pytest.approx(sum(acc) / 2)
        assert row["orders"]["config"]["ACC"]["std"] == pytest.approx(abs(acc[0] - acc[1]) / 2)
        assert row["orders"]["config"]["seeds"] == 2
        # Test-set standard error of ACC: binomial, from the final row and the 12 test rows per task.
        se = [math.sqrt(sum(a * (1 - a) / 12 for a in r["accuracy"][-1])) / len(r["tasks"]) for r in runs]
        for s in (0, 1):
            assert result["runs"][f"{method}/orderconfig/seed{s}"]["ACC_se"] == pytest.approx(se[s])
        assert row["orders"]["config"]["ACC_se"] == pytest.approx(math.hypot(*se) / 2)
        assert f"{100 * row['mean_ACC']:.1f} ± {100 * row['mean_ACC_se']:.1f} |" in (out / "results.md").read_text()
    md = (out / "results.md").read_text()
    assert "| seq_lora |" in md and "| per_task_lora |" in md and "MoE-CL | Llama-2-7B | 80.5" in md
    assert (out / "heatmaps.png").read_bytes()[:4] == b"\x89PNG"
    assert "running" in first.stdout
    again = _tool(*args)  # finished runs are kept, not redone
    assert "running" not in again.stdout and again.stdout.count("already complete") == 4
    proc = subprocess.run([sys.executable, *args, "--task-id", "inferred"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "was run with given task ids only; use another --out" in proc.stderr


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


def test_benchmark_cl_rejects_unknown_methods_and_orders():
    for flag, value, message in (("--methods", "lora2", "unknown ['lora2']"), ("--orders", "4", "unknown ['4']")):
        proc = subprocess.run([sys.executable, "tools/benchmark_cl.py", "configs/tiny.yaml", flag, value], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr


def test_bench_step_reports_every_ratio_in_its_last_line(model_cache):
    proc = _tool("tools/bench_step.py", "--model", "builtin:tiny-llama", "--cache-dir", str(model_cache),
                 "--reps", "1", "--batch", "2", "--seq", "64", "--eval-rows", "4")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = figures["step_seconds"]
    assert set(steps) == {"lora", "moe_cl", "naive", "tasks4", "tasks16"} and all(t > 0 for t in steps.values())
    assert figures["moe_cl_over_lora"] == pytest.approx(steps["moe_cl"] / steps["lora"])
    assert figures["naive_over_lora"] == pytest.approx(steps["naive"] / steps["lora"])
    assert figures["tasks16_over_tasks1"] == pytest.approx(steps["tasks16"] / steps["moe_cl"])
    # Two experts keep more activations than one LoRA; the count is deterministic, not a timing.
    assert figures["saved_bytes"]["moe_cl"] > figures["saved_bytes"]["lora"] > 0
    assert figures["scoring_examples_per_s"] > 0 and figures["generation_examples_per_s"] > 0
