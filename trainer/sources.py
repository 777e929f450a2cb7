"""Your own data: a task read through a `datasets` loader with a column mapping (`data.tasks.<name>`).

    data:
      order: [tickets, faq]
      tasks:
        tickets: {train: tickets.csv, text: body, label: queue}                # classification
        faq:     {train: faq.jsonl, test: faq_test.jsonl, messages: messages}  # chat, single turn

Files: JSON (a list of objects, or JSON Lines), CSV, Parquet, or a `save_to_disk` folder (a Dataset, or
a DatasetDict whose "train" and, when present, "test" splits are used). Paths are relative to
`data.root`. A mapping names the columns of one of three row kinds:

- classification: `text` + `label`. Labels are strings, or integers indexing `labels` (which a
  ClassLabel column supplies by itself); string labels without `labels` are the sorted distinct values.
- instruction: `instruction` + `output`, and optionally `input` (Alpaca style).
- chat: `messages`, a list of {"role", "content"} with one user turn then one assistant turn.

Without `test`, a test split of `test_fraction` of the train rows is carved out, seeded by the task
name alone (the same rows in every run), and recorded in the stage manifest. Every problem raises
DataError naming the file, the row and the column.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

from .config import DataConfig, TaskSource
from .fields import DataError, show_value, text_field

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def kind_of(src: TaskSource) -> str:
    """classification | generation, from which columns the mapping names (validated in config.py)."""
    return "classification" if src.text else "generation"


def load_source(name: str, src: TaskSource, cfg: DataConfig) -> dict:
    """{"kind", "labels", "train", "test", "provenance"}: the task's rows, validated, as data.py's row dicts."""
    root = Path(cfg.root).expanduser()
    train_path = _path(root, src.train)
    train, train_test = _read(train_path, src, f"data.tasks.{name}.train")
    if src.test:
        test_path = _path(root, src.test)
        test, _ = _read(test_path, src, f"data.tasks.{name}.test")
        how = {"test": str(test_path)}
    elif train_test is not None:  # a DatasetDict with a test split
        test, test_path = train_test, train_path
        how = {"test": f"{train_path} (its test split)"}
    else:
        test, test_path = None, None
    labels = _labels(name, src, train, train_path)
    rows = {"train": _rows(train, src, labels, train_path)}
    if test is not None:
        rows["test"] = _rows(test, src, labels, test_path)
    else:
        order = list(range(len(rows["train"])))
        random.Random(zlib.crc32(f"{name}/test-carve".encode())).shuffle(order)
        n_test = max(1, round(src.test_fraction * len(order)))
        if len(order) - n_test < 2:
            raise DataError(f"{train_path}: {len(order)} row(s) are too few to carve a test split of "
                            f"{src.test_fraction} and keep a validation split; add rows or give data.tasks.{name}.test")
        picked = set(order[:n_test])
        rows["test"] = [r for i, r in enumerate(rows["train"]) if i in picked]
        rows["train"] = [r for i, r in enumerate(rows["train"]) if i not in picked]
        how = {"test": f"carved from train: {n_test} of {len(order)} rows (test_fraction {src.test_fraction}, "
                       f"seeded by the task name)"}
    for split in ("train", "test"):
        if not rows[split]:
            raise DataError(f"{train_path if split == 'train' else test_path}: the {split} split is empty")
    provenance = {"train": str(train_path), **how, "columns": _columns(src), "rows": {k: len(v) for k, v in rows.items()}}
    return {"kind": kind_of(src), "labels": labels, **rows, "provenance": provenance}


def _path(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _read(path: Path, src: TaskSource, field: str):
    """(the train-or-given split as a datasets.Dataset, the test split of a DatasetDict or None)."""
    import datasets

    if not path.exists():
        raise DataError(f"{field}: {path} does not exist (relative paths are relative to data.root)")
    fmt = src.format
    if fmt == "auto":
        fmt = "disk" if path.is_dir() else FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{field}: cannot tell the format of {path} from its extension; name a .json, .jsonl, .csv or "
                        f".parquet file or a save_to_disk folder, or set data.tasks.<task>.format")
    try:
        if fmt == "disk":
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"{path}: the saved DatasetDict has splits {sorted(loaded)}, none named 'train'")
                return loaded["train"], loaded.get("test")
            return loaded, None
        return datasets.load_dataset(fmt, data_files=str(path), split="train"), None
    except (datasets.exceptions.DatasetGenerationError, FileNotFoundError, ValueError, OSError) as e:
        if isinstance(e, DataError):
            raise
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot be read as {fmt} ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})"
                    ) from None


def _columns(src: TaskSource) -> dict:
    return {k: getattr(src, k) for k in ("text", "label", "instruction", "input", "output", "messages")
            if getattr(src, k)}


def _labels(name: str, src: TaskSource, ds, path: Path) -> list[str] | None:
    if not src.text:
        return None
    _require(ds, src.label, path, "label")
    if src.labels:
        return list(src.labels)
    feature = ds.features[src.label]
    if hasattr(feature, "names"):  # a ClassLabel column carries its label names
        return list(feature.names)
    values = ds[src.label]
    if any(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DataError(f"{path}: column {src.label!r} holds integer labels; give their names in order as "
                    f"data.tasks.{name}.labels, e.g. [negative, positive] for 0 and 1")
    return sorted({v for v in values if isinstance(v, str) and v.strip()})


def _require(ds, column: str, path: Path, role: str) -> None:
    if column not in ds.column_names:
        raise DataError(f"{path}: no column {column!r} (mapped as {role}); its columns are {ds.column_names}")


def _rows(ds, src: TaskSource, labels: list[str] | None, path: Path) -> list[dict]:
    for role, column in _columns(src).items():
        _require(ds, column, path, role)
    index = {label: i for i, label in enumerate(labels or [])}
    out = []
    for i, row in enumerate(ds):
        where = f"{path}: row {i}"
        ref = f"{path.name} row {i}"
        if src.text:
            text = text_field(row, src.text, where)
            label = row[src.label]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f"{where}: column {src.label!r} is {show_value(label)}; a label is a string or an integer")
            if isinstance(label, int):
                if not 0 <= label < len(labels):
                    raise DataError(f"{where}: column {src.label!r} is {label}, outside the {len(labels)} labels "
                                f"{labels}")
                label = labels[label]
            if label not in index:
                raise DataError(f"{where}: column {src.label!r} is {label!r}, which is not one of the labels {labels}")
            out.append({"text": text, "label": index[label], "ref": ref})
        elif src.messages:
            out.append({**_chat(row.get(src.messages), where, src.messages), "ref": ref})
        else:
            given = {k: v for k, v in row.items() if v is not None}  # an empty CSV cell reads as None
            out.append({"instruction": text_field(row, src.instruction, where),
                        "text": text_field(given, src.input, where, optional=True) if src.input else "",
                        "output": text_field(row, src.output, where), "ref": ref})
    return out


def _chat(messages, where: str, column: str) -> dict:
    """One user turn then one assistant turn -> an instruction row (the user turn) and its output."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: column {column!r} must be a list of {{\"role\", \"content\"}} messages")
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"]:
        hint = (" (a per-row system message is not supported: set data.system_prompt)" if "system" in roles else "")
        raise DataError(f"{where}: column {column!r} has roles {roles}; a row must be one user turn then one "
                    f"assistant turn{hint}")
    return {"instruction": text_field(messages[0], "content", f"{where}: {column}[0]"), "text": "",
            "output": text_field(messages[1], "content", f"{where}: {column}[1]")}
