"""SLURM, for real: a local cluster of two emulated nodes (tests/slurm/cluster.sh), the real submit
command, chained stage jobs training across both nodes, failure and resubmission, and USR1 ->
checkpoint -> requeue -> resume.

Needs root (it installs and starts slurmctld, slurmd and munge). Elsewhere these tests are skipped,
unless MOECL_REQUIRE_SLURM=1 (CI) turns that into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import sha256_file

from .conftest import DATA, REPO, run_cli

pytestmark = pytest.mark.slurm
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = None
    if os.geteuid() != 0:
        reason = "the local SLURM cluster needs root"
    elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        reason = "no apt-get to install SLURM"
    if reason:
        if os.environ.get("MOECL_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    started = subprocess.run([str(CLUSTER), "start", "2"], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"cluster did not start:\n{started.stderr[-4000:]}")
    yield
    subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def _overrides(tmp_path, model_cache, **extra) -> list[str]:
    o = {"run.dir": str(tmp_path / "run"), "model.cache_dir": str(model_cache),
         "data.cache_dir": str(tmp_path / "cache"), "data.max_train_examples": 32, "data.max_eval_examples": 12,
         "distributed.param_persistence_threshold": 0, "experts.dropout": 0.0, "train.micro_batch_size": 4,
         "slurm.nodes": 2, "slurm.time": "00:15:00"}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _submit(*args: str) -> list[str]:
    out = run_cli("submit", "configs/tiny.yaml", *args)
    return out.stdout.split()


def _job(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(job_id: str, states: tuple[str, ...], timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(job_id)
        if job.get("JobState") in states:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {_job(job_id)}")


def _processes_naming(*texts: str) -> list[str]:
    """Command lines of this machine's processes that contain any of `texts`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if any(t in args for t in texts):
            found.append(args.strip())
    return found


def _log(tmp_path, pattern: str) -> str:
    logs = sorted((tmp_path / "run" / "logs").glob(pattern))
    return "".join(p.read_text() for p in logs)


def test_submit_dry_run_shows_the_chain(tmp_path, model_cache):
    cluster = {"slurm.partition": "gpu", "slurm.account": "proj42", "slurm.gpus_per_node": 4, "slurm.nodes": 3,
               "slurm.extra": "[--qos=high]"}
    # tiny.yaml's global batch of 8 rows cannot be split over 12 GPUs: refused before anything is queued
    bad = run_cli("submit", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, **cluster), "--dry-run", check=False)
    assert bad.returncode == 2 and "cannot be split over 12 rank(s) x train.micro_batch_size 4" in bad.stderr
    out = run_cli("submit", "configs/tiny.yaml", *_overrides(tmp_path, model_cache, **cluster, **{
        "train.global_batch_size": 96}), "--dry-run")
    cmds = [shlex.split(c) for c in out.stdout.splitlines()]
    assert len(cmds) == 2
    first, second = cmds
    for opt in ("--nodes=3", "--partition=gpu", "--account=proj42", "--gpus-per-node=4", "--qos=high", "--requeue",
                "--signal=B:USR1@300", "--ntasks-per-node=1", "--time=00:15:00", "--open-mode=append"):
        assert opt in first, opt
    assert not any(a.startswith("--dependency") for a in first)
    assert "--hold" in first and "--hold" not in second  # as a real submit: released once the lock lists the chain
    assert "--dependency=afterok:<job of stage 1>" in second and "--kill-on-invalid-dep=yes" in second
    export = next(a for a in second if a.startswith("--export="))
    assert "MOECL_STAGE=2" in export and "MOECL_NPROC_PER_NODE=4" in export
    assert re.search(r"MOECL_CHAIN=[0-9a-f]{12}(,|$)", export)
    assert first[-1].endswith("slurm/stage.sbatch")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_an_sbatch_failure_is_a_clear_error_and_queues_nothing(slurm_cluster, tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"slurm.partition": "no_such_partition", "slurm.job_name": "badpart"})
    proc = run_cli("submit", "configs/tiny.yaml", *o, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: sbatch refused the job of stage 1 (agnews)" in proc.stderr
    assert "invalid partition" in proc.stderr.lower()  # SLURM's own words
    assert proc.stdout == "" and not (tmp_path / "run" / "run.lock").exists()
    queued = subprocess.run(["squeue", "--noheader", "--format=%j"], capture_output=True, text=True, check=True).stdout
    assert "badpart" not in queued


def test_two_stage_sequence_across_two_nodes(slurm_cluster, tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache)
    jobs = _submit(*o)
    assert len(jobs) == 2 and all(j.isdigit() for j in jobs)
    assert _job(jobs[1])["Dependency"].startswith("afterok:" + jobs[0])
    # The chain holds the run folder: a second chain, or a local run, on it stops at once.
    lock = json.loads((tmp_path / "run" / "run.lock").read_text())
    assert lock["jobs"] == jobs and lock["chain"]
    second = run_cli("submit", "configs/tiny.yaml", *o, check=False)
    # (held by the chain while job 1 waits, then by job 1 itself: either way the chain is named)
    assert second.returncode == 2 and f"chain of SLURM jobs {jobs[0]} {jobs[1]}" in second.stderr, second.stderr
    local = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1", check=False)
    assert local.returncode == 2 and "in use by" in local.stderr
    for j in jobs:
        assert _wait(j, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))["JobState"] == "COMPLETED", _log(tmp_path, "*")
    assert not (tmp_path / "run" / "run.lock").exists()  # handed from job to job, removed by the last
    assert _log(tmp_path, "*").count("handed on by its SLURM chain") == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) >= {"tasks", "accuracy", "baseline", "ACC", "BWT", "FWT"}
    assert metrics["tasks"] == ["agnews", "yelp"] and len(metrics["accuracy"]) == 2
    manifest = json.loads((tmp_path / "run" / "stages" / "2-yelp" / "stage.json").read_text())
    assert manifest["world_size"] == 2  # one rank on each emulated node
    log = _log(tmp_path, f"stage-1-agnews-{jobs[0]}.out")
    assert f"job {jobs[0]} stage 1: start on node[1-2]" in log and f"job {jobs[0]} stage 1: end: stage complete" in log
    assert (tmp_path / "run" / "tb").is_dir()


def test_failed_stage_stops_the_chain_and_resubmission_continues(slurm_cluster, tmp_path, model_cache):
    data = tmp_path / "data"
    for task in ("agnews", "yelp", "amazon"):
        shutil.copytree(DATA / task, data / task)
    good = (data / "yelp" / "train.json").read_text()
    (data / "yelp" / "train.json").write_text(json.dumps(json.loads(good)[:3]))  # fewer rows than one batch
    o = _overrides(tmp_path, model_cache, **{"data.root": str(data), "data.order": "[agnews,yelp,amazon]"})
    jobs = _submit(*o)
    assert len(jobs) == 3
    assert _wait(jobs[0], ("COMPLETED", "FAILED"))["JobState"] == "COMPLETED"
    assert _wait(jobs[1], ("COMPLETED", "FAILED"))["JobState"] == "FAILED"
    assert _wait(jobs[2], ("PENDING", "CANCELLED"), timeout=60)["JobState"] in ("PENDING", "CANCELLED")
    assert "fewer than one global batch" in _log(tmp_path, f"stage-2-yelp-{jobs[1]}.out")
    assert not (tmp_path / "run" / "stages" / "3-amazon").exists()
    stage1 = {p.name: sha256_file(p) for p in (tmp_path / "run" / "stages" / "1-agnews").iterdir()}

    (data / "yelp" / "train.json").write_text(good)  # the cause, fixed
    resubmitted = run_cli("submit", "configs/tiny.yaml", *o)
    again = resubmitted.stdout.split()
    assert len(again) == 2  # stage 1 is complete and not redone
    assert "none of the SLURM chain's jobs is queued or running" in resubmitted.stderr  # the old chain's lock
    for j in again:
        assert _wait(j, ("COMPLETED", "FAILED", "CANCELLED"))["JobState"] == "COMPLETED", _log(tmp_path, "*")
    assert {p.name: sha256_file(p) for p in (tmp_path / "run" / "stages" / "1-agnews").iterdir()} == stage1
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy"]) == 3
    assert _submit(*o) == []  # nothing left to do


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(slurm_cluster, tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"data.order": "[agnews]", "train.max_steps": 60})
    [job] = _submit(*o)
    deadline = time.time() + 300
    while "training agnews" not in _log(tmp_path, "stage-1-agnews-*.out"):
        assert time.time() < deadline and _job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, "*")
        time.sleep(0.5)
    time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@T sends
    deadline = time.time() + 300
    while _job(job).get("Restarts", "0") == "0" or _job(job)["JobState"] not in ("PENDING", "RUNNING", "COMPLETED"):
        assert time.time() < deadline, _log(tmp_path, "*")
        time.sleep(0.5)
    # Slurm holds a requeued job for a while (BeginTime); a test need not wait for it, but it must let the
    # first run's processes finish exiting: a batch job started onto a node still tearing down its
    # previous run is killed ("Job credential revoked"), which Slurm's own hold normally prevents.
    # The nodes are emulated on this machine, so those processes are visible here: the trainer's (their
    # argv names the run folder) and the step daemons ("slurmstepd: [JOB.0]"); sinfo already says "idle"
    # while they exit.
    deadline = time.time() + 120
    while left := _processes_naming(str(tmp_path / "run"), f"slurmstepd: [{job}."):
        assert time.time() < deadline, f"the first run's processes did not exit: {left}"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    final = _wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    log = _log(tmp_path, "stage-1-agnews-*.out")
    assert final["JobState"] == "COMPLETED", (final, log[-3000:])
    assert int(final["Restarts"]) == 1
    assert "USR1: walltime near" in log and "requeueing" in log and "resuming from" in log
    assert log.count("handed on by its SLURM chain") == 2  # the requeued job took the lock back
    assert not (tmp_path / "run" / "run.lock").exists()
    manifest = json.loads((tmp_path / "run" / "stages" / "1-agnews" / "stage.json").read_text())
    assert 0 < manifest["train"]["resumed_at"] < 60

    # The same stage, uninterrupted, on 2 local ranks.
    clean = [a for a in o if not a.startswith("run.dir=")] + [f"run.dir={tmp_path / 'clean'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
           "stage", "configs/tiny.yaml", *clean, "--stage", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    a = load_file(tmp_path / "run" / "stages" / "1-agnews" / "adapters.safetensors")
    b = load_file(tmp_path / "clean" / "stages" / "1-agnews" / "adapters.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _trainer_rank(run_dir, rank: int) -> int | None:
    """Pid of the trainer process of `rank` working on `run_dir` (the nodes are emulated on this machine)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir) in args and "-m trainer stage" in args and "torch.distributed.run" not in args \
                and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_a_rank_killed_on_one_node_ends_the_job_and_the_resubmission_resumes(slurm_cluster, tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"data.order": "[agnews]", "train.max_steps": 24,
                                             "train.checkpoint_every": 2})
    [job] = _submit(*o)
    latest = tmp_path / "run" / "checkpoints" / "1-agnews" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-0000004"):
        assert time.time() < deadline and _job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, "*")
        time.sleep(0.2)
    pid = _trainer_rank(tmp_path / "run", 1)  # the rank on the second node
    assert pid is not None
    os.kill(pid, 9)
    t0 = time.time()
    final = _wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180)
    assert final["JobState"] == "FAILED" and time.time() - t0 < 120, (final, time.time() - t0)
    deadline = time.time() + 120
    while _processes_naming(str(tmp_path / "run"), f"slurmstepd: [{job}."):  # let the nodes finish tearing down
        assert time.time() < deadline
        time.sleep(0.2)
    assert not (tmp_path / "run" / "stages").exists()
    step = latest.read_text().strip()

    [again] = _submit(*o)
    final = _wait(again, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    log = _log(tmp_path, f"stage-1-agnews-{again}.out")
    assert final["JobState"] == "COMPLETED", log[-3000:]
    assert f"resuming from {latest.parent / step}" in log


def test_plain_srun_with_one_task_per_node_is_a_launcher(slurm_cluster, tmp_path, model_cache):
    """A user's own batch script with `srun python -m trainer stage ...` and 2 tasks (no torchrun): each
    task is one rank, they meet at the first node, and one 2-rank ZeRO-3 stage is trained."""
    script = tmp_path / "own.sbatch"
    o = _overrides(tmp_path, model_cache, **{"data.max_train_examples": 16, "data.max_eval_examples": 8,
                                              "eval.val": False, "router.max_rows": 16})
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
                      f"#SBATCH --output={tmp_path}/own-%j.out\n"
                      f"cd {REPO}\nsrun {sys.executable} -m trainer stage configs/tiny.yaml --stage 1 "
                      + " ".join(shlex.quote(x) for x in o) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                         check=True).stdout.strip().split(";")[0]
    state = _wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))["JobState"]
    log = "".join(p.read_text() for p in tmp_path.glob("own-*.out"))
    assert state == "COMPLETED", log[-4000:]
    manifest = json.loads((tmp_path / "run" / "stages" / "1-agnews" / "stage.json").read_text())
    assert manifest["world_size"] == 2
    assert (manifest["train"]["global_batch"], manifest["train"]["accumulation"]) == (8, 1)
    assert "| 2 rank(s) |" in log and log.count("stage 1 written to") == 1  # printed by rank 0 alone
