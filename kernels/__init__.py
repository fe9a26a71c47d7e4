"""Triton kernels, one op per file, each file in one order: module docstring with the math,
@triton.jit kernels, launch config, _gate_cases() (for bench/compile_gate.py), launchers,
autograd Function, public function, and its plain-torch *_ref last. The underscore modules
hold what several ops share (_dispatch, _common, _lmhead); no op file imports another's
private names. Shipped as `score_fast.kernels` (see pyproject.toml's package-dir)."""
