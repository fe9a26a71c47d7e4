"""Rollout benchmark: the KV-cache engine (score_fast.sampler.TwoTurnSampler) against
`model.generate` run once per attempt (score_fast.rollout.generate, the old path: attempt 2
re-prefills prompt + attempt 1) and, where vLLM is installed, rollout.backend=vllm
(score_fast.vllm_engine) with its prefix cache on (vllm) and off (vllm_nocache); same tiny
model, prompts, instruction and lengths.

    SCORE_FAST_BENCH_QUICK=1 OUT=/tmp/ro bash bench/run.sh bench/bench_rollout.py

A random tiny Llama (hidden 64, 2 heads of 32: vLLM's CPU attention takes no smaller head,
2 layers, vocab 48; SCORE_FAST_BENCH_ROLLOUT_SIZE=5m: hidden 256, 8 layers), sampled at
temperature 1.0 from torch's global RNG seeded 0 before each call: with near-uniform logits
the eos (1 of 48 ids) ends about 2% of rows per step, so attempts end at mixed lengths.
64 episodes of 8..48-token prompts, a 12-token instruction, up to 64 new tokens per attempt
(QUICK: 8 episodes, 8).
torch runs on 1 thread here (restored afterwards): for a model this small thread
contention on a shared 2-core machine, not compute, would otherwise decide the numbers.

attempt1: sample attempt 1.  attempt2: sample attempt 2 for fixed attempt-1 outputs (the
engine from attempt 1's saved cache, generate from the full context).  both: the whole
two-attempt rollout.  extra: tokens = tokens generated, tok_s = tokens / median seconds,
prefill_tokens / prefill_slots = real / padded tokens in prefill forwards,
decode_tokens = tokens run through decode forwards (generate keeps finished rows: batch x
steps), forwards, tok_per_decode_fwd = decode_tokens / decode forwards.
ops_per_fwd / reads_per_fwd (not for vLLM or compiled steps, whose ops do not pass through
torch's dispatcher one by one): aten ops dispatched, and reads of tensor values into Python
(item, tolist, bool, int, nonzero: each one a host sync where the tensor is on a GPU;
SlotEngine's reads are of its host copy of the phases, one copy every check_every steps),
in one call of the case, per forward.
vLLM rows: engine seeded once (per-request seeds stop its CPU engine), so each round samples
other tokens; tokens and tok_s are of the first call. cached_tokens: prompt tokens its
prefix cache served (reset before every call); startup_s and sync_s (one push of the
weights, score_fast.models.policy_weights) are per engine. Not in attempt2: vLLM's cache
holds what vLLM computed, not the fixed attempt-1 outputs that row starts from."""
import os

import pytest
import torch
import transformers

from harness import QUICK, bench_device, run
from score_fast.rollout import generate
from score_fast.sampler import TwoTurnSampler

DEVICE = bench_device()
# SCORE_FAST_BENCH_ROLLOUT_EPISODES / _NEW / _ROUNDS: another shape (the vLLM issue measured
# 256 episodes x 128 new tokens) and fewer timed rounds for it
EPISODES = int(os.environ.get("SCORE_FAST_BENCH_ROLLOUT_EPISODES", 8 if QUICK else 64))
NEW = int(os.environ.get("SCORE_FAST_BENCH_ROLLOUT_NEW", 8 if QUICK else 64))
ROUNDS = int(os.environ.get("SCORE_FAST_BENCH_ROLLOUT_ROUNDS", 3 if QUICK else 5))
VOCAB, EOS, PAD, INSTR = 48, 1, 0, 12
SHAPE = f"B={EPISODES},new={NEW}"
PROVIDERS = ["engine", "slots", "slots_compiled", "generate", "vllm", "vllm_nocache"]
# SCORE_FAST_BENCH_ROLLOUT_SIZE: tiny (hidden 64, 2 layers, 88k parameters: per-step overheads
# decide) or 5m (hidden 256, 8 layers, 5.3M parameters, the size vLLM was first measured at)
# or deep (hidden 64, 24 layers: a CPU stand-in for a launch-bound GPU, where per-step
# overhead decides)
SIZES = {"tiny": (64, 2), "5m": (256, 8), "deep": (64, 24)}
SIZE = os.environ.get("SCORE_FAST_BENCH_ROLLOUT_SIZE", "tiny")
SHAPE += f",model={SIZE}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden, layers = SIZES[SIZE]
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 32,
                                   num_key_value_heads=hidden // 32, max_position_embeddings=512,
                                   bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
    model = transformers.LlamaForCausalLM(cfg).eval().to(DEVICE)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 49, (EPISODES,), generator=g).tolist()
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lens]
    instr = [torch.randint(2, VOCAB, (INSTR,), generator=g).tolist() for _ in lens]
    torch.manual_seed(0)
    a1, state = TwoTurnSampler(model, EOS, PAD, batch_size=EPISODES).attempt1(
        prompts, max_new_tokens=NEW, temperature=1.0)
    yield model, prompts, instr, a1, state, tmp_path_factory.mktemp("rollout")
    torch.set_num_threads(threads)
    _ENGINES.clear()


_ENGINES: dict = {}
_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero")


def _dispatch_counts(fn):
    """(result of fn(), aten ops dispatched, Python reads of tensor values) in one call."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    class Reads(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in _READS:
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    with Reads(), Ops():
        out = fn()
    return out, Ops.n, Reads.n


def _engine(provider, model, tmp):
    """One vLLM engine per provider for the module (start-up is seconds), fed the model."""
    if provider not in _ENGINES:
        pytest.importorskip("vllm")
        from score_fast import models
        from score_fast.config import VLLMConfig
        from score_fast.vllm_engine import VLLMEngine
        path = str(tmp / "model")
        if not (tmp / "model").exists():
            model.save_pretrained(path)
        # 32-token blocks: 8..48-token prompts and <= 64-token attempts fill a few each
        e = VLLMEngine(path, dtype=torch.float32, seed=0, config=VLLMConfig(
            block_size=32, prefix_caching=provider == "vllm"))
        e.sync_s_once = e.sync(models.policy_weights(model, torch.float32))
        _ENGINES[provider] = e
    return _ENGINES[provider]


def _generate(model, contexts):
    return generate(model, contexts, max_new_tokens=NEW, temperature=1.0, greedy=False,
                    eos=EOS, pad=PAD, batch_size=EPISODES)


def _generate_counts(contexts, outs) -> dict:
    """What HF generate runs: one padded prefill, then every row until the longest ends."""
    steps = max(len(o) for o in outs)
    return dict(prefill_tokens=sum(map(len, contexts)),
                prefill_slots=len(contexts) * max(map(len, contexts)),
                decode_tokens=len(contexts) * (steps - 1), forwards=steps,
                tok_per_decode_fwd=round(len(contexts) * (steps - 1) / max(steps - 1, 1), 2))


def _engine_counts(sampler) -> dict:
    s = sampler.stats.summary()
    return dict(prefill_tokens=s["prefill_tokens"], prefill_slots=s["prefill_slots"],
                decode_tokens=s["decode_tokens"], forwards=s["forwards"],
                tok_per_decode_fwd=round(s["decode_tokens"] / max(s["decode_forwards"], 1), 2))


def _case(which, provider, model, prompts, instr, a1, state, tmp):
    """(fn, outputs-and-counts of one call)"""
    if provider.startswith("vllm"):
        if which == "attempt2":
            pytest.skip("vLLM's prefix cache holds what vLLM sampled, not fixed attempts")
        e = _engine(provider, model, tmp)

        def fn():
            e.llm.reset_prefix_cache()
            before = dict(e.stats)
            kw = dict(max_new_tokens=NEW, temperature=1.0, greedy=False, eos=EOS)
            out = e.generate(prompts, **kw)
            if which == "both":
                out = out + e.generate([p + a + x for p, a, x in zip(prompts, out, instr)],
                                       **kw)
            st = {k: e.stats[k] - before[k] for k in ("prompt_tokens", "cached_tokens")}
            return out, dict(prefill_tokens=st["prompt_tokens"] - st["cached_tokens"],
                             cached_tokens=st["cached_tokens"],
                             startup_s=round(e.startup_s, 2),
                             sync_s=round(e.sync_s_once, 4))
        return fn
    if provider.startswith("slots"):
        if which == "attempt2":
            pytest.skip("SlotEngine runs attempt 2 in attempt 1's slot: no fixed attempt 1")
        from score_fast.slot_engine import SlotEngine
        key = (provider, id(model))
        if key not in _ENGINES:  # one per module: its pool and compiled steps are reused
            _ENGINES[key] = SlotEngine(model, EOS, PAD, max_slots=EPISODES,
                                       compile=provider == "slots_compiled")
        e = _ENGINES[key]
        pairs = [(x, x) for x in instr]

        def fn():
            before = dict(e.stats)
            a1s, a2s, info = e.episodes(prompts, pairs, max_new_tokens=NEW, temperature=1.0,
                                        attempts=1 if which == "attempt1" else 2, seed=0)
            steps = e.stats["steps"] - before["steps"]
            return a1s + (a2s if which == "both" else []), dict(
                prefill_tokens=info["prefill_tokens"], decode_tokens=info["decode_tokens"],
                forwards=steps, decode_slots=e.stats["slot_steps"] - before["slot_steps"],
                tok_per_decode_fwd=round(info["decode_tokens"] / max(steps, 1), 2))
        return fn
    if provider == "engine":
        def fn():
            torch.manual_seed(0)
            s = TwoTurnSampler(model, EOS, PAD, batch_size=EPISODES)
            if which == "attempt1":
                out, _ = s.attempt1(prompts, max_new_tokens=NEW, temperature=1.0)
            elif which == "attempt2":
                out = s.attempt2(state, instr, max_new_tokens=NEW, temperature=1.0)
            else:
                b1, st = s.attempt1(prompts, max_new_tokens=NEW, temperature=1.0)
                out = b1 + s.attempt2(st, instr, max_new_tokens=NEW, temperature=1.0)
            return out, _engine_counts(s)
    else:
        def fn():
            torch.manual_seed(0)
            if which == "attempt1":
                out = _generate(model, prompts)
                return out, _generate_counts(prompts, out)
            if which == "attempt2":
                ctx = [p + a + x for p, a, x in zip(prompts, a1, instr)]
                out = _generate(model, ctx)
                return out, _generate_counts(ctx, out)
            b1 = _generate(model, prompts)
            ctx = [p + a + x for p, a, x in zip(prompts, b1, instr)]
            b2 = _generate(model, ctx)
            c1, c2 = _generate_counts(prompts, b1), _generate_counts(ctx, b2)
            counts = {k: c1[k] + c2[k] for k in c1}
            counts["tok_per_decode_fwd"] = round(
                counts["decode_tokens"] / max(counts["forwards"] - 2, 1), 2)
            return b1 + b2, counts
    return fn


@pytest.mark.parametrize("which", ["attempt1", "attempt2", "both"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rollout(benchmark, setup, provider, which):
    fn = _case(which, provider, *setup)
    out, counts = fn()
    if not provider.startswith("vllm") and provider != "slots_compiled":
        (_, again), ops, reads = _dispatch_counts(fn)
        fwd = max(again["forwards"], 1)
        counts.update(ops_per_fwd=round(ops / fwd), reads_per_fwd=round(reads / fwd, 2))
    tokens = sum(map(len, out))
    run(benchmark, fn, device=DEVICE, provider=provider, shape=f"{which},{SHAPE}",
        dtype="float32", baseline="generate", rounds=ROUNDS, warmup=0,
        tokens=tokens,
        **counts)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        benchmark.extra_info["tok_s"] = round(tokens / stats.median, 1)
