"""bench.report: the figures a chapter quotes can be checked against a results file; the Markdown
table, the run header (git commit included) and the files a bench writes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from bench import report
from shared.results import describe_machine

RESULTS = """| variant | tok/s | vs HF |
|---|---:|---:|
| KV cache (ours) | 2552.6 | 3.51x |
| int8 w8a16 | 2,539 | 0.255x |
seed512, torch 2.13.0, fp32; continuous / static = 15.62x; bpb +0.31%; sentence ends at 12.5.
"""


def test_figures_are_every_number_with_its_unit_and_without_thousands_commas():
    assert report.figures(RESULTS) == {"2552.6", "3.51x", "2539", "0.255x", "15.62x", "0.31%", "12.5"}
    assert report.figures("2,539 and 2539") == {"2539"}
    assert report.figures("AVX2 p50 seed512 v1.2.3 1024x512") == set()  # words, versions and shapes


def test_check_quoted_names_what_is_missing_in_the_order_quoted():
    chapter = "| KV cache | 2,552.6 tok/s | 3.51x | 3.52x | 2539 | 0.255x | 17% | 3.52x |"
    assert report.check_quoted(chapter, RESULTS) == ["3.52x", "17%"]  # 2,552.6 is 2552.6
    assert report.check_quoted("| 2552.6 | 3.51x | 2,539 |", RESULTS) == []


def test_markdown_table_pads_and_right_aligns_number_columns():
    got = report.markdown_table(["name", "tok/s", "note"], [["a", "1,234.5", "x"], ["bb", "3.51x", "-"]])
    assert got.splitlines() == ["| name |   tok/s | note |",
                                "|------|--------:|------|",
                                "| a    | 1,234.5 | x    |",
                                "| bb   |   3.51x | -    |"]
    with pytest.raises(ValueError, match="3 cells"):
        report.markdown_table(["a", "b", "c"], [[1, 2]])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_short_hash_plus_dirty_for_tracked_changes_only(tmp_path):
    assert report.git_commit(tmp_path) == "unknown"  # not a checkout

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "new.txt").write_text("untracked\n")
    assert report.git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b\n")
    assert report.git_commit(tmp_path) == head + "+dirty"


def test_report_writes_json_markdown_and_the_published_copy(tmp_path, capsys):
    doc = report.Report("demo", "demo bench", ["--rounds", "2"], "bench.demo", tmp_path / "out",
                        tmp_path / "results", threads=3, device="cpu")
    doc.print_header()
    doc.heading("model")
    doc.table(["k", "tok/s"], [["fp32", "12.5"]], title="t")
    doc.note("A note.")
    doc.save_json({"x": 1, "complete": False})
    assert not (tmp_path / "out" / "demo.md").exists()  # the Markdown comes at the end
    paths = doc.finish({"x": 1, "complete": True})
    assert paths == [tmp_path / "out" / "demo.json", tmp_path / "out" / "demo.md", tmp_path / "results" / "demo.md"]
    md = (tmp_path / "out" / "demo.md").read_text()
    assert (tmp_path / "results" / "demo.md").read_text() == md
    lines = md.splitlines()
    assert lines[0] == "# demo bench" and lines[2] == "- command: `python -m bench.demo --rounds 2`"
    assert f"- machine: {describe_machine()}" in lines and lines[4].startswith("- threads: 3; torch ")
    assert "; device cpu" in lines[4] and "; commit " in lines[5]
    assert "## model" in lines and "| fp32 |  12.5 |" in lines and lines[-1] == "A note."
    data = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert data["x"] == 1 and data["complete"] is True and data["run"]["threads"] == 3
    assert data["run"]["commit"] and data["run"]["machine"]["cpu"]
    printed = capsys.readouterr().out
    assert "| fp32 |  12.5 |" in printed and "A note." in printed and "- machine:" in printed
