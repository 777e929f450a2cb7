"""TensorBoard logging from the main process (a no-op elsewhere)."""

from __future__ import annotations

from pathlib import Path


class Monitor:
    def __init__(self, logdir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                if v is not None:
                    self.writer.add_scalar(tag, v, step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
