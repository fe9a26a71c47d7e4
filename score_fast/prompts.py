"""One prompt builder for training, evaluation and the ablations: a data row -> the text of
attempt 1's user turn, and the instruction that asks for attempt 2. rollout.Formatter then
lays both into the tokenizer's chat template (or the plain layout), so a row gives the same
token ids wherever it is used.

Formats (data.prompt):
  math       the paper's MATH first-turn prompt (Appendix C, quoted below), a blank line,
             "Problem:", the problem. The paper quotes the prompt, not its layout around the
             problem; this layout is ours (its "the final Problem" suggests a
             "Problem: ... Solution:" frame).
  humaneval  the row's `prompt` as is: the signature and the docstring with its examples.
  mbpp       MBPP's own prompt (Austin et al. 2021): "You are an expert Python programmer,
             and here is your task: {text} Your code should pass these tests:\\n\\n" and every
             assert of `test_list`, one a line: the asserts name the function and its
             signature, without which no answer can pass (`prompt` for `text` in the
             sanitized split).
  plain      the problem field as is.
  auto       math for the math reward; for the code reward, per row, humaneval (a row with
             `entry_point`) or mbpp (a row with `test_list`), else plain; plain for a custom
             reward.
A template (data.prompt_template) replaces the format: a string with {field} placeholders
filled from the row, or the path of a .jinja / .j2 file rendered with the row's fields.
The instruction is rollout.instruction, else the paper's MATH or code self-correction
instruction for the reward kind (config.MATH_INSTRUCTION, config.CODE_INSTRUCTION).

    from score_fast.prompts import PromptBuilder
    build = PromptBuilder.from_config(config)
    text = build.render(row, where="row 3 of train.jsonl")   # attempt 1's user turn
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from score_fast.config import Config
from score_fast.data import DataError

__all__ = ["MATH_PROMPT", "PROMPT_FORMATS", "PromptBuilder"]

# The paper's MATH first-turn prompt (Appendix C), quoted.
MATH_PROMPT = (
    "You are a math expert. When you respond, respond only with the Solution of the final "
    "Problem, thinking step by step. At the end of the Solution, when you give your final "
    "answer, write it in the form \"Final Answer: The final answer is $answer$. I hope it is "
    "correct.\"")
PROMPT_FORMATS = ("auto", "math", "humaneval", "mbpp", "plain")


def _field(row: Mapping[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: the prompt needs field {name!r}, which is "
                        f"{'missing' if value is None else 'blank'} (fields: "
                        f"{', '.join(sorted(row)) or 'none'})")
    return str(value)


class _RowFields(dict):
    """str.format_map's mapping: a missing field is a DataError naming it."""

    def __init__(self, row, where):
        super().__init__(row)
        self.where = where

    def __missing__(self, key):
        raise DataError(f"{self.where}: data.prompt_template uses {{{key}}}, which the row does "
                        f"not have (fields: {', '.join(sorted(self)) or 'none'})")


@dataclass(frozen=True)
class PromptBuilder:
    format: str  # one of PROMPT_FORMATS
    instruction: str
    problem_field: str
    template: str | None = None  # a str.format template or a .jinja / .j2 file's text
    jinja: bool = False

    @classmethod
    def from_config(cls, config: Config) -> "PromptBuilder":
        d = config.data
        if d.prompt not in PROMPT_FORMATS:
            raise ValueError(f"data.prompt must be one of {PROMPT_FORMATS}, got {d.prompt!r}")
        fmt = d.prompt
        if fmt == "auto":
            fmt = {"math": "math", "code": "auto"}.get(config.reward.kind, "plain")
        template, jinja = d.prompt_template, False
        if template and Path(template).suffix in (".jinja", ".j2"):
            if not Path(template).is_file():
                raise FileNotFoundError(f"data.prompt_template: no file {template!r}")
            template, jinja = Path(template).read_text(), True
        return cls(fmt, config.instruction(), config.problem_field(), template, jinja)

    def render(self, row: Mapping[str, Any], where: str = "row") -> str:
        """Attempt 1's user turn for `row`; DataError naming `where` and the field when the
        row lacks what the format or template reads."""
        if self.template is not None:
            if self.jinja:
                import jinja2
                env = jinja2.Environment(undefined=jinja2.StrictUndefined,
                                         keep_trailing_newline=False)
                try:
                    return env.from_string(self.template).render(**row)
                except jinja2.UndefinedError as e:
                    raise DataError(f"{where}: data.prompt_template: {e} (fields: "
                                    f"{', '.join(sorted(row))})") from None
            return string.Formatter().vformat(self.template, (), _RowFields(row, where))
        fmt = self.format
        if fmt == "auto":  # code rows: by their fields
            fmt = ("humaneval" if "entry_point" in row else "mbpp" if "test_list" in row
                   else "plain")
        if fmt == "math":
            return f"{MATH_PROMPT}\n\nProblem:\n{_field(row, self.problem_field, where)}"
        if fmt == "humaneval":
            return _field(row, "prompt", where)
        if fmt == "mbpp":
            text = _field(row, "text" if "text" in row else "prompt", where)
            tests = row.get("test_list")
            if not isinstance(tests, list) or not tests or not all(
                    isinstance(t, str) for t in tests):
                raise DataError(f"{where}: 'test_list' must be a non-empty list of assert "
                                f"lines, got {type(tests).__name__}")
            return (f"You are an expert Python programmer, and here is your task: {text} "
                    f"Your code should pass these tests:\n\n" + "\n".join(tests))
        return _field(row, self.problem_field, where)
