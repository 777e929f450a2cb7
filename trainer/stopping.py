"""Signals that stop a training run, and how.

- SIGUSR1 (SLURM's warning before the walltime): checkpoint at a step the ranks agree on, then exit
  with EXIT_REQUEUE (75) so the job can be requeued and continue from there.
- SIGTERM (`scancel`, preemption, a plain `kill`): the same when mid-stage checkpoints are enabled
  (`train.checkpoint_every` > 0); without them, exit at once.
- A second SIGTERM (at least DUPLICATE_SECONDS after the first: SLURM signals every process of a step
  and torchrun forwards the signal too, so one `scancel` can arrive twice) or a SIGINT: exit at once.

Signals are read by a watcher thread from `signal.set_wakeup_fd`, so an immediate exit happens even
while the main thread is inside a long C call (a collective, a checkpoint write). Before exiting at once
the run lock is given up (`runlock.release_now`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from . import runlock

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; run again to continue
DUPLICATE_SECONDS = 2.0


class StopSignals:
    """Watches SIGUSR1, SIGTERM and SIGINT for this process (installed from the main thread only)."""

    def __init__(self, checkpointing: bool):
        self.checkpointing = checkpointing
        self.requested: str | None = None  # why a stop was asked for
        self._first_term: float | None = None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _ignore)  # the C handler still writes the signal number to the wakeup fd
        threading.Thread(target=self._watch, args=(read,), name="stop-signals", daemon=True).start()
        return True

    def _watch(self, fd: int) -> None:
        while True:
            for signum in os.read(fd, 64):
                self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            if self.requested is None:
                self._note("SIGUSR1 (the walltime is near)")
        elif signum == signal.SIGTERM:
            now = time.monotonic()
            if self._first_term is None:
                self._first_term = now
                if not self.checkpointing:
                    self.exit_now(signum, "train.checkpoint_every is 0, so there is no checkpoint to write")
                if self.requested is None:
                    self._note("SIGTERM")
            elif now - self._first_term >= DUPLICATE_SECONDS:
                self.exit_now(signum, "second SIGTERM")
        elif signum == signal.SIGINT:
            self.exit_now(signum, "SIGINT")

    def _note(self, why: str) -> None:
        self.requested = why
        if os.environ.get("RANK", "0") == "0":
            print(f"{why}: stopping after the current step with a checkpoint (send SIGINT to stop at once)",
                  file=sys.stderr, flush=True)

    def exit_now(self, signum: int, why: str) -> None:
        print(f"stopping at once ({why}): work since the last checkpoint is lost; completed stages are intact",
              file=sys.stderr, flush=True)
        runlock.release_now()
        os._exit(128 + signum)


def _ignore(signum, frame) -> None:
    pass
