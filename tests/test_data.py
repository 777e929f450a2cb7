"""Task loading, validation errors, prompt formatting, truncation and batching, on real data and tokenizers."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest

from trainer.base import load_tokenizer
from trainer.config import DataConfig
from trainer.data import (DataError, PromptFormat, _split_at, collate, load_task, load_tasks, step_batches,
                          steps_per_epoch, subsample)
from trainer.evaluate import single_token_options
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


def test_label_answers(tmp_path, smollm2_tokenizer):
    cfg = _cfg(tmp_path, answer="label")
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(smollm2_tokenizer, cfg).encode(task, "test")
    row = enc.rows[0]
    answer = smollm2_tokenizer.decode([t for t in row["labels"] if t != IGNORE])
    assert answer == task.labels[row["label"]] + "<|im_end|>"
    assert "- Science or Technology" in smollm2_tokenizer.decode(row["input_ids"])


def test_prompts_without_options_fit_more_text_in_the_same_length(tmp_path, smollm2_tokenizer):
    """data.options=false: no option list, the label text as the answer, a cache of its own, and more of each
    text kept within max_length (every row cut at 96 tokens keeps at least as much text as with options)."""
    listed, bare = _cfg(tmp_path, answer="label"), _cfg(tmp_path, answer="label", options=False)
    task = load_tasks(bare, seed=0)[0]
    with_opts, without = (PromptFormat(smollm2_tokenizer, c).encode(task, "test") for c in (listed, bare))
    decode = lambda r: smollm2_tokenizer.decode(r["input_ids"])  # noqa: E731
    kept = lambda r: decode(r).split("Text: ", 1)[1].split("<|im_end|>")[0].split("\n\nOptions:")[0]  # noqa: E731
    for a, b in zip(with_opts.rows, without.rows):
        assert "Options:" in decode(a) and "Options:" not in decode(b) and "Answer with" not in decode(b)
        assert a["label"] == b["label"] and smollm2_tokenizer.decode([t for t in b["labels"] if t != IGNORE]) == \
            task.labels[b["label"]] + "<|im_end|>"
        assert len(kept(b)) >= len(kept(a))
    assert without.options == with_opts.options  # the same answers are scored
    assert len(list((tmp_path / "cache").glob("agnews-test-*.arrow"))) == 2
    assert sum(len(kept(b)) for b in without.rows) > sum(len(kept(a)) for a in with_opts.rows)


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
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return _sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory):
    """Mistral-7B-v0.1's real 32k sentencepiece tokenizer (shipped inside mistral_common), configured as
    Mistral ships it: BOS added, no chat template."""
    spec = importlib.util.find_spec("mistral_common")  # locates the package without importing it
    model = Path(spec.origin).parent / "data" / "tokenizer.model.v1" if spec else None
    if model is None or not model.is_file():
        pytest.skip("needs Mistral-7B-v0.1's tokenizer.model from the mistral-common package "
                    "(pip install --no-deps mistral-common)")
    folder = tmp_path_factory.mktemp("mistral")
    shutil.copy(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return load_tokenizer(folder)


@pytest.fixture()
def tokenizer(request):
    """The tokenizer fixture named by the test's parameter."""
    return request.getfixturevalue(request.param)


TOKENIZERS = ["smollm2_tokenizer", "mistral_tokenizer", "sp_tokenizer"]


def _rendered(tok, task, text: str, answer: str) -> str:
    """The prompt of a classification row as the format is specified, written out here independently."""
    if answer == "letter":
        options = "\n".join(f"{c}. {label}" for c, label in zip("ABCDE", task.labels))
        ask = "Answer with the letter of the correct option."
    else:
        options = "\n".join(f"- {label}" for label in task.labels)
        ask = "Answer with the correct option."
    user = f"{task.instruction}\n\nText: {text}\n\nOptions:\n{options}\n\n{ask}"
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return user + "\nAnswer:"


def _spoken(tok, answer: str) -> str:
    return answer if tok.chat_template else " " + answer


def _whole(tok, s: str) -> list[int]:
    """`s` encoded at once, as the tokenizer encodes it; the plain path (no chat template) starts with BOS."""
    ids = tok(s)["input_ids"]
    return ids if tok.chat_template or ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


@pytest.mark.parametrize("answer", ["letter", "label"])
@pytest.mark.parametrize("tokenizer", TOKENIZERS, indirect=True)
def test_prompt_and_answer_are_the_whole_string_encoded_at_once(tmp_path, tokenizer, answer):
    cfg = _cfg(tmp_path, max_length=1024, answer=answer, max_eval_examples=24)
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(tokenizer, cfg).encode(task, "test")
    answers = list("ABCD") if answer == "letter" else task.labels
    eos = tokenizer.eos_token_id
    for source, row in zip(task.test, enc.rows, strict=True):
        prompt = _rendered(tokenizer, task, source["text"], answer)
        assert row["input_ids"] == _whole(tokenizer, prompt + _spoken(tokenizer, answers[source["label"]])) + [eos]
        assert row["input_ids"][: row["prompt_len"]] == _whole(tokenizer, prompt)  # what evaluation sees
        assert row["labels"] == [IGNORE] * row["prompt_len"] + enc.options[source["label"]] + [eos]


def test_mistral_letter_options_are_single_distinct_tokens_and_seams_have_no_stray_space(tmp_path, mistral_tokenizer):
    tok = mistral_tokenizer
    cfg = _cfg(tmp_path, max_length=1024)
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(tok, cfg).encode(task, "test")
    assert [tok.convert_ids_to_tokens(o) for o in enc.options] == [["▁A"], ["▁B"], ["▁C"], ["▁D"]]
    assert single_token_options(enc.options)  # evaluation takes the one-forward-pass path
    for source, row in zip(task.test, enc.rows, strict=True):
        tokens = tok.convert_ids_to_tokens(row["input_ids"])
        assert tokens[-2:] == ["▁" + "ABCD"[source["label"]], "</s>"]
        # Encoded apart, each piece began with its own "▁": "Text", ":", "▁", "▁Title", ... "<0x0A>", "▁",
        # "<0x0A>", "<0x0A>", "Options" (every agnews text starts with "Title:" and ends with a newline).
        start, end = tokens.index(":") + 1, tokens.index("Options")
        assert tokens[start] == "▁Title" and tokens[end - 3:end] == ["<0x0A>"] * 3
        assert tokens[end - 4] != "▁" or source["text"].endswith(" \n")


@pytest.mark.parametrize("tokenizer,max_length", [("smollm2_tokenizer", 140), ("mistral_tokenizer", 120),
                                                  ("sp_tokenizer", 170)], indirect=["tokenizer"])
def test_long_text_is_cut_inside_the_text_never_options_or_answer(tmp_path, tokenizer, max_length):
    cfg = _cfg(tmp_path, max_length=max_length, order=["yelp"], max_train_examples=80)
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(tokenizer, cfg).encode(task, "train")
    before, after = _rendered(tokenizer, task, "\0", "letter").split("\0")
    skip = 0 if tokenizer.chat_template else 1  # BOS
    cut = 0
    for source, row in zip(task.train, enc.rows, strict=True):
        ids = row["input_ids"]
        assert len(ids) <= max_length
        prompt = tokenizer.decode(ids[skip: row["prompt_len"]], clean_up_tokenization_spaces=False)
        assert prompt.startswith(before) and prompt.endswith(after)  # frame and options whole
        text = prompt[len(before): len(prompt) - len(after)]
        assert text and source["text"].startswith(text)
        cut += len(text) < len(source["text"])
        answer = _spoken(tokenizer, "ABCDE"[source["label"]])
        assert ids == _whole(tokenizer, before + text + after + answer) + [tokenizer.eos_token_id]
        assert row["labels"] == [IGNORE] * row["prompt_len"] + enc.options[source["label"]] + [tokenizer.eos_token_id]
    assert cut > 10  # many yelp reviews were cut


def test_a_token_across_the_prompt_answer_boundary_is_an_error():
    offsets = [(0, 0), (0, 4), (4, 7), (7, 9)]
    assert _split_at(offsets, 7, Path("train.json row 0")) == 3
    with pytest.raises(DataError, match=r"train.json row 0: the tokenizer merges the end of the prompt and the start"):
        _split_at(offsets, 6, Path("train.json row 0"))


def test_sentencepiece_tokenizer_without_chat_template(tmp_path, sp_tokenizer):
    tok = sp_tokenizer
    assert type(tok).__name__ == "LlamaTokenizer" and not tok.chat_template
    cfg = _cfg(tmp_path, max_length=120)
    task = load_tasks(cfg, seed=0)[0]
    enc = PromptFormat(tok, cfg).encode(task, "test")
    assert all(len(o) == 1 for o in enc.options) and len({o[0] for o in enc.options}) == 4
    for row in list(enc.rows)[:20]:
        assert row["input_ids"][0] == tok.bos_token_id and len(row["input_ids"]) <= 120
        assert tok.decode(row["input_ids"][: row["prompt_len"]]).endswith(
            "D. Science or Technology\n\nAnswer with the letter of the correct option.\nAnswer:")
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
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word.\n\nword0"}],
                                                   tokenize=False, add_generation_prompt=True)
    assert row["input_ids"] == _whole(smollm2_tokenizer, prompt + "word0") + [smollm2_tokenizer.eos_token_id]


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
