"""Durability order of a real stage's writes, seen through pass-through spies on os.fsync, os.replace,
os.rename and shutil.rmtree: a mid-stage checkpoint is fsynced whole (every file and its folder, and
the rename that put it in place) before `latest` names it, `latest` is made durable before the previous
checkpoint is removed, and the stage folder is fsynced before it is renamed into place and its parent
after. So after a node crash at any point there is a readable checkpoint (or stage) to continue from."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trainer import cli, distributed

from .conftest import REPO


@dataclass
class Event:
    kind: str  # fsync | replace | rename | rmtree
    path: Path  # the fsynced file or folder (as /proc names its fd), a rename's destination, the removed tree
    src: Path | None = None  # a rename's source
    ident: tuple | None = None  # fsync: (dev, inode, size, mtime_ns) of what was fsynced
    named: str | None = None  # a rename onto `latest`: the tag it names
    files: dict = field(default_factory=dict)  # a folder's rename: relative path -> ident of each file it moves;
    #                                            onto `latest`: those of `latest`'s new content and the named folder
    steps: list = field(default_factory=list)  # a rename onto `latest`: the step-* folders there at that time


def _ident(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _real(path) -> Path:
    return Path(os.path.realpath(os.fsdecode(path)))


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): _ident(p.stat()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def spied(monkeypatch):
    """Record every fsync, rename and tree removal of this process, then do it."""
    events: list[Event] = []
    real = {"fsync": os.fsync, "replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree}

    def fsync(fd):
        n = fd if isinstance(fd, int) else fd.fileno()
        events.append(Event("fsync", _real(os.readlink(f"/proc/self/fd/{n}")), ident=_ident(os.fstat(n))))
        return real["fsync"](fd)

    def renamer(kind):
        def rename(src, dst, *args, **kwargs):
            e = Event(kind, _real(dst), _real(src))
            if e.src.is_dir():
                e.files = _files(e.src)
            elif e.path.name == "latest":
                e.named = e.src.read_text().strip()
                e.files = {"latest": _ident(e.src.stat()), **_files(e.path.parent / e.named)}
                e.steps = sorted(p.name for p in e.path.parent.glob("step-*"))
            events.append(e)
            return real[kind](src, dst, *args, **kwargs)
        return rename

    def rmtree(path, *args, **kwargs):
        events.append(Event("rmtree", _real(path)))
        return real["rmtree"](path, *args, **kwargs)

    rmtree.avoids_symlink_attacks = shutil.rmtree.avoids_symlink_attacks
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer("replace"))
    monkeypatch.setattr(os, "rename", renamer("rename"))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    # In-process: keep pytest's own SIGINT/SIGTERM handling (the stop-signal watcher is not under test).
    monkeypatch.setattr(distributed.Strategy, "watch_stop_signals", lambda self, checkpointing: None)
    return events


def _fsynced_before(events: list[Event], i: int, ident: tuple) -> bool:
    """Was exactly this file (same inode, size and mtime) fsynced before event i?"""
    return any(e.kind == "fsync" and e.ident == ident for e in events[:i])


def _dir_fsynced(events: list[Event], folder: Path, start: int, end: int) -> bool:
    return any(e.kind == "fsync" and e.path == folder for e in events[start:end])


def _renamed_into(events: list[Event], target: Path, before: int) -> int:
    """Index of the last rename that put a folder at `target` before event `before`."""
    hits = [i for i, e in enumerate(events[:before]) if e.kind in ("replace", "rename") and e.path == target
            and e.src.name.startswith(f".{target.name}.tmp-")]
    assert hits, f"{target} was not renamed into place from a staged folder"
    return hits[-1]


def test_checkpoints_and_stage_are_durable_before_they_are_named(tmp_path, model_cache, spied):
    events = spied
    run = tmp_path / "run"
    code = cli.main(["stage", str(REPO / "configs" / "tiny.yaml"), "--stage", "1", f"run.dir={run}",
                     f"model.cache_dir={model_cache}", f"data.cache_dir={tmp_path / 'cache'}",
                     "data.max_train_examples=32", "data.max_eval_examples=4", "eval.val=false",
                     "train.max_steps=5", "train.checkpoint_every=2", "train.log_every=1", "experts.dropout=0.0"])
    assert code == 0
    ckpts, stage = _real(run / "checkpoints" / "1-agnews"), _real(run / "stages" / "1-agnews")

    # -- mid-stage checkpoints ---------------------------------------------------------------------
    names = [(i, e) for i, e in enumerate(events) if e.kind in ("replace", "rename") and e.path == ckpts / "latest"]
    assert [e.named for _, e in names] == ["step-0000002", "step-0000004", "step-0000005"]  # every 2, and the last
    previous = None
    for n, (i, e) in enumerate(names):
        step_dir = ckpts / e.named
        # Every file of the checkpoint, `latest`'s own new content, and the step folder were fsynced
        # before `latest` was renamed to name it ...
        assert {"latest", "trainable.safetensors", "state.pt", "moecl.json"} <= set(e.files), e.files
        for name, ident in e.files.items():
            what = "`latest`'s new content" if name == "latest" else step_dir / name
            assert _fsynced_before(events, i, ident), f"{what} was not fsynced before `latest` named {e.named}"
        moved_in = _renamed_into(events, step_dir, i)
        assert _dir_fsynced(events, step_dir, moved_in + 1, i), f"{step_dir} was not fsynced before `latest` named it"
        # ... and the rename that put the step folder in place was durable too (its parent fsynced after it).
        assert _dir_fsynced(events, ckpts, moved_in + 1, i), f"{ckpts} not fsynced after {e.named} was renamed in"
        # `latest`'s folder is fsynced after the rename ...
        after = [j for j in range(i + 1, len(events)) if events[j].kind == "fsync" and events[j].path == ckpts]
        assert after, f"{ckpts} was not fsynced after `latest` was renamed to name {e.named}"
        # ... and only then is the previous checkpoint removed (it was still there when `latest` moved).
        if previous is not None:
            assert previous in e.steps, f"{previous} was removed before `latest` named {e.named}"
            removed = [j for j, x in enumerate(events) if x.kind == "rmtree" and x.path == ckpts / previous]
            assert removed, f"{previous} was never removed"
            assert removed[0] > after[0], f"{previous} was removed before `latest` ({e.named}) was durable"
            assert not any(x.kind == "rmtree" and x.path in (ckpts, ckpts / previous) for x in events[:i])
        previous = e.named
        assert n == 0 or e.steps == sorted({names[n - 1][1].named, e.named}), e.steps  # one kept, one new

    # -- the stage folder ----------------------------------------------------------------------------
    moved_in = _renamed_into(events, stage, len(events))
    src, files = events[moved_in].src, events[moved_in].files
    assert set(files) == {"adapters.safetensors", "router.safetensors", "stage.json", "config.yaml"}, files
    for name, ident in files.items():
        assert _fsynced_before(events, moved_in, ident), f"{src / name} was not fsynced before the stage rename"
        assert _ident((stage / name).stat()) == ident  # the files that were fsynced are the ones in place
    assert _dir_fsynced(events, src, 0, moved_in), f"{src} (the staged stage folder) was not fsynced before its rename"
    assert _dir_fsynced(events, stage.parent, moved_in + 1, len(events)), f"{stage.parent} not fsynced after the rename"
    # The checkpoints are removed only once the stage output is in place and durable.
    fsynced = next(j for j in range(moved_in + 1, len(events))
                   if events[j].kind == "fsync" and events[j].path == stage.parent)
    removed = [j for j, x in enumerate(events) if x.kind == "rmtree" and x.path == ckpts]
    assert removed and removed[0] > fsynced
    assert not ckpts.exists() and (stage / "stage.json").is_file()
