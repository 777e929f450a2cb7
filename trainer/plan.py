"""The memory and communication plan: which ZeRO layout a run needs, from the base's shape and the cluster.

    python -m trainer plan CONFIG [key=value ...] --nodes N --gpus-per-node G --gpu-memory 80GiB [--shape S]

For each layout it models, per GPU (W ranks in all, n per node, b bytes per base parameter; P the base's
parameters; A the adapters held, A_t those a stage trains; t = micro_batch_size x data.max_length tokens):

    layout         base on the GPU          adapters                         base gathers per micro-step
    zero2          b P (replicated)         b A + 16 A_t / W + b A_t         none
    zero3          b P / W                  4 A + 16 A_t / W                 forward + backward, all ranks
    zero3_hpz      b P / W + b P / n        4 A + 16 A_t / W                 forward all ranks, backward in the node
    zero3_offload  gathered buffers only    4 A (the rest in host memory)    as zero3, each via host memory

16 bytes per trained parameter are its fp32 master, two Adam moments and its fp32 gradient partition;
ZeRO-2 also keeps bf16 working copies of the adapters; ZeRO-3 keeps them fp32 and whole on every rank
(below `stage3_param_persistence_threshold`, see ds_configs/zero3.json). On top of that: activations of
one micro-batch (see `activation_bytes`), gathered-parameter and communication buffers from the
DeepSpeed config's bucket sizes (at least one decoder layer under activation checkpointing, whose
recomputation gathers the layer at once), and the process's fixed overhead (`OVERHEAD`).

Communication per optimizer step and GPU (ring collectives: each GPU sends and receives
(W-1)/W of a collective's size): ZeRO-2 reduce-scatters the trained adapters' fp32 gradients every
micro-step and all-gathers the updated adapters once; ZeRO-3 also all-gathers the base (b P) in
forward and again in backward of every micro-step. Bytes that cross nodes are counted apart.

The recommended layout is the one with the least communication (across nodes first, then in all)
that fits every GPU with `margin` to spare. Which terms are measured and which are estimates:
docs and `results/` (the activation coefficients were measured on this trainer's layers by counting
the tensors autograd saves; the overheads are estimates).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAYOUTS = {"zero2": "ds_configs/zero2.json", "zero3": "ds_configs/zero3.json",
           "zero3_hpz": "ds_configs/zero3_hpz.json", "zero3_offload": "ds_configs/zero3_offload.json"}
GiB = 1 << 30
# Fixed per-process memory: a GPU's CUDA context, cuBLAS workspace and NCCL buffers (an estimate, not
# measured here); a CPU rank's interpreter with torch, DeepSpeed and transformers imported (measured RSS).
OVERHEAD = {"cuda": int(1.5 * GiB), "cpu": int(0.5 * GiB)}
# Bytes autograd keeps per token and decoder layer for backward, as c_h x hidden + c_i x intermediate,
# for a MoE-CL layer (shared + one task expert, gated; the baselines keep less), by base dtype and
# whether LoRA dropout is on. Measured by counting the tensors saved in a training forward
# (tests/test_plan.py repeats the measurement on a small shape).
ACTIVATION_COEFFICIENTS = {(2, False): (23.4, 16.9), (2, True): (25.4, 22.9),
                           (4, False): (29.0, 32.0), (4, True): (37.0, 44.0)}


@dataclass
class Shape:
    """What the plan needs of a base and its adapters (parameter counts, exact: see `count`)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    base_params: int
    largest_module: int  # parameters of the largest single module ZeRO-3 gathers at once
    layer_params: int  # parameters of one decoder layer
    adapter_params: int  # every expert, gate and discriminator of the last stage
    trained_params: int  # what the last stage trains
    largest_adapter_tensor: int  # elements of the largest expert, gate or discriminator tensor


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU (per rank on a CPU host)
    device: str = "cuda"  # "cuda" or "cpu": which fixed overhead applies

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Option:
    layout: str
    ds_config: str
    memory: dict[str, int]  # per GPU, by term
    host_memory: dict[str, int]  # per rank, in the node's memory (offload)
    sent: dict[str, int]  # bytes each GPU sends (and receives) per optimizer step, by collective
    across_nodes: int  # of which on collectives spanning nodes
    host_transfer: int  # bytes copied between host and GPU per optimizer step (offload)
    fits: bool = False
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    @property
    def communication(self) -> int:
        return sum(self.sent.values())


@dataclass
class Plan:
    shape: Shape
    cluster: Cluster
    dtype_bytes: int
    tokens: int  # per micro-batch
    accumulation: int
    activation_checkpointing: bool
    margin: float
    options: list[Option] = field(default_factory=list)
    choice: str | None = None

    def option(self, layout: str) -> Option:
        return next(o for o in self.options if o.layout == layout)

    def to_dict(self) -> dict:
        out = asdict(self)
        for o, d in zip(self.options, out["options"]):
            d["total"], d["communication"] = o.total, o.communication
        return out


def activation_bytes(hidden: int, intermediate: int, layers: int, tokens: int, dtype_bytes: int, dropout: bool,
                     checkpointing: bool) -> dict[str, int]:
    """Activation memory of one training micro-batch: what backward keeps, plus one layer's worth in flight
    (its recomputation under activation checkpointing, its input gradients otherwise)."""
    c_h, c_i = ACTIVATION_COEFFICIENTS[(2 if dtype_bytes <= 2 else 4, dropout)]
    layer = int(tokens * (c_h * hidden + c_i * intermediate))
    kept = layers * tokens * hidden * dtype_bytes if checkpointing else layers * layer
    return {"activations": kept, "activations_in_flight": layer}


def count(hf_config, experts, order: list[str]) -> Shape:
    """Exact parameter counts: the base and the MoE-CL model of the last stage built on the meta device
    (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .model import MoECLModel

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config)
        base_params = sum(p.numel() for p in base.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in base.modules())
        layer = sum(p.numel() for p in base.get_decoder().layers[0].parameters())
        model = MoECLModel(base, order, experts)
        for t in order:
            model.add_task(t)
        trained = model.freeze_all_but(order[-1])
        adapters = list(model.adapter_parameters().values())
    return Shape(name=getattr(hf_config, "name_or_path", "") or hf_config.model_type, hidden=hf_config.hidden_size,
                 intermediate=hf_config.intermediate_size, layers=hf_config.num_hidden_layers, base_params=base_params,
                 largest_module=largest, layer_params=layer, adapter_params=sum(p.numel() for p in adapters),
                 trained_params=sum(p.numel() for p in trained),
                 largest_adapter_tensor=max(p.numel() for p in adapters))


def make_plan(shape: Shape, cluster: Cluster, dtype_bytes: int, tokens: int, accumulation: int,
              checkpointing: bool, dropout: bool, ds_configs: dict[str, dict], margin: float = 0.1,
              layouts: dict[str, str] | None = None) -> Plan:
    """Every layout of `ds_configs` (layout -> its DeepSpeed config's zero_optimization section) on `cluster`."""
    plan = Plan(shape, cluster, dtype_bytes, tokens, accumulation, checkpointing, margin)
    w, n, b = cluster.world, cluster.gpus_per_node, dtype_bytes
    ring = (w - 1) / w
    P, A, At = shape.base_params, shape.adapter_params, shape.trained_params
    acts = activation_bytes(shape.hidden, shape.intermediate, shape.layers, tokens, b, dropout, checkpointing)
    overhead = OVERHEAD[cluster.device]
    optimizer = 16 * At // w
    multi_node = cluster.nodes > 1
    for layout, zero in ds_configs.items():
        reduce_bucket = int(zero.get("reduce_bucket_size", 5e8))
        grads = int(4 * At * ring) * accumulation  # fp32 gradients reduce-scattered every micro-step
        if layout == "zero2":
            memory = {"base": b * P, "adapters": b * A + b * At, "optimizer": optimizer,
                      "buffers": 4 * reduce_bucket + b * int(zero.get("allgather_bucket_size", 5e8))}
            sent = {"gradients": grads, "adapter_gather": int(b * At * ring)}
            option = Option(layout, (layouts or LAYOUTS)[layout], {**memory, **acts, "overhead": overhead}, {}, sent,
                            sum(sent.values()) if multi_node else 0, 0)
        else:
            live = int(zero.get("stage3_max_live_parameters", 1e9))
            # under activation checkpointing a layer's recomputation gathers the whole layer at once
            at_once = max(shape.largest_module, shape.layer_params if checkpointing else 0)
            gathered = b * min(P, max(at_once, live)) + b * int(zero.get("stage3_prefetch_bucket_size", 5e7))
            # without reuse (max_reuse_distance 0) recomputation re-gathers each layer once more
            passes = 3 if checkpointing and int(zero.get("stage3_max_reuse_distance", 1e9)) == 0 else 2
            base_gather = int(b * P * ring) * accumulation
            sent = {"base_forward": base_gather, "base_backward": base_gather * (passes - 1), "gradients": grads,
                    "adapter_gather": int(4 * At * ring)}
            memory = {"base": b * P // w, "adapters": 4 * A, "optimizer": optimizer,
                      "buffers": 2 * 4 * reduce_bucket + gathered}
            host, across, host_transfer, note = {}, sum(sent.values()) if multi_node else 0, 0, ""
            if layout == "zero3_hpz":
                if not multi_node:
                    continue  # one node: hpZ's secondary partition is the whole world's, i.e. plain ZeRO-3
                memory["base_secondary"] = b * P // n  # each node's own copy of the base, sharded over its GPUs
                across = sent["base_forward"] + sent["gradients"] + sent["adapter_gather"]
                note = "backward gathers stay inside the node"
            if layout == "zero3_offload":
                host = {"base": memory.pop("base"), "optimizer": memory.pop("optimizer")}
                host_transfer = (b * P // w) * passes * accumulation + 8 * At // w
                note = "base and optimizer state in host memory"
            option = Option(layout, (layouts or LAYOUTS)[layout], {**memory, **acts, "overhead": overhead}, host, sent, across,
                            host_transfer, note=note)
        option.fits = option.total <= cluster.gpu_memory * (1 - margin)
        plan.options.append(option)
    fitting = sorted((o for o in plan.options if o.fits),
                     key=lambda o: (o.across_nodes, o.communication + o.host_transfer))
    plan.choice = fitting[0].layout if fitting else None
    return plan


def plan_for(cfg, cluster: Cluster, hf_config, dtype_bytes: int, world_accumulation: int | None = None,
             margin: float = 0.1, layouts: dict[str, str] | None = None) -> Plan:
    """The plan of an experiment config's last stage (the most experts) on `cluster`, for `layouts` (layout ->
    DeepSpeed config file; default: the four shipped ones)."""
    shape = count(hf_config, cfg.experts, cfg.data.order)
    accumulation = world_accumulation if world_accumulation is not None else cfg.train.accumulation(cluster.world)
    zero = {layout: read_ds_config(path).get("zero_optimization", {}) for layout, path in (layouts or LAYOUTS).items()}
    return make_plan(shape, cluster, dtype_bytes, cfg.train.micro_batch_size * cfg.data.max_length, accumulation,
                     cfg.train.activation_checkpointing, cfg.experts.dropout > 0, zero, margin, layouts)


def format_plan(plan: Plan) -> str:
    c, s = plan.cluster, plan.shape
    lines = [f"base {s.name}: {s.base_params / 1e9:.2f}B parameters x {plan.dtype_bytes} B = "
             f"{_gb(s.base_params * plan.dtype_bytes)}; adapters {s.adapter_params / 1e6:.1f}M held, "
             f"{s.trained_params / 1e6:.1f}M trained in the last stage",
             f"cluster: {c.nodes} node(s) x {c.gpus_per_node} {'GPU' if c.device == 'cuda' else 'rank'}(s), "
             f"{_gb(c.gpu_memory)} each, {plan.margin:.0%} kept free; micro-batch {plan.tokens} tokens, "
             f"accumulation {plan.accumulation}, activation checkpointing {'on' if plan.activation_checkpointing else 'off'}",
             ""]
    terms = sorted({k for o in plan.options for k in o.memory}, key=_TERM_ORDER.index)
    header = f"{'per GPU':<24}" + "".join(f"{o.layout:>15}" for o in plan.options)
    lines.append(header)
    for term in terms:
        lines.append(f"  {term:<22}" + "".join(f"{_gb(o.memory[term]) if term in o.memory else '-':>15}"
                                               for o in plan.options))
    lines.append(f"  {'total':<22}" + "".join(f"{_gb(o.total):>15}" for o in plan.options))
    lines.append(f"  {'fits':<22}" + "".join(f"{'yes' if o.fits else 'NO':>15}" for o in plan.options))
    if any(o.host_memory for o in plan.options):
        lines.append(f"  {'host memory per rank':<22}" + "".join(
            f"{_gb(sum(o.host_memory.values())) if o.host_memory else '-':>15}" for o in plan.options))
    lines.append(f"{'sent per step (each way)':<24}" + "".join(f"{_gb(o.communication):>15}" for o in plan.options))
    lines.append(f"  {'across nodes':<22}" + "".join(f"{_gb(o.across_nodes):>15}" for o in plan.options))
    if any(o.host_transfer for o in plan.options):
        lines.append(f"  {'host <-> GPU':<22}" + "".join(f"{_gb(o.host_transfer):>15}" for o in plan.options))
    lines.append("")
    if plan.choice:
        o = plan.option(plan.choice)
        lines.append(f"recommended: {plan.choice} ({o.ds_config}): the least communication that fits"
                     + (f"; {o.note}" if o.note else ""))
    else:
        lines.append("nothing fits: lower train.micro_batch_size or data.max_length, turn on "
                     "train.activation_checkpointing, or use more GPUs")
    return "\n".join(lines)


_TERM_ORDER = ["base", "base_secondary", "adapters", "optimizer", "activations", "activations_in_flight", "buffers",
               "overhead"]


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_size(text: str) -> int:
    """'80GiB' / '24G' (powers of 1024, as SLURM), '80GB' (powers of 1000), or plain bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(?:([KMGT])(I?)(B?))?\s*", text.upper())
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 80GiB, 40GB or 24G")
    power = "_KMGT".index(m.group(2)) if m.group(2) else 0
    return int(float(m.group(1)) * (1000 if m.group(4) and not m.group(3) else 1024) ** power)


def read_ds_config(name: str) -> dict:
    from .config import ConfigError

    path = find_ds_config(name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def find_ds_config(name: str) -> Path:
    """A DeepSpeed config: the path itself, else (relative) the copy shipped with the trainer: in the
    repository beside trainer/, or under <prefix>/share/moe-cl/ after `pip install`."""
    from .config import ConfigError

    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [
        path, Path(__file__).resolve().parents[1] / path, Path(sys.prefix) / "share" / "moe-cl" / path]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"distributed.ds_config: {name} not found (looked in {', '.join(str(c) for c in candidates)}); "
                      f"ds_configs/ ships {', '.join(Path(p).name for p in LAYOUTS.values())} and zero3_lowmem.json, "
                      "or set auto")
