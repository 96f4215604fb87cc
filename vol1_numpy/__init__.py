"""Volume 1: every LLaMA block's forward and backward pass written by hand in NumPy, and proved right.

Each op is a stateless pair `op_forward(...) -> (out, cache)` / `op_backward(dout, cache) -> grads`
(one concept per module); `model.py` composes them into the whole LLaMA, `optim.py` is AdamW and
`gradcheck.py` checks every backward against finite differences and against torch autograd.
The chapter is `vol1_numpy/README.md`.
"""

import shared  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads, see shared/__init__.py)
