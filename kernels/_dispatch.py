"""Which path an op takes: compiled/interpreted Triton or the memory-lean PyTorch path.

SCORE_FAST_BACKEND=auto (default): Triton for CUDA tensors, PyTorch for CPU tensors.
SCORE_FAST_BACKEND=triton: Triton always; CPU tensors need TRITON_INTERPRET=1 (how CI tests
  every kernel: TRITON_INTERPRET must be set before triton is first imported).
SCORE_FAST_BACKEND=torch: PyTorch always.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor) -> bool:
    want = os.environ.get("SCORE_FAST_BACKEND", "auto").lower()
    if want not in ("auto", "triton", "torch"):
        raise ValueError(f"SCORE_FAST_BACKEND must be auto, triton or torch, got {want!r}")
    if want == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if want == "triton":
        if not _triton_importable():
            raise ImportError("SCORE_FAST_BACKEND=triton but triton is not installed")
        if not (on_cuda or interpreting()):
            raise RuntimeError("SCORE_FAST_BACKEND=triton needs CUDA tensors, or CPU tensors "
                               "with TRITON_INTERPRET=1 set before triton is imported")
        return True
    return on_cuda and _triton_importable()


_UNCHECKED = contextvars.ContextVar("score_fast_unchecked", default=False)


def checks_enabled() -> bool:
    """Value checks (target ids in range, turn labels in {0, 1, 2}, ...) read the data and
    so cost one device sync per call on a GPU; SCORE_FAST_CHECK_INPUTS=0 (or `unchecked()`)
    skips them when the caller guarantees valid input. Shape and dtype checks always run
    (they are free)."""
    return not _UNCHECKED.get() and os.environ.get("SCORE_FAST_CHECK_INPUTS", "1") != "0"


@contextlib.contextmanager
def unchecked():
    """The kernels' value checks off inside (the trainer's own calls: it checks its inputs
    on the host, where it builds them)."""
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)
