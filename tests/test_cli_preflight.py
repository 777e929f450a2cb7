"""Checks before anything is queued (trainer/preflight.py): `config FILE --check` and `submit` read model.path
(config.json, weight files, tokenizer) and load every task of data.order on this host; `submit` resolves
relative paths and its dry run prints the commands a real submit runs. Real tiny models saved with
save_pretrained, the bundled MTL5 subset, the real CLI in a subprocess."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from trainer.config import ConfigError, load_config
from trainer.preflight import check, check_model
from trainer.slurm import absolute_paths

from .conftest import DATA, REPO, run_cli

TINY = str(REPO / "configs" / "tiny.yaml")


def _no_traceback(proc) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_config_check_reads_the_model_and_every_task(tiny_llama_dir, tmp_path):
    ok = run_cli("config", TINY, f"model.path={tiny_llama_dir}", "--check")
    assert "data:\n  root: data/mtl5" in ok.stdout  # the resolved config, as without --check
    assert f"checked model.path: {tiny_llama_dir.resolve()}: llama, 2 layers, hidden 64" in ok.stderr
    assert "tokenizer of 49152 tokens, a chat template" in ok.stderr
    for task, labels in (("agnews", 4), ("yelp", 5)):
        assert f"checked task {task} (classification, {labels} labels): 64 train / 24 validation / 24 test" in ok.stderr
    assert ok.stderr.rstrip().endswith("no problem found")
    missing = run_cli("config", TINY, f"model.path={tmp_path / 'Llama-2-7b-hf'}", "--check", check=False)
    _no_traceback(missing)
    assert f"error: model.path: {tmp_path / 'Llama-2-7b-hf'} has no config.json" in missing.stderr
    # without --check the file alone is read, as before
    assert run_cli("config", TINY, f"model.path={tmp_path / 'Llama-2-7b-hf'}").returncode == 0


def test_an_unsupported_architecture_a_missing_shard_and_a_missing_tokenizer_are_named(tiny_llama_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    cfg = load_config(TINY, [f"model.path={gpt2}"])
    with pytest.raises(ConfigError, match=rf"model.path: {gpt2} holds a 'gpt2' model; .* llama, mistral, qwen2, qwen3"):
        check_model(cfg.model)

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"lists 1 file\(s\) that are not there: model-00002-of-00002.safetensors"):
        check_model(load_config(TINY, [f"model.path={sharded}"]).model)

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama_dir, no_tokenizer)
    for f in no_tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    with pytest.raises(ConfigError, match=rf"model.path: {no_tokenizer}: its tokenizer does not load"):
        check_model(load_config(TINY, [f"model.path={no_tokenizer}"]).model)


def test_submit_checks_the_data_before_any_job(tiny_llama_dir, tmp_path):
    data = tmp_path / "data"
    for task in ("agnews", "yelp"):
        shutil.copytree(DATA / task, data / task)
    rows = json.loads((data / "yelp" / "test.json").read_text())
    rows[7]["label"] = "six stars"
    (data / "yelp" / "test.json").write_text(json.dumps(rows))
    o = [f"model.path={tiny_llama_dir}", f"data.root={data}", f"run.dir={tmp_path / 'run'}"]
    for extra in (["--dry-run"], []):  # a real submit stops at the same place: nothing written, no sbatch run
        bad = run_cli("submit", TINY, *o, *extra, check=False)
        _no_traceback(bad)
        assert f"error: {data / 'yelp' / 'test.json'}: row 7: field 'label' is 'six stars'" in bad.stderr
        assert bad.stdout == "" and not (tmp_path / "run").exists()
    # --no-check leaves the data to the jobs: the commands are printed
    skipped = run_cli("submit", TINY, *o, "--dry-run", "--no-check")
    assert len(skipped.stdout.splitlines()) == 2 and "checked" not in skipped.stderr
    gone = run_cli("submit", TINY, *o[1:], f"model.path={tmp_path / 'nope'}", "--dry-run", check=False)
    _no_traceback(gone)
    assert f"model.path: {tmp_path / 'nope'} has no config.json" in gone.stderr


def test_dry_run_prints_the_held_chain_with_absolute_paths(tiny_llama_dir, tmp_path):
    shutil.copytree(DATA / "agnews", tmp_path / "tasks" / "agnews")
    shutil.copytree(DATA / "yelp", tmp_path / "tasks" / "yelp")
    out = run_cli("submit", TINY, f"model.path={tiny_llama_dir}", "data.root=tasks", "run.dir=runs/x", "--dry-run",
                  cwd=tmp_path)
    first, second = (shlex.split(c) for c in out.stdout.splitlines())
    assert "--hold" in first and "--hold" not in second  # released once the run lock lists the jobs
    chains = {a.split("MOECL_CHAIN=")[1].split(",")[0] for a in first + second if "MOECL_CHAIN=" in a}
    assert len(chains) == 1 and len(chains.pop()) == 12
    assert f"--output={tmp_path}/runs/x/logs/stage-1-agnews-%j.out" in first
    assert f"MOECL_CONFIG={tmp_path}/runs/x/slurm/config.yaml" in next(a for a in first if a.startswith("--export="))
    assert f"  data.root: {tmp_path}/tasks\n" in out.stderr and f"  run.dir: {tmp_path}/runs/x\n" in out.stderr
    assert f"checked task yelp (classification, 5 labels): 64 train / 24 validation / 24 test rows from " \
           f"{tmp_path}/tasks/yelp" in out.stderr
    assert "scontrol release <job of stage 1>" in out.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_relative_paths_are_made_absolute_except_a_recorded_model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, ["model.path=models/base", "data.root=../data", "run.dir=runs/a",
                             "distributed.ds_config=ds_configs/zero2.json", "data.cache_dir=~/c"])
    resolved, lines = absolute_paths(cfg)
    assert resolved.model.path == str(tmp_path / "models" / "base")
    assert resolved.data.root == str(tmp_path.parent / "data") and resolved.run.dir == str(tmp_path / "runs" / "a")
    assert resolved.distributed.ds_config == str(REPO / "ds_configs" / "zero2.json")  # found beside trainer/
    assert resolved.data.cache_dir == "~/c" and resolved.model.cache_dir == cfg.model.cache_dir  # not relative
    assert f"  model.path: {tmp_path}/models/base" in lines
    # a run whose stage 1 recorded `models/base` keeps it: stage 2 checks model.path is unchanged
    kept, _ = absolute_paths(cfg, recorded_model_path="models/base")
    assert kept.model.path == "models/base" and kept.data.root == resolved.data.root


def test_check_reports_a_missing_deepspeed_config(tiny_llama_dir):
    cfg = load_config(TINY, [f"model.path={tiny_llama_dir}", "distributed.ds_config=ds_configs/zero9.json"])
    with pytest.raises(ConfigError, match="distributed.ds_config: ds_configs/zero9.json not found"):
        check(cfg)


def test_a_stage_recorded_with_an_absolute_model_path_continues_with_a_relative_one(tmp_path, monkeypatch):
    """`submit` records model.path absolute; a later local stage naming the same folder relatively (or with ~)
    continues the run, and another folder is still refused."""
    from trainer.checkpoint import CheckpointError, StageRecord
    from trainer.config import to_dict
    from trainer.recipe import _check_compatible

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tmp_path / 'models' / 'base'}"])
    stage1 = StageRecord(1, "agnews", tmp_path / "stages" / "1-agnews", {"config": to_dict(cfg)})
    _check_compatible(stage1, load_config(REPO / "configs" / "tiny.yaml", ["model.path=models/base"]))
    _check_compatible(stage1, load_config(REPO / "configs" / "tiny.yaml", ["model.path=./models/../models/base"]))
    with pytest.raises(CheckpointError, match="model.path"):
        _check_compatible(stage1, load_config(REPO / "configs" / "tiny.yaml", ["model.path=models/other"]))
