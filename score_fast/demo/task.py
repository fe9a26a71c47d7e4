"""The built-in demo task (`score-fast demo`): procedural arithmetic, an exact-match reward, a
character-level tokenizer and a tiny Llama config. Nothing is downloaded and everything fits
a 2-core CPU, so the whole SCoRe loop (attempt, instruction, second attempt, both rewarded)
can be run and tested anywhere.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import transformers

__all__ = ["DEMO_INSTRUCTION", "make_problems", "exact_reward", "build_tokenizer",
           "tiny_model_config"]

# The paper's self-correction instruction is ~300 characters; with a character-level
# tokenizer that is ~300 tokens in every second turn, about 15 times the rest of a demo
# episode ("<bos>U:37+58\nA:95<eos>" is 14 tokens), so a tiny model would spend its context
# and compute on it. This one keeps a whole two-turn episode near 38 tokens (under a 64-token
# row) while still marking the second turn as "revise your answer".
DEMO_INSTRUCTION = "Check and fix:"

_OPS = "+-*"


def make_problems(n: int, *, seed: int, digits: int = 2, ops: str = "+-") -> list[dict[str, str]]:
    """`n` arithmetic problems as rows {"problem": "37+58", "answer": "95"}.

    Both operands have exactly `digits` digits (0-9 when digits == 1), the operator is drawn
    uniformly from `ops` (any of "+-*"), and the answer is the exact integer result in
    decimal. With "-" the result is negative when the second operand is larger
    ("12-58" -> "-46"): the reward compares strings, so the model must write the sign.
    The same (n, seed, digits, ops) always gives the same rows (Python's `random.Random`
    is stable across versions for integer seeds); rows may repeat, and different seeds may
    share problems, so filter if a held-out set must be disjoint.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        # random.Random hashes a str/float seed; an int keeps runs reproducible by eye.
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 18:
        raise ValueError(f"digits must be an int in 1..18, got {digits!r}")
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty string of characters from {_OPS!r}, "
                         f"got {ops!r}")
    rng = random.Random(seed)
    low, high = (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits - 1
    ops = "".join(dict.fromkeys(ops))  # "++-" must not make "+" twice as likely
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append({"problem": f"{a}{op}{b}", "answer": str(value)})
    return rows


def exact_reward(completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float]:
    """Custom reward "score_fast.demo.task:exact_reward": 1.0 where the completion's final
    answer equals the row's answer string exactly, else 0.0.

    Called as fn(completions, **row_fields) with each field a list over the batch (the TRL
    convention), so `answer` is a list; other fields (problem, ...) are ignored. The final
    answer is the text after the last "=" if there is one ("37+58=95" -> "95"), else the
    whole completion, stripped of surrounding whitespace. No numeric normalisation: "095"
    and "95.0" are wrong, as they would be for a grader reading the digits.
    """
    if isinstance(completions, str) or isinstance(answer, str):
        raise TypeError("exact_reward takes lists (one entry per completion), not a single "
                        "string")
    if len(completions) != len(answer):
        raise ValueError(f"exact_reward: {len(completions)} completions but "
                         f"{len(answer)} answers")
    scores = []
    for i, (text, ans) in enumerate(zip(completions, answer)):
        if not isinstance(text, str):
            raise TypeError(f"exact_reward: completions[{i}] is {type(text).__name__}, not str")
        final = text.rpartition("=")[2].strip()
        scores.append(1.0 if final == str(ans).strip() else 0.0)
    return scores


# Characters: printable ASCII and newline, so any instruction text can be written without
# growing the vocabulary; anything else (e.g. "é") becomes <unk>.
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3

# Layout: "<bos>U:37+58\nA:95<eos>U:Check and fix:\nA:". Every turn is its own text, so the
# prompt for turn k is a prefix of the full conversation both as text and as token ids (the
# tokenizer is per-character), which the trainer relies on to cut completions out. Each
# assistant turn ends with <eos>, so generation of attempt 1 stops there.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}U:{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A:{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('demo chat template: unknown role ' + m['role']"
    " + ' (only user and assistant)') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def build_tokenizer(vocab_size: int = 0) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer with a chat template, built locally (no downloads).

    Vocabulary (100 tokens): <pad>=0, <bos>=1, <eos>=2, <unk>=3, then printable ASCII
    (space..~) and newline, one token per character. Plain encoding adds no special tokens,
    so decode(encode(x)) == x for any ASCII text; the chat template writes <bos>/<eos>
    itself. Round-trips through save_pretrained / AutoTokenizer.from_pretrained.
    vocab_size > 100 pads the vocabulary with tokens "<w100>", "<w101>", ... that encoding
    never produces but a model of that vocabulary can sample (benchmarks at a real LM-head
    size, bench/bench_e2e.py).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    base = _SPECIALS + _CHARS
    filler = [f"<w{i}>" for i in range(len(base), vocab_size)]
    vocab = {tok: i for i, tok in enumerate(base + filler)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character is its own pre-token; [\s\S] rather than "." so newlines match too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with no separator
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", chat_template=_CHAT_TEMPLATE)


def tiny_model_config(tokenizer: transformers.PreTrainedTokenizerBase, *, hidden: int = 64,
                      layers: int = 2, heads: int = 4,
                      max_positions: int = 256) -> transformers.LlamaConfig:
    """A Llama-style config small enough to train on 2 CPU cores.

    The defaults give 144k parameters; a forward + backward of LlamaForCausalLM (with the
    labels loss) on a 16 x 64-token batch took a median 18 ms (max 22 ms; 20 runs after 5
    warm-up) on the project's 2-core CPU machine (torch 2.13, float32, sdpa attention), under
    the 50 ms budget; hidden=128, layers=4 (1.1M parameters) took 68 ms, over it. Those are
    quiet-machine numbers. With other jobs on the two cores (load average 5-7) the defaults
    took 100-400 ms with torch's 2 threads but 35 ms with torch.set_num_threads(1): thread
    contention, not compute, dominates a model this small.

    The MLP is 4 * hidden wide; max_positions bounds a whole two-turn episode (a 2-digit
    episode is ~35 tokens). Vocabulary size and pad/bos/eos ids come from `tokenizer`. Word
    embeddings are not tied: the trainer reads model.lm_head.weight as its own matrix.
    """
    for name, v in (("hidden", hidden), ("layers", layers), ("heads", heads),
                    ("max_positions", max_positions)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token")
    return transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        tie_word_embeddings=False,
    )
