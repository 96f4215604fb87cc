"""What every volume shares: config, corpus, tokenizer, data, checkpoints, CLI and result helpers.

Importing it (every volume's package does, first) sets `OMP_WAIT_POLICY=PASSIVE` unless the
environment already sets it. It must be set before torch loads its OpenMP runtime (libgomp reads it
once, at load), which is why it lives here and not in `shared.threads`. With the default policy an
OpenMP thread spins while it waits for the others; when another process holds one of a 2-core
machine's cores, the thread on that core is descheduled mid-op and its partner spins through its
time slice. `make vol2-bench ARGS="--dtype fp32"` on a 2-core AMD EPYC (AVX2) with `yes` pinned to
one core: 2.2x its idle time per training step with PASSIVE, 3.2x with ACTIVE (vol2_torch/README.md,
"Under load"). A process that imported torch before this package keeps its own policy.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
