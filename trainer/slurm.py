"""Submitting a continual-learning order to SLURM: one job per stage, chained with afterok.

Stages already complete (and built on their predecessor) are skipped, so resubmitting after a
failure continues the chain. Each job runs `slurm/stage.sbatch`, which starts one torchrun agent per
node with c10d rendezvous at the head node; SIGUSR1 before the walltime makes the trainer write a
checkpoint and the job requeue itself. `slurm.cpus_per_task` is asked of sbatch, and the script hands it
on to the srun step (`SRUN_CPUS_PER_TASK`: since Slurm 22.05 srun does not inherit it).

`submit` takes the run folder's lock for the chain (trainer/runlock.py): every job carries the chain's
id (MOECL_CHAIN) and takes the lock from the chain when it starts. The first job is submitted held and
released only once the lock names every job of the chain.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

from . import atomic
from .checkpoint import RunDir
from .config import Config, ConfigError, dump_yaml
from .runlock import RunLock, identity

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPT = REPO / "slurm" / "stage.sbatch"


def sbatch_command(cfg: Config, k: int, config_file: Path, after: str | None, env_file: Path | None,
                   chain: str = "") -> list[str]:
    """The sbatch command line for stage k (after: the job id it depends on; chain: the chain's lock id)."""
    sc, task = cfg.slurm, cfg.data.order[k - 1]
    ranks_per_node = sc.gpus_per_node or sc.procs_per_node
    logs = Path(cfg.run.dir).resolve() / "logs"
    env = {"MOECL_CONFIG": str(config_file), "MOECL_STAGE": str(k), "MOECL_NPROC_PER_NODE": str(ranks_per_node),
           "MOECL_PYTHON": sc.python or sys.executable,
           "MOECL_SHUTDOWN_TIMEOUT": str(max(30, sc.signal_seconds - 30)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MOECL_CHAIN": chain}
    if env_file is not None:
        env["MOECL_ENV_FILE"] = str(env_file)
    bad = [f"{k}={v}" for k, v in env.items() if "," in v]
    if bad:
        raise ConfigError(f"sbatch --export cannot carry commas: {bad}; use paths without ','")
    cmd = ["sbatch", "--parsable", f"--job-name={sc.job_name}-{k}-{task}", f"--nodes={sc.nodes}",
           "--ntasks-per-node=1", f"--time={sc.time}", f"--signal=B:USR1@{sc.signal_seconds}", "--requeue",
           "--open-mode=append", f"--output={logs}/stage-{k}-{task}-%j.out", f"--chdir={Path.cwd()}",
           "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())]
    if sc.gpus_per_node:
        cmd.append(f"--gpus-per-node={sc.gpus_per_node}")
    for flag, value in (("partition", sc.partition), ("account", sc.account), ("cpus-per-task", sc.cpus_per_task),
                        ("mem", sc.mem)):
        if value is not None:
            cmd.append(f"--{flag}={value}")
    if after is not None:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    elif chain:
        cmd.append("--hold")  # released once the run lock lists the chain's jobs
    return cmd + list(sc.extra) + [str(JOB_SCRIPT)]


def submit(cfg: Config, dry_run: bool = False) -> list[str]:
    """Submit every incomplete stage; returns the job ids in stage order (the commands when dry_run)."""
    sc = cfg.slurm
    cfg.train.accumulation(sc.nodes * (sc.gpus_per_node or sc.procs_per_node))  # before any job is queued
    run = RunDir(cfg.run.dir)
    order = cfg.data.order
    done = len(run.completed(order))
    if done == len(order):
        print(f"all {len(order)} stages of {run.root} are complete; nothing to submit", file=sys.stderr)
        return []
    folder = run.root.resolve() / "slurm"
    config_file, env_file = folder / "config.yaml", (folder / "env.sh" if cfg.slurm.setup else None)
    if done:
        print(f"stages 1..{done} are complete; submitting {done + 1}..{len(order)}", file=sys.stderr)
    if dry_run:
        out, after = [], None
        for k in range(done + 1, len(order) + 1):
            out.append(shlex.join(sbatch_command(cfg, k, config_file, after, env_file)))
            after = f"<job of stage {k}>"
        return out
    chain = uuid.uuid4().hex[:12]
    lock = RunLock(run.root, cfg.run.lock_stale_seconds)
    lock.acquire(lambda msg: print(msg, file=sys.stderr), {**identity("slurm-chain"), "chain": chain})
    out, after, ok = [], None, False
    try:
        (run.root / "logs").mkdir(parents=True, exist_ok=True)
        atomic.write_text(config_file, dump_yaml(cfg))  # the resolved config, overrides included
        if env_file is not None:
            atomic.write_text(env_file, "\n".join(cfg.slurm.setup) + "\n")
        for k in range(done + 1, len(order) + 1):
            proc = subprocess.run(sbatch_command(cfg, k, config_file, after, env_file, chain),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"sbatch failed for stage {k} (exit {proc.returncode}): {proc.stderr.strip()}")
            after = proc.stdout.strip().split(";")[0]
            out.append(after)
        lock.update(jobs=out)
        released = subprocess.run(["scontrol", "release", out[0]], capture_output=True, text=True)
        if released.returncode != 0:
            raise RuntimeError(f"scontrol release {out[0]} failed: {released.stderr.strip()}")
        ok = True
    finally:
        if not ok and out:
            subprocess.run(["scancel", *out], capture_output=True)
            print(f"cancelled the jobs submitted so far: {' '.join(out)}", file=sys.stderr)
        lock.release(success=ok, to_chain=ok)  # the chain's jobs take it from here
    return out
