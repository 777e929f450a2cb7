"""Option scoring, generation and evaluation sharding, checked against direct computations."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from trainer.config import DataConfig, ExpertsConfig
from trainer.data import PromptFormat, collate, load_tasks
from trainer.distributed import Strategy
from trainer.evaluate import _classify, evaluate
from trainer.model import IGNORE, MoECLModel

from .conftest import DATA, run_cli


@pytest.fixture()
def model(tiny_base):
    m = MoECLModel(tiny_base, ["agnews", "yelp"], ExpertsConfig(dropout=0.0))
    m.add_task("agnews")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def test_cached_option_scoring_equals_scoring_each_sequence(model):
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    options = [[20], [21, 22, 23], [24, 25]]
    batch = collate([{"input_ids": p} for p in prompts], pad_id=0, left=True, keys=("input_ids",))
    width = max(map(len, options))
    opts = torch.tensor([o + [IGNORE] * (width - len(o)) for o in options])
    fast = model.option_logprobs(batch["input_ids"], batch["attention_mask"], opts, "agnews")
    for i, p in enumerate(prompts):
        for j, o in enumerate(options):
            ids = torch.tensor([p + o])
            with torch.no_grad():
                hidden = model.hidden_states(ids, torch.ones_like(ids), "agnews")
                logp = torch.log_softmax(model.base.get_output_embeddings()(hidden[0]), dim=-1)
            expected = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(o))
            assert fast[i, j].item() == pytest.approx(expected.item(), abs=1e-4)


def test_single_token_fast_path_agrees_with_likelihood_scoring(model, smollm2_tokenizer, tmp_path):
    cfg = DataConfig(root=str(DATA), order=["agnews"], max_length=96, cache_dir=str(tmp_path), max_eval_examples=16)
    task = load_tasks(cfg, 0)[0]
    enc = PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")
    rows = list(enc.rows)
    fast = _classify(model, enc, rows, smollm2_tokenizer.pad_token_id, Strategy())
    batch = collate([{"input_ids": r["input_ids"][: r["prompt_len"]]} for r in rows], smollm2_tokenizer.pad_token_id,
                    left=True, keys=("input_ids",))
    scores = model.option_logprobs(batch["input_ids"], batch["attention_mask"], torch.tensor(enc.options), "agnews")
    assert torch.equal(fast, scores.argmax(-1))


def test_batched_left_padded_generation_equals_one_by_one(model, smollm2_tokenizer):
    prompts = [[1, 9690, 198, 5, 6, 7], [1, 30, 40], [1, 50, 60, 70, 80]]
    tok = smollm2_tokenizer
    batch = collate([{"input_ids": p} for p in prompts], tok.pad_token_id, left=True, keys=("input_ids",))
    together = model.generate(batch["input_ids"], batch["attention_mask"], "agnews", 6, tok.pad_token_id, -1)
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        alone = model.generate(ids, torch.ones_like(ids), "agnews", 6, tok.pad_token_id, -1)
        assert together[i].tolist() == alone[0].tolist()


class _SimulatedRank(Strategy):
    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world


def test_eval_shards_cover_every_row_once_with_equal_batches():
    for n in (0, 1, 7, 8, 13):
        shards = [_SimulatedRank(r, 3).shard(n) for r in range(3)]
        assert len({len(idx) for idx, _ in shards}) == 1  # every rank runs the same number of rows
        real = sorted(i for idx, valid in shards for i, v in zip(idx, valid) if v)
        assert real == list(range(n))


def test_evaluate_counts_only_real_rows(model, smollm2_tokenizer, tmp_path):
    cfg = DataConfig(root=str(DATA), order=["agnews"], max_length=96, cache_dir=str(tmp_path), max_eval_examples=10)
    enc = PromptFormat(smollm2_tokenizer, cfg).encode(load_tasks(cfg, 0)[0], "test")
    whole = evaluate(model, enc, smollm2_tokenizer, 4, 4, Strategy())
    parts = [evaluate(model, enc, smollm2_tokenizer, 4, 4, _SimulatedRank(r, 3)) for r in range(3)]
    assert whole["total"] == 10 and sum(p["total"] for p in parts) == 10
    assert sum(p["correct"] for p in parts) == whole["correct"]


def test_generative_task_is_learned_and_scored_by_exact_match(tmp_path, model_cache):
    """A JSONL instruction task end to end: the untrained model never answers exactly, the trained one does."""
    folder = tmp_path / "data" / "capital"
    folder.mkdir(parents=True)
    rows = [{"instruction": "Name the capital city.", "input": f"Country number {i}.", "output": "Paris"} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]))
    run_cli("sequence", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", f"model.cache_dir={model_cache}",
            f"data.cache_dir={tmp_path / 'cache'}", f"data.root={tmp_path / 'data'}", "data.order=[capital]",
            "data.max_train_examples=null", "data.max_eval_examples=null", "train.lr=1e-2", "train.max_steps=40",
            "train.warmup_ratio=0", "experts.rank=8", "eval.max_new_tokens=4")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["baseline"] == [0.0]
    assert metrics["accuracy"] == [[1.0]]


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of tensor storage alive at once, counted at every op's outputs (CPU tensors)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                self.seen.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key, size):
        self.seen.discard(key)
        self.live -= size


def test_option_scoring_memory_is_bounded_whatever_the_number_of_options(model):
    """Likelihood scoring copies a prompt's key/value cache per (row, option) pair: with at most
    `max_pairs` pairs per forward, the peak tensor memory does not grow with the number of options, and the
    scores are those of scoring every option at once."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12] * 4, [11, 12] * 6, [13, 14, 15] * 5]
    batch = collate([{"input_ids": p} for p in prompts], pad_id=0, left=True, keys=("input_ids",))
    peaks = {}
    for k in (4, 16):
        options = torch.tensor([[20 + j, 40 + j, 60 + j] for j in range(k)])
        whole = model.option_logprobs(batch["input_ids"], batch["attention_mask"], options, "agnews")
        with _LiveBytes() as live:
            bounded = model.option_logprobs(batch["input_ids"], batch["attention_mask"], options, "agnews", max_pairs=6)
        assert torch.allclose(bounded, whole, atol=1e-5)
        peaks[k] = live.peak
    assert peaks[16] <= 1.1 * peaks[4], peaks
    # more rows than pairs: the rows in turn, the same scores
    options = torch.tensor([[20, 21], [22, IGNORE]])
    assert torch.allclose(model.option_logprobs(batch["input_ids"], batch["attention_mask"], options, "agnews", max_pairs=1),
                          model.option_logprobs(batch["input_ids"], batch["attention_mask"], options, "agnews"), atol=1e-5)


class _Widths(Strategy):
    """One process, recording the padded width of every evaluation forward's prompts."""

    def __init__(self):
        self.widths = []

    def run(self, model, entry, *args, **kwargs):
        self.widths.append(tuple(args[0].shape))
        return super().run(model, entry, *args, **kwargs)


def test_each_rank_evaluates_its_rows_shortest_prompt_first(model, smollm2_tokenizer, tmp_path):
    """Batches of similar prompt lengths: the padded tokens are those of the rows sorted by length, and the
    predictions come back in row order (the same as one row at a time)."""
    cfg = DataConfig(root=str(DATA), order=["agnews"], max_length=512, cache_dir=str(tmp_path), max_eval_examples=12)
    enc = PromptFormat(smollm2_tokenizer, cfg).encode(load_tasks(cfg, 0)[0], "test")
    lengths = sorted(r["prompt_len"] for r in enc.rows)
    assert len(set(lengths)) > 4  # rows of many lengths
    strategy = _Widths()
    batched = evaluate(model, enc, smollm2_tokenizer, 4, 4, strategy)
    assert sum(rows * width for rows, width in strategy.widths) == sum(max(lengths[i:i + 4]) * 4 for i in range(0, 12, 4))
    assert batched["predictions"] == evaluate(model, enc, smollm2_tokenizer, 1, 4, Strategy())["predictions"]
