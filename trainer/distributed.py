"""The one boundary for distributed concerns.

The recipe, model and data code call only this interface: build the base (already partitioned
under ZeRO-3), wrap the trainable model, backward, optimizer step, all-reduce of a metrics dict,
is-main, barrier, evaluation sharding, full weights of (partitioned) parameters, mid-stage
checkpoints. `LocalStrategy` is one plain PyTorch process and needs no launcher; `DeepSpeedStrategy`
runs ZeRO (stage 3 by default) over every rank of a launcher. Rank checks live here and nowhere else.

Collectives run on every rank; only writes are guarded by `is_main()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import atomic
from .builtin import resolve_model_path
from .checkpoint import CheckpointError
from .config import Config, ConfigError, ModelConfig
from .plan import Cluster, Plan, find_ds_config, plan_for, read_ds_config  # noqa: F401 (find_ds_config: re-exported)
from .stopping import EXIT_REQUEUE, StopSignals  # noqa: F401 (EXIT_REQUEUE: re-exported)

# Keys of a DeepSpeed config that come from the experiment config (train.* and model.dtype).
FILLED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16")


class Interrupted(Exception):
    """Training stopped on request (SIGUSR1, or SIGTERM with checkpoints on) after writing a checkpoint."""


class Strategy:
    """What every strategy offers; the defaults are those of a single process."""

    world_size = 1
    rank = 0
    device = torch.device("cpu")
    stops: StopSignals | None = None

    def watch_stop_signals(self, checkpointing: bool) -> None:
        """SIGUSR1 (walltime near) and SIGTERM ask training to checkpoint and stop (see trainer/stopping.py)."""
        stops = StopSignals(checkpointing)
        if stops.install():
            self.stops = stops

    def stop_requested(self) -> bool:
        """True on every rank once any rank was asked to stop (a collective: call on every rank)."""
        return bool(self.stops and self.stops.requested)

    def stop_reason(self) -> str:
        return (self.stops.requested if self.stops else None) or "a stop request on another rank"

    @contextlib.contextmanager
    def main_first(self):
        """The body runs on the main rank first, then on the others (e.g. to build a cache file once)."""
        yield

    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """How this process runs the model (recorded in stage.json): strategy, DeepSpeed config, plan."""
        return {"strategy": "local", "device": str(self.device)}

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """End of a command that every rank finished: release the process group."""

    def print(self, msg: str) -> None:
        """Progress output, from the main process only."""
        if self.is_main():
            print(msg, flush=True)

    def all_reduce(self, metrics: dict[str, float], op: str = "sum") -> dict[str, float]:
        """Sum (or mean) every value over ranks."""
        return dict(metrics)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of a CPU tensor over ranks (a collective: call on every rank)."""
        return t

    def per_rank(self, value: float) -> list[float]:
        """`value` of every rank, in rank order (a collective: call on every rank)."""
        mine = {f"{r:06d}": (float(value) if r == self.rank else 0.0) for r in range(self.world_size)}
        return [v for _, v in sorted(self.all_reduce(mine).items())]

    def shard(self, n: int) -> tuple[list[int], list[bool]]:
        """This rank's share of `n` evaluation rows, padded so every rank runs the same number of
        batches (every rank must call the same modules equally often). Padding rows are marked False."""
        per_rank = -(-n // self.world_size) if n else 0
        idx = list(range(self.rank * per_rank, min(n, (self.rank + 1) * per_rank)))
        valid = [True] * len(idx)
        filler = idx[-1] if idx else 0
        idx += [filler] * (per_rank - len(idx))
        valid += [False] * (per_rank - len(valid))
        return idx, valid

    def load_base_model(self, folder: Path, hf_config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
        """The frozen base from a local Hugging Face folder (safetensors only), whole in this process."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, config=hf_config, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code)

    def run(self, model: nn.Module, entry: str, *args, **kwargs):
        """One evaluation or serving pass of `model` (MoECLModel.forward's `entry`)."""
        return model(*args, entry=entry, **kwargs)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler, cfg: Config) -> Callable:
        """Wrap the model for training (optimizer None: for inference); returns what to call for a forward."""
        raise NotImplementedError

    def lr(self) -> float:
        """The current learning rate."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (scaled for accumulation)."""
        raise NotImplementedError

    def optimizer_step(self) -> float:
        """End of an optimizer step (after `grad_accum` backwards); returns the gradient norm."""
        raise NotImplementedError

    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far because float16 gradients overflowed (the loss scale then halves)."""
        return 0

    def full_tensors(self, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Full float32 CPU copies of the given parameters (a collective under ZeRO-3: call on every rank)."""
        return {k: p.detach().float().cpu().clone() for k, p in named.items()}

    def gathered(self, params: Iterable[nn.Parameter], modify: bool = False):
        """Context in which `params` hold their full values (written back on exit when `modify`)."""
        return contextlib.nullcontext()

    def local_numel(self, p: nn.Parameter) -> tuple[int, int]:
        """(elements this rank stores, elements of the full parameter)."""
        return p.numel(), p.numel()

    def save_checkpoint(self, folder: Path, tag: str, client_state: dict) -> None:
        """Write checkpoint `tag` under `folder` (a collective); the caller then points `latest` at it."""
        raise NotImplementedError

    def load_checkpoint(self, folder: Path) -> dict | None:
        """Restore the latest checkpoint under `folder` into the set-up model; its client state, or None."""
        raise NotImplementedError


class LocalStrategy(Strategy):
    """One process, plain PyTorch: gradient accumulation, clipping, AdamW, LR schedule.

    `device` is where the model and every batch go, for training and for the adapter tools alike
    (default: the first GPU if there is one, else the CPU). It is decided here and nowhere else.
    """

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)

    def setup(self, model, optimizer, scheduler, cfg):
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        self.grad_accum, self.max_grad_norm = cfg.train.accumulation(1), cfg.train.max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
        return model

    def lr(self):
        return self.scheduler.get_last_lr()[-1]  # the task expert's group (the shared one may be scaled)

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def optimizer_step(self):
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_checkpoint(self, folder, tag, client_state):
        from safetensors.torch import save_file

        names = {id(p): n for n, p in self.model.named_parameters()}
        with atomic.staged_dir(folder / tag) as tmp:
            save_file({names[id(p)]: p.detach().cpu().contiguous() for p in self.params}, tmp / "trainable.safetensors")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "client": client_state}, tmp / "state.pt")

    def load_checkpoint(self, folder):
        if not (folder / "latest").is_file():
            return None
        from safetensors.torch import load_file

        tag = (folder / "latest").read_text().strip()
        tensors = load_file(folder / tag / "trainable.safetensors")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)
        state = torch.load(folder / tag / "state.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO over every rank of the launcher (gloo on CPU, NCCL on GPU).

    The frozen base is created already partitioned (`HfDeepSpeedConfig` alive during
    `from_pretrained`, so no rank ever holds all of it); experts, gates and discriminators are
    added afterwards and partitioned by `deepspeed.initialize`. The optimizer is a plain
    `torch.optim.AdamW` over the trainable parameters (fused, on CPU, with optimizer offload).
    When `training`, train.global_batch_size must split over the ranks; evaluation runs on any number.
    """

    def __init__(self, cfg: Config, training: bool = False):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        _single_process_env()
        cuda = torch.cuda.is_available()
        if resolve_dtype(cfg.model) == torch.float16 and not get_accelerator().is_fp16_supported():
            # DeepSpeed's own refusal comes only after the base is loaded, as "Type fp16 is not supported".
            raise ConfigError(f"model.dtype=float16: DeepSpeed does not run float16 on this {get_accelerator().device_name()} "
                              "(its CPU accelerator needs oneDNN float16, i.e. AVX512-FP16 or AMX-FP16); "
                              "use model.dtype=bfloat16 or float32")
        if not cuda:
            # The CPU accelerator builds a C++ shared-memory all-reduce op on first init (~70 s,
            # 1.5 GB); it only serves inference all-reduce, which this trainer does not use.
            comm_torch = sys.modules.get("deepspeed.comm.torch")
            if comm_torch is not None:
                comm_torch.build_shm_op = lambda: None
        if cuda:  # before DeepSpeed reads LOCAL_RANK (init_distributed's device id, initialize's set_device)
            torch.cuda.set_device(claim_local_gpu(os.environ, torch.cuda.device_count()))
        # A collective waiting longer than this for a rank fails, and the job ends (no rank waits forever).
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=cfg.distributed.timeout_seconds))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if not cuda and cfg.distributed.gloo_broadcast_gather:
            _all_gather_by_broadcasts()
        self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        self.plan: Plan | None = None
        self.ds_config_file = cfg.distributed.ds_config
        if cfg.distributed.ds_config == "auto":
            self.plan = auto_plan(cfg, self.world_size, self.device, training)
            if self.plan.choice is None:
                raise ConfigError(f"distributed.ds_config=auto: no ZeRO layout fits {self.world_size} rank(s) of "
                                  f"{self.plan.cluster.gpu_memory / 1e9:.1f} GB (python -m trainer plan shows the terms); "
                                  "lower train.micro_batch_size or data.max_length, set train.activation_checkpointing, "
                                  "or use more GPUs")
            chosen = self.plan.option(self.plan.choice)
            self.ds_config_file = chosen.ds_config
            self.print(f"distributed.ds_config=auto: {chosen.layout} ({chosen.ds_config}), the least communication "
                       f"that fits: planned {chosen.total / 1e9:.1f} of {self.plan.cluster.gpu_memory / 1e9:.1f} GB per "
                       f"rank, {chosen.communication / 1e9:.2f} GB sent per optimizer step")
        self.ds_config = build_ds_config(cfg, self.world_size, training, self.ds_config_file)
        self.zero_stage = self.ds_config["zero_optimization"].get("stage", 0)
        self.engine = None
        self._hf_ds_config = None

    def describe(self):
        out = {"strategy": "deepspeed", "ds_config": self.ds_config_file, "zero_stage": self.zero_stage}
        hpz = self.ds_config["zero_optimization"].get("zero_hpz_partition_size")
        if hpz:
            out["zero_hpz_partition_size"] = hpz
        if self.plan is not None:
            chosen = self.plan.option(self.plan.choice)
            out.update(choice=self.plan.choice, plan=self.plan.to_dict(),
                       planned_bytes_per_rank=chosen.total, planned_sent_per_step=chosen.communication)
        return out

    def barrier(self):
        import torch.distributed as dist

        dist.barrier()

    def close(self):
        # Without this, gloo's worker threads can outlive the interpreter's teardown and abort the
        # process ("terminate called without an active exception") after a successful run. Only
        # called once every rank got here (never after an error: a rank still in a collective
        # would leave the others waiting in the barrier).
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce(self, metrics, op="sum"):
        import torch.distributed as dist

        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        if op == "mean":
            t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def all_sum(self, t):
        import torch.distributed as dist

        out = t.to(self.device).clone()
        dist.all_reduce(out)
        return out.cpu()

    def load_base_model(self, folder, hf_config, dtype, trust_remote_code=False):
        if self.zero_stage != 3:
            return super().load_base_model(folder, hf_config, dtype, trust_remote_code)
        from transformers.integrations import HfDeepSpeedConfig

        from .partitioned import build_partitioned

        # Each rank builds the model partitioned and reads only its own slices of the checkpoint.
        model = build_partitioned(folder, hf_config, dtype, self.ds_config, trust_remote_code)
        # Kept alive afterwards: transformers' generation and utilities then know ZeRO-3 is on.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return model

    def setup(self, model, optimizer, scheduler, cfg):
        import deepspeed

        if optimizer is None:  # inference: ZeRO-3 still has to install its gather hooks
            self.engine, *_ = deepspeed.initialize(model=model, config=self.ds_config, dist_init_required=False)
            return self.engine
        if "offload_optimizer" in self.ds_config["zero_optimization"]:
            # The fp32 masters and Adam state live in CPU memory: torch's fused CPU AdamW steps them. DeepSpeed's
            # CPU Adam is about as fast on adapters (docs/benchmarks/step-cost.md) but is compiled on first use:
            # minutes, and a compiler on every node.
            groups = [{"params": g["params"], "lr": g["initial_lr"], "weight_decay": g["weight_decay"]}
                      for g in optimizer.param_groups]
            optimizer = torch.optim.AdamW(groups, fused=True)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
        fp32 = ([(p, p.detach().clone()) for g in optimizer.param_groups for p in g["params"]]
                if self.ds_config["bf16"]["enabled"] or self.ds_config["fp16"]["enabled"] else [])
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config, dist_init_required=False)
        _keep_fp32_masters(fp32)
        return self.engine

    def lr(self):
        return self.engine.get_lr()[-1]

    def run(self, model, entry, *args, **kwargs):
        # Through the engine once it exists: its root-module hooks restart ZeRO-3's prefetch order at every pass.
        if self.engine is not None and self.engine.module is model:
            return self.engine(*args, entry=entry, **kwargs)
        return model(*args, entry=entry, **kwargs)

    def stop_requested(self):
        # Ranks receive the signal at different moments: agree on it so all stop at the same step.
        return self.all_reduce({"stop": float(super().stop_requested())})["stop"] > 0

    @contextlib.contextmanager
    def main_first(self):
        if not self.is_main():
            self.barrier()
        try:
            yield
        finally:
            if self.is_main():
                self.barrier()

    def backward(self, loss):
        # engine.step() after every micro-batch: it counts micro-steps and only updates the
        # weights (with clipping and the LR schedule) at the accumulation boundary.
        self.engine.backward(loss)
        self.engine.step()

    def skipped_steps(self):
        return int(self.engine.skipped_steps)

    def optimizer_step(self):
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def full_tensors(self, named):
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        training = self.engine is not None and self.engine.optimizer is not None
        for key, p in named.items():
            # Trainable: the fp32 master value (not the bf16 working copy); frozen: the stored value.
            t = safe_get_full_fp32_param(p) if training and p.requires_grad else None
            if t is None:
                with self.gathered([p]):
                    t = p.detach().clone()
            out[key] = t.float().cpu()
        return out

    def gathered(self, params, modify=False):
        import deepspeed

        params = [p for p in params if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def local_numel(self, p):
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel(), p.ds_numel
        return p.numel(), p.numel()

    def save_checkpoint(self, folder, tag, client_state):
        # `latest` is written by the caller once every rank has finished: a kill mid-save leaves it on
        # the previous, complete checkpoint.
        with self._adapters_written_once():
            self.engine.save_checkpoint(str(folder), tag=tag, client_state=client_state,
                                        exclude_frozen_parameters=True, save_latest=False)

    @contextlib.contextmanager
    def _adapters_written_once(self):
        """Under ZeRO-3 every rank writes a model-states file (its client state: step, RNG), and each would
        hold the trained adapters whole: they are persistent, never-partitioned parameters, so 16 ranks
        would write 16 copies. A load restores them from the optimizer's fp32 partitions anyway
        (zero_optimization.load_from_fp32_weights, on by default), so ranks other than 0 leave them out."""
        if self.zero_stage != 3 or self.rank == 0 or not self.ds_config["zero_optimization"].get("load_from_fp32_weights", True):
            yield
            return
        self.engine.module_state_dict = lambda *args, **kwargs: {}
        try:
            yield
        finally:
            del self.engine.module_state_dict  # the engine's own method again

    def load_checkpoint(self, folder):
        if not (folder / "latest").is_file():
            return None
        path, client = self.engine.load_checkpoint(str(folder), load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{folder}: `latest` names a checkpoint DeepSpeed cannot read; delete the folder "
                                  "to restart the stage, or set train.resume=never")
        return client


def build_ds_config(cfg: Config, world_size: int, training: bool = True, ds_config: str | None = None) -> dict:
    """The DeepSpeed config: ZeRO choices from `distributed.ds_config` (or the file `ds_config`, when
    `distributed.ds_config` is auto and the plan chose it), everything else from `cfg`.

    The one place where batch sizes, accumulation, clipping and precision enter DeepSpeed, with
    train_batch_size == micro * world * accum checked here.
    """
    name = cfg.distributed.ds_config if ds_config is None else ds_config
    path = find_ds_config(name)
    ds = read_ds_config(name)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("zero_hpz_partition_size") == "gpus_per_node":  # hpZ: a secondary copy of the base per node
        zero["zero_hpz_partition_size"] = local_world_size(world_size)
    # Evaluation takes no optimizer step: it runs on any number of ranks, whatever the global batch.
    micro, accum = cfg.train.micro_batch_size, cfg.train.accumulation(world_size) if training else 1
    filled = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": micro * accum * world_size, "gradient_clipping": cfg.train.max_grad_norm,
              "bf16": {"enabled": resolve_dtype(cfg.model) == torch.bfloat16},
              # float16: dynamic loss scaling (start at 2^16, halve on overflow and skip that step)
              "fp16": {"enabled": resolve_dtype(cfg.model) == torch.float16, "loss_scale": 0,
                       "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
    errors = []
    for key in FILLED_KEYS:
        if key in ds and key in filled and ds[key] != filled[key]:
            errors.append(f"'{key}' is {ds[key]!r} but the experiment config gives {filled[key]!r} "
                          f"(train.micro_batch_size={micro} x world {world_size} x accumulation {accum}); "
                          "remove it from the DeepSpeed config, it is filled in from the experiment config")
    if "optimizer" in ds or "scheduler" in ds:
        errors.append("'optimizer'/'scheduler' sections are not used: AdamW and the LR schedule come from train.*")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"zero_optimization.stage must be 0-3, got {stage!r}")
    if "offload_param" in zero and stage != 3:
        errors.append(f"zero_optimization.offload_param needs stage 3 (this file has stage {stage})")
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    ds.update(filled)
    ds.setdefault("zero_allow_untested_optimizer", True)  # the client optimizer is torch's AdamW
    if "offload_optimizer" in zero:
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also when offloaded (see setup)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    if cfg.distributed.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = cfg.distributed.param_persistence_threshold
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * world_size * ds["gradient_accumulation_steps"]
    return ds


# auto picks bfloat16 on a CPU for bases at least this wide: SmolLM2-135M (hidden 576) trains a MoE-CL step 1.3x
# faster in bfloat16 than in float32 on an AVX512-BF16 CPU (tools/bench_step.py), tiny test shapes run slower.
BF16_CPU_MIN_HIDDEN = 512


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls on this CPU (AVX512-BF16 or AMX), which make bf16 faster than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(model: ModelConfig) -> torch.dtype:
    """The base's dtype. auto: bfloat16 on a GPU; on a CPU bfloat16 where it is the faster, i.e. the CPU has
    native bf16 matmuls and the base's hidden size is at least BF16_CPU_MIN_HIDDEN, else float32."""
    if model.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model.dtype]
    if torch.cuda.is_available():
        return torch.bfloat16
    if not cpu_has_bf16():
        return torch.float32
    hidden = json.loads((resolve_model_path(model) / "config.json").read_text()).get("hidden_size", 0)
    return torch.bfloat16 if hidden >= BF16_CPU_MIN_HIDDEN else torch.float32


def local_world_size(world_size: int) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun, deepspeed), SLURM_NTASKS_PER_NODE (srun), else all of them."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return min(int(value), world_size)
    return world_size


def device_memory(device: torch.device, local_world: int) -> int:
    """Bytes one rank may use: its GPU's memory, or on a CPU host the memory available now shared by the
    node's ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available // local_world


def auto_plan(cfg: Config, world_size: int, device: torch.device, training: bool = True) -> Plan:
    """The memory and communication plan (trainer/plan.py) of this run on the ranks it was started with."""
    from transformers import AutoConfig


    local = local_world_size(world_size)
    if world_size % local:
        local = world_size
    hf = AutoConfig.from_pretrained(resolve_model_path(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    cluster = Cluster(world_size // local, local, device_memory(device, local), device.type)
    return plan_for(cfg, cluster, hf, torch.empty((), dtype=resolve_dtype(cfg.model)).element_size(),
                    None if training else 1)


def claim_local_gpu(env, visible: int) -> int:
    """This rank's GPU among the `visible` ones, written back to env["LOCAL_RANK"].

    LOCAL_RANK counts the ranks of a node (SLURM_LOCALID under srun), but `srun --gpus-per-task=1` shows
    each rank its own GPU alone, as device 0: the raw local rank 3 names a GPU that rank cannot see
    ("invalid device ordinal"). DeepSpeed reads LOCAL_RANK itself, so the reduced value must be in the
    environment before it starts."""
    if visible < 1:
        raise RuntimeError("CUDA is available but no GPU is visible to this rank (CUDA_VISIBLE_DEVICES?)")
    local = int(env.get("LOCAL_RANK", 0)) % visible
    env["LOCAL_RANK"] = str(local)
    return local


def launched() -> bool:
    """True under torchrun, the deepspeed launcher, or srun with several tasks (once `make_strategy` has
    set the variables from `srun_ranks`)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def srun_ranks(env) -> dict[str, str]:
    """Under a plain `srun` step of several tasks (one process per rank, no torchrun), the rendezvous
    variables that make each task one rank: rank and world from SLURM_PROCID and SLURM_STEP_NUM_TASKS,
    local rank from SLURM_LOCALID, and the master at the step's first node on a port derived from the job
    and step ids (MASTER_ADDR / MASTER_PORT, when set, are kept). Empty outside such a step: in a batch
    script itself, or in an srun step of one task (which may be torchrun starting the ranks itself)."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 0)
    if tasks <= 1 or "SLURM_PROCID" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   timeout=60, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise ConfigError(f"srun with {tasks} tasks: cannot find the step's first node (`scontrol show hostnames "
                              f"{nodes}` failed: {e}); set MASTER_ADDR, or launch with torchrun as "
                              "slurm/stage.sbatch does") from None
        out["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        job, step = (int(v) if v.isdigit() else 0 for v in (env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")))
        out["MASTER_PORT"] = str(20000 + (job * 16 + step) % 40000)
    return out


def make_strategy(cfg: Config | None = None, training: bool = False) -> Strategy:
    """The strategy for this process (see `distributed.strategy`); when `training`, it watches for stop
    signals (otherwise they keep their default effect: SIGTERM ends the process)."""
    if cfg is not None and not launched() and (srun := srun_ranks(os.environ)):
        if cfg.distributed.strategy == "local":
            raise ConfigError(f"distributed.strategy=local, but srun started {srun['WORLD_SIZE']} tasks: each would "
                              "train alone on the same run folder; use distributed.strategy=auto, or srun --ntasks=1")
        os.environ.update(srun)  # plain `srun python -m trainer ...` with several tasks: one rank per task
    if cfg is not None and (cfg.distributed.strategy == "deepspeed" or
                            (cfg.distributed.strategy == "auto" and launched())):
        strategy = DeepSpeedStrategy(cfg, training)
    else:
        if training and resolve_dtype(cfg.model) == torch.float16:
            raise ConfigError("model.dtype=float16: training in float16 needs DeepSpeed's dynamic loss scaling; set "
                              "distributed.strategy=deepspeed (or start under a launcher), or use bfloat16 / float32")
        strategy = LocalStrategy()
    if training:
        strategy.watch_stop_signals(checkpointing=cfg.train.checkpoint_every > 0)
    return strategy


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _single_process_env() -> None:
    """Without a launcher, DeepSpeed falls back to MPI discovery; describe a world of one instead."""
    if launched():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


class _Works:
    """The handles of several asynchronous collectives as one."""

    def __init__(self, works):
        self.works = works

    def wait(self, timeout=None):
        for w in self.works:
            w.wait()
        self.works = []  # a handle kept after its wait holds no collective (nor, through it, the process group)
        return True

    def is_completed(self):
        return all(w.is_completed() for w in self.works)


def _all_gather_by_broadcasts() -> None:
    """On gloo (CPU ranks), DeepSpeed's all-gathers (ZeRO-3's parameter fetches) run as one broadcast per
    rank: gloo's all-gather moves large shards several times slower than its broadcast does
    (`python tools/bench_gloo.py`, results/bench_gloo_cpu.txt). Same result, any process group."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    backend = ds_comm.cdb
    if getattr(backend, "gathers_by_broadcast", False):
        return
    original = backend.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if dist.get_backend(group) != "gloo" or not output_tensor.is_contiguous() or not input_tensor.is_contiguous():
            return original(output_tensor, input_tensor, group=group, async_op=async_op)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = output_tensor.view(-1).chunk(world)
        if parts[rank].data_ptr() != input_tensor.data_ptr():
            parts[rank].copy_(input_tensor.view(-1))
        works = [dist.broadcast(parts[r], src=dist.get_global_rank(group, r) if group is not None else r,
                                group=group, async_op=True) for r in range(world)]
        out = _Works(works)
        return out if async_op else out.wait()

    backend.all_gather_into_tensor = all_gather_into_tensor
    backend.gathers_by_broadcast = True


def _keep_fp32_masters(values: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Write trainable parameters' float32 values (taken before `deepspeed.initialize`) into their fp32
    master copies. Without ZeRO-3's partitioned base (ZeRO-0/1/2), bf16 makes DeepSpeed cast every module
    parameter to bf16 and only then build the masters from it: restored adapters (and new experts' init)
    would be rounded to bf16 at each stage start. ZeRO-3 casts nothing here (the dtype check skips it)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p, value in values:
        if p.dtype != value.dtype:
            safe_set_full_fp32_param(p, value)  # this rank's part of the master; the bf16 copy is already round(value)
