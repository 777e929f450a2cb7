"""Loading the frozen base model and its tokenizer from a local Hugging Face folder.

`builtin:<name>` paths are materialised once into `model.cache_dir` as ordinary Hugging Face
folders (see `builtin.py`) and then take exactly the path a user's 7B checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .builtin import resolve_model_path
from .config import ConfigError, ModelConfig
from .distributed import Strategy, cpu_has_bf16, resolve_dtype
from .model import SUPPORTED_MODEL_TYPES


def same_model(a: str, b: str) -> bool:
    """Whether two model.path values name the same model: `builtin:` names as written, folders as absolute
    paths (`submit` records them absolute, a local run may give them relative)."""
    canonical = lambda p: p if p.startswith("builtin:") else str(Path(p).expanduser().resolve())  # noqa: E731
    return canonical(a) == canonical(b)


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere; any id will do
    return tok


def load_base(cfg: ModelConfig, strategy: Strategy | None = None
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Frozen base model, tokenizer and the folder they came from. Only safetensors weights are read.

    The strategy decides how the weights are placed (under ZeRO-3: partitioned while they load)."""
    folder = resolve_model_path(cfg)
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model.path: {folder} is a {hf_config.model_type!r} model; MoE-CL wraps gated MLPs "
                         f"and supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    dtype, strategy = resolve_dtype(cfg), strategy or Strategy()
    if dtype == torch.bfloat16 and strategy.device.type == "cpu" and not cpu_has_bf16():
        strategy.print("warning: model.dtype=bfloat16 on a CPU without native bf16 matmuls (no AVX512-BF16 or AMX): "
                       "its matmuls fall back to a slow path, many times slower than float32; model.dtype=auto "
                       "picks float32 here")
    model = strategy.load_base_model(folder, hf_config, dtype, cfg.trust_remote_code)
    model.requires_grad_(False)
    return model, load_tokenizer(folder, cfg.trust_remote_code), folder


def base_fingerprint(folder: Path) -> str:
    """A cheap identity of a base checkpoint: its config plus the names and sizes of its weight files.

    Hashing 14 GB of weights per stage would cost minutes; shapes are checked separately on load.
    """
    h = hashlib.sha256()
    h.update(json.dumps(json.loads((folder / "config.json").read_text()), sort_keys=True).encode())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
