"""Experts out of the trainer: read a run, a stage, a mid-stage checkpoint or a bundle, then

- extract: one expert as a standard PEFT LoRA adapter folder (`PeftModel.from_pretrained` loads it);
- merge: one expert folded into the base weights, or a task's shared + task experts folded with the
  token-wise gate replaced by its mean over a calibration sample (approximate; measured and reported).
  Merged weights are streamed file by file, one weight matrix at a time, in the base's dtype;
- export / predict: a self-contained serving bundle for some tasks, and batched inference from JSONL;
- inspect: what a source holds.

Everything here runs in one process without DeepSpeed, with the model and every batch on the
strategy's device (`LocalStrategy(device)`: the first GPU if there is one, else the CPU), the base in
its stored dtype and the adapters in float32. Mid-stage DeepSpeed checkpoints are read through
DeepSpeed's own zero_to_fp32. Outputs are written atomically, and only after every check passed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import atomic
from .base import base_fingerprint, load_tokenizer
from .builtin import resolve_model_path
from .checkpoint import (ADAPTERS, CHECKPOINT_INFO, MANIFEST, CheckpointError, RunDir, check_fits, read_adapters,
                         sha256_file)
from .config import Config, ModelConfig, from_dict
from .data import PromptFormat, Task, load_tasks, read_jsonl
from .distributed import Strategy
from .evaluate import evaluate, predict_batch
from .model import MoECLModel, method_experts, routed_experts
from .moe import ALL_TASKS_GATE, SHARED
from .router import ROUTER, Router, gather_features, request_ids, request_text

PROJS = ("gate_proj", "up_proj", "down_proj")
BUNDLE = "bundle.json"
SHARD_INDEX = "model.safetensors.index.json"
# Besides the weights, what from_pretrained and AutoTokenizer read from a model folder: a merge copies these.
COPIED_FILES = ("config.json", "generation_config.json", SHARD_INDEX, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "chat_template.json")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# (expert, weight) pairs; a weight is one float, or one float per layer.
Mix = list[tuple[str, float | list[float]]]


@dataclass
class Adapters:
    """Adapter tensors (by saved name) and what is needed to interpret them."""

    source: Path
    kind: str  # "stage", "checkpoint" or "bundle"
    tensors: dict[str, torch.Tensor]
    config: Config
    learned: list[str]
    info: dict  # the stage manifest, checkpoint info or bundle description
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256

    def router(self) -> Router | None:
        """The task router saved with a stage or bundle (None: a mid-stage checkpoint, or written before routers)."""
        return Router.load(self.source / ROUTER, self.files[ROUTER]) if ROUTER in self.files else None

    @property
    def experts(self) -> list[str]:
        return method_experts(self.config.experts.method, self.learned)

    def routed(self, task: str) -> tuple[str, ...] | None:
        """The experts serving `task`, summed (None: the gated mixture of shared + task)."""
        return routed_experts(self.config.experts.method, task, self.learned)

    def require_expert(self, name: str) -> None:
        if name not in self.experts:
            raise CheckpointError(f"{self.source}: no expert {name!r}; available: {', '.join(self.experts)}")

    def require_tasks(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.learned]
        if unknown:
            raise CheckpointError(f"{self.source}: no task {unknown}; learned tasks: {', '.join(self.learned)}")

    def base_record(self) -> dict:
        """{"path", "fingerprint"} of the base these adapters were trained on (fingerprint may be None)."""
        return self.info.get("base_model") or {"path": self.config.model.path, "fingerprint": None}

    def training_dtype(self) -> torch.dtype | None:
        """The base's dtype in training: the stage's record (or the config's explicit model.dtype); None
        when unknown (a stage written before it was recorded, with model.dtype auto)."""
        name = self.base_record().get("dtype") or (self.config.model.dtype if self.config.model.dtype != "auto" else None)
        return getattr(torch, name) if name else None


# -- reading sources --------------------------------------------------------------------------------

def open_adapters(path: str | Path) -> Adapters:
    """A run folder (its last complete stage), a stage folder, a mid-stage checkpoint, or a bundle."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return _from_stage(path)
    if (path / BUNDLE).is_file():
        return _from_bundle(path)
    if (path / "latest").is_file() or (path / CHECKPOINT_INFO).is_file():
        return _from_checkpoint(path)
    if (path / "stages").is_dir():
        stages = sorted((path / "stages").glob(f"*/{MANIFEST}"), key=lambda p: int(p.parent.name.split("-")[0]))
        if stages:
            order = json.loads(stages[0].read_text())["order"]
            done = RunDir(path).completed(order)
            if done:
                return _from_stage(done[-1].folder)
    raise CheckpointError(f"{path}: not a run folder, stage folder ({MANIFEST}), mid-stage checkpoint "
                          f"(latest + {CHECKPOINT_INFO}) or bundle ({BUNDLE})")


def _from_stage(folder: Path) -> Adapters:
    manifest = json.loads((folder / MANIFEST).read_text())
    tensors = read_adapters(folder / ADAPTERS, manifest["files"][ADAPTERS])
    return Adapters(folder, "stage", tensors, from_dict(manifest["config"], str(folder / MANIFEST)),
                    manifest["learned"], manifest, dict(manifest["files"]))


def _from_bundle(folder: Path) -> Adapters:
    info = json.loads((folder / BUNDLE).read_text())
    tensors = read_adapters(folder / ADAPTERS, info["files"][ADAPTERS])
    cfg = from_dict({"model": {"path": info["base_model"]["path"]}, "experts": info["experts"],
                     "data": {**info["data"], "order": [t["name"] for t in info["tasks"]]}}, str(folder / BUNDLE))
    return Adapters(folder, "bundle", tensors, cfg, [t["name"] for t in info["tasks"]], info, dict(info["files"]))


def _from_checkpoint(path: Path) -> Adapters:
    """A mid-stage checkpoint: its trainable tensors (DeepSpeed's zero_to_fp32, or the single-process
    file), plus the frozen experts from the stage it started from."""
    ckpt_dir, tag = (path, (path / "latest").read_text().strip()) if (path / "latest").is_file() else (path.parent, path.name)
    tag_dir = ckpt_dir / tag
    info = json.loads((tag_dir / CHECKPOINT_INFO).read_text())
    if (tag_dir / "trainable.safetensors").is_file():
        by_module = load_file(tag_dir / "trainable.safetensors")
    else:
        # DeepSpeed logs to stdout on import and while reading; keep stdout for the tools' own output.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            by_module = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag, exclude_frozen_parameters=True)
    names = info["adapter_names"]
    tensors = {names[n]: t.float() for n, t in by_module.items() if n in names}
    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        raise CheckpointError(f"{tag_dir}: no (or empty) adapter tensors in this checkpoint")
    cfg = from_dict(info["config"], str(tag_dir / CHECKPOINT_INFO))
    if info["stage"] > 1:  # frozen experts are not in the checkpoint: they are those of stage K-1
        previous = RunDir(ckpt_dir.parent.parent).require_stage(info["stage"] - 1, info["order"])
        if previous.manifest["files"][ADAPTERS] != info["previous"]:
            raise CheckpointError(f"{tag_dir}: stage {previous.index} was rewritten since this checkpoint")
        for k, t in previous.read_adapters().items():
            tensors.setdefault(k, t)
    return Adapters(tag_dir, "checkpoint", tensors, cfg, info["learned"], info, {})


# -- the base the adapters go on --------------------------------------------------------------------

def base_folder(ad: Adapters, override: str | None = None) -> Path:
    """The base model folder, checked against the one the adapters were trained on."""
    if override is not None:
        folder = Path(override)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"--base {folder}: no config.json there")
    else:
        folder = resolve_model_path(ModelConfig(path=ad.base_record()["path"], cache_dir=ad.config.model.cache_dir))
    expected = ad.base_record().get("fingerprint")
    if expected and base_fingerprint(folder) != expected:
        raise CheckpointError(f"base model {folder} is not the one these adapters were trained on "
                              f"({ad.base_record()['path']}: config or weight files differ); pass --base with that folder")
    _check_shapes(ad, folder)
    return folder


def _check_shapes(ad: Adapters, folder: Path) -> None:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(folder)
    hidden, inter, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    expected = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    found_layers = {int(k.split(".")[1]) for k in ad.tensors if k.startswith("layers.")}
    if found_layers != set(range(layers)):
        raise CheckpointError(f"{ad.source}: adapters cover layers {sorted(found_layers)[:3]}.. "
                              f"({len(found_layers)}), the base at {folder} has {layers}")
    for key, t in ad.tensors.items():
        parts = key.split(".")
        if len(parts) == 6 and parts[2] == "experts":
            d_in, d_out = expected[parts[4]]
            want = (ad.config.experts.rank, d_in) if parts[5] == "lora_a" else (d_out, ad.config.experts.rank)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{ad.source}: {key} has shape {list(t.shape)}, the base at {folder} "
                                      f"needs {list(want)}")


def mixed_delta(ad: Adapters, mix: Mix, layer: int, proj: str) -> torch.Tensor:
    """The update sum_e w_e (alpha/r) B_e A_e of one projection of one layer: (out, in), float32.

    Computed on demand, one weight matrix at a time: the updates of every layer at once would be as
    large as the base's MLPs in float32 (17 GB for a 7B model)."""
    scaling = ad.config.experts.alpha / ad.config.experts.rank
    total = torch.zeros(())
    for expert, weight in mix:
        key = f"layers.{layer}.experts.{expert}.{proj}"
        b, a = ad.tensors[f"{key}.lora_b"].float(), ad.tensors[f"{key}.lora_a"].float()
        total = total + (weight[layer] if isinstance(weight, list) else weight) * (scaling * (b @ a))
    return total


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the base's weights are stored in: config.json's `dtype` (`torch_dtype` before
    transformers 5), else that of the first floating-point tensor of its weight files."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and name != "auto":
        return getattr(torch, name)
    for file in weight_files(folder):
        for entry in _read_header(folder / file)[1].values():
            if entry["dtype"] in FLOAT_DTYPES:
                return FLOAT_DTYPES[entry["dtype"]]
    raise CheckpointError(f"{folder}: no floating-point weights found")


def load_plain(folder: Path, device: torch.device, dtype: torch.dtype | None = None):
    """The Hugging Face model at `folder` in `dtype` (default: its stored dtype), on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or stored_dtype(folder), use_safetensors=True)
    return model.to(device).eval()


def serving_dtype(ad: Adapters, folder: Path, dtype: torch.dtype | None = None) -> torch.dtype:
    """The base's dtype for predict and merge's evaluation: `dtype` if given, else the one it was trained in
    (a base stored in float16, as Llama-2-7b-hf is, trained in bfloat16 serves in bfloat16), else the
    stored one."""
    return dtype or ad.training_dtype() or stored_dtype(folder)


def build_model(ad: Adapters, folder: Path, strategy: Strategy, discriminators: bool = False,
                dtype: torch.dtype | None = None):
    """The MoE-CL model with these adapters on the base at `folder`, in eval mode, and its tokenizer.

    The base is in `serving_dtype`; adapters and gates are float32, as trained. Every parameter and
    buffer is on `strategy.device`, where the tools also put every batch."""
    base = load_plain(folder, torch.device("cpu"), serving_dtype(ad, folder, dtype))  # adapters copied in on CPU, then all moved once
    model = MoECLModel(base, ad.config.data.order, ad.config.experts, discriminators=discriminators)
    for t in ad.learned:
        model.add_task(t)
    named = model.adapter_parameters()
    tensors = {k: v for k, v in ad.tensors.items() if k in named}
    check_fits(tensors, {k: p.shape for k, p in named.items()}, ad.source)
    with torch.no_grad(), strategy.gathered(named.values(), modify=True):
        for k, p in named.items():
            p.copy_(tensors[k])
    return model.to(strategy.device).eval(), load_tokenizer(folder)


# -- extract ------------------------------------------------------------------------------------------

def extract_peft(ad: Adapters, expert: str, out: Path, base: str | None = None) -> Path:
    """Write `expert` as a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

    Reads the base's config only (module names come from a meta-device skeleton), never its weights;
    the adapter tensors are written in float32 whatever the base's dtype, as PEFT expects them."""
    from peft import LoraConfig

    ad.require_expert(expert)
    folder = base_folder(ad, base)
    prefixes = _mlp_module_names(folder)
    tensors = {}
    for key, t in ad.tensors.items():
        parts = key.split(".")
        if len(parts) == 6 and parts[2] == "experts" and parts[3] == expert:
            peft_name = "lora_A" if parts[5] == "lora_a" else "lora_B"
            tensors[f"base_model.model.{prefixes[int(parts[1])]}.{parts[4]}.{peft_name}.weight"] = t.float().contiguous()
    e = ad.config.experts
    config = LoraConfig(r=e.rank, lora_alpha=e.alpha, lora_dropout=e.dropout, target_modules=list(PROJS),
                        task_type="CAUSAL_LM", bias="none", base_model_name_or_path=str(folder))
    config.inference_mode = True
    with atomic.staged_dir(out) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list) + "\n")
        (tmp / "moecl_source.json").write_text(json.dumps(
            {"source": str(ad.source), "expert": expert, "files": ad.files}, indent=2) + "\n")
    return out


def _mlp_module_names(folder: Path) -> dict[int, str]:
    """Layer index -> qualified name of its MLP module in the base (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    names = {id(m): n for n, m in skeleton.named_modules()}
    return {i: names[id(layer.mlp)] for i, layer in enumerate(skeleton.get_decoder().layers)}


# -- merge --------------------------------------------------------------------------------------------

def merge_into_base(model: MoECLModel, ad: Adapters, mix: Mix, strategy: Strategy):
    """W <- W + sum_e w_e (alpha/r) B_e A_e on every gated-MLP projection of the base, in place.

    The in-memory definition of a merge, which `write_merged` streams from the files instead (tested
    equal): the sum is formed in float32 and cast back to W's dtype. Returns the plain Hugging Face
    model (the MoE-CL layers unwrapped)."""
    base = model.base
    for i, layer in enumerate(base.get_decoder().layers):
        mlp = layer.mlp.base  # the frozen gated MLP inside the MoE-CL layer
        projs = [getattr(mlp, p) for p in PROJS]
        with torch.no_grad(), strategy.gathered([p.weight for p in projs], modify=True):
            for name, proj in zip(PROJS, projs):
                proj.weight.copy_(_merged(proj.weight, mixed_delta(ad, mix, i, name).to(proj.weight.device),
                                          f"layer {i} {name}"))
        layer.mlp = mlp
    return base


def _merged(weight: torch.Tensor, delta: torch.Tensor, where: str) -> torch.Tensor:
    """weight + delta, summed in float32 and returned in weight's dtype; never non-finite."""
    out = (weight.float() + delta).to(weight.dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"{where}: the merged weight is not finite")
    return out


def write_merged(ad: Adapters, folder: Path, out: Path, mix: Mix) -> None:
    """Write the base at `folder` with `mix` merged in to the (existing) folder `out`, streamed.

    Guarantees: the same weight files under the same names, every tensor with the base's name, shape and
    dtype, byte for byte the base's except the MLP projections (merged as `merge_into_base` does);
    config, generation config, shard index and tokenizer files copied. Memory: one weight matrix at a
    time (plus its float32 sum), never a whole shard or model."""
    targets = _projection_weights(folder)
    files = weight_files(folder)
    headers = {f: _read_header(folder / f) for f in files}
    missing = sorted(set(targets) - {name for _, header in headers.values() for name in header})
    if missing:
        raise CheckpointError(f"{folder}: its weight files have no tensor {missing[0]} ({len(missing)} MLP "
                              "projection weights missing); merge needs the safetensors files transformers saves")
    for file in files:
        shutil.copyfile(folder / file, out / file)  # every tensor as stored; then the MLP weights are rewritten
        _merge_in_place(ad, mix, folder / file, out / file, headers[file], targets)
    for name in COPIED_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)


def _merge_in_place(ad: Adapters, mix: Mix, src: Path, copy: Path, layout: tuple[int, dict],
                    targets: dict[str, tuple[int, str]]) -> None:
    """In `copy`, a byte copy of the safetensors file `src`, overwrite each tensor named in `targets`
    with its merged value. A merged tensor keeps its dtype and shape, hence its size and byte range."""
    data_start, header = layout
    with safe_open(src, framework="pt") as f, open(copy, "r+b") as out:
        for name in (n for n in header if n in targets):
            layer, proj = targets[name]
            merged = _merged(f.get_tensor(name), mixed_delta(ad, mix, layer, proj), f"layer {layer} {proj}")
            raw = merged.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian, as stored
            begin, end = header[name]["data_offsets"]
            assert len(raw) == end - begin
            out.seek(data_start + begin)
            out.write(raw)


def _projection_weights(folder: Path) -> dict[str, tuple[int, str]]:
    """Saved tensor name -> (layer, projection) of every gated-MLP projection weight of the base."""
    return {f"{mlp}.{proj}.weight": (i, proj) for i, mlp in _mlp_module_names(folder).items() for proj in PROJS}


def weight_files(folder: Path) -> list[str]:
    """The base's safetensors files: the shards its index lists, or its single model.safetensors."""
    if (folder / SHARD_INDEX).is_file():
        return sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise CheckpointError(f"{folder}: neither model.safetensors nor {SHARD_INDEX}; the tools read safetensors only")


def _read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, {tensor name: {dtype, shape, data_offsets}}) of a safetensors file.

    The format: an 8-byte little-endian header length, the JSON header, then the tensors' bytes at
    `data_offsets` relative to the end of the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def gate_means(model: MoECLModel, fmt: PromptFormat, task: Task, rows: int, batch_size: int,
               device: torch.device) -> list[list[float]]:
    """Per layer, the mean gate weights [g_shared, g_task] over the first `rows` training rows."""
    from .data import collate

    enc = fmt.encode(task, "train")
    sums = [[0.0, 0.0] for _ in model.moe_layers]
    n = min(rows, len(enc.rows))
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = collate([enc.rows[i] for i in range(start, min(n, start + batch_size))], fmt.tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            model.hidden_states(batch["input_ids"], batch["attention_mask"], task.name, collect=True)
            weight = min(n, start + batch_size) - start
            for i in range(len(sums)):
                g = model.routing.gate_shared[i].item()
                sums[i][0] += weight * g
                sums[i][1] += weight * (1 - g)
    return [[a / n, b / n] for a, b in sums]


def merge(ad: Adapters, out: Path, expert: str | None, task: str | None, strategy: Strategy, base: str | None = None,
          calibration_rows: int = 64, batch_size: int = 16, dtype: torch.dtype | None = None) -> dict:
    """(a) `expert`: that expert folded into the base, exact. (b) `task`: its shared + task experts
    folded with the gate replaced by its per-layer mean on `calibration_rows` training rows; the
    agreement with the exact MoE-CL model on the task's test data is measured and returned.

    The output keeps the base's dtype and weight-file names (`write_merged`); exact merges never load
    the base model, only stream its files. (b)'s models run in `serving_dtype(ad, base, dtype)`."""
    if (expert is None) == (task is None):
        raise ValueError("merge: give exactly one of --expert NAME or --task NAME")
    folder = base_folder(ad, base)
    if expert is not None:
        ad.require_expert(expert)
        mix: Mix = [(expert, 1.0)]
        report = {"mode": "expert", "expert": expert, "exact": True}
    else:
        ad.require_tasks([task])
        if ad.config.experts.method == "mocl":
            raise CheckpointError(f"{ad.source}: mocl weighs its LoRAs per request by matching the request with its "
                                  "task keys, which no merged weight can do; merge one task's LoRA (--expert NAME)")
        if ad.routed(task) is None:
            return _merge_at_mean_gate(ad, folder, out, task, strategy, calibration_rows, batch_size,
                                       serving_dtype(ad, folder, dtype))
        mix = [(e, 1.0) for e in ad.routed(task)]  # a baseline: the task's experts are summed, so exact
        report = {"mode": "task", "task": task, "experts": list(ad.routed(task)), "exact": True}
    report.update({"source": str(ad.source), "base": str(folder), "files": ad.files})
    with atomic.staged_dir(out) as tmp:
        write_merged(ad, folder, tmp, mix)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _merge_at_mean_gate(ad: Adapters, folder: Path, out: Path, task: str, strategy: Strategy,
                        calibration_rows: int, batch_size: int, dtype: torch.dtype) -> dict:
    """merge --task for a gated method: measure the MoE-CL model, free it, stream the merge, then measure
    the merged model as written (reloaded as a user would). One model in memory at a time."""
    tok = load_tokenizer(folder)
    fmt = PromptFormat(tok, ad.config.data)
    data = {t.name: t for t in load_tasks(ad.config.data, ad.config.run.seed)}[task]
    test = fmt.encode(data, "test")
    means, exact = _gate_means_and_accuracy(ad, folder, fmt, data, test, strategy, calibration_rows, batch_size, dtype)
    report = {"mode": "task", "task": task, "exact": False, "dtype": str(dtype).removeprefix("torch."), "calibration_rows": min(calibration_rows, len(data.train)),
              "gate_means": means, "test_rows": exact["total"], "accuracy_moe_cl": exact["accuracy"],
              "source": str(ad.source), "base": str(folder), "files": ad.files}
    mix: Mix = [(SHARED, [g[0] for g in means]), (task, [g[1] for g in means])]
    with atomic.staged_dir(out) as tmp:
        write_merged(ad, folder, tmp, mix)
        merged = evaluate(_plain_as_moecl(load_plain(tmp, strategy.device, dtype), ad, strategy.device), test, tok,
                          batch_size, ad.config.eval.max_new_tokens, strategy, option_pairs=ad.config.eval.option_pairs)
        agree = sum(a == b for a, b in zip(exact["predictions"], merged["predictions"])) / max(exact["total"], 1)
        report.update({"accuracy_merged": merged["accuracy"], "agreement": agree})
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _gate_means_and_accuracy(ad: Adapters, folder: Path, fmt: PromptFormat, data: Task, test, strategy: Strategy,
                             calibration_rows: int, batch_size: int, dtype: torch.dtype) -> tuple[list[list[float]], dict]:
    """The MoE-CL model's per-layer mean gates and its evaluation on `test`. The model lives only in
    this call, so it is freed before the merged model is loaded."""
    model, _ = build_model(ad, folder, strategy, dtype=dtype)
    means = gate_means(model, fmt, data, calibration_rows, batch_size, strategy.device)
    return means, evaluate(model, test, fmt.tok, batch_size, ad.config.eval.max_new_tokens, strategy,
                           option_pairs=ad.config.eval.option_pairs)


def _plain_as_moecl(plain, ad: Adapters, device: torch.device) -> MoECLModel:
    """A plain model seen through MoE-CL with only a zero shared expert: exactly the plain model."""
    return MoECLModel(plain, ad.learned, ad.config.experts, discriminators=False).to(device).eval()


# -- export / predict ---------------------------------------------------------------------------------

def export_bundle(ad: Adapters, out: Path, tasks: list[str] | None = None, base: str | None = None) -> dict:
    """A self-contained serving bundle: the shared expert, the tasks' experts and gates, the prompt
    settings and labels, and a reference to the base with its fingerprint (no discriminators)."""
    tasks = tasks or ad.learned
    ad.require_tasks(tasks)
    if ad.config.experts.method in ("olora", "mocl") and tasks != ad.learned:
        raise CheckpointError(f"{ad.source}: an {ad.config.experts.method} model serves every task with all its "
                              f"LoRAs together; export all learned tasks ({', '.join(ad.learned)}): leave out --tasks")
    folder = base_folder(ad, base)
    data = {t.name: t for t in load_tasks(ad.config.data, ad.config.run.seed)} if ad.kind != "bundle" else None
    keep_experts = {e for t in tasks for e in (ad.routed(t) or (SHARED, t))}
    gate_keys = {ALL_TASKS_GATE} if ad.config.experts.gate == "shared" else set(tasks)  # (baselines have none)
    tensors = {}
    for key, t in ad.tensors.items():
        parts = key.split(".")
        if (parts[0] == "layers" and parts[2] == "experts" and parts[3] in keep_experts) or \
                (parts[0] == "layers" and parts[2] == "gates" and parts[3] in gate_keys) or \
                (parts[0] == "keys" and parts[1] in tasks):  # mocl's task keys
            tensors[key] = t
    if data is not None:
        described = [{"name": t, "kind": data[t].kind, "labels": data[t].labels, "instruction": data[t].instruction}
                     for t in tasks]
    else:
        described = [d for d in ad.info["tasks"] if d["name"] in tasks]
    d = ad.config.data
    info = {"format": "moe-cl-bundle", "version": 1, "tasks": described,
            "experts": {k: v for k, v in vars(ad.config.experts).items()},
            "data": {"answer": d.answer, "options": d.options, "max_length": d.max_length, "system_prompt": d.system_prompt},
            "base_model": {"path": str(folder), "fingerprint": base_fingerprint(folder),
                           "dtype": str(serving_dtype(ad, folder)).removeprefix("torch.")},
            "source": {"path": str(ad.source), "files": ad.files}}
    router = ad.router()
    with atomic.staged_dir(out) as tmp:
        from .checkpoint import save_adapters

        info["files"] = {ADAPTERS: save_adapters(tmp / ADAPTERS, tensors, {"format": "moe-cl-bundle"})}
        if router is not None:  # the exported tasks' statistics; requests without a task id are routed
            info["files"][ROUTER] = router.subset(tasks).save(tmp / ROUTER)
            info["router"] = {"fallback": ad.info.get("router", {}).get("fallback", ad.config.router.fallback)
                              if ad.kind == "bundle" else ad.config.router.fallback}
        (tmp / BUNDLE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_requests(path: Path, ad: Adapters, routable: bool) -> list[dict]:
    """JSONL requests ("-": standard input): {"task"?, "sentence" | "text"} (classification) or
    {"task"?, "instruction", "input"?} (generation). Without "task", a request is routed (`routable`: the
    bundle has a router); a bundle of one task without a router serves that task."""
    kinds = {t["name"]: t["kind"] for t in ad.info["tasks"]}
    where = "standard input" if str(path) == "-" else str(path)
    out = []
    for lineno, row in read_jsonl(path, CheckpointError):
        if not isinstance(row, dict):
            raise CheckpointError(f"{where}: line {lineno}: expected a JSON object")
        task = row.get("task")
        if task is None and not routable:
            if len(kinds) > 1:
                raise CheckpointError(f"{where}: line {lineno}: no 'task', and the bundle {ad.source} has no task router "
                                      f"(exported from a mid-stage checkpoint, or from a run made before routers): give "
                                      f"each request its task, one of {list(kinds)}, or export the bundle from a complete stage")
            task = next(iter(kinds))
        if task is not None and task not in kinds:
            raise CheckpointError(f"{where}: line {lineno}: 'task' must be one of {list(kinds)}, got {task!r}")
        text = row.get("sentence", row.get("text", row.get("input")))
        instruction = row.get("instruction")
        for key, value in (("sentence/text/input", text), ("instruction", instruction)):
            if value is not None and not isinstance(value, str):
                raise CheckpointError(f"{where}: line {lineno}: '{key.split('/')[0]}' must be a string")
        if task is not None and kinds[task] == "generation" and not instruction:
            raise CheckpointError(f"{where}: line {lineno}: generation task {task!r} needs 'instruction'")
        if task is not None and kinds[task] == "classification" and text is None:
            raise CheckpointError(f"{where}: line {lineno}: needs 'sentence' (or 'text')")
        if not request_text({"instruction": instruction or "", "text": text or ""}).strip():
            raise CheckpointError(f"{where}: line {lineno}: the request text is empty; give 'sentence' (or 'text'), "
                                  "or 'instruction'")
        out.append({**row, "_text": text or "", "_instruction": instruction or "", "_task": task})
    return out


def predict(bundle: Path, requests: Path, output: Path | None, strategy: Strategy, base: str | None = None,
            batch_size: int = 16, max_new_tokens: int = 32, fallback: str | None = None,
            dtype: torch.dtype | None = None) -> list[dict]:
    """Serve a bundle on JSONL requests; returns (and writes, as JSONL) each request with its prediction
    (see `Server.serve`). `dtype`: the base's (default `serving_dtype`)."""
    server = Server(bundle, strategy, base, dtype)
    rows = read_requests(requests, server.ad, routable=server.router is not None)
    results = server.serve(rows, Path("standard input" if str(requests) == "-" else requests), batch_size,
                           max_new_tokens, fallback)
    if output is not None:
        atomic.write_text(output, "".join(json.dumps(r) + "\n" for r in results))
    return results


class Server:
    """A bundle loaded for serving: its model (on `strategy.device`), tokenizer and task router."""

    def __init__(self, bundle: Path, strategy: Strategy, base: str | None = None, dtype: torch.dtype | None = None):
        self.ad = open_adapters(bundle)
        if self.ad.kind != "bundle":
            raise CheckpointError(f"{bundle}: not a bundle (make one with `python -m trainer export`)")
        self.router = self.ad.router()
        if self.router is not None:  # its arithmetic on the serving device
            self.router = replace(self.router, device=strategy.device)
        self.model, self.tok = build_model(self.ad, base_folder(self.ad, base), strategy, dtype=dtype)
        self.fmt = PromptFormat(self.tok, self.ad.config.data)
        self.strategy = strategy

    def serve(self, rows: list[dict], source: Path, batch_size: int = 16, max_new_tokens: int = 32,
              fallback: str | None = None) -> list[dict]:
        """Each request (as `read_requests` returns it) with its "prediction".

        A request without "task" is routed (trainer/router.py): it gets "routed_task" and "routed_confidence",
        and, if its confidence is below the router's `min_confidence` ("routed_confidence_low": true) and
        `fallback` (default: the bundle's router.fallback) is base, "served_by": "base": the untouched base
        answers its text. `source` names the requests in error messages."""
        ad, tok, device = self.ad, self.tok, self.strategy.device
        serve = [r["_task"] for r in rows]  # the task serving each row; None: the base
        unrouted = [i for i, r in enumerate(rows) if r["_task"] is None]
        if unrouted:
            ids = request_ids(tok, [request_text({"instruction": rows[i]["_instruction"], "text": rows[i]["_text"]})
                                    for i in unrouted], ad.config.data.max_length)
            feats = gather_features(self.model, ids, self.router.layer, self.strategy, batch_size, tok.pad_token_id)
            routes = self.router.route(feats)
            low = routes.flagged(self.router.min_confidence)
            fallback = fallback or ad.info.get("router", {}).get("fallback", "base")
            for i, t, c, flag in zip(unrouted, routes.tasks, routes.confidence.tolist(), low):
                rows[i]["routed_task"], rows[i]["routed_confidence"] = t, round(c, 4)
                if flag:
                    rows[i]["routed_confidence_low"] = True
                serve[i] = None if flag and fallback == "base" else t
        described = {d["name"]: d for d in ad.info["tasks"]}
        results: list[dict | None] = [None] * len(rows)
        for name in [*described, None]:
            idx = [i for i, t in enumerate(serve) if t == name]
            if not idx:
                continue
            if name is None:
                task = Task("base", "generation", "", None, [], [], [], source)
            else:
                d = described[name]
                task = Task(name, d["kind"], d["instruction"], d["labels"], [], [], [], source)
            enc = self.fmt.encode_rows(task, [_as_row(rows[i], "base" if name is None else task.kind, i) for i in idx])
            for start in range(0, len(idx), batch_size):
                batch = enc.rows[start:start + batch_size]
                if name is None:
                    preds = _base_answers(self.model, batch, tok, max_new_tokens, device)
                else:
                    preds = predict_batch(self.model, enc, batch, tok, max_new_tokens, self.strategy,
                                          self.ad.config.eval.option_pairs)
                for j, p in enumerate(preds, start=start):
                    row = {k: v for k, v in rows[idx[j]].items() if not k.startswith("_")}
                    row["prediction"] = task.labels[p] if task.kind == "classification" else p
                    if name is None:
                        row["served_by"] = "base"
                    results[idx[j]] = row
        return results


def _as_row(request: dict, kind: str, i: int) -> dict:
    """A request as a row of a task of `kind` for PromptFormat (no answer)."""
    if kind == "classification":
        text = request_text({"instruction": request["_instruction"], "text": request["_text"]})
        return {"text": text, "label": 0, "ref": f"line {i + 1}"}
    if kind == "base":  # the base's fallback: the whole request is the (truncatable) text of a chat turn
        return {"instruction": "", "text": request_text({"instruction": request["_instruction"], "text": request["_text"]}),
                "output": "", "ref": f"line {i + 1}"}
    # A generation prompt is the request's own instruction, if any; without one, its text is the whole ask.
    return {"instruction": request["_instruction"], "text": request["_text"], "output": "", "ref": f"line {i + 1}"}


def _base_answers(model: MoECLModel, rows: list[dict], tok, max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy answers of the untouched base (no expert) to rows encoded as generation prompts."""
    from .data import collate

    batch = collate([{"input_ids": r["input_ids"][: r["prompt_len"]]} for r in rows], tok.pad_token_id, left=True,
                    keys=("input_ids",))
    batch = {k: v.to(device) for k, v in batch.items()}
    new = model.generate(batch["input_ids"], batch["attention_mask"], None, max_new_tokens, tok.pad_token_id,
                         tok.eos_token_id, base_only=True)
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


# -- inspect ------------------------------------------------------------------------------------------

def inspect(path: Path) -> dict:
    """Tasks, experts (parameter counts, shapes, dtypes), gates, stage metrics and file hashes."""
    ad = open_adapters(path)
    groups: dict[str, dict] = {}
    for key, t in ad.tensors.items():
        parts = key.split(".")
        name = ((f"expert:{parts[3]}" if parts[2] == "experts" else f"gate:{parts[3]}") if parts[0] == "layers"
                else "task keys" if parts[0] == "keys" else "discriminators")
        g = groups.setdefault(name, {"params": 0, "tensors": 0, "dtypes": set(), "shapes": {}})
        g["params"] += t.numel()
        g["tensors"] += 1
        g["dtypes"].add(str(t.dtype).removeprefix("torch."))
        short = ".".join(parts[4:]) if parts[0] == "layers" and parts[2] == "experts" else ".".join(parts[4:] or parts[2:])
        g["shapes"].setdefault(short, list(t.shape))
    for g in groups.values():
        g["dtypes"] = sorted(g["dtypes"])
    files = dict(ad.files)
    for f in sorted(ad.source.glob("*.safetensors")):
        files.setdefault(f.name, sha256_file(f))
    router = ad.router()
    return {"source": str(ad.source), "kind": ad.kind, "order": ad.config.data.order, "learned": ad.learned,
            "router": {"layer": router.layer, "tasks": router.tasks, "rows": router.count} if router else None,
            "experts": ad.config.experts.__dict__, "groups": groups, "files": files,
            "metrics": ad.info.get("eval"), "step": ad.info.get("step"), "base_model": ad.base_record()}


def format_inspect(r: dict) -> str:
    lines = [f"{r['kind']}: {r['source']}", f"order:   {' -> '.join(r['order'])}",
             f"learned: {', '.join(r['learned'])}" + (f"   (checkpoint at step {r['step']})" if r["step"] else ""),
             f"base:    {r['base_model']['path']}"]
    e = r["experts"]
    method = e.get("method", "moe_cl")
    lines.append(f"experts: method {method}, rank {e['rank']}, alpha {e['alpha']}"
                 + (f", gate {e['gate']}, discriminator {e['discriminator']}" if method.startswith("moe_cl") else ""))
    router = r.get("router")
    lines.append(f"router:  layer {router['layer']}, " + ", ".join(f"{t} ({n} rows)" for t, n in router["rows"].items())
                 if router else "router:  none (requests need their task id)")
    for name, g in r["groups"].items():
        shapes = ", ".join(f"{k} {v}" for k, v in g["shapes"].items())
        lines.append(f"  {name:<24} {g['params']:>12,} params in {g['tensors']:>4} tensors  {'/'.join(g['dtypes'])}  {shapes}")
    if r["metrics"]:
        acc = r["metrics"].get("test_accuracy", {})
        lines.append("test accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    for f, h in r["files"].items():
        lines.append(f"sha256 {h}  {f}")
    return "\n".join(lines)


