"""One SCoRe training step (policy forward + backward, reference forward, loss) over the same
model and the same rollouts, two ways:

  packed_fused  the trainer's own path (Trainer.loss_and_backward): episodes packed into
                token-budget micro-batches, hidden states -> linear_logprobs (reference) and
                linear_score_loss (policy): no [N, V] logits
  packed_dense  the same, but with transformers' own sdpa packing (a dense [T, T]
                block-diagonal mask; what score_fast.attention replaces)
  packed_fused_checkpointed  packed_fused with gradient checkpointing forced on (the
                trainer's memory model leaves it off where the step fits: this is its cost)
  padded_torch  batches padded to their longest episode under the same token budget, full
                logits, log_softmax + gather, score_loss_ref (plain PyTorch)

    bash bench/run.sh bench/bench_step.py

Metric: real (unpadded) episode tokens per second, in extra_info as tokens_per_s =
tokens / median (tokens: the real tokens of the step's episodes, the same every call). Episode
lengths are uniform in [lo, hi] (a prompt, two attempts and an instruction). CPU: the demo's
tiny Llama (fp32). CUDA: a random Qwen2-0.5B-shaped model (Qwen2Config) in bf16."""
import types

import pytest
import torch
import transformers

from harness import QUICK, bench_device, run
from score_fast.attention import use_varlen_attention
from score_fast.config import Config
from score_fast.kernels.score_loss import score_loss_ref
from score_fast.rollout import Episode
from score_fast.distributed import Dist
from score_fast.models import prepare_model
from score_fast.objective import Objective
from score_fast.trainer import PhaseTimer, Trainer

DEVICE = bench_device()
if DEVICE == "cuda":
    MODEL = transformers.Qwen2Config(  # Qwen2-0.5B's shape, random weights
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False)
    EPISODES, LENGTHS, BUDGET = (8, (64, 256), 1024) if QUICK else (32, (256, 2048), 16384)
else:
    from score_fast.demo import task as demo_task
    MODEL = demo_task.tiny_model_config(demo_task.build_tokenizer(), max_positions=1024)
    EPISODES, LENGTHS, BUDGET = (8, (16, 48), 256) if QUICK else (32, (64, 512), 4096)


def _episodes(vocab: int) -> tuple[list[Episode], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    eps = []
    for i in range(EPISODES):
        n = int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (1,), generator=g))
        q = n // 4  # prompt, attempt 1, instruction, attempt 2: a quarter each
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        eps.append(Episode(i // 4, ids[:q], ids[q:2 * q], ids[2 * q:3 * q], ids[3 * q:]))
    adv = torch.randn(EPISODES, 2, generator=g)
    return eps, adv


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    # CUDA: both paths run a bf16 model (the trainer's compute dtype; its fp32 masters live
    # in the optimizer step, which neither path times)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    policy = transformers.AutoModelForCausalLM.from_config(MODEL, dtype=dtype).to(DEVICE)
    ref = transformers.AutoModelForCausalLM.from_config(MODEL, dtype=dtype).to(DEVICE)
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    config = Config()
    config.train.max_tokens = BUDGET
    trainer = Trainer.__new__(Trainer)  # the trainer's step without its data and reward
    dist = Dist(device=torch.device(DEVICE))
    for m in (policy, ref):
        prepare_model(m, dist)
    trainer.config, trainer.policy, trainer.ref, trainer.dist = config, policy, ref, dist
    trainer.scaler = None
    trainer.timer = PhaseTimer(dist.device)
    trainer.device, trainer.tokenizer, trainer.step = dist.device, None, 0
    eps, adv = _episodes(MODEL.vocab_size)
    return types.SimpleNamespace(trainer=trainer, policy=policy, ref=ref, eps=eps, adv=adv)


def _padded_step(s):
    """Padded batches under the same budget, plain PyTorch losses, same objective."""
    eps = s.eps
    batches, cur = [], []
    for i, e in enumerate(eps):
        if cur and (len(cur) + 1) * max(len(eps[j].ids) for j in cur + [i]) > BUDGET:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    n_live = sum(len(e.attempt1_ids) + len(e.attempt2_ids) for e in eps)
    s.policy.zero_grad(set_to_none=True)
    for idx in batches:
        width = max(len(eps[j].ids) for j in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        turn = torch.zeros(len(idx), width, dtype=torch.long)
        for r, j in enumerate(idx):
            n = len(eps[j].ids)
            ids[r, :n] = torch.tensor(eps[j].ids)
            mask[r, :n] = 1
            turn[r, :n - 1] = torch.tensor(eps[j].labels[1:])
        ids, mask, turn = ids.to(DEVICE), mask.to(DEVICE), turn.to(DEVICE)
        targets = torch.roll(ids, -1, 1)
        episode = torch.tensor(idx, device=DEVICE)[:, None].expand_as(ids)
        with torch.no_grad():
            ref_logits = s.ref(input_ids=ids, attention_mask=mask).logits.float()
        ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None])[..., 0]
        del ref_logits
        logits = s.policy(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        loss, _ = score_loss_ref(logp.flatten(), ref_logp.flatten(), turn.flatten(),
                                 episode.flatten(), s.adv.to(DEVICE), stage=2)
        u = int((turn > 0).sum())
        (loss * (u / n_live)).backward()


@pytest.mark.parametrize("provider", ["packed_fused", "packed_fused_checkpointed",
                                      "packed_dense", "padded_torch"])
def test_step(benchmark, provider, setup):
    s = setup
    gc = provider.endswith("checkpointed")
    kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if gc:
        s.policy.gradient_checkpointing_enable(**kw)
    else:
        s.policy.gradient_checkpointing_disable()
    for m in (s.policy, s.ref):  # the trainer's attention, or transformers' dense packing
        if provider == "packed_dense" or not use_varlen_attention(m):
            m.set_attn_implementation("sdpa")
    every = torch.ones(len(s.eps), 2, dtype=torch.bool)  # both attempts trained: Stage II
    if provider.startswith("packed"):
        def fn():
            s.policy.zero_grad(set_to_none=True)
            s.trainer.loss_and_backward(s.eps, Objective(s.adv, every, 2, 0.01, 0.1))
    else:
        def fn():
            _padded_step(s)
    tokens = sum(len(e.ids) for e in s.eps)  # the same real tokens in every call
    run(benchmark, fn, device=DEVICE, provider=provider, baseline="padded_torch",
        shape=f"E={EPISODES} len={LENGTHS[0]}..{LENGTHS[1]} budget={BUDGET} "
              f"H={MODEL.hidden_size} V={MODEL.vocab_size}",
        dtype="bf16" if DEVICE == "cuda" else "fp32",
        # 3 on a GPU: with 5, packed_fused and packed_dense alone took the 90 s gpu_check
        # gave the file on an H200 (the dense [T, T] mask at a 16k budget is the slow one)
        rounds=2 if QUICK else (3 if DEVICE == "cuda" else 5), tokens=tokens)
    # Throughput from the timed median (not from a separate untimed call), so it agrees
    # with median_ms and ratio: tokens_per_s = tokens / median. The JSON is written at the
    # end of the session, so extra_info set here still reaches bench/report.py.
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = round(tokens / stats.median)
    if gc:
        s.policy.gradient_checkpointing_disable()
