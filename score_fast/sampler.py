"""Rollout engine: batched KV-cache sampling for two-attempt (SCoRe) episodes.

    sampler = TwoTurnSampler(model, eos_id, pad_id, batch_size=64)
    a1, state = sampler.attempt1(prompts, max_new_tokens=256, temperature=1.0)
    a2 = sampler.attempt2(state, [fmt.instruction_ids(p, a) for p, a in zip(problems, a1)],
                          max_new_tokens=256)
    sampler.stats  # tokens each forward processed, prefill / decode totals

Design (any Hugging Face causal LM that takes a cache, a 2-D or 4-D attention mask and
position ids; transformers 5.x: `cache=` from 5.2x, `past_key_values=` before, e.g. 5.17;
the section "transformers adaptations" holds what depends on the version):

* Batches: rows are left-padded (right-aligned) with explicit position ids (each row counts
  from 0 at its first real token) and an explicit mask; more rows than batch_size are
  length-sorted into batches. Only the last position's logits are computed
  (logits_to_keep=1).
* Cache: per layer a buffer [B, kv_heads, capacity, head_dim] preallocated for the turn
  (prefix + new block + max_new_tokens), a DynamicLayer subclass inside a DynamicCache:
  a decode step writes its column in place instead of concatenating the whole cache.
* Masks: for sdpa and eager attention the engine passes the 4-D mask itself (bool for sdpa,
  additive for eager; causal inside a prefill block, pad slots masked, a pad query sees
  itself so no row is all-masked), so transformers' mask building is skipped per step;
  other implementations (flash, flex) get the 2-D padding mask.
* Finished rows stop costing compute: a row that ends (eos, a stop string, max_new_tokens)
  is no longer sampled nor fed (a pad with a masked column holds its slot), and once the
  finished rows reach `compact_at` of the batch (default 1/8; 0 = at once) the batch, the
  cache (one index-select per layer's key and value buffer) and the mask are compacted to
  the live rows, and leading cache columns that no live row uses are cut. Compacting copies
  the live cache, about what one step reads, so on a CPU doing it at every finished row costs
  more than the rows it drops; on a GPU set compact_at lower if decode is compute bound.
* Attempt 2 continues from attempt 1's KV cache. In attempt 1 a row's last token is fed in
  the step it is sampled (the step that decodes the next token for the others), so its
  cache holds prompt + the whole attempt 1; its keys/values (real positions only) are then
  copied out of the batch (one gather per buffer) into the returned state. attempt2 builds
  each batch's cache from those rows, left-padded to the longest, and prefills each row's
  instruction right-aligned in the new block (pad slots between prefix and instruction are
  masked out), positions continuing from the row's true length: only the instruction
  tokens are prefilled, never the prompt or attempt 1 (stats.summary("attempt2")).
* Greedy decoding gives the same tokens as `model.generate(do_sample=False)` on the full
  left-padded context (tests/test_sampler.py). Sampling with top_p = 1 (fused sampling): the
  step runs the model's decoder only and samples from its last hidden state and the LM-head
  weight with score_fast.kernels.linear_sample (Gumbel-max over vocabulary tiles fused with
  the LM-head matmul: no [B, V] logits, softmax or multinomial; exact in distribution). On
  a 2-core CPU at B = 32, V = 32000 softmax + multinomial cost more than the LM-head matmul
  itself (bench/bench_sampling.py). Used where the logits are exactly last hidden state @
  lm_head.weight.T (+ bias): a plain nn.Linear head with plain tensors (not an FSDP2 shard,
  not a LoRA-wrapped head) and no logit scaling or soft-capping in the config; other models
  and top_p < 1 take softmax(logits / temperature), then top-p, then torch.multinomial.
  SCORE_FAST_FUSED_SAMPLING=0 turns fused sampling off, =1 demands it (an error naming why
  where the model does not allow it); unset: on wherever allowed. Either way randomness comes
  from `generator` (torch's global RNG when None), live rows only: for given inputs the RNG
  consumption is deterministic (the two paths draw differently: same distribution, other
  tokens).
* No CUDA graphs here (shapes change as rows are compacted, and the step goes through the
  model's Python forward): score_fast.slot_engine is the graph-captured engine, and this
  sampler its reference and the engine for the models it does not run. Models with
  sliding-window or other non-full attention layers are refused (the padded-cache layout
  assumes full attention).

Memory: the state of attempt 1 holds the keys/values of every episode at once (prompt +
attempt 1 tokens x layers x 2 x kv_heads x head_dim) until attempt 2 takes it.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from score_fast.kernels.linear_sample import linear_sample
from score_fast.models import model_device

__all__ = ["TwoTurnSampler", "SamplerStats", "TurnState", "sample_next"]


@dataclass
class SamplerStats:
    """Counters of what the model was run on. `forwards` lists one entry per forward:
    (phase, kind, real tokens, slots = batch x width incl. padding)."""
    prefill_tokens: int = 0
    decode_tokens: int = 0
    forwards: list = field(default_factory=list)

    def record(self, phase: str, kind: str, tokens: int, slots: int) -> None:
        if kind == "prefill":
            self.prefill_tokens += tokens
        else:
            self.decode_tokens += tokens
        self.forwards.append((phase, kind, tokens, slots))

    def summary(self, phase: str | None = None) -> dict:
        rows = [f for f in self.forwards if phase is None or f[0] == phase]
        out = {"forwards": len(rows)}
        for kind in ("prefill", "decode"):
            sel = [f for f in rows if f[1] == kind]
            out[f"{kind}_forwards"] = len(sel)
            out[f"{kind}_tokens"] = sum(f[2] for f in sel)
            out[f"{kind}_slots"] = sum(f[3] for f in sel)
        return out

    def reset(self) -> None:
        self.prefill_tokens = self.decode_tokens = 0
        self.forwards = []


@dataclass
class _Row:
    """One sequence's cached keys/values: per layer (k, v) of shape [kv_heads, length, dim]."""
    kv: list | None
    length: int


@dataclass
class TurnState:
    """What attempt 1 leaves for attempt 2: each row's cache (prompt + attempt 1)."""
    rows: list


def sample_next(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from [B, V] logits."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > top_p  # tokens past the nucleus; the first is kept
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_lists(stop, n: int, decode) -> list[list[str]]:
    """Each row's stop strings from `stop` (None, strings for every row, or a list per row);
    decode (ids -> text) is needed where any row has one."""
    if not stop:
        return [[] for _ in range(n)]
    if isinstance(stop[0], str):
        per = [list(stop)] * n
    else:
        if len(stop) != n:
            raise ValueError(f"{len(stop)} stop lists for {n} rows")
        per = [list(s or []) for s in stop]
    if any(per) and decode is None:
        raise ValueError("stop strings need decode= (a tokenizer's decode)")
    return per


def stop_window(stops: list[str]) -> int:
    """Tokens whose text can hold a stop string just completed: each decodes to >= 1
    character, +2 for a token that straddles the stop's start."""
    return max((len(stop) for stop in stops), default=0) + 2


def stop_in(ids: list[int], stops: list[str], window: int, decode) -> bool:
    """Whether the text of the last `window` tokens of ids holds one of `stops`."""
    tail = decode(ids[-window:])
    return any(stop in tail for stop in stops)


# config fields of models whose logits are not last hidden @ lm_head.weight.T (+ bias)
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                "output_multiplier_scale", "lm_head_multiplier")


def _fused_head(model):
    """(decoder, lm_head) when the model's logits are exactly decoder(...)'s last hidden
    state @ lm_head.weight.T (+ bias), else the reason they are not (a string)."""
    from score_fast.models import lora_base
    base = lora_base(model)
    cfg = getattr(base, "config", None)
    if hasattr(cfg, "get_text_config") and cfg.get_text_config() is not cfg:
        return "a composite (e.g. vision-language) model: its decoder's inputs are its own"
    extras = [k for k in _HEAD_EXTRAS if getattr(cfg, k, None) not in (None, 1, 1.0)]
    if extras:
        return f"the model scales or caps its logits ({', '.join(extras)})"
    try:
        head = base.get_output_embeddings()
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError) as e:
        return f"no output layer or decoder module found ({e})"
    if type(head) is not torch.nn.Linear:
        kind = type(head)
        return f"its output layer is {kind.__module__}.{kind.__qualname__}, not torch.nn.Linear"
    if any(type(p.data) is not torch.Tensor for p in head.parameters()):
        return "its LM-head weight is not a plain tensor (an FSDP2 shard?)"
    if any(type(m).__name__.startswith("FSDP") for m in (model, base)):
        return "it is an FSDP2 module (its decoder cannot be called alone)"
    if decoder is None or decoder is base:
        return "it has no separate decoder module"
    return decoder, head


def _fused_sampling(model):
    """(decoder, lm_head) where fused sampling is on (module doc), else None: unset
    SCORE_FAST_FUSED_SAMPLING means wherever the model allows it, 0 never, 1 always (an error
    naming why where the model does not allow it)."""
    want = os.environ.get("SCORE_FAST_FUSED_SAMPLING", "auto").lower()
    if want not in ("auto", "0", "1"):
        raise ValueError(f"SCORE_FAST_FUSED_SAMPLING must be 0, 1 or unset, got {want!r}")
    head = _fused_head(model) if model is not None and want != "0" else "turned off"
    if want == "1" and isinstance(head, str):
        raise ValueError(f"SCORE_FAST_FUSED_SAMPLING=1 but this model cannot sample fused: "
                         f"{head}")
    return None if isinstance(head, str) else head


# ---- transformers adaptations -------------------------------------------------------------
# Everything that depends on how this transformers version (and the model's attention
# implementation) takes a cache, its keyword arguments and a mask lives here; the sampler
# below only calls these.


@dataclass(frozen=True)
class _ForwardKwargs:
    """The cache / logits keyword arguments a model's (or decoder's) forward takes:
    transformers >= 5.2x names the cache argument `cache`, earlier 5.x `past_key_values`;
    `logits_to_keep` (only the last position's logits) where the forward has it."""
    cache_name: str
    logits_to_keep: bool

    @classmethod
    def of(cls, forward, *, logits: bool = True) -> "_ForwardKwargs":
        """From `forward`'s signature; logits=False for a decoder (it returns hidden states,
        there are no logits to cut)."""
        try:
            params = inspect.signature(forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        return cls("cache" if "cache" in params else "past_key_values",
                   logits and "logits_to_keep" in params)

    def __call__(self, cache) -> dict:
        kwargs = {self.cache_name: cache, "use_cache": True}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return kwargs


def _mask_kind_of(config) -> str:
    """sdpa / eager attention take a prepared 4-D mask as is (so transformers' per-step mask
    building is skipped); other implementations (flash, flex) get the 2-D padding mask."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return {"sdpa": "sdpa", "eager": "eager"}.get(impl, "2d")


def _attention_mask(mask: torch.Tensor, new_tokens: int, kind: str, dtype) -> torch.Tensor:
    """The attention_mask argument for `new_tokens` queries at the end of `mask` ([B, kv]
    bool over the cache incl. the new tokens, True = real) in the form `kind` wants: 2-D
    long, 4-D bool (sdpa) or 4-D additive in `dtype` (eager)."""
    if kind == "2d":
        return mask.long()
    mask4 = mask[:, None, None, :]
    if new_tokens > 1:  # causal within the new block; pad queries see themselves (no NaN)
        width = mask.shape[1]
        query_col = torch.arange(new_tokens, device=mask.device)[:, None] + (width - new_tokens)
        key_col = torch.arange(width, device=mask.device)[None, :]
        mask4 = (mask4 & (key_col <= query_col)) | (key_col == query_col)
    if kind == "eager":
        mask4 = torch.zeros(mask4.shape, dtype=dtype, device=mask4.device).masked_fill_(
            ~mask4, torch.finfo(dtype).min)
    return mask4


class _BufferLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a preallocated [B, H, capacity, D] buffer:
    appending a step writes in place (no concatenation of the whole cache per step);
    `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int, kbuf=None, vbuf=None, n: int = 0):
        super().__init__()
        self.capacity, self.kbuf, self.vbuf, self.n = capacity, kbuf, vbuf, n
        if kbuf is not None:
            self.device, self.is_initialized = kbuf.device, True
            self._views()

    def lazy_initialization(self, key_states, value_states) -> None:
        batch, heads, _, dim = key_states.shape
        self.device, self.is_initialized = key_states.device, True
        self.kbuf = key_states.new_empty((batch, heads, self.capacity, dim))
        self.vbuf = value_states.new_empty((batch, value_states.shape[1], self.capacity,
                                            value_states.shape[3]))

    def _views(self):
        self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.n + key_states.shape[-2]
        if end > self.kbuf.shape[2]:  # out of room (not expected: capacity is planned)
            grow = max(end, 2 * self.kbuf.shape[2]) - self.kbuf.shape[2]
            self.kbuf = torch.nn.functional.pad(self.kbuf, (0, 0, 0, grow))
            self.vbuf = torch.nn.functional.pad(self.vbuf, (0, 0, 0, grow))
        self.kbuf[:, :, self.n:end] = key_states
        self.vbuf[:, :, self.n:end] = value_states
        self.n = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n


def _cache(layers: list[_BufferLayer]) -> DynamicCache:
    """A DynamicCache made of our layers (its own would concatenate per step)."""
    cache = DynamicCache()
    cache.layers = layers
    return cache


# ---- the sampler ----------------------------------------------------------------------------


@dataclass
class _Batch:
    """One batch in the middle of a turn. Slots are the batch's rows in the cache; a retired
    slot (its row finished) stays until the next compaction, masked and fed pads."""
    cache: DynamicCache
    mask: torch.Tensor  # [slots, capacity] bool: True where a slot's column is a real token
    filled: int  # cache columns written so far
    lengths: torch.Tensor  # [slots] each row's true length = position id of its next token
    slot_row: list  # batch slot -> row of this batch, -1 once retired
    out: torch.Tensor  # the last forward's logits (or hidden states, fused) of every slot
    device: torch.device  # where the batch lives (the model's device)
    retired: int = 0  # retired slots still in the batch

    def live_slots(self) -> list[int]:
        return [slot for slot, row in enumerate(self.slot_row) if row >= 0]

    def retire(self, slots: list[int]) -> None:
        for slot in slots:
            self.slot_row[slot] = -1
        self.retired += len(slots)


class TwoTurnSampler:
    """Batched sampling of attempt 1 and attempt 2 with attempt 2 reusing attempt 1's cache.

    eos_id: an id or a collection of ids that end an attempt; pad_id: the id padding slots
    hold (never attended to). decode: ids -> text, needed only for stop strings.
    batch_size: rows per batch (the rows are length-sorted into batches)."""

    def __init__(self, model, eos_id: int | Sequence[int] | None, pad_id: int, *,
                 decode: Callable[[list[int]], str] | None = None, batch_size: int = 64,
                 compact_at: float = 0.125):
        from score_fast.models import compute_dtype, lora_base
        self.model = model
        if eos_id is None:
            self.eos = set()
        elif isinstance(eos_id, int):
            self.eos = {eos_id}
        else:
            self.eos = set(eos_id)
        self.pad = pad_id if pad_id is not None else (min(self.eos) if self.eos else 0)
        self.decode = decode
        self.batch_size = batch_size
        self.compact_at = compact_at
        self.stats = SamplerStats()
        cfg = getattr(model, "config", None)
        types = set(getattr(cfg, "layer_types", None) or [])
        if types - {"full_attention"} or (getattr(cfg, "use_sliding_window", False)
                                          and getattr(cfg, "sliding_window", None)):
            raise NotImplementedError("TwoTurnSampler supports full-attention models only; "
                                      f"this one has layer types {sorted(types)}")
        # a peft model is called as itself (under FSDP2 it is the root unit whose hooks
        # gather the embeddings), its keyword arguments reaching its base's forward: the
        # base's signature says which (cache, logits_to_keep)
        self._model_kwargs = _ForwardKwargs.of(lora_base(model).forward)
        self._mask_kind = _mask_kind_of(cfg)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self._n_layers = text.num_hidden_layers
        # the compute dtype (an FSDP2 bf16 model keeps fp32 master parameters)
        self._dtype = compute_dtype(model) if model is not None else torch.float32
        self._fused = _fused_sampling(model)
        if self._fused is not None:
            self._decoder_kwargs = _ForwardKwargs.of(self._fused[0].forward, logits=False)

    # ---- public API -------------------------------------------------------------------
    def attempt1(self, prompts: list[list[int]], **kw) -> tuple[list[list[int]], TurnState]:
        """Sample one continuation per prompt. Returns the new ids of each (up to and
        including the first eos; an attempt cut by max_new_tokens or a stop string has no
        eos) and the state attempt2 continues from."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        rows = [_Row(None, 0) for _ in prompts]
        return self._turn(rows, prompts, keep=True, phase="attempt1", **kw)

    def attempt2(self, state: TurnState, instruction_ids: list[list[int]], keep: bool = False,
                 **kw):
        """Continue every row of `state` with its instruction, then sample attempt 2. Only the
        instruction tokens are prefilled. `state` is only read (it can be continued again,
        e.g. several attempt 2s per attempt 1); drop it to free its memory. Returns the new
        ids (and the next state with keep=True, for a further turn)."""
        if len(instruction_ids) != len(state.rows):
            raise ValueError(f"{len(instruction_ids)} instructions for {len(state.rows)} rows")
        if any(len(x) == 0 for x in instruction_ids):
            raise ValueError("empty instruction: attempt 2 needs at least one new token")
        out, nxt = self._turn(state.rows, instruction_ids, keep=keep, phase="attempt2", **kw)
        return (out, nxt) if keep else out

    def episodes(self, prompts: list[list[int]], instructions=None, *, max_new_tokens: int,
                 temperature: float = 1.0, greedy: bool = False, attempts: int = 2,
                 in_flight: int | None = None, generator: torch.Generator | None = None,
                 top_p: float = 1.0, stop=None, **_):
        """The rollout protocol (score_fast.rollout; SlotEngine and VLLMEngine have it too):
        attempt 1 of each prompt and, with attempts=2, attempt 2 after instructions[i][0]
        (attempt 1 not ended by eos) or [1] (ended by eos). in_flight: episodes taken
        through both attempts at a time (attempt 1's cache is kept for those only). Other
        keywords (eos) are the other backends': the eos is the constructor's. top_p and stop
        (strings for every row or a list per row) as in sample(). Returns (attempt-1 ids,
        attempt-2 ids, info): info holds attempt1_seconds,
        attempt2_seconds, prefill_tokens and decode_tokens of this call."""
        import time
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                  generator=generator, top_p=top_p, stop=stop)
        before = (self.stats.prefill_tokens, self.stats.decode_tokens)
        spent = [0.0, 0.0]
        a1: list = []
        a2: list = []
        if attempts == 1:  # no second turn: nothing kept, no chunks
            t = time.perf_counter()
            a1 = self.sample(prompts, **kw)
            spent[0] = time.perf_counter() - t
            a2 = [[] for _ in prompts]
        else:
            step = in_flight or max(len(prompts), 1)
            for lo in range(0, len(prompts), step):
                t = time.perf_counter()  # host lists back: the device work is done
                b1, state = self.attempt1(prompts[lo:lo + step], **kw)
                spent[0] += time.perf_counter() - t
                pairs = instructions[lo:lo + step]
                chosen = [pair[bool(a) and a[-1] in self.eos] for a, pair in zip(b1, pairs)]
                t = time.perf_counter()
                b2 = self.attempt2(state, chosen, **kw)
                spent[1] += time.perf_counter() - t
                del state  # this chunk's cache, freed before the next chunk
                a1 += b1
                a2 += b2
        return a1, a2, {"attempt1_seconds": spent[0], "attempt2_seconds": spent[1],
                        "prefill_tokens": self.stats.prefill_tokens - before[0],
                        "decode_tokens": self.stats.decode_tokens - before[1]}

    def sample(self, contexts: list[list[int]], **kw) -> list[list[int]]:
        """Single-turn sampling of one continuation per context (no state kept)."""
        rows = [_Row(None, 0) for _ in contexts]
        return self._turn(rows, contexts, keep=False, phase="sample", **kw)[0]

    # ---- internals --------------------------------------------------------------------
    def _turn(self, rows, new_ids, *, keep: bool, phase: str, max_new_tokens: int,
              temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
              stop: Sequence[str] | Sequence[Sequence[str]] | None = None,
              generator: torch.Generator | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: at least 1")
        n = len(rows)
        stops = self._stops(stop, n)
        order = sorted(range(n), key=lambda i: rows[i].length + len(new_ids[i]))
        if n <= self.batch_size:
            order = list(range(n))
        outs: list = [None] * n
        kept: list = [None] * n
        for lo in range(0, n, self.batch_size):
            idx = order[lo:lo + self.batch_size]
            res, res_rows = self._batch([rows[i] for i in idx], [new_ids[i] for i in idx],
                                        [stops[i] for i in idx], keep=keep, phase=phase,
                                        max_new_tokens=max_new_tokens, sampling=dict(
                                            greedy=greedy, temperature=temperature,
                                            top_p=top_p, generator=generator))
            for j, i in enumerate(idx):
                outs[i] = res[j]
                kept[i] = res_rows[j] if keep else None
        return outs, (TurnState(kept) if keep else None)

    def _stops(self, stop, n) -> list[list[str]]:
        return stop_lists(stop, n, self.decode)

    def _forward(self, ids, mask, pos, cache, new_tokens, fused=False):
        """Run `new_tokens` new tokens per row; mask: [B, kv] bool (True = real) over the cache
        including the new tokens. Returns the last position's logits [B, V], or with `fused`
        the decoder's last hidden state [B, H] (the LM head is left to the sampler)."""
        attention_mask = _attention_mask(mask, new_tokens, self._mask_kind, self._dtype)
        if fused:
            out = self._fused[0](input_ids=ids, attention_mask=attention_mask, position_ids=pos,
                                 **self._decoder_kwargs(cache))
            return out.last_hidden_state[:, -1, :]
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=pos,
                         **self._model_kwargs(cache))
        return out.logits[:, -1, :]

    def _fused_for(self, sampling) -> bool:
        """Whether this turn samples fused: the fused sampler draws from softmax(logits / T)
        only, so greedy and top-p sampling keep the logits path."""
        return (self._fused is not None and not sampling["greedy"]
                and sampling["temperature"] > 0 and sampling["top_p"] >= 1.0)

    def _sample(self, out, fused, sampling):
        """The next token of each row from _forward's output (logits, or hidden states)."""
        if not fused:
            return sample_next(out, **sampling)
        head = self._fused[1]
        return linear_sample(out, head.weight, bias=head.bias,
                             temperature=sampling["temperature"],
                             generator=sampling["generator"])

    @torch.no_grad()
    def _batch(self, rows, new_ids, stops, *, keep, phase, max_new_tokens, sampling):
        """One batch of a turn: prefill the rows' new ids, then decode step by step until
        every row finished. Returns each row's new ids and (keep) its cache."""
        fused = self._fused_for(sampling)  # then the forwards return last hidden states
        batch = self._prefill(rows, new_ids, phase, max_new_tokens, fused)
        outs: list[list[int]] = [[] for _ in rows]
        kept: list = [None] * len(rows)
        # only the tail that can hold a stop string just completed is decoded per step
        windows = [stop_window(row_stops) for row_stops in stops]
        for step in range(1, max_new_tokens + 1):
            alive = batch.live_slots()
            tokens = self._sample_live(batch, alive, fused, sampling)
            done_at = self._append(batch, alive, tokens.tolist(), outs, stops, windows,
                                   max_new_tokens)
            finished = [alive[at] for at in done_at]
            # keep: every sampled token is fed (finished rows too: their cache then holds the
            # whole attempt) and the finished rows are retired after the step; otherwise they
            # are retired now and not fed at all
            if keep or not finished:
                feed, feed_tokens = alive, tokens
            else:
                feed, feed_tokens = self._retire_unfed(batch, alive, done_at, tokens)
                if not feed:
                    break
            self._decode_step(batch, feed, feed_tokens, phase, fused)
            if keep and finished:
                self._stash(batch, finished, kept)
                batch.retire(finished)
            if batch.retired == len(batch.slot_row):
                break
            if batch.retired and batch.retired >= self.compact_at * len(batch.slot_row):
                self._compact(batch, room=max_new_tokens - step + 1)
        return outs, kept

    # ---- phases of a batch ------------------------------------------------------------
    def _prefill(self, rows, new_ids, phase, max_new_tokens, fused) -> _Batch:
        """Build the batch's cache from the rows' previous turns and run their new ids."""
        device = model_device(self.model)
        prev_width = max(row.length for row in rows)  # cache columns of the previous turns
        new_width = max(len(row_ids) for row_ids in new_ids)
        # one column per decode step (+1 spare): the buffers never have to grow
        capacity = prev_width + new_width + max_new_tokens + 1
        cache = _cache(self._prefix_layers(rows, prev_width, capacity))
        ids, mask, pos = self._prefill_inputs(rows, new_ids, prev_width, new_width, capacity)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        filled = prev_width + new_width
        lengths = torch.tensor([row.length + len(row_ids) for row, row_ids in zip(rows, new_ids)],
                               dtype=torch.long, device=device)
        self.stats.record(phase, "prefill", sum(map(len, new_ids)), len(rows) * new_width)
        out = self._forward(ids, mask[:, :filled], pos, cache, new_width, fused)
        return _Batch(cache, mask, filled, lengths, list(range(len(rows))), out, device)

    def _prefix_layers(self, rows, prev_width, capacity) -> list[_BufferLayer]:
        """Per layer a buffer holding the rows' previous turns, left-padded to `prev_width`;
        on a first turn empty buffers (the prefill's keys give their shape)."""
        if not prev_width:
            return [_BufferLayer(capacity) for _ in range(self._n_layers)]
        layers = []
        for layer in range(self._n_layers):
            key0, value0 = next(row for row in rows if row.length).kv[layer]
            keys = key0.new_zeros((len(rows), key0.shape[0], capacity, key0.shape[2]))
            values = value0.new_zeros((len(rows), value0.shape[0], capacity, value0.shape[2]))
            for slot, row in enumerate(rows):
                if not row.length:  # nothing cached: its columns stay masked zeros
                    continue
                row_keys, row_values = row.kv[layer]
                keys[slot, :, prev_width - row.length:prev_width] = row_keys
                values[slot, :, prev_width - row.length:prev_width] = row_values
            layers.append(_BufferLayer(capacity, keys, values, prev_width))
        return layers

    def _prefill_inputs(self, rows, new_ids, prev_width, new_width, capacity):
        """Prefill ids and position ids [B, new_width] and the mask [B, capacity]: each row's
        new ids right-aligned in the new block, positions continuing from the row's length."""
        ids = torch.full((len(rows), new_width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), capacity), dtype=torch.bool)
        pos = torch.zeros((len(rows), new_width), dtype=torch.long)
        for slot, (row, row_ids) in enumerate(zip(rows, new_ids)):
            start = new_width - len(row_ids)  # the row's left padding in the new block
            ids[slot, start:] = torch.as_tensor(row_ids, dtype=torch.long)
            mask[slot, prev_width - row.length:prev_width] = True
            mask[slot, prev_width + start:prev_width + new_width] = True
            pos[slot, start:] = torch.arange(row.length, row.length + len(row_ids))
            pos[slot, :start] = row.length  # pad queries: any position, never attended to
        return ids, mask, pos

    def _sample_live(self, batch, alive, fused, sampling):
        """The next token of each live slot in `alive`; retired slots are not sampled, so the
        random stream depends on the live rows only."""
        out = batch.out
        if batch.retired:
            out = out[torch.tensor(alive, device=batch.device)]
        return self._sample(out, fused, sampling)

    def _append(self, batch, alive, tokens, outs, stops, windows, max_new_tokens) -> list[int]:
        """Append each live slot's token to its row's output. Returns the indices into
        `alive` of the rows that finished (eos, max_new_tokens or a stop string)."""
        done_at = []
        for at, (slot, token) in enumerate(zip(alive, tokens)):
            row = batch.slot_row[slot]
            row_out = outs[row]
            row_out.append(token)
            if token in self.eos or len(row_out) >= max_new_tokens:
                done_at.append(at)
            elif stops[row] and stop_in(row_out, stops[row], windows[row], self.decode):
                done_at.append(at)
        return done_at

    @staticmethod
    def _retire_unfed(batch, alive, done_at, tokens):
        """Retire the finished slots before the step (no state is kept, so their last token
        need not enter the cache). Returns the slots left to feed and their tokens."""
        gone = set(done_at)
        stay = [at for at in range(len(alive)) if at not in gone]
        feed = [alive[at] for at in stay]
        feed_tokens = tokens[torch.tensor(stay, device=batch.device)] if feed else tokens[:0]
        batch.retire([alive[at] for at in done_at])
        return feed, feed_tokens

    def _decode_step(self, batch, feed, feed_tokens, phase, fused) -> None:
        """One decode forward: each slot in `feed` gets its token in the next cache column;
        the other slots (retired) get a pad whose column is masked, holding their place."""
        column, width = batch.filled, len(batch.slot_row)
        if len(feed) == width:
            step_ids = feed_tokens
            batch.mask[:, column] = True
        else:
            feed_t = torch.tensor(feed, device=batch.device)
            step_ids = torch.full((width,), self.pad, dtype=torch.long, device=batch.device)
            step_ids[feed_t] = feed_tokens
            batch.mask[:, column] = False
            batch.mask[feed_t, column] = True
        batch.filled += 1
        self.stats.record(phase, "decode", len(feed), width)
        batch.out = self._forward(step_ids[:, None], batch.mask[:, :batch.filled],
                                  batch.lengths[:, None], batch.cache, 1, fused)
        batch.lengths = batch.lengths + 1

    @staticmethod
    def _compact(batch, room) -> None:
        """Drop the retired slots (one gather per buffer, of the filled columns plus `room`
        for the steps left) and cut leading columns no live row attends to: the copy costs
        about what one step reads, and every later step then reads less."""
        live = batch.live_slots()
        live_t = torch.tensor(live, device=batch.device)
        mask = batch.mask[live_t]
        used = mask[:, :batch.filled].any(0)
        cut = int(used.int().argmax()) if bool(used.any()) else 0
        end = min(batch.filled + room, mask.shape[1])
        for layer in batch.cache.layers:
            layer.kbuf = layer.kbuf[live_t, :, cut:end]
            layer.vbuf = layer.vbuf[live_t, :, cut:end]
            layer.n -= cut
            layer._views()
        batch.mask, batch.filled = mask[:, cut:end], batch.filled - cut
        batch.lengths, batch.out = batch.lengths[live_t], batch.out[live_t]
        batch.slot_row = [batch.slot_row[slot] for slot in live]
        batch.retired = 0

    @staticmethod
    def _stash(batch, slots, kept) -> None:
        """Copy the real (unmasked) cache positions of the finished `slots` out of the batch
        into `kept` (by row), so the batch can drop them: one gather per buffer of the last
        columns, then a view per row."""
        filled = batch.filled
        slots_t = torch.tensor(slots, device=batch.mask.device)
        lengths = batch.lengths[slots_t].tolist()
        width = max(lengths)
        real = batch.mask[slots_t, :filled]
        gathered = [(layer.kbuf[slots_t, :, filled - width:filled],
                     layer.vbuf[slots_t, :, filled - width:filled])
                    for layer in batch.cache.layers]
        for at, (slot, length) in enumerate(zip(slots, lengths)):
            if bool(real[at, filled - length:].all()):  # real tokens = its last `length` columns
                kv = [(keys[at, :, width - length:], values[at, :, width - length:])
                      for keys, values in gathered]
            else:  # holes (a row continued from an earlier turn): pick the real columns
                kv = [(layer.kbuf[slot, :, :filled][:, real[at]],
                       layer.vbuf[slot, :, :filled][:, real[at]])
                      for layer in batch.cache.layers]
            kept[batch.slot_row[slot]] = _Row(kv, length)
