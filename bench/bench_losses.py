"""The logit-space SCoRe losses against their alternatives, side by side in one run.

    bash bench/run.sh bench/bench_losses.py           # CPU here, CUDA where there is one

Providers: score_fast (Triton on CUDA, the chunked PyTorch path on CPU), eager PyTorch as
RL trainers write it (upcast, log_softmax, gather), torch.compile of the same eager code,
Liger-Kernel's cross-entropy (= -log-prob per token) where it is installed and a GPU is
present, and `copy`: one read + one write of the logits, the memory-bandwidth ceiling the
GB/s column is read against (`bw_vs_copy` in the table).
Bytes counted are the fewest a fused kernel must move: forward reads the logits once;
forward + backward reads them twice and writes dlogits once.
"""
import pytest
import torch

import score_fast
from harness import QUICK, bench_device, run
from score_fast.kernels.score_advantages import score_advantages_ref
from score_fast.kernels.score_loss import score_loss_ref

DEVICE = bench_device()
if QUICK:
    SHAPES = [(16, 1000, torch.float32), (16, 1000, torch.bfloat16)]
elif DEVICE == "cuda":
    SHAPES = [(8192, 151936, torch.bfloat16), (8192, 32000, torch.bfloat16),
              (4096, 151936, torch.float32)]
else:  # 2-core CPU: ~0.3 GB of bf16 logits keeps each provider under a second a call
    SHAPES = [(1024, 151936, torch.bfloat16), (4096, 32000, torch.float32)]
PROVIDERS = ["score_fast", "eager", "compile", "liger", "copy"]


def _skip_compile(shape):
    if QUICK:
        pytest.skip("torch.compile warm-up is minutes on this CPU; not in the smoke run")
    if shape != SHAPES[0]:
        # each new shape recompiles (forward and backward graphs): ~30 s each, and
        # gpu_check.sh has 8 minutes for everything
        pytest.skip("torch.compile runs at the headline shape only")


def _eager_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


_compiled_logprobs = None


def _provider_fn(provider, shape):
    global _compiled_logprobs
    if provider == "score_fast":
        return score_fast.token_logprobs
    if provider == "eager":
        return _eager_logprobs
    if provider == "compile":
        _skip_compile(shape)
        _compiled_logprobs = _compiled_logprobs or torch.compile(_eager_logprobs, dynamic=False)
        return _compiled_logprobs
    if provider == "liger":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except ImportError:
            pytest.skip("liger-kernel is not installed")
        if DEVICE != "cuda":
            pytest.skip("liger-kernel's cross entropy is a CUDA Triton kernel")
        return lambda x, t: -liger_cross_entropy(x, t, reduction="none")
    raise ValueError(provider)


def _inputs(n, v, dtype, requires_grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(n, v, device=DEVICE, dtype=dtype, generator=g) * 4
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    return logits.requires_grad_(requires_grad), targets


def _shape_id(s):
    return f"N={s[0]},V={s[1]}"


def _run_logit_op(benchmark, provider, shape, mode, logits, op, args):
    """Time op(*args) (fwd) or op(*args).backward(g) (fwd_bwd); provider `copy` times one
    copy of the logits instead. The forward reads the logits; the backward reads them again
    and writes dlogits."""
    n, v, dtype = shape
    size = n * v * logits.element_size()
    if provider == "copy":
        dst = torch.empty_like(logits)
        fn = lambda: dst.copy_(logits.detach())  # noqa: E731
        nbytes = 2 * size
    elif mode == "fwd":
        fn = lambda: op(*args)  # noqa: E731
        nbytes = size
    else:
        grad = torch.randn(n, device=DEVICE)

        def fn():
            logits.grad = None
            op(*args).float().backward(grad)
        nbytes = 3 * size
    run(benchmark, fn, device=DEVICE, provider=provider, shape=f"{_shape_id(shape)},{mode}",
        dtype=str(dtype).removeprefix("torch."), baseline="eager", bytes_moved=nbytes,
        rounds=3 if DEVICE == "cpu" else 20, warmup=1 if DEVICE == "cpu" else 5)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_token_logprobs(benchmark, provider, shape, mode):
    logits, targets = _inputs(*shape, requires_grad=mode == "fwd_bwd")
    op = None if provider == "copy" else _provider_fn(provider, shape)
    _run_logit_op(benchmark, provider, shape, mode, logits, op, (logits, targets))


# ---------------------------------------------------------------- score_loss (per token)

LOSS_TOKENS = [4096] if QUICK else ([1 << 20, 1 << 23] if DEVICE == "cuda" else [1 << 20])
_compiled_loss = None


def _loss_inputs(n, episodes=512):
    """A packed batch of two-turn episodes: turn labels in runs, 1/4 of tokens are turn 0."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logp = (-torch.rand(n, device=DEVICE, generator=g) * 5).requires_grad_(True)
    ref = logp.detach() + 0.1 * torch.randn(n, device=DEVICE, generator=g)
    turn = (torch.arange(n, device=DEVICE) // 64) % 4  # prompt, attempt 1, instr., attempt 2
    turn = torch.where(turn == 3, 2, torch.where(turn == 2, 0, turn))
    episode = (torch.arange(n, device=DEVICE) * episodes // n)
    adv = torch.randn(episodes, 2, device=DEVICE, generator=g)
    return logp, ref, turn, episode, adv


@pytest.mark.parametrize("n", LOSS_TOKENS)
@pytest.mark.parametrize("provider", ["score_fast", "eager", "compile"])
def test_score_loss(benchmark, provider, n):
    global _compiled_loss
    logp, ref, turn, episode, adv = _loss_inputs(n)
    if provider == "score_fast":
        op = score_fast.score_loss
    elif provider == "eager":
        op = score_loss_ref
    else:
        if QUICK:
            pytest.skip("torch.compile warm-up is minutes on this CPU; not in the smoke run")
        _compiled_loss = _compiled_loss or torch.compile(score_loss_ref, dynamic=False)
        op = _compiled_loss

    def fn():
        logp.grad = None
        loss, _ = op(logp, ref, turn, episode, adv, stage=2)
        loss.backward()

    # fewest bytes: logp, ref (fp32), turn, episode (int64) read; dlogp written
    run(benchmark, fn, device=DEVICE, provider=provider, shape=f"tokens={n},fwd_bwd",
        dtype="float32", baseline="eager", bytes_moved=n * (4 + 4 + 8 + 8 + 4),
        rounds=5 if DEVICE == "cpu" else 20, warmup=1 if DEVICE == "cpu" else 5)


# ------------------------------------------------------------ score_advantages (episodes)
def _grouped_view(r1, r2, group, samples):
    """What trainers write when groups are contiguous and equal-sized: a reshape."""
    R = torch.stack([r1, r2 + 10.0 * (r2 - r1)], 1).view(-1, samples, 2)
    return ((R * samples - R.sum(1, keepdim=True)) / (samples - 1)).view(-1, 2)


@pytest.mark.parametrize("episodes", [64] if QUICK else [512, 65536])
@pytest.mark.parametrize("provider", ["score_fast", "loop", "grouped_view"])
def test_score_advantages(benchmark, provider, episodes):
    samples = 4
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r1 = torch.randint(0, 2, (episodes,), device=DEVICE, generator=g).float()
    r2 = torch.randint(0, 2, (episodes,), device=DEVICE, generator=g).float()
    group = torch.arange(episodes, device=DEVICE) // samples
    if provider == "loop" and episodes > 4096 and not QUICK:
        pytest.skip("a Python loop over 16k groups: minutes, and the point is made at 512")
    fn = {"score_fast": lambda: score_fast.score_advantages(r1, r2, group, stage=2),
          "loop": lambda: score_advantages_ref(r1, r2, group, stage=2),
          "grouped_view": lambda: _grouped_view(r1, r2, group, samples)}[provider]
    run(benchmark, fn, device=DEVICE, provider=provider, shape=f"E={episodes},G={samples}",
        dtype="float32", baseline="loop" if episodes <= 4096 else "grouped_view",
        rounds=5 if DEVICE == "cpu" else 20)
