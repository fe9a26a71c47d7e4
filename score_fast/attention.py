"""Packed-sequence (varlen) attention for the training forward, as a transformers attention
implementation: `use_varlen_attention(model)` switches a model to it.

Why: the trainer packs many episodes into one row and separates them with `position_ids`
(restarting at 0). transformers' sdpa path then builds a dense [T, T] block-diagonal mask
and runs attention over the whole row: O(T^2) work for sum_i O(L_i^2) of useful work. At a
4096-token budget with 32 episodes of 64..512 tokens that is ~14x the FLOPs, which made
the packed step 15x *slower* than padding on CPU (bench/bench_step.py). Here attention
runs per sequence:
  CUDA + flash-attn installed   flash_attn_varlen_func on the packed row (one kernel)
  CUDA, torch's varlen_attn     torch.nn.attention.varlen (torch >= 2.10; FlashAttention
                                inside torch, no package): one kernel, fp16 / bf16
  otherwise                     scaled_dot_product_attention(is_causal=True) per sequence
                                (a CPU: no launch cost; on a GPU tens to hundreds of small
                                launches a layer for a packed micro-batch)
Sequence boundaries come from `cu_seq_lens_q` when the caller passes it (the trainer does:
PackedBatch.cu_seqlens) or else from `position_ids` (a new sequence starts where the
position does not increase by one). The trainer also passes `seq_lens` (the lengths as a
host list, known when packing): with it no layer reads the bounds back from the device (a
host sync each on a GPU, twice a layer before).

Everything else (generation with a KV cache, padded batches with an attention mask) falls
through to transformers' sdpa, unchanged: the implementation is safe to leave on for the
sampler. Only models whose layers are all full causal attention are switched (a sliding-
window layer would need its window applied here too).

SCORE_FAST_ATTN=sdpa forces plain sdpa (the dense mask); =varlen forces the per-sequence
loop even where flash-attn is installed.
"""
from __future__ import annotations

import itertools
import logging
import os

import torch
import torch.nn.functional as F

__all__ = ["NAME", "use_varlen_attention", "varlen_attention_forward", "sequence_bounds",
           "packed_mask"]

NAME = "score_fast_varlen"
log = logging.getLogger("score_fast")
_registered = False
_flash = None  # flash_attn_varlen_func, False when unavailable; loaded on first use
_torch_varlen = None  # torch's varlen_attn with causal masking bound, False when absent


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


def _torch_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn with causal masking (torch 2.10 names it
    is_causal, later releases window_size=(-1, 0)), or False where torch has none."""
    global _torch_varlen
    if _torch_varlen is None:
        _torch_varlen = False
        if os.environ.get("SCORE_FAST_ATTN", "").lower() != "varlen":
            try:
                import functools
                import inspect
                from torch.nn.attention.varlen import varlen_attn
                params = inspect.signature(varlen_attn).parameters
                causal = ({"window_size": (-1, 0)} if "window_size" in params
                          else {"is_causal": True})
                _torch_varlen = (functools.partial(varlen_attn, **causal),
                                 "enable_gqa" in params)
            except ImportError:
                pass
    return _torch_varlen


def sequence_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32, [n + 1]) of one packed row from its position ids [1, T] or [T]."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 2) != 1).flatten()
    end = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def packed_mask(model, device) -> torch.Tensor | None:
    """The attention_mask a packed forward of `model` passes where it runs this
    implementation: an empty 4D tensor that marks the call as packed. transformers returns
    a 4D mask as it is, so it skips its own packed-sequence detection on position_ids (a
    device read, a host sync on a GPU, every forward); None for other implementations."""
    from score_fast.models import lora_base
    if getattr(lora_base(model).config, "_attn_implementation", None) != NAME:
        return None
    return torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)


def _marks_packed(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.numel() == 0


def _is_packed_call(query, key, attention_mask) -> bool:
    # no mask (or packed_mask's) and no cache prefix: a training-style forward over whole
    # sequences
    if _marks_packed(attention_mask):
        if query.shape[2] != key.shape[2]:
            raise ValueError("packed_mask with a cache prefix: a packed forward has none")
        return True
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
    sizes = kwargs.get("seq_lens")  # host ints: no read-back of cu
    if sizes is not None:
        if batch != 1 or sum(sizes) != length:
            raise ValueError(f"seq_lens sums to {sum(sizes)} tokens in a batch of {batch}; "
                             f"the packed row has {length} tokens")
        if cu is None:
            cu = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32,
                              device=query.device)
    elif cu is None:
        pos = kwargs.get("position_ids")
        if _marks_packed(attention_mask) and (pos is None or batch != 1):
            raise ValueError("packed_mask needs seq_lens, cu_seq_lens_q or position_ids of "
                             "one packed row")
        if pos is None or batch != 1:
            # plain causal attention over each row (nothing says the rows are packed)
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        cu = sequence_bounds(pos)
    elif batch != 1:
        raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {batch}")
    if sizes is None:  # a read-back of the bounds (a host sync on a GPU)
        sizes = torch.diff(cu).tolist()
        if sum(sizes) != length:
            raise ValueError(f"cu_seq_lens_q ends at {sum(sizes)} but the packed row has "
                             f"{length} tokens")
    dropout = dropout if module.training else 0.0
    half = query.dtype in (torch.float16, torch.bfloat16)
    flash = _flash_varlen() if query.is_cuda and half else False
    native = _torch_varlen_attn() if query.is_cuda and half and not flash else False
    if flash or (native and not dropout):
        max_len = kwargs.get("max_length_q") or max(sizes)
        cu = cu.to(device=query.device, dtype=torch.int32)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
        if flash:
            out = flash(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout,
                        softmax_scale=scaling, causal=True)
        else:
            fn, gqa = native
            if heads != k.shape[1] and not gqa:
                k = k.repeat_interleave(heads // k.shape[1], dim=1)
                v = v.repeat_interleave(heads // v.shape[1], dim=1)
            out = fn(q, k, v, cu, cu, max_len, max_len, scale=scaling,
                     **({"enable_gqa": True} if gqa and heads != k.shape[1] else {}))
        return out.unsqueeze(0), None
    groups = heads // key.shape[1]
    if groups > 1:  # GQA: share each kv head with its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # split, not slicing: the backward of a slice writes a zero tensor of the whole row
    # per sequence (n_seq x T traffic); split's backward is one cat
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
