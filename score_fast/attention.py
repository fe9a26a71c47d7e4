"""Packed-sequence (varlen) attention for the training forward, as a transformers attention
implementation: `use_varlen_attention(model)` switches a model to it.

Why: the trainer packs many episodes into one row and separates them with `position_ids`
(restarting at 0). transformers' sdpa path then builds a dense [T, T] block-diagonal mask
and runs attention over the whole row: O(T^2) work for sum_i O(L_i^2) of useful work. At a
4096-token budget with 32 episodes of 64..512 tokens that is ~14x the FLOPs, which made
the packed step 15x *slower* than padding on CPU (bench/bench_step.py). Here attention
runs per sequence:
  CUDA + flash-attn installed   flash_attn_varlen_func on the packed row (one kernel)
  otherwise                     scaled_dot_product_attention(is_causal=True) per sequence
Sequence boundaries come from `cu_seq_lens_q` when the caller passes it (the trainer does:
PackedBatch.cu_seqlens, no device sync) or else from `position_ids` (a new sequence starts
where the position does not increase by one).

Everything else (generation with a KV cache, padded batches with an attention mask) falls
through to transformers' sdpa, unchanged: the implementation is safe to leave on for the
sampler. Only models whose layers are all full causal attention are switched (a sliding-
window layer would need its window applied here too).

SCORE_FAST_ATTN=sdpa forces plain sdpa (the dense mask); =varlen forces the per-sequence
loop even where flash-attn is installed.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

__all__ = ["NAME", "use_varlen_attention", "varlen_attention_forward", "sequence_bounds"]

NAME = "score_fast_varlen"
log = logging.getLogger("score_fast")
_registered = False
_flash = None  # flash_attn_varlen_func, False when unavailable; loaded on first use


def _flash_varlen():
    global _flash
    if _flash is None:
        _flash = False
        if os.environ.get("SCORE_FAST_ATTN", "").lower() != "varlen":
            try:
                from flash_attn import flash_attn_varlen_func
                _flash = flash_attn_varlen_func
            except ImportError:
                pass
    return _flash


def sequence_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32, [n + 1]) of one packed row from its position ids [1, T] or [T]."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 2) != 1).flatten()
    end = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def _is_packed_call(query, key, attention_mask) -> bool:
    # no mask and no cache prefix: a training-style forward over whole sequences
    return attention_mask is None and query.shape[2] == key.shape[2]


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), the
    transformers attention-interface contract."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if not _is_packed_call(query, key, attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        pos = kwargs.get("position_ids")
        if pos is None or batch != 1:
            # plain causal attention over each row (nothing says the rows are packed)
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        cu = sequence_bounds(pos)
    elif batch != 1:
        raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {batch}")
    if int(cu[-1]) != length:
        raise ValueError(f"cu_seq_lens_q ends at {int(cu[-1])} but the packed row has "
                         f"{length} tokens")
    dropout = dropout if module.training else 0.0
    flash = _flash_varlen() if query.is_cuda else False
    if flash and query.dtype in (torch.float16, torch.bfloat16):
        max_len = kwargs.get("max_length_q") or int(torch.diff(cu).max())
        cu = cu.to(device=query.device, dtype=torch.int32)
        out = flash(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                    cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling,
                    causal=True)
        return out.unsqueeze(0), None
    groups = heads // key.shape[1]
    if groups > 1:  # GQA: share each kv head with its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # split, not slicing: the backward of a slice writes a zero tensor of the whole row
    # per sequence (n_seq x T traffic); split's backward is one cat
    sizes = torch.diff(cu).tolist()
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                           scale=scaling)
            for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2),
                               value.split(sizes, 2)) if q.shape[2]]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """The sdpa mask, except none at all for a maskless no-cache forward: varlen attention
    separates the packed sequences itself, so the dense [T, T] mask is never built."""
    from transformers.masking_utils import sdpa_mask
    if (kwargs.get("attention_mask") is None and not args and kwargs.get("q_offset", 1) == 0
            and kwargs.get("kv_offset", 1) == 0
            and kwargs.get("kv_length") == kwargs.get("q_length")):
        return None
    return sdpa_mask(*args, **kwargs)


def _full_attention_only(config) -> bool:
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    return not (getattr(config, "use_sliding_window", False)
                and getattr(config, "sliding_window", None))


def use_varlen_attention(model) -> bool:
    """Switch `model` (a transformers PreTrainedModel) to packed varlen attention. Returns
    False, leaving the model as it is, when SCORE_FAST_ATTN=sdpa or when the model has
    non-causal-full layers (sliding windows)."""
    global _registered
    if os.environ.get("SCORE_FAST_ATTN", "").lower() == "sdpa":
        return False
    if not _full_attention_only(model.config):
        log.info("varlen attention: %s has sliding-window layers; keeping %s",
                 type(model).__name__, model.config._attn_implementation)
        return False
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        AttentionInterface.register(NAME, varlen_attention_forward)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
