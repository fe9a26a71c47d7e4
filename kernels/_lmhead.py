"""The LM-head machinery linear_logprobs and linear_score_loss share: the log-sum-exp and the
gradient products of x = hidden @ weight.T + bias over vocabulary chunks, never holding the
[N, V] logits; and the checks on hidden [..., H], weight [V, H], bias [V] (and targets) that
linear_sample takes too.

With z = x / T for row n, target t = t[n] and upstream g[n]:

    logp[n] = z[n, t] - M[n] - log S[n],   M[n] = max_v z[n, v],  S[n] = sum_v exp(z[n, v] - M[n])
    H[n]    = log S[n] - U[n] / S[n],      U[n] = sum_v exp(z[n, v] - M[n]) (z[n, v] - M[n])
    D[n, v] = g[n] (onehot(t)_v - p[n, v]) / T,   p = exp(z - M - log S)
    dhidden = D @ weight  [N, H],   dweight = D.T @ hidden  [V, H],   dbias = D.sum(0)  [V]

(H is the softmax's entropy, relative to M: log S + M - E[z] cancels catastrophically at
|z| = 1e4.) At N = 8192 tokens and V = 151936 the fp32 logits are 5 GB (2.5 GB in bf16) for
8192 numbers. Here the logits exist one tile at a time, and (M, log S) -- 8 bytes a row --
are all that is kept between the passes. Two paths, each op picking one per call
(_dispatch.use_triton):

Chunked (CUDA tensors; CPU tensors under SCORE_FAST_BACKEND=triton and TRITON_INTERPRET=1, how
the tests run the kernels): over the live rows (gathered when they are not all N) and
vocabulary chunks of Vc columns (chunk_cols: an [n, Vc] fp32 tile of <= 256 MB, Vc in
[1024, 16384], a multiple of 128; 8192 at n = 8192 rows, 19 chunks at V = 151936; memory
independent of V):
  chunked_logsumexp  per chunk z_c = h @ W_c.T as fp32 (cuBLAS: bf16/fp16 operands, fp32
           accumulation AND fp32 output -- no bf16 rounding of the logits, so the result is
           more precise than eager's bf16 logits; a bf16 output would halve the tile traffic
           (est. ~3 ms of ~65 ms at 8192 x 4096 x 151936) but put the path at eager's
           accuracy exactly, where the 2x rule becomes a coin toss on averaged metrics),
           then _chunk_lse_kernel folds (z_c + b) / T into the per-row online (M, S, U) and
           picks the target logit.
  chunked_grads  per chunk: recompute z_c (cuBLAS); _chunk_dlogits_kernel writes D_c in the
           weight dtype; dhidden += D_c @ W_c (cuBLAS into an fp32 accumulator, beta = 1),
           dweight[v0:v1] = D_c.T @ h (one GEMM over all rows, written straight into the
           slice: in the weight dtype for linear_logprobs -- eager's single rounding --, fp32
           for linear_score_loss, which scales it by the upstream later),
           dbias[v0:v1] = D_c.sum(0).
  Matmul passes of 2NHV flops: 1 forward + 3 backward (eager: 3). At cuBLAS ~90% of peak
  that is ~65-70% of the matmul rate counted at 6NHV useful flops. Not bitwise
  batch-invariant (cuBLAS picks kernels by shape; Vc depends on n).

An all-Triton path (logit tiles as tl.dot K-loops, the backward's fp32 dhidden/dweight
accumulators read-modified-written in global memory every tile) was removed: the compile
gate (bench/compile_gate.py, triton 3.9) compiled its three kernels at 106-255 registers a
thread, spilling on sm_100a in bf16/fp16 (up to 480 B) and on every target in fp32 (0.4 KB
for dhidden, 6.4-9.3 KB for dweight); its backward was estimated at 10-15% of the matmul
rate (~32 flop/byte against the ~250 an H100 needs); it took 5 matmul passes to this path's
4; and no user path chose it: CUDA tensors always took this one.

cpu_sweep (CPU tensors): the same tiling with matmuls: row chunks of a fixed _ROWS = 256 rows
  (the last one padded with zero rows: a CPU GEMM's result for a row changes with the row
  count below ~150 rows, a fixed shape makes each row's result independent of the batch)
  times vocabulary chunks of at most _TILE_ELEMS / _ROWS columns (32 MB of fp32 logits a
  tile) with an online log-sum-exp across chunks. Where the whole vocabulary is one chunk
  (V <= 32768), a sweep that needs both the log-sum-exp and the gradient keeps the tile
  instead of recomputing it (3 matmul passes, as eager autograd does). bf16/fp16 are upcast
  to fp32 a tile at a time (fp32 accumulation, as on the GPU).

Edge cases as in token_logprobs: a -inf logit (from a -inf bias) is a masked vocabulary
entry; a row whose logits are all -inf gives -inf, entropy 0 and a zero gradient; logp <= 0.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._common import FLOATS, check_targets, store_dtype
from ._dispatch import checks_enabled, interpreting

_ROWS = 256           # CPU row chunk: fixed, so a row's result never depends on the batch
_TILE_ELEMS = 2**23   # CPU logit tile: 256 rows x 32768 columns x 4 bytes = 32 MB


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _logits_tile(z_ptr, b_ptr, offs_n, offs_c, ok, c_ok, v0, stride_z, HAS_BIAS: tl.constexpr):
    """The fp32 tile x + b of rows offs_n, columns offs_c of z (vocabulary ids v0 + offs_c);
    -inf outside `ok`."""
    z = tl.load(z_ptr + offs_n[:, None] * stride_z + offs_c[None, :], mask=ok,
                other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + v0 + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _dlogits(z, ids, tgt, m, log_s, g, inv_t):
    """D = g (onehot(t) - exp(z / T - M - log S)) of a tile z (ids: its vocabulary ids)."""
    p = tl.exp(z * inv_t - m[:, None] - log_s[:, None])
    return g[:, None] * (tl.where(ids[None, :] == tgt[:, None], 1.0, 0.0) - p)


@triton.jit
def _chunk_lse_kernel(
    # pointers: z [n, n_cols] (the chunk's logits before bias and 1/T, fp32), bias [V],
    # targets [n] (int64), the fp32 [n] running max / sum / target logit / entropy sum,
    # updated in place
    z_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, zt_ptr, u_ptr,
    # sizes, chunk offset and the row stride of z
    n, n_cols, v0, stride_z,
    # scalars
    inv_t,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Online log-sum-exp over one vocabulary chunk: fold the chunk's (x + b) / T into the
    per-row (M, S, U) and pick the target logit when it lies in the chunk (fp32 math)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.load(m_ptr + offs_n, mask=row_ok, other=0.0)
    s = tl.load(s_ptr + offs_n, mask=row_ok, other=0.0)
    z_t = tl.load(zt_ptr + offs_n, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + offs_n, mask=row_ok, other=0.0)
    for c0 in range(0, n_cols, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
        c_ok = offs_c < n_cols
        ok = row_ok[:, None] & c_ok[None, :]
        z = _logits_tile(z_ptr, b_ptr, offs_n, offs_c, ok, c_ok, v0, stride_z, HAS_BIAS)
        z = tl.where(ok, z * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # while a row has seen only -inf, shift by 0: exp(-inf - -inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        # U's old terms move from M to M_new: e^(z-M)(z-M) -> alpha e^(z-M)((z-M) + M-M_new)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
        # a -inf logit's term: e = 0 times a (z - M) of 0, never 0 * -inf
        u = alpha * (u + s * shift) + tl.sum(e * tl.where(e > 0, z - m_safe[:, None], 0.0),
                                             axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        hit = (v0 + offs_c)[None, :] == tgt[:, None]
        z_t = tl.maximum(z_t, tl.max(tl.where(hit, z, float("-inf")), axis=1))
    tl.store(m_ptr + offs_n, m, mask=row_ok)
    tl.store(s_ptr + offs_n, s, mask=row_ok)
    tl.store(zt_ptr + offs_n, z_t, mask=row_ok)
    tl.store(u_ptr + offs_n, u, mask=row_ok)


@triton.jit
def _chunk_dlogits_kernel(
    # pointers: z [n, n_cols] as above, bias, targets [n], fp32 [n] M, log S and g (g
    # holding 1/T and 0 on dead rows), d [n, n_cols] out
    z_ptr, b_ptr, tgt_ptr, m_ptr, ls_ptr, g_ptr, d_ptr,
    # sizes, chunk offset, row strides of z and d
    n, n_cols, v0, stride_z, stride_d,
    # scalars
    inv_t,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """D = g (onehot(t) - exp((x + b) / T - M - log S)) for one tile of the chunk."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < n
    c_ok = offs_c < n_cols
    ok = row_ok[:, None] & c_ok[None, :]
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.load(m_ptr + offs_n, mask=row_ok, other=0.0)
    log_s = tl.load(ls_ptr + offs_n, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0)
    z = _logits_tile(z_ptr, b_ptr, offs_n, offs_c, ok, c_ok, v0, stride_z, HAS_BIAS)
    d = _dlogits(z, v0 + offs_c, tgt, m, log_s, g, inv_t)
    tl.store(d_ptr + offs_n[:, None] * stride_d + offs_c[None, :],
             d.to(d_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_dlogits_kernel(
    # pointers: z [n, n_cols] the rows' full-vocabulary logits (fp32), bias, targets [n],
    # fp32 [n] M, log S and g (holding 1/T, 0 on dead rows); d [n, n_cols] out, which may
    # be z's own storage seen as 16-bit (row stride 2 n_cols): written in place
    z_ptr, b_ptr, tgt_ptr, m_ptr, ls_ptr, g_ptr, d_ptr,
    n, n_cols, stride_z, stride_d,
    inv_t,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """D = g (onehot(t) - p) over whole rows, column blocks in order: a program owns its
    rows, and block j's store lands on bytes of z that blocks <= j held (16-bit D at column
    c is z's byte 2c), all loaded already. So D overwrites the logits it is made from."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.load(m_ptr + offs_n, mask=row_ok, other=0.0)
    log_s = tl.load(ls_ptr + offs_n, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0)
    for c0 in range(0, n_cols, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
        c_ok = offs_c < n_cols
        ok = row_ok[:, None] & c_ok[None, :]
        z = _logits_tile(z_ptr, b_ptr, offs_n, offs_c, ok, c_ok, 0, stride_z, HAS_BIAS)
        d = _dlogits(z, offs_c, tgt, m, log_s, g, inv_t)
        tl.debug_barrier()  # every thread's loads of this block before any store into it
        tl.store(d_ptr + offs_n[:, None] * stride_d + offs_c[None, :],
                 d.to(d_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------ launch config
def chunk_cols(n: int) -> int:
    """Vocabulary columns a chunk: an [n, Vc] fp32 tile of <= 2**28 bytes (256 MB; the bf16
    logits and dlogits of a chunk are half that each), clamped to [1024, 16384] and rounded
    down to a multiple of 128 (GEMM-friendly widths). n = 8192 rows -> Vc = 8192, 19 chunks
    at V = 151936. Memory is independent of V; past n = 65536 rows the 1024 floor lets the
    tile grow with n (as hidden itself does)."""
    return max(1024, min(16384, 2**28 // (4 * max(n, 1)))) // 128 * 128


def _ew_config(n_cols: int) -> dict:
    """Elementwise tiles [BLOCK_N, BLOCK_V]. GPU: 4 x 512 fp32 logits (8 KB) a step, 16 a
    thread at 4 warps: 32-71 registers in both kernels on sm_80/90a/100a, no spills, under
    triton 3.6 and 3.9 (compile gate); 4 x 1024 at 8 warps spilled 8-12 B on sm_90a
    (_chunk_lse_kernel with a bias and a chunk width not divisible by 16), 8 x 512 at 8
    warps as well under 3.6. Interpreter: 16 x up to 4096, few large numpy tiles (the GPU's
    tiles make the interpreted tests of both linear ops 6x slower: 84 s against 14 s)."""
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_V=min(4096, triton.next_power_of_2(n_cols)))
    return dict(BLOCK_N=4, BLOCK_V=512, num_warps=4)


def _gate_cases():
    """Every launch the chunked launchers make on a GPU (each dtype, with and without
    bias), at a Qwen2-7B-sized LM head (N = 8192 tokens, H = 3584, V = 152064) and an odd
    vocabulary, on meta tensors (no data), for the compile gate (bench/compile_gate.py)."""
    N, H = 8192, 3584
    for dtype, V, bias in itertools.product(FLOATS, (152064, 50257), (False, True)):
        meta = dict(device="meta")
        h = torch.empty(N, H, dtype=dtype, **meta)
        w = torch.empty(V, H, dtype=dtype, **meta)
        b = torch.empty(V, dtype=dtype, **meta) if bias else None
        t = rows = torch.empty(N, dtype=torch.int64, **meta)
        f = torch.empty(N, **meta)
        yield functools.partial(chunked_logsumexp, h, w, b, t, rows, 1.0)
        yield functools.partial(chunked_grads, h, w, b, t, rows, f, f, f, 1.0, dw_dtype=dtype)
        yield functools.partial(row_sweep, h, w, b, t, rows, 1.0,
                                grad_of=lambda idx, lp: torch.empty(idx.numel(), **meta))


# ---------------------------------------------------------------- chunked (cuBLAS) path
_OUT_DTYPE_MM = {}  # (op, device type) -> False where torch's out_dtype GEMM failed


def _mm_f32(a, b, acc=None):
    """a @ b with fp32 accumulation and an fp32 result, no rounding to a's dtype; added
    into acc (fp32) when given. 16-bit a, b on CUDA: cuBLAS with an fp32 C (torch's
    out_dtype GEMMs; with acc, beta = 1 in place); where this torch lacks them, the product
    in a's dtype, upcast (one extra rounding: eager's). CPU (the tests): an fp32 GEMM of the
    upcast operands (products of 16-bit numbers are exact in fp32). fp32 a, b follow
    torch's matmul precision (TF32 only where the caller allowed it)."""
    if a.dtype == torch.float32:
        return a @ b if acc is None else acc.addmm_(a, b)
    if a.is_cuda:
        key = ("mm" if acc is None else "addmm", a.device.type)
        if _OUT_DTYPE_MM.get(key, True):
            try:
                if acc is None:
                    return torch.mm(a, b, out_dtype=torch.float32)
                return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            except (RuntimeError, TypeError):  # older torch: addmm's C must be a's dtype
                _OUT_DTYPE_MM[key] = False
        out = _mm_f32(a, b) if acc is not None else (a @ b).float()
        return out if acc is None else acc.add_(out)
    if acc is None:
        return a.float() @ b.float()
    return acc.addmm_(a.float(), b.float())


def _entropy(log_s, u, s):
    """The softmax's entropy from the online sums: log S - U / S (0 for an all -inf row)."""
    return (log_s - u / s).nan_to_num_(0.0).clamp_(min=0)


def chunked_logsumexp(h, w, b, t, rows, inv_t):
    """logp, M, log S and the entropy (fp32 [N], zero off `rows`) for the rows `rows`
    (int64, all live), vocabulary chunk by chunk: fp32 z_c = h[rows] @ w[v0:v1].T (cuBLAS),
    then _chunk_lse_kernel. No host sync."""
    N = h.shape[0]
    V = w.shape[0]
    n = rows.numel()
    f32 = dict(device=h.device, dtype=torch.float32)
    logp_all, m_all, ls_all, ent_all = (torch.zeros(N, **f32) for _ in range(4))
    if n == 0:
        return logp_all, m_all, ls_all, ent_all
    hs = h if n == N else h.index_select(0, rows)
    ts = t if n == N else t.index_select(0, rows)
    m = torch.full((n,), float("-inf"), **f32)
    s = torch.zeros(n, **f32)
    u = torch.zeros(n, **f32)
    z_t = torch.full((n,), float("-inf"), **f32)
    vc = chunk_cols(n)
    cfg = _ew_config(min(vc, V))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    for v0 in range(0, V, vc):
        v1 = min(v0 + vc, V)
        z = _mm_f32(hs, w[v0:v1].T)
        _chunk_lse_kernel[grid](z, b if b is not None else z, ts, m, s, z_t, u, n, v1 - v0,
                                v0, z.stride(0), inv_t, HAS_BIAS=b is not None, **cfg)
        del z
    log_s = s.log()  # -inf for an all -inf row
    m = m.masked_fill_(m == float("-inf"), 0)
    # (z_t - M) - log S, not z_t - lse: at |z| = 1e4 an fp32 lse has an ulp of 1e-3
    lp = ((z_t - m) - log_s).clamp_(max=0).masked_fill_(z_t == float("-inf"), float("-inf"))
    ent = _entropy(log_s, u, s)
    if n == N:
        return lp, m, log_s, ent
    return (logp_all.index_copy_(0, rows, lp), m_all.index_copy_(0, rows, m),
            ls_all.index_copy_(0, rows, log_s), ent_all.index_copy_(0, rows, ent))


def chunked_grads(h, w, b, t, rows, m, log_s, g, inv_t, need_dh=True, need_dw=True,
                  dw_dtype=torch.float32):
    """dhidden (fp32 [N, H]), dweight ([V, H] in dw_dtype), dbias (fp32 [V]) for the rows
    `rows` from the saved M, log S and upstream g (fp32 [N]), chunk by chunk: recompute z_c
    (cuBLAS), D_c in the weight dtype (_chunk_dlogits_kernel), dh += D_c @ w_c into an fp32
    accumulator, dw[v0:v1] = D_c.T @ h[rows] (one GEMM over all rows: written, not
    accumulated), db[v0:v1] = D_c.sum(0). None for what is not needed."""
    N, H = h.shape
    V = w.shape[0]
    n = rows.numel()
    f32 = dict(device=h.device, dtype=torch.float32)
    dh = torch.zeros(N, H, **f32) if need_dh else None
    if need_dw:
        dw = (torch.zeros if dw_dtype == torch.float32 else torch.empty)(
            V, H, device=h.device, dtype=dw_dtype)
        db = torch.zeros(V, **f32) if b is not None else None
    else:
        dw = db = None
    if n == 0 or not (need_dh or need_dw):
        if dw is not None and dw_dtype != torch.float32:
            dw.zero_()
        return dh, dw, db
    sel = (lambda a: a) if n == N else (lambda a: a.index_select(0, rows))  # noqa: E731
    hs, ts, ms, ls = sel(h), sel(t), sel(m), sel(log_s)
    # dead rows (all -inf): g = 0 and finite M, log S, so their D is exactly 0
    dead = ls == float("-inf")
    gs = sel(g).mul(inv_t).masked_fill_(dead, 0)
    ls = ls.masked_fill(dead, 0)
    dhs = dh if n == N or dh is None else torch.zeros(n, H, **f32)
    vc = chunk_cols(n)
    cfg = _ew_config(min(vc, V))
    for v0 in range(0, V, vc):
        v1 = min(v0 + vc, V)
        wc = w[v0:v1]
        z = _mm_f32(hs, wc.T)
        d = torch.empty(n, v1 - v0, device=h.device, dtype=store_dtype(w.dtype))
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v1 - v0, cfg["BLOCK_V"]))
        _chunk_dlogits_kernel[grid](z, b if b is not None else z, ts, ms, ls, gs, d, n,
                                    v1 - v0, v0, z.stride(0), d.stride(0), inv_t,
                                    HAS_BIAS=b is not None, **cfg)
        del z
        d = d.to(w.dtype)
        if need_dh:
            _mm_f32(d, wc, dhs)
        if need_dw:
            if dw_dtype == torch.float32:
                _mm_f32(d.T, hs, dw[v0:v1])  # dw is zero: a plain write
            else:
                torch.mm(d.T, hs, out=dw[v0:v1])  # one rounding, as eager autograd
            if db is not None:
                db[v0:v1] = d.sum(0, dtype=torch.float32)
        del d
    if dhs is not dh:
        dh.index_copy_(0, rows, dhs)
    return dh, dw, db


# The CUDA path of linear_score_loss: row chunks, each through the whole vocabulary at once.
# 3 GEMMs a chunk (z = h_R W^T, dH_R = D W, dW += D^T h_R) against the vocabulary sweep's 4
# (z twice); D overwrites z in place. R rows: the dW update reads and writes the fp32
# [V, H] once a chunk (8VH bytes) for 2RVH FLOPs, ~R/4 FLOP a byte (the D and h reads
# add ~2R V bytes): compute-bound above H100's 989 TFLOP/s / 3.35 TB/s = 295 FLOP/B at
# R >= ~1200 (H200: 206 at 4.8 TB/s, R >= ~850); 2048 leaves room. Memory: the fp32 tile
# [R, V] (1.2 GB at V = 151936), the fp32 dW [V, H] and dh [N, H]: ~3.9 GB at N = 8192,
# H = 4096, under a third of eager's 14.2 GB there (bench_lmhead_h200.md).
_GPU_ROWS = 2048


def row_chunk(n: int) -> int:
    """Rows a chunk of row_sweep (module comment above)."""
    return min(n, _GPU_ROWS)


def row_sweep(h, w, b, t, rows, inv_t, grad_of=None, need_dh=True, need_dw=True,
              entropy=True):
    """linear_score_loss's CUDA sweep over chunks of `rows` (int64 indices into h), the
    whole vocabulary each: z = h_R W^T (fp32, cuBLAS), _chunk_lse_kernel once over it, then
    grad_of(idx, logp) -> fp32 g (None: no gradient) and D = g (onehot - p) / T written over
    z (_row_dlogits_kernel), dh_R = D W and dw += D^T h_R (fp32 results). Returns logp, M,
    log S, the entropy (fp32 [N], zero off rows; `entropy` is cpu_sweep's switch, the
    kernel sums it anyway) and fp32 dh, dw, db (None unless asked). No host sync.""" 
    N, H = h.shape
    V = w.shape[0]
    f32 = dict(device=h.device, dtype=torch.float32)
    logp_all, m_all, ls_all, ent_all = (torch.zeros(N, **f32) for _ in range(4))
    want = grad_of is not None
    dh = torch.zeros(N, H, **f32) if want and need_dh else None
    dw = torch.zeros(V, H, **f32) if want and need_dw else None
    db = torch.zeros(V, **f32) if want and need_dw and b is not None else None
    cfg = _ew_config(V)
    R = row_chunk(max(rows.numel(), 1))
    d_dtype = store_dtype(w.dtype)
    for r0 in range(0, rows.numel(), R):
        idx = rows[r0:r0 + R]
        n = idx.numel()
        hs, ts = h.index_select(0, idx), t.index_select(0, idx)
        z = _mm_f32(hs, w.T)  # GEMM 1
        m = torch.full((n,), float("-inf"), **f32)
        s, u = torch.zeros(n, **f32), torch.zeros(n, **f32)
        z_t = torch.full((n,), float("-inf"), **f32)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
        bias = b if b is not None else z
        _chunk_lse_kernel[grid](z, bias, ts, m, s, z_t, u, n, V, 0, z.stride(0), inv_t,
                                HAS_BIAS=b is not None, **cfg)
        log_s = s.log()
        m = m.masked_fill_(m == float("-inf"), 0)
        lp = ((z_t - m) - log_s).clamp_(max=0).masked_fill_(z_t == float("-inf"),
                                                            float("-inf"))
        logp_all.index_copy_(0, idx, lp)
        m_all.index_copy_(0, idx, m)
        ls_all.index_copy_(0, idx, log_s)
        ent_all.index_copy_(0, idx, _entropy(log_s, u, s))
        g = grad_of(idx, lp) if want else None
        if g is None:
            continue
        dead = log_s == float("-inf")
        gs = (g * inv_t).masked_fill_(dead, 0)
        d = z.view(d_dtype)[:, :V]  # D over z: same rows, half the bytes in 16 bits
        _row_dlogits_kernel[grid](z, bias, ts, m, log_s.masked_fill(dead, 0), gs, d, n, V,
                                  z.stride(0), d.stride(0), inv_t, HAS_BIAS=b is not None,
                                  **cfg)
        if d.dtype != w.dtype:  # the interpreter's bf16: stored fp32, rounded by torch
            d = d.to(w.dtype)
        if need_dh:
            dh.index_copy_(0, idx, _mm_f32(d, w))  # GEMM 2
        if need_dw:
            _mm_f32(d.T, hs, dw)  # GEMM 3: dw += D^T h_R, fp32 C (beta = 1)
            if db is not None:
                db += d.sum(0, dtype=torch.float32)
        del z, d
    return logp_all, m_all, ls_all, ent_all, dh, dw, db


# ---------------------------------------------------------------------- PyTorch (CPU) path
def _vocab_chunks(V: int) -> list[tuple[int, int]]:
    """Equal-ish vocabulary chunks of at most _TILE_ELEMS // _ROWS columns (fixed by V)."""
    n = -(-V // (_TILE_ELEMS // _ROWS))
    step = -(-V // n)
    return [(v, min(v + step, V)) for v in range(0, V, step)]


def _tile(hc, w, b, v0, v1, inv_t):
    """fp32 z = (hc @ w[v0:v1].T + b) / T for a padded fp32 row chunk hc."""
    wc = w[v0:v1]
    z = hc @ (wc.T if wc.dtype == torch.float32 else wc.float().T)
    if b is not None:
        z += b[v0:v1].float()
    return z.mul_(inv_t)


def cpu_sweep(h, w, b, t, rows, inv_t, state=None, grad_of=None, need_dh=True,
              need_dw=True, entropy=False):
    """One sweep over fixed-size row chunks of `rows` (int64 indices into h).

    state None: compute (logp, M, log S) with an online log-sum-exp over vocabulary chunks;
    else reuse the saved (M, log S). grad_of(rows, logp) -> fp32 g (or None) asks for
    D = g (onehot - p) / T in the same sweep, reusing the tile when the vocabulary is one
    chunk (logp: the chunk's, None when state is given). Returns logp, M, log S, the
    entropy ([N] fp32, zero off `rows`; the entropy only with `entropy` and state None,
    else zeros) and fp32 dh, dw, db (None unless a gradient was asked for)."""
    N, H = h.shape
    V = w.shape[0]
    chunks = _vocab_chunks(V)
    f32 = dict(dtype=torch.float32, device=h.device)
    logp_all, m_all, ls_all, ent_all = (torch.zeros(N, **f32) for _ in range(4))
    if state is not None:
        m_all, ls_all = state
    dh = torch.zeros(N, H, **f32) if grad_of and need_dh else None
    dw = torch.zeros(V, H, **f32) if grad_of and need_dw else None
    db = torch.zeros(V, **f32) if grad_of and need_dw and b is not None else None
    hc = torch.zeros(_ROWS, H, **f32)
    for r0 in range(0, rows.numel(), _ROWS):
        idx = rows[r0:r0 + _ROWS]
        n = idx.numel()
        hc.zero_()[:n] = h.index_select(0, idx)  # padded to _ROWS: fixed GEMM shape
        tc = torch.zeros(_ROWS, dtype=torch.int64, device=h.device)
        tc[:n] = t.index_select(0, idx)
        kept = None
        if state is None:
            m = torch.full((_ROWS,), float("-inf"), **f32)
            s = torch.zeros(_ROWS, **f32)
            u = torch.zeros(_ROWS, **f32)
            z_t = torch.full((_ROWS,), float("-inf"), **f32)
            for v0, v1 in chunks:
                z = _tile(hc, w, b, v0, v1, inv_t)
                m_new = torch.maximum(m, z.amax(-1))
                m_safe = m_new.masked_fill(m_new == float("-inf"), 0)
                alpha = torch.exp(m - m_safe)
                zs = z - m_safe[:, None]
                e = torch.exp(zs)
                # U = sum e^(z-M)(z-M) (_chunk_lse_kernel's doc): the old terms move to M_new
                shift = (m - m_safe).masked_fill(m == float("-inf"), 0)
                s_new = s * alpha + e.sum(-1)
                if entropy:  # in place (two tiles besides z, as the log-sum-exp alone
                    # takes): a -inf logit's term is 0 * -inf = nan -> 0
                    u = alpha * (u + s * shift) + e.mul_(zs).nan_to_num_(0.0).sum(-1)
                s = s_new
                del zs, e
                m = m_new
                hit = (tc >= v0) & (tc < v1)
                zt_c = z.gather(1, (tc - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                z_t = torch.where(hit, zt_c, z_t)
                kept = z if len(chunks) == 1 else None
                del z
            log_s = s.log()
            m = m.masked_fill(m == float("-inf"), 0)
            lp = ((z_t - m) - log_s).clamp_(max=0).masked_fill_(z_t == float("-inf"),
                                                                float("-inf"))
            logp_all[idx], m_all[idx], ls_all[idx] = lp[:n], m[:n], log_s[:n]
            if entropy:
                ent_all[idx] = _entropy(log_s, u, s)[:n]
        else:
            # padding rows: M = +inf gives p = 0 (their z may be anything)
            m = torch.full((_ROWS,), float("inf"), **f32)
            log_s = torch.zeros(_ROWS, **f32)
            m[:n], log_s[:n] = m_all[idx], ls_all[idx]
            lp = None
        g_rows = grad_of(idx, None if lp is None else lp[:n]) if grad_of else None
        if g_rows is None:
            continue
        dead = log_s == float("-inf")
        g = torch.zeros(_ROWS, **f32)
        g[:n] = g_rows * inv_t
        g = g.masked_fill_(dead, 0)
        log_s = log_s.masked_fill(dead, 0)
        dhc = torch.zeros(_ROWS, H, **f32) if need_dh else None
        for v0, v1 in chunks:
            z = kept if kept is not None else _tile(hc, w, b, v0, v1, inv_t)
            kept = None
            # D = g (onehot - p), in place over the tile
            d = z.sub_(m[:, None]).sub_(log_s[:, None]).exp_().mul_(-g[:, None])
            hit = (tc >= v0) & (tc < v1)
            d.scatter_add_(1, (tc - v0).clamp(0, v1 - v0 - 1)[:, None],
                           torch.where(hit, g, 0.0)[:, None])
            wc = w[v0:v1]
            wc = wc if wc.dtype == torch.float32 else wc.float()
            if need_dh:
                dhc.addmm_(d, wc)
            if need_dw:
                dw[v0:v1].addmm_(d.T, hc)
                if db is not None:
                    db[v0:v1] += d.sum(0)
            del z, d
        if need_dh:
            dh[idx] = dhc[:n]
    return logp_all, m_all, ls_all, ent_all, dh, dw, db


# ---------------------------------------------------------------------- checks, operands
def check_head(hidden, weight, bias, targets=None) -> tuple[int, int]:
    """Shape, dtype and device checks (free, no device sync) naming the shapes, and (with
    targets and SCORE_FAST_CHECK_INPUTS on) the targets' range (one sync on a GPU);
    returns V, H."""
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
    if targets is not None:
        check_targets(targets, "hidden", hidden)
    devs = {a.device for a in (hidden, weight, targets, bias) if a is not None}
    if len(devs) != 1:
        names = "hidden, weight" + (", targets" if targets is not None else "")
        raise ValueError(f"{names} (and bias) must share a device, got {devs}")
    if targets is not None and checks_enabled() and targets.numel() and not (
            0 <= targets.min().item() and targets.max().item() < V):  # one sync on a GPU
        raise ValueError(f"targets must lie in [0, {V}) (weight shape {tuple(weight.shape)}), "
                         f"got min {targets.min().item()} max {targets.max().item()}")
    return V, H


def flatten_head(hidden, weight, targets=None, bias=None):
    """Flattened, H-contiguous operands: h [N, H], w [V, H], b, t [N] int64 (None without
    targets)."""
    H = weight.shape[1]
    h = hidden.reshape(-1, H)
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    t = None if targets is None else targets.reshape(-1).to(torch.int64).contiguous()
    return h, w, b, t
