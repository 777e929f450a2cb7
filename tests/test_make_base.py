"""The checkpoint writer (tools/make_base.py) on the tiny shape: a sharded Hugging Face folder with an
index and a real sentencepiece tokenizer, loadable by from_pretrained, reproducible whatever the shard size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from .conftest import REPO

pytest.importorskip("mistral_common", reason="the writer's tokenizer comes from mistral-common (make setup installs it)")


def _write(out, *extra):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_base.py"), "--shape", "tiny", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("bases") / "tiny"
    return out, _write(out, "--max-shard-size", "1MB")


def test_sharded_folder_with_index(sharded):
    out, result = sharded
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert result["shards"] == len(files) >= 2
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    seen = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                assert key not in seen, f"{key} in two shards"
                seen[key] = st.get_tensor(key)
    assert set(seen) == set(index["weight_map"])
    assert all(t.dtype == torch.bfloat16 for t in seen.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in seen.values()) == result["bytes"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_loads_like_a_downloaded_llama(sharded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = sharded
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 32000 and tok.chat_template is None
    ids = tok("What is the topic of this news article?")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and len(ids) > 5
    assert tok.convert_ids_to_tokens(ids[1]) == "\u2581What"  # sentencepiece, not a byte-level BPE
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == result["params"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 32000) and torch.isfinite(logits).all()
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))


def test_weights_do_not_depend_on_shard_size_and_reuse(sharded, tmp_path):
    out, _ = sharded
    single = tmp_path / "single"
    assert _write(single)["shards"] == 1
    assert not (single / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(single / "model.safetensors", framework="pt") as st:
        for key, file in index.items():
            with safe_open(out / file, framework="pt") as sh:
                assert torch.equal(st.get_tensor(key), sh.get_tensor(key)), key
    stamp = (single / "model.safetensors").stat().st_mtime_ns
    assert _write(single, "--reuse")["reused"] is True
    assert (single / "model.safetensors").stat().st_mtime_ns == stamp


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "Llama-2-7b-hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_base.py"), "--shape", "tiny", "--out", str(folder),
                           "--reuse"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "refusing to replace it" in proc.stderr
    assert [p.name for p in folder.iterdir()] == ["config.json"]
