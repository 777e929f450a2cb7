"""The one boundary for distributed concerns.

The recipe, model and data code call only this interface: set up the trainable model, backward,
optimizer step, all-reduce of a metrics dict, is-main, barrier, eval sharding, gathering full
weights. `LocalStrategy` is the single-process implementation; it needs no launcher and no
process group. Rank checks live here and nowhere else.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn


class Strategy:
    """Single-process defaults; distributed strategies override what differs."""

    world_size = 1
    rank = 0

    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def print(self, msg: str) -> None:
        """Progress output, from the main process only."""
        if self.is_main():
            print(msg, flush=True)

    def all_reduce(self, metrics: dict[str, float], op: str = "sum") -> dict[str, float]:
        """Sum (or mean) every value over ranks."""
        return dict(metrics)

    def shard(self, n: int) -> tuple[list[int], list[bool]]:
        """This rank's share of `n` evaluation rows, padded so every rank runs the same number of
        batches (every rank must call the same modules equally often). Padding rows are marked False."""
        per_rank = -(-n // self.world_size) if n else 0
        idx = list(range(self.rank * per_rank, min(n, (self.rank + 1) * per_rank)))
        valid = [True] * len(idx)
        filler = idx[-1] if idx else 0
        idx += [filler] * (per_rank - len(idx))
        valid += [False] * (per_rank - len(valid))
        return idx, valid

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batch_size: int,
              grad_accum: int, max_grad_norm: float) -> Callable:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> float:
        """Apply the accumulated gradients; returns the pre-clipping gradient norm."""
        raise NotImplementedError

    def full_tensors(self, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Full float32 CPU copies of the given parameters (a collective under ZeRO-3: call on every rank)."""
        return {k: p.detach().float().cpu().clone() for k, p in named.items()}

    def gathered(self, params: Iterable[nn.Parameter], modify: bool = False):
        """Context in which `params` hold their full values (written back on exit when `modify`);
        nothing to do without ZeRO-3."""
        return contextlib.nullcontext()


class LocalStrategy(Strategy):
    """One process, plain PyTorch: gradient accumulation, clipping, AdamW, LR schedule."""

    def setup(self, model, optimizer, scheduler, micro_batch_size, grad_accum, max_grad_norm):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        return model

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def optimizer_step(self):
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def make_strategy(distributed: bool = True) -> Strategy:
    """The strategy for this process. Single-process for now; `distributed=False` forces it."""
    return LocalStrategy()
