"""The SCoRe loss from hidden states + LM head, forward and backward, side by side in one run.

    bash bench/run.sh bench/bench_lmhead.py           # CPU here, CUDA where there is one

Providers:
  score_fast  linear_score_loss with its default path: on CUDA the row sweep (chunks of
              2048 rows through the whole vocabulary: 3 cuBLAS GEMMs + Triton row kernels,
              dlogits written over the logits), on CPU the tiled PyTorch path; never holds
              the [N, V] logits.
  eager       what an RL trainer writes: logits = hidden @ W.T, fp32 log_softmax, gather,
              then the SCoRe loss (score_loss_ref's vectorised token_mean path); autograd.
  compile     torch.compile of the same eager function (not in QUICK mode: minutes of
              warm-up on this CPU).
  liger       Liger-Kernel's LigerFusedLinearGRPOLoss (chunked over sequences, its own
              GRPO/DAPO loss: the same matmuls and log-softmax work, a comparable but not
              identical loss) where liger-kernel is importable; compiled=False on CPU.
  matmul      (CUDA only) one [N, H] x [H, V] torch matmul: the rate `tflops` is read
              against (the fraction of matmul rate is tflops / matmul's tflops).

FLOPs are counted the same for every provider: 3 matmul passes of 2 N H V (forward
logits, dhidden, dweight) = 6 N H V -- the useful work, not what each provider executes
(score_fast's CUDA row sweep runs exactly these 3; the CPU path keeps the tile when
V <= 32768: 3 passes, else recomputes it: 4). matmul counts its one pass, 2 N H V.
All N tokens are loss tokens (turn 1 or 2), so row selection gives score_fast no edge.
Peak memory is what one forward + backward allocates above what was live (harness.run).
"""
import pytest
import torch

from harness import QUICK, bench_device, run
from score_fast.kernels.linear_score_loss import linear_score_loss
from score_fast.kernels.score_loss import score_loss_ref

DEVICE = bench_device()
if QUICK:
    SHAPES = [(64, 32, 1000, torch.float32)]
elif DEVICE == "cuda":  # the H200 run's shape, and Qwen2.5-1.5B's head
    SHAPES = [(8192, 4096, 151936, torch.bfloat16), (8192, 1536, 151936, torch.bfloat16)]
else:
    SHAPES = [(4096, 1024, 32000, torch.float32)]
PROVIDERS = ["score_fast", "eager", "compile", "liger", "matmul"]
EPISODES = 16


def _inputs(n, h, v, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, h, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=DEVICE, generator=g) * (3 / h**0.5)).to(
        dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    # two turns per episode: the first half of each episode's tokens turn 1, then turn 2
    per = n // EPISODES
    episode = torch.arange(n, device=DEVICE) // per
    turn = 1 + (torch.arange(n, device=DEVICE) % per >= per // 2).long()
    ref = -torch.rand(n, device=DEVICE, generator=g) * 5
    adv = torch.randn(EPISODES, 2, device=DEVICE, generator=g)
    return hidden, weight, targets, ref, turn, episode, adv


def _eager(hidden, weight, targets, ref, turn, episode, adv):
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return score_loss_ref(logp, ref, turn, episode, adv, stage=2)[0]


def _fused(hidden, weight, targets, ref, turn, episode, adv):
    return linear_score_loss(hidden, weight, targets, ref, turn, episode, adv, stage=2)[0]


_compiled = None


def _liger_fn():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        pytest.skip("liger-kernel is not installed")
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.01, compiled=DEVICE == "cuda", use_ref_model=True)

    def fn(hidden, weight, targets, ref, turn, episode, adv):
        # Liger wants [B, T, H] sequences with one advantage each: one episode a sequence
        B = EPISODES
        out = loss_fn(hidden.view(B, -1, hidden.shape[-1]), weight, targets.view(B, -1),
                      torch.ones_like(targets).view(B, -1), adv[:, 1].contiguous(),
                      ref_per_token_logps=ref.view(B, -1))
        return out[0] if isinstance(out, tuple) else out
    return fn


def _provider_fn(provider):
    global _compiled
    if provider == "score_fast":
        return _fused
    if provider == "eager":
        return _eager
    if provider == "compile":
        if QUICK:
            pytest.skip("torch.compile takes minutes to warm up on this CPU; not in the smoke run")
        _compiled = _compiled or torch.compile(_eager, dynamic=False)
        return _compiled
    if provider == "liger":
        return _liger_fn()
    raise ValueError(provider)


def _shape_id(s):
    return f"N={s[0]},H={s[1]},V={s[2]}"


@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lmhead_score_loss(benchmark, provider, shape):
    n, h, v, dtype = shape
    args = _inputs(n, h, v, dtype)
    hidden, weight = args[0], args[1]
    if provider == "matmul":
        if DEVICE != "cuda":
            pytest.skip("the matmul-rate reference is for the GPU report")
        x, w = hidden.detach(), weight.detach()
        fn = lambda: x @ w.T  # noqa: E731
        flops = 2 * n * h * v
    else:
        op = _provider_fn(provider)

        def fn():
            hidden.grad = weight.grad = None
            op(*args).backward()
        flops = 6 * n * h * v
    run(benchmark, fn, device=DEVICE, provider=provider, shape=f"{_shape_id(shape)},fwd_bwd",
        dtype=str(dtype).removeprefix("torch."), baseline="eager", flops=flops,
        rounds=3 if DEVICE == "cpu" else 10, warmup=1 if DEVICE == "cpu" else 3)
