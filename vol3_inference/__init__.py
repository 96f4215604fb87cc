"""Volume 3: an inference engine for the LLaMA of Volumes 1-2 (see README.md, chapter 3)."""
import shared  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads, see shared/__init__.py)
