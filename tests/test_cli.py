"""shared.cli: one-line errors, and progress that reads well in a terminal and in a log file."""

from __future__ import annotations

import io
import time

from shared.cli import progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_file_is_a_few_plain_lines():
    log = io.StringIO()  # not a TTY: what `make vol2-train > log` gives
    bar = progress(total=40, desc="train", unit="step", file=log, log_every=0.05)
    for i in range(40):
        time.sleep(0.005)
        bar.update(1)
        bar.set_postfix(loss=1.0 / (i + 1))  # forces a refresh every step on a terminal
    bar.close()
    lines = [line for line in log.getvalue().splitlines() if line]
    assert "\r" not in log.getvalue()
    assert 2 <= len(lines) <= 10, lines  # about one per 0.05 s of the 0.2 s run, not one per step
    assert lines[-1].startswith("train: 100%") and "40/40" in lines[-1]


def test_progress_on_a_terminal_is_tqdm_frames_and_disable_silences_both():
    tty = FakeTTY()
    bar = progress(total=3, desc="x", file=tty)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue()
    quiet = io.StringIO()
    bar = progress(total=3, desc="x", file=quiet, disable=True)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""
