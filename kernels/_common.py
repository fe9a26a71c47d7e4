"""What several ops share: the float dtypes they take, the checks on targets and temperature
(errors that name shapes and values), and the dtype a Triton kernel stores a 16-bit result in
under the interpreter."""
from __future__ import annotations

import math
import numbers

import torch

from ._dispatch import interpreting

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_targets(targets, like_name: str, like: torch.Tensor) -> None:
    """targets: an integer tensor shaped like `like` without its last dim."""
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point \
            or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, "
                         f"got {getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != tuple(like.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal {like_name}.shape[:-1] "
                         f"{tuple(like.shape[:-1])} ({like_name} shape {tuple(like.shape)})")


def check_temperature(temperature) -> float:
    """1 / temperature, for a finite temperature > 0."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return 1.0 / float(temperature)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores a result of `dtype` in: `dtype` itself, except bf16 under
    Triton's interpreter, which casts fp32 -> bf16 by truncation (up to 1 ulp off: twice
    torch's error) where a GPU rounds to nearest. There the kernel stores fp32 and the
    launcher rounds with torch (`.to(dtype)`)."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype
