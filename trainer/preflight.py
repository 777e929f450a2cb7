"""Checks before anything is queued: the base model folder and every task of the order, read on this host.

`submit` runs them before its first sbatch, and `config FILE --check` runs them alone. What they guarantee:
- `model.path` is a folder (or a `builtin:` model) whose `config.json` names a supported architecture
  (`SUPPORTED_MODEL_TYPES`), whose safetensors weights are all there (`model.safetensors`, or every shard
  that `model.safetensors.index.json` lists), and whose tokenizer loads.
- Every task of `data.order` loads and validates exactly as a stage loads it (`data.load_tasks`).
- A fixed `distributed.ds_config` file is found.
A failure is a ConfigError or DataError naming the folder, file, row or field and what to change.

Not checked: the weights' values (read at stage start), tokenization and prompt lengths, and anything only
the compute nodes can see; `submit --no-check` skips these checks for paths that exist only there.
"""

from __future__ import annotations

from .config import Config, ConfigError, ModelConfig


def check(cfg: Config) -> list[str]:
    """Run every check; returns one line per thing checked (the model, each task, the DeepSpeed config)."""
    from .data import load_tasks

    lines = [check_model(cfg.model)]
    for t in load_tasks(cfg.data, cfg.run.seed):
        kind = f"{t.kind}, {len(t.labels)} labels" if t.labels else t.kind
        lines.append(f"task {t.name} ({kind}): {len(t.train)} train / {len(t.val)} validation / {len(t.test)} test "
                     f"rows from {t.source}")
    if cfg.distributed.ds_config != "auto":
        from .plan import find_ds_config

        lines.append(f"distributed.ds_config: {find_ds_config(cfg.distributed.ds_config).resolve()}")
    return lines


def check_model(model: ModelConfig) -> str:
    """`model.path` read as a stage reads it: its config, its weight files and its tokenizer."""
    from transformers import AutoConfig

    from .base import load_tokenizer
    from .builtin import resolve_model_path
    from .model import SUPPORTED_MODEL_TYPES
    from .partitioned import checkpoint_files

    try:
        folder = resolve_model_path(model).resolve()
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    try:
        hf = AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.path: {folder / 'config.json'} cannot be read ({_first_line(e)}); point "
                          "model.path at a Hugging Face model folder") from None
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model.path: {folder} holds a {hf.model_type!r} model; MoE-CL needs a gated MLP "
                          f"(gate_proj, up_proj, down_proj): use a {', '.join(SUPPORTED_MODEL_TYPES)} base")
    shards = sorted(set(checkpoint_files(folder).values()))
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ConfigError(f"model.path: {folder}: model.safetensors.index.json lists {len(missing)} file(s) "
                          f"that are not there: {', '.join(missing[:5])}; finish copying the model")
    try:
        tokenizer = load_tokenizer(folder, model.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.path: {folder}: its tokenizer does not load ({_first_line(e)}); the folder "
                          "needs tokenizer.json, or tokenizer.model with tokenizer_config.json") from None
    template = "a chat template" if tokenizer.chat_template else "no chat template (plain prompts)"
    return (f"model.path: {folder}: {hf.model_type}, {hf.num_hidden_layers} layers, hidden {hf.hidden_size}; "
            f"{len(shards)} safetensors file(s); tokenizer of {len(tokenizer)} tokens, {template}")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
