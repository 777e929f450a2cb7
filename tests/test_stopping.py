"""Stopping on signals, with real processes and real signals (one process; two ranks are in
test_distributed.py): SIGTERM checkpoints and the rerun resumes to the uninterrupted result; SIGUSR1
during evaluation keeps the trained experts; a finished stage is not redone; a second SIGTERM or a
SIGINT ends at once; the resume check ignores settings that do not change training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from safetensors.torch import load_file

from .conftest import REPO, run_cli
from .test_runlock import _overrides, _start, _wait_for_line


def _latest(tmp_path, stage="1-agnews") -> str:
    return (tmp_path / "run" / "checkpoints" / stage / "latest").read_text().strip()


def test_sigterm_checkpoints_and_the_rerun_resumes_to_the_uninterrupted_result(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 120, "train.checkpoint_every": 1000,
                                             "experts.dropout": 0.0, "data.order": "[agnews]"})
    proc = _start("stage", "configs/tiny.yaml", *o, "--stage", "1")
    _wait_for_line(proc, "training agnews")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    assert "stopped on SIGTERM after step" in out
    step = int(_latest(tmp_path).split("-")[1])
    assert 0 < step < 120  # a checkpoint no periodic schedule asked for, at the step the run stopped at
    assert not (tmp_path / "run" / "stages").exists()

    changed = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1", "train.lr=5e-4", check=False)
    assert changed.returncode == 2 and "train.lr differ" in changed.stderr
    # What does not change training may change: a longer walltime, evaluation, logging, the cache folder.
    resumed = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1", "slurm.time=08:00:00", "eval.batch_size=4",
                      "train.log_every=7", f"data.cache_dir={tmp_path / 'cache2'}")
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / '1-agnews' / f'step-{step:07d}'}" in resumed.stdout

    clean = _overrides(tmp_path, model_cache, **{"run.dir": str(tmp_path / "clean"), "train.max_steps": 120,
                                                 "experts.dropout": 0.0, "data.order": "[agnews]"})
    run_cli("stage", "configs/tiny.yaml", *clean, "--stage", "1")
    a = load_file(tmp_path / "run" / "stages" / "1-agnews" / "adapters.safetensors")
    b = load_file(tmp_path / "clean" / "stages" / "1-agnews" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_sigusr1_during_evaluation_keeps_the_trained_experts_and_a_done_stage_is_not_redone(tmp_path, model_cache):
    o = _overrides(tmp_path, model_cache, **{"train.max_steps": 6, "data.max_eval_examples": 150})
    proc = _start("stage", "configs/tiny.yaml", *o, "--stage", "1")
    _wait_for_line(proc, "evaluating 2 task(s), after stage 1")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    assert "while evaluating, after its 6 training steps" in out
    assert _latest(tmp_path) == "step-0000006"  # the trained experts are kept, not retrained on requeue
    assert not (tmp_path / "run" / "stages").exists()

    again = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1")
    assert "step-0000006" in again.stdout and "resuming" in again.stdout
    assert "stage 1 written to" in again.stdout
    assert not (tmp_path / "run" / "checkpoints" / "1-agnews").exists()
    stage = tmp_path / "run" / "stages" / "1-agnews" / "stage.json"
    before = stage.read_bytes()
    done = run_cli("stage", "configs/tiny.yaml", *o, "--stage", "1")  # e.g. the job requeued after all
    assert "already complete" in done.stdout and stage.read_bytes() == before


_SCRIPT = textwrap.dedent("""
    import sys, time
    from trainer import runlock
    from trainer.distributed import LocalStrategy
    from trainer.stopping import StopSignals

    stops = StopSignals(checkpointing=sys.argv[2] == "1")
    stops.install()
    with runlock.hold(sys.argv[1], LocalStrategy("cpu")):
        print("ready", flush=True)
        while True:  # a long checkpoint write that must not be waited for
            time.sleep(0.05)
            if stops.requested:
                print("stop requested:", stops.requested, flush=True)
                stops.requested = ""
""")


def _script(tmp_path, checkpointing: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path / "run"), "1" if checkpointing else "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert (tmp_path / "run" / "run.lock").is_file()
    return proc


def _ends_at_once(proc: subprocess.Popen, sig: int, code: int) -> str:
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == code and time.time() - t0 < 2, (proc.returncode, out, err)
    assert "stopping at once" in err
    return out


def test_a_second_sigterm_or_a_sigint_ends_at_once_and_gives_the_lock_up(tmp_path):
    proc = _script(tmp_path, checkpointing=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().startswith("stop requested: SIGTERM")
    proc.send_signal(signal.SIGTERM)  # the same signal delivered twice (Slurm and torchrun both send it)
    time.sleep(2.5)
    assert proc.poll() is None
    _ends_at_once(proc, signal.SIGTERM, 128 + signal.SIGTERM)
    assert not (tmp_path / "run").exists()  # the lock is given up (and the folder it created)

    proc = _script(tmp_path, checkpointing=True)
    _ends_at_once(proc, signal.SIGINT, 128 + signal.SIGINT)
    proc = _script(tmp_path, checkpointing=False)  # no checkpoint to write: SIGTERM ends at once
    _ends_at_once(proc, signal.SIGTERM, 128 + signal.SIGTERM)
    assert not (tmp_path / "run").exists()
