"""The adapter tools on a run trained here: PEFT round trip, exact and approximate merges, export and
predict, inspect, a mid-stage DeepSpeed checkpoint as the source, and every error; device placement,
the streamed merge of a sharded base, and a bf16 base kept bf16."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer.adapters import (SHARD_INDEX, Server, build_model, export_bundle, extract_peft, merge,
                              merge_into_base, open_adapters, predict)
from trainer.checkpoint import CheckpointError
from trainer.config import load_config
from trainer.data import load_tasks
from trainer.distributed import LocalStrategy, resolve_dtype

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
    run_cli("sequence", "configs/tiny.yaml", *_overrides(tmp, model_cache, **{"eval.task_id": "inferred"}))
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
    model, _ = build_model(ad, _base(ad), LocalStrategy("cpu"))
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
    model, _ = build_model(ad, _base(ad), LocalStrategy("cpu"))
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
    assert bundle["data"]["options"] is True and open_adapters(tmp_path / "bundle").config.data.options is True
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
    assert json.loads(out.stdout.strip().splitlines()[-1])["routed_task"] == "yelp"  # the one task it knows


def test_each_stage_keeps_the_earlier_tasks_router_statistics(run):
    one = load_file(run / "stages" / "1-agnews" / "router.safetensors")
    two = load_file(run / "stages" / "2-yelp" / "router.safetensors")
    assert set(one) == {"pooled.scatter", "tasks.agnews.mean", "tasks.agnews.var", "tasks.agnews.scores"}
    assert set(two) == set(one) | {"tasks.yelp.mean", "tasks.yelp.var", "tasks.yelp.scores"}
    for k in one:
        if k.startswith("tasks."):
            assert torch.equal(one[k], two[k]), k  # bit for bit
    assert not torch.equal(one["pooled.scatter"], two["pooled.scatter"])  # the shared covariance grew
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["routing_accuracy"][0][1] is None and all(v is not None for v in metrics["routing_accuracy"][1])
    inferred = metrics["inferred"]
    assert len(inferred["accuracy"]) == 2 and {"ACC", "BWT", "FWT"} <= set(inferred)
    for i, row in enumerate(metrics["routing_accuracy"]):
        for j, share in enumerate(row):
            if share == 1.0:  # every row routed to its own task: served exactly as with its id
                assert inferred["accuracy"][i][j] == metrics["accuracy"][i][j]
    manifest = json.loads((run / "stages" / "2-yelp" / "stage.json").read_text())
    assert set(manifest["eval"]["seconds"]) == {"given", "routing", "rerouted"} and manifest["router"]["layer"] == 2
    # `evaluate` with inferred ids reproduces the stage's figures; TensorBoard has them too.
    config = json.loads((run / "stages" / "2-yelp" / "stage.json").read_text())["config"]
    (run.parent / "config.yaml").write_text(json.dumps(config))
    out = run_cli("evaluate", str(run.parent / "config.yaml"), "--json", "eval.task_id=inferred")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "routing_accuracy", "inferred_accuracy"):
        assert result[key] == manifest["eval"]["test_accuracy" if key == "accuracy" else key], key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in (run / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"cl_inferred/ACC", "routing/accuracy/yelp", "eval/inferred_accuracy/agnews"} <= tags


def test_predict_routes_requests_without_a_task_id(run, tmp_path, model_cache):
    run_cli("export", str(run), "--out", str(tmp_path / "bundle"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(tmp_path, model_cache))
    tasks = load_tasks(cfg.data, cfg.run.seed)
    given = [{"task": t.name, "sentence": r["text"]} for t in tasks for r in t.test]
    lines = "".join(json.dumps({"sentence": g["sentence"]}) + "\n" for g in given)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "trainer", "predict", "--bundle", str(tmp_path / "bundle"), "--input",
                           "-", "--fallback", "routed"], cwd=REPO, env=env, input=lines, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    routed = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    (tmp_path / "given.jsonl").write_text("".join(json.dumps(g) + "\n" for g in given))
    with_ids = predict(tmp_path / "bundle", tmp_path / "given.jsonl", None, LocalStrategy("cpu"))
    assert len(routed) == len(given)
    assert all(r["routed_task"] in ("agnews", "yelp") and 0.0 <= r["routed_confidence"] <= 1.0 for r in routed)
    right = [(r, w) for r, w in zip(routed, with_ids) if r["routed_task"] == w["task"]]
    assert len(right) >= len(routed) // 2
    assert all(r["prediction"] == w["prediction"] for r, w in right)  # routed right: served as with the id
    # The base fallback: a request far from every learned task, flagged and answered by the base.
    (tmp_path / "far.jsonl").write_text(json.dumps({"instruction": "0 1 2 3 4 5 6 7 8 9 " * 12}) + "\n")
    [far] = predict(tmp_path / "bundle", tmp_path / "far.jsonl", None, LocalStrategy("cpu"), max_new_tokens=4)
    assert far["routed_confidence"] == 0.0 and far["routed_confidence_low"] and far["served_by"] == "base"
    assert isinstance(far["prediction"], str)
    [kept] = predict(tmp_path / "bundle", tmp_path / "far.jsonl", None, LocalStrategy("cpu"), max_new_tokens=4,
                     fallback="routed")
    assert "served_by" not in kept and kept["prediction"] in [*tasks[0].labels, *tasks[1].labels]


def test_predict_errors_without_a_router_or_a_text(run, tmp_path):
    bundle = tmp_path / "bundle"
    export_bundle(open_adapters(run), bundle)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"sentence": "fine"}) + "\n" + json.dumps({"sentence": "   "}) + "\n")
    out = run_cli("predict", "--bundle", str(bundle), "--input", str(empty), check=False)
    assert out.returncode == 2 and f"{empty}: line 2: the request text is empty" in out.stderr
    # A bundle without a router (e.g. exported from a mid-stage checkpoint) serves requests with a task only.
    info = json.loads((bundle / "bundle.json").read_text())
    del info["files"]["router.safetensors"]
    (bundle / "bundle.json").write_text(json.dumps(info))
    (bundle / "router.safetensors").unlink()
    no_task = tmp_path / "no_task.jsonl"
    no_task.write_text(json.dumps({"task": "yelp", "sentence": "Good."}) + "\n" + json.dumps({"sentence": "Good."}) + "\n")
    with pytest.raises(CheckpointError, match=f"{no_task}: line 2: no 'task', and the bundle .* has no task router"):
        predict(bundle, no_task, None, LocalStrategy("cpu"))
    no_task.write_text(json.dumps({"task": "yelp", "sentence": "Good."}) + "\n")
    [row] = predict(bundle, no_task, None, LocalStrategy("cpu"))
    assert row["task"] == "yelp" and "routed_task" not in row

def test_inspect_run_and_bundle(run, tmp_path):
    out = run_cli("inspect", str(run))
    assert "learned: agnews, yelp" in out.stdout and "expert:shared" in out.stdout and "sha256" in out.stdout
    assert "router:  layer 2, agnews (270 rows), yelp (270 rows)" in out.stdout
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

    model, _ = build_model(ad, _base(ad), LocalStrategy("cpu"))
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


# -- device placement, streamed merges, the base's dtype ----------------------------------------------

def _copy_of_base(ad, out, dtype):
    """The run's base re-saved in `dtype` as several safetensors shards with an index, and the same
    adapters pointed at it (without a fingerprint: the copy's files differ from the trained-on base)."""
    from transformers import AutoTokenizer

    src = _base(ad)
    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(out, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    info = {**ad.info, "base_model": {"path": str(out), "fingerprint": None}}
    return dataclasses.replace(ad, info=info)


def _shards(folder):
    """{tensor name: (shard file, safetensors dtype)} over every weight file of `folder`."""
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            found.update({k: (shard.name, f.get_slice(k).get_dtype()) for k in f.keys()})
    return found


def test_the_model_is_on_the_strategy_device_with_its_batches(run, tmp_path):
    """The meta device stands in for a GPU: one that differs from where weights are loaded (the CPU)."""
    ad = open_adapters(run)
    strategy = LocalStrategy(device="meta")
    model, _ = build_model(ad, _base(ad), strategy)
    # predict, evaluate and gate_means put every batch on strategy.device: the model must be there too
    assert {t.device for t in [*model.parameters(), *model.buffers()]} == {strategy.device}
    # The same tools run end to end on an explicitly chosen device.
    cpu = LocalStrategy(device="cpu")
    export_bundle(ad, tmp_path / "bundle")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"task": "yelp", "sentence": "Great food, rude staff."}) + "\n")
    [row] = predict(tmp_path / "bundle", requests, None, cpu)
    assert row["prediction"] in ("very negative", "negative", "neutral", "positive", "very positive")
    report = merge(ad, tmp_path / "m", None, "agnews", cpu, calibration_rows=8)
    assert report["test_rows"] == 12 and 0.0 <= report["agreement"] <= 1.0


def test_streamed_merge_of_a_sharded_base_equals_the_in_memory_merge(run, tmp_path):
    ad = _copy_of_base(open_adapters(run), tmp_path / "base", torch.float32)
    base = _shards(tmp_path / "base")
    assert len({shard for shard, _ in base.values()}) >= 2 and (tmp_path / "base" / SHARD_INDEX).is_file()
    merge(ad, tmp_path / "merged", "yelp", None, LocalStrategy("cpu"))
    out = tmp_path / "merged"
    assert _shards(out) == base  # same tensors in the same shard files, same dtypes
    assert json.loads((out / SHARD_INDEX).read_text())["weight_map"] == {k: s for k, (s, _) in base.items()}
    strategy = LocalStrategy("cpu")
    model, _ = build_model(ad, tmp_path / "base", strategy)
    expected = merge_into_base(model, ad, [("yelp", 1.0)], strategy).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).state_dict()
    assert merged.keys() == expected.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], rtol=1.3e-6, atol=1e-5)
        assert torch.equal(merged[k], original[k]) == (".mlp." not in k), k  # only the MLPs change


def test_a_bf16_base_stays_bf16_and_adapters_stay_fp32(run, tmp_path):
    ad = _copy_of_base(open_adapters(run), tmp_path / "base", torch.bfloat16)
    strategy = LocalStrategy("cpu")
    model, _ = build_model(ad, tmp_path / "base", strategy)
    assert model.base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.adapter_parameters().values()} == {torch.float32}
    merge(ad, tmp_path / "merged", "agnews", None, strategy)
    assert {dtype for _, dtype in _shards(tmp_path / "merged").values()} == {"BF16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    expected = merge_into_base(model, ad, [("agnews", 1.0)], strategy).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], expected[k]) for k in merged)
    report = merge(ad, tmp_path / "mixed", None, "agnews", strategy, calibration_rows=8)
    assert {dtype for _, dtype in _shards(tmp_path / "mixed").values()} == {"BF16"}
    assert all(0.0 <= report[k] <= 1.0 for k in ("accuracy_moe_cl", "accuracy_merged", "agreement"))
    extract_peft(ad, "agnews", tmp_path / "peft")
    assert {dtype for _, dtype in _shards(tmp_path / "peft").values()} == {"F32"}


def test_the_tools_serve_in_the_training_dtype_not_the_stored_one(run, tmp_path):
    """A base stored in float16 (as Llama-2-7b-hf is) but trained in another dtype: predict and merge run it
    in the dtype the stage records, unless told otherwise; the merged weights keep the stored dtype."""
    ad = open_adapters(run)
    trained = ad.base_record()["dtype"]
    assert trained == str(resolve_dtype(ad.config.model)).removeprefix("torch.") != "float16"
    stored16 = _copy_of_base(ad, tmp_path / "base", torch.float16)
    stored16 = dataclasses.replace(stored16, info={**stored16.info, "base_model": {
        **stored16.info["base_model"], "dtype": trained}})
    strategy = LocalStrategy("cpu")
    model, _ = build_model(stored16, tmp_path / "base", strategy)
    assert model.base.dtype == getattr(torch, trained)
    model, _ = build_model(stored16, tmp_path / "base", strategy, dtype=torch.float16)  # --dtype float16
    assert model.base.dtype == torch.float16
    report = merge(stored16, tmp_path / "mixed", None, "agnews", strategy, calibration_rows=8)
    assert report["dtype"] == trained and {d for _, d in _shards(tmp_path / "mixed").values()} == {"F16"}
    export_bundle(stored16, tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["base_model"]["dtype"] == trained
    assert Server(tmp_path / "bundle", strategy, str(tmp_path / "base")).model.base.dtype == getattr(torch, trained)
