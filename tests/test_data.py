"""Task loading, validation errors, prompt formatting, truncation and batching, on real data and tokenizers."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from trainer.config import DataConfig
from trainer.data import (DataError, PromptFormat, collate, load_task, load_tasks, step_batches, steps_per_epoch,
                          subsample)
from trainer.model import IGNORE

from .conftest import DATA


def _cfg(tmp_path, **kw) -> DataConfig:
    base = dict(root=str(DATA), order=["agnews", "yelp"], cache_dir=str(tmp_path / "cache"), max_length=96)
    base.update(kw)
    return DataConfig(**base)


def _copy_task(tmp_path, name="agnews"):
    dst = tmp_path / "data" / name
    shutil.copytree(DATA / name, dst)
    return dst


def test_bundled_mtl5_loads_with_seeded_validation_split(tmp_path):
    cfg = _cfg(tmp_path)
    a = load_tasks(cfg, seed=0)
    b = load_tasks(cfg, seed=0)
    c = load_tasks(cfg, seed=1)
    agnews = a[0]
    assert agnews.kind == "classification" and agnews.labels == ["World", "Sports", "Business", "Science or Technology"]
    assert len(agnews.val) == 30 and len(agnews.train) == 270 and len(agnews.test) == 150
    assert [r["text"] for r in agnews.val] == [r["text"] for r in b[0].val]
    assert [r["text"] for r in agnews.val] != [r["text"] for r in c[0].val]
    assert not {r["text"] for r in agnews.val} & {r["text"] for r in agnews.train}


def test_subsets_are_balanced_and_fixed(tmp_path):
    t = load_tasks(_cfg(tmp_path, max_train_examples=40, max_eval_examples=20), seed=0)[0]
    counts = [sum(r["label"] == k for r in t.train) for k in range(4)]
    assert counts == [10, 10, 10, 10]
    t2 = load_tasks(_cfg(tmp_path, max_train_examples=40, max_eval_examples=20), seed=5)[0]
    assert [r["text"] for r in t.test] == [r["text"] for r in t2.test]  # test rows never depend on the seed
    assert len(subsample(t.train, 100, 0)) == len(t.train)


def test_prompt_uses_chat_template_and_labels_only_the_answer(tmp_path, smollm2_tokenizer):
    task = load_tasks(_cfg(tmp_path), seed=0)[0]
    fmt = PromptFormat(smollm2_tokenizer, _cfg(tmp_path))
    enc = fmt.encode(task, "test")
    row = enc.rows[0]
    text = smollm2_tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nWhat is the topic of this news article?" in text
    assert "A. World\nB. Sports\nC. Business\nD. Science or Technology" in text
    answer = [t for t in row["labels"] if t != IGNORE]
    assert answer == enc.options[row["label"]] + [smollm2_tokenizer.eos_token_id]
    assert row["labels"][: row["prompt_len"]] == [IGNORE] * row["prompt_len"]
    assert smollm2_tokenizer.decode(answer) == "ABCD"[row["label"]] + "<|im_end|>"
    assert enc.options == [[smollm2_tokenizer.convert_tokens_to_ids(c)] for c in "ABCD"]


def test_long_text_is_cut_inside_the_text_never_options_or_answer(tmp_path, smollm2_tokenizer):
    cfg = _cfg(tmp_path, max_length=140, order=["yelp"])
    task = load_tasks(cfg, seed=0)[0]
    fmt = PromptFormat(smollm2_tokenizer, cfg)
    enc = fmt.encode(task, "train")
    lengths = [len(r["input_ids"]) for r in enc.rows]
    assert max(lengths) <= 140 and sum(n >= 138 for n in lengths) > 10  # many yelp reviews were cut
    for row in enc.rows:
        text = smollm2_tokenizer.decode(row["input_ids"])
        assert "E. very positive\n\nAnswer with the letter of the correct option.<|im_end|>" in text
        assert text.endswith("ABCDE"[row["label"]] + "<|im_end|>")


def test_label_answers(tmp_path, smollm2_tokenizer):
    cfg = _cfg(tmp_path, answer="label")
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")
    row = enc.rows[0]
    answer = smollm2_tokenizer.decode([t for t in row["labels"] if t != IGNORE])
    assert answer == task.labels[row["label"]] + "<|im_end|>"
    assert "- Science or Technology" in smollm2_tokenizer.decode(row["input_ids"])


def test_tokenization_is_cached_by_datasets(tmp_path, smollm2_tokenizer):
    cfg = _cfg(tmp_path)
    task = load_tasks(cfg, seed=0)[0]
    PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")
    files = sorted((tmp_path / "cache").glob("agnews-test-*.arrow"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")
    assert files[0].stat().st_mtime_ns == mtime and len(again.rows) == 150
    PromptFormat(smollm2_tokenizer, _cfg(tmp_path, answer="label")).encode(task, "test")
    assert len(list((tmp_path / "cache").glob("agnews-test-*.arrow"))) == 2  # another format, another cache


def _sentencepiece_tokenizer(tmp_path):
    """A real Llama-2-style sentencepiece tokenizer, trained here on bundled text (no chat template)."""
    import sentencepiece as spm

    rows = json.loads((DATA / "agnews" / "train.json").read_text())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(r["sentence"] for r in rows), model_writer=model,
                                   vocab_size=800, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2)
    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    from trainer.base import load_tokenizer

    return load_tokenizer(folder)


def test_sentencepiece_tokenizer_without_chat_template(tmp_path):
    tok = _sentencepiece_tokenizer(tmp_path)
    assert type(tok).__name__ == "LlamaTokenizer" and not tok.chat_template
    cfg = _cfg(tmp_path, max_length=120)
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(tok, cfg).encode(task, "test")
    assert all(len(o) == 1 for o in enc.options) and len({o[0] for o in enc.options}) == 4
    for row in list(enc.rows)[:20]:
        assert row["input_ids"][0] == tok.bos_token_id and len(row["input_ids"]) <= 120
        assert tok.decode(row["input_ids"][: row["prompt_len"]]).rstrip().endswith("D. Science or Technology\n\nAnswer with the letter of the correct option.\nAnswer:")
        assert row["input_ids"][-1] == tok.eos_token_id


def test_generation_jsonl(tmp_path, smollm2_tokenizer):
    folder = tmp_path / "data" / "copy"
    folder.mkdir(parents=True)
    rows = [{"instruction": "Repeat the word.", "input": f"word{i}", "output": f"word{i}"} for i in range(12)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(tmp_path, root=str(tmp_path / "data"), order=["copy"])
    task = load_tasks(cfg, seed=0)[0]
    assert task.kind == "generation" and len(task.test) == 12
    enc = PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")
    row = enc.rows[0]
    assert smollm2_tokenizer.decode([t for t in row["labels"] if t != IGNORE]) == row["target"] + "<|im_end|>"
    assert "Repeat the word.\n\nword" in smollm2_tokenizer.decode(row["input_ids"])


# -- errors name the file, row and field --------------------------------------------------------

def test_malformed_json_names_file_and_line(tmp_path):
    d = _copy_task(tmp_path)
    (d / "train.json").write_text('[{"sentence": "x", "label": "World"},\n {"sentence": "y" "label": 1}]')
    with pytest.raises(DataError, match=r"agnews/train.json: line 2 column \d+: not valid JSON"):
        load_task(d, "agnews", _cfg(tmp_path), 0)


def test_label_missing_from_labels_json(tmp_path):
    d = _copy_task(tmp_path)
    rows = json.loads((d / "test.json").read_text())
    rows[7]["label"] = "Weather"
    (d / "test.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"test.json: row 7: field 'label' is 'Weather', which is not in .*labels.json"):
        load_task(d, "agnews", _cfg(tmp_path), 0)


def test_missing_field_empty_split_missing_file(tmp_path):
    d = _copy_task(tmp_path)
    rows = json.loads((d / "train.json").read_text())
    del rows[3]["sentence"]
    (d / "train.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"train.json: row 3: field 'sentence' is missing"):
        load_task(d, "agnews", _cfg(tmp_path), 0)
    (d / "train.json").write_text("[]")
    with pytest.raises(DataError, match=r"train.json: the train split is empty"):
        load_task(d, "agnews", _cfg(tmp_path), 0)
    (d / "test.json").unlink()
    (d / "train.json").write_text(json.dumps([{"sentence": "x", "label": "World"}] * 3))
    with pytest.raises(DataError, match=r"test.json: file is missing"):
        load_task(d, "agnews", _cfg(tmp_path), 0)
    with pytest.raises(DataError, match=r"holds neither train.json"):
        load_task(tmp_path / "nowhere", "nowhere", _cfg(tmp_path), 0)


def test_task_listed_twice_and_bad_root(tmp_path):
    with pytest.raises(DataError, match=r"\['agnews'\] listed more than once"):
        load_tasks(_cfg(tmp_path, order=["agnews", "yelp", "agnews"]), 0)
    with pytest.raises(DataError, match="is not a folder"):
        load_tasks(_cfg(tmp_path, root=str(tmp_path / "missing")), 0)


def test_jsonl_errors_name_the_line(tmp_path):
    folder = tmp_path / "data" / "gen"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    (folder / "test.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: field 'output' is missing"):
        load_task(folder, "gen", _cfg(tmp_path), 0)
    (folder / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"train.jsonl: line 2: not valid JSON"):
        load_task(folder, "gen", _cfg(tmp_path), 0)


def test_prompt_that_cannot_fit_names_the_row(tmp_path, smollm2_tokenizer):
    cfg = _cfg(tmp_path, max_length=40)
    task = load_tasks(cfg, seed=0)[0]
    with pytest.raises(DataError, match=r"agnews/test.json row \d+: the prompt frame and answer take \d+ of data.max_length=40 tokens"):
        PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")


# -- batching -------------------------------------------------------------------------------------

def test_collate_pads_right_or_left():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate(rows, pad_id=0, left=True, keys=("input_ids",))
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist()[1] == [0, 0, 1]


def test_ranks_see_the_micro_batches_of_one_rank_with_more_accumulation():
    n, micro = 50, 3
    for step in range(4):
        one = step_batches(n, step, micro, accum=4, world=1, rank=0, seed=7)
        two = [step_batches(n, step, micro, accum=2, world=2, rank=r, seed=7) for r in range(2)]
        assert sorted(map(tuple, one)) == sorted(map(tuple, two[0] + two[1]))
        assert not set(sum(two[0], [])) & set(sum(two[1], []))
    assert steps_per_epoch(n, 12) == 4
    epoch0 = {i for s in range(4) for mb in step_batches(n, s, micro, 4, 1, 0, 7) for i in mb}
    assert len(epoch0) == 48  # every row once per epoch, remainder dropped
    assert step_batches(n, 4, micro, 4, 1, 0, 7) != step_batches(n, 0, micro, 4, 1, 0, 7)  # a new epoch reshuffles
