"""The documentation against the code: README.md, configs/README.md and docs/ parsed as they are.

Fails when a relative link or anchor does not resolve; when a config key, a CLI verb or a flag named there
does not exist (config keys against the schema, verbs and flags against the real argument parser, tool
flags against the tool's source); when a repository file named in a fenced command, or in inline code,
does not exist; when docs/config.md is not what tools/make_config_doc.py generates from the schema; when
docs/cli.md misses a verb or flag; and when README.md outgrows 12 KB.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from trainer.cli import build_parser
from trainer.config import Config

from .conftest import REPO

PAGES = [REPO / "README.md", REPO / "configs" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_BYTES = 12_000
SECTIONS = typing.get_type_hints(Config)
FILE_SUFFIXES = {"json", "jsonl", "safetensors", "yaml", "yml", "csv", "parquet", "md", "txt", "png", "py", "sh",
                 "out", "sbatch", "lock", "index"}
REPO_DIRS = ("configs", "tools", "slurm", "ds_configs", "tests", "trainer", "docs", "results")
OUTPUT_FLAGS = {"--out", "--output", "--local-dir"}
# Flags of other programs that the docs name alone in inline code (sbatch, srun, torchrun, pip, tensorboard); the
# trainer's own flags are checked against its parser, the tools' against their source.
EXTERNAL_FLAGS = {"--gres", "--gpus-per-task", "--dependency", "--signal", "--shutdown-timeout", "--no-deps",
                  "--logdir_spec"}


@dataclasses.dataclass
class Page:
    path: Path
    text: str  # prose only: fenced blocks removed
    fences: list[tuple[str, str]]  # (language, body)
    headings: list[str]

    @property
    def code_spans(self) -> list[str]:
        return re.findall(r"`([^`\n]+)`", self.text)

    @property
    def links(self) -> list[str]:
        prose = re.sub(r"`[^`\n]+`", "", self.text)
        return re.findall(r"\]\(([^)\s]+)\)", prose)


def _read(path: Path) -> Page:
    text, fences, headings, fence = [], [], [], None
    for line in path.read_text().splitlines():
        marker = re.match(r"^\s{0,3}```(\w*)", line)
        if fence is None and marker:
            fence = (marker.group(1), [])
        elif fence is not None and re.match(r"^\s{0,3}```\s*$", line):
            fences.append((fence[0], "\n".join(fence[1])))
            fence = None
        elif fence is not None:
            fence[1].append(line)
        else:
            text.append(line)
            if m := re.match(r"^#{1,6}\s+(.*)", line):
                headings.append(m.group(1))
    assert fence is None, f"{path}: a fenced block is not closed"
    return Page(path, "\n".join(text), fences, headings)


@pytest.fixture(scope="module")
def pages() -> list[Page]:
    return [_read(p) for p in PAGES]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Page) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in page.headings:
        a = _anchor(h)
        out.add(f"{a}-{seen[a]}" if a in seen else a)
        seen[a] = seen.get(a, 0) + 1
    return out


def _where(page: Page) -> str:
    return str(page.path.relative_to(REPO))


def test_every_relative_link_and_anchor_resolves(pages):
    by_path = {p.path: p for p in pages}
    bad = []
    for page in pages:
        for link in page.links:
            if re.match(r"^[a-z]+:", link):  # https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            dest = (page.path.parent / target).resolve() if target else page.path
            if not dest.exists():
                bad.append(f"{_where(page)}: {link}: {target} does not exist")
                continue
            if dest.is_dir():
                dest = dest / "README.md"
            if anchor:
                linked = by_path.get(dest) or _read(dest)
                if anchor not in _anchors(linked):
                    bad.append(f"{_where(page)}: {link}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, "\n".join(bad)


def _key_problem(parts: list[str]) -> str | None:
    """Why the dotted config key `parts` does not exist in the schema (None if it does)."""
    cls = SECTIONS.get(parts[0])
    i = 1
    while i < len(parts):
        if not dataclasses.is_dataclass(cls):
            return f"{parts[i - 1]} has no fields"
        hints = typing.get_type_hints(cls)
        name = parts[i]
        if name.startswith("<"):  # a placeholder for a field
            return None
        if name not in hints:
            return f"no field {name!r} in {'.'.join(parts[:i])}"
        t = hints[name]
        if typing.get_origin(t) is dict:  # a mapping: the next part is a free name (a task)
            cls = typing.get_args(t)[1]
            i += 2
            continue
        cls = t
        i += 1
    return None


def _yaml_keys(node: dict, prefix: list[str], out: list[list[str]]) -> None:
    """Every key path of a YAML config block, into sections and named sections (data.tasks.<task>)."""
    for key, value in node.items():
        path = prefix + [str(key)]
        out.append(path)
        if not isinstance(value, dict) or _key_problem(path):
            continue
        t = _field_type(path)
        if dataclasses.is_dataclass(t):
            _yaml_keys(value, path, out)
        elif typing.get_origin(t) is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            for name, section in value.items():
                if isinstance(section, dict):
                    _yaml_keys(section, path + [str(name)], out)


def _field_type(parts: list[str]):
    """The schema's type at an existing key path; a name inside a mapping (a task) is skipped."""
    t, i = SECTIONS[parts[0]], 1
    while i < len(parts):
        t = typing.get_type_hints(t)[parts[i]]
        if typing.get_origin(t) is dict and i + 1 < len(parts):
            t, i = typing.get_args(t)[1], i + 2
        else:
            i += 1
    return t


def test_every_config_key_named_exists(pages):
    bad = []
    span_key = re.compile(r"^([a-z_]+)\.([A-Za-z0-9_<>.\-]+?)(?:=.*|: .*| .*)?$")
    override = re.compile(r"(?<![\w/.\-])([a-z_]+)\.([A-Za-z0-9_<>.]+)=")
    for page in pages:
        found = [m.groups() for m in map(span_key.match, page.code_spans) if m]
        for lang, body in page.fences:
            if lang in ("bash", "sh", ""):
                found += override.findall(body)
            if lang == "yaml":
                raw = yaml.safe_load(body)
                if isinstance(raw, dict) and set(raw) <= set(SECTIONS):
                    paths: list[list[str]] = []
                    _yaml_keys(raw, [], paths)
                    bad += [f"{_where(page)}: yaml key {'.'.join(p)}: {why}" for p in paths
                            if (why := _key_problem(p))]
                elif isinstance(raw, dict) and set(raw) & set(SECTIONS):
                    bad.append(f"{_where(page)}: yaml block mixes config sections with {sorted(set(raw) - set(SECTIONS))}")
        for section, rest in found:
            parts = [section, *rest.rstrip(".").split(".")]
            if section not in SECTIONS or parts[1] in FILE_SUFFIXES:
                continue
            if why := _key_problem(parts):
                bad.append(f"{_where(page)}: {'.'.join(parts)}: {why}")
    assert not bad, "\n".join(bad)


def _verbs() -> dict[str, set[str]]:
    """Each verb of `python -m trainer` and its option strings, from the real parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {verb: {s for a in sp._actions for s in a.option_strings} for verb, sp in sub.choices.items()}


def _commands(page: Page) -> list[tuple[str, list[str]]]:
    """(what runs, its arguments) for each trainer, submit.sh or tool invocation in the page's bash blocks and
    in inline code; what runs is `trainer` or a script path."""
    lines = []
    for lang, body in page.fences:
        if lang in ("bash", "sh", ""):
            lines += body.replace("\\\n", " ").splitlines()
    lines += [s for s in page.code_spans if s.startswith(("python -m trainer ", "moecl ", "python tools/"))]
    out = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # not a shell line (e.g. a heredoc's Python)
        for i, w in enumerate(words):
            rest = words[i + 1:]
            end = next((j for j, x in enumerate(rest) if x in ("|", "&&", ";", ">", "2>")), len(rest))
            if w in ("-m", "--module") and rest[:1] == ["trainer"]:
                out.append(("trainer", rest[1:end]))
            elif w == "moecl" and i == 0:
                out.append(("trainer", rest[:end]))
            elif w.endswith("slurm/submit.sh"):
                out.append(("trainer", ["submit", *rest[:end]]))
            elif re.fullmatch(r"(\./)?tools/\w+\.py", w):
                out.append((w.removeprefix("./"), rest[:end]))
    return out


def test_every_cli_verb_and_flag_named_exists(pages):
    verbs = _verbs()
    known = set().union(*verbs.values())
    tool_sources = {f"tools/{p.name}": p.read_text() for p in (REPO / "tools").glob("*.py")}
    bad = []
    for page in pages:
        for what, args in _commands(page):
            if what == "tools/adapters.py":  # the adapter verbs, as `python -m trainer <verb>`
                what = "trainer"
            if what == "trainer":
                if args[:1] and args[0].startswith("<"):  # a placeholder: `python -m trainer <verb> ...`
                    continue
                if not args or args[0] not in verbs:
                    bad.append(f"{_where(page)}: trainer verb {args[:1]} does not exist")
                    continue
                flags, allowed = [a.split("=")[0] for a in args[1:] if a.startswith("--")], verbs[args[0]]
            else:
                if what not in tool_sources:
                    bad.append(f"{_where(page)}: {what} does not exist")
                    continue
                flags = [a.split("=")[0] for a in args if a.startswith("--")]
                allowed = {f for f in flags if f'"{f}"' in tool_sources[what]}
            bad += [f"{_where(page)}: {what} {args[0] if what == 'trainer' else ''} has no option {f}"
                    for f in flags if f not in allowed]
        # inline code naming a verb with its flags (`submit --dry-run`), or a flag alone (`--no-check`)
        for span in page.code_spans:
            words = span.split()
            if words[0] in verbs and any(w.startswith("--") for w in words):
                bad += [f"{_where(page)}: `{span}`: {words[0]} has no option {w.split('=')[0]}"
                        for w in words if w.startswith("--") and w.split("=")[0] not in verbs[words[0]]]
            elif len(words) <= 2 and words[0].startswith("--"):
                flag = words[0].split("=")[0]
                if flag not in known | EXTERNAL_FLAGS and not any(f'"{flag}"' in s for s in tool_sources.values()):
                    bad.append(f"{_where(page)}: `{span}`: no verb or tool has the option {flag}")
    assert not bad, "\n".join(bad)


def test_cli_page_names_every_verb_and_flag():
    text = (REPO / "docs" / "cli.md").read_text()
    missing = [f"{verb} {flag}" for verb, flags in _verbs().items() for flag in sorted(flags - {"-h", "--help"})
               if flag not in text]
    missing += [verb for verb in _verbs() if f"`{verb}`" not in text]
    assert not missing, f"docs/cli.md does not name: {missing}"


def test_every_repository_file_named_in_a_command_exists(pages):
    path = re.compile(rf"^(\./)?({'|'.join(REPO_DIRS)}|data)/[\w./\-]*$")
    bad = []
    for page in pages:
        named = []
        for lang, body in page.fences:
            if lang not in ("bash", "sh", ""):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                named += [w for prev, w in zip([""] + words, words) if prev not in OUTPUT_FLAGS]
        named += [s for s in page.code_spans if re.match(rf"^({'|'.join(REPO_DIRS)})/", s)]  # not data/: outputs
        for word in named:
            word = word.rstrip(",:;)")
            if path.match(word) and not re.search(r"[<*%$]", word) and not (REPO / word).exists():
                bad.append(f"{_where(page)}: {word} does not exist")
    assert not bad, "\n".join(bad)


def test_config_page_is_generated_from_the_schema():
    spec = importlib.util.spec_from_file_location("make_config_doc", REPO / "tools" / "make_config_doc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert (REPO / "docs" / "config.md").read_text() == tool.render(), \
        "docs/config.md differs from the schema: run python tools/make_config_doc.py"


def test_readme_stays_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"
