"""All-gather bandwidth on CPU ranks (gloo): torch's all_gather_into_tensor against the trainer's
broadcast-per-rank all-gather (trainer/distributed.py, what ZeRO-3's parameter fetches use on gloo),
in one run, on shard sizes of a 7B base's weights.

    python tools/bench_gloo.py [--ranks 2] [--sizes-mb 1,8,90] [--repeats 5]

Prints one line per shard size (milliseconds and GB/s received per rank for each, and the ratio), then
one JSON object. Run it alone: the ranks share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r'''
import json, sys, time
import torch, torch.distributed as dist
import deepspeed
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
import deepspeed.comm.comm as ds_comm
from trainer.distributed import _all_gather_by_broadcasts
plain = ds_comm.cdb.all_gather_into_tensor
_all_gather_by_broadcasts()
patched = ds_comm.cdb.all_gather_into_tensor
rank, world = dist.get_rank(), dist.get_world_size()
sizes, repeats = [float(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
out = []
for mb in sizes:
    n = int(mb * (1 << 20)) // 2
    x = torch.full((n,), float(rank), dtype=torch.bfloat16)
    buf = torch.empty(world * n, dtype=torch.bfloat16)
    row = {"shard_mb": mb}
    for name, fn in (("all_gather", plain), ("broadcasts", patched)):
        fn(buf, x, async_op=True).wait()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(repeats):
            fn(buf, x, async_op=True).wait()
        row[name + "_ms"] = round(1000 * (time.perf_counter() - t) / repeats, 2)
        assert torch.equal(buf.view(world, n)[:, 0].float(), torch.arange(world).float())
    row["received_gb_per_s"] = {k: round((world - 1) * n * 2 / 1e9 / (row[k + "_ms"] / 1000), 2)
                                for k in ("all_gather", "broadcasts")}
    row["all_gather_over_broadcasts"] = round(row["all_gather_ms"] / row["broadcasts_ms"], 2)
    out.append(row)
if rank == 0:
    print(json.dumps(out))
dist.destroy_process_group()
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--sizes-mb", default="1,8,90", help="shard sizes per rank in MiB (90: one 4096 x 11008 bf16 weight)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={args.ranks}", str(worker), args.sizes_mb, str(args.repeats)],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    rows = json.loads([line for line in proc.stdout.splitlines() if line.startswith("[")][-1])
    for r in rows:
        print(f"shard {r['shard_mb']:>5} MiB on {args.ranks} ranks: all_gather {r['all_gather_ms']} ms "
              f"({r['received_gb_per_s']['all_gather']} GB/s received), broadcasts {r['broadcasts_ms']} ms "
              f"({r['received_gb_per_s']['broadcasts']} GB/s): {r['all_gather_over_broadcasts']}x")
    print(json.dumps({"ranks": args.ranks, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
