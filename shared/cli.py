"""What every command-line tool in the project shares: one-line errors and device/dtype choice."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line on stderr and exit code 2, no usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str, code: int = 2) -> int:
    """Print `error: message` on stderr and return `code`, for `sys.exit(main())`."""
    print(f"error: {message}", file=sys.stderr)
    return code
