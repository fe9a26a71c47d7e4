"""Measured peak memory of full training steps (rollout of both attempts, rewards,
reference forward, policy forward + backward, optimizer step; 2 steps, the second with
AdamW's state in place) against score_fast.memory's
prediction, for a Qwen2-0.5B-shaped model (its config.json values, random weights) in
fp32, bf16, bf16 + LoRA and bf16 + optimizer offload. Also the step time of each.

    python bench/bench_memory.py                 # all four settings, a table on stdout
    python bench/bench_memory.py --quick         # a tiny Llama instead (seconds; the CI smoke)
    python bench/bench_memory.py --shape qwen2.5-7b --layers 4 --save-dtype bf16 \
        --settings bf16 bf16+LoRA                # a 7B's widths, 4 of its 28 layers (GPU)

Each setting runs in a fresh process. On a CPU there is one memory pool: measured = the
peak of the process's resident memory (VmRSS, sampled every 2 ms: the allocator's pages and
the weights from_pretrained leaves mmapped) during Trainer construction and the step, less
the same figure before; predicted = the device peak + host bytes (the
offload's host memory is the same RAM here). On a GPU (bench/gpu_check.sh runs it):
measured = torch.cuda.max_memory_allocated over the same span, predicted = the device peak."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

SETTINGS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"},
            "bf16+LoRA": {"dtype": "bf16", "lora_rank": 16},
            "bf16+offload": {"dtype": "bf16", "offload": True}}
# the step: 4 prompts x 2 samples, 48 new tokens an attempt, 1024-token micro-batches
# (BENCH_MEMORY_PROMPTS / BENCH_MEMORY_BUDGET change the prompts and the budget)
PROMPTS = int(os.environ.get("BENCH_MEMORY_PROMPTS", "4"))
BUDGET = int(os.environ.get("BENCH_MEMORY_BUDGET", "1024"))
SAMPLES, NEW = 2, 48
STEPS = int(os.environ.get("BENCH_MEMORY_STEPS", "2"))  # the peak is over all of them


def _rss() -> int:
    """Resident bytes (VmRSS): anonymous pages and the file pages of weights that
    from_pretrained leaves mmapped (an fp32 model read from an fp32 file stays file-backed
    until written)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _model(quick: bool, shape: str, layers: int | None):
    import torch
    import transformers
    if quick:
        from score_fast.demo import task as demo_task
        return transformers.LlamaForCausalLM(
            demo_task.tiny_model_config(demo_task.build_tokenizer()))
    from score_fast import memory
    cfg = memory.load_config(shape)  # the hub repo's config.json values
    cfg.max_position_embeddings = 4096
    if layers:  # the real widths with fewer layers: a 7B's vocab, hidden and MLP on any host
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):  # transformers checks one type per layer
            cfg.layer_types = cfg.layer_types[:layers]
    # random init on the GPU where there is one: a 7B-wide model's 2B params are seconds
    # there and a minute on 16 CPU cores
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return transformers.Qwen2ForCausalLM(cfg)


def _progress(name: str, what: str) -> None:
    print(f"[{name}] {what}", file=sys.stderr, flush=True)


def child(workdir: str, name: str) -> dict:
    """One setting in this (fresh) process: build the Trainer, run the steps. Progress goes
    to stderr; BENCH_MEMORY_TRACE_S=N also dumps every thread's stack there every N s (where
    a run on a lent GPU spends its minutes)."""
    import faulthandler

    import torch
    if os.environ.get("BENCH_MEMORY_TRACE_S"):
        faulthandler.dump_traceback_later(float(os.environ["BENCH_MEMORY_TRACE_S"]), repeat=True)
    from score_fast import memory
    from score_fast.config import (Config, DataConfig, ModelConfig, RewardConfig,
                                   RolloutConfig, Stage1Config, Stage2Config, TrainConfig)
    from score_fast.trainer import Trainer
    s = SETTINGS[name]
    torch.manual_seed(0)
    c = Config(model=ModelConfig(path=os.path.join(workdir, "model"), dtype=s["dtype"],
                                 offload_optimizer=s.get("offload", False)),
               data=DataConfig(train_file=os.path.join(workdir, "train.jsonl")),
               rollout=RolloutConfig(samples_per_prompt=SAMPLES, max_new_tokens=NEW,
                                     instruction="Check it and answer again."),
               reward=RewardConfig(kind="custom",
                                   function=os.path.join(workdir, "reward.py") + ":parity"),
               stage1=Stage1Config(steps=STEPS), stage2=Stage2Config(steps=1),
               train=TrainConfig(run_dir=os.path.join(workdir, "run-" + name),
                                 prompts_per_step=PROMPTS, max_tokens=BUDGET, lr=1e-5,
                                 save_every=10**9))
    c.model.lora.rank = s.get("lora_rank", 0)
    peak, stop, reserved = [0], threading.Event(), 0

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    # the modules the step imports lazily, before the baseline: their code pages are not
    # the step's memory
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    if c.model.lora.rank:
        import peft  # noqa: F401
    cuda = torch.cuda.is_available()
    base = 0 if cuda else _rss()
    th = threading.Thread(target=watch, daemon=True)
    if not cuda:
        th.start()
    t0 = time.perf_counter()
    tr = Trainer(c)
    _progress(name, f"trainer built in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    # AdamW allocates its state in the first step's optimizer.step, after the backward:
    # the steady-state peak (state + gradients + activations at once) is a later step's
    for i in range(STEPS):
        m = tr.train_step()
        _progress(name, f"step {i}: {m['step_s']:.1f}s, sampling {m['gen_tok_s']:.0f} tok/s, "
                  f"training {m['train_tok_s']:.0f} tok/s")
    if cuda:
        torch.cuda.synchronize()
        peak[0] = torch.cuda.max_memory_allocated()
        # what the caching allocator held at most: allocated + its fragmentation, the
        # figure memory.HEADROOM estimates
        reserved = torch.cuda.max_memory_reserved()
    step_s = (time.perf_counter() - t0) / STEPS
    stop.set()
    if not cuda:
        th.join()
    eps = PROMPTS * SAMPLES
    prompt = max(len(tr.formatter.prompt_ids(p)) for p in tr.prompt_texts)
    shape = memory.StepShape(max_tokens=max(BUDGET, 0), episodes=eps, gen_batch_size=eps,
                             in_flight=eps, prompt_tokens=prompt, max_new_tokens=NEW,
                             instruction_tokens=len(tr.tokenizer(c.rollout.instruction)
                                                    ["input_ids"]) + 8)
    plan = memory.predict(tr.policy.config.get_text_config(), dtype=s["dtype"],
                          lora_rank=c.model.lora.rank, offload=c.model.offload_optimizer,
                          shape=shape)
    # one pool on a CPU (device + host); torch's allocator peak on a GPU (the device only)
    predicted = plan.device_peak + (0 if cuda else plan.host)
    return {"setting": name, "measured": peak[0] - base, "predicted": predicted,
            "device": plan.device_peak, "host": plan.host, "phase": plan.peak_phase,
            "step_s": step_s, "loss": m["loss"], "params": plan.params, "reserved": reserved}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny Llama (CI smoke)")
    ap.add_argument("--shape", default="qwen2-0.5b",
                    help="a score_fast.memory shape (qwen2-0.5b, qwen2.5-7b, ...)")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only this many decoder layers (the widths stay the shape's)")
    ap.add_argument("--save-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the checkpoint's dtype on disk (model.dtype auto would take it)")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.workdir, a.child)), flush=True)
        return 0
    import torch
    from score_fast.demo import task as demo_task
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        model = _model(a.quick, a.shape, a.layers)
        if a.save_dtype == "bf16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(os.path.join(work, "model"))
        del model
        demo_task.build_tokenizer().save_pretrained(os.path.join(work, "model"))
        with open(os.path.join(work, "train.jsonl"), "w") as f:
            for r in demo_task.make_problems(16, seed=1):
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(work, "reward.py"), "w") as f:
            f.write("def parity(completions, **_):\n"
                    "    return [float(len(c) % 2 == 0) for c in completions]\n")
        rows = []
        for name in a.settings:
            # stderr passes through: the child's progress and any traceback, as they happen
            out = subprocess.run([sys.executable, __file__, "--child", name, "--workdir", work],
                                 stdout=subprocess.PIPE, text=True)
            res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not res:
                raise SystemExit(f"{name}: the step failed (rc {out.returncode})")
            rows.append(json.loads(res[-1][len("RESULT "):]))
            # the table so far, after every setting: a run cut short keeps what it measured
            table = _table(rows, a)
            print(table.splitlines()[-1], file=sys.stderr, flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    f.write(table + "\n")
    print(table)
    return 0


def _table(rows: list[dict], a) -> str:
    import torch
    G = 2**30
    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name() if cuda else "CPU (VmRSS)"
    layers = f", {a.layers} layers" if a.layers else ""
    lines = [f"model: {'tiny Llama' if a.quick else a.shape + ' shape' + layers} "
             f"({rows[0]['params'] / 1e6:.0f}M params), {PROMPTS} prompts x {SAMPLES} "
             f"samples, {NEW} new tokens an attempt, micro-batch budget {BUDGET}, peak over "
             f"{STEPS} steps, {dev}, {a.save_dtype} on disk", "",
             "| setting | measured GiB | predicted GiB (device + host) | error | s/step |"
             + (" reserved GiB |" if cuda else ""),
             "|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        err = r["predicted"] / r["measured"] - 1
        lines.append(f"| {r['setting']} | {r['measured'] / G:.2f} | {r['predicted'] / G:.2f} "
                     f"({r['device'] / G:.2f} + {r['host'] / G:.2f}, {r['phase']}) | "
                     f"{err:+.1%} | {r['step_s']:.1f} |"
                     + (f" {r['reserved'] / G:.2f} |" if cuda else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
