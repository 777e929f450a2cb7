"""slurm/stage.sbatch run by bash outside SLURM: `srun` and `scontrol` are small scripts placed first
on PATH that record their arguments and environment, and the job environment is the one sbatch would
give the script for `trainer submit`'s command line. Checks what the launch line hands to srun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from trainer.config import load_config
from trainer.slurm import sbatch_command

from .conftest import REPO

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$RECORD_DIR/srun.args"
env -0 > "$RECORD_DIR/srun.env"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$RECORD_DIR/scontrol.args"
[ "$1 $2" = "show hostnames" ] && printf 'node1\\nnode2\\n'
exit 0
"""


def _run_job(tmp_path: Path, overrides: list[str]) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """Run the job script of `trainer submit`'s stage-1 sbatch command as sbatch would: its --export
    variables plus the SLURM_* ones for its --nodes and --cpus-per-task."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={tmp_path / 'run'}", *overrides])
    cmd = sbatch_command(cfg, 1, tmp_path / "config.yaml", None, None)
    opts = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env.update(kv.split("=", 1) for kv in opts["export"].split(",")[1:])  # after "ALL"
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", RECORD_DIR=str(tmp_path), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES=opts["nodes"], SLURM_NTASKS_PER_NODE="1")
    if "cpus-per-task" in opts:
        env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
    proc = subprocess.run(["bash", cmd[-1]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = (tmp_path / "srun.args").read_text().split("\0")[:-1]  # NUL-separated: the -c script has newlines
    seen = (tmp_path / "srun.env").read_text().split("\0")[:-1]
    return proc, args, dict(var.split("=", 1) for var in seen)


def test_srun_step_gets_the_jobs_cpus_per_task(tmp_path):
    proc, args, env = _run_job(tmp_path, ["slurm.cpus_per_task=6", "slurm.nodes=2", "slurm.procs_per_node=2"])
    assert env.get("SRUN_CPUS_PER_TASK") == "6"  # srun (Slurm >= 22.05) reads it; it does not inherit -c
    # The rest of the launch line: one torchrun per node, rendezvous at the head node, 2 ranks per node.
    assert args[0] == "--kill-on-bad-exit=1" and args[1:3] == ["bash", "-c"]
    assert args[4:] == [env["MOECL_PYTHON"], "2", f"node1:{20000 + 4242}", "270", str(tmp_path / "config.yaml"), "1"]
    assert "job 4242 stage 1: start on node[1-2] (2 node(s) x 2 rank(s)" in proc.stdout
    assert "end: stage complete" in proc.stdout


def test_without_cpus_per_task_srun_keeps_its_default(tmp_path):
    proc, args, env = _run_job(tmp_path, [])
    assert args and "SRUN_CPUS_PER_TASK" not in env
    assert not any(a.startswith(("--cpus-per-task", "-c")) for a in args[: args.index("bash")])
