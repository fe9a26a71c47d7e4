"""Planted for tests/test_compile_gate.py: a tl.dot of 8 x 8 tiles, which the CPU interpreter
runs (numpy) but no GPU compiles (tensor-core dots need every dim >= 16)."""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _dot8_kernel(a_ptr, out_ptr, B: tl.constexpr):
    offs = tl.arange(0, B)
    a = tl.load(a_ptr + offs[:, None] * B + offs[None, :])
    tl.store(out_ptr + offs[:, None] * B + offs[None, :], tl.dot(a, a))


def _launch(a):
    out = torch.empty_like(a)
    _dot8_kernel[(1,)](a, out, B=a.shape[0])
    return out


def _gate_cases():
    yield functools.partial(_launch, torch.empty(8, 8, dtype=torch.float16, device="meta"))
