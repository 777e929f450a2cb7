"""Tasks: loading, validation, instruction formatting and tokenization.

Two folder formats, one folder per task under `data.root` (tasks of `data.tasks` are read from your own
JSON / JSONL / CSV / Parquet / save_to_disk files with a column mapping instead: sources.py):

- CL_Benchmark classification (MTL5, as O-LoRA/MoCL/MoE-CL ship it): `train.json` and `test.json`
  (a JSON list of `{"sentence": str, "label": str}`) and `labels.json` (the ordered label list).
- Instruction generation: `train.jsonl` and `test.jsonl`, one `{"instruction", "input", "output"}`
  object per line; evaluated by greedy decoding and exact match.

A classification row becomes an instruction (the task's instruction, the text, the labels as lettered
options) answered by the option's letter or its label text; it goes through the tokenizer's chat
template when there is one. Prompt and answer are encoded as one string, so tokens are those of the
whole rendered text; loss falls on the answer tokens only, and a long text is cut inside the text,
never in the options or the answer. Tokenization runs through `datasets.map` with its cache.

Every file is UTF-8 (a leading byte-order mark is accepted); JSONL lines end at "\n" only. A row's
text fields (sentence; instruction, input, output) are strings of at most MAX_TEXT_CHARS = 1,000,000
characters (real MTL5 rows stay under 6,000): a longer one is almost surely a broken export. Sentences,
instructions and outputs must not be blank; an instruction row's input may be empty. Any problem
raises DataError naming the file, the row (JSON list index) or line (JSONL line number), and the field.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import datasets
import torch

from . import atomic
from .config import DataConfig, read_utf8
from .fields import DataError, show_value, text_field
from .model import IGNORE
from .sources import load_source

INSTRUCTIONS = {  # MTL5 tasks; others get GENERIC_INSTRUCTION unless data.instructions sets one
    "agnews": "What is the topic of this news article?",
    "amazon": "How would the reviewer rate this product?",
    "yelp": "How would the reviewer rate this business?",
    "dbpedia": "What kind of entity does this Wikipedia article describe?",
    "yahoo": "What is the topic of this question and answer?",
}
GENERIC_INSTRUCTION = "Choose the option that best describes the text."
SENTINEL = "\u2063TEXT\u2063"  # marks where the (truncatable) text sits inside a rendered prompt
FORMAT_VERSION = "2"  # bump when the prompt layout changes, to invalidate tokenization caches


@dataclass
class Task:
    """One task's validated rows. Classification rows: {"text", "label": int}; generation rows:
    {"instruction", "text", "output"}."""

    name: str
    kind: str  # "classification" | "generation"
    instruction: str
    labels: list[str] | None
    train: list[dict] = field(repr=False)
    val: list[dict] = field(repr=False)
    test: list[dict] = field(repr=False)
    source: Path = Path()
    train_all: list[dict] = field(default_factory=list, repr=False)  # train before data.max_train_examples
    provenance: dict | None = None  # a data.tasks source: its files, columns, and how the test split was made

    def router_rows(self, n: int, seed: int) -> list[dict]:
        """The training rows the task router's statistics are computed from: a seeded subset of `n` rows of
        the whole train split (not only those trained on)."""
        return subsample(self.train_all or self.train, n, _seed(seed, self.name, "router"))


# -- loading and validation ---------------------------------------------------------------------

def load_tasks(cfg: DataConfig, seed: int) -> list[Task]:
    """Every task of `cfg.order`, validated, with its seeded validation split carved out of train."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and set(cfg.order) - set(cfg.tasks):
        hint = ""
        if set(cfg.order) & set(INSTRUCTIONS):
            hint = (f"; the full MTL5 benchmark is imported from a clone of the O-LoRA repository by "
                    f"`python tools/import_mtl5.py O-LoRA/CL_Benchmark --out {cfg.root}`, and data/mtl5 holds a small "
                    f"bundled subset (300 train / 150 test rows per task)")
        raise DataError(f"data.root: {root.resolve()} is not a folder{hint}")
    dup = sorted({t for t in cfg.order if cfg.order.count(t) > 1})
    if dup:
        raise DataError(f"data.order: {dup} listed more than once; each task is learned in one stage")
    return [load_task(root / name, name, cfg, seed) for name in cfg.order]


def load_task(folder: Path, name: str, cfg: DataConfig, seed: int) -> Task:
    if name in cfg.tasks:  # your own files through a column mapping
        src = load_source(name, cfg.tasks[name], cfg)
        instruction = cfg.instructions.get(name) or GENERIC_INSTRUCTION if src["kind"] == "classification" else ""
        task = Task(name, src["kind"], instruction, src["labels"], src["train"], [], src["test"],
                    Path(src["provenance"]["train"]), provenance=src["provenance"])
        if task.labels is not None and cfg.answer == "letter" and len(task.labels) > 26:
            raise DataError(f"data.tasks.{name}: {len(task.labels)} labels are more than 26 letters; set data.answer=label")
    elif (folder / "train.json").exists() or (folder / "labels.json").exists():
        task = read_cl_benchmark(folder, name, cfg)
    elif (folder / "train.jsonl").exists():
        task = _load_generation(folder, name)
    else:
        missing = "is not a folder" if folder.exists() else "does not exist"
        where = folder if folder.is_dir() else f"{folder} {missing}: it"
        raise DataError(f"task {name!r} of data.order: {where} holds neither train.json + test.json + labels.json "
                        f"(CL_Benchmark) nor train.jsonl + test.jsonl (instruction JSONL); check data.root and the "
                        f"task name")
    rng = random.Random(_seed(seed, name, "val"))
    order = list(range(len(task.train)))
    rng.shuffle(order)
    n_val = max(1, round(cfg.val_fraction * len(order)))
    if len(order) - n_val < 1:
        train_file = task.source if name in cfg.tasks else folder / (
            "train.json" if task.kind == "classification" else "train.jsonl")
        raise DataError(f"{train_file}: the train split has {len(order)} row(s), too few to hold out a validation "
                        f"split; add rows")
    task.val = [task.train[i] for i in order[:n_val]]
    task.train = [task.train[i] for i in order[n_val:]]
    task.train_all = task.train
    if cfg.max_train_examples:
        task.train = subsample(task.train, cfg.max_train_examples, _seed(seed, name, "train"))
    if cfg.max_eval_examples:  # same rows after every stage: seeded by the task alone
        task.val = subsample(task.val, cfg.max_eval_examples, _seed(0, name, "val-subset"))
        task.test = subsample(task.test, cfg.max_eval_examples, _seed(0, name, "test-subset"))
    return task


def read_cl_benchmark(folder: Path, name: str, cfg: DataConfig) -> Task:
    """A CL_Benchmark task folder (train.json, test.json, labels.json), validated; used by tools/import_mtl5.py too."""
    labels_path = folder / "labels.json"
    labels = _read_json(labels_path)
    if not (isinstance(labels, list) and labels):
        raise DataError(f"{labels_path}: expected a non-empty JSON list of label strings, e.g. [\"World\", \"Sports\"]")
    for i, x in enumerate(labels):
        if not isinstance(x, str) or not x.strip():
            raise DataError(f"{labels_path}: entry {i} is {show_value(x)}; every label must be a non-empty string")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise DataError(f"{labels_path}: {dup} listed more than once; labels must be distinct")
    if cfg.answer == "letter" and len(labels) > 26:
        raise DataError(f"{labels_path}: {len(labels)} labels are more than 26 letters; set data.answer=label")
    index = {label: i for i, label in enumerate(labels)}
    splits = {}
    for split in ("train", "test"):
        path = folder / f"{split}.json"
        rows = _read_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of {{\"sentence\", \"label\"}} objects, got {show_value(rows)}")
        if not rows:
            raise DataError(f"{path}: the {split} split is empty")
        out = []
        for i, row in enumerate(rows):
            where = f"{path}: row {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with 'sentence' and 'label', got {show_value(row)}")
            text = text_field(row, "sentence", where)
            if "label" not in row:
                raise DataError(f"{where}: field 'label' is missing; give one of {labels_path} {labels}")
            label = row["label"]
            if not isinstance(label, str):
                raise DataError(f"{where}: field 'label' is {show_value(label)}, not a string; write the label itself, "
                                f"one of {labels_path} {labels}")
            if label not in index:
                raise DataError(f"{where}: field 'label' is {label!r}, which is not in {labels_path} {labels}")
            out.append({"text": text, "label": index[label], "ref": f"{split}.json row {i}"})
        splits[split] = out
    instruction = cfg.instructions.get(name) or INSTRUCTIONS.get(name, GENERIC_INSTRUCTION)
    return Task(name, "classification", instruction, labels, splits["train"], [], splits["test"], folder)


def read_jsonl(path: Path, error: type[Exception] | None = None):
    """(line number, parsed row) for every non-blank line of a file ("-": standard input); a malformed
    line raises `error` naming it."""
    error = error or DataError
    text = read_utf8(path, error)
    where = "standard input" if str(path) == "-" else path
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield lineno, _parse_json(line, f"{where}: line {lineno}", error, position=False)


def _load_generation(folder: Path, name: str) -> Task:
    splits = {}
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"task {name!r}: {path} is missing (instruction tasks need train.jsonl and test.jsonl)")
        out = []
        for lineno, row in read_jsonl(path):
            where = f"{path}: line {lineno}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with instruction, input, output, got {show_value(row)}")
            out.append({"instruction": text_field(row, "instruction", where),
                        "text": text_field(row, "input", where, optional=True),
                        "output": text_field(row, "output", where), "ref": f"{split}.jsonl line {lineno}"})
        if not out:
            raise DataError(f"{path}: the {split} split is empty")
        splits[split] = out
    return Task(name, "generation", "", None, splits["train"], [], splits["test"], folder)


def _read_json(path: Path):
    if not path.is_file():
        what = "is not a file" if path.exists() else "file is missing"
        raise DataError(f"{path}: {what} (a CL_Benchmark task needs train.json, test.json, labels.json)")
    return _parse_json(read_utf8(path, DataError), str(path), DataError)


def _parse_json(text: str, where: str, error: type[Exception], position: bool = True):
    """json.loads, any failure raised as `error` naming `where` (and the line and column if `position`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}: " if position else ""
        raise error(f"{where}: {at}not valid JSON ({e.msg})") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (lists or objects nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{where}: not valid JSON ({str(e).split(';')[0]})") from None


def subsample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded subset of `n` rows, class-balanced (round robin over shuffled classes) when labelled."""
    if n >= len(rows):
        return rows
    rng = random.Random(seed)
    by_class: dict[int, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r.get("label", -1), []).append(r)
    for group in by_class.values():
        rng.shuffle(group)
    picked, queues = [], [by_class[k] for k in sorted(by_class)]
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked


def _seed(seed: int, *parts: str) -> int:
    return zlib.crc32("/".join([str(seed), *parts]).encode())


# -- prompts and tokenization --------------------------------------------------------------------

@dataclass
class Encoded:
    """A task split tokenized: rows with input_ids, labels (answer only), prompt_len, label, target."""

    task: Task
    split: str
    rows: datasets.Dataset | list[dict]
    options: list[list[int]] | None  # per class, the answer ids scored at evaluation (= the training rows' answers)
    eos: int  # ends every answer


class PromptFormat:
    """Turns task rows into token ids for one tokenizer.

    A row is rendered to one string, prompt then answer, and encoded in one tokenizer call, so no token
    is split where the frame, the text and the answer meet (encoding the pieces apart gives
    sentencepiece tokenizers a stray "▁" at every seam). For every row:

    - `input_ids` = the ids of the rendered string as the tokenizer encodes it (BOS first when there
      is no chat template; a chat template writes its own), then EOS;
    - `prompt_len` is where the answer starts, and `labels` are the answer ids + EOS, IGNORE before;
    - a classification row's answer ids are `Encoded.options[label]`, the ids scored at evaluation;
    - a prompt too long for `data.max_length` is re-rendered with its text cut at a token boundary of
      the text, so the frame, the options and the answer are never cut.
    """

    def __init__(self, tokenizer, cfg: DataConfig):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer; prompts are encoded with character "
                             f"offsets, which only fast (tokenizers-backed) tokenizers give")
        self.tok = tokenizer
        self.cfg = cfg
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        self.bos = [] if self.chat or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.identity = _tokenizer_identity(tokenizer)

    def option_answers(self, task: Task) -> list[str]:
        if self.cfg.answer == "letter":
            return list(string.ascii_uppercase[: len(task.labels)])
        return list(task.labels)

    def content(self, task: Task, row: dict) -> str:
        """The user turn with SENTINEL where the row's text goes."""
        if task.kind == "generation":  # (an empty instruction only in a request: the text is the whole ask)
            if not row["instruction"]:
                return SENTINEL
            return row["instruction"] + ("\n\n" + SENTINEL if row["text"] else SENTINEL)
        if not self.cfg.options:
            return f"{task.instruction}\n\nText: {SENTINEL}"
        if self.cfg.answer == "letter":
            options = "\n".join(f"{letter}. {label}" for letter, label in zip(string.ascii_uppercase, task.labels))
            ask = "Answer with the letter of the correct option."
        else:
            options = "\n".join(f"- {label}" for label in task.labels)
            ask = "Answer with the correct option."
        return f"{task.instruction}\n\nText: {SENTINEL}\n\nOptions:\n{options}\n\n{ask}"

    @lru_cache(maxsize=4096)
    def frame(self, content: str) -> tuple[str, str]:
        """The rendered prompt before and after the text: the chat template if any, else the content and "Answer:"."""
        if self.chat:
            system = [] if self.cfg.system_prompt is None else [{"role": "system", "content": self.cfg.system_prompt}]
            rendered = self.tok.apply_chat_template(system + [{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        else:
            rendered = content + "\nAnswer:"
        before, after = rendered.split(SENTINEL)
        return before, after

    def answertext_field(self, answer: str) -> str:
        """The answer as it follows the prompt: after a space on the plain path ("Answer: A")."""
        return answer if self.chat else " " + answer

    def options(self, task: Task) -> list[list[int]]:
        """Per class, the ids of its answer after this task's prompt (which ends the same for every row)."""
        before, after = self.frame(self.content(task, {"text": ""}))
        answers = [self.answertext_field(a) for a in self.option_answers(task)]
        encoded = self._encode([before + after + a for a in answers])
        return [ids[_split_at(offsets, len(before + after), task.source / "labels.json"):]
                for ids, offsets in encoded]

    def _encode(self, strings: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each string encoded whole, BOS first on the plain path."""
        enc = self.tok(strings, add_special_tokens=False, return_offsets_mapping=True)
        return [(self.bos + ids, [(0, 0)] * len(self.bos) + [tuple(o) for o in offsets])
                for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]

    def _fit(self, frame: tuple[str, str], text: str, answer: str, encoded: tuple[list, list], reserve: int | None,
             where: Path) -> tuple[list[int], int]:
        """(ids of prompt + answer, prompt length) with room left for `reserve` answer ids (None: this row's
        own) and EOS within data.max_length, re-rendering with a shorter `text` until there is."""
        before, after = frame
        ids, offsets = encoded
        while True:
            prompt_len = _split_at(offsets, len(before + text + after), where)
            need = prompt_len + (len(ids) - prompt_len if reserve is None else reserve) + 1
            if need <= self.cfg.max_length:
                return ids, prompt_len
            start, end = len(before), len(before) + len(text)
            in_text = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
            keep = len(in_text) - (need - self.cfg.max_length)  # text tokens that fit
            cut = offsets[in_text[keep]][0] - start if keep > 0 else 0
            if cut <= 0:
                raise DataError(f"{where}: the prompt frame and answer take {need - len(in_text)} of data.max_length="
                                f"{self.cfg.max_length} tokens, leaving no room for the text; raise data.max_length")
            text = text[:cut]  # a prefix ending where a text token started
            [(ids, offsets)] = self._encode([before + text + after + answer])

    def encode_batch(self, task: Task, batch: dict) -> dict:
        """datasets.map function (batched): rows -> input_ids, labels, prompt_len, label, target."""
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["text"]))]
        if task.kind == "classification":
            options = self.options(task)
            reserve = max(len(o) for o in options)  # every class fits, so the prompt never depends on the label
            answers = [self.option_answers(task)[r["label"]] for r in rows]
        else:
            options, reserve = None, None
            answers = [r["output"] for r in rows]
        frames = [self.frame(self.content(task, r)) for r in rows]
        spoken = [self.answertext_field(a) for a in answers]
        encoded = self._encode([b + r["text"] + a + ans for (b, a), r, ans in zip(frames, rows, spoken)])
        out = {"input_ids": [], "labels": [], "prompt_len": [], "label": [],
               "target": answers if options is None else [""] * len(rows)}
        for row, frame, answer, enc in zip(rows, frames, spoken, encoded):
            where = task.source / row["ref"]
            ids, prompt_len = self._fit(frame, row["text"], answer, enc, reserve, where)
            if options is not None and ids[prompt_len:] != options[row["label"]]:
                raise DataError(f"{where}: the tokenizer encodes answer {answer!r} as {ids[prompt_len:]} after this "
                                f"row's text but as {options[row['label']]} after an empty text")
            out["input_ids"].append(ids + [self.eos])
            out["labels"].append([IGNORE] * prompt_len + ids[prompt_len:] + [self.eos])
            out["prompt_len"].append(prompt_len)
            out["label"].append(row.get("label", -1))
        return out

    def encode_rows(self, task: Task, rows: list[dict]) -> Encoded:
        """Rows tokenized in memory, without a cache file: requests, or test rows served under another
        task's prompt. Each row as `encode_batch` takes it (classification rows need a valid label)."""
        encoded = self.encode_batch(task, {k: [r[k] for r in rows] for k in rows[0]}) if rows else {}
        out = [{k: v[i] for k, v in encoded.items()} for i in range(len(rows))]
        return Encoded(task, "requests", out, self.options(task) if task.kind == "classification" else None, self.eos)

    def encode(self, task: Task, split: str) -> Encoded:
        rows = getattr(task, split)
        key = hashlib.sha256(json.dumps([FORMAT_VERSION, self.identity, task.kind, task.instruction, task.labels,
                                         self.cfg.answer, self.cfg.options, self.cfg.max_length, self.cfg.system_prompt,
                                         rows]).encode()).hexdigest()[:20]
        cache = Path(self.cfg.cache_dir).expanduser() / f"{task.name}-{split}-{key}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic.full_disk_explained(cache, "nothing else was written",
                                        todo="Free some space (or set data.cache_dir elsewhere) and run again"):
            ds = datasets.Dataset.from_list(rows).map(
                lambda b: self.encode_batch(task, b), batched=True, batch_size=256, remove_columns=list(rows[0]),
                cache_file_name=str(cache), load_from_cache_file=True, desc=f"tokenize {task.name}/{split}")
        return Encoded(task, split, ds, self.options(task) if task.kind == "classification" else None, self.eos)


def _split_at(offsets: list[tuple[int, int]], boundary: int, where: Path) -> int:
    """Index of the first token starting at or after character `boundary` (where the answer begins)."""
    n = next((i for i, (start, _) in enumerate(offsets) if start >= boundary), len(offsets))
    if n and offsets[n - 1][1] > boundary:
        raise DataError(f"{where}: the tokenizer merges the end of the prompt and the start of the answer into "
                        f"one token, so the answer has no tokens of its own; change the answer's first characters")
    return n


def _tokenizer_identity(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps([type(tok).__name__, getattr(tok, "chat_template", None), tok.bos_token_id, tok.eos_token_id])
    return hashlib.sha256((vocab + extra).encode()).hexdigest()


# -- batches ---------------------------------------------------------------------------------------

def collate(rows: list[dict], pad_id: int, left: bool = False, keys=("input_ids", "labels")) -> dict:
    """Pad `keys` of a list of rows to one tensor each (labels with IGNORE), plus attention_mask."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in keys:
        fill = IGNORE if key == "labels" else pad_id
        padded = []
        for r in rows:
            pad = [fill] * (width - len(r[key]))
            padded.append(pad + list(r[key]) if left else list(r[key]) + pad)
        out[key] = torch.tensor(padded, dtype=torch.long)
    mask = [[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) if left
            else [1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
    out["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    return out


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return n_rows // global_batch


def step_batches(n_rows: int, step: int, micro: int, accum: int, world: int, rank: int, seed: int) -> list[list[int]]:
    """Row indices of this rank's `accum` micro-batches for optimizer step `step`.

    Each epoch is a seeded permutation cut into global batches of micro * accum * world rows
    (the remainder is dropped). Micro-batch j of a global batch goes to rank j % world, so N ranks
    with accumulation A see exactly the micro-batches of one rank with accumulation N * A.
    """
    global_batch = micro * accum * world
    per_epoch = steps_per_epoch(n_rows, global_batch)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    rows = order[within * global_batch:(within + 1) * global_batch]
    micro_batches = [rows[j * micro:(j + 1) * micro] for j in range(accum * world)]
    return [mb for j, mb in enumerate(micro_batches) if j % world == rank]
