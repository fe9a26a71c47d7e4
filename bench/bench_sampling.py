"""Sampling a token per row over the vocabulary: the [B, V] logits + softmax +
torch.multinomial (the decode step's old path) against linear_sample (Gumbel-max over
vocabulary tiles fused with the LM-head matmul), and the rollout sampler's decode
throughput with each, next to HF generate at equal work. A script, not a pytest-benchmark
file: it prints markdown tables.

    python bench/bench_sampling.py                         # CPU, 1 thread
    python bench/bench_sampling.py --out bench/results/bench_sampling_cpu.md
    python bench/bench_sampling.py --quick                 # smoke shapes

Op table, per (B, V, H), fp32, random inputs with logits of std ~3: matmul = hidden @
weight.T alone (the LM head), multinomial = matmul + softmax + torch.multinomial, fused =
linear_sample; median ms of --reps calls; "sampling" = the time beyond the matmul.
Sampler table: a random Llama (hidden 256, 4 layers, 8 heads, intermediate 512, vocab
32000), B prompts of 8..48 tokens, --new new tokens, no eos so every row generates them all
(equal work), temperature 1, top_p 1: TwoTurnSampler.attempt1 (one batch of B) with
SCORE_FAST_FUSED_SAMPLING=0 (softmax + multinomial) and =1 (fused), and model.generate(
do_sample=True, top_k=0) on the left-padded prompts; tok/s = B * new / seconds, prefill
included, median of --rounds. torch runs on --threads threads (default 1: this machine's 2
cores are shared, and a second thread mostly measures the neighbours).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name  # noqa: E402
from score_fast.kernels.linear_sample import linear_sample, linear_sample_ref  # noqa: E402


def _median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def op_table(shapes, reps):
    rows = ["| B | V | H | matmul ms | multinomial ms | fused ms | sampling ms: multinomial "
            "| sampling ms: fused | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for B, V, H in shapes:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(B, H, generator=g)
        w = torch.randn(V, H, generator=g) * (3 / H**0.5)
        mm = _median_ms(lambda: h @ w.T, reps)
        multi = _median_ms(lambda: linear_sample_ref(h, w, generator=g), reps)
        fused = _median_ms(lambda: linear_sample(h, w, generator=g), reps)
        rows.append(f"| {B} | {V} | {H} | {mm:.1f} | {multi:.1f} | {fused:.1f} | "
                    f"{multi - mm:.1f} | {fused - mm:.1f} | {multi / fused:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def _model(vocab):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=8, max_position_embeddings=512,
                                   bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def sampler_table(batches, new, rounds, vocab):
    from score_fast.sampler import TwoTurnSampler
    model = _model(vocab)
    rows = ["| B | new | provider | s | tok/s | vs generate |", "|---|---|---|---|---|---|"]
    for B in batches:
        g = torch.Generator().manual_seed(0)
        lens = torch.randint(8, 49, (B,), generator=g).tolist()
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
        width = max(lens)
        ids = torch.zeros(B, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        def generate():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                               min_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0,
                               top_k=0, pad_token_id=0)

        def engine(fused):
            os.environ["SCORE_FAST_FUSED_SAMPLING"] = fused
            s = TwoTurnSampler(model, None, 0, batch_size=B)
            return lambda: s.attempt1(prompts, max_new_tokens=new, temperature=1.0,
                                      generator=torch.Generator().manual_seed(0))

        provs = {"generate": generate, "sampler (multinomial)": engine("0"),
                 "sampler (fused)": engine("1")}
        times = {k: [] for k in provs}
        for _ in range(rounds):  # interleaved: the neighbours' load hits every provider
            for k, f in provs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        base = statistics.median(times["generate"])
        for k, ts in times.items():
            sec = statistics.median(ts)
            rows.append(f"| {B} | {new} | {k} | {sec:.2f} | {B * new / sec:.0f} | "
                        f"{base / sec:.2f}x |")
            print(rows[-1], flush=True)
    os.environ.pop("SCORE_FAST_FUSED_SAMPLING", None)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke shapes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default=None, help="also write the tables here (markdown)")
    ap.add_argument("--skip-sampler", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes, batches, new, vocab = [(4, 1000, 64)], [8], 4, 1000
    else:
        shapes = [(B, V, H) for V, H in ((32000, 512), (151936, 1024)) for B in (32, 256)]
        batches, new, vocab = [64, 256], args.new, 32000
    head = (f"bench/bench_sampling.py on {device_name('cpu')}, torch {torch.__version__}, "
            f"{args.threads} thread(s), fp32")
    print(head)
    out = ["# Sampling over the vocabulary: multinomial vs fused (CPU)", "", head, "",
           "## One decode step's sampling (op)", ""]
    out += op_table(shapes, args.reps)
    if not args.skip_sampler:
        out += ["", f"## Rollout sampler, attempt 1 (random Llama: hidden 256, 4 layers, "
                    f"vocab {vocab}; no eos)", ""]
        out += sampler_table(batches, new, args.rounds, vocab)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
