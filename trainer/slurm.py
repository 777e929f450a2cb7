"""Submitting a continual-learning order to SLURM: one job per stage, chained with afterok.

Stages already complete (and built on their predecessor) are skipped, so resubmitting after a
failure continues the chain. Each job runs `slurm/stage.sbatch`, which starts one torchrun agent per
node with c10d rendezvous at the head node; SIGUSR1 before the walltime makes the trainer write a
checkpoint and the job requeue itself. `slurm.cpus_per_task` is asked of sbatch, and the script hands it
on to the srun step (`SRUN_CPUS_PER_TASK`: since Slurm 22.05 srun does not inherit it).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from . import atomic
from .checkpoint import RunDir
from .config import Config, ConfigError, dump_yaml

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPT = REPO / "slurm" / "stage.sbatch"


def sbatch_command(cfg: Config, k: int, config_file: Path, after: str | None, env_file: Path | None) -> list[str]:
    """The sbatch command line for stage k (after: the job id it depends on)."""
    sc, task = cfg.slurm, cfg.data.order[k - 1]
    ranks_per_node = sc.gpus_per_node or sc.procs_per_node
    logs = Path(cfg.run.dir).resolve() / "logs"
    env = {"MOECL_CONFIG": str(config_file), "MOECL_STAGE": str(k), "MOECL_NPROC_PER_NODE": str(ranks_per_node),
           "MOECL_PYTHON": sc.python or sys.executable,
           "MOECL_SHUTDOWN_TIMEOUT": str(max(30, sc.signal_seconds - 30)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
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
    return cmd + list(sc.extra) + [str(JOB_SCRIPT)]


def submit(cfg: Config, dry_run: bool = False) -> list[str]:
    """Submit every incomplete stage; returns the job ids in stage order (the commands when dry_run)."""
    run = RunDir(cfg.run.dir)
    order = cfg.data.order
    done = len(run.completed(order))
    if done == len(order):
        print(f"all {len(order)} stages of {run.root} are complete; nothing to submit", file=sys.stderr)
        return []
    folder = run.root.resolve() / "slurm"
    config_file, env_file = folder / "config.yaml", (folder / "env.sh" if cfg.slurm.setup else None)
    if not dry_run:
        (run.root / "logs").mkdir(parents=True, exist_ok=True)
        atomic.write_text(config_file, dump_yaml(cfg))  # the resolved config, overrides included
        if env_file is not None:
            atomic.write_text(env_file, "\n".join(cfg.slurm.setup) + "\n")
    if done:
        print(f"stages 1..{done} are complete; submitting {done + 1}..{len(order)}", file=sys.stderr)
    out, after = [], None
    for k in range(done + 1, len(order) + 1):
        cmd = sbatch_command(cfg, k, config_file, after, env_file)
        if dry_run:
            out.append(shlex.join(cmd))
            after = f"<job of stage {k}>"
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed for stage {k} (exit {proc.returncode}): {proc.stderr.strip()}\n"
                               f"jobs submitted so far: {out}")
        after = proc.stdout.strip().split(";")[0]
        out.append(after)
    return out

