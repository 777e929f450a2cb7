"""Shared fixtures: real tiny Hugging Face models saved and loaded back with from_pretrained,
the real SmolLM2 tokenizer, the bundled MTL5 subset, and a helper to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "mtl5"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its C++ ops into TORCH_EXTENSIONS_DIR; the trainer uses none (the offload test
# checks this folder of the tests' own stays empty), and one left locked in ~/.cache cannot hang the suite.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    _cache = os.environ.get("MOE_CL_TEST_CACHE")
    os.environ["TORCH_EXTENSIONS_DIR"] = (str(Path(_cache) / "torch_extensions") if _cache
                                          else tempfile.mkdtemp(prefix="moecl-torch-ext-"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Where builtin models are materialised for this test session (MOE_CL_TEST_CACHE to reuse one)."""
    shared = os.environ.get("MOE_CL_TEST_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache) -> Path:
    from trainer.builtin import materialize

    return materialize("tiny-llama", model_cache)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(model_cache) -> Path:
    from trainer.builtin import materialize

    return materialize("tiny-qwen2", model_cache)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tiny_llama_dir):
    from trainer.base import load_tokenizer

    return load_tokenizer(tiny_llama_dir)


@pytest.fixture()
def tiny_base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


def run_cli(*args: str, cwd: Path = REPO, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m trainer ...` in a subprocess, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


# The longest files first (measured in CI, minutes): with `make test`'s two workers, each taking a whole file
# at a time in this order (--dist loadfile --no-loadscope-reorder), both finish at about the same time.
LONGEST_FIRST = ("test_distributed.py", "test_slurm.py", "test_adapters.py", "test_rank_failure.py",
                 "test_recipe.py", "test_stopping.py", "test_benchmarks.py", "test_rehearse.py", "test_gpu_check.py", "test_runlock.py",
                 "test_full_disk.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
