"""linear_score_loss against an fp64 reference (full logits -> log-probs -> score_loss_ref),
under the project's rule, on the PyTorch path and the (interpreted) Triton path: the loss,
every metric, and the gradients in hidden, weight and bias."""
import os
import sys

import pytest
import torch

from conftest import assert_within_rule
from score_fast.kernels import _lmhead as lm
from score_fast.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
from score_fast.kernels.linear_score_loss import linear_score_loss, linear_score_loss_ref
from score_fast.kernels.score_loss import score_loss

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from harness import peak_memory  # noqa: E402

BACKENDS = ["torch", "triton"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}  # 1e-5: a few ulp of |logp| ~ 10


def _use(backend, monkeypatch, rows=16):
    """Select a path; the Triton one with `rows`-row chunks (the rule, lm.row_chunk,
    replaced for the test: several chunks, the last partial, at the tests' sizes)."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", backend)
    monkeypatch.setattr(lm, "row_chunk", lambda n: min(n, rows))


def _batch(N, H, V, E=3, dtype=torch.float32, bias=True, seed=0, temperature=1.0,
           clip=False, device="cpu"):
    """Hidden, weight, bias, targets and a SCoRe batch whose ref_logp (and old_logp) sit
    near the policy's log-probs, as they do in training (d = logp - ref ~ 0.3)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (3 / H**0.5)
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    turn = torch.randint(0, 3, (N,), generator=g)
    episode = torch.randint(0, E, (N,), generator=g)
    adv = torch.randn(E, 2, generator=g)
    cast = lambda a: None if a is None else a.to(dtype)  # noqa: E731
    h, w, b = cast(h), cast(w), cast(b)
    lp = linear_logprobs_ref(h.double(), w.double(), t, None if b is None else b.double(),
                             temperature)
    ref = (lp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    old = (lp + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)).float() if clip else None
    dev = lambda a: None if a is None else a.to(device)  # noqa: E731
    return dict(hidden=dev(h), weight=dev(w), bias=dev(b), targets=dev(t), ref_logp=dev(ref),
                turn=dev(turn), episode=dev(episode), advantages=dev(adv),
                old_logp=dev(old), clip_eps=0.2 if clip else None)


def _leaf(a, dtype=None):
    return None if a is None else a.detach().to(dtype or a.dtype).requires_grad_(True)


def _call(fn, batch, up, dtype=None, **kw):
    """(loss, metrics, [dhidden, dweight, dbias]) with the inputs cast to dtype."""
    b = dict(batch)
    for k in ("hidden", "weight", "bias"):
        b[k] = _leaf(b[k], dtype)
    if dtype is not None:
        for k in ("ref_logp", "advantages", "old_logp"):
            b[k] = None if b[k] is None else b[k].to(dtype)
    args = [b.pop(k) for k in ("hidden", "weight", "targets", "ref_logp", "turn", "episode",
                               "advantages")]
    loss, metrics = fn(*args, **b, **kw)
    (loss * up).backward()
    return loss.detach(), metrics, [None if a is None else a.grad for a in args[:2] + [b["bias"]]]


def _check(batch, up=1.7, **kw):
    dtype = batch["hidden"].dtype
    loss, m, grads = _call(linear_score_loss, batch, up, **kw)
    base, mb, base_grads = _call(linear_score_loss_ref, batch, up, **kw)
    ref, m64, ref_grads = _call(linear_score_loss_ref, batch, up, dtype=torch.float64, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    atol = ATOL[dtype]
    assert_within_rule(loss, ref, base, atol, "loss")
    assert sorted(m) == sorted(m64)
    for k in m64:
        assert m[k].dtype == torch.float32 and not m[k].requires_grad, k
        assert_within_rule(m[k], m64[k], mb[k], atol, k)
    for name, gr, gb, g64 in zip(("dhidden", "dweight", "dbias"), grads, base_grads,
                                 ref_grads):
        if g64 is None:
            assert gr is None, name
            continue
        assert gr.dtype == dtype and gr.shape == g64.shape, name
        # atol relative to the gradient's scale: a token with logp = -17 under k3 gives
        # |dhidden| = 40, where one fp32 ulp is 4e-6
        assert_within_rule(gr, g64, gb, atol * max(1.0, g64.abs().max().item()), name)
    return loss, m, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,stage,kl,reduction,temperature,bias", [
    (37, 64, 1000, 2, "k3", "token_mean", 1.0, True),
    (37, 16, 1000, 1, "k3", "seq_mean_token_mean", 0.7, False),
    (20, 64, 100, 2, "k2", "seq_mean_token_sum", 1.3, True),
    (1, 16, 100, 1, "k1", "token_mean", 1.0, True),
])
def test_matches_reference(backend, dtype, N, H, V, stage, kl, reduction, temperature, bias,
                           monkeypatch):
    _use(backend, monkeypatch)
    batch = _batch(N, H, V, dtype=dtype, bias=bias, temperature=temperature)
    if N == 1:
        batch["turn"].fill_(1)
    _check(batch, stage=stage, kl=kl, reduction=reduction, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_clip(backend, monkeypatch):
    _use(backend, monkeypatch)
    _, m, _ = _check(_batch(37, 32, 500, clip=True), stage=2)
    assert "clip_frac" in m
    batch = _batch(37, 32, 500, clip=True)
    batch["clip_eps"] = (0.05, 0.3)  # asymmetric: DAPO's clip-higher
    assert _check(batch, stage=2)[1]["clip_frac"] > 0
    batch.update(old_logp=None, clip_eps=(0.2, 0.28))  # on-policy: r = 1, TRL's GRPO default
    _check(batch, stage=2, reduction="seq_mean_token_mean", temperature=0.9)
    _check(batch, stage=2, beta1=0.3, kl_ratio=True)  # TRL's use_bias_correction_kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [32001, 151936])
def test_odd_vocabularies(backend, V, monkeypatch):
    _use(backend, monkeypatch, rows=64)
    batch = _batch(6, 16, V)
    batch["turn"] = torch.tensor([0, 1, 2, 2, 0, 1])
    batch["targets"][1] = V - 1
    _check(batch, stage=2, temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_cpu_vocab_chunks_and_row_chunks(backend, monkeypatch):
    """The PyTorch path with the tile recomputed (8 vocabulary chunks) over 2 row chunks."""
    _use(backend, monkeypatch)
    monkeypatch.setattr(lm, "_TILE_ELEMS", lm._ROWS * 128)
    _check(_batch(400 if backend == "torch" else 40, 16, 1000), stage=1,
           reduction="seq_mean_token_mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_composition(backend, monkeypatch):
    """score_loss(linear_logprobs(...)) through autograd: same loss, metrics, gradients."""
    _use(backend, monkeypatch)
    batch = _batch(30, 32, 700)
    kw = dict(stage=2, kl="k3", reduction="seq_mean_token_sum", temperature=0.8)
    loss, m, grads = _call(linear_score_loss, batch, 0.6, **kw)

    def composed(hidden, weight, targets, ref_logp, turn, episode, advantages, *, bias,
                 temperature, old_logp, clip_eps, **rest):
        lp = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
        return score_loss(lp, ref_logp, turn, episode, advantages, old_logp=old_logp,
                          clip_eps=clip_eps, **rest)

    loss2, m2, grads2 = _call(composed, batch, 0.6, **kw)
    torch.testing.assert_close(loss, loss2, atol=1e-6, rtol=1e-5)
    for k in m2:
        torch.testing.assert_close(m[k], m2[k], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked(backend, monkeypatch):
    _use(backend, monkeypatch)
    batch = _batch(20, 16, 300)
    batch["turn"].zero_()
    loss, m, grads = _call(linear_score_loss, batch, 1.0, stage=1)
    assert loss.item() == 0
    assert all(v.item() == 0 for v in m.values())
    for gr in grads:
        assert gr is not None and torch.all(gr == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_rows_do_no_vocabulary_work(backend, monkeypatch):
    """Turn-0 rows are never multiplied with the weight: NaN hidden states there leave the
    loss and the weight gradient finite and unchanged, and their hidden gradient is 0."""
    _use(backend, monkeypatch)
    batch = _batch(37, 16, 400)
    loss, m, (dh, dw, db) = _call(linear_score_loss, batch, 1.0, stage=2)
    poisoned = dict(batch, hidden=batch["hidden"].clone())
    poisoned["hidden"][batch["turn"] == 0] = float("nan")
    loss2, m2, (dh2, dw2, db2) = _call(linear_score_loss, poisoned, 1.0, stage=2)
    assert torch.equal(loss, loss2)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)
    assert torch.all(dh2[batch["turn"] == 0] == 0)
    assert torch.equal(dh2[batch["turn"] > 0], dh[batch["turn"] > 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_leading_dims(backend, monkeypatch):
    _use(backend, monkeypatch)
    batch = _batch(24, 16, 300)
    ref, _ = linear_score_loss_ref(*(batch[k].double() if batch[k].is_floating_point()
                                     else batch[k] for k in
                                     ("hidden", "weight", "targets", "ref_logp", "turn",
                                      "episode", "advantages")),
                                   bias=batch["bias"].double(), stage=2)
    lead = ("hidden", "targets", "ref_logp", "turn", "episode")
    shaped = {k: (v.view(4, 6, *v.shape[1:]) if k in lead else v)
              for k, v in batch.items() if k not in ("old_logp", "clip_eps")}
    h = shaped["hidden"].requires_grad_(True)
    with torch.no_grad():
        loss, _ = linear_score_loss(h, shaped["weight"], shaped["targets"], shaped["ref_logp"],
                                    shaped["turn"], shaped["episode"], shaped["advantages"],
                                    bias=shaped["bias"], stage=2)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_twice(backend, dtype, monkeypatch):
    """The gradients formed in the forward are saved unscaled: a second backward (the graph
    retained) with another upstream gives that upstream's gradients; without retain_graph a
    further backward is autograd's own error."""
    _use(backend, monkeypatch)
    batch = _batch(8, 16, 100, dtype=dtype)
    leaves = [batch[k].requires_grad_(True) for k in ("hidden", "weight", "bias")]
    loss, _ = linear_score_loss(leaves[0], leaves[1], batch["targets"], batch["ref_logp"],
                                batch["turn"], batch["episode"], batch["advantages"],
                                bias=leaves[2], stage=2)
    loss.backward(retain_graph=True)
    first = [a.grad for a in leaves]
    for a in leaves:
        a.grad = None
    (loss * -3.0).backward()
    for a, g in zip(leaves, first):
        assert a.grad.dtype == dtype and g.abs().max() > 0
        # bf16: -3 round(G) vs round(-3 G), each within half an ulp (2^-9 relative)
        torch.testing.assert_close(a.grad, -3.0 * g, atol=0, rtol=2**-7)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_peak_memory_cpu(monkeypatch):
    """Forward + backward of the fused loss: peak RSS under 1/4 of the fp32 logits alone."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "torch")
    batch = _batch(2048, 32, 65536, E=8)
    h = batch["hidden"].requires_grad_(True)
    w = batch["weight"].requires_grad_(True)

    def step():
        loss, _ = linear_score_loss(h, w, batch["targets"], batch["ref_logp"], batch["turn"],
                                    batch["episode"], batch["advantages"], stage=2)
        loss.backward()

    step()
    h.grad = w.grad = None
    peak = peak_memory(step, "cpu")
    if peak < 0:
        pytest.skip("no /proc/self/clear_refs here")
    logits = 2048 * 65536 * 4
    assert w.grad.abs().sum() > 0
    assert 65536 * 32 * 4 < peak < logits / 4, f"peak {peak / 2**20:.0f} MiB"


def _bad(**over):
    batch = _batch(6, 16, 50)
    args = dict(batch, stage=2)
    args.pop("old_logp"), args.pop("clip_eps")
    args.update(over)
    pos = [args.pop(k) for k in ("hidden", "weight", "targets", "ref_logp", "turn", "episode",
                                 "advantages")]
    return linear_score_loss(*pos, **args)


@pytest.mark.parametrize("over, match", [
    (dict(stage=3), "stage must be 1 or 2"),
    (dict(kl="k4"), "k4"),
    (dict(reduction="mean"), "reduction must be one of"),
    (dict(ref_logp=torch.zeros(5)), r"ref_logp shape \(5,\) does not match targets shape \(6,\)"),
    (dict(turn=torch.zeros(7, dtype=torch.long)), r"turn shape \(7,\)"),
    (dict(episode=torch.zeros(6, 1, dtype=torch.long)), r"episode shape \(6, 1\)"),
    (dict(advantages=torch.zeros(3)), r"advantages must be \[E, 2\].*\(3,\)"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets shape \(5,\)"),
    (dict(hidden=torch.randn(6, 8)), r"hidden shape \(6, 8\).*weight shape \(50, 16\)"),
    (dict(weight=torch.randn(50, 16).bfloat16()), "weight dtype"),
    (dict(bias=torch.randn(51)), r"bias must have shape \(50,\)"),
    (dict(turn=torch.full((6,), 3)), "turn values"),
    (dict(old_logp=torch.zeros(6)), "old_logp needs clip_eps"),
])
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)


@pytest.mark.gpu
@pytest.mark.parametrize("N,H,V", [(256, 512, 32000), (512, 2048, 151936)])
def test_gpu_bf16(N, H, V):
    _check(_batch(N, H, V, E=16, dtype=torch.bfloat16, device="cuda"), stage=2,
           reduction="seq_mean_token_mean")


@pytest.mark.gpu
def test_gpu_fp32():
    _check(_batch(128, 256, 32000, E=8, device="cuda"), stage=1, temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunks", [1, 8])
def test_entropy_at_extreme_logits(backend, chunks, monkeypatch):
    """entropy_t1 / entropy_t2 (from the log-sum-exp sweep's sums) against the fp64 full
    softmax: a masked vocabulary (-inf bias), rows with logits of +-1e4 (a near-one-hot and
    a wide row, where log S + M - E[z] would cancel to ~1e-3), across vocabulary chunks."""
    _use(backend, monkeypatch)
    if chunks > 1:
        monkeypatch.setattr(lm, "_TILE_ELEMS", lm._ROWS * 128)  # 1000 columns -> 8 chunks
    batch = _batch(8, 16, 1000, seed=3)
    batch["bias"][::3] = float("-inf")
    batch["targets"] = torch.where(batch["targets"] % 3 == 0, batch["targets"] + 1,
                                   batch["targets"])
    h = batch["hidden"]
    h[1] *= 4000  # |logits| ~ 1e4: one token takes all the mass
    h[2] *= 40  # ~ 100: a few tokens share it
    batch["turn"] = torch.tensor([1, 1, 2, 2, 1, 0, 2, 1])
    x = (h.double() @ batch["weight"].double().T + batch["bias"].double()) / 0.9
    batch["targets"][1:3] = x[1:3].argmax(-1)  # sampled tokens: the likely ones
    batch["ref_logp"][1:3] = torch.log_softmax(x[1:3], -1).gather(
        1, batch["targets"][1:3, None]).squeeze(1).float() - 0.3
    _, m, _ = _check(batch, stage=2, temperature=0.9)
    one = dict(batch, turn=torch.tensor([0, 0, 0, 0, 0, 0, 0, 1]))  # one row: its entropy
    p = torch.softmax(x[7], -1)
    want = -(p[p > 0] * p[p > 0].log()).sum()
    _, m1, _ = _call(linear_score_loss, one, 1.0, stage=2, temperature=0.9)
    assert abs(m1["entropy_t1"].item() - want.item()) < 1e-5 and want > 1
    assert m1["entropy_t2"] == 0  # no attempt-2 rows
    assert m["entropy_t1"] > 0 and m["entropy_t2"] > 0


def test_triton_path_runs_three_gemms_a_row_chunk(monkeypatch):
    """The CUDA path's shape of work (issue 30): per chunk of loss rows one GEMM for the
    full-vocabulary logits, one for dhidden, one accumulating dweight (the vocabulary sweep
    it replaced ran 4: the logits twice); 40 loss rows in chunks of 16: 3 chunks, 9 GEMMs,
    and no tensor of the [N, V] logits' size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    _use("triton", monkeypatch, rows=16)
    batch = _batch(64, 16, 1000, bias=False)
    batch["turn"] = torch.tensor([1, 2] * 20 + [0] * 24)
    h = batch["hidden"].requires_grad_(True)
    w = batch["weight"].requires_grad_(True)
    seen = []

    class Gemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name in ("mm", "addmm", "addmm_", "bmm", "matmul"):
                seen.append(name)
            if (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == 1000
                    and out.shape[0] > 16):  # more rows of logits than a chunk
                seen.append(f"big {tuple(out.shape)}")
            return out

    with Gemms():
        loss, _ = linear_score_loss(h, w, batch["targets"], batch["ref_logp"], batch["turn"],
                                    batch["episode"], batch["advantages"], stage=2)
        loss.backward()
    assert seen == ["mm", "mm", "addmm_"] * 3, seen
