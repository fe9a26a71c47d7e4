"""Log-probability of the chosen token straight from hidden states and the LM-head weight,
never holding the [N, V] logits.

With x = hidden @ weight.T + bias (never stored) and z = x / T, for row n, target t = t[n]:

    logp[n] = z[n, t] - M[n] - log S[n],   M[n] = max_v z[n, v],  S[n] = sum_v exp(z[n, v] - M[n])

    dlogp/dx[n, v]   = (onehot(t)_v - p[n, v]) / T,   p = exp(z - M - log S)
    with upstream g[n] and D[n, v] = g[n] * (onehot(t)_v - p[n, v]) / T:
    dhidden = D @ weight          [N, H]
    dweight = D.T @ hidden        [V, H]
    dbias   = D.sum(0)            [V]

The forward keeps (M, log S), 8 bytes a row; the backward recomputes the logit tiles from
them. Both passes are _lmhead's (its module doc has the design and the numbers): the
vocabulary-chunked cuBLAS GEMMs + Triton elementwise kernels wherever the Triton backend is
on (dweight written in the weight dtype: eager's single rounding), its tiled PyTorch sweep
for CPU tensors. No host sync (besides the targets' range check, SCORE_FAST_CHECK_INPUTS).

Edge cases as in token_logprobs: a -inf logit (from a -inf bias) is a masked vocabulary
entry; a row whose logits are all -inf gives -inf and a zero gradient; logp <= 0.

    from score_fast.kernels.linear_logprobs import linear_logprobs
    logp = linear_logprobs(hidden, lm_head.weight, targets)     # [N] fp32
"""
from __future__ import annotations

import torch

from ._common import check_temperature
from ._dispatch import use_triton
from ._lmhead import check_head, chunked_grads, chunked_logsumexp, cpu_sweep, flatten_head
from .token_logprobs import token_logprobs_ref

__all__ = ["linear_logprobs", "linear_logprobs_ref"]


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, t, inv_t, on_triton):
        rows = torch.arange(h.shape[0], device=h.device)
        sweep = chunked_logsumexp if on_triton else cpu_sweep
        logp, m, log_s = sweep(h, w, b, t, rows, inv_t)[:3]
        ctx.save_for_backward(h, w, b, t, rows, m, log_s)
        ctx.inv_t, ctx.on_triton = inv_t, on_triton
        return logp

    @staticmethod
    def backward(ctx, g):
        h, w, b, t, rows, m, log_s = ctx.saved_tensors
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        g = g.float().contiguous()
        if ctx.on_triton:  # g is the final upstream: dweight straight in the weight dtype
            dh, dw, db = chunked_grads(h, w, b, t, rows, m, log_s, g, ctx.inv_t, need_dh,
                                       need_dw, dw_dtype=w.dtype)
        else:
            dh, dw, db = cpu_sweep(h, w, b, t, rows, ctx.inv_t, state=(m, log_s),
                                   grad_of=lambda idx, _: g.index_select(0, idx),
                                   need_dh=need_dh, need_dw=need_dw)[4:]
        return (None if dh is None else dh.to(h.dtype),
                None if dw is None or not ctx.needs_input_grad[1] else dw.to(w.dtype),
                None if db is None or not ctx.needs_input_grad[2] else db.to(b.dtype),
                None, None, None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """log_softmax((hidden @ weight.T + bias) / temperature)[..., targets] as fp32 of shape
    targets.shape, without the [N, V] logits (formulas in the module doc).

    hidden: [..., H] float32/bfloat16/float16; weight: [V, H] same dtype; bias: [V] or None;
    targets: integer, shape hidden.shape[:-1], values in [0, V). Differentiable in hidden,
    weight and bias: the backward recomputes the logit tiles from the saved (M, log S), so
    its memory beyond the gradients themselves is independent of V. The chunked cuBLAS path
    for CUDA tensors, the tiled PyTorch path for CPU tensors (SCORE_FAST_BACKEND overrides,
    see _dispatch)."""
    check_head(hidden, weight, bias, targets)
    inv_t = check_temperature(temperature)
    h, w, b, t = flatten_head(hidden, weight, targets, bias)
    tensors = [a for a in (hidden, weight, targets, bias) if a is not None]
    logp = _LinearLogprobs.apply(h, w, b, t, inv_t, use_triton(*tensors))
    return logp.view(targets.shape)


def linear_logprobs_ref(hidden, weight, targets, bias=None, temperature=1.0):
    """The specification and test oracle, in the inputs' dtype (fp64 in the tests): the
    logits in full, then log_softmax(x / T).gather(targets) (an all -inf row gives -inf)."""
    x = hidden @ weight.T
    if bias is not None:
        x = x + bias
    return token_logprobs_ref(x, targets, temperature)
