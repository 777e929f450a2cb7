"""TensorBoard logging from the main process (a no-op elsewhere).

Logging is never why a run fails: if the event file cannot be written (a full disk, a quota), one
warning is printed and logging stops; training, checkpoints and stage outputs go on as before.
"""

from __future__ import annotations

import sys
import threading
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
