"""Planted for tests/test_compile_gate.py: one warp holding a 16384-element row across two
reductions (512 fp32 values a thread must stay live, twice the 255-register ceiling): ptxas
spills."""
import functools

import torch
import triton
import triton.language as tl

_GATE_SPILLS = {}  # the test fills it in to check that an allowance is honoured


@triton.jit
def _spill_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    tl.store(out_ptr + offs, x - m - tl.log(s))


def _launch(x):
    out = torch.empty_like(x)
    _spill_kernel[(1,)](x, out, BLOCK=x.numel(), num_warps=1)
    return out


def _gate_cases():
    yield functools.partial(_launch, torch.empty(16384, device="meta"))
