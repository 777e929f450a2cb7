"""Write a randomly initialised base model of a real architecture as a standard Hugging Face folder.

    python tools/make_base.py --shape llama2-7b --out ~/.cache/moe-cl/models/llama2-7b-random
    python tools/make_base.py --shape tiny --out /tmp/tiny --max-shard-size 1MB

What it guarantees:
- The folder looks like a downloaded release: `config.json`, `generation_config.json`, weights in
  the base dtype as *sharded* safetensors (`model-0000K-of-0000N.safetensors`) with
  `model.safetensors.index.json` (one `model.safetensors` when everything fits one shard), and a
  real 32k Llama-family sentencepiece tokenizer (Mistral-7B-v0.1's `tokenizer.model`, shipped by the
  `mistral-common` PyPI package) saved with `save_pretrained`, BOS added, no chat template. The
  trainer then loads it through exactly the path a user's downloaded Llama-2-7B takes.
- It never holds the whole model: tensor names and shapes come from a skeleton built on the meta
  device, and tensors are drawn and written one shard at a time (peak memory ~ one shard).
- Every tensor is drawn from its own generator seeded by (seed, name), so the weights do not depend
  on the shard size. Norm weights are 1, biases 0, every other tensor N(0, initializer_range).
- The folder appears whole or not at all (built under a temporary name and renamed), and carries
  `moe_cl_synthetic.json` (shape, seed, dtype): `--reuse` skips writing when it already matches.

Last line printed: one JSON object (folder, params, bytes, shards, seconds, peak RSS of this process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import resource
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import atomic  # noqa: E402
from trainer.shapes import SHAPES, hf_config  # noqa: E402

MARKER = "moe_cl_synthetic.json"
VERSION = 1  # bump when the drawing recipe changes: folders of another version are rewritten by --reuse
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tensor_specs(config) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every tensor a checkpoint of `config` holds, from a meta-device skeleton."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    specs = [(n, p.shape) for n, p in skeleton.named_parameters()]  # tied weights listed once
    persistent = {n for n, _ in skeleton.named_buffers() if _is_persistent(skeleton, n)}
    specs += [(n, b.shape) for n, b in skeleton.named_buffers() if n in persistent]
    return specs


def _is_persistent(model: torch.nn.Module, name: str) -> bool:
    module_name, _, buffer = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer not in module._non_persistent_buffers_set


def plan_shards(specs, dtype: torch.dtype, max_shard_bytes: int) -> list[list[tuple[str, torch.Size]]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a bigger tensor: alone)."""
    shards, current, size = [], [], 0
    item = torch.empty((), dtype=dtype).element_size()
    for name, shape in specs:
        nbytes = shape.numel() * item
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + ([current] if current else [])


def draw(name: str, shape: torch.Size, dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def write_tokenizer(out: Path) -> None:
    """Mistral-7B-v0.1's sentencepiece tokenizer (vocab 32000) as a Llama tokenizer folder."""
    from transformers import LlamaTokenizer

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the tokenizer comes from the mistral-common package: "
                         "pip install --no-deps mistral-common==1.13.1 (or run `make setup`)")
    source = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    shutil.copyfile(source, out / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(out, add_bos_token=True, add_eos_token=False, legacy=False)
    tok.save_pretrained(out)


def write_base(shape: str, out: Path, dtype_name: str = "bfloat16", seed: int = 0,
               max_shard_bytes: int = 2 << 30, layers: int | None = None, log=print) -> dict:
    dtype = DTYPES[dtype_name]
    config = hf_config(shape, dtype_name, layers)
    specs = tensor_specs(config)
    shards = plan_shards(specs, dtype, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    item = torch.empty((), dtype=dtype).element_size()
    total = sum(s.numel() for _, s in specs)
    log(f"writing {shape}: {total / 1e9:.2f}B parameters, {total * item / 1e9:.2f} GB in {dtype_name}, "
        f"{n} shard(s), to {out}")
    from safetensors.torch import save_file

    t0 = time.time()
    with atomic.staged_dir(out) as tmp:
        config.save_pretrained(tmp)
        _generation_config(config).save_pretrained(tmp)
        write_tokenizer(tmp)
        weight_map = {}
        for file, shard in zip(names, shards):
            tensors = {name: draw(name, s, dtype, seed, config.initializer_range) for name, s in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in tensors})
            del tensors
            log(f"  {file}: {len(shard)} tensors ({time.time() - t0:.0f} s)")
        if n > 1:
            index = {"metadata": {"total_size": total * item}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps(_stamp(shape, dtype_name, seed, max_shard_bytes, layers)) + "\n")
        _readable(tmp)  # a base on a cluster's shared filesystem is read by other users' jobs
    return {"folder": str(out), "shape": shape, "params": total, "bytes": total * item, "shards": n,
            "seconds": round(time.time() - t0, 1), "peak_rss_bytes": _peak_rss()}


def _readable(folder: Path) -> None:
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)


def _stamp(shape: str, dtype: str, seed: int, max_shard_bytes: int, layers: int | None = None) -> dict:
    return {"shape": shape, "dtype": dtype, "seed": seed, "max_shard_bytes": max_shard_bytes, "version": VERSION,
            **({"layers": layers} if layers else {})}


def is_written(out: Path, shape: str, dtype: str, seed: int, max_shard_bytes: int, layers: int | None = None) -> bool:
    marker = out / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == _stamp(shape, dtype, seed, max_shard_bytes, layers)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 2GB, 500MB or 1MB")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--out", required=True, help="the folder to write (replaced whole when done)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"), help="e.g. 2GB (default), 500MB")
    p.add_argument("--layers", type=int, default=None,
                   help="override the number of decoder layers (e.g. a 7B-wide 4-layer base for quick checks)")
    p.add_argument("--force", action="store_true", help="replace OUT even if this tool did not write it")
    p.add_argument("--reuse", action="store_true", help="do nothing if OUT already holds this shape, dtype and seed")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser()
    if args.reuse and is_written(out, args.shape, args.dtype, args.seed, args.max_shard_size, args.layers):
        print(f"{out} already holds {args.shape} ({args.dtype}, seed {args.seed}); reusing it")
        print(json.dumps({"folder": str(out), "shape": args.shape, "reused": True}))
        return 0
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file() and not args.force:
        print(f"error: {out} exists and was not written by this tool (no {MARKER}); refusing to replace it. "
              "Choose another --out, or pass --force to replace it", file=sys.stderr)
        return 2
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    need = sum(s.numel() for _, s in tensor_specs(hf_config(args.shape, args.dtype, args.layers))) * \
        torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    if need > free:
        print(f"error: {out.parent}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free", file=sys.stderr)
        return 2
    result = write_base(args.shape, out, args.dtype, args.seed, args.max_shard_size, args.layers)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
