"""End to end through the CLI: two-stage runs on tiny Llama and Qwen2 checkpoints, stage outputs,
metrics, retention of old experts, failure and kill safety, evaluate and report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import sha256_file
from trainer.config import load_config
from trainer.data import load_tasks

from .conftest import REPO, run_cli


def _overrides(tmp_path, model_cache, **extra) -> list[str]:
    o = {"run.dir": str(tmp_path / "run"), "model.cache_dir": str(model_cache),
         "data.cache_dir": str(tmp_path / "cache"), "data.max_train_examples": 32, "data.max_eval_examples": 12,
         "train.log_every": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, model_cache):
    tmp = tmp_path_factory.mktemp("llama")
    proc = run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp, model_cache))
    return tmp / "run", proc


def test_two_stage_sequence_writes_stages_metrics_and_tensorboard(llama_run):
    run, proc = llama_run
    assert "after 2 yelp" in proc.stdout and "ACC" in proc.stdout
    for k, task in ((1, "agnews"), (2, "yelp")):
        folder = run / "stages" / f"{k}-{task}"
        assert sorted(p.name for p in folder.iterdir()) == ["adapters.safetensors", "config.yaml", "router.safetensors",
                                                            "stage.json"]
        manifest = json.loads((folder / "stage.json").read_text())
        assert manifest["files"]["adapters.safetensors"] == sha256_file(folder / "adapters.safetensors")
        assert manifest["order"] == ["agnews", "yelp"] and manifest["learned"] == ["agnews", "yelp"][:k]
        assert manifest["config"]["model"]["path"] == "builtin:tiny-llama"
        assert manifest["steps"] == 4 and set(manifest["eval"]["test_accuracy"]) == {"agnews", "yelp"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"] == ["agnews", "yelp"]
    assert len(metrics["accuracy"]) == 2 and all(len(r) == 2 for r in metrics["accuracy"])
    assert len(metrics["baseline"]) == 2
    for key in ("ACC", "BWT", "FWT"):
        assert isinstance(metrics[key], float)
    assert all(0 <= a <= 1 for row in metrics["accuracy"] + [metrics["baseline"]] for a in row)
    assert metrics["ACC"] == pytest.approx(sum(metrics["accuracy"][1]) / 2)
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    for tag in ("train/task_loss", "train/disc_loss", "train/disc_acc", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "gate_shared/layer_0", "gate_shared/layer_1", "eval/accuracy/agnews",
                "cl/ACC", "cl/BWT", "cl/accuracy_matrix"):
        assert tag in tags, tag


def test_stage_json_records_performance_and_the_time_split(llama_run, model_cache):
    """stage.json's "performance": tokens/s, the FLOPs per token from the exact parameter counts (worked out
    here from the tiny model's config.json), peak RSS per rank, no MFU on a CPU (and why), the time split."""
    run, proc = llama_run
    hf = json.loads((model_cache / "tiny-llama" / "config.json").read_text())
    h, i, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    kv = h // hf["num_attention_heads"] * hf["num_key_value_heads"]
    base = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v (grouped); gate, up, down
    for k, task in ((1, "agnews"), (2, "yelp")):
        m = json.loads((run / "stages" / f"{k}-{task}" / "stage.json").read_text())
        perf, r = m["performance"], m["config"]["experts"]["rank"]
        adapters = layers * (2 * 3 * r * (h + i) + 2 * h)  # shared + task expert, the shared gate: all trained
        assert perf["params_per_token"] == {"base": base, "adapters_trained": adapters, "adapters_frozen": 0}
        assert perf["flops_per_token"]["total"] == 4 * base + 6 * adapters
        assert perf["tokens"] > 0 and perf["tokens_per_s"] > 0
        assert perf["tokens_per_s"] == pytest.approx(perf["tokens"] / sum(m["train"]["step_seconds"]), rel=0.01)
        assert perf["achieved_flops_per_s"] == pytest.approx(perf["tokens_per_s"] * perf["flops_per_token"]["total"],
                                                             rel=1e-3)
        assert perf["mfu"] is None and "MOE_CL_PEAK_TFLOPS" in perf["mfu_reason"]
        rss = perf["peak_memory"]["stage"]["rss"]
        assert len(rss) == 1 and 100e6 < rss[0] < 8e9
        assert rss[0] == max(perf["peak_memory"][p]["rss"][0] for p in ("setup_and_baseline", "training", "evaluation"))
        split = perf["time"]
        assert 0 < split["evaluation_share"] < 1 and sum(split["share"].values()) <= 1.001
        assert split["seconds"]["training"] == pytest.approx(m["train"]["seconds"], abs=1e-3)
        assert (split["seconds"]["baseline_evaluation"] > 0) == (k == 1)  # stage 2 reads stage 1's baseline
        assert [s for s, _ in m["train"]["logged_task_loss"]] == [4 * (k - 1) + s for s in (1, 2, 3, 4)]
        assert f"stage {k} took " in proc.stdout and f"evaluation's share {100 * split['evaluation_share']:.0f}%" \
            in proc.stdout


def test_tensorboard_evaluation_at_the_global_step(llama_run):
    """Evaluation scalars at the global optimizer step (stage 1 ends at 4, stage 2 at 8; the untrained model at
    0), the validation accuracy beside them, the stage's performance figures at its last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = llama_run
    steps: dict[str, list[int]] = {}
    for e in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(e))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(ev.step for ev in acc.Scalars(tag))
    assert sorted(steps["eval/accuracy/agnews"]) == sorted(steps["eval/accuracy/yelp"]) == [0, 4, 8]
    assert sorted(steps["eval/val_accuracy"]) == [4, 8]
    assert sorted(steps["cl/ACC"]) == [4, 8] and steps["cl/BWT"] == [8]  # BWT has terms from stage 2 on
    for tag in ("perf/tokens_per_s", "perf/flops_per_token", "perf/achieved_tflops_per_s", "perf/peak_memory_rss_gib",
                "time/evaluation_share", "time/stage_seconds", "time/training_seconds"):
        assert sorted(steps[tag]) == [4, 8], tag
    assert "perf/mfu" not in steps  # no peak FLOP/s on a CPU


def test_old_experts_are_bit_identical_and_key_sets_exact(llama_run):
    run, _ = llama_run
    one = load_file(run / "stages" / "1-agnews" / "adapters.safetensors")
    two = load_file(run / "stages" / "2-yelp" / "adapters.safetensors")
    experts = lambda sd: {k.split(".")[3] for k in sd if ".experts." in k}  # noqa: E731
    assert experts(one) == {"shared", "agnews"} and experts(two) == {"shared", "agnews", "yelp"}
    assert set(two) - set(one) == {k for k in two if ".experts.yelp." in k}
    agnews = [k for k in one if ".experts.agnews." in k]
    assert len(agnews) == 2 * 2 * 3  # 2 layers x (gate, up, down) x (A, B)
    for k in agnews:
        assert torch.equal(one[k], two[k]), k
    shared_b = [k for k in one if ".experts.shared." in k and k.endswith("lora_b")]
    assert any(not torch.equal(one[k], two[k]) for k in shared_b)  # the shared expert kept learning
    assert all(torch.count_nonzero(two[k]) > 0 for k in two if ".experts.yelp." in k and k.endswith("lora_b"))


def test_evaluate_and_report_reproduce_the_manifest(llama_run, tmp_path, model_cache):
    run, _ = llama_run
    manifest = json.loads((run / "stages" / "1-agnews" / "stage.json").read_text())
    cfg = [f"run.dir={run}", f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path}",
           "data.max_train_examples=32", "data.max_eval_examples=12"]
    out = run_cli("evaluate", "configs/tiny.yaml", *cfg, "--stage", "1", "--json")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == manifest["eval"]["test_accuracy"]
    base = json.loads(run_cli("evaluate", "configs/tiny.yaml", *cfg, "--stage", "0", "--json").stdout.splitlines()[-1])
    assert base["accuracy"] == manifest["baseline"]
    rep = run_cli("report", str(run))
    assert "untrained" in rep.stdout and "after 2 yelp" in rep.stdout and "BWT" in rep.stdout


def test_sequence_skips_complete_stages(llama_run, model_cache):
    run, _ = llama_run
    before = {p: p.stat().st_mtime_ns for p in run.glob("stages/*/adapters.safetensors")}
    proc = run_cli("sequence", "configs/tiny.yaml", *_overrides(run.parent, model_cache))
    assert "stages 1..2 already complete" in proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in run.glob("stages/*/adapters.safetensors")}


def test_a_stage_written_before_routers_gets_its_task_routed_by_the_next_stage(llama_run, tmp_path, model_cache):
    """Stage 2 on a stage 1 without router.safetensors (a run begun before routers) computes the
    missing task's statistics too: they equal those the original run saved."""
    import shutil

    run, _ = llama_run
    old = tmp_path / "run" / "stages" / "1-agnews"
    shutil.copytree(run / "stages" / "1-agnews", old)
    (old / "router.safetensors").unlink()
    manifest = json.loads((old / "stage.json").read_text())
    del manifest["files"]["router.safetensors"], manifest["router"]
    (old / "stage.json").write_text(json.dumps(manifest))
    run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache), "--stage", "2")
    fresh = load_file(tmp_path / "run" / "stages" / "2-yelp" / "router.safetensors")
    saved = load_file(run / "stages" / "2-yelp" / "router.safetensors")
    assert fresh.keys() == saved.keys() and "tasks.agnews.mean" in fresh
    for k in fresh:
        torch.testing.assert_close(fresh[k], saved[k], rtol=1e-5, atol=1e-6 * saved[k].abs().max().item())


def test_tiny_qwen2_two_stages(tmp_path, model_cache):
    proc = run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, **{
        "model.path": "builtin:tiny-qwen2", "experts.gate": "per_task", "experts.discriminator": "mlp"}))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == ["agnews", "yelp"] and len(metrics["accuracy"]) == 2
    keys = load_file(tmp_path / "run" / "stages" / "2-yelp" / "adapters.safetensors").keys()
    assert "layers.0.gates.yelp.proj.weight" in keys and "layers.0.gates.agnews.proj.weight" in keys
    manifest = json.loads((tmp_path / "run" / "stages" / "2-yelp" / "stage.json").read_text())
    assert "qwen2" in manifest["base_model"]["path"]
    assert "after 2 yelp" in proc.stdout


def test_killed_stage_leaves_previous_stages_intact_and_can_be_rerun(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache)
    run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1")
    stage1 = tmp_path / "run" / "stages" / "1-agnews"
    hashes = {p.name: sha256_file(p) for p in stage1.iterdir()}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "stage", "configs/tiny.yaml", *o, "train.max_steps=100000",
                             "--stage", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # wait until it is training, then kill it hard
        if line.startswith("training yelp"):
            time.sleep(2)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: sha256_file(p) for p in stage1.iterdir()} == hashes
    assert not (tmp_path / "run" / "stages" / "2-yelp").exists()
    run_cli("stage", "configs/tiny.yaml", *o, "--stage", "2")
    assert (tmp_path / "run" / "stages" / "2-yelp" / "stage.json").is_file()
    assert {p.name: sha256_file(p) for p in stage1.iterdir()} == hashes


def test_failed_stage_keeps_previous_output(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache)
    run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1")
    stage1 = tmp_path / "run" / "stages" / "1-agnews"
    before = {p.name: sha256_file(p) for p in stage1.iterdir()}
    bad = run_cli("stage", "configs/tiny.yaml", *o, "train.micro_batch_size=64", "train.global_batch_size=64", "--stage", "2",
                  check=False)
    assert bad.returncode != 0 and "fewer than one global batch" in bad.stderr
    assert {p.name: sha256_file(p) for p in stage1.iterdir()} == before
    assert [p.name for p in stage1.parent.iterdir()] == ["1-agnews"]  # no stage 2, no leftovers


def test_cli_errors_are_clear(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache)
    proc = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "2", check=False)
    assert proc.returncode == 2 and "run stage 1 first" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("sequence", "configs/tiny.yaml", *o, "train.lr=fast", "data.order=[agnews,agnews]", check=False)
    assert proc.returncode == 2 and "train.lr: expected float" in proc.stderr and "listed twice" in proc.stderr
    proc = run_cli("sequence", "configs/tiny.yaml", *o, f"model.path={tmp_path}", check=False)
    assert proc.returncode == 2 and "has no config.json" in proc.stderr
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    proc = run_cli("sequence", "configs/tiny.yaml", *o, f"model.path={tmp_path / 'gpt2'}", check=False)
    assert proc.returncode == 2 and "is a 'gpt2' model" in proc.stderr and "llama, mistral, qwen2, qwen3" in proc.stderr
    proc = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "3", check=False)
    assert proc.returncode == 2 and "has stages 1..2" in proc.stderr


def test_a_stage_is_deterministic_given_the_seed(tmp_path, model_cache):
    for run in ("a", "b"):
        run_cli("stage", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, **{"run.dir": str(tmp_path / run)}),
                "--stage", "1")
    digest = [sha256_file(tmp_path / r / "stages" / "1-agnews" / "adapters.safetensors") for r in ("a", "b")]
    assert digest[0] == digest[1]


@pytest.mark.parametrize("method, experts", [
    ("seq_lora", [{"shared"}, {"shared"}]),
    ("per_task_lora", [{"agnews"}, {"agnews", "yelp"}]),
    ("olora", [{"agnews"}, {"agnews", "yelp"}]),
    ("mocl", [{"agnews"}, {"agnews", "yelp"}]),
    ("moe_cl_no_gan", [{"shared", "agnews"}, {"shared", "agnews", "yelp"}]),
])
def test_baseline_methods_run_end_to_end(tmp_path, model_cache, method, experts):
    """The same trainer with `experts.method`: what each stage holds and keeps, and the metrics."""
    run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, **{"experts.method": method}))
    run = tmp_path / "run"
    one = load_file(run / "stages" / "1-agnews" / "adapters.safetensors")
    two = load_file(run / "stages" / "2-yelp" / "adapters.safetensors")
    for sd, want in zip((one, two), experts):
        assert {k.split(".")[3] for k in sd if ".experts." in k} == want
        assert any(".gates." in k for k in sd) == method.startswith("moe_cl")
        assert not any(k.startswith("discriminators") for k in sd)
    assert {k for k in two if k.startswith("keys.")} == ({"keys.agnews.vector", "keys.yelp.vector"} if method == "mocl"
                                                         else set())
    changed = {k.split(".")[3] if k.startswith("layers.") else k for k in one if not torch.equal(one[k], two[k])}
    assert changed == ({"shared"} if method == "seq_lora" else set() if method in ("per_task_lora", "olora", "mocl")
                       else {"shared"} | ({"all_tasks"}))  # old task experts (and mocl's old keys) never change
    metrics = json.loads((run / "metrics.json").read_text())
    if method == "mocl":  # a bundle keeps the keys and serves, without task ids, what the trainer measured
        run_cli("export", str(run), "--out", str(tmp_path / "bundle"))
        requests = tmp_path / "requests.jsonl"
        cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(tmp_path, model_cache))
        tasks = load_tasks(cfg.data, cfg.run.seed)
        lines = [{"task": t.name, "sentence": r["text"], "gold": t.labels[r["label"]]} for t in tasks for r in t.test]
        requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
        run_cli("predict", "--bundle", str(tmp_path / "bundle"), "--input", str(requests), "--output", str(tmp_path / "p.jsonl"))
        preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
        for i, t in enumerate(("agnews", "yelp")):
            rows = [p for p in preds if p["task"] == t]
            assert sum(p["prediction"] == p["gold"] for p in rows) / len(rows) == metrics["accuracy"][1][i]
        # tools/mocl_study.py retrains stage 1's key from the queries alone (its only gradient there is the
        # matching loss) and lands on the run's key; its figures are shares and softmax weights
        study = subprocess.run([sys.executable, "tools/mocl_study.py", "configs/tiny.yaml",
                                *_overrides(tmp_path, model_cache), "--run", str(run), "--lr-mults", "1,10",
                                "--eval-rows", "12"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert study.returncode == 0, study.stderr[-3000:]
        figures = json.loads(study.stdout.strip().splitlines()[-1])
        assert figures["run"]["x1_error"]["agnews"] < 0.2
        for routing in (*figures["lr_mults"].values(), figures["run"]["routing"]):
            assert set(routing) == {"agnews", "yelp"}
            assert all(0 <= f["top"] <= 1 and 0 < f["own@8"] < 1 for f in routing.values())
    assert len(metrics["accuracy"]) == 2 and isinstance(metrics["ACC"], float)
    if method == "per_task_lora":  # an unseen task meets the untouched base: no transfer, by construction
        assert metrics["accuracy"][0][1] == metrics["baseline"][1]
