"""What every command-line tool in the project shares: one-line errors, and progress that reads well
on a terminal and in a log file."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line on stderr and exit code 2, no usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def preset_arg(name: str) -> str:
    """argparse `type=` for a --preset flag: the preset's own name (old aliases mapped, "cpu" ->
    "small"), or an argparse error listing the known names."""
    from shared.config import preset_name

    try:
        return preset_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fail(message: str, code: int = 2) -> int:
    """Print `error: message` on stderr and return `code`, for `sys.exit(main())`."""
    print(f"error: {message}", file=sys.stderr)
    return code


class _LogLines:
    """Progress for a log file: tqdm's status line (`tqdm.format_meter`), printed as a plain line at
    most every `log_every` seconds and once at the end, not a carriage-return frame per update.
    Implements the part of tqdm's interface the project uses: iteration, update, set_postfix, close,
    `with`."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", initial: int = 0,
                 unit_scale: bool = False, log_every: float = 30.0, file=None, **_):
        self.iterable, self.desc, self.unit, self.unit_scale = iterable, desc, unit, unit_scale
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.initial, self.log_every, self.fp = initial, initial, log_every, file or sys.stderr
        self.postfix, self.start, self.shown = "", time.perf_counter(), None
        self.last = float("-inf")

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.log_every:
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, line: str) -> None:
        self.fp.write(line + "\n")
        self.fp.flush()

    def close(self) -> None:
        if self.shown != self.n:
            self._print()

    def _print(self) -> None:
        now = time.perf_counter()
        self.last, self.shown = now, self.n
        line = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit_scale, postfix=self.postfix or None, initial=self.initial)
        self.fp.write(line + "\n")
        self.fp.flush()


def progress(*args, disable: bool = False, log_every: float = 30.0, **kwargs):
    """A tqdm progress bar on a terminal; in a log file (stderr not a TTY), a plain summary line every
    `log_every` seconds and one at the end instead of a frame per step. `disable=True` turns both off.
    Takes tqdm's arguments (iterable, total, desc, unit, initial, unit_scale, file)."""
    stream = kwargs.get("file") or sys.stderr
    if disable or stream.isatty():
        return tqdm(*args, disable=disable, dynamic_ncols=True, **kwargs)
    return _LogLines(*args, log_every=log_every, **kwargs)
