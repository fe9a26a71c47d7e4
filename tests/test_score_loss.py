import math

import pytest
import torch
from conftest import assert_within_rule

from score_fast.kernels.score_loss import score_loss, score_loss_ref

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
METRICS = ("kl_t1", "kl_t2", "logp_t1", "logp_t2", "pg_loss", "kl_loss", "num_tokens")
LN2 = math.log(2.0)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)
    return request.param


def _inputs(shape, E, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T = math.prod(shape)
    logp = -3 * torch.rand(T, generator=g)
    ref = logp - 0.3 * torch.randn(T, generator=g)
    old = logp + 0.2 * torch.randn(T, generator=g)  # ratios ~ exp(+-0.2): some clipped at 0.2
    turn = torch.randint(0, 3, (T,), generator=g)
    episode = torch.where(turn > 0, torch.randint(0, E, (T,), generator=g), -1)
    adv = torch.randn(E, 2, generator=g)
    return [t.view(shape).to(device) for t in (logp, ref, old, turn, episode)] + [adv.to(device)]


def _check_against_ref(shape, E, seed=0, device="cpu", clip_eps=None, use_old=True, **kw):
    logp, ref, old, turn, episode, adv = _inputs(shape, E, seed, device)
    old = old if use_old else None
    if clip_eps is not None:
        kw.update(old_logp=old, clip_eps=clip_eps)
    dloss = torch.randn((), generator=torch.Generator().manual_seed(seed + 1))
    x = logp.clone().requires_grad_()
    loss, m = score_loss(x, ref, turn, episode, adv, **kw)
    (loss * dloss.to(device)).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert x.grad.shape == logp.shape

    def run_ref(dtype):
        kw_ref = dict(kw, old_logp=None if old is None or clip_eps is None
                      else old.cpu().to(dtype))
        xr = logp.cpu().to(dtype).requires_grad_()
        lr, mr = score_loss_ref(xr, ref.cpu().to(dtype), turn.cpu(), episode.cpu(),
                                adv.cpu().to(dtype), **kw_ref)
        (lr * dloss.to(dtype)).backward()
        return lr, mr, xr.grad.view(logp.shape)

    l64, m64, g64 = run_ref(torch.float64)
    l32, m32, g32 = run_ref(torch.float32)
    scale = 1 + abs(l64.item())
    assert_within_rule(loss, l64, l32, atol=1e-6 * scale, name="loss")
    assert_within_rule(x.grad, g64, g32, atol=1e-8, name="grad")
    names = METRICS + (("clip_frac",) if clip_eps is not None else ())
    assert set(m) == set(names)
    for k in names:
        assert m[k].dtype == torch.float32 and m[k].dim() == 0 and not m[k].requires_grad
        assert_within_rule(m[k], m64[k], m32[k], atol=1e-6 * (1 + abs(m64[k].item())), name=k)
    return m


@pytest.mark.parametrize("clip_eps", [None, 0.2, (0.1, 0.28)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("stage", [1, 2])
def test_matches_reference(backend, stage, reduction, clip_eps):
    m = _check_against_ref((1, 4099), 7, stage=stage, reduction=reduction, clip_eps=clip_eps)
    if clip_eps is not None:  # the clipped branch really is exercised
        assert 0.05 < m["clip_frac"].item() < 0.95


@pytest.mark.parametrize("kind", ["k1", "k2"])
def test_other_kl_kinds(backend, kind):
    _check_against_ref((3, 37), 7, seed=1, stage=1, kl=kind, beta2=0.5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,E", [((1,), 1), ((37,), 1000), ((2, 37), 7), ((1, 4099), 1000)])
def test_sizes(backend, shape, E, reduction):
    _check_against_ref(shape, E, seed=E, stage=2, reduction=reduction)


def _packed():
    """[prompt, attempt 1 (2 tokens), instruction, attempt 2 (2 tokens), padding], one episode.
    d = logp - ref_logp is ln 2, 0, -ln 2, ln 2 on the loss tokens, where
    k3(ln 2) = 1/2 - 1 + ln 2, dk3 = 1 - 1/2;  k3(-ln 2) = 2 - 1 - ln 2, dk3 = 1 - 2."""
    logp = torch.tensor([[-0.3, -1.0, -0.5, -4.0, -2.0, -0.25, -math.inf]])
    d = torch.tensor([[0.0, LN2, 0.0, 3.0, -LN2, LN2, 0.0]])
    ref = torch.where(torch.isinf(logp), 0.0, logp - d)
    turn = torch.tensor([[0, 1, 1, 0, 2, 2, 0]])
    episode = torch.tensor([[-1, 0, 0, 0, 0, 0, -1]])
    adv = torch.tensor([[0.5, 2.0]])
    return logp, ref, turn, episode, adv


# the interpreter (numpy) warns on inf - inf in the masked padding lanes
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("stage", [1, 2])
def test_packed_sequence_by_hand(backend, stage):
    logp, ref, turn, episode, adv = _packed()
    x = logp.clone().requires_grad_()
    loss, m = score_loss(x, ref, turn, episode, adv, stage=stage, beta1=0.01, beta2=0.1)
    loss.backward()
    k3_pos, k3_neg = LN2 - 0.5, 1 - LN2
    # attempt 2 in both stages: A = 2, beta1 = 0.01: pg = -2 * logp
    l2 = [4 + 0.01 * k3_neg, 0.5 + 0.01 * k3_pos]
    g2 = [-2 + 0.01 * -1.0, -2 + 0.01 * 0.5]
    if stage == 1:  # attempt 1: beta2 * KL only, no policy gradient
        l1, g1 = [0.1 * k3_pos, 0.0], [0.1 * 0.5, 0.0]
        pg_loss, kl_loss = 4.5 / 4, (0.1 * k3_pos + 0.01 * (k3_neg + k3_pos)) / 4
    else:  # attempt 1: A = 0.5, beta1
        l1, g1 = [0.5 + 0.01 * k3_pos, 0.25], [-0.5 + 0.01 * 0.5, -0.5]
        pg_loss, kl_loss = 5.25 / 4, 0.01 * (2 * k3_pos + k3_neg) / 4
    want_grad = torch.tensor([[0.0, g1[0], g1[1], 0.0, g2[0], g2[1], 0.0]]) / 4
    torch.testing.assert_close(loss, torch.tensor(sum(l1 + l2) / 4), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-8)
    if stage == 1:  # exactly beta2 * dKL/dlogp / N on the first attempt-1 token
        assert x.grad[0, 1].item() == pytest.approx(0.1 * 0.5 / 4, rel=1e-6)
    want = {"kl_t1": k3_pos / 2, "kl_t2": 0.25, "logp_t1": -0.75, "logp_t2": -1.125,
            "pg_loss": pg_loss, "kl_loss": kl_loss, "num_tokens": 4.0}
    assert {k: pytest.approx(v, rel=1e-5, abs=1e-7) for k, v in want.items()} == \
        {k: v.item() for k, v in m.items()}


@pytest.mark.parametrize("reduction,loss,grad", [
    ("token_mean", 7 / 4, [-1 / 4] * 4),
    ("seq_mean_token_mean", (1 + 6 / 3) / 2, [-1 / 2, -1 / 6, -1 / 6, -1 / 6]),
    ("seq_mean_token_sum", (1 + 6) / 2, [-1 / 2] * 4),
])
def test_reductions_by_hand(backend, reduction, loss, grad):
    # episode 0: one token (pg 1); episode 1: three (pg 1, 2, 3); episode 2: none (ignored)
    x = torch.tensor([-1.0, 0.0, -1.0, -2.0, -3.0], requires_grad=True)
    turn = torch.tensor([1, 0, 1, 2, 2])
    episode = torch.tensor([0, 2, 1, 1, 1])
    out, _ = score_loss(x, x.detach(), turn, episode, torch.ones(3, 2), stage=2,
                        beta1=0.0, reduction=reduction)
    out.backward()
    assert out.item() == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor(grad[:1] + [0.0] + grad[1:]))


def test_ppo_clip_by_hand(backend):
    # ratio 2 on both tokens, eps 0.2. A = +1: min(2, 1.2) -> pg -1.2, clipped, grad 0;
    # A = -1: min(-2, -1.2) -> pg 2, not clipped, grad -A * ratio = 2.
    x = torch.tensor([-1.0, -1.0], requires_grad=True)
    old = x.detach() - LN2
    out, m = score_loss(x, x.detach(), torch.tensor([2, 2]), torch.tensor([0, 1]),
                        torch.tensor([[0.0, 1.0], [0.0, -1.0]]), stage=2, beta1=0.0,
                        old_logp=old, clip_eps=0.2)
    out.backward()
    assert out.item() == pytest.approx((-1.2 + 2.0) / 2, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0]))
    assert m["clip_frac"].item() == 0.5


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("use_old", [True, False])
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
def test_kl_ratio_matches_reference(backend, stage, use_old, reduction):
    _check_against_ref((1, 2053), 7, stage=stage, reduction=reduction, clip_eps=(0.2, 0.28),
                       use_old=use_old, kl_ratio=True, beta1=0.3, beta2=0.2)


def test_kl_ratio_gradient_is_r_times_d(backend):
    """k3 weighted by r: gradient beta * r * d (the reverse KL's, d = logp - ref), value
    beta * r * k3; the kl metric is the mean of r * k3."""
    logp, ref, old, turn, episode, adv = _inputs((301,), 4, seed=9)
    turn = torch.ones_like(turn)
    episode = episode.clamp(min=0)
    x = logp.clone().requires_grad_()
    loss, m = score_loss(x, ref, turn, episode, adv * 0, stage=2, beta1=0.5, kl="k3",
                         old_logp=old, clip_eps=0.2, kl_ratio=True)
    loss.backward()
    r, d = torch.exp(logp - old), logp - ref
    k3 = torch.exp(-d) + d - 1
    n = logp.numel()
    torch.testing.assert_close(x.grad, 0.5 * r * d / n, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, (0.5 * r * k3).sum() / n, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m["kl_t1"], (r * k3).mean(), rtol=1e-5, atol=1e-7)


def test_ppo_clip_asymmetric_by_hand(backend):
    # (lo, hi) = (0.2, 0.5): ratio 2 with A = +1 is capped at 1.5 (clipped, grad 0); ratio
    # 0.5 with A = -1: min(-0.5, -0.8) = -0.8, the clipped term, so grad 0 and pg 0.8.
    x = torch.tensor([-1.0, -1.0], requires_grad=True)
    old = x.detach() + torch.tensor([-LN2, LN2])
    out, m = score_loss(x, x.detach(), torch.tensor([1, 1]), torch.tensor([0, 1]),
                        torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), stage=2, beta1=0.0,
                        old_logp=old, clip_eps=(0.2, 0.5))
    out.backward()
    assert out.item() == pytest.approx((-1.5 + 0.8) / 2, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0]))
    assert m["clip_frac"].item() == 1.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_clip_without_old_logp_is_on_policy(backend, reduction):
    """clip_eps alone: old = logp, r = 1. The gradient is REINFORCE's, the pg value is -A
    (not -A * logp), nothing is clipped."""
    logp, ref, _, turn, episode, adv = _inputs((2, 301), 5, seed=3)
    runs = []
    for clip in (None, (0.2, 0.28)):
        x = logp.clone().requires_grad_()
        loss, m = score_loss(x, ref, turn, episode, adv, stage=2, reduction=reduction,
                             clip_eps=clip)
        loss.backward()
        runs.append((loss, m, x.grad))
    (loss0, m0, g0), (loss1, m1, g1) = runs
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(m1["kl_loss"], m0["kl_loss"])
    ones = torch.ones_like(logp)  # pg at logp = 1 everywhere is -A with the same weights
    want = score_loss(ones, ones, turn, episode, adv, stage=2, reduction=reduction,
                      beta1=0.0)[0]
    torch.testing.assert_close(m1["pg_loss"], want)
    assert m1["clip_frac"].item() == 0.0
    ref_loss = score_loss_ref(logp.double(), ref.double(), turn, episode, adv.double(),
                              stage=2, reduction=reduction, clip_eps=(0.2, 0.28))[0]
    torch.testing.assert_close(loss1.double(), ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("E", [0, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_loss_tokens(backend, reduction, E):
    x = torch.tensor([[-1.0, -math.inf, -2.0]], requires_grad=True)
    zeros = torch.zeros(1, 3, dtype=torch.long)
    loss, m = score_loss(x, torch.zeros(1, 3), zeros, zeros - 1, torch.zeros(E, 2), stage=1,
                         reduction=reduction, old_logp=torch.zeros(1, 3), clip_eps=0.2)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.eq(0).all()
    assert all(v.item() == 0.0 for v in m.values())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradcheck(reduction):
    logp, ref, old, turn, episode, adv = _inputs((12,), 3, seed=5)
    for o, eps in ((None, None), (old.double(), 0.2)):
        def f(t):
            return score_loss_ref(t, ref.double(), turn, episode, adv.double(), stage=1,
                                  reduction=reduction, beta2=0.3, old_logp=o, clip_eps=eps)[0]
        assert torch.autograd.gradcheck(f, (logp.double().requires_grad_(),))


def test_errors(monkeypatch):
    logp, ref, old, turn, episode, adv = _inputs((2, 5), 3)

    def call(**over):
        args = dict(logp=logp, ref_logp=ref, turn=turn, episode=episode, advantages=adv,
                    stage=2)
        args.update(over)
        return score_loss(args.pop("logp"), args.pop("ref_logp"), args.pop("turn"),
                          args.pop("episode"), args.pop("advantages"), **args)

    cases = [
        (dict(ref_logp=ref[:, :4]), r"ref_logp shape \(2, 4\).*logp shape \(2, 5\)"),
        (dict(turn=turn.view(10)), r"turn shape \(10,\).*logp shape \(2, 5\)"),
        (dict(episode=episode[:1]), r"episode shape \(1, 5\).*logp shape \(2, 5\)"),
        (dict(old_logp=old.T, clip_eps=0.2), r"old_logp shape \(5, 2\).*logp shape \(2, 5\)"),
        (dict(advantages=torch.zeros(3, 3)), r"advantages must be \[E, 2\].*\(3, 3\)"),
        (dict(advantages=torch.zeros(6)), r"advantages must be \[E, 2\].*\(6,\)"),
        (dict(stage=0), "stage"),
        (dict(kl="k4"), "kind"),
        (dict(reduction="sum"), "reduction"),
        (dict(beta1=-0.1), "beta1 and beta2"),
        (dict(beta2=-1.0), "beta1 and beta2"),
        (dict(old_logp=old), "old_logp needs clip_eps"),
        (dict(kl_ratio=True), "kl_ratio .* needs clip_eps"),
        (dict(old_logp=old, clip_eps=0.0), r"clip_eps must be eps or \(lo, hi\).*got 0.0"),
        (dict(clip_eps=(0.2, -0.1)), r"clip_eps.*got \(0.2, -0.1\)"),
        (dict(clip_eps=(1.0, 0.2)), r"0 < lo < 1.*got \(1.0, 0.2\)"),
        (dict(clip_eps=(0.2,)), r"clip_eps.*got \(0.2,\)"),
        (dict(clip_eps="0.2"), r"clip_eps.*got '0.2'"),
        (dict(logp=turn), "logp must be floating"),
        (dict(turn=turn.float()), "turn must be an integer"),
        (dict(turn=torch.where(turn == 2, 3, turn)), "turn values"),
        (dict(episode=torch.where(turn > 0, 3, episode)), r"episode out of range \[0, 3\)"),
    ]
    for over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(**over)
    call(episode=torch.where(turn > 0, episode, 99))  # turn-0 tokens may carry anything
    monkeypatch.setenv("SCORE_FAST_CHECK_INPUTS", "0")  # value checks skipped: no raise
    call(turn=torch.where(turn == 2, 3, turn))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_matches_reference(monkeypatch, reduction):
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    for stage in (1, 2):
        _check_against_ref((4, 4099), 64, device="cuda", stage=stage, reduction=reduction,
                           clip_eps=0.2)
