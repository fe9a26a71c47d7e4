"""Static-slot decode engine: both attempts of every episode in one slot each, every decode
step the same tensor program over preallocated buffers, so it can be one captured graph.

    engine = SlotEngine(model, eos_id, pad_id)
    a1, a2 = engine.episodes(prompts, instructions, max_new_tokens=512, temperature=1.0)
    # instructions[i] = (ids if attempt 1 did not end with eos, ids if it did)

Why (issue 29, bench/results/gpu_h200.md): score_fast.sampler decodes a 0.5B model on an
H200 at ~30 ms a token where the GPU works ~2 ms; the rest is the HF forward's Python, ~1000
kernel launches a step, host syncs and per-step mask/cache bookkeeping. Here a step has no
host sync, no shape change and no Python branch on data:

* Slots: one per episode in flight, each with its own KV columns [0, capacity) in a pool
  allocated once per engine ([slots, kv_heads, capacity, head_dim] per layer and K / V), a
  per-slot length (the position of the token fed this step) and phase on the device. A
  slot's sequence starts at column 0 (no padding): the step's mask is column <= length.
* Attempt 2 continues in attempt 1's slot: when a row ends attempt 1 (eos or
  max_new_tokens) it feeds that last token, then its instruction tokens one a step as
  forced inputs (the variant for "attempt 1 ended with eos" or not, chosen on the device),
  and the step after the last instruction token samples attempt 2's first. No stash, no
  copy, no barrier between the attempts; rows in different phases share every step.
* Prefill: each distinct prompt once (the samples of one prompt share it), all but its
  last token, through the model's own forward (right-padded: causal attention needs no
  mask), its keys/values copied into its samples' slots. The prompt's last token is the
  first decode step's input, so the first token of attempt 1 comes from a step like the
  others.
* Buckets: the step runs on the first `bucket` slots of the pool (vLLM-style sizes 1, 2,
  4, ..., 512) and attends to the first `window` columns; the host reads the phases and
  lengths every `check_every` steps (the only sync, an async copy on a GPU), moves the
  live rows to the front of the pool when they fit a smaller bucket (one gather of their
  columns, about one step's reads) and sets the window to a multiple of col_block above
  every live length until its next look. Each (bucket, window) step is captured once
  (CUDA graph on a GPU; torch.compile where asked) over views of the same pool, so buffers
  never move (tests: every data_ptr unchanged), and a step reads about the columns in use,
  not the whole capacity.
* Sampling in the step: greedy argmax, or Gumbel-max with counter-based noise: the
  uniform of vocabulary entry v for a row is a hash of (seed, episode, attempt, token
  index, v), 52 bits, so the draw is exact in distribution (chi-square tested), the same
  for an episode whatever the batch, bucket or device, and needs no RNG state or host round
  trip. top_k and top_p (the sampler's nucleus) mask the logits before the draw with
  static shapes, inside the step too.
* The decoder step is written out for the Llama family (llama, mistral without sliding
  window, qwen2, qwen3): the model's own modules (norms, projections, MLP, rotary
  embedding, LM head) called on [slots, 1, hidden] with attention over the slot's columns
  by scaled_dot_product_attention. The HF forward (and score_fast.sampler) is the
  reference it is tested against: the same greedy tokens as model.generate on the full
  context. Other models and FSDP2-sharded ones take score_fast.sampler
  (`unsupported(model)` says why).
* Stop strings: checked on the host at its looks (the tokens are read then), the slot
  rewound to the token that completed one (_Stops).

Memory: the pool holds slots x capacity x layers x 2 x kv_heads x head_dim elements
(capacity = longest prompt + instruction + 2 x max_new_tokens + 1).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["SlotEngine", "unsupported", "BUCKETS", "gumbel_noise", "gumbel_argmax", "restrict"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # vLLM's capture sizes are similar
_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
A1, FORCED, A2, DONE = 0, 1, 2, 3  # a slot's phase: what this step's output is for
_M32 = 0xFFFFFFFF


def unsupported(model) -> str | None:
    """Why SlotEngine cannot run `model` (a sentence), or None when it can."""
    from score_fast.models import lora_base
    if any(type(m).__name__.startswith("FSDP") for m in (model, lora_base(model))):
        return "an FSDP2 module (its layers cannot be called one by one)"
    base = lora_base(model)
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in _FAMILY:
        return f"model_type {kind!r} is not one of {', '.join(_FAMILY)}"
    types = set(getattr(cfg, "layer_types", None) or [])
    if types - {"full_attention"} or (getattr(cfg, "use_sliding_window", False)
                                      and getattr(cfg, "sliding_window", None)) or (
            kind == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention layers"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
            or {})
    if isinstance(rope, dict) and rope.get("rope_type", "default") in ("dynamic", "longrope"):
        return f"rope_type {rope['rope_type']} (its frequencies depend on the length)"
    dec = getattr(base, "model", None)
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if dec is None or not all(hasattr(dec, a) for a in need) or not hasattr(base, "lm_head"):
        return "not the usual model.model.{embed_tokens,layers,norm,rotary_emb} + lm_head"
    return None


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow (two
    16-bit halves of c: products stay below 2^48)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32's constants), elementwise on int64 in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def restrict(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
             top_k: int = 0) -> torch.Tensor:
    """logits with -inf outside the top_k largest (ties at the k-th kept) and outside the
    nucleus of softmax(logits / temperature) (score_fast.sampler.sample_next's rule: a
    token is dropped when the probability before it in sorted order exceeds top_p; the
    first is kept). Static shapes (a sort of [B, V]): it stays inside the captured step."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sl, si = logits.sort(-1, descending=True)
        sp = torch.softmax(sl.float() / temperature, -1)
        sl = sl.masked_fill((sp.cumsum(-1) - sp) > top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, si, sl)
    return logits


def gumbel_argmax(logits: torch.Tensor, seed, episode, attempt, index,
                  temperature: float) -> torch.Tensor:
    """One token a row from softmax(logits / temperature) by Gumbel-max with gumbel_noise."""
    noise = gumbel_noise(seed, episode, attempt, index, logits.shape[1])
    return (logits.double() / temperature + noise).argmax(-1)


def gumbel_noise(seed: torch.Tensor, episode: torch.Tensor, attempt: torch.Tensor,
                 index: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] fp64 Gumbel(0, 1) noise, a pure function of (seed, episode, attempt, token
    index, v): two 32-bit hashes give a 52-bit uniform in (0, 1) (the largest noise is ~36,
    so capping it biases a draw by < 1e-15 a vocabulary entry)."""
    key = _mix32((seed + _mix32(episode & _M32)) & _M32)
    key = _mix32((key + _mul32(index & _M32, 0x9E3779B9) + attempt) & _M32)
    v = torch.arange(vocab, device=episode.device, dtype=torch.int64)
    base = key[:, None] + 2 * v[None, :]
    hi = _mix32(base & _M32) >> 6  # 26 bits each
    lo = _mix32((base + 1) & _M32) >> 6
    u = (hi * (1 << 26) + lo).double().add_(0.5).mul_(2.0 ** -52)
    return -torch.log(-torch.log(u))


@dataclasses.dataclass
class _Pool:
    """Every buffer of the engine, slot-major so a bucket is the first b slots (views)."""
    keys: list  # per layer [S, kv_heads, C, D]
    values: list
    length: torch.Tensor  # [S] position of the token fed this step
    inp: torch.Tensor  # [S] the token fed this step
    phase: torch.Tensor  # [S] A1 / FORCED / A2 / DONE
    forced: torch.Tensor  # [S] the next instruction token's index
    episode: torch.Tensor  # [S] the slot's episode (E: none, a scratch row)
    # per episode (E + 1 rows; row E is the scratch row of empty slots)
    out: torch.Tensor  # [E + 1, 2, N + 1] the attempts' tokens (column N: scratch)
    count: torch.Tensor  # [E + 1, 2] tokens of each attempt so far
    ended_eos: torch.Tensor  # [E + 1] attempt 1 ended with eos: which instruction variant
    instr: torch.Tensor  # [E + 1, 2, I] the instruction variants
    instr_len: torch.Tensor  # [E + 1, 2]
    seed: torch.Tensor  # [1] int64

    def view(self, b: int) -> "_Pool":
        """The first b slots (views: the same storage); episode rows whole."""
        cut = lambda t: t[:b]  # noqa: E731
        return dataclasses.replace(
            self, keys=[cut(k) for k in self.keys], values=[cut(v) for v in self.values],
            length=cut(self.length), inp=cut(self.inp), phase=cut(self.phase),
            forced=cut(self.forced), episode=cut(self.episode))


class SlotEngine:
    """Both attempts of every episode, one slot each (module doc).

    eos_id: an id or ids that end an attempt; pad_id: what empty slots are fed.
    max_slots: episodes in flight (the pool's slots; more episodes run in waves). None: all
    of a call's episodes (at most 512, the largest bucket) where their keys/values fit half
    of the free memory (a GPU's, else the host's), else as many as fit.
    decode: ids -> text, needed only for stop strings.
    check_every: decode steps between the host's looks at the phases and lengths.
    col_block: attention windows' granularity in columns (None: 128 on a GPU, 16 on a CPU).
    compile: torch.compile each bucket's step (on a CPU inductor's C++; default off).
    graphs: capture each bucket's step as a CUDA graph (None: on a CUDA device)."""

    def __init__(self, model, eos_id: int | Sequence[int] | None, pad_id: int, *,
                 max_slots: int | None = None, check_every: int = 8,
                 col_block: int | None = None, compile: bool = False,
                 graphs: bool | None = None, decode=None):
        from score_fast.models import compute_dtype, lora_base, model_device
        why = unsupported(model)
        if why:
            raise NotImplementedError(f"SlotEngine cannot run this model: {why}")
        if check_every < 1:
            raise ValueError(f"check_every={check_every}: at least 1")
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots={max_slots}: at least 1 (or None)")
        base = lora_base(model)
        self.decoder, self.head = base.model, base.lm_head
        cfg = base.config
        self.eos = sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ()))
        self.pad = pad_id if pad_id is not None else (self.eos[0] if self.eos else 0)
        self.device = model_device(model)
        self.dtype = compute_dtype(model)
        attn = self.decoder.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = cfg.num_key_value_heads
        self.heads = cfg.num_attention_heads
        self.scaling = attn.scaling
        self.max_slots = max_slots
        self.decode = decode
        self.check_every = check_every
        # attention windows come in multiples of col_block columns: each (bucket, window) is
        # its own graph on a GPU (128: ~20 for a 2.5k-token capacity); a CPU step pays for
        # every column it reads and nothing per variant
        self.col_block = col_block or (128 if self.device.type == "cuda" else 16)
        self.compile = compile
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        self._eos_t = torch.tensor(self.eos or [-1], device=self.device)
        # eager, the noise of [slots, V] is ~10 int64 / fp64 temporaries (at 512 x 151936,
        # 622 MB each): on a GPU the draw is compiled into one reduction over the logits
        self._draw = (torch.compile(gumbel_argmax, dynamic=True, fullgraph=True)
                      if self.device.type == "cuda" else gumbel_argmax)
        self.pool: _Pool | None = None
        self._steps: dict = {}  # (bucket, window, sampling) -> the callable of one step
        self._graph_pool = None
        self.stats = {"steps": 0, "checks": 0, "compactions": 0, "prefill_tokens": 0,
                      "slot_steps": 0}

    # ---- the step ---------------------------------------------------------------------
    def _forward(self, p: _Pool, window: int) -> torch.Tensor:
        """[b, V] fp32 logits of each slot's next token, its input's keys/values written at
        column `length`; attention reads columns [0, window) (every live slot's length is
        below it: _wave's bound)."""
        b = p.length.shape[0]
        rows = torch.arange(b, device=p.length.device)
        x = self.decoder.embed_tokens(p.inp[:, None])  # [b, 1, H]
        pos = p.length[:, None]
        cos, sin = self.decoder.rotary_emb(x, pos)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, 1, D]
        capacity = p.keys[0].shape[2]
        cols = torch.arange(window, device=pos.device)
        # additive mask [b, 1, 1, window]: a slot attends to its columns 0..length (a done
        # slot past the window to its last column: finite, and its output is not used)
        bias = torch.zeros(cols.shape, dtype=torch.float32, device=pos.device).expand(b, -1)
        bias = bias.masked_fill(cols[None, :] > pos.clamp(max=window - 1),
                                float("-inf"))[:, None, None, :]
        kvh, group = self.kv_heads, self.heads // self.kv_heads
        # the flat row of (slot, kv head, column length) in a [b * kvh * C, D] view
        flat = ((rows[:, None] * kvh + torch.arange(kvh, device=pos.device)[None, :])
                * capacity + pos).view(-1)
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, 1, -1, self.head_dim)
            k = attn.k_proj(h).view(b, 1, -1, self.head_dim)
            v = attn.v_proj(h).view(b, 1, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, 1, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            p.keys[i].view(-1, self.head_dim).index_copy_(0, flat, k.reshape(-1, self.head_dim))
            p.values[i].view(-1, self.head_dim).index_copy_(0, flat,
                                                            v.reshape(-1, self.head_dim))
            keys, values = p.keys[i][:, :, :window], p.values[i][:, :, :window]
            # one query a slot: scores [b, kvh, group, C] against the slot's columns; fp32
            # softmax (as sdpa's math path)
            qg = q.reshape(b, kvh, group, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(2, 3))
            probs = (scores.float() * self.scaling + bias).softmax(-1).to(values.dtype)
            o = torch.matmul(probs, values)  # [b, kvh, g, D]
            x = x + attn.o_proj(o.reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.decoder.norm(x))[:, 0].float()

    @torch.no_grad()
    def _step(self, p: _Pool, window: int, greedy: bool, temperature: float, attempts: int,
              max_new: int, top_p: float = 1.0, top_k: int = 0) -> None:
        """One decode step of every slot, in place; no host sync, no data-dependent Python."""
        logits = self._forward(p, window)
        if not greedy:
            logits = restrict(logits, temperature, top_p, top_k)
        phase, ep = p.phase, p.episode
        a1, forced, a2 = phase == A1, phase == FORCED, phase == A2
        attempt = (phase == A2).long()  # 0: attempt 1, 1: attempt 2 (index into count/out)
        n = p.count[ep, attempt]
        if greedy:
            tok = logits.argmax(-1)
        else:
            tok = self._draw(logits, p.seed, ep, attempt, n, temperature)
        sampling = a1 | a2
        p.out[ep, attempt, torch.where(sampling, n, max_new)] = tok  # column N: scratch
        n = n + sampling.long()
        p.count[ep, attempt] = n
        is_eos = torch.isin(tok, self._eos_t)
        end1 = a1 & (is_eos | (n >= max_new))
        end2 = a2 & (is_eos | (n >= max_new))
        p.ended_eos[ep] = torch.where(end1, is_eos, p.ended_eos[ep])
        which = p.ended_eos[ep].long()
        instr_len = p.instr_len[ep, which]
        nxt = p.instr[ep, which, p.forced.clamp(max=p.instr.shape[2] - 1)]
        new_forced = p.forced + forced.long()
        new_phase = torch.where(end1, FORCED if attempts == 2 else DONE, phase)
        new_phase = torch.where(forced & (new_forced >= instr_len), A2, new_phase)
        new_phase = torch.where(end2, DONE, new_phase)
        p.length.add_((phase != DONE).long())
        p.inp.copy_(torch.where(new_phase == DONE, self.pad, torch.where(forced, nxt, tok)))
        p.forced.copy_(new_forced)
        p.phase.copy_(new_phase)

    def _runner(self, b: int, window: int, greedy, temperature, attempts, max_new,
                top_p=1.0, top_k=0):
        """The callable that runs one step on bucket b attending to `window` columns (eager,
        compiled or a graph replay)."""
        key = (b, window, greedy, float(temperature), attempts, max_new, top_p, top_k)
        if key in self._steps:
            return self._steps[key]
        view = self.pool.view(b)

        def step():
            self._step(view, window, greedy, temperature, attempts, max_new, top_p, top_k)

        fn = step
        if self.compile:
            # a graph per bucket needs static shapes; without graphs (a CPU) the second bucket
            # makes the slot count dynamic and every later bucket reuses that compile (a
            # 24-layer step compiles in ~30 s on this 2-core CPU)
            fn = torch.compile(step, fullgraph=True, dynamic=False if self.graphs else None)
        if self.graphs:
            if self._graph_pool is None:  # one memory pool for every graph: one runs at a time
                self._graph_pool = torch.cuda.graph_pool_handle()
            fn = _capture(fn, view, self._graph_pool)
        self._steps[key] = fn
        return fn

    # ---- the rollout ------------------------------------------------------------------
    def _allocate(self, slots: int, capacity: int, episodes: int, max_new: int,
                  instr_width: int) -> None:
        """The pool, reused while it is big enough (graphs captured on it stay valid)."""
        p = self.pool
        if (p is not None and p.length.shape[0] >= slots and p.keys[0].shape[2] >= capacity
                and p.out.shape[0] >= episodes + 1 and p.out.shape[2] == max_new + 1
                and p.instr.shape[2] >= instr_width):
            return
        dev, layers = self.device, len(self.decoder.layers)
        if p is not None:  # grow to cover both
            slots = max(slots, p.length.shape[0])
            capacity = max(capacity, p.keys[0].shape[2])
            episodes = max(episodes, p.out.shape[0] - 1)
            instr_width = max(instr_width, p.instr.shape[2])
        self.pool = None
        self._steps.clear()  # their buffers are gone
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        kv = lambda: [torch.zeros(shape, dtype=self.dtype, device=dev)  # noqa: E731
                      for _ in range(layers)]
        long = lambda *s: torch.zeros(s, dtype=torch.long, device=dev)  # noqa: E731
        self.pool = _Pool(kv(), kv(), long(slots), long(slots), long(slots), long(slots),
                          long(slots), long(episodes + 1, 2, max_new + 1),
                          long(episodes + 1, 2),
                          torch.zeros(episodes + 1, dtype=torch.bool, device=dev),
                          long(episodes + 1, 2, instr_width), long(episodes + 1, 2),
                          long(1))

    @torch.no_grad()
    def episodes(self, prompts: list[list[int]], instructions: Sequence[tuple] | None = None,
                 *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 attempts: int = 2, seed: int | None = None,
                 generator: torch.Generator | None = None, top_p: float = 1.0,
                 top_k: int = 0, stop=None, **_):
        """The rollout protocol (score_fast.rollout; TwoTurnSampler and VLLMEngine have it
        too): attempt 1 (and with attempts=2 the instruction, then attempt 2) of each
        prompt. instructions[i]: (ids when attempt 1 did not end with eos, ids when it did);
        each non-empty. seed: the noise's seed (None: drawn from `generator`, torch's global
        RNG when that is None). top_p / top_k: the nucleus (score_fast.sampler's rule) and
        the k most likely tokens, in the step. stop: strings for every prompt or a list per
        prompt; an attempt ends after the token that completes one (the sampler's rule),
        found at the host's looks and the slot's length rewound there (each look then reads
        the new tokens: a sync). Other keywords (eos, in_flight) are the other backends':
        the eos is the constructor's, the episodes in flight max_slots. Returns (attempt-1
        ids, attempt-2 ids, info) per prompt, each up to and including its first eos ([]
        for attempt 2 with attempts=1); info: prefill_tokens, decode_tokens (one a slot a
        step until it is done) and attempt1_seconds / attempt2_seconds None: the attempts
        of different episodes share steps."""
        from score_fast.sampler import stop_lists
        if attempts not in (1, 2):
            raise ValueError(f"attempts={attempts}: 1 or 2")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: at least 1")
        if not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(f"top_p={top_p}, top_k={top_k}: top_p in (0, 1], top_k >= 0")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        if attempts == 2:
            if instructions is None or len(instructions) != len(prompts):
                raise ValueError(f"{0 if instructions is None else len(instructions)} "
                                 f"instruction pairs for {len(prompts)} prompts")
            if any(len(i) != 2 or not len(i[0]) or not len(i[1]) for i in instructions):
                raise ValueError("each instruction is a pair (not ended by eos, ended by "
                                 "eos) of non-empty id lists")
        stops = stop_lists(stop, len(prompts), self.decode)
        greedy = greedy or temperature == 0
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31, (1,), generator=generator))
        out1: list = [None] * len(prompts)
        out2: list = [None] * len(prompts)
        prefilled = self.stats["prefill_tokens"]
        sampling = (greedy, temperature, attempts, max_new_tokens, top_p, top_k)
        wave = self._slots(prompts, instructions, attempts, max_new_tokens)
        for lo in range(0, len(prompts), wave):
            idx = list(range(lo, min(lo + wave, len(prompts))))
            a1, a2 = self._wave([prompts[i] for i in idx],
                                [instructions[i] for i in idx] if attempts == 2 else None,
                                sampling, seed, lo, [stops[i] for i in idx])
            for j, i in enumerate(idx):
                out1[i], out2[i] = a1[j], a2[j]
        fed = sum(map(len, out1)) + (sum(len(a) for a in out2) + sum(
            len(pair[bool(a) and a[-1] in self.eos]) for a, pair in zip(out1, instructions))
            if attempts == 2 else 0)
        return out1, out2, {"attempt1_seconds": None, "attempt2_seconds": None,
                            "prefill_tokens": self.stats["prefill_tokens"] - prefilled,
                            "decode_tokens": fed}

    def _capacity(self, prompts, instructions, attempts: int, max_new: int) -> int:
        instr = max((len(x) for pair in instructions or () for x in pair), default=1)
        return max(map(len, prompts)) + (instr + max_new if attempts == 2 else 0) + max_new + 1

    def _slots(self, prompts, instructions, attempts: int, max_new: int) -> int:
        """Episodes a wave: max_slots, or all (<= 512) where their keys/values fit half the
        free memory (the pool already allocated counts as free)."""
        if self.max_slots is not None:
            return self.max_slots
        want = min(len(prompts), BUCKETS[-1])
        capacity = self._capacity(prompts, instructions, attempts, max_new)
        per_slot = (2 * len(self.decoder.layers) * self.kv_heads * self.head_dim * capacity
                    * torch.empty((), dtype=self.dtype).element_size())
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):  # not Linux: no limit known
                return want
        if self.pool is not None:
            free += sum(t.nbytes for t in (*self.pool.keys, *self.pool.values))
        return max(1, min(want, int(free * 0.5) // per_slot))

    def _wave(self, prompts, instructions, sampling, seed, first_episode, stops):
        greedy, temperature, attempts, max_new, top_p, top_k = sampling
        n = len(prompts)
        instr_width = max((len(x) for pair in instructions or () for x in pair), default=1)
        capacity = self._capacity(prompts, instructions, attempts, max_new)
        self._allocate(_bucket(n, BUCKETS[-1]), capacity, n, max_new, instr_width)
        p = self.pool
        s_all = p.length.shape[0]
        p.out.zero_()
        p.count.zero_()
        p.ended_eos.zero_()
        # the instruction variants built on the host, then one copy each (not two small
        # host-to-device copies an episode)
        instr = torch.zeros(p.instr.shape, dtype=torch.long)
        instr_len = torch.ones(p.instr_len.shape, dtype=torch.long)
        for e, pair in enumerate(instructions or ()):
            for w, ids in enumerate(pair):
                instr[e, w, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                instr_len[e, w] = len(ids)
        p.instr.copy_(instr)
        p.instr_len.copy_(instr_len)
        # the noise of episode e of this wave: (the wave's seed, e); the wave's seed folds in
        # its first episode, so every episode of the call has its own stream
        p.seed.fill_((seed + _hash_host(first_episode)) & 0x7FFFFFFF)
        self._prefill(prompts)
        p.phase.fill_(DONE)
        p.phase[:n] = A1
        p.episode.fill_(p.out.shape[0] - 1)  # the scratch row
        p.episode[:n] = torch.arange(n, device=self.device)
        p.forced.zero_()
        b = _bucket(n, s_all)
        max_steps = max_new + 1 + (instr_width + max_new if attempts == 2 else 0)
        cuts = _Stops(self, prompts, stops, attempts, max_new) if any(stops) else None
        if cuts is not None:  # attempt 1 may be rewound up to one look after its stop
            max_steps += self.check_every
        steps = 0
        # on a GPU the host reads the phases through an async copy one check behind (a slot
        # it sees done is done; one it sees live may have just finished: it is moved along);
        # stop strings need the tokens themselves at each look
        lag = self.device.type == "cuda" and cuts is None
        host = torch.empty((2, s_all), dtype=torch.long, pin_memory=lag)  # phase, length
        event = torch.cuda.Event() if lag else None
        pending = False
        # attention reads columns [0, window): a multiple of col_block above every live
        # slot's length until the next decision: the next check_every steps feed positions up
        # to length + check_every - 1, so window >= longest + check_every (tight: the greedy
        # test fails at one less); 2 x check_every on a GPU, whose view is one check old
        ahead = (2 if lag else 1) * self.check_every
        reach = lambda longest: min(_round_up(longest + ahead, self.col_block),  # noqa: E731
                                    p.keys[0].shape[2])
        window = reach(max(map(len, prompts)))
        while steps < max_steps:
            run = self._runner(b, window, *sampling)
            for _ in range(min(self.check_every, max_steps - steps)):
                run()
                steps += 1
                self.stats["slot_steps"] += b
            if lag and not pending:  # the first copy: nothing to read yet
                host[:, :b].copy_(torch.stack([p.phase[:b], p.length[:b]]), non_blocking=True)
                event.record()
                pending = True
                continue
            if lag:
                event.synchronize()
            else:
                host[:, :b].copy_(torch.stack([p.phase[:b], p.length[:b]]))
            self.stats["checks"] += 1
            if cuts is not None and cuts.look(b):  # rewound slots: read them again
                host[:, :b].copy_(torch.stack([p.phase[:b], p.length[:b]]))
            live = (host[0, :b] != DONE).nonzero().view(-1)  # host tensors: no sync
            if not len(live):
                break
            window = reach(int(host[1, live].max()))
            smaller = _bucket(len(live), s_all)
            if smaller < b:
                self._compact(live.tolist(), smaller)
                b = smaller
            if lag:
                host[:, :b].copy_(torch.stack([p.phase[:b], p.length[:b]]), non_blocking=True)
                event.record()
        self.stats["steps"] += steps
        counts = p.count[:n].tolist()
        toks = p.out[:n].tolist()
        a1 = [toks[e][0][:counts[e][0]] for e in range(n)]
        a2 = [toks[e][1][:counts[e][1]] for e in range(n)]
        return a1, a2

    def _prefill(self, prompts: list[list[int]]) -> None:
        """Each distinct prompt's tokens but its last, once, through the model's own forward;
        its keys/values into every slot of that prompt. Sets length and inp."""
        from score_fast.sampler import _ForwardKwargs
        from transformers import DynamicCache
        p, dev = self.pool, self.device
        n = len(prompts)
        p.length.zero_()
        p.inp.fill_(self.pad)
        p.length[:n] = torch.tensor([len(x) - 1 for x in prompts], device=dev)
        p.inp[:n] = torch.tensor([x[-1] for x in prompts], device=dev)
        distinct: dict = {}
        for x in prompts:
            distinct.setdefault(tuple(x[:-1]), len(distinct))
        heads = [list(k) for k in distinct]
        width = max(map(len, heads))
        if not width:
            return
        ids = torch.full((len(heads), width), self.pad, dtype=torch.long)
        for r, h in enumerate(heads):
            ids[r, :len(h)] = torch.tensor(h, dtype=torch.long)
        cache = DynamicCache()
        kwargs = _ForwardKwargs.of(self.decoder.forward, logits=False)(cache)
        # right padding: causal attention keeps the pads out of every real token's keys
        self.decoder(input_ids=ids.to(dev), **kwargs)
        self.stats["prefill_tokens"] += sum(map(len, heads))
        src = torch.tensor([distinct[tuple(x[:-1])] for x in prompts], device=dev)
        for i, layer in enumerate(cache.layers):
            p.keys[i][:n, :, :width] = layer.keys[src].to(self.dtype)
            p.values[i][:n, :, :width] = layer.values[src].to(self.dtype)

    def _compact(self, live: list[int], b: int) -> None:
        """Move the live slots to the front of the pool; slots [len(live), b) become empty."""
        p = self.pool
        src = torch.tensor(live, device=self.device)
        k = len(live)
        for buf in (*p.keys, *p.values, p.length, p.inp, p.phase, p.forced, p.episode):
            buf[:k] = buf[src]
        p.phase[k:b] = DONE
        p.episode[k:b] = p.out.shape[0] - 1
        p.inp[k:b] = self.pad
        self.stats["compactions"] += 1


class _Stops:
    """Stop strings at the host's looks: each attempt's tokens since the last look are
    checked as score_fast.sampler checks them (after each token that is neither eos nor the
    max_new_tokens-th, its last len(stop) + 2 tokens decoded); an attempt with a stop is cut
    after that token. Attempt 1 cut: its slot is rewound to that token (length, input) and
    restarts the instruction (the columns past it are rewritten); attempt 2 cut: done."""

    def __init__(self, engine, prompts, stops, attempts: int, max_new: int):
        from score_fast.sampler import stop_in, stop_window
        self.stop_in = stop_in  # the sampler's rule, imported once (sampler loads triton)
        self.engine, self.stops, self.attempts, self.max_new = engine, stops, attempts, max_new
        self.prompt_len = [len(x) for x in prompts]
        self.width = [stop_window(row) for row in stops]
        self.checked = [[0, 0] for _ in prompts]  # tokens of each attempt checked so far

    def look(self, b: int) -> bool:
        """Check the new tokens, cut where a stop string is; True when a slot was changed."""
        p = self.engine.pool
        n = len(self.stops)
        counts = p.count[:n].tolist()
        slot = {e: s for s, e in enumerate(p.episode[:b].tolist()) if e < n}
        toks = None
        changed = False
        for e in range(n):
            for a in range(self.attempts):
                done, c = self.checked[e][a], counts[e][a]
                if not self.stops[e] or c <= done:
                    continue
                if toks is None:
                    toks = p.out[:n].tolist()
                row = toks[e][a]
                cut = next((j for j in range(done + 1, c + 1) if self._stops_at(e, row, j)),
                           None)
                self.checked[e][a] = c
                if cut is None:
                    continue
                changed = True
                self._cut(e, a, cut, row[cut - 1], slot[e])
                if a == 0:
                    self.checked[e] = [cut, 0]
                    break  # attempt 2's tokens, if any, are gone
        return changed

    def _stops_at(self, e: int, row: list, j: int) -> bool:
        """The sampler's rule after token j (1-based): eos or max_new_tokens end the attempt
        first; else a stop string in the decoded tail."""
        if row[j - 1] in self.engine.eos or j >= self.max_new:
            return False
        return self.stop_in(row[:j], self.stops[e], self.width[e], self.engine.decode)

    def _cut(self, e: int, a: int, j: int, last: int, s: int) -> None:
        p = self.engine.pool
        p.count[e, a] = j
        if a == 1 or self.attempts == 1:
            p.phase[s], p.inp[s] = DONE, self.engine.pad
            return
        # attempt 1 ends after token j - 1 (fed at prompt_len + j - 1): from there the step
        # feeds it, then the "not ended by eos" instruction, then samples attempt 2
        p.count[e, 1] = 0
        p.ended_eos[e] = False
        p.phase[s], p.forced[s], p.inp[s] = FORCED, 0, last
        p.length[s] = self.prompt_len[e] + j - 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hash_host(x: int) -> int:
    return (x * 0x9E3779B1) & 0x7FFFFFFF


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _bucket(n: int, cap: int) -> int:
    """The smallest bucket size >= n (at most cap)."""
    for b in BUCKETS:
        if b >= n:
            return min(b, cap)
    return min(cap, max(n, cap))


def _capture(fn, view: _Pool, pool):
    """A CUDA graph of `fn` (which reads and writes only `view`'s buffers and the model's
    parameters): one warm-up step on a side stream (allocations, autotuning) with the state
    restored after it (its keys/values and token are what the real step writes again), then
    the capture, which runs nothing."""
    state = [view.length, view.inp, view.phase, view.forced, view.count, view.ended_eos]
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    for t, s in zip(state, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay
