"""Atomic, durable writes: a reader sees the old file (or folder) or the complete new one, never a part.

Files are written beside their target, fsynced and `os.replace`d into place; folders are built under
a temporary name, every file in them fsynced, and renamed; the parent folder is fsynced after the
rename. A crash, a kill or a full disk leaves at most a `.tmp-*` leftover, never a half-written
output, and after a node crash the new output is there whole or the old one is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = disk_full_error(e, path)
        if full is None:
            raise
        raise full from e
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def staged_dir(target: str | Path):
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` whole.

    If the body raises, the temporary folder is removed and `target` (if any) is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException as e:
        full = disk_full_error(e, target)  # judged before the partial folder is removed (see disk_full_error)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise full from e
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: str | Path) -> None:
    """Make every file under `folder`, and the folders themselves, durable."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(folder: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


class DiskFull(OSError):
    """A write failed for lack of space (or quota); the message says where and what is intact."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror if self.strerror else super().__str__()


# How libraries report a failed write without an errno: torch.save ("unexpected pos 576 vs 534", from
# "basic_ios::clear: iostream error"; "PytorchStreamWriter failed writing file"), safetensors ("I/O error:
# No space left on device (os error 28)").
_NO_SPACE = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_WRITE_FAILED = ("write", "iostream error", "unexpected pos")


def disk_full_error(e: BaseException, path: str | Path, intact: str = "the previous output is intact",
                    todo: str = "Free some space and run the same command again: it continues from there",
                    ) -> DiskFull | None:
    """A DiskFull naming `path` if `e` (or an exception it was raised from or during) is a full disk or
    quota, also as torch.save and safetensors report it, else None. A DiskFull raised inside is named
    again: the outermost caller knows best what was being written and what is intact.

    Without an errno, a failed write counts as a full disk when little space is left: call this before
    removing the partial output, or the space it took is free again."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen and isinstance(e, Exception):
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    full = any(isinstance(x, DiskFull) or (isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))
               or any(m in str(x).lower() for m in _NO_SPACE) for x in chain)
    if not full and any(any(m in str(x).lower() for m in _WRITE_FAILED) for x in chain):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(_existing(Path(path))).free < (64 << 20)
    if not full:
        return None
    try:
        free = f"{shutil.disk_usage(_existing(Path(path))).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return DiskFull(errno.ENOSPC, f"no space left on the device while writing {path} ({free}); {intact}. {todo}")


@contextlib.contextmanager
def full_disk_explained(path: str | Path, intact: str = "the previous output is intact", **todo):
    """Turn a full-disk failure in the body into a DiskFull naming `path`."""
    try:
        yield
    except BaseException as e:
        full = disk_full_error(e, path, intact, **todo)
        if full is None:
            raise
        raise full from e


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _umask() -> int:
    """This process's umask, read without changing it (Linux); 022 elsewhere."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o022
