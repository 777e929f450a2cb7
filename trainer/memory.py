"""A small memory of earlier tasks' rows for the discriminators (experts.discriminator_extra=memory).

Without it a stage's discriminators see one class only (every batch is the current task), so they
learn "always this task" within a few steps and the reversed gradient carries almost nothing. With
it, after each stage `experts.memory_rows` training rows of that task (a seeded choice: the token ids
of prompt and answer, nothing else) join the memory, which every later stage folder carries whole as
memory.safetensors (sha256 in stage.json). During a stage each micro-batch also runs
`experts.memory_batch` rows of one earlier task (the tasks take turns) through the model, routed as
that task is served; their pooled shared-expert output goes to the discriminators, labelled with its
own task, through the same gradient reversal. The rows never enter the task loss. The cost is that
extra forward and backward: memory_batch / micro_batch_size of a step's rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import read_tagged, save_adapters

MEMORY = "memory.safetensors"
FORMAT = "moe-cl-memory"


@dataclass
class Memory:
    rows: dict[str, list[list[int]]] = field(default_factory=dict)  # task -> token ids per stored row

    def with_task(self, task: str, encoded: list[dict], n: int, seed: int) -> "Memory":
        """This memory plus `n` of `task`'s encoded training rows, chosen by `seed` and the task name."""
        picks = random.Random(f"{seed}:{task}").sample(range(len(encoded)), min(n, len(encoded)))
        return Memory({**self.rows, task: [list(encoded[i]["input_ids"]) for i in sorted(picks)]})

    def batch(self, earlier: list[str], turn: int, n: int, seed: int, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """(ids, attention mask, task) of `n` rows of one of the `earlier` tasks, which take turns by
        `turn`; the rows are a seeded draw, the same on every rank. None before any earlier task."""
        tasks = [t for t in earlier if self.rows.get(t)]
        if not tasks:
            return None
        task = tasks[turn % len(tasks)]
        stored = self.rows[task]
        rows = [stored[i] for i in random.Random(f"{seed}:{turn}").sample(range(len(stored)), min(n, len(stored)))]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask, task

    def save(self, path: Path) -> str:
        """Write to `path` (safetensors: per task the ids end to end and each row's length); returns its sha256."""
        tensors = {}
        for t, rows in self.rows.items():
            tensors[f"{t}.ids"] = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
            tensors[f"{t}.lengths"] = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        return save_adapters(path, tensors, {"format": FORMAT, "tasks": json.dumps(list(self.rows))})

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> "Memory":
        tensors, meta = read_tagged(path, sha256, FORMAT, "discriminator memory")
        rows = {}
        for t in json.loads(meta["tasks"]):
            flat = tensors[f"{t}.ids"].tolist()
            ends = torch.tensor(tensors[f"{t}.lengths"].tolist()).cumsum(0).tolist()
            rows[t] = [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
        return cls(rows)
