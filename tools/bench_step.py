"""What MoE-CL costs per training step, against one plain LoRA, in one process on the same model.

    python tools/bench_step.py [--model builtin:smollm2-135m-instruct] [--batch 4] [--seq 128] [--reps 7]

Variants, all on the same frozen base, batch (real MTL5 rows, answer-only loss) and sequence length,
each a full optimizer step (forward + backward + AdamW):

  lora      a plain PEFT LoRA on gate/up/down (rank, alpha as the experts): the reference
  lora_ours this project's per-task LoRA (experts.method=per_task_lora): the benchmark's baseline, on
            the same LoRA code (dropout, matmul dtype) as MoE-CL
  moe_cl    this project's MoE-CL MLP (shared + task expert, gate, discriminators), 1 task learned
  naive     the same mixture computed as the reference code does: each expert a full LoRA MLP,
            base projections (down included) run once per expert
  tasks4/16 moe_cl after 4 and 16 learned tasks (the step should not grow with them)
  stage2    moe_cl at its second stage (one earlier task, frozen): the reference for the two below
  noise     stage2 with experts.discriminator_extra=noise (ACL's "not a task" samples, as many as rows)
  memory    stage2 with experts.discriminator_extra=memory: each step also runs `--memory-batch` rows
            of the earlier task (--memory-task) through the model for the discriminator loss; the
            default keeps bench_cpu.yaml's ratio, 2 memory rows per 8 training rows

Steps run round-robin over the variants (drift on a shared machine hits all alike); the median of
`--reps` timed steps after 2 warm-up steps is reported. Memory: on CUDA, peak allocated bytes per
step; on CPU (no allocator statistics), the bytes autograd saves for backward in one step (the
activation memory that differs between variants) plus trainable parameters and Adam state.
Evaluation throughput: examples/s of option scoring (one forward per batch) vs greedy generation of
the answer on the same test rows. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.base import load_base  # noqa: E402
from trainer.config import DataConfig, ExpertsConfig, ModelConfig  # noqa: E402
from trainer.data import PromptFormat, collate, load_tasks  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.model import MoECLModel, answer_loss  # noqa: E402
from trainer.moe import SHARED, masked_mean  # noqa: E402
from trainer.distributed import LocalStrategy  # noqa: E402


def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The two-expert mixture as the reference computes it: each expert a whole LoRA-adapted MLP."""
    base, route, drop = self.base, self.routing, self.dropout
    outs = []
    for e in (self.experts[SHARED], self.experts[route.task]):  # each LoRA with its own dropout, as PEFT
        h = base.act_fn(base.gate_proj(x) + e.gate_proj(drop(x))) * (base.up_proj(x) + e.up_proj(drop(x)))
        outs.append(base.down_proj(h) + e.down_proj(drop(h)))
    w = self.gate_for(route.task)(x).to(x.dtype)
    if route.pool:  # the discriminators read the shared expert's pooled output, as in MoE-CL
        route.pooled[self.layer_index] = masked_mean(outs[0], route.mask)
    return w[..., :1] * outs[0] + w[..., 1:] * outs[1]


class Variant:
    """One model + optimizer; `step(batch)` runs forward, backward and AdamW."""

    def __init__(self, name: str, model: torch.nn.Module, params: list, loss_fn):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.params = params
        self.weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.times: list[float] = []
        self.saved_bytes = 0
        self.peak_bytes = 0

    def step(self, batch: dict, record: bool) -> None:
        cuda = batch["input_ids"].is_cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        saved: dict[int, int] = {}

        def pack(t):  # activations only: weights autograd keeps a reference to are not new memory
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.weight_ptrs:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        if record:
            self.times.append(time.perf_counter() - t0)
            self.saved_bytes = sum(saved.values())

    def state_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.params)
        moments = sum(t.numel() * t.element_size() for st in self.opt.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        return params + moments


def moecl_variant(name: str, base, order: list[str], task: str, cfg: ExpertsConfig, naive: bool = False,
                  method: str = "moe_cl", extra: str = "none", memory: dict | None = None) -> Variant:
    """`memory`: a collated batch of an earlier task's rows (order[0]) run with every step (extra=memory)."""
    model = MoECLModel(copy.deepcopy(base), order, dataclasses.replace(cfg, method=method, discriminator_extra=extra))
    for t in order[: order.index(task) + 1]:
        model.add_task(t)
    if naive:
        for layer in model.moe_layers:
            layer.forward = types.MethodType(naive_forward, layer)
    model.train()
    params = model.freeze_all_but(task)
    stored = memory and (memory["input_ids"], memory["attention_mask"], order[0])
    return Variant(name, model, params,
                   lambda m, b: m(b["input_ids"], b["attention_mask"], b["labels"], task, stored).loss)


def lora_variant(base, cfg: ExpertsConfig) -> Variant:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=["gate_proj", "up_proj", "down_proj"],
        bias="none"))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    inner = peft_model.base_model.model

    def loss(m, b):
        hidden = inner.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     use_cache=False).last_hidden_state
        return answer_loss(inner.get_output_embeddings(), hidden, b["labels"])

    return Variant("lora", peft_model, params, loss)


def eval_throughput(model: MoECLModel, enc, tok, batch_size: int, device) -> dict:
    """Examples/s of option scoring (the trainer's evaluation) vs greedy generation of the answer."""
    t0 = time.perf_counter()
    scored = evaluate(model, enc, tok, batch_size, 0, LocalStrategy())
    t_score = time.perf_counter() - t0
    new_tokens = max(len(o) for o in enc.options) + 1  # the answer and its end-of-turn token
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(enc.rows), batch_size):
            rows = [enc.rows[i] for i in range(start, min(len(enc.rows), start + batch_size))]
            batch = collate([{"input_ids": r["input_ids"][: r["prompt_len"]]} for r in rows], tok.pad_token_id,
                            left=True, keys=("input_ids",))
            model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), enc.task.name,
                           new_tokens, tok.pad_token_id, tok.eos_token_id)
    t_gen = time.perf_counter() - t0
    n = len(enc.rows)
    return {"eval_rows": n, "scoring_examples_per_s": n / t_score, "generation_examples_per_s": n / t_gen,
            "generation_new_tokens": new_tokens, "scoring_over_generation": t_gen / t_score,
            "scoring_accuracy": scored["accuracy"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--cache-dir", default="~/.cache/moe-cl/models")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--task", default="agnews")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--memory-task", default="amazon")
    ap.add_argument("--memory-batch", type=int, default=None, help="default: a quarter of --batch, at least 1")
    args = ap.parse_args(argv)
    if args.memory_task == args.task:
        ap.error("--memory-task must differ from --task: it is the earlier stage's task")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok, folder = load_base(ModelConfig(path=args.model, cache_dir=args.cache_dir, dtype=args.dtype))
    base.to(device)
    data_cfg = DataConfig(root=str(REPO / "data" / "mtl5"), order=[args.task, args.memory_task], max_length=args.seq,
                          answer="label", system_prompt="", max_eval_examples=args.eval_rows)
    task, earlier = load_tasks(data_cfg, 0)
    fmt = PromptFormat(tok, data_cfg)
    enc = fmt.encode(task, "train")

    def longest(rows, n):  # the longest rows first: every variant sees the same batch, close to --seq tokens
        rows = sorted(rows, key=lambda r: -len(r["input_ids"]))[:n]
        return {k: v.to(device) for k, v in collate(rows, tok.pad_token_id).items()}

    batch = longest(enc.rows, args.batch)
    memory = longest(fmt.encode(earlier, "train").rows, args.memory_batch or max(1, args.batch // 4))
    cfg = ExpertsConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05)
    tasks16 = [f"t{i:02d}" for i in range(15)] + [args.task]
    variants = [lora_variant(base, cfg),
                moecl_variant("lora_ours", base, [args.task], args.task, cfg, method="per_task_lora"),
                moecl_variant("moe_cl", base, [args.task], args.task, cfg),
                moecl_variant("naive", base, [args.task], args.task, cfg, naive=True),
                moecl_variant("tasks4", base, tasks16[-4:], args.task, cfg),
                moecl_variant("tasks16", base, tasks16, args.task, cfg),
                moecl_variant("stage2", base, [earlier.name, args.task], args.task, cfg),
                moecl_variant("noise", base, [earlier.name, args.task], args.task, cfg, extra="noise"),
                moecl_variant("memory", base, [earlier.name, args.task], args.task, cfg, extra="memory",
                              memory=memory)]
    tokens = int(batch["attention_mask"].sum())
    print(f"model {folder} ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params, {base.dtype}) on {device}, "
          f"{torch.get_num_threads()} threads; batch {args.batch} x {batch['input_ids'].shape[1]} tokens "
          f"({tokens} real); {args.reps} timed steps per variant after 2 warm-up", flush=True)
    for rep in range(args.reps + 2):
        for v in variants:
            v.step(batch, record=rep >= 2)
        print(f"  round {rep + 1}/{args.reps + 2} done", file=sys.stderr, flush=True)
    by = {v.name: v for v in variants}
    med = {v.name: statistics.median(v.times) for v in variants}
    print(f"\n{'variant':<10} {'median step':>12} {'tokens/s':>10} {'saved for bwd':>14} {'params+Adam':>12}"
          + ("  peak CUDA" if device.type == "cuda" else ""))
    for v in variants:
        print(f"{v.name:<10} {med[v.name] * 1000:>10.0f}ms {tokens / med[v.name]:>10.0f} "
              f"{v.saved_bytes / 2**20:>11.1f}MiB {v.state_bytes() / 2**20:>9.2f}MiB"
              + (f"  {v.peak_bytes / 2**20:.0f}MiB" if device.type == "cuda" else ""))
    figures = {
        "device": device.type, "model": str(folder), "dtype": str(base.dtype).removeprefix("torch."),
        "batch": args.batch, "seq": int(batch["input_ids"].shape[1]), "tokens": tokens, "reps": args.reps,
        "threads": torch.get_num_threads(),
        "step_seconds": med, "tokens_per_s": {k: tokens / t for k, t in med.items()},
        "saved_bytes": {v.name: v.saved_bytes for v in variants},
        "moe_cl_over_lora": med["moe_cl"] / med["lora"],
        "moe_cl_over_lora_ours": med["moe_cl"] / med["lora_ours"],
        "naive_over_lora": med["naive"] / med["lora"],
        "tasks4_over_tasks1": med["tasks4"] / med["moe_cl"],
        "tasks16_over_tasks1": med["tasks16"] / med["moe_cl"],
        "memory_rows": int(memory["input_ids"].shape[0]),
        "noise_over_stage2": med["noise"] / med["stage2"],
        "memory_over_stage2": med["memory"] / med["stage2"],
        "saved_moe_cl_over_lora": by["moe_cl"].saved_bytes / by["lora"].saved_bytes,
        "saved_naive_over_lora": by["naive"].saved_bytes / by["lora"].saved_bytes,
    }
    if device.type == "cuda":
        figures["peak_bytes"] = {v.name: v.peak_bytes for v in variants}
    print(f"\nstep time  moe_cl/lora {figures['moe_cl_over_lora']:.3f} (target <= 1.10)   moe_cl/lora_ours "
          f"{figures['moe_cl_over_lora_ours']:.3f}   naive/lora "
          f"{figures['naive_over_lora']:.3f}   16 tasks/1 task {figures['tasks16_over_tasks1']:.3f} (target <= 1.05)"
          f"   4 tasks/1 task {figures['tasks4_over_tasks1']:.3f}")
    print(f"discriminator extras at stage 2  noise/stage2 {figures['noise_over_stage2']:.3f}   memory/stage2 "
          f"{figures['memory_over_stage2']:.3f} ({figures['memory_rows']} memory rows per {args.batch})")
    print(f"saved for backward  moe_cl/lora {figures['saved_moe_cl_over_lora']:.3f}   naive/lora "
          f"{figures['saved_naive_over_lora']:.3f}")
    model = by["moe_cl"].model
    del variants, by
    test = fmt.encode(task, "test")
    figures.update(eval_throughput(model, test, tok, 16, device))
    print(f"evaluation on {figures['eval_rows']} {args.task} test rows: option scoring "
          f"{figures['scoring_examples_per_s']:.2f} examples/s, greedy generation of {figures['generation_new_tokens']} "
          f"tokens {figures['generation_examples_per_s']:.2f} examples/s (scoring {figures['scoring_over_generation']:.1f}x faster)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
