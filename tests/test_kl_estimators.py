"""train.kl does what its name says: on an exact 6-way categorical, the expected gradient
of the loss's KL term, E_{y ~ pi}[grad of the term at y], computed through score_loss
itself (both backends), equals the gradient of the KL the option names, and not the
other direction. The estimators the trainer refuses are shown to deserve it."""
import pytest
import torch

from score_fast.config import KL_ESTIMATORS, TrainConfig, check_kl
from score_fast.kernels.score_loss import score_loss

CLAIMS = {"k2": "forward", "k3_reverse": "reverse"}  # KL(pi || ref), KL(ref || pi)


def _expected_kl_grad(kind: str, theta, theta_ref):
    """sum_y pi(y) d/dtheta [KL term of score_loss at token y]: one loss token per y, stage
    1 attempt 1 (no policy gradient, beta2 = 1)."""
    p = torch.softmax(theta, 0).detach()
    log_q = torch.log_softmax(theta_ref, 0)
    grad = torch.zeros_like(theta)
    for y in range(len(theta)):
        th = theta.detach().clone().requires_grad_()
        logp = torch.log_softmax(th, 0)[y]
        turn, episode = torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
        loss, _ = score_loss(logp.view(1, 1), log_q[y].view(1, 1), turn, episode,
                             torch.zeros(1, 2), stage=1, beta1=0.0, beta2=1.0, kl=kind)
        loss.backward()
        grad += p[y] * th.grad
    return grad


def _true_grad(direction: str, theta, theta_ref):
    th = theta.detach().clone().requires_grad_()
    lp, lq = torch.log_softmax(th, 0), torch.log_softmax(theta_ref, 0)
    kl = ((lp.exp() * (lp - lq)).sum() if direction == "forward"
          else (lq.exp() * (lq - lp)).sum())
    kl.backward()
    return th.grad


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("option", sorted(KL_ESTIMATORS))
def test_option_has_the_gradient_of_the_kl_it_names(option, seed, backend):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=torch.float64) * 1.5
    theta_ref = torch.randn(6, generator=g, dtype=torch.float64)
    got = _expected_kl_grad(check_kl(option), theta, theta_ref)
    want = _true_grad(CLAIMS[option], theta, theta_ref)
    other = _true_grad({"forward": "reverse", "reverse": "forward"}[CLAIMS[option]], theta,
                       theta_ref)
    # the loss runs in fp32: 1e-5 of the gradient's scale (here ~0.1-1)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert (got - other).abs().max() > 100 * (got - want).abs().max() + 1e-3  # it can tell


def test_the_refused_estimators_deserve_it(backend):
    """k1's expected gradient is 0 (no anchor); k3's is the reverse KL's."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(6, generator=g, dtype=torch.float64) * 1.5
    theta_ref = torch.randn(6, generator=g, dtype=torch.float64)
    assert _expected_kl_grad("k1", theta, theta_ref).abs().max() < 1e-6
    assert _true_grad("forward", theta, theta_ref).abs().max() > 0.1
    torch.testing.assert_close(_expected_kl_grad("k3", theta, theta_ref),
                               _true_grad("reverse", theta, theta_ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kl, match", [
    ("k1", "expected gradient of 0"), ("k3", "reverse of the paper's KL"),
    ("kl", "must be one of")])
def test_refused_with_a_reason(kl, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(kl=kl)


def test_default_is_the_papers_direction():
    assert CLAIMS[TrainConfig().kl] == "forward"
