"""Builtin models: materialised once, even when every rank of a first multi-rank run asks at once."""

from __future__ import annotations

import multiprocessing as mp


def _materialize_and_read(cache: str) -> str:
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from trainer.builtin import materialize

    folder = materialize("tiny-llama", Path(cache))
    AutoConfig.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    return str(folder)


def test_concurrent_first_use_builds_once_and_every_process_reads_it(tmp_path):
    with mp.get_context("spawn").Pool(3) as pool:
        folders = pool.map(_materialize_and_read, [str(tmp_path)] * 3)
    assert folders == [str(tmp_path / "tiny-llama")] * 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-llama")]  # no leftovers
