from __future__ import annotations

import os

import pytest
import torch

from trainer import atomic
from trainer.checkpoint import CheckpointError, check_fits, read_adapters, save_adapters, sha256_file


def test_adapter_file_round_trip_and_hash(tmp_path):
    tensors = {"layers.0.experts.shared.gate_proj.lora_a": torch.randn(4, 8), "discriminators.0.net.bias": torch.randn(2)}
    sha = save_adapters(tmp_path / "a.safetensors", tensors)
    assert sha == sha256_file(tmp_path / "a.safetensors")
    back = read_adapters(tmp_path / "a.safetensors", sha)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_empty_adapters_are_refused_on_write_and_read(tmp_path):
    with pytest.raises(CheckpointError, match=r"empty tensor\(s\), e.g. x with shape \[0\].*outside a ZeRO-3 gather"):
        save_adapters(tmp_path / "a.safetensors", {"x": torch.empty(0), "y": torch.ones(2)})
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.raises(CheckpointError, match="no tensors"):
        save_adapters(tmp_path / "a.safetensors", {})
    (tmp_path / "zero.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        read_adapters(tmp_path / "zero.safetensors")


def test_truncated_or_changed_file_is_detected(tmp_path):
    path = tmp_path / "a.safetensors"
    sha = save_adapters(path, {"x": torch.randn(64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sha256 differs from its manifest"):
        read_adapters(path, sha)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_adapters(path)


def test_check_fits_reports_missing_extra_and_shape():
    expected = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    check_fits({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, expected, "f")
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. b\); 1 unexpected \(e.g. c\)"):
        check_fits({"a": torch.zeros(2, 3), "c": torch.zeros(4)}, expected, "f")
    with pytest.raises(CheckpointError, match=r"a: file \[3, 2\], model \[2, 3\]"):
        check_fits({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, expected, "f")


def test_staged_dir_replaces_whole_or_leaves_the_old(tmp_path):
    target = tmp_path / "stage"
    with atomic.staged_dir(target) as tmp:
        (tmp / "f").write_text("one")
    assert (target / "f").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(target) as tmp:
            (tmp / "f").write_text("two")
            raise RuntimeError("killed half-way")
    assert (target / "f").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no leftovers
    with atomic.staged_dir(target) as tmp:
        (tmp / "g").write_text("three")
    assert [p.name for p in target.iterdir()] == ["g"]


def test_atomic_file_write(tmp_path):
    atomic.write_json(tmp_path / "m.json", {"a": 1})
    atomic.write_json(tmp_path / "m.json", {"a": 2})
    assert (tmp_path / "m.json").read_text().strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_atomic_outputs_get_the_mode_the_umask_gives(tmp_path):
    # mkstemp / mkdtemp create 0600 / 0700: without a fix, a team could not read each other's runs.
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "f.txt", "x")
        with atomic.staged_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
