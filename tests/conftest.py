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
