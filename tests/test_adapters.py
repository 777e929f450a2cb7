"""The adapter tools on a run trained here: PEFT round trip, exact and approximate merges, export and
predict, inspect, a mid-stage DeepSpeed checkpoint as the source, and every error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.adapters import build_model, open_adapters
from trainer.config import load_config
from trainer.data import load_tasks
from trainer.distributed import LocalStrategy

from .conftest import REPO, run_cli

IDS = torch.tensor([[1, 9690, 198, 520, 314, 260, 3575, 47, 2], [1, 4093, 198, 1780, 30, 40, 50, 60, 2]])


def _overrides(tmp_path, model_cache, run="run", **extra) -> list[str]:
    o = {"run.dir": str(tmp_path / run), "model.cache_dir": str(model_cache), "data.cache_dir": str(tmp_path / "cache"),
         "data.max_train_examples": 32, "data.max_eval_examples": 12, "train.lr": 1e-2, "experts.dropout": 0.0}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_cache):
    tmp = tmp_path_factory.mktemp("adapters")
    run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp, model_cache))
    return tmp / "run"


def _logits(model, only=None):
    with torch.no_grad():
        if only is None:
            return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
        hidden = model.hidden_states(IDS, torch.ones_like(IDS), None, only=only)
        return model.base.get_output_embeddings()(hidden)


def test_extracted_expert_loads_in_peft_with_equal_logits(run, tmp_path):
    from peft import PeftModel

    ad = open_adapters(run)
    model, _ = build_model(ad, _base(ad), LocalStrategy())
    for expert in ("shared", "agnews", "yelp"):
        out = tmp_path / f"peft-{expert}"
        run_cli("extract", str(run), "--expert", expert, "--out", str(out))
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "moecl_source.json"]
        plain = AutoModelForCausalLM.from_pretrained(_base(ad), dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(plain, out).eval()
        torch.testing.assert_close(_logits(peft_model), _logits(model, only=expert), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "peft-shared" / "adapter_config.json").read_text())["r"] == 4


def _base(ad):
    from trainer.adapters import base_folder

    return base_folder(ad)


def test_merged_expert_is_a_plain_model_with_equal_logits(run, tmp_path):
    run_cli("merge", str(run), "--expert", "yelp", "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ad = open_adapters(run)
    model, _ = build_model(ad, _base(ad), LocalStrategy())
    torch.testing.assert_close(_logits(merged), _logits(model, only="yelp"), rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["exact"] is True and report["expert"] == "yelp"


def test_task_merge_measures_its_agreement(run, tmp_path):
    out = run_cli("merge", str(run), "--task", "agnews", "--out", str(tmp_path / "m"), "--calibration-rows", "16")
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["exact"] is False and report["test_rows"] == 12 and report["calibration_rows"] == 16
    for key in ("accuracy_moe_cl", "accuracy_merged", "agreement"):
        assert 0.0 <= report[key] <= 1.0
    assert len(report["gate_means"]) == 2 and all(abs(sum(g) - 1) < 1e-6 for g in report["gate_means"])
    manifest = json.loads((run / "stages" / "2-yelp" / "stage.json").read_text())
    assert report["accuracy_moe_cl"] == manifest["eval"]["test_accuracy"]["agnews"]
    assert '"agreement"' in out.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a plain model folder


def test_export_and_predict_serve_exactly(run, tmp_path, model_cache):
    run_cli("export", str(run), "--out", str(tmp_path / "bundle"))
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert [t["name"] for t in bundle["tasks"]] == ["agnews", "yelp"] and bundle["base_model"]["fingerprint"]
    keys = open_adapters(tmp_path / "bundle").tensors
    assert not any(k.startswith("discriminators") for k in keys)
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(tmp_path, model_cache))
    manifest = json.loads((run / "stages" / "2-yelp" / "stage.json").read_text())
    requests = tmp_path / "requests.jsonl"
    tasks = load_tasks(cfg.data, cfg.run.seed)
    lines = [{"task": t.name, "sentence": r["text"], "gold": t.labels[r["label"]]} for t in tasks for r in t.test]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_cli("predict", "--bundle", str(tmp_path / "bundle"), "--input", str(requests), "--output", str(tmp_path / "p.jsonl"))
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == len(lines) and all(p["prediction"] in ("World", "Sports", "Business", "Science or Technology",
                                                                "very negative", "negative", "neutral", "positive",
                                                                "very positive") for p in preds)
    for t in ("agnews", "yelp"):
        rows = [p for p in preds if p["task"] == t]
        acc = sum(p["prediction"] == p["gold"] for p in rows) / len(rows)
        assert acc == manifest["eval"]["test_accuracy"][t]  # the bundle serves what the trainer measured
    run_cli("export", str(run), "--out", str(tmp_path / "one"), "--tasks", "yelp")
    one = open_adapters(tmp_path / "one")
    assert one.learned == ["yelp"] and not any(".experts.agnews." in k for k in one.tensors)
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"sentence": "The food was cold and the waiter rude."}) + "\n")
    out = run_cli("predict", "--bundle", str(tmp_path / "one"), "--input", str(single))
    assert json.loads(out.stdout.strip().splitlines()[-1])["task"] == "yelp"


def test_inspect_run_and_bundle(run, tmp_path):
    out = run_cli("inspect", str(run))
    assert "learned: agnews, yelp" in out.stdout and "expert:shared" in out.stdout and "sha256" in out.stdout
    data = json.loads(run_cli("inspect", str(run / "stages" / "1-agnews"), "--json").stdout)
    assert data["learned"] == ["agnews"] and data["groups"]["expert:agnews"]["params"] == 2 * 3 * 4 * (64 + 128)
    assert data["groups"]["expert:agnews"]["shapes"]["gate_proj.lora_a"] == [4, 64]
    assert data["metrics"]["test_accuracy"].keys() == {"agnews", "yelp"}


def test_a_mid_stage_deepspeed_checkpoint_is_a_source(run, tmp_path, model_cache):
    """SIGUSR1 stops a one-process ZeRO-3 stage with a checkpoint; the tools read it via zero_to_fp32."""
    o = _overrides(tmp_path, model_cache, "ck", **{"distributed.strategy": "deepspeed",
                                                  "distributed.param_persistence_threshold": 0})
    run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1")
    o.append("train.max_steps=100000")  # stage 2 runs until the signal
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "stage", "configs/tiny.yaml", *o, "--stage", "2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("training yelp"):
            time.sleep(2)
            proc.send_signal(signal.SIGUSR1)
            break
    assert proc.wait(timeout=120) == 75  # EX_TEMPFAIL: checkpoint written, run again to continue
    ckpt = tmp_path / "ck" / "checkpoints" / "2-yelp"
    info = json.loads(run_cli("inspect", str(ckpt), "--json").stdout)
    assert info["kind"] == "checkpoint" and info["learned"] == ["agnews", "yelp"] and info["step"] > 0
    ad = open_adapters(ckpt)
    stage1 = open_adapters(tmp_path / "ck" / "stages" / "1-agnews")
    for k, t in stage1.tensors.items():
        if ".experts.agnews." in k:
            assert torch.equal(ad.tensors[k], t)  # frozen: taken from stage 1 exactly
    assert any(torch.count_nonzero(t) for k, t in ad.tensors.items() if ".experts.yelp." in k and k.endswith("lora_b"))
    run_cli("extract", str(ckpt), "--expert", "yelp", "--out", str(tmp_path / "from-ckpt"))
    from peft import PeftModel

    model, _ = build_model(ad, _base(ad), LocalStrategy())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_base(ad), dtype=torch.float32),
                                           tmp_path / "from-ckpt").eval()
    torch.testing.assert_close(_logits(peft_model), _logits(model, only="yelp"), rtol=1e-5, atol=1e-5)


def test_errors_are_clear_and_write_nothing(run, tmp_path, tiny_qwen2_dir):
    out = tmp_path / "out"
    proc = run_cli("extract", str(run), "--expert", "amazon", "--out", str(out), check=False)
    assert proc.returncode == 2 and "no expert 'amazon'; available: shared, agnews, yelp" in proc.stderr
    proc = run_cli("export", str(run), "--tasks", "agnews,dbpedia", "--out", str(out), check=False)
    assert proc.returncode == 2 and "no task ['dbpedia']; learned tasks: agnews, yelp" in proc.stderr
    proc = run_cli("merge", str(run), "--expert", "shared", "--out", str(out), "--base", str(tiny_qwen2_dir), check=False)
    assert proc.returncode == 2 and "is not the one these adapters were trained on" in proc.stderr
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(run / "stages" / "1-agnews", broken)
    data = (broken / "adapters.safetensors").read_bytes()
    (broken / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_cli("extract", str(broken), "--expert", "shared", "--out", str(out), check=False)
    assert proc.returncode == 2 and "sha256 differs from its manifest" in proc.stderr
    (broken / "adapters.safetensors").write_bytes(b"")
    proc = run_cli("inspect", str(broken), check=False)
    assert proc.returncode == 2 and "empty (0 bytes)" in proc.stderr
    proc = run_cli("inspect", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a run folder, stage folder" in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
