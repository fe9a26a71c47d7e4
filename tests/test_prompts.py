"""The prompt builder (score_fast.prompts): each format as documented, templates and their
errors, and the same row giving the same token ids in training and in eval."""
import json

import pytest
import torch
import transformers

from score_fast.demo import task as demo_task
from score_fast import evaluation as ev
from score_fast import trainer as tr
from score_fast.config import (CODE_INSTRUCTION, MATH_INSTRUCTION, Config, DataConfig,
                               ModelConfig, RewardConfig, RolloutConfig, TrainConfig)
from score_fast.data import DataError
from score_fast.prompts import MATH_PROMPT, PromptBuilder
from score_fast.rollout import Formatter

MBPP = {"text": "Write a function to add two numbers.", "task_id": 1,
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
HUMANEVAL = {"prompt": "def f(x):\n    \"\"\"Return x + 1.\n    >>> f(1)\n    2\n    \"\"\"\n",
             "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
MATH = {"problem": "What is 6/3?", "answer": "2"}


def _build(kind="math", **data):
    return PromptBuilder.from_config(Config(data=DataConfig(**data),
                                            reward=RewardConfig(kind=kind, function="m:f")))


def test_formats():
    assert _build().render(MATH) == (
        MATH_PROMPT + "\n\nProblem:\nWhat is 6/3?")
    assert MATH_PROMPT.startswith("You are a math expert.") and MATH_PROMPT.endswith(
        "\"Final Answer: The final answer is $answer$. I hope it is correct.\"")
    code = _build("code")
    assert code.render(HUMANEVAL) == HUMANEVAL["prompt"]
    assert code.render(MBPP) == (
        "You are an expert Python programmer, and here is your task: Write a function to add "
        "two numbers. Your code should pass these tests:\n\nassert add(1, 2) == 3\n"
        "assert add(0, 0) == 0")
    sanitized = {"prompt": MBPP["text"], "test_list": MBPP["test_list"]}  # MBPP sanitized
    assert code.render(sanitized) == code.render(MBPP)
    assert _build("custom").render(MATH) == "What is 6/3?"  # auto: plain for custom
    assert _build(prompt="plain").render(MATH) == "What is 6/3?"
    assert _build(prompt="mbpp").render(MBPP) == code.render(MBPP)
    assert (_build().instruction, code.instruction) == (MATH_INSTRUCTION, CODE_INSTRUCTION)


def test_templates(tmp_path):
    b = _build(prompt_template="Q: {problem}\nA ({answer}):")
    assert b.render(MATH) == "Q: What is 6/3?\nA (2):"
    with pytest.raises(DataError, match=r"row 7: data.prompt_template uses \{level\}, which the "
                                        r"row does not have \(fields: answer, problem\)"):
        _build(prompt_template="{level}: {problem}").render(MATH, "row 7")
    j = tmp_path / "p.jinja"
    j.write_text("{{ problem | upper }}{% if level %} (level {{ level }}){% endif %}")
    assert _build(prompt_template=str(j)).render({**MATH, "level": 3}) == "WHAT IS 6/3? (level 3)"
    j.write_text("{{ problem }} {{ hint }}")
    with pytest.raises(DataError, match="row 2: data.prompt_template: 'hint' is undefined"):
        _build(prompt_template=str(j)).render(MATH, "row 2")
    with pytest.raises(FileNotFoundError, match="no file"):
        _build(prompt_template=str(tmp_path / "missing.j2"))


@pytest.mark.parametrize("row, fmt, match", [
    ({"answer": "2"}, "math", r"row 4: the prompt needs field 'problem', which is missing"),
    ({"problem": "  "}, "plain", "which is blank"),
    ({"text": "t", "test_list": []}, "mbpp", "'test_list' must be a non-empty list"),
    ({"entry_point": "f"}, "humaneval", "needs field 'prompt'"),
])
def test_bad_rows_name_row_and_field(row, fmt, match):
    with pytest.raises(DataError, match=match):
        _build("code" if fmt in ("mbpp", "humaneval") else "math", prompt=fmt).render(row,
                                                                                   "row 4")


def test_bad_format():
    with pytest.raises(ValueError, match="data.prompt must be one of"):
        _build(prompt="chatml")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = demo_task.build_tokenizer()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind, rows", [("math", [MATH, {"problem": "1+1?", "answer": "2"}]),
                                        ("code", [MBPP, {**MBPP, "text": "Add."}])])
def test_training_and_eval_give_the_same_token_ids(kind, rows, model_dir, tmp_path,
                                                   monkeypatch):
    """The texts the trainer's rollouts and the evaluator's rollouts get for the same file,
    through their own Formatters, tokenise to the same prompt and instruction ids."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Config(model=ModelConfig(path=str(model_dir)),
                    data=DataConfig(train_file=str(data), max_prompt_tokens=4096),
                    rollout=RolloutConfig(samples_per_prompt=2), reward=RewardConfig(kind=kind),
                    train=TrainConfig(run_dir=str(tmp_path / "run"),
                                      prompts_per_step=len(rows)))
    seen = {}

    def recorder(name):
        def fake(model, tokenizer, formatter, problems, **_):
            seen[name] = {p: (formatter.prompt_ids(p), formatter.instruction_ids(p, []))
                          for p in problems}
            return [], {"gen_tokens": 0, "gen_seconds": 1.0}
        return fake

    monkeypatch.setattr(tr, "rollout", recorder("train"))
    monkeypatch.setattr(ev, "rollout", recorder("eval"))
    trainer = tr.Trainer(config)
    try:
        trainer.rollouts(0)
        task = ev.load_task(str(data), saved=config)
        ev._episodes(trainer.policy, trainer.tokenizer, task, samples=1, greedy=True,
                     temperature=1.0, max_new_tokens=None)
    finally:
        trainer.reward.close()
    assert len(seen["train"]) == len(rows) and seen["train"] == seen["eval"]
    # and they are the documented format, not the raw field
    text = next(iter(seen["train"]))
    assert text.startswith(MATH_PROMPT if kind == "math" else "You are an expert Python")
    fmt = Formatter(trainer.tokenizer, trainer.prompts.instruction)
    assert seen["train"][text][0] == fmt.prompt_ids(text)
