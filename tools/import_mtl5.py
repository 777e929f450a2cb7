"""Import the full MTL5 benchmark from a local clone of O-LoRA (github cmnfriend/O-LoRA) into data.root.

    python tools/import_mtl5.py CLONE_OR_CL_BENCHMARK_DIR --out data/mtl5_full
        [--tasks agnews,amazon,dbpedia,yahoo,yelp] [--force]

The O-LoRA release keeps MTL5 in CL_Benchmark/TC/{agnews,dbpedia,yahoo} and CL_Benchmark/SC/{amazon,yelp},
each with train.json, dev.json, test.json (JSON lists of {"sentence": str, "label": str}) and labels.json (the
ordered label list). The argument may be the clone's root or its CL_Benchmark folder; a task not in its
usual sub-folder is looked for in any CL_Benchmark/*/<task>/.

Each task becomes OUT/<task>/{train.json,test.json,labels.json}, the layout the trainer reads: rows are kept
in order, as {"sentence", "label"} (any other keys are dropped). dev.json is NOT imported: in the release it
is a byte copy of test.json, so choosing checkpoints on it would choose on the test set; the trainer carves
its validation split out of train (data.val_fraction). OUT/README.md records the source folder, the clone's
git commit when it has one, and that dev.json was skipped.

Every file is checked before anything is written (labels.json a non-empty list of distinct strings; each row
an object with a non-blank string `sentence` and a `label` from labels.json); the first problem stops the
import with one line `error: <file>: row N: <what> ; <what to do>` and exit code 2, and nothing is written.
Each task is built in a temporary folder next to OUT/<task> and renamed into place, so a task folder is
never half-written (trainer/atomic.py, as stage folders). An existing non-empty OUT/<task> is refused
unless --force, which replaces it. Sentences found in both train and
test are reported as a warning count and kept.

Exit codes: 0 imported, 2 bad input (missing or malformed source, output refused), 1 writing failed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import atomic  # noqa: E402
from trainer.config import DataConfig  # noqa: E402
from trainer.data import DataError, read_cl_benchmark  # noqa: E402

TASKS = ("agnews", "amazon", "dbpedia", "yahoo", "yelp")
HOME = {"agnews": "TC", "dbpedia": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC"}
LAYOUT = ("an O-LoRA clone: CL_Benchmark/TC/{agnews,dbpedia,yahoo} and CL_Benchmark/SC/{amazon,yelp}, "
          "each holding train.json, dev.json, test.json, labels.json")
TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # as trainer.config.TASK_NAME
README_MARK = "# MTL5 imported by tools/import_mtl5.py"


class BadInput(Exception):
    """A problem with the source or the output folder: printed as one `error:` line, exit code 2."""


@dataclass
class Imported:
    name: str
    src: Path
    labels: list[str]
    train: list[dict]
    test: list[dict]
    dev_note: str
    overlap: int


# -- finding the source ---------------------------------------------------------------------------

def find_benchmark(path: Path) -> Path:
    """The CL_Benchmark folder: `path` itself or `path/CL_Benchmark`."""
    if not path.is_dir():
        raise BadInput(f"{path}: not a folder ; give the O-LoRA clone (git clone https://github.com/cmnfriend/O-LoRA) "
                       f"or its CL_Benchmark folder")
    if (path / "CL_Benchmark").is_dir():
        return path / "CL_Benchmark"
    if path.name == "CL_Benchmark" or (path / "TC").is_dir() or (path / "SC").is_dir():
        return path
    raise BadInput(f"{path}: holds no CL_Benchmark folder ; expected {LAYOUT}")


def find_task(bench: Path, task: str) -> Path:
    """`bench/<TC|SC>/<task>`, else the single `bench/*/<task>` folder."""
    home = bench / HOME.get(task, "?") / task
    if task in HOME and home.is_dir():
        return home
    found = sorted(p for p in bench.glob(f"*/{task}") if p.is_dir())
    if len(found) == 1:
        return found[0]
    looked = f"{home} (nor any {bench}/*/{task}/)" if task in HOME else f"{bench}/*/{task}/"
    if not found:
        raise BadInput(f"{looked}: task folder not found ; expected {LAYOUT}")
    raise BadInput(f"{bench}: task {task!r} is in {len(found)} folders ({', '.join(map(str, found))}) ; "
                   f"remove or rename the extra copies so that one is left")


def clone_commit(bench: Path) -> str | None:
    """The git commit of the clone holding `bench`, if `bench` is the CL_Benchmark folder of a git work tree."""
    root = bench.resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None  # not a clone, or a folder inside some other repository
    return lines[1]


# -- reading and validation -----------------------------------------------------------------------

def read_task(bench: Path, name: str) -> Imported:
    """A task's files, validated by the trainer's own loader (the rows it reads are the rows written)."""
    src = find_task(bench, name)
    for f in ("train.json", "test.json", "labels.json"):
        if not (src / f).is_file():
            raise BadInput(f"{src / f}: file is missing ; expected {LAYOUT}")
    try:
        task = read_cl_benchmark(src, name, DataConfig(answer="label"))
    except DataError as e:
        raise BadInput(f"{e} ; fix the file or re-download it (git checkout -- it)") from None
    labels = task.labels
    train, test = ([{"sentence": r["text"], "label": labels[r["label"]]} for r in rows] for rows in (task.train, task.test))
    dev = src / "dev.json"
    if not dev.is_file():
        dev_note = "no dev.json"
    elif filecmp.cmp(dev, src / "test.json", shallow=False):
        dev_note = "dev.json skipped: a byte copy of test.json"
    else:
        dev_note = "dev.json skipped: validation is carved from train"
    train_sentences = {r["sentence"] for r in train}
    overlap = sum(r["sentence"] in train_sentences for r in test)
    return Imported(name, src, labels, train, test, dev_note, overlap)


# -- writing --------------------------------------------------------------------------------------

def check_out(out: Path, names: list[str], force: bool) -> None:
    """Refuse, before anything is written, an output that would overwrite something without --force."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a folder ; choose another --out")
    for name in names:
        target = out / name
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise BadInput(f"{target}: exists and is not a folder ; remove it or choose another --out")
        if target.is_dir() and any(target.iterdir()) and not force:
            raise BadInput(f"{target}: already holds data ; pass --force to replace it, or choose another --out")
    readme = out / "README.md"
    if readme.is_file() and not force and not readme.read_text(errors="replace").startswith(README_MARK):
        raise BadInput(f"{readme}: exists and was not written by this tool ; pass --force to replace it, "
                       f"or choose another --out")


def dump(rows) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=0) + "\n"


def install_task(out: Path, task: Imported) -> None:
    """Write the task into a temporary sibling folder, renamed to OUT/<task> (replacing it) once complete."""
    with atomic.staged_dir(out / task.name) as tmp:
        atomic.write_text(tmp / "labels.json", json.dumps(task.labels, ensure_ascii=False) + "\n")
        atomic.write_text(tmp / "train.json", dump(task.train))
        atomic.write_text(tmp / "test.json", dump(task.test))


def readme_text(bench: Path, commit: str | None, tasks: list[Imported], out: Path) -> str:
    lines = [README_MARK, "",
             f"Source: `{bench.resolve()}` (the CL_Benchmark folder of a clone of https://github.com/cmnfriend/O-LoRA)"
             + (f", git commit `{commit}`." if commit else "; its git commit could not be read."), "",
             "| task | from | train | test | classes |", "|---|---|---|---|---|"]
    for t in tasks:
        lines.append(f"| {t.name} | `{t.src.relative_to(bench)}` | {len(t.train)} | {len(t.test)} | {len(t.labels)} |")
    lines += ["", "Format: `<task>/{train,test}.json` is a JSON list of `{\"sentence\": str, \"label\": str}` in the "
              "source's row order; `<task>/labels.json` is the ordered label list.", "",
              "`dev.json` was NOT imported: in the O-LoRA release it is a byte copy of `test.json`, so selecting "
              "on it would select on the test set. The trainer carves its validation split out of train "
              "(`data.val_fraction`).", ""]
    overlaps = [f"{t.name} {t.overlap}" for t in tasks if t.overlap]
    if overlaps:
        lines += [f"Test sentences also in train (exact match, kept): {', '.join(overlaps)}.", ""]
    names = {t.name for t in tasks}
    others = sorted(p.name for p in out.iterdir() if p.name not in names and not p.name.startswith(".")
                    and (p / "labels.json").is_file())
    if others:
        lines += [f"Also here, from an earlier run and not described above: {', '.join(others)}.", ""]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------

def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BadInput(f"--tasks {text!r}: no task named ; give e.g. --tasks {','.join(TASKS)}")
    for name in names:
        if not TASK_NAME.match(name):
            raise BadInput(f"--tasks: {name!r} is not a task folder name ; use letters, digits, '_' and '-'")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInput(f"--tasks: {', '.join(dup)} named twice ; name each task once")
    return names


def run(args: argparse.Namespace) -> None:
    names = parse_tasks(args.tasks)
    bench = find_benchmark(Path(args.source).expanduser())
    tasks = [read_task(bench, name) for name in names]  # everything is validated before anything is written
    out = Path(args.out).expanduser()
    check_out(out, names, args.force)
    commit = clone_commit(bench)
    out.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        install_task(out, t)
        print(f"{t.name}: train {len(t.train)} rows, test {len(t.test)} rows, {len(t.labels)} classes "
              f"<- {t.src} ({t.dev_note})")
        if t.overlap:
            print(f"warning: {t.name}: {t.overlap} test sentence(s) also in train (exact match); kept")
    atomic.write_text(out / "README.md", readme_text(bench, commit, tasks, out))
    print(f"imported {len(tasks)} task(s) from {bench}" + (f" (commit {commit[:12]})" if commit else "")
          + f" into {out}; dev.json was not imported (it equals test.json; validation is carved from train)")
    print(f"set `data.root: {out}` in your config (or pass data.root={out})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", metavar="CLONE_OR_CL_BENCHMARK_DIR",
                    help="the O-LoRA clone's root, or its CL_Benchmark folder")
    ap.add_argument("--out", required=True, help="the data.root to write, e.g. data/mtl5_full")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all five)")
    ap.add_argument("--force", action="store_true", help="replace existing OUT/<task> folders and OUT/README.md")
    args = ap.parse_args(argv)
    try:
        run(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.out} failed: {e} ; free space or fix permissions, then run again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
