"""Models of a run: loading (dtype, revision, remote code, attention, the local hub cache),
LoRA adapters through peft, readying a model for the training step (prepare_model), and the
precision plan the trainer follows.

Precision (model.dtype, model.lora, model.offload_optimizer), per parameter of a P-parameter
model, b = 2 bytes for bf16 / fp16, 4 for fp32:
  * fp32 full fine-tune: fp32 weights, gradients and AdamW state (16 bytes) and a frozen fp32
    reference copy (4): the exact path, checked against fp64 in the tests.
  * bf16 / fp16 full fine-tune: the policy is loaded in fp32 and sharded with FSDP2 at any
    world size, one rank included, with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype
    =fp32): fp32 master weights, gradients and AdamW state (16 bytes, /world), each layer
    gathered in bf16 just for its forward and backward, and kept gathered during sampling
    (+b for the rollout, when no gradients exist). The reference is loaded in bf16 (b), never
    fp32. A 7B model: 16 x 7.6 + 2 x 7.6 = 137 GB before activations (one 141 GB device).
    Autocast instead would keep a bf16 copy of every weight for the whole step beside the
    fp32 one (+2 bytes) and still sample with fp32 embeddings and RoPE tables.
  * LoRA (rank > 0): the base stays frozen in the compute dtype (b bytes, no master, no
    gradients, no optimizer state), the adapters are fp32 (peft upcasts them), and the
    reference is the same base with the adapters disabled: no second copy at all.
  * offload_optimizer: FSDP2's CPUOffloadPolicy; the fp32 master weights, gradients and AdamW
    state stay in host memory and the optimizer steps there.
score_fast.memory predicts the bytes of each case; bench/bench_memory.py measures them.
"""
from __future__ import annotations

import os

import torch

__all__ = ["DTYPES", "GC_AUTO_PARAMS", "resolve_dtype", "load_model", "load_tokenizer",
           "apply_lora", "load_lora", "is_lora", "lora_base", "compute_dtype", "model_device",
           "uses_fsdp", "merged_state_dict", "policy_weights", "weights_path",
           "disable_dropout", "prepare_model"]

# model.gradient_checkpointing=None turns it on from here: at 1B parameters (Qwen2.5-1.5B:
# H 1536, I 8960, 28 layers) the saved activations of one 8192-token bf16 micro-batch are
# ~22 GB, more than the 16 bytes x 1.5B of weights and optimizer state; below, the weights
# dominate and recomputing costs a third more compute for little (score_fast.memory).
GC_AUTO_PARAMS = 1_000_000_000

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _hub_kwargs(revision=None, trust_remote_code=False) -> dict:
    kw = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kw["revision"] = revision
    return kw


def _locate(path: str, what: str, **kw) -> tuple[str, dict]:
    """(name for from_pretrained, extra kwargs): a local directory as is; anything else must
    be a hub id already in the local Hugging Face cache (local_files_only: no download)."""
    if path and os.path.isdir(path):
        # absolute: the name is written into configs (peft's base_model_name_or_path)
        return os.path.abspath(path), {}
    if not path or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{what}: model directory {path!r} does not exist (a local "
                                f"HF model directory or a hub id in the local cache is "
                                f"needed; nothing is downloaded)")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{what}: {path!r} is not a local directory and not in the local Hugging Face "
            f"cache (HF_HUB_CACHE; revision {kw.get('revision', 'main')}); nothing is "
            f"downloaded: fetch it first (huggingface-cli download {path}) or pass its "
            f"directory. ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return path, {"local_files_only": True}


def resolve_dtype(spec: str, path: str, what: str = "model.path", revision=None,
                  trust_remote_code=False) -> torch.dtype:
    """model.dtype -> a torch dtype; auto = the checkpoint's own torch_dtype (config.json),
    fp32 where it names none."""
    if spec != "auto":
        if spec not in DTYPES:
            raise ValueError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got "
                             f"{spec!r}")
        return DTYPES[spec]
    kw = _hub_kwargs(revision, trust_remote_code)
    name, extra = _locate(path, what, **kw)
    if _adapter_base(name):  # a LoRA checkpoint: its base's dtype
        return resolve_dtype("auto", _adapter_base(name), f"{what} (the LoRA base model)")
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(name, **extra, **kw)
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt.replace("torch.", ""), None)
    return dt if dt in DTYPES.values() else torch.float32


def load_model(path: str, what: str = "model.path", dtype: torch.dtype = torch.float32, *,
               revision=None, trust_remote_code=False, attn_implementation=None):
    """AutoModelForCausalLM from a local directory or the local hub cache, in `dtype`, with
    a clear error when it is in neither. A LoRA checkpoint (adapter_config.json, no
    config.json) loads as its base with the adapters merged in."""
    from transformers import AutoModelForCausalLM
    kw = _hub_kwargs(revision, trust_remote_code)
    name, extra = _locate(path, what, **kw)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if _adapter_base(name):  # a LoRA checkpoint: its base + the adapters, merged
        base = load_model(_adapter_base(name), f"{what} (the LoRA base model)", dtype,
                          trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation)
        return _peft().PeftModel.from_pretrained(base, name).merge_and_unload()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra, **kw)
    model.config.dtype = dtype  # what checkpoints record (they are written in this dtype)
    return model


def weights_path(path: str, revision=None, trust_remote_code=False) -> str:
    """Where the full weights of model.path are (a LoRA checkpoint: its base model's), as a
    directory or a cached hub id, for another loader (the vLLM engine) to read."""
    name, _ = _locate(path, "model.path", **_hub_kwargs(revision, trust_remote_code))
    base = _adapter_base(name)
    return weights_path(base, revision, trust_remote_code) if base else name


def _adapter_base(name: str) -> str | None:
    """The base model of a LoRA checkpoint directory (adapters only), else None."""
    if not os.path.isfile(os.path.join(name, "adapter_config.json")) or os.path.isfile(
            os.path.join(name, "config.json")):
        return None
    import json
    with open(os.path.join(name, "adapter_config.json")) as f:
        return json.load(f)["base_model_name_or_path"]


def load_tokenizer(path: str, revision=None, trust_remote_code=False):
    from transformers import AutoTokenizer
    kw = _hub_kwargs(revision, trust_remote_code)
    name, extra = _locate(path, "tokenizer", **kw)
    tok = AutoTokenizer.from_pretrained(name, **extra, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("model.lora.rank > 0 needs the peft library: pip install "
                          "'score_fast[lora]' (or pip install peft)") from e
    return peft


def apply_lora(model, lora, seed: int = 0):
    """base + fresh adapters (a score_fast.config.LoraConfig); the base is frozen in its
    dtype, the adapters are fp32 (peft's autocast_adapter_dtype). lora_A's random init
    draws from `seed` alone, so every rank (and every world size) starts from the same
    adapters: the trainer seeds each rank differently for sampling."""
    peft = _peft()
    targets = lora.targets[0] if list(lora.targets) == ["all-linear"] else list(lora.targets)
    cfg = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha or 2 * lora.rank,
                          lora_dropout=lora.dropout, target_modules=targets, bias="none",
                          task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return peft.get_peft_model(model, cfg)
    except ValueError as e:  # e.g. a target name the model does not have
        raise ValueError(f"model.lora.targets={list(lora.targets)}: {e}") from None


def load_lora(model, checkpoint: str):
    """base + the adapters saved in `checkpoint` (trainable: a resume)."""
    return _peft().PeftModel.from_pretrained(model, checkpoint, is_trainable=True)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def lora_base(model):
    """The HF model that runs: a PeftModel's base (its Linear layers carry the adapters), or
    the model itself."""
    return model.get_base_model() if is_lora(model) else model


def disable_dropout(model) -> None:
    """Dropout off for good (TRL's disable_dropout does the same): RL compares the policy
    with the policy that sampled and with the reference, so with dropout on the KL is not 0
    at step 0 and the trained log-probs are not the sampler's. nn.Dropout modules get p = 0,
    and float attributes named *dropout* (the rate attention functions read, e.g. Llama's
    attention_dropout) 0.0; the model's config is left as it was."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def prepare_model(model, dist=None, shard: bool = False,
                  param_dtype: torch.dtype | None = None, offload: bool = False):
    """Ready a HF causal LM (or a peft LoRA model) for the training step (the fused passes
    of score_fast.objective: policy_loss, reference_logprobs): dropout off, varlen
    attention for packed rows (never the whole [T, T] row), FSDP2 sharding when `shard`
    (param_dtype: the compute dtype the fp32 shards are gathered in; offload: the shards
    live in host memory), and the move to dist's device (a score_fast.distributed.Dist; one
    process on the CPU by default)."""
    from score_fast import distributed
    from score_fast.attention import use_varlen_attention
    dist = dist or distributed.Dist()
    disable_dropout(model)
    use_varlen_attention(lora_base(model))
    if shard:
        distributed.shard(model, dist, param_dtype=param_dtype, offload=offload)
    if not offload:  # offloaded shards stay on the host; FSDP moves what it gathers
        model.to(dist.device)
    for module in {model, lora_base(model)}:  # where inputs go (the sampler runs the base)
        module.score_fast_device = dist.device
    return model


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: its recorded config dtype (FSDP2 mixed precision
    keeps fp32 master parameters under a bf16 model), else its first parameter's."""
    dt = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    return next(model.parameters()).dtype


def model_device(model) -> torch.device:
    """Where the model computes: the trainer's device (prepare_model records it; FSDP2 CPU
    offload keeps the parameters themselves in host memory), else its first parameter's."""
    return getattr(model, "score_fast_device", None) or next(model.parameters()).device


def uses_fsdp(world: int, dtype: torch.dtype, lora: bool, offload: bool) -> bool:
    """FSDP2 shards the policy at several ranks, and at one rank where it gives the fp32
    master weights under a lower compute dtype (full fine-tune) or the CPU offload."""
    return world > 1 or offload or (not lora and dtype != torch.float32)


def _merged_items(state: dict, scaling: float | None, dtype: torch.dtype, full=lambda t: t):
    """(base model key, tensor in `dtype`) of a model's state dict, one entry at a time:
    peft's key prefixes dropped, each LoRA Linear merged (W + scaling B A, in fp32) when
    scaling is given; `full` turns a stored entry (an FSDP2 shard) into the whole tensor."""
    for key, value in state.items():
        if ".lora_" in key:
            continue
        value = full(value)
        if key.endswith(".base_layer.weight"):
            prefix = key[:-len(".base_layer.weight")]
            a, b = state.get(f"{prefix}.lora_A.default.weight"), state.get(
                f"{prefix}.lora_B.default.weight")
            if a is None or b is None:
                raise ValueError(f"merging LoRA: {prefix} has no lora_A/lora_B (only Linear "
                                 f"adapters are merged)")
            value = value.float() + scaling * (full(b).float() @ full(a).float())
        key = key.replace(".base_layer.", ".")
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        yield key, value.to(dtype) if value.is_floating_point() else value


def merged_state_dict(state: dict, scaling: float, dtype: torch.dtype) -> dict:
    """A PeftModel's (full) state dict -> the base model's, each adapted Linear merged
    (W + scaling B A, in fp32, then `dtype`), under the base model's own key names."""
    return dict(_merged_items(state, scaling, dtype))


def policy_weights(model, dtype: torch.dtype):
    """The policy's current weights as the base model's checkpoint would hold them (its key
    names, LoRA merged, `dtype`), yielded one tensor at a time, for an inference engine
    (score_fast.vllm_engine) to load. FSDP2 shards are gathered one parameter at a time
    (a collective: every rank iterates in the same order), never the whole model at once."""
    from torch.distributed.tensor import DTensor

    def full(t):
        if not isinstance(t, DTensor):
            return t.detach()
        if t.device_mesh.size() == 1:  # one rank: the shard is the tensor, no collective
            return t.to_local().detach()
        return t.full_tensor().detach()

    scaling = None
    if is_lora(model):
        cfg = model.peft_config["default"]
        scaling = cfg.lora_alpha / cfg.r
    with torch.no_grad():
        yield from _merged_items(model.state_dict(), scaling, dtype, full)
