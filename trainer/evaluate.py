"""Task accuracy with the task id known: that task's expert (if learned) plus the shared expert.

Classification compares the model's scores of the options: one forward pass per batch when every
option is a single distinct token (the logit of each option's token after the prompt), otherwise
the mean log-probability of each option's tokens. Generation: greedy decoding, exact match.
Every rank evaluates its shard (padded to equal length) and the counts are all-reduced.
"""

from __future__ import annotations

import torch

from .data import Encoded, collate
from .distributed import Strategy
from .model import IGNORE, MoECLModel


@torch.no_grad()
def evaluate(model: MoECLModel, enc: Encoded, tokenizer, batch_size: int, max_new_tokens: int,
             strategy: Strategy, per_row: bool = False, option_pairs: int | None = None) -> dict:
    """{"accuracy", "correct", "total"} of `model` on one encoded split, over all ranks, and this
    rank's "predictions" (class index or text per row, in row order); with `per_row`, also
    "correct_rows": whether each row of the split was answered right (the same list on every rank).
    Each rank runs its shard's rows shortest prompt first (less padding per batch); `option_pairs`
    bounds likelihood scoring's (row, option) pairs per forward (see `MoECLModel.option_logprobs`)."""
    was_training = model.training
    model.eval()
    indices, valid = strategy.shard(len(enc.rows))
    by_length = sorted(range(len(indices)), key=lambda j: enc.rows[indices[j]]["prompt_len"])
    correct, predictions, right = 0, [None] * len(indices), torch.zeros(len(enc.rows), dtype=torch.float64)
    for start in range(0, len(by_length), batch_size):
        batch = by_length[start:start + batch_size]
        rows = [enc.rows[indices[j]] for j in batch]
        preds = predict_batch(model, enc, rows, tokenizer, max_new_tokens, strategy, option_pairs)
        for j, row, pred in zip(batch, rows, preds):
            if valid[j]:
                target = row["label"] if enc.task.kind == "classification" else row["target"].strip()
                correct += int(pred == target)
                right[indices[j]] = float(pred == target)
                predictions[j] = pred
    predictions = [p for p, keep in zip(predictions, valid) if keep]
    totals = strategy.all_reduce({"correct": correct, "total": int(sum(valid))})
    model.train(was_training)
    out = {"accuracy": totals["correct"] / max(totals["total"], 1), "correct": int(totals["correct"]),
           "total": int(totals["total"]), "predictions": predictions}
    if per_row:
        out["correct_rows"] = (strategy.all_sum(right) > 0).tolist()
    return out


def predict_batch(model: MoECLModel, enc: Encoded, rows: list[dict], tokenizer, max_new_tokens: int,
                  strategy: Strategy, option_pairs: int | None = None) -> list:
    """The predicted class index (classification) or stripped greedy text (generation) of each row. Every
    pass runs through `strategy.run` (the root module's entry; see MoECLModel.forward)."""
    if enc.task.kind == "classification":
        return _classify(model, enc, rows, tokenizer.pad_token_id, strategy, option_pairs).tolist()
    return _generate(model, enc, rows, tokenizer, max_new_tokens, strategy)


def single_token_options(options: list[list[int]]) -> bool:
    return all(len(o) == 1 for o in options) and len({o[0] for o in options}) == len(options)


def _classify(model: MoECLModel, enc: Encoded, rows: list[dict], pad_id: int, strategy: Strategy,
              option_pairs: int | None = None) -> torch.Tensor:
    """Predicted class per row: (batch,)"""
    task, device = enc.task.name, strategy.device
    prompts = [{"input_ids": r["input_ids"][: r["prompt_len"]]} for r in rows]
    if single_token_options(enc.options):
        batch = {k: v.to(device) for k, v in collate(prompts, pad_id, keys=("input_ids",)).items()}
        logits = strategy.run(model, "option_token_logits", batch["input_ids"], batch["attention_mask"], task,
                              [o[0] for o in enc.options])
        return logits.argmax(dim=-1).cpu()
    # Multi-token options: the likelihood of each whole answer, end-of-answer token included.
    batch = {k: v.to(device) for k, v in collate(prompts, pad_id, left=True, keys=("input_ids",)).items()}
    answers = [o + [enc.eos] for o in enc.options]
    width = max(len(a) for a in answers)
    options = torch.tensor([a + [IGNORE] * (width - len(a)) for a in answers], device=device)
    scores = strategy.run(model, "option_logprobs", batch["input_ids"], batch["attention_mask"], options, task,
                          option_pairs)
    return scores.argmax(dim=-1).cpu()


def _generate(model: MoECLModel, enc: Encoded, rows: list[dict], tokenizer, max_new_tokens: int,
              strategy: Strategy) -> list[str]:
    batch = collate([{"input_ids": r["input_ids"][: r["prompt_len"]]} for r in rows], tokenizer.pad_token_id,
                    left=True, keys=("input_ids",))
    batch = {k: v.to(strategy.device) for k, v in batch.items()}
    new = strategy.run(model, "generate", batch["input_ids"], batch["attention_mask"], enc.task.name, max_new_tokens,
                       tokenizer.pad_token_id, tokenizer.eos_token_id, synced=strategy.world_size > 1)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
