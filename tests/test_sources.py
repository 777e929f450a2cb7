"""Your own data (data.tasks): real files in every format `datasets` reads, made from the bundled MTL5
rows, loaded with a column mapping; every bad mapping is an error naming the file and the column."""

from __future__ import annotations

import json

import datasets
import pytest

from trainer.config import ConfigError, DataConfig, TaskSource, load_config
from trainer.data import DataError, load_tasks

from .conftest import DATA, REPO, run_cli


def _mtl5(task: str, split: str, n: int) -> list[dict]:
    return json.loads((DATA / task / f"{split}.json").read_text())[:n]


def _labels(task: str) -> list[str]:
    return json.loads((DATA / task / "labels.json").read_text())


def _load(tmp_path, **tasks) -> dict:
    cfg = DataConfig(root=str(tmp_path), order=list(tasks), tasks={k: TaskSource(**v) for k, v in tasks.items()})
    return {t.name: t for t in load_tasks(cfg, seed=0)}


def test_csv_with_string_labels_and_a_carved_test_split(tmp_path):
    rows = _mtl5("agnews", "train", 60)
    datasets.Dataset.from_list([{"body": r["sentence"], "topic": r["label"], "id": i} for i, r in enumerate(rows)]
                               ).to_csv(tmp_path / "news.csv")
    t = _load(tmp_path, news={"train": "news.csv", "text": "body", "label": "topic"})["news"]
    assert t.kind == "classification" and t.labels == sorted({r["label"] for r in rows})
    assert len(t.test) == 6 and len(t.train) + len(t.val) == 54  # 10% carved, then 10% of the rest held out
    texts = {r["sentence"]: r["label"] for r in rows}
    for r in t.train + t.val + t.test:
        assert texts[r["text"]] == t.labels[r["label"]]
    assert {r["text"] for r in t.test}.isdisjoint(r["text"] for r in t.train + t.val)
    assert t.provenance["test"].startswith("carved from train: 6 of 60 rows")
    again = _load(tmp_path, news={"train": "news.csv", "text": "body", "label": "topic"})["news"]
    assert [r["text"] for r in again.test] == [r["text"] for r in t.test]  # the same test rows every time


def test_parquet_with_integer_labels_and_a_label_list(tmp_path):
    labels = _labels("yelp")
    for split, n in (("train", 40), ("test", 15)):
        datasets.Dataset.from_list([{"review": r["sentence"], "stars": labels.index(r["label"])}
                                    for r in _mtl5("yelp", split, n)]).to_parquet(tmp_path / f"{split}.parquet")
    t = _load(tmp_path, reviews={"train": "train.parquet", "test": "test.parquet", "text": "review",
                                 "label": "stars", "labels": labels})["reviews"]
    assert t.labels == labels and len(t.test) == 15
    want = {r["sentence"]: labels.index(r["label"]) for r in _mtl5("yelp", "test", 15)}
    assert all(want[r["text"]] == r["label"] for r in t.test)


def test_json_list_and_save_to_disk_with_class_label_names(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_mtl5("dbpedia", "train", 40)))
    (tmp_path / "test.json").write_text(json.dumps(_mtl5("dbpedia", "test", 10)))
    labels = _labels("amazon")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=labels)})
    saved = datasets.DatasetDict({
        split: datasets.Dataset.from_list([{"text": r["sentence"], "label": labels.index(r["label"])}
                                           for r in _mtl5("amazon", split, n)], features=features)
        for split, n in (("train", 30), ("test", 12))})
    saved.save_to_disk(str(tmp_path / "amazon_saved"))
    tasks = _load(tmp_path, wiki={"train": "train.json", "test": "test.json", "text": "sentence", "label": "label",
                                  "labels": _labels("dbpedia")},
                  amazon={"train": "amazon_saved", "text": "text", "label": "label"})
    assert len(tasks["wiki"].test) == 10 and tasks["wiki"].labels == _labels("dbpedia")
    assert tasks["amazon"].labels == labels and len(tasks["amazon"].test) == 12  # the saved test split
    assert tasks["amazon"].provenance["test"].endswith("(its test split)")


def test_alpaca_jsonl_and_chat_messages(tmp_path):
    rows = _mtl5("agnews", "train", 30)
    with open(tmp_path / "alpaca.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"instruction": "Name the topic of the news article.", "input": r["sentence"],
                                "output": r["label"]}) + "\n")
    with open(tmp_path / "chat.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": "Topic of: " + r["sentence"]},
                                             {"role": "assistant", "content": r["label"]}]}) + "\n")
    tasks = _load(tmp_path, alpaca={"train": "alpaca.jsonl", "instruction": "instruction", "input": "input",
                                    "output": "output"},
                  chat={"train": "chat.jsonl", "messages": "messages", "test_fraction": 0.2})
    a, c = tasks["alpaca"], tasks["chat"]
    assert a.kind == c.kind == "generation" and len(c.test) == 6
    by_text = {r["sentence"]: r["label"] for r in rows}
    assert all(by_text[r["text"]] == r["output"] and r["instruction"].startswith("Name") for r in a.train + a.test)
    assert all(r["instruction"].startswith("Topic of: ") and r["text"] == "" for r in c.train + c.test)


@pytest.mark.parametrize("mapping, rows, message", [
    ({"text": "body", "label": "topic"}, [{"body": "x", "label": "World"}],
     r"news.jsonl: no column 'topic' \(mapped as label\); its columns are \['body', 'label'\]"),
    ({"text": "body", "label": "topic"}, [{"body": "x", "topic": 3}],
     r"news.jsonl: column 'topic' holds integer labels; give their names in order as data.tasks.news.labels"),
    ({"text": "body", "label": "topic", "labels": ["a", "b"]}, [{"body": "x", "topic": 0}, {"body": "y", "topic": 2}],
     r"news.jsonl: row 1: column 'topic' is 2, outside the 2 labels \['a', 'b'\]"),
    ({"text": "body", "label": "topic", "labels": ["a", "b"]}, [{"body": "x", "topic": "c"}],
     r"news.jsonl: row 0: column 'topic' is 'c', which is not one of the labels \['a', 'b'\]"),
    ({"text": "body", "label": "topic"}, [{"body": "", "topic": "a"}],
     r"news.jsonl: row 0: field 'body' is empty"),
    ({"messages": "messages"}, [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a"}]}],
     r"news.jsonl: row 0: column 'messages' has roles \['system', 'user', 'assistant'\]; .* set data.system_prompt"),
])
def test_bad_mappings_name_the_file_row_and_column(tmp_path, mapping, rows, message):
    with open(tmp_path / "news.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows * 5)
    with pytest.raises(DataError, match=message):
        _load(tmp_path, news={"train": "news.jsonl", **mapping})


def test_unreadable_and_missing_files_and_config_mistakes(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot be read as parquet"):
        _load(tmp_path, t={"train": "broken.parquet", "text": "a", "label": "b"})
    with pytest.raises(DataError, match=r"data.tasks.t.train: .*gone.csv does not exist \(relative paths are relative "
                                        r"to data.root\)"):
        _load(tmp_path, t={"train": "gone.csv", "text": "a", "label": "b"})
    (tmp_path / "rows.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"cannot tell the format of .*rows.txt"):
        _load(tmp_path, t={"train": "rows.txt", "text": "a", "label": "b"})
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", [
            "data.tasks={agnews: {train: a.csv, text: t, label: l, messages: m}, yelp: {train: b.csv, text: t},"
            " other: {train: c.csv, messages: m}}"])
    msg = str(e.value)
    assert "data.tasks.agnews: name the columns of one row kind" in msg and "['text + label', 'messages']" in msg
    assert "data.tasks.yelp: a classification task needs both text and label columns" in msg
    assert "data.tasks: ['other'] not in data.order" in msg


def test_missing_mtl5_root_names_the_import_tool(tmp_path):
    with pytest.raises(DataError, match=r"data.root: .*mtl5_full is not a folder; the full MTL5 benchmark is imported "
                                        r"from a clone of the O-LoRA repository by `python tools/import_mtl5.py"):
        load_tasks(DataConfig(root=str(tmp_path / "mtl5_full"), order=["dbpedia", "amazon"]), seed=0)


def test_a_run_on_own_csv_and_chat_files_records_where_its_data_came_from(tmp_path, model_cache):
    rows = _mtl5("agnews", "train", 48)
    datasets.Dataset.from_list([{"body": r["sentence"], "topic": r["label"]} for r in rows]).to_csv(tmp_path / "n.csv")
    with open(tmp_path / "chat.jsonl", "w") as f:
        for r in _mtl5("yelp", "train", 40):
            f.write(json.dumps({"messages": [{"role": "user", "content": r["sentence"][:200]},
                                             {"role": "assistant", "content": r["label"]}]}) + "\n")
    tasks = ("data.tasks={news: {train: n.csv, text: body, label: topic}, "
             "chat: {train: chat.jsonl, messages: messages, test_fraction: 0.1}}")
    proc = run_cli("sequence", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", f"model.cache_dir={model_cache}",
            f"data.cache_dir={tmp_path / 'cache'}", f"data.root={tmp_path}", "data.order=[news,chat]", tasks,
            "data.max_eval_examples=4", "eval.max_new_tokens=4", "eval.val=false", "train.max_steps=2",
            "train.log_every=1", "train.min_steps=3")
    out = proc.stdout
    # not a terminal: plain progress lines, no tqdm bar; and the warning about too few optimizer steps
    assert "step 2/2 of stage 1 (news): loss " in out and "\r" not in out + proc.stderr and "it/s" not in proc.stderr
    assert "warning: stage 1 (news) has only 2 optimizer step(s)" in out
    manifest = json.loads((tmp_path / "run" / "stages" / "2-chat" / "stage.json").read_text())
    assert manifest["data"]["news"]["columns"] == {"text": "body", "label": "topic"}
    assert manifest["data"]["chat"]["test"].startswith("carved from train: 4 of 40 rows")
    assert set(manifest["eval"]["test_accuracy"]) == {"news", "chat"}
    assert manifest["config"]["data"]["tasks"]["chat"]["messages"] == "messages"
    assert manifest["train"]["below_min_steps"] is True and manifest["train"]["steps"] == 2
