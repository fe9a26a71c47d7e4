"""What the LM-head ops (linear_logprobs, linear_score_loss, linear_sample) share: the checks
on hidden [..., H], weight [V, H] and bias [V]."""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_head(hidden, weight, bias) -> tuple[int, int]:
    """Shape and dtype checks (free, no device sync) naming the shapes; returns V, H."""
    for name, a in (("hidden", hidden), ("weight", weight)):
        if not isinstance(a, torch.Tensor) or a.dtype not in FLOATS:
            raise ValueError(f"{name} must be a float32, bfloat16 or float16 tensor, "
                             f"got {getattr(a, 'dtype', type(a).__name__)}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1, got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden shape {tuple(hidden.shape)} and weight shape "
                         f"{tuple(weight.shape)} disagree on H ({hidden.shape[-1]} vs {H})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype} "
                         f"(hidden shape {tuple(hidden.shape)}, weight shape "
                         f"{tuple(weight.shape)})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},) to match weight shape "
                             f"{tuple(weight.shape)}, got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
    return V, H
