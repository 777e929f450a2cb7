"""Malformed inputs at scale: a generated table of broken task data and broken configs.

Every kind is built from the real inputs (a copy of the bundled `data/mtl5/agnews`, instruction JSONL
made from its rows, variants of `configs/tiny.yaml`), then broken one way. Each must raise the
documented error type (DataError for task data, ConfigError for configs and overrides; nothing else
leaks) whose message names the file and the row / line, or the config key; the CLI must exit 2 with
`error: ...` and no traceback; and nothing may be written, in-process or through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from trainer import cli
from trainer.config import ConfigError, DataConfig, load_config
from trainer.data import INSTRUCTIONS, DataError, load_tasks
from trainer.fields import MAX_TEXT_CHARS

from .conftest import DATA, REPO

TINY = REPO / "configs" / "tiny.yaml"
TASK = "agnews"


@dataclass
class Broken:
    """A broken input: how to load it, and what the error must say (regular expressions)."""

    error: type[Exception]
    says: list[str]
    root: Path | None = None  # data kinds: data.root and data.order
    order: list[str] = field(default_factory=list)
    config: Path = TINY  # config kinds: the file and the overrides
    overrides: list[str] = field(default_factory=list)


CASES: dict[str, Callable[[Path], Broken]] = {}


def kind(name: str, build: Callable[[Path], Broken]) -> None:
    assert name not in CASES, name
    CASES[name] = build


# -- builders: classification (CL_Benchmark JSON) -----------------------------------------------

def _cls(tmp: Path) -> Path:
    folder = tmp / "data" / TASK
    if not folder.exists():
        shutil.copytree(DATA / TASK, folder)
    return folder


def _rows(folder: Path, split: str) -> list:
    return json.loads((folder / f"{split}.json").read_text(encoding="utf-8"))


def _put(folder: Path, name: str, value) -> None:
    (folder / name).write_text(json.dumps(value, indent=1), encoding="utf-8")


def _data(path: Path, *says: str, order: list[str] | None = None) -> Broken:
    """A DataError naming `path` (a file, or a task folder) and `says`."""
    root = path.parent.parent if path.suffix else path.parent
    return Broken(DataError, [re.escape(str(path)), *says], root=root, order=order or [TASK])


def row_edit(split: str, i: int, edit: Callable[[dict], object], *says: str):
    """Row `i` of `split`.json replaced by `edit(row)`."""
    def build(tmp):
        f = _cls(tmp)
        rows = _rows(f, split)
        rows[i] = edit(rows[i])
        _put(f, f"{split}.json", rows)
        return _data(f / f"{split}.json", rf": row {i}: ", *says)
    return build


def set_key(key, value):
    return lambda row: {**row, key: value}


def drop_key(key):
    return lambda row: {k: v for k, v in row.items() if k != key}


def file_text(name: str, text: str | bytes | Callable[[bytes], bytes], *says: str):
    """`name` in the task folder replaced by `text` (or by `text(old bytes)`)."""
    def build(tmp):
        f = _cls(tmp)
        path = f / name
        data = text(path.read_bytes()) if callable(text) else text
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return _data(path, *says)
    return build


def file_gone(name: str, *says: str, folder: bool = False):
    def build(tmp):
        f = _cls(tmp)
        (f / name).unlink()
        if folder:
            (f / name).mkdir()
        return _data(f / name, *says)
    return build


def bad_bytes_in_row(tmp: Path) -> Broken:
    """A stray 0xff byte inside row 3's sentence, at a known line and column."""
    f = _cls(tmp)
    rows = _rows(f, "train")
    rows[3]["sentence"] = "MARK" + rows[3]["sentence"]
    data = json.dumps(rows, indent=1).encode()
    pos = data.index(b"MARK")
    line, column = data.count(b"\n", 0, pos) + 1, pos - data.rfind(b"\n", 0, pos)
    (f / "train.json").write_bytes(data.replace(b"MARK", b"\xff"))
    return _data(f / "train.json", rf": line {line} column {column}: byte 0xff is not UTF-8")


def latin1_file(tmp: Path) -> Broken:
    """train.json saved as cp1252 (an accented word in row 2), as old editors do."""
    f = _cls(tmp)
    rows = _rows(f, "train")
    rows[2]["sentence"] = "MARK " + rows[2]["sentence"]
    text = json.dumps(rows, indent=1)  # ASCII: every other non-ASCII character is escaped
    line = text[: text.index("MARK")].count("\n") + 1
    (f / "train.json").write_bytes(text.replace("MARK", "Café crème").encode("cp1252"))
    return _data(f / "train.json", rf": line {line} column \d+: byte 0xe9 is not UTF-8; save the file as UTF-8")


def task_order(order: list[str], make: Callable[[Path], Path], *says: str):
    """data.order = `order` under a data root holding agnews plus whatever `make` adds (a path named in the error)."""
    def build(tmp):
        _cls(tmp)
        named = make(tmp / "data")
        b = _data(named, *says, order=order)
        b.root = tmp / "data"
        return b
    return build


def data_root(make: Callable[[Path], Path]):
    def build(tmp):
        root = make(tmp)
        return Broken(DataError, ["data.root", re.escape(str(root.resolve())), "is not a folder"],
                      root=root, order=[TASK])
    return build


kind("json-truncated", file_text("train.json", lambda b: b[: len(b) // 2],
                                 r": line \d+ column \d+: not valid JSON"))
kind("json-empty-file", file_text("train.json", "", r": line 1 column 1: not valid JSON"))
kind("json-top-level-object", file_text("train.json", lambda b: b'{"rows": ' + b + b"}",
                                        r": expected a JSON list .* got an object"))
kind("json-deeply-nested", file_text("train.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"))
kind("json-huge-integer", file_text("test.json", '[{"sentence": "x", "label": ' + "7" * 5000 + "}]",
                                    r"not valid JSON \(Exceeds the limit"))
kind("json-non-utf8-byte", bad_bytes_in_row)
kind("json-latin1-encoded", latin1_file)
kind("row-not-object", row_edit("train", 5, lambda r: "just a sentence", "expected an object .* got a string"))
kind("row-null", row_edit("test", 9, lambda r: None, "expected an object .* got null"))
kind("sentence-missing", row_edit("train", 3, drop_key("sentence"), "field 'sentence' is missing"))
kind("sentence-int", row_edit("train", 6, set_key("sentence", 42), r"field 'sentence' must be a string, got a number"))
kind("sentence-list", row_edit("train", 6, set_key("sentence", ["Title", "Text"]), "got a list"))
kind("sentence-null", row_edit("test", 0, set_key("sentence", None), "field 'sentence' must be a string, got null"))
kind("sentence-empty", row_edit("train", 7, set_key("sentence", ""), "field 'sentence' is empty"))
kind("sentence-whitespace-only", row_edit("test", 11, set_key("sentence", " \n\t "), "field 'sentence' is empty"))
kind("sentence-huge", row_edit("train", 2, set_key("sentence", "x" * (MAX_TEXT_CHARS + 1)),
                               "field 'sentence' has 1,000,001 characters, over the limit of 1,000,000"))
kind("sentence-lone-surrogate", row_edit("train", 4, set_key("sentence", "Title: \ud800 broken"),
                                         "unpaired surrogate"))
kind("label-missing", row_edit("test", 4, drop_key("label"), "field 'label' is missing"))
kind("label-not-in-labels-json", row_edit("test", 7, set_key("label", "Weather"),
                                          r"field 'label' is 'Weather', which is not in .*labels\.json"))
kind("label-wrong-case", row_edit("train", 1, set_key("label", "world"), r"'world', which is not in .*labels\.json"))
kind("label-int-index", row_edit("train", 8, set_key("label", 1),
                                 r"field 'label' is a number \(1\), not a string; write the label itself"))
kind("label-list", row_edit("train", 8, set_key("label", ["World"]), "field 'label' is a list"))
kind("labels-json-not-list", file_text("labels.json", '{"World": 0, "Sports": 1}', "expected a non-empty JSON list"))
kind("labels-json-empty", file_text("labels.json", "[]", "expected a non-empty JSON list"))
kind("labels-json-duplicate", file_text("labels.json", '["World", "Sports", "World", "Business"]',
                                        r"\['World'\] listed more than once"))
kind("labels-json-non-string", file_text("labels.json", '["World", 2, "Business"]', "entry 1 is a number"))
kind("labels-json-blank-label", file_text("labels.json", '["World", "  ", "Business"]', "entry 1 is a string"))
kind("labels-json-truncated", file_text("labels.json", '["World", "Spo', r": line 1 column \d+: not valid JSON"))
kind("labels-json-too-many-for-letters", file_text("labels.json", json.dumps([f"L{i}" for i in range(27)]),
                                                   "27 labels are more than 26 letters; set data.answer=label"))
kind("labels-json-missing", file_gone("labels.json", "file is missing"))
kind("train-json-missing", file_gone("train.json", "file is missing"))
kind("test-json-missing", file_gone("test.json", "file is missing"))
kind("train-json-is-a-folder", file_gone("train.json", "is not a file", folder=True))
kind("train-split-empty", file_text("train.json", "[]", "the train split is empty"))
kind("test-split-empty", file_text("test.json", "[\n]\n", "the test split is empty"))
kind("train-split-one-row", file_text("train.json", lambda b: json.dumps(json.loads(b)[:1]),
                                      "too few to hold out a validation split"))
kind("task-folder-missing", task_order([TASK, "nosuch"], lambda root: root / "nosuch",
                                       "'nosuch' of data.order", "does not exist"))
kind("task-folder-empty", task_order([TASK, "empty"], lambda root: (root / "empty").mkdir() or root / "empty",
                                     "holds neither train.json"))
kind("task-is-a-file", task_order(["afile"], lambda root: (root / "afile").write_text("x") and root / "afile",
                                  "is not a folder"))
kind("data-order-duplicate-task", lambda tmp: Broken(DataError, ["data.order", f"'{TASK}'"], root=_cls(tmp).parent,
                                                     order=[TASK, TASK]))
kind("data-root-missing", data_root(lambda tmp: tmp / "nowhere"))
kind("data-root-is-a-file", data_root(lambda tmp: (tmp / "root.txt").write_text("x") and tmp / "root.txt"))


# -- builders: instruction JSONL -------------------------------------------------------------------

def _gen(tmp: Path) -> Path:
    """An instruction task made of real agnews rows: the question, the article, its topic."""
    folder = tmp / "data" / "gen"
    folder.mkdir(parents=True)
    rows = json.loads((DATA / TASK / "train.json").read_text(encoding="utf-8"))
    lines = [json.dumps({"instruction": INSTRUCTIONS[TASK], "input": r["sentence"], "output": r["label"]})
             for r in rows[:60]]
    (folder / "train.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    (folder / "test.jsonl").write_text("\n".join(lines[40:]) + "\n", encoding="utf-8")
    return folder


def jsonl_line(split: str, lineno: int, edit: Callable[[str], str | bytes], *says: str):
    """Line `lineno` (1-based) of `split`.jsonl replaced by `edit(line)`."""
    def build(tmp):
        path = _gen(tmp) / f"{split}.jsonl"
        lines = path.read_bytes().split(b"\n")
        new = edit(lines[lineno - 1].decode())
        lines[lineno - 1] = new.encode() if isinstance(new, str) else new
        path.write_bytes(b"\n".join(lines))
        return Broken(DataError, [re.escape(str(path)), rf": line {lineno}[: ]", *says], root=tmp / "data",
                      order=["gen"])
    return build


def jsonl_field(key: str, value):
    def edit(line):
        row = json.loads(line)
        if value is KeyError:
            del row[key]
        else:
            row[key] = value
        return json.dumps(row)
    return edit


def jsonl_file(split: str, text: str | None, *says: str):
    """`split`.jsonl replaced by `text` (None: removed)."""
    def build(tmp):
        path = _gen(tmp) / f"{split}.jsonl"
        if text is None:
            path.unlink()
        else:
            path.write_text(text(path.read_text()) if callable(text) else text, encoding="utf-8")
        return Broken(DataError, [re.escape(str(path)), *says], root=tmp / "data", order=["gen"])
    return build


kind("jsonl-truncated-line", jsonl_line("train", 5, lambda s: s[: len(s) // 2], "not valid JSON"))
kind("jsonl-truncated-last-line", jsonl_line("test", 20, lambda s: s[:-7], "not valid JSON"))
kind("jsonl-deeply-nested", jsonl_line("train", 2, lambda s: "[" * 100_000, "nested too deeply"))
kind("jsonl-row-not-object", jsonl_line("train", 3, lambda s: "[1, 2]", "expected an object .* got a list"))
kind("jsonl-missing-instruction", jsonl_line("train", 4, jsonl_field("instruction", KeyError),
                                             "field 'instruction' is missing"))
kind("jsonl-missing-output", jsonl_line("test", 2, jsonl_field("output", KeyError), "field 'output' is missing"))
kind("jsonl-empty-output", jsonl_line("train", 9, jsonl_field("output", ""), "field 'output' is empty"))
kind("jsonl-blank-instruction", jsonl_line("train", 10, jsonl_field("instruction", "   "),
                                           "field 'instruction' is empty"))
kind("jsonl-input-int", jsonl_line("train", 11, jsonl_field("input", 7),
                                   "field 'input' must be a string, got a number"))
kind("jsonl-input-null", jsonl_line("test", 1, jsonl_field("input", None), "field 'input' must be a string, got null"))
kind("jsonl-output-list", jsonl_line("train", 12, jsonl_field("output", ["World"]), "field 'output' must be a string"))
kind("jsonl-huge-input", jsonl_line("train", 3, jsonl_field("input", "y" * (MAX_TEXT_CHARS + 5)),
                                    "field 'input' has 1,000,005 characters, over the limit of 1,000,000"))
kind("jsonl-lone-surrogate", jsonl_line("test", 2, jsonl_field("output", "World\udc80"), "unpaired surrogate"))
kind("jsonl-non-utf8-byte", jsonl_line("train", 6, lambda s: s.encode().replace(b"Text:", b"Text:\xc3\x28"),
                                       r"column \d+: byte 0xc3 is not UTF-8"))
kind("jsonl-blank-only-file", jsonl_file("train", "\n  \n\t\n", "the train split is empty"))
kind("jsonl-empty-file", jsonl_file("test", "", "the test split is empty"))
kind("jsonl-pretty-printed-array", jsonl_file("train", lambda t: json.dumps([json.loads(x) for x in t.split("\n") if x],
                                                                            indent=2),
                                              ": line 1: not valid JSON"))
kind("jsonl-test-missing", jsonl_file("test", None, "is missing"))


# -- builders: config files and overrides -----------------------------------------------------------

def _tiny() -> str:
    return TINY.read_text(encoding="utf-8")


def _line(needle: str) -> int:
    """The line of tiny.yaml holding `needle`."""
    return _tiny()[: _tiny().index(needle)].count("\n") + 1


SEED = _line("seed: 0")
END = _tiny().rstrip().count("\n") + 1  # the last line


def yaml_file(text: str | bytes | Callable[[str], str | bytes], *says: str):
    """A config file whose text is `text` (or `text(tiny.yaml)`)."""
    def build(tmp):
        path = tmp / "broken.yaml"
        data = text(_tiny()) if callable(text) else text
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return Broken(ConfigError, [re.escape(str(path)), *says], config=path)
    return build


def swap(old: str, new: str):
    def edit(text):
        assert text.count(old) == 1, old
        return text.replace(old, new)
    return edit


def override(*items: str, says: tuple[str, ...]):
    def build(tmp):
        return Broken(ConfigError, [re.escape(str(TINY)), *says], overrides=list(items))
    return build


def config_path(make: Callable[[Path], Path], *says: str):
    def build(tmp):
        path = make(tmp)
        return Broken(ConfigError, [re.escape(str(path)), *says], config=path)
    return build


kind("yaml-syntax-error", yaml_file(swap("order: [agnews, yelp]", "order: [agnews, yelp"),
                                    r": line \d+ column \d+: not valid YAML \(while parsing a flow sequence"))
kind("yaml-tab-indent", yaml_file(swap("  seed: 0", "\tseed: 0"), rf": line {SEED} column 1: not valid YAML"))
kind("yaml-top-level-list", yaml_file("- run\n- model\n", "the top level must be a mapping"))
kind("yaml-top-level-scalar", yaml_file("tiny llama please\n", "the top level must be a mapping"))
kind("yaml-empty-file", yaml_file("", "model.path: required", "data.order: required"))
kind("yaml-duplicate-section", yaml_file(lambda t: t.rstrip("\n") + "\ntrain:\n  lr: 0.5\n",
                                         rf": line {END + 1} column 1: not valid YAML "
                                         rf"\(key 'train' is given twice \(first on line {_line('train:')}\)"))
kind("yaml-duplicate-key", yaml_file(swap("  seed: 0\n", "  seed: 0\n  seed: 1\n"),
                                     rf": line {SEED + 1} column 3: not valid YAML \(key 'seed' is given twice "
                                     rf"\(first on line {SEED}\)"))
kind("yaml-non-utf8", yaml_file(lambda t: b"# caf\xe9\n" + t.encode(), ": line 1 column 6: byte 0xe9 is not UTF-8"))
kind("yaml-control-character", yaml_file(swap("dir: runs/tiny", "dir: runs/\x07tiny"),
                                         rf": line {_line('dir: runs/tiny')}: not valid YAML "
                                         r"\(unacceptable character #x0007"))
kind("yaml-deeply-nested", yaml_file("a: " + "[" * 1000 + "]" * 1000, "nested too deeply"))
kind("yaml-huge-integer", yaml_file(swap("seed: 0", "seed: " + "9" * 5000), r"not valid YAML \(Exceeds the limit"))
kind("config-file-missing", config_path(lambda tmp: tmp / "nope.yaml", "config file not found"))
kind("config-path-is-a-folder", config_path(lambda tmp: (tmp / "cfg").mkdir() or tmp / "cfg",
                                            "cannot read the config file"))
kind("unknown-key-did-you-mean", yaml_file(swap("micro_batch_size:", "micro_batch_sise:"),
                                           r"train\.micro_batch_sise: unknown key "
                                           r"\(did you mean 'micro_batch_size'\?\)"))
kind("unknown-section-did-you-mean", yaml_file(swap("train:", "trian:"),
                                               r"trian: unknown key \(did you mean 'train'\?\)"))
kind("wrong-type-str-for-int", yaml_file(swap("epochs: 1", "epochs: three"), "train.epochs: expected int, got 'three'"))
kind("wrong-type-float-for-int", yaml_file(swap("epochs: 1", "epochs: 1.5"), "train.epochs: expected int, got 1.5"))
kind("wrong-type-list-for-str", yaml_file(swap("path: builtin:tiny-llama", "path: [a, b]"),
                                          r"model\.path: expected str, got \['a', 'b'\]"))
kind("wrong-type-section-not-mapping", yaml_file(swap("eval:\n  batch_size: 8", "eval: 8"),
                                                 "eval: expected a mapping, got int"))
kind("negative-batch-size", yaml_file(swap("micro_batch_size: 4", "micro_batch_size: -4"),
                                      r"train\.micro_batch_size: must be > 0, got -4"))
kind("negative-lr", yaml_file(swap("lr: 1.0e-3", "lr: -1.0e-3"), r"train\.lr: must be > 0, got -0\.001"))
kind("nan-lr", yaml_file(swap("lr: 1.0e-3", "lr: .nan"), r"train\.lr: expected float, got nan"))
kind("huge-int-for-float", yaml_file(swap("lr: 1.0e-3", "lr: 1" + "0" * 400), r"train\.lr: expected float, got 1000"))
kind("bad-choice", yaml_file(swap("  rank: 4", "  rank: 4\n  method: moe"),
                             "experts.method: expected one of 'moe_cl'"))
kind("order-duplicate-task", yaml_file(swap("[agnews, yelp]", "[agnews, yelp, agnews]"),
                                       "data.order: task 'agnews' is listed twice"))
kind("order-bad-characters", yaml_file(swap("[agnews, yelp]", "[agnews, ../yelp]"),
                                       r"data\.order: task name '\.\./yelp' may only use"))
kind("order-trailing-newline", yaml_file(swap("[agnews, yelp]", '["agnews\\n", yelp]'),
                                         r"data\.order: task name 'agnews\\n' may only use"))
kind("order-empty", yaml_file(swap("[agnews, yelp]", "[]"), "data.order: required"))
kind("order-not-a-list", yaml_file(swap("[agnews, yelp]", "5"), r"data\.order: expected a list of str, got 5"))
kind("order-reserved-name", yaml_file(swap("[agnews, yelp]", "[agnews, shared]"), "reserved for the shared expert"))
kind("model-path-missing", yaml_file(swap("model:\n  path: builtin:tiny-llama\n", ""), "model.path: required"))
kind("override-without-equals", override("train.lr", says=("override 'train.lr': expected section.field=value",)))
kind("override-empty-key", override("=1e-4", says=("override '=1e-4': expected section.field=value",)))
kind("override-unknown-section", override("trian.lr=1e-4", says=(r"trian: unknown key \(did you mean 'train'\?\)",)))
kind("override-unknown-field", override("train.learning_rate=1e-4", says=(r"train\.learning_rate: unknown key",)))
kind("override-wrong-type", override("train.epochs=many", says=("train.epochs: expected int, got 'many'",)))
kind("override-into-a-value", override("train.lr.warmup=1",
                                      says=("override 'train.lr.warmup=1': 'lr' is not a section",)))
kind("override-negative", override("eval.batch_size=-8", says=(r"eval\.batch_size: must be > 0, got -8",)))
kind("override-order-empty", override("data.order=[]", says=("data.order: required",)))
kind("override-order-duplicate", override("data.order=agnews,yelp,agnews", says=("task 'agnews' is listed twice",)))

KINDS = list(CASES)


# -- the checks ----------------------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content (folders: "dir")."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _says_all(message: str, case: Broken) -> None:
    missing = [s for s in case.says if not re.search(s, message)]
    assert not missing, f"message lacks {missing}:\n{message}"


def test_the_table_is_large_and_covers_both_loaders(tmp_path):
    for k in KINDS:
        (tmp_path / k).mkdir()
    errors = [CASES[k](tmp_path / k).error for k in KINDS]
    assert len(KINDS) >= 30 and errors.count(DataError) >= 25 and errors.count(ConfigError) >= 25


@pytest.mark.parametrize("kind", KINDS)
def test_loader_raises_the_documented_error_naming_file_and_row(kind, tmp_path):
    case = CASES[kind](tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(Exception) as e:
        if case.error is DataError:
            load_tasks(DataConfig(root=str(case.root), order=case.order, cache_dir=str(tmp_path / "cache")), seed=0)
        else:
            load_config(case.config, case.overrides)
    assert e.type is case.error, f"{e.type.__name__} leaked instead of {case.error.__name__}: {e.value}"
    _says_all(str(e.value), case)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_cli_exits_2_with_one_error_line_and_writes_nothing(kind, tmp_path, capsys):
    case = CASES[kind](tmp_path)
    run = tmp_path / "run"
    if case.error is DataError:
        argv = ["sequence", str(TINY), f"data.root={case.root}", f"data.order=[{','.join(case.order)}]"]
    else:
        argv = ["sequence", str(case.config), *case.overrides]
    argv += [f"run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    before = _tree(tmp_path)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in out + err
    _says_all(err, case)
    assert not run.exists()
    assert _tree(tmp_path) == before


# -- what is not broken: accepted as the same rows -----------------------------------------------------

def _texts(tmp_path, root: Path, order: list[str]) -> list:
    [task] = load_tasks(DataConfig(root=str(root), order=order, cache_dir=str(tmp_path / "cache")), seed=0)
    return [task.labels, task.train, task.val, task.test]


def test_a_byte_order_mark_is_accepted_in_json_jsonl_and_yaml(tmp_path):
    clean = _texts(tmp_path, DATA, [TASK])
    folder = _cls(tmp_path)
    for name in ("train.json", "test.json", "labels.json"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    assert _texts(tmp_path, tmp_path / "data", [TASK]) == clean

    gen = _gen(tmp_path)
    before = _texts(tmp_path, tmp_path / "data", ["gen"])
    (gen / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (gen / "train.jsonl").read_bytes())
    assert _texts(tmp_path, tmp_path / "data", ["gen"]) == before

    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + TINY.read_bytes())
    assert load_config(bom) == load_config(TINY)


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """Unicode line separators inside a JSON string and CRLF endings are not line breaks."""
    gen = _gen(tmp_path)
    rows = [json.loads(x) for x in (gen / "train.jsonl").read_text().splitlines()]
    rows[0]["input"] = "first\u2028second\x85third\x0cfourth"
    (gen / "train.jsonl").write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n",
                                     encoding="utf-8")
    [task] = load_tasks(DataConfig(root=str(tmp_path / "data"), order=["gen"], cache_dir=str(tmp_path / "c")), 0)
    texts = {r["text"] for r in task.train + task.val}
    assert "first\u2028second\x85third\x0cfourth" in texts and len(task.train) + len(task.val) == 40
    assert {r["ref"] for r in task.train + task.val} == {f"train.jsonl line {i}" for i in range(1, 41)}


def test_a_text_of_exactly_the_limit_is_accepted(tmp_path):
    folder = _cls(tmp_path)
    rows = _rows(folder, "train")
    rows[2]["sentence"] = "x" * MAX_TEXT_CHARS
    _put(folder, "train.json", rows)
    [task] = load_tasks(DataConfig(root=str(tmp_path / "data"), order=[TASK], cache_dir=str(tmp_path / "c")), 0)
    assert max(len(r["text"]) for r in task.train + task.val) == MAX_TEXT_CHARS
