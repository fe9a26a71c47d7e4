"""Step-time model beside the memory model (score_fast.memory): each phase of one SCoRe step
at its roofline, and which bound applies.

    phases = predict_time(cfg, DEVICES["H100"], shape=StepShape(...), dtype="bf16")
    print(time_table(phases))

A phase's time is the larger of its FLOPs over the device's dense matmul rate and its
bytes over its memory bandwidth, plus its kernel launches x a launch cost (a GPU kernel's
~5 us without CUDA graphs; a CPU op's dispatch, measured); the bound is whichever term is
largest. Per phase, with N the matmul parameters (decoder layers + LM head), b the compute
dtype's bytes, n layers of width H, kv the key/value width, L_i the sequence lengths:

  prefill            2 N T_prompt + 2 n H sum(L^2) FLOPs; the weights read once a wave
  attempt 1 / 2      per decode step 2 N B FLOPs; bytes b N (the weights) + the KV cache
                     of the live rows, 2 n kv b (context) each: bandwidth-bound at any
                     batch a GPU holds (H100: 989 TFLOP/s / 3.35 TB/s = 295 FLOP/B; a step
                     does 2 B FLOPs per weight byte / b, so B < ~295 is bandwidth-bound)
  reference forward  2 N T + 2 n H sum(L^2) over the packed episodes
  policy             6 N T + 6 n H sum(L^2), + 2 N T + 2 n H sum(L^2) recomputed under
                     gradient checkpointing
  optimizer          fused AdamW: 28 bytes a trainable parameter (fp32 weight, grad, m, v
                     read; weight, m, v written), bandwidth-bound

Episode shape: every episode at its budget (prompt_tokens, max_new_tokens per attempt,
instruction_tokens): an upper bound, as the memory model's. Decode runs in waves of
`in_flight` episodes through both attempts. The issue's worked example (Qwen2.5-1.5B, one
H100, 512 episodes, 300-token prompts, 512 new tokens an attempt, bf16): ~4.7 s of decode at
batch 512, ~11 s at batch 64; tests/test_steptime.py checks this model gives those.
"""
from __future__ import annotations

import dataclasses
import math
import time

from score_fast.memory import (DTYPE_BYTES, StepShape, _linears, _root_params, count_params,
                               lora_params)

__all__ = ["Rates", "DEVICES", "Phase", "predict_time", "measure_host", "time_table",
           "KERNELS_PER_LAYER"]

# kernels a decoder layer's forward launches in HF's Llama/Qwen2 (2 RMSNorms of ~5 ops,
# 7 projections, rotary ~10, attention ~4, activation, product, 2 residual adds): ~40;
# a backward ~2x that
KERNELS_PER_LAYER = 40
_LAUNCH_GPU = 5e-6  # a CUDA kernel launch from Python (no graph), seconds


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a device does a second: dense matmul FLOPs in the compute dtype, bytes of
    memory traffic, and the fixed cost of one kernel (or op) launch."""
    name: str
    flops: float
    bandwidth: float
    launch: float = _LAUNCH_GPU


# data-sheet dense bf16 tensor-core rates and HBM bandwidths (SXM parts)
DEVICES = {
    "A100": Rates("A100 80GB", 312e12, 2.04e12),
    "H100": Rates("H100 SXM", 989e12, 3.35e12),
    "H200": Rates("H200", 989e12, 4.8e12),
    "B200": Rates("B200", 2250e12, 8.0e12),
}


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    bound: str  # compute | bandwidth | launch
    flops: float
    bytes: float
    launches: int


def _phase(name: str, flops: float, nbytes: float, launches: int, rates: Rates) -> Phase:
    terms = {"compute": flops / rates.flops, "bandwidth": nbytes / rates.bandwidth,
             "launch": launches * rates.launch}
    roof = max(terms["compute"], terms["bandwidth"])
    bound = max(terms, key=terms.get)
    return Phase(name, roof + terms["launch"], bound, flops, nbytes, launches)


def _matmul_params(cfg) -> int:
    """Decoder layers' and the LM head's weights (the embedding lookup is not a matmul)."""
    return count_params(cfg) - _root_params(cfg) + cfg.vocab_size * cfg.hidden_size


def _forward(cfg, lengths_sq: float, tokens: float) -> float:
    """FLOPs of one forward over `tokens` in sequences whose squared lengths sum to
    lengths_sq (causal attention: QK^T and AV, 2 L^2 H a layer)."""
    return 2 * _matmul_params(cfg) * tokens + 2 * cfg.num_hidden_layers * cfg.hidden_size \
        * lengths_sq


def predict_time(cfg, rates: Rates, *, shape: StepShape = StepShape(), dtype: str = "bf16",
                 lora_rank: int = 0, gradient_checkpointing: bool = False,
                 graphs: bool = False) -> list[Phase]:
    """The phases of one step for a HF config on `rates` (module doc). graphs: decode steps
    replayed as CUDA graphs (SlotEngine): one launch a step instead of one a kernel."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)}")
    b, s = DTYPE_BYTES[dtype], shape
    n, N = cfg.num_hidden_layers, _matmul_params(cfg)
    kv = _linears(cfg)["k_proj"][1]
    kv_token = 2 * n * kv * b  # K and V of one token, every layer
    weights = b * N
    E, B = s.episodes, max(1, min(s.in_flight, s.episodes))
    waves = math.ceil(E / B)
    forward_kernels = n * KERNELS_PER_LAYER + 10
    phases = [_phase("prefill", _forward(cfg, E * s.prompt_tokens ** 2, E * s.prompt_tokens),
                     waves * weights + E * s.prompt_tokens * kv_token, waves * forward_kernels,
                     rates)]
    # decode: a step reads the weights once and every live row's cache (its context grows
    # by one a step: the mean context over the attempt is start + T / 2)
    starts = {"attempt 1": s.prompt_tokens,
              "attempt 2": s.prompt_tokens + s.max_new_tokens + s.instruction_tokens}
    T = s.max_new_tokens
    for name, start in starts.items():
        steps = waves * T
        context = start + T / 2
        flops = steps * B * (2 * N + 4 * n * cfg.hidden_size * context)
        nbytes = steps * (weights + B * context * kv_token)
        phases.append(_phase(name, flops, nbytes, waves * (T if graphs else T * forward_kernels),
                             rates))
    length = s.prompt_tokens + 2 * s.max_new_tokens + s.instruction_tokens
    tokens, sq = E * length, E * length ** 2
    micro = math.ceil(tokens / s.max_tokens)
    fwd = _forward(cfg, sq, tokens)
    phases.append(_phase("reference forward", fwd, micro * weights, micro * forward_kernels,
                         rates))
    policy = 3 * fwd + (fwd if gradient_checkpointing else 0)
    phases.append(_phase("policy fwd+bwd", policy, micro * 3 * weights,
                         micro * 3 * forward_kernels, rates))
    trainable = lora_params(cfg, lora_rank) if lora_rank else count_params(cfg)
    phases.append(_phase("optimizer", 4 * trainable, 28 * trainable, 4, rates))
    return phases


def measure_host(threads: int | None = None) -> Rates:
    """This machine's rates, measured: an fp32 [1024, 1024] x [1024, 1024] matmul (best of 5),
    a 256 MB copy, and a one-element op's dispatch (the CPU's "launch")."""
    import torch
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, c = torch.randn(1024, 1024), torch.randn(1024, 1024)
        src, dst = torch.empty(2 ** 26), torch.empty(2 ** 26)
        one = torch.zeros(1)

        def best(fn, reps):
            fn()
            out = math.inf
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                out = min(out, time.perf_counter() - t)
            return out

        mm = best(lambda: a @ c, 5)
        copy = best(lambda: dst.copy_(src), 3)
        op = best(lambda: [one.add_(1) for _ in range(1000)], 3) / 1000
    finally:
        torch.set_num_threads(prev)
    return Rates("this host", 2 * 1024 ** 3 / mm, 2 * src.nbytes / copy, op)


def time_table(phases: list[Phase]) -> str:
    rows = [f"{'phase':<18}{'seconds':>10}  bound", *(
        f"{p.name:<18}{p.seconds:>10.3f}  {p.bound}" for p in phases),
        f"{'step':<18}{sum(p.seconds for p in phases):>10.3f}"]
    return "\n".join(rows)
