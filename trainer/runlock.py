"""One writer per run folder: `RUN_DIR/run.lock`.

A run that writes into RUN_DIR (`sequence`, `stage`, `report`, and `submit` for its chain of jobs)
holds the lock from before its first write until it exits; a second run on the same folder stops at
once with an error naming the holder. The lock works where `flock` may not (NFS, Lustre, several
nodes): the lock file is made by `os.link` of a complete temporary file, which is atomic and fails
if the lock exists, and it names its holder:

    {"token", "kind": "process" | "slurm-chain", "host", "pid", "pid_start", "slurm_job_id",
     "slurm_restart", "chain", "jobs", "command", "since"}

A holding process refreshes the file's mtime every HEARTBEAT_SECONDS and checks the token is still
its own (if another run took the lock over, this run stops before its next write). A lock is
taken over, and the takeover printed, when its holder is gone:

- a process on this host: its pid no longer runs (or runs another program, by start time);
- a process in a SLURM job that is no longer queued or running;
- a `slurm-chain` (written by `submit`) none of whose jobs is queued or running;
- otherwise, when its heartbeat is older than `run.lock_stale_seconds`.

Runs that find the same lock takeable at once race through a marker file named by the lock's content
(made by `os.link`, so only one run makes it); the one that makes it renames its own lock over the old
one, so the folder never lacks a lock meanwhile, and the others then find a live holder.

A SLURM chain hands the lock on: `submit` takes it for the chain (`MOECL_CHAIN` in every job's
environment), each stage job takes it from the chain and, on exit, gives it back to the chain unless
it was the chain's last job and succeeded. A requeued job (same SLURM job id) takes it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from . import atomic

LOCK = "run.lock"
HEARTBEAT_SECONDS = 30.0
TAKEOVER_WAIT_SECONDS = 30.0  # how long a run waits for another run's takeover of the same lock
ACTIVE_JOB_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                     "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


class LockError(RuntimeError):
    """The run folder is held by another run, or this run lost its lock."""


def identity(kind: str = "process") -> dict:
    """Who is taking the lock: this process (and its SLURM job and chain, if any)."""
    env = os.environ
    return {"token": uuid.uuid4().hex, "kind": kind, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()), "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_restart": int(env.get("SLURM_RESTART_COUNT") or 0), "chain": env.get("MOECL_CHAIN"),
            "jobs": [], "command": " ".join(["trainer", *sys.argv[1:3]]),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class RunLock:
    """The lock on one run folder, held by this process (`acquire` ... `release`)."""

    def __init__(self, run_dir: str | Path, stale_seconds: float = 600, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.root = Path(run_dir)
        self.path = self.root / LOCK
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.me: dict | None = None
        self.lost: str | None = None  # why this run no longer holds the lock (set by the heartbeat)
        self._created_root = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ---------------------------------------------------------------------

    def acquire(self, say=print, me: dict | None = None) -> None:
        """Take the lock (or raise LockError naming its holder); `say` prints a takeover."""
        self._created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        me = me or identity()
        deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
        while True:  # each round succeeds, fails, or finds another run taking the lock and looks again
            if self._create(me):
                break
            raw, holder, age = self._read()
            if raw is None:
                continue  # released meanwhile
            why = self._claim(holder, me, age)
            if why is None:
                raise LockError(self.describe(holder, age))
            if holder and me.get("chain") and holder.get("chain") == me["chain"]:
                me["jobs"] = holder.get("jobs") or []  # the chain's jobs: the last one removes the lock
            if self._take_over(raw, me):
                say(f"note: {self.path}: {why}; taking the lock over")
                break
            if time.monotonic() > deadline:
                raise LockError(f"{self.path}: could not take the lock: other runs keep taking it; try again")
            time.sleep(0.05)
        self.me = me
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self, success: bool, to_chain: bool | None = None) -> None:
        """Give the lock up: to the SLURM chain this job belongs to, unless it is the chain's last job and
        succeeded (`to_chain` decides instead when given); otherwise remove it (and RUN_DIR itself if
        this run created it and left it empty)."""
        if self.me is None:
            return
        self._stop.set()
        me, self.me = self.me, None
        _, holder, _ = self._read()
        if holder is None or holder.get("token") != me["token"]:
            return  # taken over meanwhile: not ours to remove
        jobs = holder.get("jobs") or []
        if to_chain is None:
            to_chain = bool(me.get("chain")) and not (success and jobs and jobs[-1] == me.get("slurm_job_id"))
        if to_chain:
            self._write_own({**holder, "kind": "slurm-chain", "token": uuid.uuid4().hex,
                             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._created_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only if empty

    def update(self, **fields) -> None:
        """Rewrite fields of this run's own lock (e.g. the jobs of a chain once they are submitted)."""
        _, holder, _ = self._read()
        if self.me is None or holder is None or holder.get("token") != self.me["token"]:
            raise LockError(f"{self.path}: this run no longer holds the lock")
        self.me.update(fields)
        self._write_own({**holder, **fields})

    def check(self) -> None:
        """Raise LockError if another run took this run's lock over (checked before each write)."""
        if self.lost:
            raise LockError(self.lost)

    # -- who may take it ----------------------------------------------------------------------------

    def _claim(self, holder: dict | None, me: dict, age: float) -> str | None:
        """Why `me` may take a lock held by `holder` (None: it may not)."""
        if holder is None:  # unreadable (edited by hand?): only once stale
            return f"unreadable lock, untouched for {age:.0f} s" if age > self.stale_seconds else None
        if me.get("chain") and holder.get("chain") == me["chain"] and holder.get("kind") == "slurm-chain":
            return None if me.get("kind") == "slurm-chain" else "handed on by its SLURM chain"
        job = me.get("slurm_job_id")
        if job and holder.get("slurm_job_id") == job and holder.get("kind") == "process":
            if holder.get("slurm_restart") != me.get("slurm_restart"):
                return f"left by this SLURM job's earlier run (restart {holder.get('slurm_restart')})"
        if holder.get("kind") == "slurm-chain" and holder.get("jobs"):
            states = slurm_job_states(holder["jobs"])
            if states is not None and not (set(states.values()) & ACTIVE_JOB_STATES):
                return f"none of the SLURM chain's jobs is queued or running ({_fmt_states(states)})"
            return None
        # A process (or a chain still being submitted by one).
        if holder.get("host") == socket.gethostname():
            if not _alive(holder.get("pid"), holder.get("pid_start")):
                return f"its holder, process {holder.get('pid')} on this host, is gone"
            return None
        if holder.get("slurm_job_id") and holder.get("kind") == "process":
            states = slurm_job_states([holder["slurm_job_id"]])
            if states is not None and not (set(states.values()) & ACTIVE_JOB_STATES):
                return f"its holder's SLURM job is no longer running ({_fmt_states(states)})"
        if age > self.stale_seconds:
            return f"its holder on {holder.get('host')} has not refreshed it for {age:.0f} s"
        return None

    def describe(self, holder: dict | None, age: float) -> str:
        if holder is None:
            return (f"{self.path} exists but is unreadable (refreshed {age:.0f} s ago); if no run uses {self.root}, "
                    f"delete it")
        if holder.get("kind") == "slurm-chain":
            jobs = holder.get("jobs") or []
            states = slurm_job_states(jobs)
            state = f" ({_fmt_states(states)})" if states else ""
            return (f"{self.root} is in use by a chain of SLURM jobs {' '.join(jobs) or '(being submitted)'}{state}, "
                    f"submitted from {holder.get('host')} at {holder.get('since')}. Wait for the chain to finish, "
                    f"cancel it (scancel {' '.join(jobs)}), or use another run.dir")
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        stop = f"scancel {holder['slurm_job_id']}" if holder.get("slurm_job_id") else f"kill {holder.get('pid')}"
        if holder.get("chain") and holder.get("jobs"):  # a stage job of a chain submitted by `submit`
            job += f" of the chain of SLURM jobs {' '.join(holder['jobs'])}"
            stop = f"scancel {' '.join(holder['jobs'])}"
        return (f"{self.root} is in use by another run: `{holder.get('command')}` (pid {holder.get('pid')} on "
                f"{holder.get('host')}{job}), holding it since {holder.get('since')}, last heartbeat {age:.0f} s ago. "
                f"Wait for it to finish, stop it ({stop}), or use another run.dir. If you are certain it is gone, "
                f"delete {self.path}")

    # -- the file -----------------------------------------------------------------------------------

    def _create(self, me: dict) -> bool:
        """Make the lock file from a complete temporary file, atomically; False if it exists."""
        tmp = self._temp(me)
        try:
            return self._link(tmp)
        finally:
            os.unlink(tmp)

    def _link(self, tmp: str, target: Path | None = None) -> bool:
        try:
            os.link(tmp, target or self.path)
            return True
        except FileExistsError:
            return False

    def _write_own(self, content: dict) -> None:
        atomic.write_json(self.path, content)

    def _temp(self, content: dict) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{LOCK}.tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            full = atomic.disk_full_error(e, self.path, "nothing was written")
            if full is None:
                raise
            raise full from e
        return tmp

    def _read(self) -> tuple[bytes | None, dict | None, float]:
        """(raw bytes, parsed holder or None if unreadable, seconds since the last heartbeat)."""
        try:
            raw = self.path.read_bytes()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None, 0.0
        try:
            holder = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = None
        return raw, holder if isinstance(holder, dict) else None, max(age, 0.0)

    def _take_over(self, raw: bytes, me: dict) -> bool:
        """Replace the lock judged takeable (exactly the one judged: `raw`) by `me`'s; False if another run is
        taking it over or has taken it. Several runs may judge the same lock at once. Only the run that
        creates this lock's takeover marker (named by its content) may replace it, and only while the lock
        is still `raw`; the marker goes once the lock is replaced, so a run that judged `raw` late finds the
        new lock. The lock file is never absent meanwhile, so no run can create one beside the new holder."""
        marker = self.root / f".{LOCK}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}"
        tmp = self._temp(me)
        try:
            if not self._link(tmp, marker):
                self._check_marker(marker)
                return False
            try:
                try:
                    if self.path.read_bytes() != raw:
                        return False  # changed since it was judged: judge the new one
                except FileNotFoundError:
                    return False
                os.rename(tmp, self.path)
                tmp = None
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _check_marker(self, marker: Path) -> None:
        """A takeover takes milliseconds: a marker older than TAKEOVER_WAIT_SECONDS was left by a run that
        died in the middle of one, and the lock it judged stays until someone removes both."""
        try:
            age = time.time() - marker.stat().st_mtime
            taker = json.loads(marker.read_bytes())
        except (OSError, ValueError):
            return
        if age > TAKEOVER_WAIT_SECONDS:
            who = f"pid {taker.get('pid')} on {taker.get('host')}" if isinstance(taker, dict) else "another run"
            raise LockError(f"{self.path}: a takeover of this lock by {who} stopped half-way {age:.0f} s ago "
                            f"(it left {marker}). If no run uses {self.root}, delete both files")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            _, holder, _ = self._read()
            me = self.me
            if me is None:
                return
            if holder is None or holder.get("token") != me["token"]:
                who = f"`{holder.get('command')}` (pid {holder.get('pid')} on {holder.get('host')})" if holder else "nobody"
                self.lost = (f"{self.path}: this run's lock was taken over by {who}; stopping before the next write "
                             f"so two runs do not write {self.root}")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


def slurm_job_states(jobs: list[str]) -> dict[str, str] | None:
    """State of each SLURM job ("GONE" once purged, "NEVER" when it waits on a failed job), or None when
    SLURM cannot be asked."""
    if not jobs or shutil.which("squeue") is None:
        return None
    states = {}
    for job in jobs:
        try:
            p = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T %r"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if p.returncode == 0:
            state, _, reason = (p.stdout.strip().split("\n")[0] or "GONE").partition(" ")
            # a job waiting on a failed one never starts (unless Slurm cancels it, it stays PENDING)
            states[job] = "NEVER" if reason == "DependencyNeverSatisfied" else state
        elif "invalid job id" in p.stderr.lower():
            states[job] = "GONE"
        else:
            return None
    return states


def _fmt_states(states: dict[str, str] | None) -> str:
    return ", ".join(f"{j} {s}" for j, s in (states or {}).items())


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), Linux only."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid, start) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return start is None or _start_time(pid) in (None, start)


# -- the lock of the run this process is doing ----------------------------------------------------

_held: RunLock | None = None


@contextlib.contextmanager
def hold(run_dir: str | Path, strategy, stale_seconds: float = 600):
    """Hold RUN_DIR's lock for the body (taken by the main rank; every rank fails if it cannot be taken)."""
    global _held
    lock, error = None, None
    if strategy.is_main():
        lock = RunLock(run_dir, stale_seconds)
        try:
            lock.acquire(strategy.print)
        except LockError as e:
            error = e
    if strategy.all_reduce({"failed": float(error is not None)})["failed"]:
        raise error or LockError(f"{run_dir}: the main rank could not take the run lock (see its error)")
    _held, ok = lock, False
    try:
        yield lock
        ok = True
    finally:
        _held = None
        if lock is not None:
            lock.release(success=ok)


def check_held(strategy) -> None:
    """Before a write into the run folder: stop on every rank if the main rank lost the lock (a collective)."""
    lost = _held.lost if _held is not None else None
    if strategy.all_reduce({"lost": float(lost is not None)})["lost"]:
        raise LockError(lost or "the main rank lost the run lock (see its error)")


def release_now() -> None:
    """On an immediate exit (second SIGTERM, SIGINT): give the lock up as a failed run does."""
    if _held is not None:
        with contextlib.suppress(Exception):
            _held.release(success=False)
