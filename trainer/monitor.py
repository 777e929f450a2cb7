"""TensorBoard logging and training progress output, from the main process (no-ops elsewhere).

Logging is never why a run fails: if the event file cannot be written (a full disk, a quota), one
warning is printed and logging stops; training, checkpoints and stage outputs go on as before.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


class Monitor:
    def __init__(self, logdir: Path, enabled: bool):
        self.logdir = logdir
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread()
            self._guard(lambda: setattr(self, "writer", SummaryWriter(str(logdir))))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        for tag, v in values.items():
            if v is not None and self.writer is not None:
                self._guard(lambda: self.writer.add_scalar(tag, v, step))

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None:
            self._guard(lambda: self.writer.add_figure(tag, fig, step))

    def close(self) -> None:
        if self.writer is not None:
            self._guard(self.writer.close)
            self.writer = None

    def _guard(self, call) -> None:
        try:
            call()
        except OSError as e:
            print(f"warning: TensorBoard logging to {self.logdir} stopped: {e}", file=sys.stderr, flush=True)
            self.writer = None


def _quiet_writer_thread() -> None:
    """TensorBoard writes events from a thread of its own; an OSError there (a full disk) would print a
    traceback and then resurface at the next call, where `Monitor._guard` reports it once."""
    previous = threading.excepthook
    if getattr(previous, "_moecl", False):
        return

    def hook(args):
        if issubclass(args.exc_type, OSError) and "AsyncWriter" in type(args.thread).__name__:
            return
        previous(args)

    hook._moecl = True
    threading.excepthook = hook


class Progress:
    """A stage's training progress: a tqdm bar on a terminal; anywhere else (a SLURM log file, a pipe) one
    plain line per logging window (train.log_every), so log files hold no carriage-return bar updates:

        step 10/31 of stage 1 (dbpedia): loss 1.234  disc 0.693  lr 1.0e-04  2.41 s/step  eta 0:00:50
    """

    def __init__(self, start: int, total: int, label: str, enabled: bool):
        self.start, self.total, self.label, self.enabled = start, total, label, enabled
        self.t0 = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(initial=start, total=total, desc=label, dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, loss: float, disc: float | None, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", disc=f"{disc or 0:.3f}")
        elif self.enabled:
            per_step = (time.time() - self.t0) / max(step - self.start, 1)
            eta = round(per_step * (self.total - step))
            disc_text = f"  disc {disc:.3f}" if disc is not None else ""
            print(f"step {step}/{self.total} of {self.label}: loss {loss:.3f}{disc_text}  lr {lr:.1e}  "
                  f"{per_step:.2f} s/step  eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
