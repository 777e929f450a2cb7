"""The GPU check: what anyone with one CUDA GPU runs first, in at most ten minutes.

    python tools/gpu_check.py [--device cuda|cpu] [--out DIR] [--skip-7b] [--layers 2,32] [--peak-tflops T]
    python tools/gpu_check.py --device cpu --write-reference results/gpu_check_reference_cpu.json

Each check prints a line as it goes; the last line printed is one JSON object with every figure and each
check's status (pass, fail, skip and why). Exit 0 only if every check that ran passed. Every training run is
a real `python -m trainer stage` command (as a user runs it) whose stage.json the check reads.

 1. environment: torch, CUDA, NCCL, the driver, the GPUs, bf16 support, DeepSpeed's ops (as `ds_report`;
    the trainer builds none of them: its optimizer is torch's AdamW).
 2. reference: stage 1 of configs/demo.yaml in bfloat16 (what `model.dtype: auto` picks on a GPU) against
    the CPU result kept in results/gpu_check_reference_cpu.json, which is float32 (exact arithmetic): the logged
    loss curve and every accuracy (untrained and after the stage) within the tolerances below.
 3. zero3: the tiny model (configs/tiny.yaml, float32) under DeepSpeed ZeRO-3 with one rank against the tiny
    CPU reference, within the float32 tolerances.
 4. base_<L>l: a Llama-2-7B-shaped random base from tools/make_base.py with L decoder layers (2, then 32 if the
    memory plan, host memory and disk allow), one stage per layout (local, ZeRO-2, ZeRO-3): step time,
    tokens/s, MFU and peak memory from stage.json; the first step's loss must agree between layouts.
 5. nccl: with 2 or more GPUs visible, the tiny run of check 3 on 2 ranks (torchrun, NCCL, ZeRO-3) against
    1 rank, within the float32 tolerances.

`--device cpu` runs the same on the CPU with small shapes, so the tool runs in the test suite: the tiny model
in check 2 (not the demo), make_base's `tiny` shape at 2 layers in check 4 (local and ZeRO-3), 1 rank; check 5
is skipped. `--write-reference` runs check 2's CPU runs (the demo and the tiny model) and writes their
figures, with the date, commit, machine and commands, as the reference.

Tolerances (a GPU's kernels round and accumulate in other orders than a CPU's, so no figure is bit-equal):
- Loss curve, bf16 against float32 (the demo): each logged task loss (a mean over train.log_every steps of the
  same rows on both devices) within BF16_LOSS_RTOL of the reference. bf16 keeps 8 significant bits (0.4% per
  rounding) of the frozen weights and of every activation, and a GPU sums in other orders; through 30 layers
  the logits move by a percent or so, and 30 Adam steps follow slightly different paths from there. 10% is
  several times that, and a fraction of the loss's fall over the stage (the reference file holds the curve),
  so a run that does not learn fails. Not yet measured on a GPU: tighten it from the first GPU runs (their
  JSON lines hold the worst ratio seen).
- Loss curve, float32 (the tiny model, ZeRO-3, NCCL): FP32_LOSS_RTOL; float32 rounding differences (1e-7
  per operation) stay far below it over the tiny model's 4 steps.
- Accuracy: each is a share of n test rows (40 per task in the demo). If the GPU's rounding changed which rows
  a model answers right as much as a fresh draw would, two runs' shares would differ with standard deviation
  sqrt(2 p (1 - p) / n) (0.11 at p = 0.5, n = 40); the tolerance is twice that (a 95% bound), with p the
  reference's share kept within [1/n, 1 - 1/n]. The runs are correlated far more than that, so a correct GPU
  passes; an untrained model (dbpedia 0.075 against the reference's 0.45 after the stage) does not. float32 runs: one
  row per task (a row whose two best answers tie to rounding may flip).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = REPO / "results" / "gpu_check_reference_cpu.json"
BF16_LOSS_RTOL = 0.10
FP32_LOSS_RTOL = 1e-3
FIRST_LOSS_RTOL = {"bfloat16": 0.02, "float32": 1e-4}  # first step's loss, one layout against another
# The reference runs: config file and overrides (run.dir, caches, dtype and strategy are added per run).
RUNS = {
    "demo": ("configs/demo.yaml", []),
    "tiny": ("configs/tiny.yaml", ["data.max_train_examples=32", "data.max_eval_examples=12", "train.log_every=1",
                                   "eval.val=false", "router.max_rows=64"]),
}
# The demo in float32 on a CPU (the reference: exact arithmetic; bf16 on a CPU without native bf16 matmuls
# is many times slower) and in bfloat16 on a GPU, as `model.dtype: auto` picks there; the tiny model in float32.
DTYPE = {("demo", "cpu"): "float32", ("demo", "cuda"): "bfloat16", ("tiny", "cpu"): "float32",
         ("tiny", "cuda"): "float32"}
ZERO3 = ["distributed.strategy=deepspeed", "distributed.ds_config=ds_configs/zero3.json",
         "distributed.param_persistence_threshold=0"]  # 0: the tiny model's parameters are really sharded
LAYOUTS = {"local": ["distributed.strategy=local"],
           "zero2": ["distributed.strategy=deepspeed", "distributed.ds_config=ds_configs/zero2.json"],
           "zero3": ["distributed.strategy=deepspeed", "distributed.ds_config=ds_configs/zero3.json"]}
# The 7B-shaped base's stage (cuda) and its small stand-in (cpu): shape, rows per step, steps, tokens per row.
BASE = {"cuda": {"shape": "llama2-7b", "batch": 4, "steps": 6, "max_length": 256, "dtype": "bfloat16"},
        "cpu": {"shape": "tiny", "batch": 2, "steps": 3, "max_length": 64, "dtype": "float32"}}
MARKER = ".gpu_check"


# -- running the trainer ------------------------------------------------------------------------------

class Runner:
    """Runs trainer commands under OUT, each in its own folder, and reads their stage.json."""

    def __init__(self, args):
        self.out, self.device, self.timeout = args.out, args.device, args.timeout
        self.common = [f"data.cache_dir={self.out / 'cache'}"] + (
            [f"model.cache_dir={args.model_cache}"] if args.model_cache else [])
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        TOKENIZERS_PARALLELISM="false")
        if args.peak_tflops is not None:
            self.env["MOE_CL_PEAK_TFLOPS"] = str(args.peak_tflops)

    def stage(self, name: str, config: str, overrides: list[str], ranks: int = 1) -> dict:
        """Stage 1 of `config` in OUT/name; returns its stage.json (with "seconds": the command's wall time),
        or raises CheckFailed with the output's tail."""
        folder = self.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                    if ranks > 1 else [sys.executable])
        cmd = launcher + ["-m", "trainer", "stage", config, "--stage", "1", f"run.dir={folder / 'run'}",
                          *self.common, *overrides]
        t0 = time.time()
        with open(folder / "log.txt", "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise CheckFailed(f"{name}: no result within {self.timeout} s (--timeout); see {folder / 'log.txt'}")
        if proc.returncode != 0:
            tail = (folder / "log.txt").read_text().splitlines()[-12:]
            raise CheckFailed(f"{name}: exit {proc.returncode}; see {folder / 'log.txt'}: " + " | ".join(tail))
        manifest = json.loads(next((folder / "run" / "stages").glob("1-*/stage.json")).read_text())
        shown = (["python"] if ranks == 1 else ["torchrun", "--standalone", f"--nproc_per_node={ranks}"]) + cmd[len(launcher):]
        return {**manifest, "seconds": round(time.time() - t0, 1), "command": " ".join(shown)}


class CheckFailed(Exception):
    """A check's run failed or its figures are out of tolerance (the message says which; a second argument:
    the figures gathered before it failed)."""


class Skipped(Exception):
    """A check that cannot run here (the message says why)."""


def figures(m: dict) -> dict:
    """What a check compares and reports of one stage.json."""
    perf = m["performance"]
    stage_memory = perf["peak_memory"].get("stage", {})
    steps = m["train"]["step_seconds"][1:] or m["train"]["step_seconds"]  # the first step warms up
    return {"logged_task_loss": m["train"]["logged_task_loss"], "test_accuracy": m["eval"]["test_accuracy"],
            "test_rows": m["eval"].get("test_rows"), "baseline": m["baseline"],
            "baseline_rows": m["eval"].get("baseline_rows"), "step_seconds": round(sorted(steps)[len(steps) // 2], 4),
            "tokens_per_s": perf["tokens_per_s"], "mfu": perf["mfu"], "mfu_reason": perf["mfu_reason"],
            "flops_per_token": perf["flops_per_token"]["total"],
            "peak_memory_gib": {k: round(max(v) / 2**30, 3) for k, v in stage_memory.items()},
            "evaluation_share": perf["time"]["evaluation_share"], "run_seconds": m["seconds"]}


# -- comparing --------------------------------------------------------------------------------------

def accuracy_tolerance(p: float, n: int) -> float:
    """Twice the standard deviation of the difference of two n-row shares around p (see the docstring)."""
    p = min(max(p, 1 / n), 1 - 1 / n)
    return 2 * math.sqrt(2 * p * (1 - p) / n)


def compare(run: dict, ref: dict, loss_rtol: float, rows_only: bool) -> dict:
    """Loss curve and accuracies of `run` against `ref`: the worst ratios to their tolerances, and every
    figure out of tolerance. rows_only: accuracies within one test row (float32), else the binomial bound."""
    problems, worst_loss = [], 0.0
    steps = [s for s, _ in run["logged_task_loss"]]
    if steps != [s for s, _ in ref["logged_task_loss"]]:
        problems.append(f"logged steps {steps} != the reference's {[s for s, _ in ref['logged_task_loss']]}")
    for (step, a), (_, b) in zip(run["logged_task_loss"], ref["logged_task_loss"]):
        ratio = abs(a - b) / abs(b) / loss_rtol
        worst_loss = max(worst_loss, ratio)
        if not ratio <= 1:
            problems.append(f"task loss at step {step}: {a:.4f} vs {b:.4f} (more than {loss_rtol:.0%} apart)")
    worst_acc = 0.0
    for kind, rows in (("baseline", "baseline_rows"), ("test_accuracy", "test_rows")):
        for task, b in ref[kind].items():
            a, n = run[kind].get(task), (ref.get(rows) or {}).get(task) or 1
            tol = 1 / n + 1e-9 if rows_only else accuracy_tolerance(b, n)
            ratio = abs(a - b) / tol if a is not None else math.inf
            worst_acc = max(worst_acc, ratio)
            if not ratio <= 1:
                problems.append(f"{kind} {task}: {a} vs {b} (tolerance {tol:.3f} over {n} rows)")
    return {"worst_loss_ratio": round(worst_loss, 4), "worst_accuracy_ratio": round(worst_acc, 4), "problems": problems}


def run_overrides(name: str, device: str) -> list[str]:
    """The reference run `name`'s overrides on `device` (its dtype included)."""
    return RUNS[name][1] + [f"model.dtype={DTYPE[name, device]}"]


def comparable_config(m: dict) -> dict:
    """The parts of a run's resolved config that decide its figures (not where it ran or wrote, nor the dtype,
    which differs between the devices by design)."""
    c = m["config"]
    return {"model": {"path": c["model"]["path"]}, "experts": c["experts"],
            "data": {k: v for k, v in c["data"].items() if k != "cache_dir"}, "train": c["train"], "eval": c["eval"],
            "router": c["router"]}


def against_reference(run: dict, reference: dict, name: str, loss_rtol: float, rows_only: bool) -> dict:
    """`run`'s figures against the reference run `name`; CheckFailed names every one out of tolerance."""
    ref = reference["runs"].get(name)
    if ref is None:
        raise CheckFailed(f"the reference file has no {name!r} run: regenerate it with --device cpu --write-reference")
    if comparable_config(run) != ref["config"]:
        raise CheckFailed("the reference was made with another config (configs/ or the tool changed): "
                          "regenerate it with --device cpu --write-reference")
    result = compare(figures(run), ref, loss_rtol, rows_only)
    if result["problems"]:
        raise CheckFailed("; ".join(result["problems"]))
    return result


# -- the checks -------------------------------------------------------------------------------------

def check_environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu": _cpu_name()}
    if torch.cuda.is_available():
        info["gpus"] = [{"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
                        for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]
        nccl = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        info["driver"] = _driver_version()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        from trainer.distributed import cpu_has_bf16

        info["cpu_native_bf16"] = cpu_has_bf16()
    info.update(_deepspeed_ops())
    if device == "cuda" and not info.get("gpus"):
        raise CheckFailed(f"no CUDA device visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                          "check CUDA_VISIBLE_DEVICES and the driver, or run --device cpu", info)
    return info


def _deepspeed_ops() -> dict:
    """DeepSpeed's version and which of its ops this machine could build (`ds_report`'s "compatible")."""
    import deepspeed
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    return {"deepspeed": deepspeed.__version__,
            "deepspeed_ops_compatible": {name: bool(b.is_compatible(verbose=False)) for name, b in ALL_OPS.items()}}


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    v = torch._C._cuda_getDriverVersion()  # the CUDA driver API's version, when nvidia-smi is missing
    return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def check_reference(runner: Runner, reference: dict, name: str) -> tuple[dict, dict]:
    """Check 2: the reference run `name` (demo or tiny) on this device against the repo's CPU figures."""
    run = runner.stage("reference", RUNS[name][0], run_overrides(name, runner.device) + ["distributed.strategy=local"])
    bf16 = DTYPE[name, runner.device] == "bfloat16"
    result = against_reference(run, reference, name, BF16_LOSS_RTOL if bf16 else FP32_LOSS_RTOL, not bf16)
    return {"run": name, "dtype": DTYPE[name, runner.device], **figures(run), **result}, run


def check_zero3(runner: Runner, reference: dict) -> tuple[dict, dict]:
    """Check 3: the tiny model under ZeRO-3 with one rank against the tiny CPU reference."""
    run = runner.stage("zero3", RUNS["tiny"][0], run_overrides("tiny", runner.device) + ZERO3)
    result = against_reference(run, reference, "tiny", FP32_LOSS_RTOL, True)
    return {**figures(run), "zero_stage": run["distributed"].get("zero_stage"), **result}, run


def check_nccl(runner: Runner, one_rank: dict | None) -> dict:
    """Check 5: the tiny ZeRO-3 run on 2 ranks (NCCL) against check 3's single rank."""
    if one_rank is None:
        raise CheckFailed("check 3 (the one-rank run to compare with) did not complete")
    run = runner.stage("nccl", RUNS["tiny"][0], run_overrides("tiny", runner.device) + ZERO3, ranks=2)
    result = compare(figures(run), figures(one_rank), FP32_LOSS_RTOL, True)
    if result["problems"]:
        raise CheckFailed("; ".join(result["problems"]))
    mine, theirs = figures(run), figures(one_rank)
    return {"world_size": run["world_size"], **mine, "one_rank_step_seconds": theirs["step_seconds"],
            "one_rank_tokens_per_s": theirs["tokens_per_s"], **result}


def base_overrides(device: str, folder: Path) -> list[str]:
    b = BASE[device]
    return [f"model.path={folder}", f"model.dtype={b['dtype']}", "data.order=[agnews]",
            f"data.max_length={b['max_length']}", f"data.max_train_examples={b['batch'] * b['steps']}",
            "data.max_eval_examples=4", f"train.micro_batch_size={b['batch']}", f"train.global_batch_size={b['batch']}",
            f"train.max_steps={b['steps']}", "train.log_every=1", "train.min_steps=0", "eval.val=false",
            "eval.batch_size=4", "router.max_rows=8", "experts.rank=8", "experts.alpha=16"]


def check_base(runner: Runner, args, layers: int) -> dict:
    """Check 4: one stage per layout on the 7B-shaped base (cpu: the tiny shape) with `layers` layers."""
    b = BASE[args.device]
    folder = args.base_dir / f"{b['shape']}-{layers}l-random"
    overrides = base_overrides(args.device, folder)
    fits = {}
    if args.device == "cuda":
        import torch

        fits = layouts_that_fit(overrides, layers, torch.cuda.get_device_properties(0).total_memory, _available_memory())
    layouts = [layout for layout in args.layouts if fits.get(layout, True)]
    if not layouts:
        raise Skipped(f"{b['shape']} at {layers} layers: no layout fits this GPU (python -m trainer plan) or the host memory")
    out = {"base": str(folder), "base_written_seconds": write_base(b["shape"], layers, folder)}
    if len(layouts) < len(args.layouts):
        out["skipped"] = {layout: "does not fit (the memory plan, or host memory to load the base)"
                          for layout in args.layouts if layout not in layouts}
    for layout in layouts:
        out[layout] = figures(runner.stage(f"base_{layers}l_{layout}", "configs/tiny.yaml", overrides + LAYOUTS[layout]))
    first = {layout: out[layout]["logged_task_loss"][0][1] for layout in layouts}
    rtol = FIRST_LOSS_RTOL[b["dtype"]]
    far = [f"{layout} {first[layout]:.5f} vs {layouts[0]} {first[layouts[0]]:.5f}" for layout in layouts[1:]
           if not abs(first[layout] - first[layouts[0]]) <= rtol * abs(first[layouts[0]])]
    if far:
        raise CheckFailed(f"the first step's loss differs between layouts by more than {rtol:g}: " + "; ".join(far), out)
    if "zero3" in out and layouts[0] != "zero3":
        out["zero3_step_time_ratio"] = round(out["zero3"]["step_seconds"] / out[layouts[0]]["step_seconds"], 3)
    return out


def write_base(shape: str, layers: int, folder: Path) -> float:
    """The random base of tools/make_base.py (bf16, seed 0), written unless already there; its seconds."""
    sys.path.insert(0, str(REPO / "tools"))
    import make_base
    from trainer.shapes import hf_config

    t0 = time.time()
    if make_base.is_written(folder, shape, "bfloat16", 0, 2 << 30, layers):
        return 0.0
    need = 2 * sum(size.numel() for _, size in make_base.tensor_specs(hf_config(shape, "bfloat16", layers)))
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    if need > shutil.disk_usage(parent).free:
        raise Skipped(f"{folder}: the base needs {need / 1e9:.1f} GB, {shutil.disk_usage(parent).free / 1e9:.1f} GB free "
                      "(--base-dir elsewhere)")
    make_base.write_base(shape, folder, "bfloat16", 0, 2 << 30, layers, log=lambda msg: None)
    return round(time.time() - t0, 1)


def layouts_that_fit(overrides: list[str], layers: int, gpu_memory: int, host_memory: int) -> dict[str, bool]:
    """Whether each layout's stage on the 7B-shaped base fits one GPU of `gpu_memory` bytes, by the trainer's
    memory plan (local as ZeRO-2: both hold the whole base), and for local the host's memory too (the local
    strategy reads the whole base into host memory before moving it to the GPU)."""
    from trainer.config import load_config
    from trainer.plan import Cluster, plan_for
    from trainer.shapes import hf_config

    cfg = load_config(REPO / "configs/tiny.yaml", [o for o in overrides if not o.startswith("model.path=")])
    hf = hf_config(BASE["cuda"]["shape"], "bfloat16", layers)
    plan = plan_for(cfg, Cluster(1, 1, gpu_memory, "cuda"), hf, 2, 1,
                    layouts={"zero2": "ds_configs/zero2.json", "zero3": "ds_configs/zero3.json"})
    fits = {o.layout: o.fits for o in plan.options}
    host = host_memory > 1.2 * plan.shape.base_params * 2
    return {"local": fits["zero2"] and host, "zero2": fits["zero2"], "zero3": fits["zero3"]}


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


# -- the tool ---------------------------------------------------------------------------------------

class Report:
    """Each check's status and figures; prints a line per check as it ends."""

    def __init__(self, total: int):
        self.checks: dict[str, dict] = {}
        self.total = total

    def run(self, name: str, fn, *args):
        """Run one check; returns its value (None if it failed)."""
        t0 = time.time()
        try:
            value = fn(*args)
        except CheckFailed as e:
            extra = e.args[1] if len(e.args) > 1 else {}
            self._record(name, {"status": "fail", "reason": e.args[0], **extra}, t0)
            return None
        except Skipped as e:
            self._record(name, {"status": "skip", "reason": e.args[0]}, t0)
            return None
        except Exception as e:  # a check's own error fails that check; the others still run and report
            traceback.print_exc()
            self._record(name, {"status": "fail", "reason": f"{type(e).__name__}: {e}"}, t0)
            return None
        figures_ = value[0] if isinstance(value, tuple) else value
        self._record(name, {"status": "pass", **figures_}, t0)
        return value

    def skip(self, name: str, reason: str) -> None:
        self._record(name, {"status": "skip", "reason": reason}, time.time())

    def _record(self, name: str, entry: dict, t0: float) -> None:
        entry["seconds"] = round(time.time() - t0, 1)
        self.checks[name] = entry
        print(f"[{len(self.checks)}/{self.total}] {name}: {entry['status']} ({entry['seconds']} s)"
              + (f": {entry['reason']}" if entry.get("reason") else f": {_summary(entry)}"), flush=True)

    @property
    def passed(self) -> bool:
        return all(c["status"] != "fail" for c in self.checks.values())


def _summary(entry: dict) -> str:
    """A check's headline figures, for its progress line."""
    keys = ("torch", "cuda_build", "nccl", "driver", "bf16_supported", "deepspeed", "step_seconds", "tokens_per_s",
            "mfu", "worst_loss_ratio", "worst_accuracy_ratio", "zero3_step_time_ratio")
    shown = {k: entry[k] for k in keys if k in entry}
    for layout in LAYOUTS:
        if isinstance(entry.get(layout), dict):
            shown[layout] = {k: entry[layout][k] for k in ("step_seconds", "tokens_per_s", "mfu", "peak_memory_gib")}
    return json.dumps(shown)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    prepare_out(args.out)
    runner = Runner(args)
    if args.write_reference:
        return write_reference(runner, args.write_reference)
    reference = json.loads(args.reference.read_text())
    depths = [] if args.skip_7b else args.layers
    later = ["reference", "zero3", *([f"base_{layers}l" for layers in depths] or ["base"]), "nccl"]
    report = Report(1 + len(later))
    env = report.run("environment", check_environment, args.device)
    if env is None:
        for name in later:
            report.skip(name, "the environment check failed")
    else:
        report.run("reference", check_reference, runner, reference, "demo" if args.device == "cuda" else "tiny")
        one_rank = report.run("zero3", check_zero3, runner, reference)
        for layers in depths:
            report.run(f"base_{layers}l", check_base, runner, args, layers)
        if not depths:
            report.skip("base", "--skip-7b")
        gpus = env.get("gpus", [])
        if args.device != "cuda" or len(gpus) < 2:
            report.skip("nccl", f"needs 2 or more GPUs ({len(gpus)} visible{', --device cpu' if args.device != 'cuda' else ''})")
        else:
            report.run("nccl", check_nccl, runner, one_rank[1] if one_rank else None)
    print(json.dumps({"gpu_check": "moe-cl", "device": args.device, "passed": report.passed,
                      "seconds": round(time.time() - t0, 1), "checks": report.checks}), flush=True)
    return 0 if report.passed else 1


def write_reference(runner: Runner, path: Path) -> int:
    """Run the reference runs on this CPU and write their figures to `path`."""
    runs = {}
    for name, (config, _) in RUNS.items():
        run = runner.stage(f"reference_{name}", config, run_overrides(name, "cpu") + ["distributed.strategy=local"])
        keep = ("logged_task_loss", "test_accuracy", "test_rows", "baseline", "baseline_rows", "step_seconds",
                "run_seconds")
        runs[name] = {"command": run["command"], "dtype": DTYPE[name, "cpu"], "config": comparable_config(run),
                      **{k: v for k, v in figures(run).items() if k in keep}}
        print(f"{name}: {json.dumps(runs[name]['logged_task_loss'])} {json.dumps(runs[name]['test_accuracy'])}", flush=True)
    import torch

    out = {"what": "tools/gpu_check.py's CPU reference: stage 1 of each run, local strategy, one process",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": _commit(), "tool_command": " ".join(["python", "tools/gpu_check.py", *sys.argv[1:]]),
           "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "torch": torch.__version__, "python": platform.python_version()},
           "runs": runs}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"reference": str(path), "runs": list(runs)}))
    return 0


def _commit() -> str | None:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() or None


def prepare_out(out: Path) -> None:
    """OUT holds this tool's runs only: a non-empty folder it did not make is refused, not emptied."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SystemExit(f"error: --out {out} exists and was not made by this tool (no {MARKER}); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("tools/gpu_check.py\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): the real check; cpu: the same on the CPU with small shapes")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="where the runs go (default runs/gpu-check)")
    p.add_argument("--skip-7b", action="store_true", help="skip check 4 (the 7B-shaped base)")
    p.add_argument("--layers", default=None,
                   help="check 4's depths of the base, in order, each skipped if it does not fit (default 2,32; cpu: 2)")
    p.add_argument("--layouts", default=None, help="check 4's layouts (default local,zero2,zero3; cpu: local,zero3)")
    p.add_argument("--base-dir", type=Path, default=Path("~/.cache/moe-cl/models"),
                   help="where check 4's random bases are written once and reused (default ~/.cache/moe-cl/models)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="one device's peak in TFLOP/s, for MFU on a GPU not in trainer/perf.py's table")
    p.add_argument("--model-cache", type=Path, default=None, help="model.cache_dir for the builtin models")
    p.add_argument("--reference", type=Path, default=REFERENCE, help="the CPU reference (default %(default)s)")
    p.add_argument("--write-reference", type=Path, default=None,
                   help="run the reference runs on this CPU (--device cpu) and write them to this file instead")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds one trainer command may take (default 900; with --write-reference 3600)")
    args = p.parse_args(argv)
    errors = []
    try:
        args.layers = [int(v) for v in (args.layers or ("2,32" if args.device == "cuda" else "2")).split(",")]
        if any(v < 1 for v in args.layers):
            raise ValueError
    except ValueError:
        errors.append(f"--layers {args.layers!r}: expected decoder-layer counts >= 1, e.g. 2,32")
    args.layouts = (args.layouts or ("local,zero2,zero3" if args.device == "cuda" else "local,zero3")).split(",")
    if any(layout not in LAYOUTS for layout in args.layouts):
        errors.append(f"--layouts {','.join(args.layouts)}: choose from {', '.join(LAYOUTS)}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        errors.append(f"--peak-tflops {args.peak_tflops}: expected one device's peak in TFLOP/s, a positive number")
    if args.write_reference and args.device != "cpu":
        errors.append("--write-reference: the reference is a CPU result; add --device cpu")
    if not args.write_reference and not args.reference.is_file():
        errors.append(f"--reference {args.reference}: no such file (make it with --device cpu --write-reference)")
    if args.timeout is None:
        args.timeout = 3600 if args.write_reference else 900
    if args.timeout <= 0:
        errors.append(f"--timeout {args.timeout}: expected seconds > 0")
    if errors:
        p.error("; ".join(errors))
    args.out, args.base_dir = args.out.expanduser().resolve(), args.base_dir.expanduser().resolve()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine (this process and the runs)
    return args


if __name__ == "__main__":
    sys.exit(main())
