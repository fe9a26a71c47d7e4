"""Evaluation of a checkpoint on real data files (`score-fast eval`, score_fast/cli.py).

Formats, chosen from the fields every row has (detect_config):
  math    MATH / MATH500 rows: `problem`, and `answer`, or else the last \\boxed{...} of
          `solution` (the original MATH has no `answer` field).
  code    HumanEval rows (`prompt`, `test`, `entry_point`) or MBPP rows (`text`, or
          `prompt` in the sanitized split, and `test_list`).
  custom  a checkpoint trained with a custom reward, on a file with the run's fields.

Greedy: both attempts decoded greedily, the paper's metrics over all rows, then over the
rows of each value of `level`, `subject` and `type` where the file has them (MATH500:
level, subject; MATH: level, type; HumanEval and MBPP: none).

Inference-time scaling (the paper's Figure 1, right), at a sampling temperature: per
problem K sampled episodes from one rollout. Self-consistency is the majority vote over the
K first attempts; self-correction the majority vote over the second attempts of the first
K/2 episodes. Both arms spend K generations per problem. Sharing the rollout makes the
comparison paired (the corrected episodes' first attempts are among the K voted ones); the
other K/2 second attempts are generated and not used.
  vote key   math: the extracted final answer (the math reward's extract_answer), normalised
             by normalize_answer; code: the extracted program (the code reward's
             extract_code), compared as ast.unparse (comments and layout ignored) when it
             parses, else as its stripped non-blank lines.
  ties       go to the key whose first occurrence comes first in sample order
             (majority_vote); a sample without a key (no answer, no code) does not vote, and
             a problem where no sample has one counts as wrong.
  scoring    the reward scores the first sample holding the winning key.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from score_fast.config import Config, RewardConfig
from score_fast.data import DataError, check_row, load_rows
from score_fast.metrics import self_correction_metrics
from score_fast.prompts import PromptBuilder
from score_fast.rewards.code import extract_code
from score_fast.rewards.math import extract_answer, last_boxed, with_reference
from score_fast.rollout import Episode, Formatter, rollout
from score_fast.scoring import score_episodes

__all__ = ["GROUP_FIELDS", "Task", "last_boxed", "detect_config", "prepare_rows", "make_task",
           "load_task", "breakdown_metrics", "normalize_answer", "answer_key", "program_key",
           "vote_key", "majority_vote", "greedy_attempts", "evaluate_greedy",
           "inference_scaling", "format_scaling"]

log = logging.getLogger("score_fast")

GROUP_FIELDS = ("level", "subject", "type")  # per-group rows of the greedy table
HUMANEVAL = ("prompt", "test", "entry_point")
_NEEDS = {"math": "`problem` and `answer` or `solution` (MATH, MATH500)",
          "code": "`prompt`, `test`, `entry_point` (HumanEval) or `text` / `prompt` and "
                  "`test_list` (MBPP)"}


# ------------------------------------------------------------------ the data file
@dataclass
class Task:
    """An evaluation file made ready: what the model is asked and what the reward reads."""
    path: str
    config: Config  # the run config to evaluate with: reward kind, instruction, lengths
    problems: list[str]  # the model-facing text of each row
    rows: list[dict[str, Any]]  # each row as the reward reads it

    @property
    def kind(self) -> str:
        return self.config.reward.kind


def _fits(config: Config, fields: set[str]) -> bool:
    kind = config.reward.kind
    if kind == "code":
        humaneval = set(HUMANEVAL) <= fields
        mbpp = "test_list" in fields and bool(fields & {"text", "prompt"})
        # the run's prompt format reads its own rows' fields: a run trained with MBPP's
        # prompt (the paper's code setup) is evaluated on HumanEval rows with HumanEval's
        return {"humaneval": humaneval, "mbpp": mbpp}.get(config.data.prompt,
                                                           humaneval or mbpp)
    if kind == "math":
        return (config.problem_field() in fields
                and bool(fields & {config.answer_field(), "solution"}))
    return set(config.required_fields()) <= fields


def _as_kind(base: Config, kind: str) -> Config:
    """`base` evaluated as `kind` with the default fields and a prompt format that follows
    the rows (a HumanEval or MBPP format or a template belongs to the run's rows); a run's
    instruction belongs to its own reward kind, so another kind gets the paper's."""
    same = kind == base.reward.kind
    data = dataclasses.replace(base.data, problem_field=None, answer_field=None)
    if not same or base.data.prompt in ("humaneval", "mbpp") or base.data.prompt_template:
        data = dataclasses.replace(data, prompt="auto", prompt_template=None)
    return dataclasses.replace(
        base, reward=base.reward if same else RewardConfig(kind=kind), data=data,
        rollout=base.rollout if same else dataclasses.replace(base.rollout, instruction=None))


def detect_config(rows: Sequence[dict], path: str, saved: Config | None = None,
                  kind: str | None = None) -> Config:
    """The config to evaluate `rows` (read from `path`) with. The checkpoint's own (`saved`)
    when its reward kind and fields fit the fields every row has; else the first of math,
    code that fits, with that kind's default fields. `kind` (math | code) forces the kind.
    Raises DataError naming the file and the fields found when nothing fits."""
    base = saved or Config()
    fields = set.intersection(*(set(r) for r in rows))
    kinds = [kind] if kind else ["math", "code"]
    candidates = ([base] if kind in (None, base.reward.kind) else []) + [
        _as_kind(base, k) for k in kinds]
    for config in candidates:
        if _fits(config, fields):
            return config
    needs = [f"{k} needs {_NEEDS[k]}" for k in kinds]
    if saved is not None and not kind and base.reward.kind not in _NEEDS:
        needs.insert(0, f"the checkpoint's {base.reward.kind} reward needs "
                        f"{', '.join(map(repr, base.required_fields()))}")
    raise DataError(f"{path}: cannot evaluate as {' or '.join(kinds)}: {'; '.join(needs)}; "
                    f"the fields every row has: {', '.join(sorted(fields)) or 'none'}")


def prepare_rows(rows: Sequence[dict], config: Config, path: str
                 ) -> tuple[list[str], list[dict]]:
    """The problem text the model sees for each row -- score_fast.prompts with the run's
    config, the builder training used, so a row gives the same token ids in both -- and
    each row as the reward reads it.

    math: the reference is the row's answer field, or when that is missing or blank the
      last \\boxed{...} of `solution`, stored under the answer field for the math reward.
    code: HumanEval rows need `prompt`, `test`, `entry_point`; MBPP rows `text` (or
      `prompt` in the sanitized split) and a non-empty `test_list`, all of which the reward
      runs.
    custom: the run's fields; rows unchanged.
    Raises DataError naming the row and field for a missing or blank field, an empty
    test_list, or a math row with no reference answer."""
    kind = config.reward.kind
    build = PromptBuilder.from_config(config)
    problems, out = [], []
    for i, row in enumerate(rows, 1):
        where = f"row {i}"
        if kind == "math":
            row = with_reference(row, config.answer_field(), f"{where} of {path}")
        elif kind == "code":
            check_row(row, where, path, HUMANEVAL if "entry_point" in row else
                      ["text" if "text" in row else "prompt", "test_list"])
        else:
            check_row(row, where, path, config.required_fields())
        problems.append(build.render(row, f"{where} of {path}"))
        out.append(row)
    return problems, out


def make_task(rows: Sequence[dict], config: Config, path: str = "the rows") -> Task:
    """`rows` made ready to evaluate with `config` as they are (prepare_rows; no detection):
    rows already in memory (the demo's problems, a rank's share of an eval file). `path`
    names them in errors."""
    problems, prepared = prepare_rows(rows, config, path)
    return Task(path, config, problems, prepared)


def load_task(path: str, saved: Config | None = None, kind: str | None = None,
              limit: int | None = None) -> Task:
    rows = load_rows(path, [], limit=limit)
    return make_task(rows, detect_config(rows, path, saved, kind), path)


# ------------------------------------------------------------------ metrics
def _natural(value: str) -> list:
    # "level=2" before "level=10"; split parts alternate str / digits, so types line up
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", value)]


def breakdown_metrics(rows: Sequence[dict], correct1: Sequence[bool],
                      correct2: Sequence[bool], text1: Sequence[str], text2: Sequence[str]
                      ) -> dict[str, dict[str, float]]:
    """self_correction_metrics plus "n" (problems) over all rows ("all"), then over the rows
    of each value of each GROUP_FIELDS field that takes at least two values ("level=3",
    "subject=Algebra"; a row without the field counts as "level=none"), values in natural
    order (level=2 before level=10)."""
    def metrics(idx: list[int]) -> dict[str, float]:
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        return {**self_correction_metrics(pick(correct1), pick(correct2), pick(text1),
                                          pick(text2)), "n": len(idx)}

    out = {"all": metrics(list(range(len(rows))))}
    for field in GROUP_FIELDS:
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, row in enumerate(rows):
            value = row.get(field)
            groups["none" if value is None else str(value)].append(i)
        if len(groups) > 1:
            for value in sorted(groups, key=_natural):
                out[f"{field}={value}"] = metrics(groups[value])
    return out


# ------------------------------------------------------------------ majority vote
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
# spacing, \left / \right (not \leftarrow), degrees, percent, dollar signs, whitespace
_NOISE = re.compile(r"\\left(?![a-z])|\\right(?![a-z])|\\[!,;:]|\\ |\^\{?\\circ\}?|\\?%|\\?\$"
                    r"|\s+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize_answer(answer: str) -> str:
    """The vote key of an extracted math answer: \\text{x} -> x, \\dfrac / \\tfrac ->
    \\frac, spacing commands, \\left / \\right, degrees, %, $ and all whitespace dropped, a
    trailing "." dropped, thousands separators dropped, and a plain number in canonical
    decimal form ("3.0", "3" -> "3"; ".50" -> "0.5"; "1,000" -> "1000"). A string key, not
    math-verify's equivalence: 1/2 and 0.5 vote apart (cheap, and no sympy timeouts)."""
    s = _TEXT.sub(r"\1", answer)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _NOISE.sub("", s).rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        num = Decimal(s)
    except InvalidOperation:
        return s
    if not num.is_finite():
        return s
    return "0" if num == 0 else format(num.normalize(), "f")


def answer_key(text: str) -> str | None:
    answer = extract_answer(text)
    return None if answer is None else normalize_answer(answer)


def program_key(text: str) -> str | None:
    code = extract_code(text)
    if not code.strip():
        return None
    try:
        return ast.unparse(ast.parse(code))  # comments and layout do not split the vote
    except (SyntaxError, ValueError, RecursionError):  # e.g. a HumanEval body completion
        return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def vote_key(kind: str) -> Callable[[str], Optional[Hashable]]:
    """The vote key function of a reward kind; ValueError for a custom reward (there is no
    final answer to compare)."""
    if kind == "math":
        return answer_key
    if kind == "code":
        return program_key
    raise ValueError(f"--samples: majority voting compares final answers (math) or programs "
                     f"(code); the {kind} reward has neither. Pass --kind math or --kind code "
                     f"if the data is one of those")


def majority_vote(keys: Sequence[Optional[Hashable]]) -> int | None:
    """Index of the winning sample: the first occurrence of the most frequent key that is
    not None. A tie goes to the key whose first occurrence is earliest. None when every key
    is None (no sample gave an answer)."""
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return None
    # most_common orders equal counts by first insertion, i.e. by first occurrence
    return list(keys).index(counts.most_common(1)[0][0])


# ------------------------------------------------------------------ generation
def _episodes(model, tokenizer, task: Task, *, samples: int, greedy: bool,
              temperature: float, max_new_tokens: int | None,
              progress: bool = False) -> list[Episode]:
    """Sampled (or greedy) episodes of every problem, with the model in eval mode (its
    training mode is restored after). progress: the problems a batch at a time (the
    problems of rollout.gen_batch_size episodes), logging "eval: done/total problems" after
    each (when the "score_fast" logger shows INFO, as under score-fast eval); else every
    problem in one rollout."""
    config = task.config
    progress = progress and log.isEnabledFor(logging.INFO)
    n = len(task.problems)
    new = max_new_tokens or config.rollout.max_new_tokens
    per_batch = max(1, config.rollout.gen_batch_size // samples) if progress else max(n, 1)
    if progress:
        what = ("both attempts greedy" if greedy else
                f"{samples} sampled episodes each at temperature {temperature:g}")
        log.info("eval: %d problems, %s, up to %d new tokens an attempt", n, what, new)
    formatter = Formatter(tokenizer, config.instruction())
    episodes: list[Episode] = []
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, n, per_batch):
                hi = min(lo + per_batch, n)
                part, _ = rollout(
                    model, tokenizer, formatter, task.problems[lo:hi],
                    samples=samples, greedy=greedy, temperature=temperature,
                    max_new_tokens=new, batch_size=config.rollout.gen_batch_size,
                    max_prompt_tokens=config.data.max_prompt_tokens,
                    row_names=[f"row {i} of {task.path}" for i in range(lo + 1, hi + 1)])
                for e in part:  # the problem's index in the task, not in the batch
                    e.prompt_index += lo
                episodes += part
                if progress:
                    log.info("eval: %d/%d problems (%.0f s)", hi, n, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return episodes


def _score(reward, texts: list[str], rows: list[dict]) -> list[bool]:
    scores, _, errors = score_episodes(reward, texts, rows)
    for err in errors[:3]:
        log.warning("reward error (scored 0): %s", err)
    return [s > 0 for s in scores]


def greedy_attempts(model, tokenizer, task: Task, reward, max_new_tokens: int | None = None,
                    progress: bool = False
                    ) -> tuple[list[bool], list[bool], list[str], list[str]]:
    """Both attempts greedy at every problem: (correct1, correct2, text1, text2).
    progress: log the problems done after each batch (_episodes)."""
    eps = _episodes(model, tokenizer, task, samples=1, greedy=True, temperature=1.0,
                    max_new_tokens=max_new_tokens, progress=progress)
    t1, t2 = [e.text1 for e in eps], [e.text2 for e in eps]
    ok = _score(reward, t1 + t2, task.rows * 2)  # one batch: one pass over the worker pool
    return ok[:len(eps)], ok[len(eps):], t1, t2


def evaluate_greedy(model, tokenizer, task: Task, reward, max_new_tokens: int | None = None,
                    progress: bool = True) -> dict[str, dict[str, float]]:
    """Both attempts greedy at every problem; breakdown_metrics of the result (its "all"
    entry: the paper's metrics over every row, plus "n"). The one greedy evaluator: score-fast
    eval, the trainer's train.eval_file evaluations (greedy_attempts, a share per rank) and
    the demo and ablation tables (make_task on their rows) all use it. progress (score-fast
    eval's): "eval: done/total problems" logged after each batch of problems."""
    return breakdown_metrics(task.rows, *greedy_attempts(model, tokenizer, task, reward,
                                                         max_new_tokens, progress=progress))


def inference_scaling(model, tokenizer, task: Task, reward, samples: int,
                      temperature: float = 0.7, max_new_tokens: int | None = None,
                      progress: bool = True) -> dict[str, float]:
    """Self-consistency over `samples` (K) first attempts against K/2 first attempts each
    corrected once, majority vote over the K/2 second attempts (module doc). Returns
    {"samples", "temperature", "n", "self_consistency", "self_correction"}: the last two
    are accuracies in [0, 1]. progress: the problems done logged after each batch."""
    if samples < 2 or samples % 2:
        raise ValueError(f"samples must be an even number >= 2, got {samples}")
    key = vote_key(task.kind)
    eps = _episodes(model, tokenizer, task, samples=samples, greedy=False,
                    temperature=temperature, max_new_tokens=max_new_tokens, progress=progress)
    n = len(task.rows)
    right = [[False] * n, [False] * n]  # [arm][problem]
    todo = []  # (arm, problem, the winning text) to score
    for p in range(n):
        group = eps[p * samples:(p + 1) * samples]  # rollout is problem-major
        arms = ([e.text1 for e in group], [e.text2 for e in group[:samples // 2]])
        for arm, texts in enumerate(arms):
            w = majority_vote([key(t) for t in texts])
            if w is not None:
                todo.append((arm, p, texts[w]))
    if todo:
        ok = _score(reward, [t for _, _, t in todo], [task.rows[p] for _, p, _ in todo])
        for (arm, p, _), good in zip(todo, ok):
            right[arm][p] = good
    return {"samples": samples, "temperature": temperature, "n": n,
            "self_consistency": sum(right[0]) / n, "self_correction": sum(right[1]) / n}


def format_scaling(s: dict[str, float]) -> str:
    """inference_scaling's result as a markdown table, accuracies in percent."""
    k, h = int(s["samples"]), int(s["samples"]) // 2
    return "\n".join([
        f"| inference-time scaling: K={k}, temperature {s['temperature']:g}, "
        f"{int(s['n'])} problems | accuracy |", "|---|---|",
        f"| self-consistency: majority of {k} first attempts | "
        f"{100 * s['self_consistency']:.1f} |",
        f"| self-correction: majority of {h} second attempts ({h} first + {h} second) | "
        f"{100 * s['self_correction']:.1f} |"])
