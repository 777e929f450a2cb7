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


def _materialize_as_rank(rank: int, cache: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        dist.barrier()  # rank 1 builds first: transformers 5's save_pretrained writes nothing off rank 0
    _materialize_and_read(cache)
    if rank == 1:
        dist.barrier()
    dist.destroy_process_group()


def test_a_rank_other_than_0_builds_a_complete_folder(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_materialize_as_rank, args=(r, str(tmp_path), port)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "tiny-llama" / "config.json").is_file() and (tmp_path / "tiny-llama" / "model.safetensors").is_file()
