"""The chapters and the README: every figure in a results table is in the results file it names, and
the text speaks of the repository only (no run diaries, no paths of one machine, no file the reader
does not have)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bench.report import check_quoted

REPO = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- results: (\S+) -->\n((?:\|.*\n)+)")


def tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return [REPO / p for p in out.stdout.split()]


def quoted_tables() -> list[tuple[Path, str, str]]:
    """(Markdown file, results file it names, the table below the marker) for every marked table."""
    return [(md, m.group(1), m.group(2)) for md in tracked("*.md")
            for m in MARKER.finditer(md.read_text(encoding="utf-8"))]


def test_every_figure_in_a_marked_table_is_in_its_results_file():
    tables = quoted_tables()
    assert tables, "no results table is marked with <!-- results: FILE --> in any chapter"
    for md, results, table in tables:
        path = REPO / results
        assert path.is_file(), f"{md.name} quotes {results}, which is not in the repository"
        missing = check_quoted(table, path.read_text(encoding="utf-8"))
        assert missing == [], f"{md.relative_to(REPO)} quotes figures that {results} does not hold: {missing}"


def test_the_text_names_no_run_diary_no_machine_path_and_no_outside_file():
    design = "DESIGN" + ".md"  # (spelled so that this file does not name it either)
    for path in tracked("*.md", "*.py", "Makefile"):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        assert design not in text, f"{where} cites {design}, which is not in the repository"
        assert str(REPO) not in text, f"{where} names this checkout's absolute path"
        if path.suffix == ".md":
            assert not re.search(r"\brun [A-Z]{1,2}\b", text), f"{where} names a benchmark run by letter"
