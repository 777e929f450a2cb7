"""Rebuild the bundled MTL5 subset (data/mtl5) from the full set in ../shared/data/mtl5.

    python tools/make_mtl5_subset.py [--src ../shared/data/mtl5] [--out data/mtl5] [--train 300] [--test 150]

Rows are copied verbatim: a seeded, class-balanced selection per task and split, in the same
CL_Benchmark format (`{sentence, label}` lists + labels.json).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = ("agnews", "amazon", "dbpedia", "yahoo", "yelp")


def balanced(rows: list[dict], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    picked: list[dict] = []
    while len(picked) < min(n, len(rows)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="../shared/data/mtl5")
    ap.add_argument("--out", default="data/mtl5")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for task in TASKS:
        src, out = Path(args.src) / task, Path(args.out) / task
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.json").write_text((src / "labels.json").read_text())
        for split, n in (("train", args.train), ("test", args.test)):
            rows = json.loads((src / f"{split}.json").read_text())
            sub = balanced(rows, n, args.seed)
            (out / f"{split}.json").write_text(json.dumps(sub, ensure_ascii=False, indent=0) + "\n")
            print(f"{task}/{split}: {len(sub)} of {len(rows)} rows")


if __name__ == "__main__":
    main()
