"""Full-size rehearsal on this machine: a 7B-shaped base sharded by ZeRO-3 over 2 CPU ranks, trained,
saved, killed, resumed and extracted, with per-rank memory measured throughout.

    python tools/rehearse.py [--out runs/rehearsal-7b] [--config configs/rehearsal_7b.yaml]
                             [--variants offload,activation_checkpointing] [--compare-uninterrupted]

Steps (each a real command, as a user runs it):
 1. `tools/make_base.py --reuse`: the Llama-2-7B-shaped random bf16 base (written once, ~2.5 min, 13.5 GB).
 2. Stage 1 under `torchrun --standalone --nproc_per_node 2` (ZeRO-3, `ds_configs/zero3_lowmem.json`).
 3. Stage 2 from stage 1's output; SIGKILL of the launcher and every rank as soon as its first mid-stage
    checkpoint is complete; then the same command again, which resumes from it and finishes the stage.
 4. `python -m trainer extract` of stage 2's expert as a PEFT adapter, then `PeftModel.from_pretrained`
    of it on the 7B-shaped base (one process, bf16) and a forward pass.
 5. Stage 1 again in one process holding the whole base (`distributed.strategy=local`, OMP threads = ranks x
    threads per rank): the same rows per optimizer step; `zero3_over_local` is ZeRO-3's median step over its.
 6. Variants (stage 1 only, fewer steps): without activation checkpointing; `ds_configs/zero3_offload.json`.
 7. With --compare-uninterrupted: stage 2 again without the kill; the largest adapter difference.

Memory is sampled every 0.2 s from /proc/<pid>/status of every rank (RssAnon: the process's own
memory; RssFile: mapped file pages, e.g. the memory-mapped checkpoint, reclaimable by the kernel;
RssShmem: shared memory) and VmHWM (the kernel's peak RSS), per rank and per phase of the trainer's
output (load, baseline evaluation, training, evaluation, save). Results go to OUT/rehearsal.json; the
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The trainer's progress lines that start a phase: the base is loaded when "stage K/N:" appears.
PHASES = (("stage ", "setup"), ("evaluating", "evaluate"), ("training ", "train"), ("saving stage", "save"))
PROGRESS = re.compile(r"^step \d+/\d+ of stage ")  # the trainer's progress lines when not on a terminal
# Stage-1 variants measured beside the rehearsal config (which has activation checkpointing on).
VARIANTS = {"offload": ["distributed.ds_config=ds_configs/zero3_offload.json"],
            "no_activation_checkpointing": ["train.activation_checkpointing=false"],
            "zero3_default": ["distributed.ds_config=ds_configs/zero3.json"]}
STATUS_KEYS = ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS")


# -- measuring processes ------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, frontier = _children(), [pid], [pid]
    while frontier:
        frontier = [c for p in frontier for c in tree.get(p, [])]
        out += frontier
    return out


def status(pid: int) -> dict[str, int] | None:
    """The memory lines of /proc/<pid>/status, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(value.split()[0]) * 1024
    return out


def rank_of(pid: int) -> str | None:
    """'rank0', 'rank1', ... for a trainer rank (RANK in its environment), 'process' for a plain python tool."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return None
    if b"torch.distributed.run" in cmd:
        return None  # the launcher
    if b"RANK" in env and b"LOCAL_RANK" in env:
        return f"rank{int(env[b'RANK'])}"
    return "process" if b"python" in cmd[0] else None


class Monitor(threading.Thread):
    """Peak memory per rank and per phase of a running command's process tree."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.phase = "load"
        self.peaks: dict[str, dict[str, dict[str, int]]] = {}  # rank -> phase -> key -> bytes
        self.hwm: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in descendants(self.pid):
                who = rank_of(pid)
                st = status(pid) if who else None
                if not st:
                    continue
                phase = self.peaks.setdefault(who, {}).setdefault(self.phase, {})
                for key, value in st.items():
                    phase[key] = max(phase.get(key, 0), value)
                self.hwm[who] = max(self.hwm.get(who, 0), st.get("VmHWM", 0))
            self.stop.wait(self.interval)


def run(cmd: list[str], log: Path, env: dict, kill_when: Path | None = None) -> dict:
    """Run `cmd`, echoing and logging its output, tagging memory samples with the trainer's phase.

    With `kill_when`, the whole process tree is SIGKILLed as soon as that file exists."""
    print("$ " + " ".join(a if len(a) < 200 else a.split("\n", 2)[1] + " ..." for a in cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        monitor = Monitor(proc.pid)
        monitor.start()
        killed = False

        def watch():
            nonlocal killed
            while proc.poll() is None and kill_when is not None:
                if kill_when.exists():
                    kill_tree(proc.pid)
                    killed = True
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for line in proc.stdout:
            logf.write(line)
            if PROGRESS.search(line):
                continue  # progress bars: in the log file only
            monitor.phase = phase_of(line, monitor.phase)
            print("  " + line.rstrip(), flush=True)
        proc.wait()
        watcher.join()
        monitor.stop.set()
        monitor.join()
    return {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1), "killed": killed,
            "peak_rss_bytes": monitor.hwm, "by_phase": monitor.peaks}


def phase_of(line: str, current: str) -> str:
    """The phase a trainer output line starts ("load" until the stage header), or `current`."""
    for prefix, phase in PHASES:
        if line.startswith(prefix) and (prefix != "stage " or line.split(":")[0].count("/") == 1):
            return "baseline_eval" if phase == "evaluate" and "untrained" in line else phase
    return current


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the rehearsal --------------------------------------------------------------------------------------

def trainer_cmd(args, verb: str, *extra: str, launcher: bool = True) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"] \
        if launcher else [sys.executable]
    return head + ["-m", "trainer", verb, *extra]


def stage_overrides(args, run_dir: Path, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", f"model.path={args.base}", f"data.cache_dir={args.out / 'cache'}",
            *args.overrides, *extra]


def manifest(run_dir: Path, k: int, task: str) -> dict:
    return json.loads((run_dir / "stages" / f"{k}-{task}" / "stage.json").read_text())


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def check(result: dict, what: str) -> None:
    if result["returncode"] != 0:
        raise SystemExit(f"error: {what} failed (exit {result['returncode']}); see the log above")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "rehearsal-7b")
    p.add_argument("--config", default="configs/rehearsal_7b.yaml")
    p.add_argument("--shape", default="llama2-7b", help="tools/make_base.py shape (default: llama2-7b)")
    p.add_argument("--base", type=Path, default=None,
                   help="base folder (default: ~/.cache/moe-cl/models/<shape>-random, written once); a real model "
                        "folder (not written by tools/make_base.py) is used as it is")
    p.add_argument("--layers", type=int, default=None, help="tools/make_base.py --layers (a shallower base)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--variants", default="offload",
                   help=f"stage-1 variants to measure beside the config: {', '.join(VARIANTS)} ('' for none)")
    p.add_argument("--variant-steps", type=int, default=2)
    p.add_argument("--compare-uninterrupted", action="store_true",
                   help="also run stage 2 without the kill and report the largest adapter difference")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every stage, e.g. data.max_length=256")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.base = (args.base or Path(f"~/.cache/moe-cl/models/{args.shape}-random")).expanduser()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "rehearsal.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    order, steps, every = cfg.data.order, cfg.train.max_steps, cfg.train.checkpoint_every
    if len(order) < 2 or not steps or not every or every >= steps:
        raise SystemExit(f"{args.config}: the rehearsal needs 2+ tasks, train.max_steps and "
                         f"0 < train.checkpoint_every < train.max_steps")
    results: dict = {"config": args.config, "base": str(args.base)}

    if (args.base / "config.json").is_file() and not (args.base / "moe_cl_synthetic.json").is_file():
        print(f"using the model at {args.base} as it is (not written by tools/make_base.py)", flush=True)
    else:
        layers = ["--layers", str(args.layers)] if args.layers else []
        base = run([sys.executable, "tools/make_base.py", "--shape", args.shape, *layers, "--out", str(args.base),
                    "--reuse"], log, env)
        check(base, "writing the base")
        results["make_base"] = base
    run_dir = args.out / "run"
    cfgs = [args.config]

    # Stage 1, then stage 2 killed after its first mid-stage checkpoint, then resumed.
    s1 = run(trainer_cmd(args, "stage", *cfgs, "--stage", "1", *stage_overrides(args, run_dir)), log, env)
    check(s1, "stage 1")
    ckpt = run_dir / "checkpoints" / f"2-{order[1]}"
    stage2 = trainer_cmd(args, "stage", *cfgs, "--stage", "2", *stage_overrides(args, run_dir))
    killed = run(stage2, log, env, kill_when=ckpt / "latest")
    if not killed["killed"]:
        raise SystemExit("error: stage 2 ended before a mid-stage checkpoint was written; raise train.max_steps")
    tag = (ckpt / "latest").read_text().strip()
    checkpoint_bytes = dir_bytes(ckpt / tag)
    resumed = run(stage2, log, env)
    check(resumed, "the resumed stage 2")
    m1, m2 = manifest(run_dir, 1, order[0]), manifest(run_dir, 2, order[1])

    # The expert leaves as a PEFT adapter and loads on the 7B-shaped base.
    peft_dir = args.out / f"peft-{order[1]}"
    extract = run(trainer_cmd(args, "extract", str(run_dir), "--expert", order[1], "--out", str(peft_dir),
                              launcher=False), log, env)
    check(extract, "extract")
    peft = run([sys.executable, "-c", PEFT_CHECK, str(args.base), str(peft_dir)], log, env)
    check(peft, "PeftModel.from_pretrained on the extracted expert")
    peft_result = json.loads((peft_dir.parent / "peft_check.json").read_text())
    # The expert folded into the base, streamed shard by shard in the base's dtype (then deleted: 13.5 GB).
    merged_dir = args.out / f"merged-{order[1]}"
    merge = run(trainer_cmd(args, "merge", str(run_dir), "--expert", order[1], "--out", str(merged_dir),
                            launcher=False), log, env)
    check(merge, "merge --expert")
    merge["output_bytes"] = dir_bytes(merged_dir)
    shutil.rmtree(merged_dir, ignore_errors=True)

    # The same rows through one process holding the whole base (the `local` strategy, every core): the
    # reference a ZeRO-3 step is measured against, in this same run.
    ldir = args.out / "local"
    shutil.rmtree(ldir, ignore_errors=True)
    local = run(trainer_cmd(args, "stage", *cfgs, "--stage", "1", *stage_overrides(
        args, ldir, "distributed.strategy=local", "train.checkpoint_every=0", "data.max_eval_examples=2",
        "eval.val=false"), launcher=False), log, dict(env, OMP_NUM_THREADS=str(args.ranks * int(env["OMP_NUM_THREADS"]))))
    check(local, "stage 1 in one process (local strategy)")
    m_local = manifest(ldir, 1, order[0])

    variants = {}
    for name in [v for v in args.variants.split(",") if v]:
        extra = VARIANTS[name]
        vdir = args.out / f"variant-{name}"
        r = run(trainer_cmd(args, "stage", *cfgs, "--stage", "1", *stage_overrides(
            args, vdir, f"train.max_steps={args.variant_steps}", "train.checkpoint_every=0",
            "data.max_eval_examples=2", *extra)), log, env)
        check(r, f"variant {name}")
        variants[name] = summary(r, manifest(vdir, 1, order[0]))

    if args.compare_uninterrupted:
        results["uninterrupted"] = compare_uninterrupted(args, run_dir, order, log, env)

    res1, res2 = m1["resources"], m2["resources"]
    ranks = sorted(k for k in s1["peak_rss_bytes"] if k.startswith("rank"))
    peaks = {r: max(x["peak_rss_bytes"].get(r, 0) for x in (s1, killed, resumed)) for r in ranks}
    figures = {
        "params_base": res1["base_params"], "world_size": res1["world_size"], "dtype": cfg.model.dtype,
        "base_bytes": res1["base_bytes"], "frozen_bytes_per_rank": res1["frozen_bytes_per_rank"],
        "peak_rss_bytes": [peaks[r] for r in ranks],
        "load_seconds": res1["load_seconds"], "load_seconds_stage2": res2["load_seconds"],
        "step_seconds": statistics.median(m1["train"]["step_seconds"]),
        "stage_save_seconds": res1["save_seconds"], "checkpoint_bytes": checkpoint_bytes,
        "resumed": bool(resumed["returncode"] == 0 and m2["train"]["resumed_at"] == every),
        "resumed_at": m2["train"]["resumed_at"], "adapter_params": m2["train"]["trainable_parameters"],
        "adapter_file_bytes": (run_dir / "stages" / f"2-{order[1]}" / "adapters.safetensors").stat().st_size,
        "peft_loaded": peft_result["loaded"], "extract_peak_rss_bytes": extract["peak_rss_bytes"].get("process"),
        "peft_load_peak_rss_bytes": peft["peak_rss_bytes"].get("process"),
        "merge_peak_rss_bytes": merge["peak_rss_bytes"].get("process"), "merge_seconds": merge["seconds"],
        "merge_output_bytes": merge["output_bytes"],
        "stage_wall_seconds": {"stage1": s1["seconds"], "stage2_killed": killed["seconds"],
                               "stage2_resumed": resumed["seconds"]},
        "variants": variants,
        "step_seconds_local": statistics.median(m_local["train"]["step_seconds"]),
        "local_peak_rss_bytes": local["peak_rss_bytes"].get("process"),
    }
    figures["zero3_over_local"] = round(figures["step_seconds"] / figures["step_seconds_local"], 3)
    planned = planned_memory(cfg, args)
    figures["planned"] = planned
    figures["measured_peak_over_planned"] = round(max(figures["peak_rss_bytes"]) / planned["total"], 3)
    results.update(figures=figures, stage1=summary(s1, m1), stage2_killed={k: killed[k] for k in ("seconds", "by_phase")},
                   stage2_resumed=summary(resumed, m2), local=summary(local, m_local), extract=extract,
                   peft=peft_result, merge=merge)
    (args.out / "rehearsal.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(figures, results)
    print(json.dumps(figures))
    return 0


def planned_memory(cfg, args) -> dict:
    """The memory model's bytes per rank (trainer/plan.py) for this config's own DeepSpeed config on this host."""
    import torch
    from transformers import AutoConfig

    from trainer.distributed import resolve_dtype
    from trainer.plan import Cluster, plan_for, read_ds_config

    zero = read_ds_config(cfg.distributed.ds_config).get("zero_optimization", {})
    layout = "zero2" if zero.get("stage") != 3 else "zero3_offload" if "offload_param" in zero else "zero3"
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    plan = plan_for(cfg, Cluster(1, args.ranks, total // args.ranks, "cpu"), AutoConfig.from_pretrained(args.base),
                    torch.empty((), dtype=resolve_dtype(cfg.model)).element_size(),
                    layouts={layout: cfg.distributed.ds_config})
    option = plan.option(layout)
    return {"layout": layout, "ds_config": cfg.distributed.ds_config, "total": option.total, "memory": option.memory}


def summary(r: dict, m: dict) -> dict:
    """Per-rank peaks by phase (GiB) and the stage's own timings."""
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    return {"seconds": r["seconds"], "peak_rss_gib": {k: gib(v) for k, v in r["peak_rss_bytes"].items()},
            "by_phase_gib": {who: {ph: {k: gib(v) for k, v in st.items() if k != "VmHWM"} for ph, st in phases.items()}
                             for who, phases in r["by_phase"].items()},
            "step_seconds_median": statistics.median(m["train"]["step_seconds"]) if m["train"]["step_seconds"] else None,
            "resources": m["resources"]}


def compare_uninterrupted(args, run_dir: Path, order: list[str], log: Path, env: dict) -> dict:
    """Stage 2 again, without the kill, from the same stage 1: the largest difference of the adapters."""
    from safetensors.torch import load_file

    other = args.out / "uninterrupted"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(run_dir / "stages" / f"1-{order[0]}", other / "stages" / f"1-{order[0]}")
    r = run(trainer_cmd(args, "stage", args.config, "--stage", "2", *stage_overrides(args, other)), log, env)
    check(r, "the uninterrupted stage 2")
    a = load_file(run_dir / "stages" / f"2-{order[1]}" / "adapters.safetensors")
    b = load_file(other / "stages" / f"2-{order[1]}" / "adapters.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"max_abs_diff": diff, "keys": len(a), "same_keys": a.keys() == b.keys(), "seconds": r["seconds"]}


def print_table(f: dict, results: dict) -> None:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"\nbase: {f['params_base'] / 1e9:.2f}B parameters, {gib(f['base_bytes'])} in {f['dtype']}, "
          f"{f['world_size']} ranks")
    for r, (share, peak) in enumerate(zip(f["frozen_bytes_per_rank"], f["peak_rss_bytes"])):
        print(f"rank {r}: holds {gib(share)} of the base ({share / f['base_bytes']:.3f}), peak RSS {gib(peak)} "
              f"(share + {gib(peak - share)})")
    for who, phases in results["stage1"]["by_phase_gib"].items():
        print(f"  stage 1 {who}: " + "; ".join(f"{ph} anon {st.get('RssAnon')} file {st.get('RssFile')}"
                                                 for ph, st in phases.items()))
    print(f"load {f['load_seconds']:.0f} s, median step {f['step_seconds']:.1f} s, save {f['stage_save_seconds']:.1f} s, "
          f"checkpoint {f['checkpoint_bytes'] / 1e6:.0f} MB, resumed at step {f['resumed_at']}: {f['resumed']}, "
          f"{f['adapter_params']:,} trainable parameters, PEFT load: {f['peft_loaded']}")
    print(f"extract peak RSS {gib(f['extract_peak_rss_bytes'])}, PEFT load on the base {gib(f['peft_load_peak_rss_bytes'])}, "
          f"merge --expert peak RSS {gib(f['merge_peak_rss_bytes'])} in {f['merge_seconds']:.0f} s "
          f"({f['merge_output_bytes'] / 1e9:.1f} GB written)")
    p = f["planned"]
    print(f"memory model ({p['ds_config']}): {gib(p['total'])} per rank; measured peak / planned: "
          f"{f['measured_peak_over_planned']:.2f} (" + ", ".join(f"{k} {gib(v)}" for k, v in p["memory"].items()) + ")")
    print(f"one process holding the whole base: median step {f['step_seconds_local']:.1f} s; ZeRO-3 over it: "
          f"{f['zero3_over_local']:.2f}x")
    if "uninterrupted" in results:
        u = results["uninterrupted"]
        print(f"resumed vs uninterrupted stage 2: largest adapter difference {u['max_abs_diff']:.3g} over {u['keys']} tensors")
    for name, v in f["variants"].items():
        print(f"variant {name}: median step {v['step_seconds_median']} s, peak RSS {v['peak_rss_gib']}")


PEFT_CHECK = r'''
import json, sys
from pathlib import Path
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, adapter = Path(sys.argv[1]), Path(sys.argv[2])
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, adapter)
saved = load_file(adapter / "adapter_model.safetensors")
state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
name = next(iter(saved))
loaded = next(v for k, v in state.items() if k.replace(".default", "") == name)
ids = AutoTokenizer.from_pretrained(base_dir)("What is the topic of this news article?", return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
result = {"loaded": bool(torch.equal(loaded.float(), saved[name].float()) and torch.isfinite(logits).all()),
          "lora_tensors": len(saved), "lora_modules_in_model": len(state) // 2, "logits_shape": list(logits.shape)}
(adapter.parent / "peft_check.json").write_text(json.dumps(result))
print(json.dumps(result))
'''


if __name__ == "__main__":
    sys.exit(main())
