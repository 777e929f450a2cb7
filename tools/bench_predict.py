"""What serving without task ids costs: `predict` throughput with each request's task given vs routed.

    python tools/bench_predict.py BUNDLE [--data ../shared/data/mtl5] [--rows 64] [--reps 3] [--batch-size 16]

Requests are test rows of the bundle's tasks (`--rows` per task, from `--data`), once with "task" and
once without (the router picks it: one pass of the base's first `router.layer` layers per request,
then the routed pass). Both are served by one loaded bundle (`trainer.adapters.Server`, what `predict`
runs after reading the requests), alternating, each `--reps` times after a warm-up; the median
examples/s of each and their ratio are printed, with the routing accuracy on these rows. The last
line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.adapters import Server, read_requests  # noqa: E402
from trainer.config import DataConfig  # noqa: E402
from trainer.data import load_tasks  # noqa: E402
from trainer.distributed import LocalStrategy  # noqa: E402


# Requests that belong to no MTL5 task (written for this benchmark): how many does the router flag?
FOREIGN = [
    "What is 17 times 23?", "Solve for x: 3x + 7 = 22.", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;", "Translate 'good morning' into German.",
    "Write a haiku about the sea at night.", "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())",
    "List three prime numbers larger than 50.", "Summarise the plot of a heist film in two sentences.",
    "git rebase -i HEAD~3", "Convert 72 degrees Fahrenheit to Celsius.", "Explain recursion to a five-year-old.",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }", "Give me a regular expression that matches an email address.",
    "Bonjour, comment allez-vous aujourd'hui ?", "x^2 + y^2 = r^2 describes which shape?",
    "Draft a polite email declining a meeting invitation.", "What rhymes with orange?",
    "sudo apt-get install build-essential", "Hallo, wie spät ist es?", "Name the planets of the solar system in order.",
    "<html><body><h1>Hello</h1></body></html>", "Integrate sin(x) cos(x) dx.", "Tell me a joke about compilers.",
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default="../shared/data/mtl5")
    ap.add_argument("--rows", type=int, default=64, help="test rows per task")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    strategy = LocalStrategy()
    server = Server(Path(args.bundle), strategy)
    names = [t["name"] for t in server.ad.info["tasks"]]
    data = DataConfig(root=args.data, order=names, max_eval_examples=args.rows)
    rows = [{"task": t.name, "sentence": r["text"]} for t in load_tasks(data, 0) for r in t.test]
    tmp = Path(tempfile.mkdtemp())
    (tmp / "given.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "routed.jsonl").write_text("".join(json.dumps({"sentence": r["sentence"]}) + "\n" for r in rows))
    requests = {k: read_requests(tmp / f"{k}.jsonl", server.ad, routable=True) for k in ("given", "routed")}
    seconds: dict[str, list[float]] = {"given": [], "routed": []}
    outputs = {}
    for rep in range(args.reps + 1):  # the first round warms up (allocator, caches)
        for kind in ("given", "routed"):
            t0 = time.time()
            outputs[kind] = server.serve([dict(r) for r in requests[kind]], tmp / f"{kind}.jsonl", args.batch_size,
                                         fallback="routed")
            if rep:
                seconds[kind].append(time.time() - t0)
    foreign = server.serve([{"text": t, "_instruction": "", "_text": t, "_task": None} for t in FOREIGN],
                           Path("foreign requests"), args.batch_size, max_new_tokens=8)
    flagged = {"foreign": sum(bool(o.get("routed_confidence_low")) for o in foreign) / len(FOREIGN),
               "mtl5": sum(bool(o.get("routed_confidence_low")) for o in outputs["routed"]) / len(rows)}
    routed_right = sum(o["routed_task"] == r["task"] for o, r in zip(outputs["routed"], rows)) / len(rows)
    same = sum(o["prediction"] == g["prediction"] for o, g in zip(outputs["routed"], outputs["given"])) / len(rows)
    rate = {k: len(rows) / statistics.median(v) for k, v in seconds.items()}
    print(f"{len(rows)} requests ({args.rows} per task of {', '.join(names)}), batch {args.batch_size}, "
          f"median of {args.reps}")
    print(f"  task given:    {rate['given']:7.2f} examples/s")
    print(f"  task routed:   {rate['routed']:7.2f} examples/s   ({rate['routed'] / rate['given']:.3f} x given)")
    print(f"  routed to their own task: {100 * routed_right:.1f}%; same prediction as with the id: {100 * same:.1f}%")
    print(f"  flagged (routed_confidence below {server.router.min_confidence}): {100 * flagged['mtl5']:.1f}% of these "
          f"MTL5 requests, {100 * flagged['foreign']:.1f}% of {len(FOREIGN)} requests of no MTL5 task "
          f"(math, code, chat; served by the base: {sum(o.get('served_by') == 'base' for o in foreign)})")
    result = {"requests": len(rows), "flagged": flagged, "examples_per_s": rate, "ratio": rate["routed"] / rate["given"],
              "routing_accuracy": routed_right, "same_prediction": same,
              "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
