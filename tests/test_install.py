"""The project as pip installs it: a real `pip install` into a fresh venv, offline.

The new venv sees this environment's packages through a .pth file (so nothing is downloaded and no
dependency is installed twice); the project itself goes in with --no-deps --no-build-isolation, built by
the setuptools pinned in requirements-dev.txt. About 20-30 s, mostly imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from .conftest import REPO

VERBS = ("config", "sequence", "stage", "evaluate", "submit", "report", "extract", "merge", "export", "predict", "inspect")


def _env() -> dict[str, str]:
    """No PYTHONPATH (it would put the repo on the path), no pip settings of the machine's, no index."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    return env


def _run(*cmd, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def _fresh_venv(venv: Path, cwd: Path) -> Path:
    """A new venv of this interpreter's base Python, with pip from ensurepip, that also sees this
    environment's site-packages; returns its python. Fails (never skips) when it cannot be made."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run(base, "-m", "venv", venv, cwd=cwd)
    python = venv / "bin" / "python"
    assert (venv / "bin" / "pip").exists(), "ensurepip put no pip into the new venv"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=cwd).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_moecl_parent_env.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    # ensurepip also brings an old setuptools (65.5 on 3.11, no bdist_wheel) that would shadow ours.
    if list(site.glob("setuptools-*.dist-info")):
        _run(python, "-m", "pip", "uninstall", "-y", "-q", "setuptools", cwd=cwd)
    import setuptools

    out = _run(python, "-c", "import setuptools; print(setuptools.__version__)", cwd=cwd).stdout.strip()
    assert out == setuptools.__version__, f"the new venv builds with setuptools {out}, not ours ({setuptools.__version__})"
    return python


def _trainer_file(python: Path, cwd: Path) -> Path:
    return Path(_run(python, "-c", "import trainer; print(trainer.__file__)", cwd=cwd).stdout.strip()).resolve()


def _copy_checkout(dest: Path) -> Path:
    """The checkout without its venv, runs and build leftovers: a non-editable build writes build/ and
    *.egg-info into the source folder, which must not happen in the repo (nor reuse a stale build/)."""
    top = {".venv", "runs", ".git", "build", "dist"}

    def ignore(folder, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return skip | (top & set(names) if Path(folder).resolve() == REPO else set())

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def test_pip_install_and_editable_install_into_a_fresh_venv(tmp_path):
    """`pip install .` gives a package that stands on its own; `pip install -e .` over it then runs the repo."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    venv = tmp_path / "venv"
    python = _fresh_venv(venv, work)
    src = _copy_checkout(tmp_path / "checkout")
    _run(venv / "bin" / "pip", "install", "--no-deps", "--no-build-isolation", src, cwd=work)
    shutil.rmtree(src)  # the installed copy must stand on its own

    # The console script, run from a folder that is not the repo, is the installed package.
    moecl = venv / "bin" / "moecl"
    shebang = moecl.read_text().splitlines()[0]
    assert Path(shebang.removeprefix("#!")).parent.resolve() == (venv / "bin").resolve(), shebang
    help_text = _run(moecl, "--help", cwd=work).stdout
    assert all(v in help_text for v in VERBS), help_text
    assert _trainer_file(python, work).is_relative_to(venv.resolve())
    # main()'s int return is the process's exit code through the console-script wrapper (2: a user error).
    proc = subprocess.run([str(moecl), "report", str(tmp_path / "no-such-run")], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), (proc.returncode, proc.stderr[-2000:])

    # Data files: every shipped config and the whole bundled MTL5 subset, byte for byte, in <prefix>/share/moe-cl.
    share = venv / "share" / "moe-cl"
    for rel in ("ds_configs/zero3.json", "configs/tiny.yaml", "data/mtl5/agnews/train.json"):
        assert (share / rel).is_file(), rel
    shipped = [*REPO.glob("ds_configs/*.json"), *REPO.glob("configs/*.yaml"),
               *(p for p in (REPO / "data" / "mtl5").rglob("*") if p.is_file())]
    missing = [str(p.relative_to(REPO)) for p in shipped
               if not (share / p.relative_to(REPO)).is_file()
               or (share / p.relative_to(REPO)).read_bytes() != p.read_bytes()]
    assert not missing, f"not installed under share/moe-cl (list them in [tool.setuptools.data-files]): {missing}"
    # ... and the installed trainer finds the default DeepSpeed config there from any folder.
    found = _run(python, "-c", "from trainer.distributed import find_ds_config as f; print(f('ds_configs/zero3.json'))",
                 cwd=work).stdout.strip()
    assert Path(found) == share / "ds_configs" / "zero3.json"

    # Over the same venv, an editable install: the repo's own files run, and the command stays.
    _run(venv / "bin" / "pip", "install", "--no-deps", "--no-build-isolation", "-e", REPO, cwd=work)
    assert _trainer_file(python, work) == (REPO / "trainer" / "__init__.py").resolve()
    assert (venv / "bin" / "moecl").exists()
