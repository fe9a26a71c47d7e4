"""Rollout engine: batched KV-cache sampling for two-attempt (SCoRe) episodes.

    sampler = TwoTurnSampler(model, eos_id, pad_id, batch_size=64)
    a1, state = sampler.attempt1(prompts, max_new_tokens=256, temperature=1.0)
    a2 = sampler.attempt2(state, [fmt.instruction_ids(p, a) for p, a in zip(problems, a1)],
                          max_new_tokens=256)
    sampler.stats  # tokens each forward processed, prefill / decode totals

Design (any Hugging Face causal LM that takes a cache, a 2-D or 4-D attention mask and
position ids; transformers 5.x: `cache=` from 5.2x, `past_key_values=` before, e.g. 5.17):

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
* Not done: CUDA graphs for the decode step (the buffers are preallocated per turn, but
  shapes change as rows are compacted, and the step goes through the model's Python
  forward). Models with sliding-window or other non-full attention layers are refused (the
  padded-cache layout assumes full attention).

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
        b, h, _, d = key_states.shape
        self.device, self.is_initialized = key_states.device, True
        self.kbuf = key_states.new_empty((b, h, self.capacity, d))
        self.vbuf = value_states.new_empty((b, value_states.shape[1], self.capacity,
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
    cache = DynamicCache()
    cache.layers = layers
    return cache


class TwoTurnSampler:
    """Batched sampling of attempt 1 and attempt 2 with attempt 2 reusing attempt 1's cache.

    eos_id: an id or a collection of ids that end an attempt; pad_id: the id padding slots
    hold (never attended to). decode: ids -> text, needed only for stop strings.
    batch_size: rows per batch (the rows are length-sorted into batches)."""

    def __init__(self, model, eos_id: int | Sequence[int] | None, pad_id: int, *,
                 decode: Callable[[list[int]], str] | None = None, batch_size: int = 64,
                 compact_at: float = 0.125):
        from score_fast.models import compute_dtype, lora_base
        # a peft model is called as itself (under FSDP2 it is the root unit whose hooks
        # gather the embeddings), its keyword arguments reaching its base's forward: the
        # base's signature says which (cache, logits_to_keep)
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
        try:
            params = inspect.signature(lora_base(model).forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        # transformers >= 5.2x names the argument `cache`; earlier 5.x `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_kw = "logits_to_keep" in params
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        # sdpa / eager take a prepared 4-D mask as is; others get the 2-D padding mask
        self._mask_kind = {"sdpa": "sdpa", "eager": "eager"}.get(impl, "2d")
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self._n_layers = text.num_hidden_layers
        # the compute dtype (an FSDP2 bf16 model keeps fp32 master parameters)
        self._dtype = compute_dtype(model) if model is not None else torch.float32
        # fused sampling (module doc): (decoder, lm_head) or why not
        want = os.environ.get("SCORE_FAST_FUSED_SAMPLING", "auto").lower()
        if want not in ("auto", "0", "1"):
            raise ValueError(f"SCORE_FAST_FUSED_SAMPLING must be 0, 1 or unset, got {want!r}")
        head = _fused_head(model) if model is not None and want != "0" else "turned off"
        if want == "1" and isinstance(head, str):
            raise ValueError(f"SCORE_FAST_FUSED_SAMPLING=1 but this model cannot sample fused: "
                             f"{head}")
        self._fused = None if isinstance(head, str) else head
        if self._fused is not None:
            dec = inspect.signature(self._fused[0].forward).parameters
            self._dec_cache_kw = "cache" if "cache" in dec else "past_key_values"

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
        if not stop:
            return [[] for _ in range(n)]
        if isinstance(stop[0], str):
            per = [list(stop)] * n
        else:
            if len(stop) != n:
                raise ValueError(f"{len(stop)} stop lists for {n} rows")
            per = [list(s or []) for s in stop]
        if any(per) and self.decode is None:
            raise ValueError("stop strings need decode= (a tokenizer's decode)")
        return per

    def _forward(self, ids, mask, pos, cache, t, fused=False):
        """Run `t` new tokens per row; mask: [b, kv] bool (True = real) over the cache
        including the new tokens. Returns the last position's logits [b, V], or with
        `fused` the decoder's last hidden state [b, H] (the LM head is left to the sampler)."""
        if fused:
            kw = {self._dec_cache_kw: cache, "use_cache": True}
        else:
            kw = {self._cache_kw: cache, "use_cache": True}
            if self._logits_kw:
                kw["logits_to_keep"] = 1
        kv = mask.shape[1]
        if self._mask_kind == "2d":
            am = mask.long()
        else:
            am = mask[:, None, None, :]
            if t > 1:  # causal within the new block; pad queries see themselves (no NaN)
                q = torch.arange(t, device=mask.device)[:, None] + (kv - t)
                k = torch.arange(kv, device=mask.device)[None, :]
                am = (am & (k <= q)) | (k == q)
            if self._mask_kind == "eager":
                am = torch.zeros(am.shape, dtype=self._dtype, device=am.device).masked_fill_(
                    ~am, torch.finfo(self._dtype).min)
        if fused:
            out = self._fused[0](input_ids=ids, attention_mask=am, position_ids=pos, **kw)
            return out.last_hidden_state[:, -1, :]
        out = self.model(input_ids=ids, attention_mask=am, position_ids=pos, **kw)
        return out.logits[:, -1, :]

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
        dev = model_device(self.model)
        b = len(rows)
        width_prev = max(r.length for r in rows)
        t = max(len(x) for x in new_ids)
        cap = width_prev + t + max_new_tokens + 1
        # cache of the rows' previous turns, left-padded to the longest
        layers = []
        for li in range(self._n_layers):
            if width_prev:
                k0, v0 = next(r for r in rows if r.length).kv[li]
                kb = k0.new_zeros((b, k0.shape[0], cap, k0.shape[2]))
                vb = v0.new_zeros((b, v0.shape[0], cap, v0.shape[2]))
                for j, r in enumerate(rows):
                    if not r.length:
                        continue
                    rk, rv = r.kv[li]
                    kb[j, :, width_prev - r.length:width_prev] = rk
                    vb[j, :, width_prev - r.length:width_prev] = rv
                layers.append(_BufferLayer(cap, kb, vb, width_prev))
            else:
                layers.append(_BufferLayer(cap))
        cache = _cache(layers)
        ids = torch.full((b, t), self.pad, dtype=torch.long)
        mask = torch.zeros((b, cap), dtype=torch.bool)
        pos = torch.zeros((b, t), dtype=torch.long)
        for j, (r, x) in enumerate(zip(rows, new_ids)):
            m = len(x)
            ids[j, t - m:] = torch.as_tensor(x, dtype=torch.long)
            mask[j, width_prev - r.length:width_prev] = True
            mask[j, width_prev + t - m:width_prev + t] = True
            pos[j, t - m:] = torch.arange(r.length, r.length + m)
            pos[j, :t - m] = r.length  # pad queries: any position, never attended to
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        n = width_prev + t  # filled cache columns
        lengths = torch.tensor([r.length + len(x) for r, x in zip(rows, new_ids)],
                               dtype=torch.long, device=dev)  # true length of each row
        self.stats.record(phase, "prefill", sum(len(x) for x in new_ids), b * t)
        # fused sampling: the forwards return last hidden states, `logits` below holds them
        fused = (self._fused is not None and not sampling["greedy"]
                 and sampling["temperature"] > 0 and sampling["top_p"] >= 1.0)
        logits = self._forward(ids, mask[:, :n], pos, cache, t, fused)

        slot_row = list(range(b))  # batch slot -> row of this batch, -1 once finished
        outs: list[list[int]] = [[] for _ in range(b)]
        kept: list = [None] * b
        eos = self.eos
        window = [max((len(s) for s in st), default=0) + 2 for st in stops]
        n_dead = 0
        for step in range(1, max_new_tokens + 1):
            alive = [s for s, r in enumerate(slot_row) if r >= 0]
            if n_dead:
                alive_t = torch.tensor(alive, device=dev)
                logits = logits[alive_t]
            nxt = self._sample(logits, fused, sampling)
            toks = nxt.tolist()
            done = []
            for j, (slot, tok) in enumerate(zip(alive, toks)):
                row = slot_row[slot]
                o = outs[row]
                o.append(tok)
                if tok in eos or len(o) >= max_new_tokens:
                    done.append(j)
                elif stops[row]:
                    tail = self.decode(o[-window[row]:])
                    if any(s in tail for s in stops[row]):
                        done.append(j)
            # keep: every sampled token is fed (finished rows too: their cache then holds
            # the whole attempt) and the finished rows are moved out after the forward;
            # otherwise finished rows are not fed at all
            if keep or not done:
                feed, feed_tok = alive, nxt
            else:
                gone = set(done)
                sel = [j for j in range(len(alive)) if j not in gone]
                feed = [alive[j] for j in sel]
                feed_tok = nxt[torch.tensor(sel, device=dev)] if feed else nxt[:0]
                for j in done:
                    slot_row[alive[j]] = -1
                n_dead += len(done)
                if not feed:
                    break
            if len(feed) == len(slot_row):
                inp = feed_tok
                mask[:, n] = True
            else:
                feed_t = torch.tensor(feed, device=dev)
                inp = torch.full((len(slot_row),), self.pad, dtype=torch.long, device=dev)
                inp[feed_t] = feed_tok
                mask[:, n] = False
                mask[feed_t, n] = True
            n += 1
            self.stats.record(phase, "decode", len(feed), len(slot_row))
            logits = self._forward(inp[:, None], mask[:, :n], lengths[:, None], cache, 1, fused)
            lengths = lengths + 1
            if keep and done:
                slots = [alive[j] for j in done]
                self._stash(cache, mask, n, lengths, slots, slot_row, kept)
                for sl in slots:
                    slot_row[sl] = -1
                n_dead += len(done)
            if n_dead == len(slot_row):
                break
            if n_dead and n_dead >= self.compact_at * len(slot_row):
                live = [s for s, r in enumerate(slot_row) if r >= 0]
                sel_t = torch.tensor(live, device=dev)
                room = max_new_tokens - step + 1
                mask, n = self._select(cache, mask, n, sel_t, room)
                lengths, logits = lengths[sel_t], logits[sel_t]
                slot_row = [slot_row[s] for s in live]
                n_dead = 0
        return outs, kept

    @staticmethod
    def _select(cache, mask, n, sel, room):
        """Keep batch slots `sel` (one gather per buffer, of the filled columns plus `room`
        for the steps left); cut leading columns no kept row attends to. Returns the new
        mask and fill."""
        mask = mask[sel]
        used = mask[:, :n].any(0)
        cut = int(used.int().argmax()) if bool(used.any()) else 0
        end = min(n + room, mask.shape[1])
        for layer in cache.layers:
            layer.kbuf = layer.kbuf[sel, :, cut:end]
            layer.vbuf = layer.vbuf[sel, :, cut:end]
            layer.n -= cut
            layer._views()
        return mask[:, cut:end], n - cut

    @staticmethod
    def _stash(cache, mask, n, lengths, done, slot_row, kept):
        """Copy the real (unmasked) cache positions of finished slots out of the batch: one
        gather per buffer of the last columns, then a view per row."""
        idx = torch.tensor(done, device=mask.device)
        lens = lengths[idx].tolist()
        w = max(lens)
        real = mask[idx, :n]
        gathered = [(c.kbuf[idx, :, n - w:n], c.vbuf[idx, :, n - w:n]) for c in cache.layers]
        for j, (s, L) in enumerate(zip(done, lens)):
            if bool(real[j, n - L:].all()):  # the row's real tokens are its last L columns
                kv = [(k[j, :, w - L:], v[j, :, w - L:]) for k, v in gathered]
            else:  # holes (a row continued from an earlier turn): pick the real columns
                kv = [(c.kbuf[s, :, :n][:, real[j]], c.vbuf[s, :, :n][:, real[j]])
                      for c in cache.layers]
            kept[slot_row[s]] = _Row(kv, L)
