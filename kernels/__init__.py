"""Triton kernels, one op per file, each with its plain-torch reference beside it.
Shipped as `score_fast.kernels` (see pyproject.toml's package-dir)."""
