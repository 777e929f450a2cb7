"""One writer per run folder: real processes racing for RUN_DIR/run.lock, stale locks of killed runs and
of silent hosts taken over, a lock taken away noticed, and the SLURM chain's hand-over rules.
(The chain on a real SLURM cluster is in test_slurm.py.)"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from trainer import runlock
from trainer.distributed import LocalStrategy
from trainer.runlock import LOCK, LockError, RunLock, identity

from .conftest import REPO, run_cli


def _overrides(tmp_path, model_cache, **extra) -> list[str]:
    o = {"run.dir": str(tmp_path / "run"), "model.cache_dir": str(model_cache), "data.cache_dir": str(tmp_path / "cache"),
         "train.log_every": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not printed: {''.join(seen)}\n{proc.stderr.read() if proc.poll() is not None else ''}")


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 100000, "data.order": "[agnews]"})
    first = _start("sequence", "configs/tiny.yaml", *o)
    try:
        _wait_for_line(first, "training agnews")
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["kind"] == "process"
        t0 = time.time()
        second = run_cli("sequence", "configs/tiny.yaml", *o, check=False)
        assert second.returncode == 2 and time.time() - t0 < 60
        assert f"pid {first.pid} on " in second.stderr and "in use by another run" in second.stderr
        assert holder["since"] in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)  # ends it at once, giving the lock up
        first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGINT
    assert not (tmp_path / "run" / LOCK).exists()


def test_the_lock_of_a_killed_run_is_taken_over_and_said_so(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 150, "data.order": "[agnews]"})
    first = _start("sequence", "configs/tiny.yaml", *o)
    _wait_for_line(first, "training agnews")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == first.pid  # left behind

    again = run_cli("sequence", "configs/tiny.yaml", *o, "train.max_steps=4")
    assert f"process {first.pid} on this host, is gone; taking the lock over" in again.stdout
    assert not (tmp_path / "run" / LOCK).exists()  # released at the end of a run

    # `report` on a folder another run holds prints the metrics without rewriting metrics.json.
    metrics = tmp_path / "run" / "metrics.json"
    metrics.write_text(metrics.read_text() + " ")  # marked: a rewrite would drop the mark
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        report = run_cli("report", str(tmp_path / "run"))
    finally:
        lock.release(success=True)
    assert "printing its metrics without rewriting metrics.json" in report.stderr and "ACC" in report.stdout
    assert metrics.read_text().endswith(" ")


def _foreign_lock(run_dir, age: float, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {**identity(), "host": "node-elsewhere", "pid": 4242, "pid_start": "1", "slurm_job_id": None, **fields}
    (run_dir / LOCK).write_text(json.dumps(holder))
    os.utime(run_dir / LOCK, (time.time() - age, time.time() - age))


def test_a_lock_from_another_host_is_kept_while_its_heartbeat_is_fresh(tmp_path):
    _foreign_lock(tmp_path, age=5)
    with pytest.raises(LockError, match=r"pid 4242 on node-elsewhere.*last heartbeat [0-9]+ s ago"):
        RunLock(tmp_path, stale_seconds=60).acquire()
    _foreign_lock(tmp_path, age=120)
    said = []
    lock = RunLock(tmp_path, stale_seconds=60)
    lock.acquire(said.append)
    assert said and "node-elsewhere has not refreshed it for 1" in said[0] and "taking the lock over" in said[0]
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release(success=True)
    assert not (tmp_path / LOCK).exists()


def _race(run_dir, start, results) -> None:
    start.wait()
    lock = RunLock(run_dir, stale_seconds=60)
    try:
        lock.acquire(lambda msg: None)
    except LockError:
        results.put(("lost", os.getpid(), None))
        return
    held_from = time.time()
    time.sleep(2)  # hold it while the others look
    held_to = time.time()
    lock.release(success=True)
    results.put(("won", os.getpid(), (held_from, held_to)))


def test_runs_racing_for_a_stale_lock_never_hold_it_together(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        _foreign_lock(tmp_path, age=3600)
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(tmp_path, start, results)) for _ in range(6)]
        for p in procs:
            p.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        held = sorted(span for outcome, _, span in outcomes if outcome == "won")
        assert held, (round_, outcomes)
        # a run may win after the first winner released, but never while another holds the lock
        assert all(b[0] >= a[1] for a, b in zip(held, held[1:])), (round_, outcomes)
        assert not (tmp_path / LOCK).exists()
        assert not list(tmp_path.glob(f".{LOCK}*"))  # no temporary or marker files left


def test_a_run_that_judged_a_lock_stale_late_leaves_the_new_holder_alone(tmp_path):
    _foreign_lock(tmp_path, age=3600)
    raw = (tmp_path / LOCK).read_bytes()
    first = RunLock(tmp_path, stale_seconds=60)
    first.acquire(lambda msg: None)
    held = (tmp_path / LOCK).read_bytes()
    late = RunLock(tmp_path, stale_seconds=60)
    assert not late._take_over(raw, identity())  # it read the stale lock before `first` replaced it
    assert (tmp_path / LOCK).read_bytes() == held
    with pytest.raises(LockError, match=f"pid {os.getpid()} on "):
        late.acquire()
    first.release(success=True)
    assert not list(tmp_path.glob(f".{LOCK}*"))


def test_a_takeover_that_stopped_half_way_is_named_with_what_to_delete(tmp_path):
    _foreign_lock(tmp_path, age=3600)
    raw = (tmp_path / LOCK).read_bytes()
    marker = tmp_path / f".{LOCK}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}"
    marker.write_text(json.dumps({**identity(), "host": "node-7", "pid": 977}))
    os.utime(marker, (time.time() - 600, time.time() - 600))
    with pytest.raises(LockError, match=r"takeover of this lock by pid 977 on node-7 stopped half-way 6[0-9]{2} s ago"):
        RunLock(tmp_path, stale_seconds=60).acquire()
    assert (tmp_path / LOCK).read_bytes() == raw and marker.exists()  # nothing removed behind the user's back


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_write(tmp_path):
    lock = RunLock(tmp_path, heartbeat_seconds=0.05)
    lock.acquire()
    _foreign_lock(tmp_path, age=0)  # another run took it (e.g. judged this one stale)
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LockError, match="taken over by .*pid 4242 on node-elsewhere"):
        lock.check()
    runlock._held = lock
    try:
        with pytest.raises(LockError, match="taken over"):
            runlock.check_held(LocalStrategy("cpu"))
    finally:
        runlock._held = None
    lock.release(success=True)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 4242  # not ours to remove


def test_a_slurm_chain_hands_the_lock_from_job_to_job(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "slurm_job_states", lambda jobs: {j: "PENDING" for j in jobs})
    submit = RunLock(tmp_path)
    submit.acquire(me={**identity("slurm-chain"), "chain": "c1"})
    submit.update(jobs=["101", "102"])
    submit.release(success=True, to_chain=True)
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["kind"] == "slurm-chain" and held["jobs"] == ["101", "102"]

    with pytest.raises(LockError, match="chain of SLURM jobs 101 102"):  # a local run, or another chain
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("MOECL_CHAIN", "c1")
    for job, restart in (("101", 0), ("101", 1), ("102", 0)):  # stage 1, stage 1 requeued, stage 2
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        said = []
        lock = RunLock(tmp_path)
        lock.acquire(said.append)
        assert "handed on by its SLURM chain" in said[0]
        lock.release(success=(job, restart) != ("101", 0))  # stage 1's first run stops for a requeue
        if job == "102":
            assert not (tmp_path / LOCK).exists()  # the chain's last job, done: nothing left
        else:
            assert json.loads((tmp_path / LOCK).read_text())["kind"] == "slurm-chain"


def test_while_a_job_takes_the_lock_over_a_run_starting_meanwhile_still_meets_a_lock(tmp_path, monkeypatch):
    """A takeover writes and syncs its new lock before it renames it over the old one, so the folder is
    never without a lock. (Seen in CI under load: with the sync inside a gap without a lock, a local run
    started meanwhile took the folder from the chain's first job.)"""
    monkeypatch.setattr(runlock, "slurm_job_states", lambda jobs: {j: "RUNNING" for j in jobs})
    submit = RunLock(tmp_path)
    submit.acquire(me={**identity("slurm-chain"), "chain": "c1"})
    submit.update(jobs=["101"])
    submit.release(success=True, to_chain=True)
    syncing, go_on, synced = threading.Event(), threading.Event(), []
    real_fsync = os.fsync

    def slow_fsync(fd):  # the job's second lock file (the first finds the chain's lock in place) syncs slowly
        if threading.current_thread().name == "job":
            synced.append(fd)
            if len(synced) == 2:
                syncing.set()
                go_on.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    job, me, said = RunLock(tmp_path), {**identity(), "chain": "c1", "slurm_job_id": "101"}, []
    taker = threading.Thread(target=job.acquire, args=(said.append, me), name="job")
    taker.start()
    try:
        assert syncing.wait(10)
        with pytest.raises(LockError, match="chain of SLURM jobs 101"):
            RunLock(tmp_path).acquire()
    finally:
        go_on.set()
        taker.join(10)
    assert "handed on by its SLURM chain" in said[0]
    assert json.loads((tmp_path / LOCK).read_text())["token"] == me["token"]
    job.release(success=True)
    assert not (tmp_path / LOCK).exists()


def test_a_requeued_job_takes_its_lock_back_and_a_finished_chain_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    _foreign_lock(tmp_path, age=0, slurm_job_id="77", slurm_restart=0)
    monkeypatch.setattr(runlock, "slurm_job_states", lambda jobs: {j: "RUNNING" for j in jobs})
    with pytest.raises(LockError, match="SLURM job 77"):  # another process of the same job run: refused
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job, requeued, on another node
    said = []
    RunLock(tmp_path).acquire(said.append)
    assert "left by this SLURM job's earlier run (restart 0)" in said[0]

    (tmp_path / LOCK).unlink()
    _foreign_lock(tmp_path, age=0, kind="slurm-chain", chain="old", jobs=["5", "6"])
    monkeypatch.setattr(runlock, "slurm_job_states", lambda jobs: {"5": "COMPLETED", "6": "CANCELLED"})
    said = []
    RunLock(tmp_path).acquire(said.append)
    assert "none of the SLURM chain's jobs is queued or running (5 COMPLETED, 6 CANCELLED)" in said[0]
