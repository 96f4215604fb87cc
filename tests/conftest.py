"""Test-wide settings.

Tests run two pytest workers on two cores (`make test` uses `-n 2`); torch's default of one intra-op
thread per core would oversubscribe the machine (tiny models then run ~100x slower), so each worker
uses one thread, and every test starts with one even if the test before it (a CLI run, a thread
probe) changed it. Benchmarks, not tests, are where thread counts are tuned.

Without CUDA, Triton kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, numpy on the CPU).
`@triton.jit` reads the variable when a kernel is decorated, so it is set here, before any test
module imports a kernel module; a value already in the environment wins.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def randomize_norms(model: torch.nn.Module, low: float = 0.5, high: float = 1.5) -> torch.nn.Module:
    """`model` in eval mode with every `*norm.weight` drawn from U(low, high): init sets them to 1,
    which would hide a mixed-up norm name in a weight-mapping or export test."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(low, high)
    return model.eval()


# The Triton tests, summed up at the end of the run: on a CPU they are the kernels run in the
# interpreter and the sm_80/sm_90 compile check, and this says how many ran and what they cost.
TRITON_TEST_FILES = ("tests/test_vol3_triton_kernels.py", "tests/test_vol3_triton_attention.py")
COMPILE_TEST = "test_every_kernel_compiles_for_sm80_and_sm90"


def pytest_terminal_summary(terminalreporter):
    counts: dict[str, dict[str, int]] = {"kernels": {}, "compile": {}}
    seconds = {"kernels": 0.0, "compile": 0.0}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(rep, "nodeid", "")
            if not nodeid.startswith(TRITON_TEST_FILES):
                continue
            group = "compile" if COMPILE_TEST in nodeid else "kernels"
            seconds[group] += getattr(rep, "duration", 0.0)
            if rep.when == "call" or outcome in ("skipped", "error"):
                counts[group][outcome] = counts[group].get(outcome, 0) + 1
    if not any(counts.values()):
        return
    mode = "on CUDA" if torch.cuda.is_available() else "in the interpreter (TRITON_INTERPRET=1)"

    def said(group):
        return ", ".join(f"{n} {k}" for k, n in sorted(counts[group].items())) or "none run"

    terminalreporter.write_line(f"Triton kernel tests {mode}: {said('kernels')}, {seconds['kernels']:.1f} s of test time; "
                                f"sm_80/sm_90 compile check: {said('compile')}, {seconds['compile']:.1f} s")
