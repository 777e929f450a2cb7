"""A Hugging Face checkpoint loaded straight into ZeRO-3 partitions, each rank reading only its own slice.

What it guarantees (measured in `tools/rehearse.py` on a Llama-2-7B-shaped base):
- The model is built under `deepspeed.zero.Init` with weight initialisation skipped, so every
  parameter exists only as this rank's flat partition (`ds_tensor`) from the start.
- Every rank then fills its own partition from the safetensors files (memory-mapped; one file open
  at a time), reading only the rows that overlap its range of each flattened tensor. No rank holds
  the whole model, a whole shard or (for 2+ ranks) a whole tensor, and no collective runs: loading
  a 7B base costs each of N ranks 1/N of the reads and no communication.

Why not `from_pretrained` under `HfDeepSpeedConfig`: transformers 5.24 has rank 0 read *every*
checkpoint file into one state dict (13.5 GB of anonymous memory for Llama-2-7B in bf16) and then
broadcast each module from rank 0; measured here, rank 0 peaked at 15.6 GB while loading.

Only safetensors checkpoints are read (`model.safetensors`, or the shards listed in
`model.safetensors.index.json`); a tensor the model needs and the checkpoint lacks is an error that
names it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ConfigError

INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ConfigError(f"model.path: {folder} has no model.safetensors or {INDEX}; only safetensors weights "
                      "are read (convert .bin checkpoints with transformers' save_pretrained first)")


def build_partitioned(folder: Path, hf_config, dtype: torch.dtype, ds_config: dict, trust_remote_code: bool = False):
    """The model of `hf_config`, partitioned by ZeRO-3 as it is built, holding the checkpoint at `folder`."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # No random init (the checkpoint overwrites it) and RoPE tables kept in float32 under zero.Init.
    # zero.Init takes the partitions' dtype from ds_config's bf16 / fp16 flags (filled in from model.dtype),
    # not from its dtype argument: DeepSpeed 0.19.8 drops that argument on an accelerator without float16
    # (`dtype or float16 if fp16 else bfloat16` parses as `(dtype or float16) if fp16 else bfloat16`), so on
    # such CPUs a float32 base was built in bfloat16.
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"ZeRO-3 built the base in {', '.join(sorted(wrong))}, not {dtype}: the DeepSpeed config's "
                           "bf16 / fp16 flags must match model.dtype")
    model.tie_weights()  # tied output embeddings (tie_word_embeddings) share the input's partition
    load_partitions(model, folder)
    return model


def load_partitions(model: torch.nn.Module, folder: Path) -> None:
    """Fill every parameter's local partition from the checkpoint at `folder` (no collective)."""
    files = checkpoint_files(folder)
    params = dict(model.named_parameters())  # tied weights appear once, under the name the file uses
    missing = [n for n in params if n not in files]
    if missing:
        raise ConfigError(f"model.path: {folder}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} of "
                          f"{len(params)} missing); is it a {model.config.model_type} checkpoint of this config.json?")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    fill_partition(params[name], f.get_slice(name), f"{file.name}: {name}")


def fill_partition(p: torch.nn.Parameter, source, where: str) -> None:
    """Copy this rank's range of the flattened tensor `source` (a safetensors slice) into `p.ds_tensor`, and
    under hpZ (`zero_hpz_partition_size`) its range of the node's copy into `p.ds_secondary_tensor`.

    ZeRO-3 stores elements [rank * size, (rank + 1) * size) of the flattened parameter, the last
    rank's partition zero-padded; only the rows overlapping that range are read."""
    shape = tuple(source.get_shape())
    if shape != tuple(p.ds_shape):
        raise ConfigError(f"model.path: {where} has shape {list(shape)}, the model built from config.json "
                          f"expects {list(p.ds_shape)}")
    _fill_range(p.ds_tensor, p.ds_zero_partition_rank, source, shape, p.ds_numel)
    secondary = getattr(p, "ds_secondary_tensor", None)
    if secondary is not None:  # built by zero.Init from the uninitialised weights: without this, backward reads garbage
        import torch.distributed as dist

        _fill_range(secondary, dist.get_rank(group=p.ds_zero_param_process_group), source, shape, p.ds_numel)


def _fill_range(part: torch.Tensor, index: int, source, shape: tuple, numel: int) -> None:
    """part <- elements [index * len(part), (index + 1) * len(part)) of the flattened `source`, zero-padded."""
    size = part.numel()
    start = index * size
    end = min(start + size, numel)
    if end - start < size:
        part.zero_()
    if start >= end:
        return
    row = math.prod(shape[1:])  # elements per index of the first dimension
    first, last = start // row, -(-end // row)
    rows = source[first:last].reshape(-1)
    part[: end - start].copy_(rows[start - first * row: end - first * row])
