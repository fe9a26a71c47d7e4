"""Two-attempt rollouts: sample attempt 1, append the self-correction instruction, sample
attempt 2, and lay each episode out as ONE token sequence with segment labels.

    [prompt | attempt 1 (+eos) | instruction | attempt 2 (+eos)]
     0 ...    1 ...              0 ...         2 ...

Layout with a chat template (the tokenizer has one): the prompt is the template rendered
for [user: problem] with the generation prompt; the instruction segment is the template's
text between attempt 1's content and attempt 2's, i.e. what
[user: problem, assistant: attempt 1, user: instruction] + generation prompt renders after
the assistant's content (its end-of-turn marker, the user turn, the next generation
prompt). When attempt 1 ended with eos and that text starts with the eos token (chat
templates close a turn with the eos, e.g. <|im_end|>), the eos is not repeated.
Without a chat template (plain layout, documented):

    [bos] problem "\\n\\n" | attempt 1 | "\\n\\n" instruction "\\n\\n" | attempt 2

Attempt tokens are kept exactly as sampled (never re-tokenised from text), up to and
including the first eos; an attempt that hits max_new_tokens has no eos.

rollout(..., attempts=1) (train.single_turn, the Table 4 "without multi-turn training"
ablation) samples attempt 1 only: the episode is [prompt | attempt 1] with labels 0 / 1 (no
instruction, no attempt 2, text2 ""), and no KV cache is kept for a second turn.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from score_fast.sampler import TwoTurnSampler

__all__ = ["Episode", "Formatter", "generate", "rollout"]

_MARK = "\x00SCORE_FAST_ATTEMPT\x00"


@dataclass
class Episode:
    prompt_index: int  # which prompt (row) of the step's batch: the RLOO group
    prompt_ids: list[int]
    attempt1_ids: list[int]
    instruction_ids: list[int]
    attempt2_ids: list[int] = field(default_factory=list)
    text1: str = ""
    text2: str = ""

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.attempt1_ids + self.instruction_ids + self.attempt2_ids

    @property
    def labels(self) -> list[int]:
        return ([0] * len(self.prompt_ids) + [1] * len(self.attempt1_ids)
                + [0] * len(self.instruction_ids) + [2] * len(self.attempt2_ids))


class Formatter:
    """Token ids of the prompt and of the instruction segment, for one tokenizer."""

    def __init__(self, tokenizer, instruction: str):
        self.tok = tokenizer
        self.instruction = instruction
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        self._cache: dict = {}

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, problem: str) -> list[int]:
        if self.chat:
            return self._encode(self._render([{"role": "user", "content": problem}]))
        return self.tok(problem + "\n\n")["input_ids"]  # with bos, if the tokenizer adds one

    def instruction_ids(self, problem: str, attempt1_ids: Sequence[int]) -> list[int]:
        ended = len(attempt1_ids) > 0 and attempt1_ids[-1] == self.eos
        key = (problem, ended)
        if key not in self._cache:  # a template render costs ~0.5 ms: once per problem
            self._cache[key] = self._instruction_ids(problem, ended)
        return list(self._cache[key])

    def _instruction_ids(self, problem: str, ended: bool) -> list[int]:
        if not self.chat:
            return self._encode("\n\n" + self.instruction + "\n\n")
        text = self._render([{"role": "user", "content": problem},
                             {"role": "assistant", "content": _MARK},
                             {"role": "user", "content": self.instruction}])
        if text.count(_MARK) != 1:
            raise ValueError("the chat template does not render the assistant's content "
                             "verbatim; cannot place attempt 1 inside it")
        tail = text.split(_MARK, 1)[1]
        eos_text = self.tok.eos_token or ""
        if ended and eos_text and tail.startswith(eos_text):
            tail = tail[len(eos_text):]
        return self._encode(tail)


def _strip(ids: list[int], eos: int | None, pad: int | None) -> list[int]:
    """Generated ids up to and including the first eos (the rest is padding)."""
    if eos is not None and eos in ids:
        return ids[:ids.index(eos) + 1]
    if pad is not None and pad != eos:
        while ids and ids[-1] == pad:
            ids = ids[:-1]
    return ids


@torch.no_grad()
def generate(model, contexts: list[list[int]], *, max_new_tokens: int, temperature: float,
             greedy: bool, eos: int | None, pad: int, batch_size: int) -> list[list[int]]:
    """Sample (or decode greedily) one continuation per context with HF generate, left-padded
    batches; returns the new tokens of each, cut after the first eos."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for lo in range(0, len(contexts), batch_size):
        chunk = contexts[lo:lo + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True,
                                                           temperature=temperature, top_k=0,
                                                           top_p=1.0)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos, **kwargs)
        for row in gen[:, width:].tolist():
            out.append(_strip(row, eos, pad))
    return out


def rollout(model, tokenizer, formatter: Formatter, problems: list[str], *, samples: int,
            max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
            batch_size: int = 64, max_prompt_tokens: int | None = None,
            row_names: list[str] | None = None, in_flight: int | None = None, engine=None,
            attempts: int = 2) -> tuple[list[Episode], dict]:
    """`samples` two-attempt episodes per problem (problem-major order), sampled by one
    backend through the rollout protocol, `episodes(prompts, instruction pairs, ...)`:
    `engine` when given (a score_fast.slot_engine.SlotEngine, or a
    score_fast.vllm_engine.VLLMEngine: attempt 2 requested as [prompt | attempt 1 |
    instruction] for its prefix cache, every episode at once), else a
    score_fast.sampler.TwoTurnSampler over `model` (batches of batch_size; `generate`
    above is the plain reference). in_flight: the sampler's episodes taken through both
    attempts at a time (None: all); attempt 1's KV cache is kept for those only (a 7B
    model's is ~57 KB a token: 512 episodes of 2048 tokens would hold 60 GB). Returns the
    episodes and timing: {"gen_tokens", "gen_seconds", "attempt1_seconds",
    "attempt2_seconds", "prefill_tokens", "decode_tokens"} (the last two: tokens the model
    was run on; the attempt seconds None where the backend runs both attempts in the same
    steps, SlotEngine).
    attempts: 2 (SCoRe's episodes), or 1 (train.single_turn): attempt 1 only, no KV cache
    kept for a second turn; the episodes have no instruction and no attempt 2, and
    attempt2_seconds is 0."""
    if attempts not in (1, 2):
        raise ValueError(f"attempts={attempts}: 1 (attempt 1 only) or 2")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [formatter.prompt_ids(p) for p in problems]
    if max_prompt_tokens is not None:
        for i, p in enumerate(prompts):
            if len(p) > max_prompt_tokens:
                where = row_names[i] if row_names else f"prompt {i}"
                raise ValueError(f"{where}: the prompt is {len(p)} tokens, longer than "
                                 f"data.max_prompt_tokens={max_prompt_tokens}")
    t0 = time.perf_counter()
    episodes = [Episode(i, prompts[i], [], []) for i in range(len(problems))
                for _ in range(samples)]
    pairs = None
    if attempts == 2:  # (attempt 1 not ended by eos, ended by eos): a backend picks one
        pairs = [(formatter.instruction_ids(problems[e.prompt_index], []),
                  formatter.instruction_ids(problems[e.prompt_index], [formatter.eos]))
                 for e in episodes]
    backend = engine if engine is not None else TwoTurnSampler(model, eos, pad,
                                                               batch_size=batch_size)
    a1s, a2s, info = backend.episodes(
        [e.prompt_ids for e in episodes], pairs, max_new_tokens=max_new_tokens,
        temperature=temperature, greedy=greedy, attempts=attempts, eos=eos,
        in_flight=in_flight)
    for ep, a1, a2, pair in zip(episodes, a1s, a2s, pairs or [None] * len(episodes)):
        ep.attempt1_ids, ep.attempt2_ids = a1, a2
        if attempts == 2:
            ep.instruction_ids = list(pair[bool(a1) and a1[-1] == formatter.eos])
    spent = (info["attempt1_seconds"], info["attempt2_seconds"] if attempts == 2 else 0.0)
    prefill, decode = info["prefill_tokens"], info["decode_tokens"]
    seconds = time.perf_counter() - t0
    for ep in episodes:
        ep.text1 = tokenizer.decode(ep.attempt1_ids, skip_special_tokens=True)
        if attempts == 2:
            ep.text2 = tokenizer.decode(ep.attempt2_ids, skip_special_tokens=True)
    n_gen = sum(len(e.attempt1_ids) + len(e.attempt2_ids) for e in episodes)
    return episodes, {"gen_tokens": n_gen, "gen_seconds": seconds,
                      "attempt1_seconds": spent[0], "attempt2_seconds": spent[1],
                      "prefill_tokens": prefill, "decode_tokens": decode}
