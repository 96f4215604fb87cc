import shared  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads, see shared/__init__.py)
