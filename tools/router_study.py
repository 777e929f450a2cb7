"""Which layer and statistic should the task router use? Routing accuracy per layer, measured.

    python tools/router_study.py [--model builtin:smollm2-135m-instruct] [--data ../shared/data/mtl5]
                                 [--tasks dbpedia,amazon,yahoo,agnews,yelp] [--rows 1000] [--eval-rows 300]
                                 [--split val] [--layers 0,1,2,3,4,5,6,8,10,15,20,30]

For every task, the router's features (`MoECLModel.base_features`: the frozen base's first L layers and
its final norm on the row's own text, averaged over the text's tokens) of `--rows` training rows (as
`router.max_rows` picks them) and of `--eval-rows` rows of `--split` (the validation split by default:
the choice must not be made on the test rows it is then reported on). All layers come from one pass
(the decoder's hidden states; the script checks they equal `base_features` at one layer). Then, per
layer, the share of each task's rows routed to it by three statistics, for the first four tasks
(MTL5 order 1) and for all of them:

  lda s    shared covariance shrunk by s towards its mean variance (the router's, router.shrinkage = s)
  diag     shared per-dimension variance only (a diagonal covariance)
  mean     nearest mean (Euclidean)

what the prefix of L layers costs against a full forward of the same rows, and, at
`--confusion-layer`, where each task's rows are routed. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.base import load_base  # noqa: E402
from trainer.config import DataConfig, ExpertsConfig, ModelConfig  # noqa: E402
from trainer.data import load_tasks  # noqa: E402
from trainer.distributed import LocalStrategy  # noqa: E402
from trainer.model import MoECLModel  # noqa: E402
from trainer.moe import masked_mean  # noqa: E402
from trainer.router import Router, gather_features, request_ids, request_text  # noqa: E402


@torch.no_grad()
def all_layer_features(model: MoECLModel, ids: list[list[int]], batch: int, pad: int, deepest: int) -> torch.Tensor:
    """(deepest + 1, rows, hidden) float64: base_features at every depth up to `deepest`, from one pass."""
    decoder = model.base.get_decoder()
    model._route(None, None, collect=False, base_only=True)
    every, out = decoder.layers, []
    decoder.layers = every[:deepest]
    try:
        for start in range(0, len(ids), batch):
            out.append(_layer_features(decoder, ids[start:start + batch], pad))
    finally:
        decoder.layers = every
    return torch.cat(out, dim=1)


def _layer_features(decoder, rows: list[list[int]], pad: int) -> torch.Tensor:
    """(deepest + 1, batch, hidden) for one batch."""
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    states = decoder(input_ids=x, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    keep = mask.clone()
    keep[:, 0] = 0
    # hidden_states[L] is the input of layer L (the last entry is already normed by the decoder)
    normed = [decoder.norm(h) for h in states[:-1]] + [states[-1]]
    return torch.stack([masked_mean(h.float(), keep).double() for h in normed])


def accuracy(train: dict, held: dict, names: list[str], layer: int, statistic: str, shrink: float) -> dict:
    if statistic == "lda":
        r = Router(layer, shrinkage=shrink)
        for t in names:
            r = r.with_task(t, train[t][layer])
        return {t: sum(x == t for x in r.route(held[t][layer]).tasks) / len(held[t][layer]) for t in names}
    mus = torch.stack([train[t][layer].mean(0) for t in names])
    var = sum(((train[t][layer] - train[t][layer].mean(0)) ** 2).sum(0) for t in names) / \
        (sum(len(train[t][layer]) for t in names) - len(names))
    out = {}
    for t in names:
        diff = held[t][layer][:, None, :] - mus[None]
        dist = (diff ** 2 / var.clamp_min(1e-12)).sum(-1) if statistic == "diag" else (diff ** 2).sum(-1)
        out[t] = sum(names[i] == t for i in dist.argmin(-1).tolist()) / len(diff)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--cache-dir", default="~/.cache/moe-cl/models", help="where builtin: models are materialised")
    ap.add_argument("--data", default="../shared/data/mtl5")
    ap.add_argument("--tasks", default="dbpedia,amazon,yahoo,agnews,yelp")
    ap.add_argument("--rows", type=int, default=1000, help="training rows per task (router.max_rows)")
    ap.add_argument("--eval-rows", type=int, default=300, help="rows of --split per task")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--layers", default="0,1,2,3,4,5,6,8,10,15,20,30")
    ap.add_argument("--max-length", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--confusion-layer", type=int, default=4, help="print where each task's rows are routed at this layer")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    names = args.tasks.split(",")
    base, tok, folder = load_base(ModelConfig(path=args.model, dtype="float32", cache_dir=args.cache_dir))
    model = MoECLModel(base, names, ExpertsConfig()).eval()
    depth = base.config.num_hidden_layers
    layers = [x for x in map(int, args.layers.split(",")) if x <= depth]
    data = DataConfig(root=args.data, order=names, max_eval_examples=args.eval_rows, max_length=args.max_length)
    tasks = {t.name: t for t in load_tasks(data, 0)}
    train, held, t0 = {}, {}, time.time()
    for t in names:
        for split, rows in (("train", tasks[t].router_rows(args.rows, 0)), (args.split, getattr(tasks[t], args.split))):
            ids = request_ids(tok, [request_text(r) for r in rows], args.max_length)
            feats = all_layer_features(model, ids, args.batch, tok.pad_token_id, max(layers))
            (train if split == "train" else held)[t] = feats
            print(f"features: {t} {split} {len(rows)} rows ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    # The one-pass features are the router's own (checked at one layer on a few rows).
    check = request_ids(tok, [request_text(r) for r in getattr(tasks[names[0]], args.split)[:8]], args.max_length)
    direct = gather_features(model, check, layers[len(layers) // 2], LocalStrategy("cpu"), args.batch, tok.pad_token_id)
    gap = (direct - held[names[0]][layers[len(layers) // 2]][:8]).abs().max().item()
    assert gap < 1e-4, f"one-pass features differ from base_features by {gap}"
    # Cost of a prefix of L layers against a full forward, on the same rows.
    sample = request_ids(tok, [request_text(r) for t in names for r in tasks[t].test[:16]], args.max_length)
    cost = {}
    for layer in ["full", *layers]:  # "full": every layer of the base
        t1 = time.time()
        gather_features(model, sample, depth if layer == "full" else layer, LocalStrategy("cpu"), args.batch,
                        tok.pad_token_id)
        cost[layer] = time.time() - t1
    results = {"model": args.model, "rows": args.rows, "split": args.split, "eval_rows": args.eval_rows, "sets": {}}
    sets = {f"order 1 ({', '.join(names[:4])})": names[:4], f"all {len(names)}": names}
    for label, subset in sets.items():
        print(f"\n{label}: share of each task's {args.split} rows routed to it (worst task / mean over tasks), %")
        stats = [("lda", s) for s in (0.05, 0.1, 0.2)] + [("diag", 0), ("mean", 0)]
        print("layer  cost  " + "  ".join(f"{s}{' ' + str(x) if s == 'lda' else '':<9}".ljust(13) for s, x in stats))
        rows = {}
        for layer in layers:
            cells = []
            for statistic, shrink in stats:
                acc = accuracy(train, held, subset, layer, statistic, shrink)
                rows.setdefault(layer, {})[f"{statistic}{shrink if statistic == 'lda' else ''}"] = acc
                cells.append(f"{100 * min(acc.values()):5.1f} /{100 * sum(acc.values()) / len(acc):5.1f}")
            print(f"{layer:>5}  {cost[layer] / cost['full']:4.2f}  " + "  ".join(c.ljust(13) for c in cells))
        results["sets"][label] = rows
    # Where the misrouted rows go: the router as the trainer builds it (router.layer, router.shrinkage).
    if args.confusion_layer in layers:
        r = Router(args.confusion_layer, shrinkage=0.1)
        for t in names:
            r = r.with_task(t, train[t][args.confusion_layer])
        confusion = {t: {u: c for u in names if (c := r.route(held[t][args.confusion_layer]).tasks.count(u))}
                     for t in names}
        print(f"\nlayer {args.confusion_layer}, lda 0.1, all {len(names)} tasks: {args.split} rows of each task (row) routed to "
              "each task (column)")
        print("".ljust(10) + "".join(u.rjust(9) for u in names))
        for t in names:
            print(t.ljust(10) + "".join(str(confusion[t].get(u, 0)).rjust(9) for u in names))
        results["confusion"] = {"layer": args.confusion_layer, "counts": confusion}
    results["cost_vs_full_forward"] = {k: round(v / cost["full"], 3) for k, v in cost.items() if k != "full"}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
