"""A full disk while a stage or a mid-stage checkpoint is written, on a real small filesystem (a
size-limited tmpfs holding RUN_DIR): a clear `error: no space left ...` and exit 2, no traceback, the
previous stage and the previous checkpoint byte-identical, no leftovers, and a rerun after freeing
space continues from there. Needs root to mount the tmpfs (skipped otherwise); about a minute."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

FS_SIZE = 16 << 20  # the whole run folder is < 1 MB; the filler takes the rest
STAGE1, STAGE2 = "1-agnews", "2-yelp"


@pytest.fixture(scope="module")
def small_fs():
    """A fresh 16 MB tmpfs, unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small filesystem")
    where = Path(tempfile.mkdtemp(prefix="moecl-fullfs-"))
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a size-limited tmpfs here (a container without CAP_SYS_ADMIN?): "
                    f"{p.stderr.strip() or p.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, model_cache) -> list[str]:
    """Model and tokenization caches off the small filesystem: only RUN_DIR is on it."""
    return [f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path_factory.mktemp('data-cache')}"]


SMALL = ["data.max_train_examples=32", "data.max_eval_examples=8", "train.log_every=1", "experts.dropout=0.0"]


def _stage(run: Path, k: int, caches: list[str], *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("stage", "configs/tiny.yaml", "--stage", str(k), f"run.dir={run}", *caches, *SMALL, *extra,
                   check=check, timeout=300)


@pytest.fixture(scope="module")
def stage1(small_fs, caches) -> Path:
    """Stage 1 completed in a run folder on the small filesystem (each test copies it into its own)."""
    run = small_fs / "stage1-run"
    _stage(run, 1, caches, "train.max_steps=2")
    assert (run / "stages" / STAGE1 / "stage.json").is_file()
    return run / "stages" / STAGE1


def _new_run(small_fs: Path, stage1: Path, name: str) -> Path:
    run = small_fs / name
    shutil.copytree(stage1, run / "stages" / STAGE1)
    return run


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(fs: Path, leave: int) -> Path:
    """A filler file taking all but about `leave` bytes of the filesystem."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if _free(fs) > leave:
            os.posix_fallocate(fd, 0, _free(fs) - leave)
    finally:
        os.close(fd)
    assert leave - 8192 <= _free(fs) <= leave + 8192, (_free(fs), leave)
    return filler


def _assert_clear_disk_full(proc: subprocess.CompletedProcess, path: Path) -> None:
    why = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, why
    assert f"error: no space left on the device while writing {path}" in proc.stderr, why
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, why
    assert "Exception ignored" not in proc.stderr, why


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_full_disk_while_writing_a_stage_keeps_the_previous_stage(small_fs, stage1, caches):
    run = _new_run(small_fs, stage1, "run-a")
    before = _hashes(run / "stages" / STAGE1)
    need = _size(stage1)  # stage 2's output is larger (one more expert)
    filler = _fill(small_fs, leave=need // 2)
    try:
        proc = _stage(run, 2, caches, "train.max_steps=2", check=False)
        _assert_clear_disk_full(proc, run / "stages" / STAGE2)
        assert _hashes(run / "stages" / STAGE1) == before
        assert sorted(p.name for p in (run / "stages").iterdir()) == [STAGE1]  # no stage 2, no .tmp-* leftover
    finally:
        filler.unlink()
    _stage(run, 2, caches, "train.max_steps=2")
    assert (run / "stages" / STAGE2 / "stage.json").is_file()
    assert _hashes(run / "stages" / STAGE1) == before
    assert _leftovers(run / "stages") == []


def _stop_after_first_checkpoint(run: Path, caches: list[str], *extra: str) -> subprocess.CompletedProcess:
    """Stage 2 with a checkpoint every step, sent SIGUSR1 once its first checkpoint is named by `latest`."""
    cmd = [sys.executable, "-m", "trainer", "stage", "configs/tiny.yaml", "--stage", "2", f"run.dir={run}",
           *caches, *SMALL, *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / STAGE2 / "latest"
    deadline = time.time() + 240
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_checkpoint(small_fs, stage1, caches):
    run = _new_run(small_fs, stage1, "run-b")
    ckpts = run / "checkpoints" / STAGE2
    train = ["train.checkpoint_every=1", "train.max_steps=12"]
    proc = _stop_after_first_checkpoint(run, caches, *train)
    assert proc.returncode == 75, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    tag = (ckpts / "latest").read_text().strip()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", tag]
    step = int(tag.split("-")[1])
    assert step < 12
    before, latest_before = _hashes(ckpts / tag), (ckpts / "latest").read_bytes()
    stage1_before = _hashes(run / "stages" / STAGE1)

    filler = _fill(small_fs, leave=_size(ckpts / tag) // 2)
    try:
        proc = _stage(run, 2, caches, *train, check=False)
        assert f"resuming from {ckpts / tag}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
        _assert_clear_disk_full(proc, ckpts / f"step-{step + 1:07d}")
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", tag]  # no partial step-*, no .tmp-*
        assert _hashes(ckpts / tag) == before
        assert (ckpts / "latest").read_bytes() == latest_before
        assert _hashes(run / "stages" / STAGE1) == stage1_before
        assert sorted(p.name for p in (run / "stages").iterdir()) == [STAGE1]
    finally:
        filler.unlink()

    proc = _stage(run, 2, caches, *train)
    assert f"resuming from {ckpts / tag}" in proc.stdout, proc.stdout[-2000:]
    assert (run / "stages" / STAGE2 / "stage.json").is_file()
    assert not ckpts.exists()  # superseded by the stage output
    assert _hashes(run / "stages" / STAGE1) == stage1_before


# -- every other write into a full disk: the same clear error, never a traceback ----------------------

@pytest.fixture()
def full_disk(small_fs):
    """The small filesystem with (about) no space left; the filler is removed afterwards."""
    filler = _fill(small_fs, leave=0)
    yield small_fs
    filler.unlink()


def test_failed_writes_as_torch_and_safetensors_report_them_are_a_disk_full(full_disk):
    import torch
    from safetensors.torch import save_file

    from trainer.atomic import DiskFull, full_disk_explained, staged_dir, write_bytes

    tensors = {"w": torch.zeros(1 << 16)}
    writes = {"safetensors": lambda tmp: save_file(tensors, tmp / "a.safetensors"),  # SafetensorError, no errno
              "torch.save": lambda tmp: torch.save(tensors, tmp / "state.pt"),  # RuntimeError "unexpected pos"
              "write_bytes": lambda tmp: write_bytes(tmp / "b.bin", bytes(1 << 18))}  # OSError ENOSPC
    for what, write in writes.items():
        target = full_disk / "out" / what
        with pytest.raises(DiskFull) as e, full_disk_explained(target, "the old one is intact"):
            with staged_dir(target) as tmp:
                write(tmp)
        msg = str(e.value)
        assert msg.startswith(f"no space left on the device while writing {target} ("), (what, msg)  # no "[Errno 28]"
        assert "the old one is intact" in msg, (what, msg)
        assert not target.exists() and not [p for p in target.parent.iterdir() if ".tmp-" in p.name], what


def test_cli_on_a_disk_already_full_says_so(full_disk, caches, monkeypatch, capsys):
    from trainer import cli, distributed
    from trainer.atomic import DiskFull

    monkeypatch.setattr(distributed.Strategy, "watch_stop_signals", lambda self, checkpointing: None)  # in-process
    run = full_disk / "run-full"
    try:
        code = cli.main(["stage", str(REPO / "configs" / "tiny.yaml"), "--stage", "1", f"run.dir={run}", *caches,
                         *SMALL])
    except OSError as e:
        if isinstance(e, DiskFull):
            raise
        pytest.fail(f"trainer/runlock.py RunLock._temp (taking RUN_DIR/run.lock) leaks {e!r} from "
                    "os.fdopen/json.dump/fsync: a traceback and exit 1")
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith(f"error: no space left on the device while writing {run}"), err
    assert "Traceback" not in out + err


def test_tokenization_cache_on_a_full_disk_says_so(full_disk, smollm2_tokenizer):
    from trainer.atomic import DiskFull
    from trainer.config import DataConfig
    from trainer.data import PromptFormat, load_tasks

    cfg = DataConfig(root=str(REPO / "data" / "mtl5"), order=["agnews"], max_train_examples=32,
                     cache_dir=str(full_disk / "cache"))
    [task] = load_tasks(cfg, seed=0)
    try:
        PromptFormat(smollm2_tokenizer, cfg).encode(task, "train")
    except DiskFull as e:
        assert f"while writing {full_disk / 'cache'}" in str(e)
    except OSError as e:
        pytest.fail(f"trainer/data.py PromptFormat.encode: the datasets .map() cache write leaks {e!r}; wrap it "
                    "in atomic.full_disk_explained(cache, ...)")
    else:
        pytest.fail("the tokenization cache was written to a full disk?")


def test_tensorboard_on_a_full_disk_does_not_crash_the_run(full_disk, capsys):
    from trainer.atomic import DiskFull
    from trainer.monitor import Monitor

    try:
        monitor = Monitor(full_disk / "tb", True)
        for step in range(200):
            monitor.scalars(step, {"train/loss": 1.0, "train/lr": 1e-3})
        monitor.close()
    except DiskFull:
        return  # a clear error is fine too; a raw OSError (a traceback, after the stage was written) is not
    except OSError as e:
        pytest.fail(f"trainer/monitor.py Monitor: TensorBoard's writer raises {e!r} from scalars()/close() "
                    "(and its writer thread prints a traceback); catch it, warn once and stop logging")
    assert capsys.readouterr().err.count(f"warning: TensorBoard logging to {full_disk / 'tb'} stopped") == 1
