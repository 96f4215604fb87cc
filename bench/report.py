"""How every bench reports: progress lines, results as JSON and Markdown, and charts.

A bench builds its results in a `Report`: a header naming the run (command, CPU and SIMD extensions,
threads, torch, date, git commit), then the bench's tables and notes in the order it prints them.
Printing and the Markdown file are one text, so the file says what the terminal said. `finish`
writes `<out>/<bench>.md` beside `<out>/<bench>.json` (default `runs/bench/`, which git ignores), and
with `--publish DIR` copies the Markdown to `DIR/<bench>.md`: the tracked `results/` folder, which
the chapters link instead of copying figures by hand. `figures` and `check_quoted` let a test check
that every number a chapter quotes appears in the results file it names. (Progress bars come from
`shared.cli.progress`: a bar on a terminal, a summary line every 30 s in a log file.)
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from shared.results import describe_machine, machine, save_figure, write_json, write_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "runs/bench"


def say(*parts) -> None:
    """Print a progress line now (flushed): what the bench is doing, not a result."""
    print(*parts, flush=True)


def git_commit(repo: str | Path = REPO) -> str:
    """`git rev-parse --short HEAD` of `repo`, plus "+dirty" where a tracked file has changes;
    "unknown" outside a git checkout (or without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_header(command: str, threads: int | str | None = None, **extra) -> dict:
    """What a result needs to be read and rerun: the command, machine, threads, torch, date, commit."""
    return {"command": command, "machine": machine(),
            "threads": torch.get_num_threads() if threads is None else threads, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), **extra}


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The flags every bench shares: where its JSON and Markdown go, and where to publish the Markdown."""
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON, Markdown and charts (default: {DEFAULT_OUT})")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="also copy the Markdown table to DIR/<bench>.md (e.g. results, which the chapters link; "
                        "default: none)")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded so that it also reads as plain text; a column whose cells all
    start with a digit (numbers, 1.23x, 45%) is right-aligned. Cells are str()-ed as they are."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in r] for r in rows]
    if any(len(r) != len(columns) for r in cells):
        raise ValueError(f"every row needs {len(columns)} cells: {[len(r) for r in cells]}")
    width = [max(3, *(len(r[i]) for r in cells)) for i in range(len(columns))]
    right = [bool(rows) and all(r[i][:1].isdigit() or r[i][:2].lstrip("+-")[:1].isdigit() for r in cells[1:])
             for i in range(len(columns))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, width, right, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if ra else ("-" * (w + 2)) for w, ra in zip(width, right, strict=True)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


class Report:
    """One bench's results: a header, then headings, tables and notes, each printed as it is added.

    `name` is the file stem (`vol3` -> vol3.json, vol3.md); `title` the Markdown's first heading.
    """

    def __init__(self, name: str, title: str, argv: Sequence[str] | None, prog: str,
                 out: str | Path = DEFAULT_OUT, publish: str | Path | None = None,
                 threads: int | str | None = None, quiet: bool = False, **extra):
        argv = sys.argv[1:] if argv is None else list(argv)
        self.name, self.title, self.quiet = name, title, quiet
        self.out, self.publish_dir = Path(out), Path(publish) if publish else None
        self.run = run_header(" ".join(["python -m", prog, *map(shlex.quote, argv)]), threads, **extra)
        self.blocks: list[str] = []
        self.tables: list[dict] = []
        self.paths = {"json": self.out / f"{name}.json", "md": self.out / f"{name}.md"}

    def header_lines(self) -> list[str]:
        r = self.run
        extra = "".join(f"; {k} {v}" for k, v in r.items()
                        if k not in ("command", "machine", "threads", "torch", "date", "commit"))
        return [f"- command: `{r['command']}`", f"- machine: {describe_machine(r['machine'])}",
                f"- threads: {r['threads']}; torch {r['torch']}{extra}",
                f"- date: {r['date']}; commit {r['commit']}"]

    def _add(self, text: str) -> None:
        self.blocks.append(text)
        if not self.quiet:
            print(f"\n{text}", flush=True)

    def heading(self, text: str, level: int = 2) -> None:
        self._add(f"{'#' * level} {text}")

    def note(self, text: str) -> None:
        """A paragraph: one line printed, a paragraph of its own in the Markdown."""
        self._add(text)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
        """A table (see `markdown_table`), kept in the JSON too as {"title", "columns", "rows"}."""
        self.tables.append({"title": title, "columns": list(columns), "rows": [[str(c) for c in r] for r in rows]})
        self._add(markdown_table(columns, rows))

    def print_header(self) -> None:
        if not self.quiet:
            print("\n".join(self.header_lines()), flush=True)

    def markdown(self) -> str:
        return "\n\n".join([f"# {self.title}", "\n".join(self.header_lines()), *self.blocks]) + "\n"

    def save_json(self, data: dict | None = None) -> Path:
        """`data` (default: the tables) with the run header, written atomically: call after each section."""
        return write_json(self.paths["json"], {"run": self.run, **(data if data is not None else {"tables": self.tables})})

    def finish(self, data: dict | None = None) -> list[Path]:
        """Write the JSON and the Markdown (and publish it); return the paths written."""
        paths = [self.save_json(data), write_text(self.paths["md"], self.markdown())]
        if self.publish_dir is not None:
            paths.append(write_text(self.publish_dir / f"{self.name}.md", self.markdown()))
        return paths


# --- charts -----------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_chart(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save `fig` atomically (`shared.results.save_figure`) and close it."""
    try:
        return save_figure(fig, path, dpi=dpi)
    finally:
        pyplot().close(fig)


# --- checking what a chapter quotes ------------------------------------------------------------------

# A figure: digits with optional thousands commas and decimals, an optional exponent, an optional
# x (a ratio) or % after; not part of a word (seed512, fp32, p50, AVX2) and not part of a version or
# a dotted number (2.13.0).
_FIGURE = re.compile(r"(?<![\w.])(?<!\d,)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?([eE][+-]?\d+)?(x|%)?(?![\w%]|[.,]\d)")


def figures(markdown_text: str) -> set[str]:
    """Every number in a Markdown text, as written but with thousands commas dropped: "2552.6",
    "3.51x", "0.255x", "45%", "2,539" -> "2539". Numbers inside words (seed512, fp32, p50) and version
    strings (2.13.0) are not figures."""
    return {m.group(1).replace(",", "") + "".join(g or "" for g in m.groups()[1:])
            for m in _FIGURE.finditer(markdown_text)}


def check_quoted(chapter_table_text: str, results_text: str) -> list[str]:
    """The numbers quoted in a chapter's table (or any text) that do not appear in the results file,
    in the order they are quoted (each once): [] when every quoted figure is in the results."""
    have = figures(results_text)
    missing: list[str] = []
    for m in _FIGURE.finditer(chapter_table_text):
        f = m.group(1).replace(",", "") + "".join(g or "" for g in m.groups()[1:])
        if f not in have and f not in missing:
            missing.append(f)
    return missing
