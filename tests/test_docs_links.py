"""Everything the repository refers to is in the repository: Markdown links (and their #anchors),
repo paths named in docs, docstrings, comments and scripts (`pytest -q tests/...` included),
`python -m` modules, `.md` file names, and no paths of a particular machine.

    pytest -q tests/test_docs_links.py      # a second or two; no imports of the project
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".md", ".py", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini"}
TEXT_NAMES = {"Makefile"}
SKIP_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", ".site", "__pycache__", ".pytest_cache"}
TOP_DIRS = ("benchmarks", "configs", "data_prep", "docs", "kernels", "model", "pipeline", "scripts", "tests")

# Files that still name something missing, each with the change that owns the fix. Keep it empty.
PENDING: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def repo_files() -> tuple[str, ...]:
    """Tracked files (git ls-files), or every file outside build/cache folders without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).exists()]
        if files:
            return tuple(sorted(files))
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names]
    return tuple(sorted(files))


def text_files(suffixes=None) -> list[str]:
    keep = suffixes or TEXT_SUFFIXES
    return [f for f in repo_files() if Path(f).suffix in keep or (suffixes is None and Path(f).name in TEXT_NAMES)]


def read(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8", errors="replace")


def exists(rel: str) -> bool:
    return (ROOT / rel).exists()


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md_rel: str) -> set[str]:
    out, seen, fence = set(), {}, False
    for line in read(md_rel).splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def md_links(md_rel: str):
    """(line number, target) of every inline Markdown link outside code blocks and code spans."""
    fence = False
    for i, line in enumerate(read(md_rel).splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        # a link's "[" follows a space, punctuation or the line's start (not `p[g, t](j)` of a formula)
        for m in re.finditer(r"(?<![\w\]])\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", re.sub(r"``?[^`]*``?", "x", line)):
            yield i, m.group(1)


def _problems(check, files) -> list[str]:
    found = []
    for rel in files:
        for line, what in check(rel):
            if rel not in PENDING:
                found.append(f"{rel}:{line}: {what}")
    return found


def _check_md_links(rel):
    for line, target in md_links(rel):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (ROOT / rel).parent / path if path else ROOT / rel
        if not dest.exists():
            yield line, f"link to a missing file: {target}"
        elif anchor and dest.suffix == ".md" and anchor not in anchors(os.path.relpath(dest, ROOT)):
            yield line, f"link to a missing heading: {target}"


# A repo path: starts with a top-level folder and has at least one more part; ends before punctuation.
_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w.*/-]*[\w*/])" % "|".join(TOP_DIRS))


def _check_paths(rel):
    for i, line in enumerate(read(rel).splitlines(), 1):
        for m in _PATH.finditer(line):
            p = m.group(1)
            last = p.rstrip("/").rsplit("/", 1)[-1]
            if not (p.endswith("/") or "." in last or len(last) >= 3):
                continue  # "docs/s" (documents per second) and the like are not paths
            if "*" in p:
                if not any(Path(f).match(p) or f.startswith(p.rstrip("*/")) for f in repo_files()):
                    yield i, f"names a path that matches nothing: {p}"
            elif not exists(p.rstrip("/")):
                yield i, f"names a missing path: {p}"


_MODULE = re.compile(r"python3? -m ((?:%s)(?:\.\w+)+)" % "|".join(TOP_DIRS))


def _check_modules(rel):
    for i, line in enumerate(read(rel).splitlines(), 1):
        for m in _MODULE.finditer(line):
            base = m.group(1).replace(".", "/")
            if not (exists(base + ".py") or exists(base + "/__main__.py")):
                yield i, f"`python -m {m.group(1)}` names a missing module"


GENERATED_MD = {"bench.md", "scaling.md"}  # written by the tools into their output folders


def _check_md_names(rel):
    names = {Path(f).name for f in repo_files()} | GENERATED_MD
    for i, line in enumerate(read(rel).splitlines(), 1):
        for m in re.finditer(r"(?<![\w/.-])([\w-]+\.md)\b", line):
            if m.group(1) not in names:
                yield i, f"names a Markdown file that is not in the repository: {m.group(1)}"


# Paths of one machine (a development checkout, a neighbour folder) must not appear anywhere.
_MACHINE = re.compile("/" + "work/|" + r"\.\./" + "shared")


def _check_machine_paths(rel):
    for i, line in enumerate(read(rel).splitlines(), 1):
        if _MACHINE.search(line):
            yield i, "names a path of one machine"


@pytest.mark.parametrize("check, suffixes", [
    (_check_md_links, {".md"}),
    (_check_paths, None),
    (_check_modules, None),
    (_check_md_names, None),
    (_check_machine_paths, None),
], ids=["markdown-links", "repo-paths", "python-m-modules", "md-names", "machine-paths"])
def test_references_resolve_inside_the_repo(check, suffixes):
    problems = _problems(check, text_files(suffixes))
    assert not problems, "\n".join(problems)


def test_pending_entries_are_still_needed():
    """An entry of PENDING whose file is fixed must go, so that the file is checked again."""
    checks = (_check_paths, _check_modules, _check_md_names, _check_machine_paths)
    fixed = [rel for rel in PENDING if exists(rel) and not any(list(c(rel)) for c in checks)]
    assert not fixed, f"remove from PENDING: {fixed}"


def test_slug_matches_github():
    assert slug("Choices where the paper is silent") == "choices-where-the-paper-is-silent"
    assert slug("Measured sparsity and recall: our definitions") == "measured-sparsity-and-recall-our-definitions"
    assert slug("`msa_select`: MSA block selection (index branch)") == "msa_select-msa-block-selection-index-branch"
