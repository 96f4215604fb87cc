"""Test-wide settings.

Tests run two pytest workers on two cores (`make test` uses `-n 2`); torch's default of one intra-op
thread per core would oversubscribe the machine (tiny models then run ~100x slower), so each worker
uses one thread. Benchmarks, not tests, are where thread counts are tuned.
"""

import torch

torch.set_num_threads(1)
