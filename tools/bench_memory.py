"""Per-rank parameter and optimizer-state bytes under ZeRO-3, for 1 rank vs N ranks on the same model.

    python tools/bench_memory.py [CONFIG] [--ranks 2] [key=value ...]

Launches this script under torchrun once with 1 rank and once with N ranks (CPU, gloo), builds the
stage-1 model exactly as the trainer does (base partitioned while it loads, experts added and
partitioned by deepspeed.initialize), runs one optimizer step so Adam's state exists, and prints
per-rank bytes of the frozen base, the adapters, and the optimizer state (fp32 master + moments),
with the N-rank / 1-rank ratio. Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(config: str, overrides: list[str], out: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from trainer.config import load_config
    from trainer.data import collate
    from trainer.distributed import DeepSpeedStrategy
    from trainer.recipe import prepare_training, setup_stage

    cfg = load_config(config, overrides + ["distributed.strategy=deepspeed", "data.max_eval_examples=1"])
    strategy = DeepSpeedStrategy(cfg, training=True)
    s = setup_stage(cfg, 1, strategy)
    tr = prepare_training(s, strategy)
    adapter_ids = {id(p) for p in s.model.adapter_parameters().values()}
    rows = [tr.train_set.rows[i] for i in range(cfg.train.micro_batch_size)]
    batch = {k: v.to(strategy.device) for k, v in collate(rows, s.tokenizer.pad_token_id).items()}
    for _ in range(cfg.train.accumulation(1)):
        strategy.backward(tr.engine(batch["input_ids"], batch["attention_mask"], batch["labels"], s.task).loss)
    base = adapters = base_full = 0
    for p in s.model.parameters():
        local, full = strategy.local_numel(p)
        if id(p) in adapter_ids:
            adapters += local * p.element_size()
        else:
            base += local * p.element_size()
            base_full += full * p.element_size()
    zero_opt = tr.engine.optimizer
    inner = zero_opt.optimizer  # torch AdamW over this rank's fp32 partitions
    flat = getattr(zero_opt, "fp32_partitioned_groups_flat", None) or getattr(zero_opt, "single_partition_of_fp32_groups")
    master = sum(p.numel() * p.element_size() for p in flat)
    moments = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    figures = {"rank": strategy.rank, "world": strategy.world_size, "base_bytes": base, "base_full_bytes": base_full,
               "adapter_bytes": adapters, "optimizer_bytes": master + moments, "master_bytes": master,
               "moment_bytes": moments,
               "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (out / f"rank{strategy.rank}.json").write_text(json.dumps(figures))
    strategy.close()  # as the trainer does: gloo threads left running can abort the exit


def run(ranks: int, config: str, overrides: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               __file__, "--worker", tmp, config, *overrides, f"run.dir={tmp}/run"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{ranks}-rank run failed:\n{proc.stderr[-4000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args()
    overrides = ["distributed.param_persistence_threshold=0", *args.overrides]
    if args.worker:
        return worker(args.config, overrides, Path(args.worker))
    one, many = run(1, args.config, overrides), run(args.ranks, args.config, overrides)
    mib = lambda b: f"{b / 2**20:9.2f} MiB"  # noqa: E731
    print(f"{'per rank':<22}{'1 rank':>14}{f'{args.ranks} ranks (max)':>18}{'ratio':>8}")
    result = {"ranks": args.ranks, "config": args.config}
    for key, label in (("base_bytes", "frozen base"), ("adapter_bytes", "experts+gates+disc"),
                       ("master_bytes", "fp32 master copy"), ("moment_bytes", "Adam moments"),
                       ("optimizer_bytes", "optimizer state"), ("max_rss_bytes", "peak RSS")):
        a, b = one[0][key], max(r[key] for r in many)
        print(f"{label:<22}{mib(a):>14}{mib(b):>18}{b / a:>8.3f}")
        result[key] = {"1": a, str(args.ranks): [r[key] for r in many], "ratio": b / a}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
