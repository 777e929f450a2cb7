"""Loading a checkpoint straight into ZeRO-3 partitions (trainer/partitioned.py), with real ranks:
every rank holds only its share, and the gathered parameters equal the checkpoint bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_distributed import _env

pytestmark = pytest.mark.distributed

WORKER = r'''
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
from trainer.config import load_config
from trainer.base import load_base
from trainer.distributed import make_strategy
from trainer.partitioned import checkpoint_files

cfg = load_config("configs/tiny.yaml", [f"model.path={sys.argv[1]}", f"model.dtype={sys.argv[2]}",
                                        "distributed.strategy=deepspeed", "distributed.param_persistence_threshold=0"])
strategy = make_strategy(cfg)
model, tok, folder = load_base(cfg.model, strategy)
files = checkpoint_files(folder)
local = full = 0
mismatched = []
for name, p in model.named_parameters():
    assert p.numel() == 0, f"{name} is not partitioned"
    n_local, n_full = strategy.local_numel(p)
    local, full = local + n_local, full + n_full
    with strategy.gathered([p]), safe_open(files[name], framework="pt") as f:
        expected = f.get_tensor(name).to(p.dtype)
        if not torch.equal(p.data, expected):
            mismatched.append(name)
Path(sys.argv[3] + f".{strategy.rank}").write_text(json.dumps(
    {"local": local, "full": full, "mismatched": mismatched, "world": strategy.world_size,
     "dtype": str(next(model.parameters()).dtype)}))
strategy.close()
'''


def _load_on_ranks(tmp_path, nproc: int, folder, dtype: str) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / f"result-{nproc}"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(worker), str(folder), dtype, str(out)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((tmp_path / f"result-{nproc}.{r}").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, 3])  # 3: partitions cut rows and the last one is padded
def test_sharded_bf16_checkpoint_loads_into_partitions(tmp_path, nproc):
    pytest.importorskip("mistral_common")
    base = tmp_path / "base"
    subprocess.run([sys.executable, "tools/make_base.py", "--shape", "tiny", "--out", str(base),
                    "--max-shard-size", "1MB"], cwd=REPO, check=True, capture_output=True, timeout=300)
    results = _load_on_ranks(tmp_path, nproc, base, "bfloat16")
    full = results[0]["full"]
    assert full == 4170048  # the tiny shape's parameters (tests/test_make_base.py)
    for r in results:
        assert r["mismatched"] == [] and r["world"] == nproc and r["dtype"] == "torch.bfloat16"
        assert full / nproc <= r["local"] <= full / nproc + 64 * 2  # its share, plus padding of a few tensors


def test_single_file_checkpoint_with_tied_embeddings_loads_in_fp32(tmp_path, tiny_llama_dir):
    results = _load_on_ranks(tmp_path, 2, tiny_llama_dir, "float32")
    for r in results:
        assert r["mismatched"] == [] and r["dtype"] == "torch.float32"
        assert r["local"] * 2 == r["full"]
