"""Submitting a continual-learning order to SLURM: one job per stage, chained with afterok.

Stages already complete (and built on their predecessor) are skipped, so resubmitting after a
failure continues the chain. Each job runs `slurm/stage.sbatch`, which starts one torchrun agent per
node with c10d rendezvous at the head node; SIGUSR1 before the walltime makes the trainer write a
checkpoint and the job requeue itself. `slurm.cpus_per_task` is asked of sbatch, and the script hands it
on to the srun step (`SRUN_CPUS_PER_TASK`: since Slurm 22.05 srun does not inherit it).

`submit` takes the run folder's lock for the chain (trainer/runlock.py): every job carries the chain's
id (MOECL_CHAIN) and takes the lock from the chain when it starts. The first job is submitted held and
released only once the lock names every job of the chain.

Before any sbatch, `submit` resolves the config's relative paths against the current folder (the jobs read
RUN_DIR/slurm/config.yaml with absolute paths) and runs the pre-flight checks of trainer/preflight.py, so a
typo in model.path or the data fails here and not after the queue wait. `--dry-run` prints the very sbatch
commands a real submit runs (the first one held, every one with the chain id), with placeholders for the
job ids SLURM has not given yet. An sbatch that fails is a SubmitError (exit 2) after the jobs already
queued are cancelled.
"""

from __future__ import annotations

import dataclasses
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


class SubmitError(Exception):
    """sbatch or scontrol refused a job; the message carries SLURM's own words."""


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


def submit(cfg: Config, dry_run: bool = False, check: bool = True) -> list[str]:
    """Submit every incomplete stage; returns the job ids in stage order (the sbatch commands when dry_run).
    The resolved paths, the pre-flight checks (skipped with check=False) and notes go to standard error."""
    sc = cfg.slurm
    cfg.train.accumulation(sc.nodes * (sc.gpus_per_node or sc.procs_per_node))  # before any job is queued
    order = cfg.data.order
    completed = RunDir(cfg.run.dir).completed(order)
    done = len(completed)
    if done == len(order):
        print(f"all {len(order)} stages of {Path(cfg.run.dir).resolve()} are complete; nothing to submit", file=sys.stderr)
        return []
    cfg, where = absolute_paths(cfg, completed[-1].manifest["config"]["model"]["path"] if completed else None)
    print("\n".join(where), file=sys.stderr)
    if check:
        from .preflight import check as preflight

        for line in preflight(cfg):
            print(f"checked {line}", file=sys.stderr)
    run = RunDir(cfg.run.dir)
    folder = run.root / "slurm"
    config_file, env_file = folder / "config.yaml", (folder / "env.sh" if cfg.slurm.setup else None)
    if done:
        print(f"stages 1..{done} are complete; submitting {done + 1}..{len(order)}", file=sys.stderr)
    chain = uuid.uuid4().hex[:12]
    if dry_run:
        out, after = [], None
        for k in range(done + 1, len(order) + 1):
            out.append(shlex.join(sbatch_command(cfg, k, config_file, after, env_file, chain)))
            after = f"<job of stage {k}>"
        print(f"a real submit also writes {config_file}, then runs `scontrol release <job of stage {done + 1}>` "
              "once the run lock lists the chain's jobs", file=sys.stderr)
        return out
    lock = RunLock(run.root, cfg.run.lock_stale_seconds)
    lock.acquire(lambda msg: print(msg, file=sys.stderr), {**identity("slurm-chain"), "chain": chain})
    out, after, ok = [], None, False
    try:
        (run.root / "logs").mkdir(parents=True, exist_ok=True)
        atomic.write_text(config_file, dump_yaml(cfg))  # the resolved config, overrides included
        if env_file is not None:
            atomic.write_text(env_file, "\n".join(cfg.slurm.setup) + "\n")
        for k in range(done + 1, len(order) + 1):
            proc = _slurm(sbatch_command(cfg, k, config_file, after, env_file, chain))
            if proc.returncode != 0:
                raise SubmitError(f"sbatch refused the job of stage {k} ({order[k - 1]}), exit {proc.returncode}: "
                                  f"{proc.stderr.strip() or proc.stdout.strip()}; fix what it says (often a slurm.* setting: "
                                  "partition, account, time, gpus_per_node, extra) and submit again")
            after = proc.stdout.strip().split(";")[0]
            out.append(after)
        lock.update(jobs=out)
        released = _slurm(["scontrol", "release", out[0]])
        if released.returncode != 0:
            raise SubmitError(f"scontrol release {out[0]} failed: {released.stderr.strip()}")
        ok = True
    finally:
        if not ok and out:
            subprocess.run(["scancel", *out], capture_output=True)
            print(f"cancelled the jobs submitted so far: {' '.join(out)}", file=sys.stderr)
        lock.release(success=ok, to_chain=ok)  # the chain's jobs take it from here
    return out


def absolute_paths(cfg: Config, recorded_model_path: str | None = None) -> tuple[Config, list[str]]:
    """The config with its relative paths made absolute from the current folder, as the jobs (started in it)
    would resolve them, and lines saying where each path and the nodes' Python point. `model.path` stays as
    written when the run's last complete stage recorded it so: the next stage checks that it is unchanged."""
    here = Path.cwd()

    def absolute(path: str) -> str:
        keep = not path or path.startswith(("~", "builtin:")) or Path(path).is_absolute()
        return path if keep else os.path.normpath(here / path)

    ds_config = cfg.distributed.ds_config
    if ds_config != "auto":
        from .plan import find_ds_config

        try:
            ds_config = str(find_ds_config(ds_config).resolve())
        except ConfigError:
            pass  # the pre-flight check reports it
    model_path = cfg.model.path if cfg.model.path == recorded_model_path else absolute(cfg.model.path)
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=absolute(cfg.run.dir)),
        model=dataclasses.replace(cfg.model, path=model_path, cache_dir=absolute(cfg.model.cache_dir)),
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root), cache_dir=absolute(cfg.data.cache_dir)),
        distributed=dataclasses.replace(cfg.distributed, ds_config=ds_config))
    lines = [f"paths as the jobs read them (relative ones resolved from {here}):"]
    lines += [f"  {name}: {value}" for name, value in (
        ("run.dir", cfg.run.dir), ("model.path", cfg.model.path), ("data.root", cfg.data.root),
        ("distributed.ds_config", cfg.distributed.ds_config))]
    lines.append(f"  python on the nodes: {cfg.slurm.python or sys.executable}"
                 + ("" if cfg.slurm.python else " (the one running submit; set slurm.python to choose another)"))
    return cfg, lines


def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a SLURM command; a missing command is a SubmitError, not a traceback."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError(f"{cmd[0]}: not found on PATH; run submit where SLURM's commands are (a login node), "
                          "or add --dry-run to see the commands") from None
