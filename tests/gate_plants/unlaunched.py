"""Planted for tests/test_compile_gate.py: a kernel no _gate_cases() call launches."""
import triton
import triton.language as tl


@triton.jit
def _forgotten_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


def _gate_cases():
    return iter(())
