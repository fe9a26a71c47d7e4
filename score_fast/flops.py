"""Model-FLOPs utilisation (MFU) of the training step: the FLOPs the model's math needs,
over what the devices could do at their dense bf16 peak in the same time.

Per training step, for T tokens in sequences of lengths L_i (packed: attention stays within
each sequence, causal), with N the matmul parameters (decoder layers + LM head, not the
embedding lookup), n layers of width H:
  policy forward + backward   6 N T + 6 n H sum(L_i^2)
  reference forward           2 N T + 2 n H sum(L_i^2)
(A causal forward's QK^T and AV cost 2 L^2 H per layer, the backward twice the forward.)
Generation is not counted; recomputation under gradient checkpointing is not model FLOPs.

The peak comes from the device name (dense bf16 tensor-core TFLOP/s from the vendors' data
sheets) or SCORE_FAST_PEAK_TFLOPS; on a CPU or an unknown device there is no MFU.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["PEAK_BF16_TFLOPS", "peak_flops", "matmul_params", "step_flops"]

PEAK_BF16_TFLOPS = {  # dense (no sparsity), per device; first match in the device name wins
    "H200": 989.4, "H100": 989.4, "H800": 989.4, "GH200": 989.4, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "RTX 4090": 165.2, "RTX 3090": 71.0,
}


def peak_flops(device: torch.device | str) -> float | None:
    """Peak FLOP/s of one device, None when unknown (CPU, an unlisted GPU)."""
    env = os.environ.get("SCORE_FAST_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's blocks of a HF causal LM: its longest ModuleList child (`layers` in
    Llama / Qwen / Mistral, `h` in GPT-2)."""
    decoder = model.get_decoder()
    lists = [m for m in decoder.children() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(decoder).__name__} has no ModuleList of decoder layers")
    return max(lists, key=len)


def matmul_params(model) -> tuple[int, int, int]:
    """(N, n_layers, hidden) of a HF causal LM: N counts the decoder layers' and the LM
    head's weights (the head once even when tied to the embedding)."""
    cfg = model.config
    layers = decoder_layers(model)
    n = sum(p.numel() for p in layers.parameters())
    n += model.get_output_embeddings().weight.numel()
    return n, len(layers), cfg.hidden_size


def step_flops(n_params: int, n_layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Model FLOPs of one training step (module doc) over sequences of these lengths."""
    tokens = sum(lengths)
    attn = n_layers * hidden * sum(x * x for x in lengths)
    return 8.0 * n_params * tokens + 8.0 * attn
