"""tools/import_mtl5.py on a fake O-LoRA clone laid out as the release is (CL_Benchmark/TC/{agnews,dbpedia,yahoo},
CL_Benchmark/SC/{amazon,yelp}, dev.json a copy of test.json) holding the bundled real MTL5 rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "mtl5"
TOOL = REPO / "tools" / "import_mtl5.py"
HOME = {"agnews": "TC", "dbpedia": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC"}
FILES = ("train.json", "test.json", "labels.json")


def make_clone(root: Path, tasks=tuple(HOME), git: bool = False) -> Path:
    """root/O-LoRA with the bundled rows of `tasks` where the O-LoRA release keeps them."""
    clone = root / "O-LoRA"
    for task in tasks:
        folder = clone / "CL_Benchmark" / HOME[task] / task
        folder.mkdir(parents=True)
        for name in FILES:
            shutil.copyfile(DATA / task / name, folder / name)
        shutil.copyfile(folder / "test.json", folder / "dev.json")
    if git:
        env = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run(["git", "init", "-q", str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(clone), *env, "commit", "-qm", "release"], check=True)
    return clone


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    clone = make_clone(root, git=True)
    out = root / "mtl5_full"
    proc = run_tool(clone, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return clone, out, proc


def test_output_equals_source_row_for_row(imported):
    clone, out, _ = imported
    for task, group in HOME.items():
        for name in FILES:
            assert load(out / task / name) == load(clone / "CL_Benchmark" / group / task / name), f"{task}/{name}"


def test_dev_skipped_readme_and_report(imported):
    clone, out, proc = imported
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", *sorted(HOME)]  # no temporary folder left
    for task in HOME:
        assert sorted(p.name for p in (out / task).iterdir()) == sorted(FILES)  # dev.json not imported
    readme = (out / "README.md").read_text()
    assert str((clone / "CL_Benchmark").resolve()) in readme and commit in readme
    assert "`dev.json` was NOT imported" in readme and "byte copy of `test.json`" in readme
    lines = proc.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:5]] == sorted(HOME)
    assert lines[0].startswith("agnews: train 300 rows, test 150 rows, 4 classes <- ") and "TC/agnews" in lines[0]
    assert "dev.json skipped: a byte copy of test.json" in lines[0]
    assert lines[-1].startswith(f"set `data.root: {out}`")


def test_imported_folder_loads_through_the_trainer(imported):
    from trainer.config import DataConfig
    from trainer.data import load_tasks

    _, out, _ = imported
    order = ["dbpedia", "amazon", "yahoo", "agnews", "yelp"]
    tasks = load_tasks(DataConfig(root=str(out), order=order), seed=0)
    assert [t.name for t in tasks] == order
    for t in tasks:
        assert len(t.train) + len(t.val) == len(load(out / t.name / "train.json")) == 300
        assert len(t.val) == 30 and len(t.test) == 150
        assert t.labels == load(DATA / t.name / "labels.json")


def test_label_not_in_labels_json_names_file_and_row(tmp_path):
    clone = make_clone(tmp_path, ["agnews", "yelp"])
    train = clone / "CL_Benchmark" / "TC" / "agnews" / "train.json"
    rows = load(train)
    rows[7]["label"] = "Weather"
    train.write_text(json.dumps(rows))
    out = tmp_path / "out"
    proc = run_tool(clone, "--out", out, "--tasks", "yelp,agnews")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {train}: row 7: field 'label' is 'Weather', which is not in")
    assert not out.exists()  # yelp was valid, but nothing is written


def test_missing_task_folder_names_the_path(tmp_path):
    clone = make_clone(tmp_path, ["agnews"])
    out = tmp_path / "out"
    proc = run_tool(clone, "--out", out, "--tasks", "agnews,yelp")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {clone / 'CL_Benchmark' / 'SC' / 'yelp'} ")
    assert "task folder not found" in proc.stderr and "CL_Benchmark/SC/{amazon,yelp}" in proc.stderr
    assert not out.exists()


def test_existing_output_refused_without_force(tmp_path):
    clone = make_clone(tmp_path, ["agnews"])
    out = tmp_path / "out"
    (out / "agnews").mkdir(parents=True)
    (out / "agnews" / "train.json").write_text("[]\n")
    proc = run_tool(clone, "--out", out, "--tasks", "agnews")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {out / 'agnews'}: already holds data ; pass --force")
    assert sorted(p.name for p in out.rglob("*")) == ["agnews", "train.json"]  # untouched, no README either
    assert (out / "agnews" / "train.json").read_text() == "[]\n"

    proc = run_tool(clone, "--out", out, "--tasks", "agnews", "--force")
    assert proc.returncode == 0, proc.stderr
    assert len(load(out / "agnews" / "train.json")) == 300
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "agnews"]  # the old copy is gone


def test_cl_benchmark_folder_fallback_folder_and_overlap_warning(tmp_path):
    clone = make_clone(tmp_path, ["yelp"])
    bench = clone / "CL_Benchmark"
    moved = bench / "Other" / "yelp"  # not in SC/: found as CL_Benchmark/*/yelp
    moved.parent.mkdir()
    (bench / "SC" / "yelp").rename(moved)
    train, test = load(moved / "train.json"), load(moved / "test.json")
    train[:2] = test[:2]  # two test sentences now also in train
    (moved / "train.json").write_text(json.dumps(train))
    out = tmp_path / "out"
    proc = run_tool(bench, "--out", out, "--tasks", "yelp")
    assert proc.returncode == 0, proc.stderr
    assert f"<- {moved} " in proc.stdout
    assert "warning: yelp: 2 test sentence(s) also in train (exact match); kept" in proc.stdout
    assert load(out / "yelp" / "train.json") == train  # reported, not dropped
    assert "its git commit could not be read" in (out / "README.md").read_text()
