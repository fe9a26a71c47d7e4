"""Memory model of one SCoRe training step: the peak device bytes predicted from a HF model
config, and whether a setting fits a device.

    plan = predict(load_config("qwen2.5-7b"), dtype="bf16", lora_rank=16)
    print(plan); fits(plan, DEVICES["80GB"])
    score-fast plan --model qwen2.5-7b --lora_rank 16    # the same from the command line
    score-fast plan --table                              # 1.5B / 7B / 14B x settings x devices

P parameters, b bytes of the compute dtype (fp32 4, bf16/fp16 2), W ranks, per rank:
  full fine-tune  fp32 master 4P/W, fp32 grads 4P/W (training only: set_to_none after the
  step), AdamW 8P/W, reference bP/W (frozen, compute dtype). FSDP2 (below fp32, W > 1 or
  offload) adds compute-dtype copies: rollout bP (every unit gathered for the whole
  rollout), training b (2 layers + root). offload: master, grads and AdamW in host memory.
  LoRA  base bP (frozen), fp32 adapters Pa: 4Pa + grads 4Pa + AdamW 8Pa; the reference is
  the base with the adapters off (0 bytes); offload moves the adapter states to the host.
  rollout  KV cache in the compute dtype: attempt 1's state of every episode (prompt +
  attempt 1) until attempt 2, plus one generation batch's working cache, its prefill's
  one-layer working set and its sampling logits.
  training  activations saved for backward (all layers, or each layer's input plus one
  recomputed layer under gradient checkpointing), the fused loss's temporaries
  (kernels/linear_score_loss.py), the reference forward's one-layer transient.
The peak is the larger phase; persistent bytes count in both.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass

from score_fast.models import GC_AUTO_PARAMS

__all__ = ["GC_AUTO_PARAMS", "checkpointing", "DEVICES", "HEADROOM", "RESERVE",  # noqa: F822
           "usable", "SHAPES", "StepShape", "Plan",
           "count_params", "lora_params", "predict", "fits", "load_config", "plan_table",
           "plan_text"]

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COMPONENTS = ("weights", "master", "grads", "optimizer", "reference", "compute_copy",
              "kv_cache", "activations", "loss")
# torch.cuda.get_device_properties(0).total_memory: what the driver lets torch have
# (H100 80GB: 79.2 GiB; H200 141GB: 140.4 GiB), not the marketing 80e9 / 141e9
DEVICES = {"80GB": 85_029_158_912, "141GB": 150_754_820_096}
# fits(): the total less a fixed 2 GiB (the CUDA context, ~0.5 GiB, and cuBLAS / NCCL
# workspaces outside torch's allocator) and 5% of it for the caching allocator's
# fragmentation under shapes that change every micro-batch (packed T, compacted KV batches),
# with expandable segments (distributed.allocator_defaults turns them on): H200 131.4 GiB
# usable, H100 73.3 GiB. Measured on an H200 (bench_memory --shape qwen2.5-7b --layers 4,
# 2026-11-30) WITHOUT them: reserved / allocated peak = 49.1 / 42.1 GiB (+17%) for the bf16
# full fine-tune, 4.42 / 4.33 (+2%) with LoRA; the 5% with them is still to be measured
RESERVE, HEADROOM = 2 * 2**30, 0.95


def _qwen2(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, tie_word_embeddings=tied)


# the config.json values of the Qwen hub repos (huggingface.co/Qwen/<name>/config.json):
# vocab, hidden, intermediate, layers, heads, kv heads, tied embeddings
_SHAPE_ARGS = {
    "qwen2-0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": (151936, 1536, 8960, 28, 12, 2, True),
    "qwen2.5-7b": (152064, 3584, 18944, 28, 28, 4, False),
    "qwen2.5-14b": (152064, 5120, 13824, 48, 40, 8, False),
}


@functools.cache
def _shapes() -> dict:
    return {name: _qwen2(*a) for name, a in _SHAPE_ARGS.items()}


def __getattr__(name):  # SHAPES: built on first use, so importing this skips transformers
    if name == "SHAPES":
        return _shapes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class StepShape:
    """One step's sizes, per rank"""
    max_tokens: int = 8192
    """tokens of a packed training micro-batch (train.max_tokens)"""
    episodes: int = 512
    """episodes a rank samples per step (prompts_per_step x samples_per_prompt / world)"""
    gen_batch_size: int = 64
    """rows a generation batch (rollout.gen_batch_size)"""
    in_flight: int = 64
    """episodes through both attempts at a time (rollout.episodes_in_flight, default
    gen_batch_size): attempt 1's KV cache is held for these only"""
    prompt_tokens: int = 1024
    """longest prompt"""
    max_new_tokens: int = 1024
    """tokens an attempt (rollout.max_new_tokens)"""
    instruction_tokens: int = 64
    """the self-correction instruction before attempt 2"""
    world: int = 1
    """ranks (one device each)"""


@dataclass
class Plan:
    """Bytes per component in each phase (COMPONENTS order), and host bytes (offload)."""
    label: str
    rollout: dict[str, int]
    training: dict[str, int]
    host: int
    params: int
    trainable: int
    gradient_checkpointing: bool

    @property
    def device_peak(self) -> int:
        return max(sum(self.rollout.values()), sum(self.training.values()))

    @property
    def peak_phase(self) -> str:
        return "rollout" if sum(self.rollout.values()) >= sum(self.training.values()) \
            else "training"

    def table(self) -> str:
        gc = "on" if self.gradient_checkpointing else "off"
        rows = [f"{self.label}: {self.params / 1e9:.2f}B params, {self.trainable / 1e9:.3f}B "
                f"trainable, gradient checkpointing {gc}",
                f"{'GiB':<14}{'rollout':>10}{'training':>10}"]
        rows += [f"{k:<14}{self.rollout[k] / GiB:>10.2f}{self.training[k] / GiB:>10.2f}"
                 for k in COMPONENTS]
        rows.append(f"{'total':<14}{sum(self.rollout.values()) / GiB:>10.2f}"
                    f"{sum(self.training.values()) / GiB:>10.2f}")
        rows.append(f"device peak {self.device_peak / GiB:.2f} GiB ({self.peak_phase}), "
                    f"host {self.host / GiB:.2f} GiB")
        return "\n".join(rows)

    __str__ = table


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _linears(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each nn.Linear of a decoder layer (Llama / Qwen2 layout)."""
    H, inter, hd = cfg.hidden_size, cfg.intermediate_size, _head_dim(cfg)
    q = cfg.num_attention_heads * hd
    kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * hd
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}


def _layer_params(cfg) -> int:
    lin, H = _linears(cfg), cfg.hidden_size
    n = sum(i * o for i, o in lin.values()) + 2 * H  # + the two RMSNorm weights
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    if attn_bias or cfg.model_type == "qwen2":  # qwen2: q, k, v biases, none on o
        n += lin["q_proj"][1] + lin["k_proj"][1] + lin["v_proj"][1]
    if attn_bias:  # Llama's attention_bias also biases o_proj
        n += H
    if getattr(cfg, "mlp_bias", False):
        n += 2 * cfg.intermediate_size + H
    return n


def _root_params(cfg) -> int:
    """Embeddings, final norm and an untied LM head: FSDP's root unit."""
    tied = getattr(cfg, "tie_word_embeddings", False)
    return cfg.vocab_size * cfg.hidden_size * (1 if tied else 2) + cfg.hidden_size


def count_params(cfg) -> int:
    return cfg.num_hidden_layers * _layer_params(cfg) + _root_params(cfg)


def _targets(cfg, targets) -> list[str]:
    lin = _linears(cfg)
    names = list(lin) if "all-linear" in targets else list(targets)
    unknown = sorted(set(names) - set(lin))
    if unknown:
        raise ValueError(f"LoRA targets {unknown}: not a decoder-layer Linear "
                         f"({', '.join(lin)}) nor all-linear")
    return names


def lora_params(cfg, rank: int, targets=("all-linear",)) -> int:
    """r (in + out) per adapted Linear (A: r x in, B: out x r); never the LM head."""
    lin = _linears(cfg)
    return cfg.num_hidden_layers * rank * sum(sum(lin[n]) for n in _targets(cfg, targets))


ROW_CHUNK = 2048  # kernels/_lmhead.py's _GPU_ROWS, here so that planning imports no triton
# (test_memory checks they agree)


def predict(cfg, dtype: str = "bf16", lora_rank: int = 0, lora_targets=("all-linear",),
            offload: bool = False, gradient_checkpointing: bool | None = None,
            shape: StepShape = StepShape(), label: str = "") -> Plan:
    """Per-rank device bytes of one step (rollout and training phases) for a HF config."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)}")
    b, s, W, T = DTYPE_BYTES[dtype], shape, shape.world, shape.max_tokens
    H, inter, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                      cfg.vocab_size)
    lin = _linears(cfg)
    kv = lin["k_proj"][1]
    P, layer, root = count_params(cfg), _layer_params(cfg), _root_params(cfg)
    Pa = lora_params(cfg, lora_rank, lora_targets) if lora_rank else 0
    gc = (P + Pa >= GC_AUTO_PARAMS if gradient_checkpointing is None  # the policy's count
          else gradient_checkpointing)
    both, roll, train = (dict.fromkeys(COMPONENTS, 0) for _ in range(3))
    trainable = Pa if lora_rank else P
    shards = 1 if lora_rank else W  # LoRA: the base and the adapters are replicated
    state = {"master": 4 * trainable // shards, "optimizer": 8 * trainable // shards}
    grads = 4 * trainable // shards
    host = 0
    if offload:  # FSDP2 CPUOffloadPolicy: master, grads and AdamW live in host memory
        host = sum(state.values()) + grads
        state, grads = {}, 0
    both.update(state)
    train["grads"] = grads
    if lora_rank:
        both["weights"] = b * P
        both["compute_copy"] = 4 * Pa if offload else 0  # the fp32 adapters the forward uses
    else:
        both["reference"] = b * P // W
        if b < 4 or W > 1 or offload:  # FSDP2: compute-dtype unsharded copies
            roll["compute_copy"] = b * P  # every unit gathered for the whole rollout
            train["compute_copy"] = b * (2 * layer + root)  # current + prefetched layer, root
        if W > 1:  # the sharded reference gathers its units for its forward too
            train["reference"] = b * (2 * layer + root)
    # rollout: attempt 1's KV of the episodes in flight until attempt 2, plus one generation batch's
    # cache (prefix + instruction + attempt 2); its prefill's one-layer working set under
    # no_grad (residual + normed input + gate, up, act*up: 64 x 1024 tokens = 7.8 GiB at
    # 7B); logits, softmax probs and a copy of the last position, fp32 (0.1 GiB)
    kv_tokens = (min(s.episodes, s.in_flight) * (s.prompt_tokens + s.max_new_tokens)
                 + s.gen_batch_size * (s.prompt_tokens + 2 * s.max_new_tokens
                                       + s.instruction_tokens))
    roll["kv_cache"] = 2 * L * kv * b * kv_tokens
    roll["activations"] = s.gen_batch_size * (s.prompt_tokens * b * (2 * H + 3 * inter)
                                              + 3 * 4 * V)
    # training: saved for backward per token and layer: norm outputs, q, k, v, roped q, k,
    # attention out (5H + 3kv), gate, up, act(gate), act*up (4I), two fp32 norm inputs (8H)
    per_layer = b * (5 * H + 3 * kv + 4 * inter) + 8 * H
    policy_layer = per_layer
    if lora_rank and b < 4:  # peft casts each adapted Linear's input to the fp32 adapter
        names = _targets(cfg, lora_targets)  # dtype and lora_A saves it; lora_B saves x A
        policy_layer += 4 * sum(lin[n][0] + lora_rank for n in names)
    saved = T * (L * H * b + policy_layer) if gc else L * T * policy_layer
    # the reference's no_grad forward runs first on the same micro-batch: one layer's
    # transient plus its hidden states, freed before the policy's forward saves anything
    train["activations"] = max(saved, T * (per_layer + H * b))
    # fused loss (CUDA row sweep, all T rows live at worst): the fp32 logits of a row chunk
    # through the whole vocabulary with their dlogits written over them, dhidden fp32
    # [T, H], and where the LM head trains its fp32 dweight [V, H], computed in the forward
    # and held until the backward
    train["loss"] = min(T, ROW_CHUNK) * V * 4 + 4 * T * H + (0 if lora_rank else 4 * V * H)
    return Plan(label or cfg.model_type, {k: both[k] + roll[k] for k in COMPONENTS},
                {k: both[k] + train[k] for k in COMPONENTS}, host, P, trainable, gc)


def usable(device_bytes: int) -> int:
    """What a step may use of a device's total (RESERVE, HEADROOM)."""
    return int(HEADROOM * device_bytes) - RESERVE


def fits(plan: Plan, device_bytes: int) -> bool:
    return plan.device_peak <= usable(device_bytes)


def checkpointing(cfg, device_bytes: int, **predict_kw) -> tuple[bool, str]:
    """Whether a step needs gradient checkpointing on a device of `device_bytes`: on only
    where its training phase without it would not fit (usable()), and why, in words.
    predict_kw: predict()'s (dtype, lora_rank, offload, shape)."""
    plan = predict(cfg, gradient_checkpointing=False, **predict_kw)
    need, room = sum(plan.training.values()), usable(device_bytes)
    if need <= room:
        return False, (f"the training phase fits without it ({need / GiB:.1f} GiB predicted, "
                       f"{room / GiB:.1f} GiB usable)")
    return True, (f"without it the training phase needs {need / GiB:.1f} GiB, over the "
                  f"{room / GiB:.1f} GiB usable")


def load_config(spec: str):
    """A SHAPES name, a model directory (its config.json), a config.json file, or a hub id in
    the local Hugging Face cache (nothing is downloaded); the text model's config."""
    import transformers
    if spec in _SHAPE_ARGS:
        return copy.deepcopy(_shapes()[spec])
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if os.path.isdir(spec) and not os.path.isfile(path):
        raise FileNotFoundError(f"model directory {spec!r} has no config.json")
    if os.path.isfile(path):
        with open(path) as f:
            d = json.load(f)
        if "model_type" not in d:
            raise ValueError(f"{path!r}: no model_type, not a HF model config")
        cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        try:
            cfg = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"model {spec!r}: not a built-in shape ({', '.join(_SHAPE_ARGS)}), a model "
                f"directory, a config.json, nor a hub id in the local HF cache") from e
    return cfg.get_text_config()


_TABLE_SETTINGS = {"full bf16": {}, "full bf16 + offload": {"offload": True},
                   "LoRA r=16 bf16": {"lora_rank": 16}}


def plan_table(models=("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b"),
               shape: StepShape = StepShape()) -> str:
    """Markdown: per model x setting, the predicted peak at the shape given and, per device,
    the largest generation batch (and episodes in flight) that fits: the rollout's KV cache
    and prefill scale with it, the rest of the step does not."""
    rows = ["| model | setting | peak GiB (phase) | host GiB | "
            + " | ".join(f"{d} ({usable(v) / GiB:.0f} GiB usable)" for d, v in DEVICES.items())
            + " |", "|---" * (4 + len(DEVICES)) + "|"]
    batches = [n for n in (64, 32, 16, 8) if n <= shape.gen_batch_size] or [8]
    for m in models:
        for name, kw in _TABLE_SETTINGS.items():
            p = predict(_shapes()[m], dtype="bf16", shape=shape, **kw)
            cells = []
            for total in DEVICES.values():
                ok = [n for n in batches if fits(predict(_shapes()[m], dtype="bf16", shape=(
                    dataclasses.replace(shape, gen_batch_size=n, in_flight=n)), **kw), total)]
                cells.append(f"gen batch {ok[0]}" if ok else "no")
            rows.append(f"| {m} | {name} | {p.device_peak / GiB:.1f} ({p.peak_phase}) | "
                        f"{p.host / GiB:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plan_text(opts: dict) -> str:
    """`score-fast plan`: the breakdown and a fits line per device, or the --table."""
    shape = StepShape(**{f.name: opts[f.name] for f in dataclasses.fields(StepShape)})
    if opts.get("table"):
        return plan_table(shape=shape)
    if not opts.get("model"):
        raise ValueError("score-fast plan: give --model SPEC (a name: "
                         f"{', '.join(_SHAPE_ARGS)}; a model directory or config.json) or --table")
    plan = predict(load_config(opts["model"]), dtype=opts["dtype"],
                   lora_rank=opts["lora_rank"], offload=opts["offload"],
                   gradient_checkpointing=opts["gradient_checkpointing"], shape=shape,
                   label=f"{opts['model']} {opts['dtype']}"
                         + (f" LoRA r={opts['lora_rank']}" if opts["lora_rank"] else " full")
                         + (" + offload" if opts["offload"] else ""))
    lines = [plan.table()]
    for name, total in DEVICES.items():
        lines.append(f"fits {name} ({total / GiB:.1f} GiB, {usable(total) / GiB:.1f} GiB "
                     f"usable): "
                     f"{'yes' if fits(plan, total) else 'no'}")
    if opts.get("device"):
        from score_fast import steptime
        name = opts["device"]
        if name == "host":
            rates = steptime.measure_host()
        elif name in steptime.DEVICES:
            rates = steptime.DEVICES[name]
        else:
            raise ValueError(f"--device {name!r}: one of {', '.join(steptime.DEVICES)} or host")
        phases = steptime.predict_time(load_config(opts["model"]), rates, shape=shape,
                                       dtype=opts["dtype"], lora_rank=opts["lora_rank"],
                                       gradient_checkpointing=plan.gradient_checkpointing,
                                       graphs=name != "host")
        lines += [f"step time on {rates.name} ({rates.flops / 1e12:.1f} TFLOP/s, "
                  f"{rates.bandwidth / 1e9:.0f} GB/s; every episode at its budget, decode "
                  f"in waves of {shape.in_flight}"
                  + (", each step a CUDA graph (rollout.engine=auto)" if name != "host"
                     else "") + "):", steptime.time_table(phases)]
    return "\n".join(lines)
