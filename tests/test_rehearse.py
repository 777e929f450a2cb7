"""The full-size rehearsal tool (tools/rehearse.py) end to end on the tiny shape: 2 ranks under torchrun,
stage 2 SIGKILLed after its mid-stage checkpoint and resumed to the uninterrupted result, extract, PEFT load.
(The 7B figures themselves are measured by running the tool, never here.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_distributed import _env

pytestmark = pytest.mark.distributed


def test_rehearsal_on_the_tiny_shape(tmp_path):
    pytest.importorskip("mistral_common")
    proc = subprocess.run([sys.executable, "tools/rehearse.py", "--shape", "tiny", "--base", str(tmp_path / "base"),
                           "--out", str(tmp_path / "out"), "--variants", "", "--compare-uninterrupted"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    f = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f["params_base"] == 4170048 and f["world_size"] == 2 and f["dtype"] == "bfloat16"
    assert f["frozen_bytes_per_rank"] == [f["base_bytes"] // 2] * 2  # each rank holds exactly half
    assert len(f["peak_rss_bytes"]) == 2 and all(p > f["base_bytes"] // 2 for p in f["peak_rss_bytes"])
    assert f["resumed"] is True and f["resumed_at"] == 1 and f["checkpoint_bytes"] > 0
    assert f["peft_loaded"] is True and f["adapter_params"] > 0
    assert f["step_seconds"] > 0 and f["load_seconds"] > 0 and f["stage_save_seconds"] >= 0
    # the same rows through one process holding the whole base, and the ratio the rehearsal reports
    assert f["step_seconds_local"] > 0 and f["zero3_over_local"] == round(f["step_seconds"] / f["step_seconds_local"], 3)
    planned = f["planned"]  # the memory model for the run's own DeepSpeed config, beside the measured peak
    assert planned["layout"] == "zero3" and planned["total"] == sum(planned["memory"].values())
    assert planned["memory"]["base"] == f["base_bytes"] // 2
    assert f["measured_peak_over_planned"] == round(max(f["peak_rss_bytes"]) / planned["total"], 3)
    results = json.loads((tmp_path / "out" / "rehearsal.json").read_text())
    assert results["uninterrupted"]["same_keys"] and results["uninterrupted"]["max_abs_diff"] < 1e-6
    # Phases shorter than the 0.2 s sampling interval (the tiny model's evaluation) may get no sample.
    phases = set(results["stage1"]["by_phase_gib"]["rank0"])
    assert {"load", "train"} <= phases <= {"load", "setup", "baseline_eval", "train", "evaluate", "save"}
    assert (tmp_path / "out" / "peft-yahoo" / "adapter_config.json").is_file()
