"""tools/gpu_check.py in its CPU mode, as CI runs it: every check runs (the 2-GPU one is skipped, saying why)
and passes against the reference kept in results/, and the last line is one JSON object; its comparisons and
its refusals of bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def test_cpu_mode_runs_every_check_and_ends_with_one_json_line(tmp_path, model_cache):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--out",
                           str(tmp_path / "out"), "--base-dir", str(tmp_path / "bases"), "--model-cache", str(model_cache)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert result["passed"] is True and result["device"] == "cpu"
    checks = result["checks"]
    assert list(checks) == ["environment", "reference", "zero3", "base_2l", "nccl"]
    assert {n: c["status"] for n, c in checks.items()} == {"environment": "pass", "reference": "pass", "zero3": "pass",
                                                           "base_2l": "pass", "nccl": "skip"}
    assert "2 or more GPUs" in checks["nccl"]["reason"]
    assert [line.split(":")[0] for line in lines if re.match(r"\[\d/5\] ", line)] == [
        "[1/5] environment", "[2/5] reference", "[3/5] zero3", "[4/5] base_2l", "[5/5] nccl"]
    assert checks["environment"]["torch"] and "cpu_adam" in checks["environment"]["deepspeed_ops_compatible"]
    assert checks["reference"]["run"] == "tiny" and checks["reference"]["worst_loss_ratio"] <= 1
    assert checks["zero3"]["zero_stage"] == 3
    for layout in ("local", "zero3"):
        figures = checks["base_2l"][layout]
        assert figures["tokens_per_s"] > 0 and figures["step_seconds"] > 0 and figures["peak_memory_gib"]["rss"] > 0
        assert figures["mfu"] is None and "MOE_CL_PEAK_TFLOPS" in figures["mfu_reason"]
    assert checks["base_2l"]["zero3_step_time_ratio"] > 0


def _figures(losses, acc, rows=40):
    tasks = list(acc)
    return {"logged_task_loss": [[5 * (i + 1), v] for i, v in enumerate(losses)], "test_accuracy": acc,
            "test_rows": {t: rows for t in tasks}, "baseline": {t: 0.1 for t in tasks},
            "baseline_rows": {t: rows for t in tasks}}


def test_comparison_tolerances():
    ref = _figures([2.0, 1.0, 0.5], {"dbpedia": 0.475, "yahoo": 0.15})
    ok = gpu_check.compare(_figures([2.1, 0.95, 0.54], {"dbpedia": 0.55, "yahoo": 0.2}), ref, 0.10, rows_only=False)
    assert ok["problems"] == [] and ok["worst_loss_ratio"] == pytest.approx(0.8)
    # 2 sqrt(2 p (1 - p) / n) at p = 0.475, n = 40: 0.223
    assert gpu_check.accuracy_tolerance(0.475, 40) == pytest.approx(0.2233, abs=1e-4)
    bad = gpu_check.compare(_figures([2.0, 1.2, 0.5], {"dbpedia": 0.075, "yahoo": 0.15}), ref, 0.10, rows_only=False)
    assert len(bad["problems"]) == 2
    assert "task loss at step 10" in bad["problems"][0] and "test_accuracy dbpedia" in bad["problems"][1]
    one_row = gpu_check.compare(_figures([2.0, 1.0, 0.5], {"dbpedia": 0.5, "yahoo": 0.2}, rows=40), ref, 1e-3, True)
    assert [p.split(":")[0] for p in one_row["problems"]] == ["test_accuracy yahoo"]  # 2 rows apart; dbpedia 1


@pytest.mark.parametrize("argv, flag", [(["--peak-tflops", "-1"], "--peak-tflops"), (["--layers", "2,x"], "--layers"),
                                        (["--layouts", "zero9"], "--layouts"), (["--write-reference", "x.json"],
                                                                                "--device cpu")])
def test_bad_input_names_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_an_output_folder_it_did_not_make_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="--out"):
        gpu_check.prepare_out(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_memory_plan_decides_which_7b_layouts_run():
    overrides = gpu_check.base_overrides("cuda", REPO / "unused")
    assert gpu_check.layouts_that_fit(overrides, 2, 80 << 30, 64 << 30) == {"local": True, "zero2": True, "zero3": True}
    assert not any(gpu_check.layouts_that_fit(overrides, 32, 16 << 30, 64 << 30).values())  # 13.5 GB base alone
    assert gpu_check.layouts_that_fit(overrides, 32, 80 << 30, 8 << 30)["local"] is False  # host memory to load it


def test_without_a_gpu_the_cuda_check_fails_clearly_and_still_ends_with_the_json_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and result["passed"] is False
    assert result["checks"]["environment"]["status"] == "fail"
    assert "no CUDA device visible" in result["checks"]["environment"]["reason"]
    assert {n: c["status"] for n, c in result["checks"].items() if n != "environment"} == {
        "reference": "skip", "zero3": "skip", "base_2l": "skip", "base_32l": "skip", "nccl": "skip"}
