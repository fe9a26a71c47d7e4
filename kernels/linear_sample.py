"""One token per row sampled from softmax((hidden @ weight.T + bias) / T), straight from the
decoder's last hidden state and the LM-head weight, never holding the [B, V] logits or
probabilities: Gumbel-max over vocabulary tiles, fused with the LM-head matmul.

Why: one decode step's LM head on a 2-core CPU (fp32, 1 thread; bench/bench_sampling.py,
bench/results/bench_sampling_cpu.md): B = 32, V = 32000, H = 512: the matmul 30 ms, with
softmax + torch.multinomial over the [B, V] logits 71 ms, this op 33 ms; B = 256: 137 ms,
444 ms, 139 ms; B = 256, V = 151936, H = 1024: 1231 ms, 2759 ms, 1245 ms.

Gumbel-max: with G_v iid Gumbel(0, 1) (G = -log(-log U), U ~ U(0, 1)), argmax_v (z_v + G_v)
is distributed as softmax(z) exactly. A max is taken tile by tile and then across tiles, so
no tile is kept. Two paths, both exact in distribution, with different random streams:

Triton (CUDA tensors; CPU tensors under SCORE_FAST_BACKEND=triton and TRITON_INTERPRET=1,
  how the tests run it): _linear_sample_kernel, grid (row blocks of BLOCK_B, vocabulary
  splits). A program runs its split's tiles: the logit tile [BLOCK_B, BLOCK_V] as a tl.dot
  K-loop over H (fp32 accumulation), + bias, / T, + G with U = tl.rand(seed, row * V + v)
  (Philox 4x32-10 in counter mode: an entry's noise depends only on the seed and its
  (row, v), not on tiles, splits or the GPU), a running max and argmax per row; it writes
  its split's best (key, index); torch takes the argmax over the splits. The seed is one
  int64 drawn on the device from `generator` (torch's default generator of that device when
  None) with torch.randint, no host sync: a torch.Generator makes the GPU path reproducible.
  The weight is read once per row block (BLOCK_B up to 64 rows: 4 reads at B = 256).
PyTorch (CPU tensors): per vocabulary tile of _TILE_COLS columns z_c = (h @ W_c.T + b) / T
  in fp32, then Gumbel-max at the tile level: a tile's best z_v + G_v is itself Gumbel with
  location lse_c = log sum_{v in c} e^(z_v), and its argmax is distributed as softmax(z_c),
  independent of that max. So each tile draws one key lse_c + G_c and one index from
  softmax(z_c) by inverse CDF (exp and cumsum in place over the tile, torch's CPU cumsum
  accumulating in fp64 as torch.multinomial does, and a binary search), and the tile with the
  best key gives the token: P(v) = (S_c / S) (e^(z_v) / S_c). Two fp64 uniforms per row and
  tile (torch.rand with `generator`, torch's global RNG when None) instead of one a logit:
  V uniforms and two logs a row cost as much as the matmul itself on a CPU (measured
  B = 256, V = 32000: element-wise Gumbel 181 ms, this 130 ms, the matmul alone 133 ms).
  For given inputs the RNG consumption (B x tiles x 2 draws) is deterministic.

Greedy (temperature 0): the argmax of the logits (the first one on ties), no randomness.
Masked entries (a -inf bias or logit) are never sampled; logits of +-1e4 are fine (every
tile's exponentials are taken relative to its own max). A row with no finite logit has no
distribution: an error when SCORE_FAST_CHECK_INPUTS is on (one sync on a GPU).

    from score_fast.kernels.linear_sample import linear_sample
    tok = linear_sample(hidden, lm_head.weight, temperature=0.8, generator=g)   # [B] int64
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import FLOATS
from ._dispatch import checks_enabled, interpreting, use_triton
from ._lmhead import check_head, flatten_head

__all__ = ["linear_sample", "linear_sample_ref"]

# CPU vocabulary tile (tests shrink it to exercise many tiles); measured 130 ms at B = 256,
# V = 32000, H = 512 against 133 ms with 16384
_TILE_COLS = 4096
_GPU_PROGRAMS = 1024  # GPU: enough (row block, split) programs to fill 132 SMs several times
# compile gate (triton 3.9, 8 warps): sm_100a at BLOCK_B = 32 spills 4 B stored + 4 B loaded
# (16-bit) and 16 + 12 B (fp32) at its 128-register cap, a few words a thread once per
# launch; sm_80 and sm_90a do not spill
_GATE_SPILLS = {("_linear_sample_kernel", "sm_100a"): 28}


@triton.jit
def _linear_sample_kernel(
    # pointers: hidden [B, H], weight [V, H], bias [V], seed [1] int64; out: the best key
    # [B, S] fp32 and its index [B, S] int64 of each (row, split)
    h_ptr, w_ptr, b_ptr, seed_ptr, key_ptr, idx_ptr,
    # sizes: rows, vocabulary, hidden, splits (S), tiles a split
    B, V, H, S, tiles_per_split,
    # row strides of hidden and weight
    stride_h, stride_w,
    # scalars
    inv_t,
    # meta-parameters
    HAS_BIAS: tl.constexpr, GREEDY: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, fp32 operands are exact
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no TF32 logits), else "tf32"
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Best z_v + G_v (z_v alone when GREEDY) and its v over this split's vocabulary tiles."""
    pid_s = tl.program_id(1)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK_B,), tl.int64)
    seed = tl.load(seed_ptr)
    for t in range(tiles_per_split):
        v0 = (pid_s * tiles_per_split + t).to(tl.int64) * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        acc = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            a = tl.load(h_ptr + offs_b[:, None] * stride_h + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                        mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        if GREEDY:
            key = acc
        else:
            u = tl.rand(seed, offs_b[:, None] * V + offs_v[None, :])
            key = acc * inv_t - tl.log(-tl.log(u))  # u = 0: a key of -inf, never chosen
        key = tl.where(v_ok[None, :], key, float("-inf"))
        t_max = tl.max(key, axis=1)
        t_arg = tl.argmax(key, axis=1, tie_break_left=True)
        take = t_max > best  # strict: the first tile wins ties, as argmax does
        best = tl.where(take, t_max, best)
        best_i = tl.where(take, v0 + t_arg.to(tl.int64), best_i)
    tl.store(key_ptr + offs_b * S + pid_s, best, mask=row_ok)
    tl.store(idx_ptr + offs_b * S + pid_s, best_i, mask=row_ok)


def _sample_config(B: int, V: int, H: int) -> dict:
    """Tiles of 4096 logits (BLOCK_B x BLOCK_V: 16 x 256, 32 x 128, 64 x 64), 16 fp32
    accumulators a thread at 8 warps; BLOCK_K 64 (16-bit) / 32 (fp32): 16 KB of operands a
    K step. At 4 warps the compile gate (triton 3.9) measured 168-255 registers a thread,
    spilling 4-52 B (fp32 everywhere, 16-bit at BLOCK_B = 64 on sm_80): the Philox noise
    and the fp32 FMA dot hold several tile-sized temporaries. Interpreter: few large numpy
    tiles (the GPU's make an interpreted test 4.5x slower: 53 s against 12 s at V = 50257);
    the vocabulary splits are the GPU's, so the tests cover the argmax across splits."""
    block_b = min(64, max(16, triton.next_power_of_2(B)))
    if interpreting():
        return dict(BLOCK_B=block_b, BLOCK_V=min(1024, max(16, triton.next_power_of_2(V))),
                    BLOCK_K=min(256, max(16, triton.next_power_of_2(H))))
    return dict(BLOCK_B=block_b, BLOCK_V=4096 // block_b, BLOCK_K=64, num_warps=8)


def _gate_cases():
    """The launches _sample_triton makes on a GPU, on meta tensors (no data), for the compile
    gate (bench/compile_gate.py): each dtype at each BLOCK_B (B = 8, 32, 256) sampling at a
    Qwen2-7B-sized LM head (H = 3584, V = 152064), and each dtype with a bias, greedy, and at
    an odd vocabulary (V = 50257)."""
    H = 3584
    meta = dict(device="meta")
    cases = [(dtype, 152064, False, False, B) for dtype in FLOATS for B in (8, 32, 256)]
    cases += [(dtype, V, bias, greedy, 32) for dtype in FLOATS
              for V, bias, greedy in ((152064, True, False), (152064, False, True),
                                      (50257, False, False))]
    for dtype, V, bias, greedy, B in cases:
        h = torch.empty(B, H, dtype=dtype, **meta)
        w = torch.empty(V, H, dtype=dtype, **meta)
        b = torch.empty(V, dtype=dtype, **meta) if bias else None
        seed = torch.empty(1, dtype=torch.int64, **meta)
        yield functools.partial(_sample_triton, h, w, b, 1.25, greedy, seed)


def _sample_triton(h, w, b, inv_t, greedy, seed):
    """Launch over (row blocks, splits), then the argmax over the splits' keys."""
    B, H = h.shape
    V = w.shape[0]
    cfg = _sample_config(B, V, H)
    if w.dtype == torch.float32:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    row_blocks = triton.cdiv(B, cfg["BLOCK_B"])
    splits = min(n_tiles, triton.cdiv(_GPU_PROGRAMS, row_blocks))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    key = torch.empty(B, splits, device=h.device, dtype=torch.float32)
    idx = torch.empty(B, splits, device=h.device, dtype=torch.int64)
    _linear_sample_kernel[(row_blocks, splits)](
        h, w, h if b is None else b, seed, key, idx,
        B, V, H, splits, per, h.stride(0), w.stride(0), inv_t,
        HAS_BIAS=b is not None, GREEDY=greedy,
        UPCAST=interpreting() and w.dtype != torch.float32,
        DOT_PRECISION="ieee" if w.dtype == torch.float32 else "tf32", **cfg)
    best, c = key.max(1)
    return best, idx.gather(1, c[:, None]).squeeze(1)


def _sample_torch(h, w, b, inv_t, greedy, generator):
    """Per vocabulary tile: fp32 logits, then (greedy) its max and argmax, or (sampling) the
    tile's key lse_c + G_c and an index drawn from softmax(z_c) by inverse CDF (module doc).
    Returns the best key a row (-inf: no finite logit) and the token."""
    B = h.shape[0]
    V = w.shape[0]
    f32 = h.dtype == torch.float32
    hf = h if f32 else h.float()
    tiles = [(v0, min(v0 + _TILE_COLS, V)) for v0 in range(0, V, _TILE_COLS)]
    keys = torch.empty(B, len(tiles), dtype=torch.float64)
    toks = torch.empty(B, len(tiles), dtype=torch.int64)
    if not greedy:  # all draws up front: (key, index) uniforms for each row and tile
        u = torch.rand(B, len(tiles), 2, dtype=torch.float64, generator=generator)
        g = u[..., 0].log_().neg_().log_().neg_()  # Gumbel(0, 1); u = 0 gives -inf
    for c, (v0, v1) in enumerate(tiles):
        wc = w[v0:v1] if f32 else w[v0:v1].float()
        z = hf @ wc.T
        if b is not None:
            z += b[v0:v1]
        if greedy:
            m, a = z.max(-1)
            keys[:, c], toks[:, c] = m, a + v0
            continue
        if inv_t != 1.0:
            z *= inv_t
        m = z.amax(-1, keepdim=True)
        m = m.masked_fill_(m == float("-inf"), 0.0)  # an all -inf tile: e = 0, key -inf
        cdf = z.sub_(m).exp_().cumsum_(-1)  # fp32 values, fp64 accumulation (torch CPU)
        s = cdf[:, -1:].contiguous()
        t = (u[:, c, 1:] * s.double()).float()
        # first entry whose cdf exceeds t; t rounded up to s falls back to the first entry
        # reaching s (both have a positive mass: cdf rises there)
        a = torch.minimum(torch.searchsorted(cdf, t, right=True),
                          torch.searchsorted(cdf, s, right=False))
        # in fp64: m of 1e4 plus log S keeps its fp32 ulp (1e-3) out of the tile's weight
        keys[:, c] = (m.double() + s.double().log()).squeeze(1) + g[:, c]
        toks[:, c] = a.squeeze(1) + v0
    best, c = keys.max(-1)
    return best, toks.gather(1, c[:, None]).squeeze(1)


def _check_sample_args(hidden, weight, bias, temperature):
    """Shape, dtype and device checks (free); returns 1 / T (0 for greedy)."""
    check_head(hidden, weight, bias)
    t = float(temperature)
    if not t >= 0 or t == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    return 0.0 if t == 0 else 1.0 / t


@torch.no_grad()
def linear_sample(hidden: torch.Tensor, weight: torch.Tensor, *,
                  bias: torch.Tensor | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of hidden [..., H] from softmax((hidden @ weight.T + bias) / T), as
    int64 of shape hidden.shape[:-1]; temperature 0 gives the argmax. weight: [V, H] in
    hidden's dtype (float32/bfloat16/float16), bias: [V] or None. Randomness: `generator`
    (torch's default one of the tensors' device when None); the CPU path draws 2 fp64
    uniforms a row and vocabulary tile from it, the Triton path one int64 seed for its
    Philox stream (module doc). Not differentiable (a sample has no gradient)."""
    inv_t = _check_sample_args(hidden, weight, bias, temperature)
    greedy = inv_t == 0.0
    h, w, b, _ = flatten_head(hidden, weight, bias=bias)
    if h.shape[0] == 0:
        return torch.empty(hidden.shape[:-1], dtype=torch.int64, device=hidden.device)
    if use_triton(*[a for a in (hidden, weight, bias) if a is not None]):
        seed = (torch.zeros(1, dtype=torch.int64, device=h.device) if greedy else
                torch.randint(2**62, (1,), dtype=torch.int64, device=h.device,
                              generator=generator))
        best, tok = _sample_triton(h, w, b, inv_t, greedy, seed)
    else:
        best, tok = _sample_torch(h, w, b, inv_t, greedy, generator)
    if checks_enabled():
        dead = best.isneginf() | best.isnan()
        if bool(dead.any()):  # one sync on a GPU
            rows = dead.view(-1).nonzero().view(-1)[:8].tolist()
            raise ValueError(f"rows {rows} (of {h.shape[0]}, hidden shape "
                             f"{tuple(hidden.shape)}) have no finite logit to sample from")
    return tok.view(hidden.shape[:-1])


def linear_sample_ref(hidden, weight, bias=None, temperature=1.0, generator=None):
    """The specification, and the path this op replaces: the [B, V] logits in full, then
    softmax(x / T) and torch.multinomial (argmax at temperature 0)."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    if temperature == 0:
        return x.argmax(-1)
    probs = torch.softmax(x.float() / temperature, -1)
    return torch.multinomial(probs.reshape(-1, x.shape[-1]), 1,
                             generator=generator).view(x.shape[:-1])
