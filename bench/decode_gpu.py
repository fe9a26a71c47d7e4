"""Both attempts' decode on a GPU (issue 29): score_fast.sampler (today's path) against
score_fast.slot_engine (static slots, one CUDA graph a step), Qwen2.5-0.5B and -1.5B shapes
with random weights in bf16, batch 64 and 512; tokens/s of each and the engine's fraction
of the memory-bandwidth bound.

    python bench/decode_gpu.py --out bench/results/decode_gpu.md [--quick]

Work: 128-token random prompts, a 16-token instruction, 128 new tokens an attempt
(temperature 1, no eos: a random model rarely samples it, so every row runs the whole
length and both paths do the same work). The bound: a decode step must read the weights
once and each slot's filled KV columns once; bytes of that over the step's measured time
against the device's copy bandwidth (a 2 GiB device-to-device copy timed here, read +
write). The engine's attention reads every column of a slot's capacity (prompt +
instruction + 2 x new + 1), so its own reads are larger than the bound's."""
import argparse
import time

import torch
import transformers

from score_fast.sampler import TwoTurnSampler
from score_fast.slot_engine import SlotEngine

SHAPES = {  # Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960),
}
VOCAB, PROMPT, INSTR = 151936, 128, 16


def model_of(name: str):
    hidden, layers, heads, kv, inter = SHAPES[name]
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv,
                                   intermediate_size=inter, max_position_embeddings=4096,
                                   tie_word_embeddings=name.endswith("0.5b"))
    with torch.device("cuda"):
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize()
    return 5 * 2 * a.numel() * 2 / (time.perf_counter() - t)


def bound_bytes(model, batch: int, new: int) -> float:
    """Bytes a step must read, averaged over the rollout's steps: the weights + each slot's
    filled KV columns (they grow from PROMPT to PROMPT + INSTR + 2 x new)."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    mean_filled = PROMPT + (INSTR + 2 * new) / 2
    return weights + batch * mean_filled * per_token


def run(name: str, batch: int, new: int, bw: float) -> list[str]:
    model = model_of(name)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB - 1000, (batch, PROMPT), generator=g).tolist()
    instr = torch.randint(0, VOCAB - 1000, (batch, INSTR), generator=g).tolist()
    eos = VOCAB - 1  # never drawn in practice: every row runs `new` tokens
    rows = []
    sampler = TwoTurnSampler(model, eos, 0, batch_size=batch)
    kw = dict(max_new_tokens=new, temperature=1.0)
    sampler.episodes(prompts[:2], [(i, i) for i in instr[:2]], **dict(kw, max_new_tokens=2))
    torch.cuda.synchronize()
    t = time.perf_counter()
    a1, a2, _ = sampler.episodes(prompts, [(i, i) for i in instr], **kw)
    torch.cuda.synchronize()
    old_s = time.perf_counter() - t
    tokens = sum(map(len, a1)) + sum(map(len, a2))
    engine = SlotEngine(model, eos, 0, max_slots=batch)
    t = time.perf_counter()
    engine.episodes(prompts, [(i, i) for i in instr], seed=0, **kw)  # compiles, captures
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t
    steps0 = engine.stats["steps"]
    t = time.perf_counter()
    b1, b2, _ = engine.episodes(prompts, [(i, i) for i in instr], seed=1, **kw)
    torch.cuda.synchronize()
    new_s = time.perf_counter() - t
    steps = engine.stats["steps"] - steps0
    e_tokens = sum(map(len, b1)) + sum(map(len, b2))
    step_ms = new_s / steps * 1e3
    frac = bound_bytes(model, batch, new) / (step_ms / 1e3) / bw
    rows.append(f"| {name} | {batch} | {new} | {tokens / old_s:,.0f} | {e_tokens / new_s:,.0f} "
                f"| {(e_tokens / new_s) / (tokens / old_s):.1f}x | {step_ms:.2f} | "
                f"{frac:.0%} | {first_s:.1f} |")
    del engine, sampler, model
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="32 new tokens an attempt")
    args = ap.parse_args()
    new = 32 if args.quick else 128
    bw = copy_bandwidth()
    lines = [f"Device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s; "
             f"torch {torch.__version__}, transformers {transformers.__version__}.",
             "", "| shape | batch | new/attempt | sampler tok/s | slots tok/s | speed-up | "
             "slots step ms | of the bound | slots first call s (capture) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in SHAPES:
        for batch in (64, 512):
            lines += run(name, batch, new, bw)
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
