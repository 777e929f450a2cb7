"""Stage outputs: the run folder layout, adapter files and stage manifests.

    RUN_DIR/
      config.yaml                    resolved config of the latest invocation
      stages/<K>-<task>/             written whole or not at all (atomic rename)
        adapters.safetensors         every expert, gate and discriminator after stage K
        stage.json                   manifest: config, order, steps, metrics, file hashes
        config.yaml                  the resolved config this stage ran with
      checkpoints/<K>-<task>/        mid-stage checkpoints of a stage in progress (resume: auto)
      metrics.json, accuracy.png     the accuracy matrix so far, with ACC / BWT / FWT
      tb/                            TensorBoard events

A stage counts as complete when its folder holds `stage.json`; the folder appears only after
everything in it is written, so a failed or killed stage leaves earlier stages as they were.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import atomic

ADAPTERS = "adapters.safetensors"
MANIFEST = "stage.json"
CHECKPOINT_INFO = "moecl.json"  # beside a mid-stage checkpoint's own files


class CheckpointError(ValueError):
    """A stage output that is missing, incomplete or does not fit the model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapters(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write adapter tensors atomically as safetensors; returns the file's sha256.

    Refuses empty tensors: a ZeRO-3 partition saved outside a gather has shape [0] and would
    otherwise produce the silently useless "empty adapter file".
    """
    if not tensors:
        raise CheckpointError(f"{path}: refusing to write an adapter file with no tensors")
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    if empty:
        raise CheckpointError(f"{path}: {len(empty)} empty tensor(s), e.g. {empty[0]} with shape "
                              f"{list(tensors[empty[0]].shape)}: parameters were read outside a ZeRO-3 gather")
    data = save({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)
    atomic.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_adapters(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter file is missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: adapter file is empty (0 bytes)")
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"{path}: sha256 differs from its manifest; the file was changed or truncated")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    if not tensors or empty:
        raise CheckpointError(f"{path}: holds {'no tensors' if not tensors else f'empty tensors, e.g. {empty[0]}'}")
    return tensors


def read_tagged(path: Path, expected_sha256: str | None, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a file `save_adapters` wrote with metadata {"format": fmt, ...} (a task
    router, a discriminator memory); CheckpointError naming `what` when it is another kind of file."""
    from safetensors import safe_open

    tensors = read_adapters(path, expected_sha256)  # CheckpointError when missing, changed or unreadable
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {what} file (format {meta.get('format')!r})")
    return tensors, meta


def check_fits(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path) -> None:
    """The saved key set must equal the model's exactly, with the same shapes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {list(tensors[k].shape)}, "
                         f"model {list(expected[k])})")
        raise CheckpointError(f"{source}: does not fit this model: {'; '.join(parts)}. "
                              "Was it written with another base model, order or experts config?")


@dataclass
class StageRecord:
    """A completed stage as read from its manifest."""

    index: int
    task: str
    folder: Path
    manifest: dict

    @property
    def adapters(self) -> Path:
        return self.folder / ADAPTERS

    def read_adapters(self) -> dict[str, torch.Tensor]:
        return read_adapters(self.adapters, self.manifest["files"][ADAPTERS])


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, k: int, task: str) -> Path:
        return self.root / "stages" / f"{k}-{task}"

    def checkpoint_dir(self, k: int, task: str) -> Path:
        """Mid-stage checkpoints of stage k (removed once the stage output is written)."""
        return self.root / "checkpoints" / f"{k}-{task}"

    def stage(self, k: int, order: list[str]) -> StageRecord | None:
        """Stage k's record if it is complete, else None."""
        folder = self.stage_dir(k, order[k - 1])
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
        return StageRecord(k, order[k - 1], folder, manifest)

    def require_stage(self, k: int, order: list[str]) -> StageRecord:
        rec = self.stage(k, order)
        if rec is None:
            raise CheckpointError(f"stage {k} ({order[k - 1]}) has no complete output at {self.stage_dir(k, order[k - 1])}; "
                                  f"run stage {k} first (python -m trainer stage CONFIG --stage {k})")
        if rec.manifest.get("order") != order:
            raise CheckpointError(f"{rec.folder / MANIFEST}: written for order {rec.manifest.get('order')}, "
                                  f"but data.order is {order}; use a new run.dir for a new order")
        return rec

    def completed(self, order: list[str]) -> list[StageRecord]:
        """The unbroken prefix of complete stages, each built on the one before it."""
        out = []
        for k in range(1, len(order) + 1):
            rec = self.stage(k, order)
            if rec is None or rec.manifest.get("order") != order:
                break
            if out and rec.manifest.get("previous", {}).get("sha256") != out[-1].manifest["files"][ADAPTERS]:
                break  # built on an earlier version of stage k-1: stale
            out.append(rec)
        return out
