"""Two real ranks under torchrun (DeepSpeed ZeRO-3, gloo): SIGTERM makes both checkpoint at one step;
a rank that dies, or hangs, ends the whole job in bounded time and the rerun resumes; tokenization
caches are built by one rank. (The same on the 2-node SLURM cluster is in test_slurm.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import REPO
from .test_distributed import _env, _kill_tree, _overrides, torchrun

pytestmark = pytest.mark.distributed


def _launch(*args: str, shutdown_timeout: int = 30) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--shutdown-timeout={shutdown_timeout}", "-m", "trainer", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the trainer processes started by a torchrun agent."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(pid)
    return found


def _wait_for_checkpoint(proc, latest, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (latest.is_file() and latest.read_text().strip() >= f"step-{step:07d}"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before writing a checkpoint"
        time.sleep(0.2)


def test_sigterm_makes_both_ranks_checkpoint_at_one_step_and_the_rerun_resumes(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 60, "train.checkpoint_every": 1000,
                                             "data.order": "[agnews]"})
    proc = _launch("stage", "configs/tiny.yaml", *o, "--stage", "1")
    try:
        while "training agnews" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc.pid)
    assert proc.returncode != 0
    assert "stopped on SIGTERM after step" in out, out[-2000:] + err[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "1-agnews"
    tag = (ckpt / "latest").read_text().strip()
    assert 0 < int(tag.split("-")[1]) < 60
    parts = sorted(p.name.split("zero_pp_rank_")[1][0] for p in (ckpt / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    assert parts == ["0", "1"]  # both ranks wrote their part, at the same step
    assert not (tmp_path / "run" / "run.lock").exists()

    resumed = torchrun(2, "stage", "configs/tiny.yaml", *o, "--stage", "1")
    assert f"resuming from {ckpt / tag}" in resumed.stdout
    assert (tmp_path / "run" / "stages" / "1-agnews" / "stage.json").is_file()


def test_a_killed_rank_ends_the_job_in_bounded_time_and_the_rerun_resumes(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 40, "train.checkpoint_every": 2,
                                             "data.order": "[agnews]"})
    proc = _launch("stage", "configs/tiny.yaml", *o, "--stage", "1")
    latest = tmp_path / "run" / "checkpoints" / "1-agnews" / "latest"
    try:
        _wait_for_checkpoint(proc, latest, 4)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        t0 = time.time()
        proc.communicate(timeout=120)
        ended = time.time() - t0
    finally:
        _kill_tree(proc.pid)
    assert proc.returncode != 0 and ended < 120, ended  # bounded (without a timeout: forever)
    assert not (tmp_path / "run" / "stages").exists()
    step = latest.read_text().strip()
    resumed = torchrun(2, "stage", "configs/tiny.yaml", *o, "--stage", "1")
    assert f"resuming from {latest.parent / step}" in resumed.stdout


def test_a_hung_rank_fails_the_others_collective_after_the_process_group_timeout(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 400, "train.checkpoint_every": 2,
                                             "distributed.timeout_seconds": 10, "data.order": "[agnews]"})
    proc = _launch("stage", "configs/tiny.yaml", *o, "--stage", "1", shutdown_timeout=5)
    try:
        _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints" / "1-agnews" / "latest", 2)
        os.kill(_workers(proc.pid)[1], signal.SIGSTOP)  # alive, holding its sockets open, never answering
        t0 = time.time()
        out, err = proc.communicate(timeout=180)
        ended = time.time() - t0
    finally:
        _kill_tree(proc.pid)
    # rank 0 gives up after 10 s; torchrun then stops the hung rank (SIGKILL after its 5 s grace)
    assert proc.returncode != 0 and ended < 120, ended  # bounded (without a timeout: forever)
    assert "timed out" in err.lower(), err[-3000:]  # gloo: "Timed out waiting ...ms for recv operation"


_MAIN_FIRST = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from trainer.base import load_tokenizer
    from trainer.config import load_config
    from trainer.data import PromptFormat, load_tasks
    from trainer.distributed import make_strategy

    cfg = load_config("configs/tiny.yaml", sys.argv[1:])
    strategy = make_strategy(cfg)
    task = load_tasks(cfg.data, 0)[0]
    fmt = PromptFormat(load_tokenizer(Path(sys.argv[-1].split("=", 1)[1]) / "tiny-llama"), cfg.data)
    cache = Path(cfg.data.cache_dir)
    with strategy.main_first():
        before = sorted(cache.glob("*.arrow")) if cache.exists() else []
        fmt.encode(task, "train")
        after = {p: os.stat(p).st_ino for p in cache.glob("*.arrow")}
    print(f"rank {strategy.rank}: before {len(before)} after {sorted(after.values())}", flush=True)
    strategy.close()
""")


def test_the_tokenization_cache_is_built_by_the_main_rank_and_read_by_the_others(tmp_path, model_cache):
    from trainer.builtin import materialize

    materialize("tiny-llama", model_cache)
    script = tmp_path / "main_first.py"
    script.write_text(_MAIN_FIRST)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           f"data.cache_dir={tmp_path / 'cache'}", f"model.cache_dir={model_cache}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert lines["rank 0"].startswith("before 0 ")  # the main rank builds the cache file ...
    assert lines["rank 1"].startswith("before 1 ")  # ... before the other rank starts, which reads it:
    assert lines["rank 0"].split(" after ")[1] == lines["rank 1"].split(" after ")[1]  # the same file (inode)
