"""What a stage costs: peak device memory, tokens/s, FLOPs per token, model-FLOPs utilisation, the time split.

FLOPs of one training token (a multiply-add is 2 FLOPs; the matrices a token is multiplied by, counted
exactly on the model, see `token_params`)::

    N_base     weights of the decoder layers' linear projections (attention q, k, v, o; MLP gate, up,
               down): every token is multiplied by each once
    N_trained  parameters of the adapters a training token runs through that the stage trains
               (MoE-CL: the shared and the task's LoRA experts and the gate)
    N_frozen   those it runs through that stay frozen (O-LoRA, MoCL: the earlier tasks' LoRAs)

    base forward                      2 N_base
    base backward, input gradients    2 N_base      (the base is frozen: no weight gradients)
    adapters                          6 N_trained + 4 N_frozen
                                      (forward 2, input gradients 2, and for trained ones weight gradients 2)
    recomputation                     2 (N_base + N_trained + N_frozen)   with train.activation_checkpointing

Not counted: the embedding lookup (no multiplication), the LM head (it runs on the answer tokens only,
a few per row), attention scores (4 x seq x hidden per token and layer), norms, activations, biases, the
per-row discriminators and MoCL keys, and discriminator_extra=memory's extra rows; and the first layer's
input gradients are counted although nothing before it trains. Tokens are the real (attention-mask)
tokens of the training batches, as `train/tokens_per_s` counts them.

MFU = achieved FLOP/s / (peak FLOP/s of one device x ranks). With activation checkpointing the count
includes the recomputation (what PaLM calls hardware FLOPs utilisation); `flops_per_token` lists every
term, so either figure follows. The peak is the dense 16-bit tensor-core figure of a known GPU
(`PEAK_FLOPS`), or the one given in MOE_CL_PEAK_TFLOPS; a CPU has none unless given, and MFU is then
null with the reason.

Peak memory per rank: on CUDA `torch.cuda.max_memory_allocated` / `max_memory_reserved`, on a CPU the
process's peak resident set (VmHWM), each reset at the start of a phase so a phase's figure is its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
from torch import nn

from .config import ConfigError
from .model import routed_experts
from .moe import SHARED

GiB = 1 << 30
PEAK_ENV = "MOE_CL_PEAK_TFLOPS"
# Dense (no structured sparsity) 16-bit tensor-core peak FLOP/s per GPU, by the name CUDA reports, from
# NVIDIA's product datasheets (A100, H100, H200, L40S, L4, A10, V100); the datasheets print the sparse
# figure, twice these. V100 has no bfloat16. First match wins; an unlisted GPU gets no MFU unless given.
PEAK_FLOPS = (
    (r"A100", {"bfloat16": 312e12, "float16": 312e12}),
    (r"H100.*PCIe", {"bfloat16": 756e12, "float16": 756e12}),
    (r"H100.*(SXM|HBM3)", {"bfloat16": 989e12, "float16": 989e12}),
    (r"H200(?!.*NVL)", {"bfloat16": 989e12, "float16": 989e12}),
    (r"L40S", {"bfloat16": 362e12, "float16": 362e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float16": 121e12}),
    (r"\bA10\b", {"bfloat16": 125e12, "float16": 125e12}),
    (r"V100S", {"float16": 130e12}),
    (r"V100.*SXM", {"float16": 125e12}),
    (r"V100.*PCI", {"float16": 112e12}),
)
PHASES = ("setup", "baseline_evaluation", "training", "router", "evaluation", "save")
EVALUATION_PHASES = ("baseline_evaluation", "router", "evaluation")


# -- FLOPs ------------------------------------------------------------------------------------------

def token_params(model, task: str, numel: Callable[[nn.Parameter], int] = torch.numel) -> dict[str, int]:
    """N_base, N_trained, N_frozen (see the module docstring) of a training token of `task` on `model` (a
    MoECLModel after `freeze_all_but(task)`). `numel`: a parameter's full size (under ZeRO-3 a partitioned
    parameter's local tensor is empty: pass the strategy's count)."""
    adapters = {id(p) for p in model.adapter_parameters().values()}
    base = sum(numel(m.weight) for layer in model.base.get_decoder().layers for m in layer.modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in adapters)
    run = routed_experts(model.method, task, model.learned_tasks)
    trained = frozen = 0
    for layer in model.moe_layers:
        if run is None:  # the gated mixture: the shared and the task's expert, and the task's gate
            modules = [layer.experts[SHARED], layer.experts[task], layer.gate_for(task)]
        else:
            modules = [layer.experts[name] for name in run]
        for p in (p for m in modules for p in m.parameters()):
            if p.requires_grad:
                trained += numel(p)
            else:
                frozen += numel(p)
    return {"base": base, "adapters_trained": trained, "adapters_frozen": frozen}


def flops_per_token(base: int, adapters_trained: int, adapters_frozen: int, recompute: bool) -> dict[str, int]:
    """Every term of the FLOPs of one training token, and their total (formulas: the module docstring)."""
    terms = {"base_forward": 2 * base, "base_backward_input_gradients": 2 * base,
             "adapters": 6 * adapters_trained + 4 * adapters_frozen,
             "recomputation": 2 * (base + adapters_trained + adapters_frozen) if recompute else 0}
    return {**terms, "total": sum(terms.values())}


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None
               ) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for `dtype` matmuls, where the figure comes from), or (None, why not)."""
    if override_tflops is not None:
        return override_tflops * 1e12, f"given ({PEAK_ENV} or --peak-tflops)"
    if device.type != "cuda":
        return None, f"no peak FLOP/s is assumed for a {device.type.upper()}; set {PEAK_ENV} to get an MFU"
    return gpu_peak_flops(torch.cuda.get_device_properties(device).name, dtype)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> tuple[float | None, str]:
    """`PEAK_FLOPS`' figure for the GPU CUDA calls `name`, or (None, why not)."""
    dtype_name = str(dtype).removeprefix("torch.")
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            if dtype_name in peaks:
                return peaks[dtype_name], f"{name}, dense {dtype_name} tensor-core peak (NVIDIA datasheet)"
            return None, f"{name}: no {dtype_name} peak in trainer/perf.py's table; set {PEAK_ENV}"
    return None, f"{name} is not in trainer/perf.py's table of peaks; set {PEAK_ENV}"


def peak_override() -> float | None:
    """MOE_CL_PEAK_TFLOPS: one device's peak in TFLOP/s (for a GPU not in the table, or a CPU)."""
    text = os.environ.get(PEAK_ENV)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{PEAK_ENV}={text!r}: expected one device's peak in TFLOP/s, a positive number (e.g. 312)")
    return value


# -- peak memory ------------------------------------------------------------------------------------

def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak for this process; False when the CPU's peak cannot be reset (it then counts from
    the process's start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # "5" resets the kernel's peak resident set (VmHWM) to the current one (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak since the last reset, in bytes: allocated and reserved on CUDA, rss on a CPU."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}
    return {"rss": _peak_rss()}


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a stage's phases on one rank: `mark(phase)` ends a phase and starts the next."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, int]] = {}
        self.reset = reset_peak_memory(device)

    def mark(self, phase: str) -> None:
        self.phases[phase] = peak_memory(self.device)
        self.reset = reset_peak_memory(self.device) and self.reset

    def stage(self) -> dict[str, int]:
        """The stage's peak: the largest of its phases', per kind."""
        kinds = {k for v in self.phases.values() for k in v}
        return {k: max(v.get(k, 0) for v in self.phases.values()) for k in sorted(kinds)}


# -- the stage's figures ----------------------------------------------------------------------------

def stage_performance(params: dict[str, int], recompute: bool, tokens: float, seconds: float, world_size: int,
                      device: torch.device, dtype: torch.dtype, memory_per_rank: dict, override_tflops: float | None
                      ) -> dict:
    """The stage's "performance" object of stage.json: tokens/s over its training steps (their own time: not
    logging, checkpoints or evaluation), FLOPs per token by
    term, achieved FLOP/s, the peak and MFU (or why none), and peak memory per rank.

    params: `token_params`; tokens: real tokens trained on over all ranks; seconds: the training steps' time;
    memory_per_rank: phase -> kind -> bytes of every rank (see `PeakMemory`)."""
    flops = flops_per_token(params["base"], params["adapters_trained"], params["adapters_frozen"], recompute)
    per_s = tokens / seconds if seconds > 0 else None
    achieved = flops["total"] * per_s if per_s is not None else None
    peak, source = peak_flops(device, dtype, override_tflops)
    mfu = achieved / (peak * world_size) if achieved is not None and peak else None
    return {"tokens": int(tokens), "training_seconds": round(seconds, 3),
            "tokens_per_s": round(per_s, 2) if per_s is not None else None,
            "params_per_token": params, "activation_checkpointing": recompute, "flops_per_token": flops,
            "achieved_flops_per_s": achieved, "peak_flops_per_s_per_device": peak, "peak_flops_source": source,
            "mfu": round(mfu, 6) if mfu is not None else None,
            "mfu_reason": None if mfu is not None else source if peak is None else "no training steps timed",
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "peak_memory": {"kind": "cuda" if device.type == "cuda" else "rss", **memory_per_rank}}


def time_split(phases: dict[str, float], wall: float) -> dict:
    """The stage's wall seconds by phase (`PHASES`; the rest is `other`), and evaluation's share: baseline
    evaluation, router fitting and evaluation after training, over the wall time."""
    seconds = {p: round(phases.get(p, 0.0), 3) for p in PHASES}
    seconds["other"] = round(max(wall - sum(seconds.values()), 0.0), 3)
    share = {p: round(s / wall, 4) if wall > 0 else None for p, s in seconds.items()}
    evaluation = sum(seconds[p] for p in EVALUATION_PHASES)
    return {"wall_seconds": round(wall, 3), "seconds": seconds, "share": share,
            "evaluation_seconds": round(evaluation, 3), "evaluation_share": round(evaluation / wall, 4) if wall > 0 else None}


def format_time_split(k: int, split: dict) -> str:
    """One line: stage k's wall time, each phase's seconds and share, and evaluation's share."""
    parts = [f"{p.replace('_', ' ')} {s:.1f} s ({100 * split['share'][p]:.0f}%)"
             for p, s in split["seconds"].items() if s >= 0.05 and split["share"][p] is not None]
    share = split["evaluation_share"]
    return (f"stage {k} took {split['wall_seconds']:.1f} s: " + ", ".join(parts)
            + (f"; evaluation's share {100 * share:.0f}%" if share is not None else ""))


def format_performance(k: int, perf: dict) -> str:
    """One line: stage k's tokens/s, FLOPs per token, achieved FLOP/s, MFU (or why none) and peak memory."""
    line = (f"stage {k} training: {perf['tokens_per_s'] or 0:.0f} tokens/s, "
            f"{_si(perf['flops_per_token']['total'])}FLOP per token")
    if perf["achieved_flops_per_s"] is not None:
        line += f", {_si(perf['achieved_flops_per_s'])}FLOP/s"
    line += f", MFU {100 * perf['mfu']:.1f}%" if perf["mfu"] is not None else f", MFU n/a ({perf['mfu_reason']})"
    stage = perf["peak_memory"].get("stage", {})
    line += "; peak memory (largest rank) " + ", ".join(f"{kind} {max(v) / GiB:.2f} GiB" for kind, v in stage.items())
    return line


def _si(x: float) -> str:
    """3 significant digits and an SI prefix, e.g. 2.6e10 -> '26.0 G'."""
    for power, prefix in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(x) >= 10 ** power:
            return f"{x / 10 ** power:.3g} {prefix}"
    return f"{x:.3g} "


def tensorboard_scalars(perf: dict, split: dict) -> dict[str, float | None]:
    """The stage's figures as TensorBoard scalars (memory: the largest rank's, in GiB)."""
    out = {"perf/tokens_per_s": perf["tokens_per_s"], "perf/mfu": perf["mfu"],
           "perf/achieved_tflops_per_s": perf["achieved_flops_per_s"] / 1e12 if perf["achieved_flops_per_s"] else None,
           "perf/flops_per_token": perf["flops_per_token"]["total"]}
    for kind, values in perf["peak_memory"].get("stage", {}).items():
        out[f"perf/peak_memory_{kind}_gib"] = max(values) / GiB
    out.update({f"time/{p}_seconds": s for p, s in split["seconds"].items()})
    out["time/stage_seconds"] = split["wall_seconds"]
    out["time/evaluation_share"] = split["evaluation_share"]
    return out


def memory_per_rank(peaks: PeakMemory, per_rank: Callable[[float], list[float]]) -> dict:
    """Every rank's peaks, by phase and for the whole stage: {phase: {kind: [bytes of rank 0, 1, ...]}}.
    `per_rank` is the strategy's collective: every rank calls it equally often (the same phases and kinds)."""
    out = {phase: {kind: [int(b) for b in per_rank(v)] for kind, v in kinds.items()}
           for phase, kinds in {**peaks.phases, "stage": peaks.stage()}.items()}
    out["reset_per_phase"] = peaks.reset  # False: a CPU whose peak could not be reset (each counts from the start)
    return out
