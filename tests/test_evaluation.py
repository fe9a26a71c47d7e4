"""`score-fast eval` on real data formats: \\boxed extraction, format detection, row
preparation, per-group metrics, majority vote, and the CLI end to end on MATH500-, MATH- and
HumanEval-style files, greedy and with --samples (a tiny random model for the real runs; a
scripted rollout where the numbers must be hand-checkable)."""
import dataclasses
import json
import re

import pytest
import torch
import transformers
import yaml

from score_fast.demo import task as demo_task
from score_fast import evaluation as ev
from score_fast.prompts import MATH_PROMPT
pytest.importorskip("jsonargparse")  # the GPU image (bench/gpu_check.sh) does not have it
from score_fast.cli import main, parse_config, run_eval  # noqa: E402
from score_fast.config import (CODE_INSTRUCTION, Config, DataConfig, RewardConfig,  # noqa: E402
                               RolloutConfig)
from score_fast.data import DataError  # noqa: E402
from score_fast.metrics import format_table  # noqa: E402
from score_fast.rollout import Episode  # noqa: E402

# ------------------------------------------------------------------ data files
MATH500 = [  # MATH500's fields; the answers are what the scripted attempts are checked on
    {"problem": "What is 1/2 of 1?", "solution": r"It is $\boxed{\frac{1}{2}}$.",
     "answer": r"\frac{1}{2}", "subject": "Algebra", "level": 1, "unique_id": "a/1.json"},
    {"problem": "What is 1+2?", "solution": r"$\boxed{3}$", "answer": "3",
     "subject": "Algebra", "level": 1, "unique_id": "a/2.json"},
    {"problem": "What is 5+5?", "solution": r"$\boxed{10}$", "answer": "10",
     "subject": "Geometry", "level": 2, "unique_id": "g/3.json"},
    {"problem": "Expand (x+1).", "solution": r"$\boxed{x+1}$", "answer": "x+1",
     "subject": "Geometry", "level": 2, "unique_id": "g/4.json"},
    {"problem": "What is 2*4?", "solution": r"$\boxed{8}$", "answer": "8",
     "subject": "Algebra", "level": 2, "unique_id": "a/5.json"},
    {"problem": "What is 9-2?", "solution": r"$\boxed{7}$", "answer": "7",
     "subject": "Algebra", "level": 3, "unique_id": "a/6.json"},
]
# the original MATH: no `answer`, the reference is the last \boxed of `solution`; `type`
MATH = [{"problem": "What is 6/3?", "solution": r"First \boxed{3}? No: $\boxed{2}$.",
         "level": "Level 1", "type": "Algebra"},
        {"problem": "Half of 1?", "solution": r"$\fbox{\frac{1}{2}}$", "level": "Level 2",
         "type": "Prealgebra"}]
HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """a + b"""\n',
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"},
    {"task_id": "HumanEval/1", "prompt": "def neg(x):\n",
     "test": "def check(candidate):\n    assert candidate(3) == -3\n", "entry_point": "neg"}]
MBPP = [{"task_id": 2, "text": "Write a function to add two numbers.", "code": "",
         "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
         "test_setup_code": "", "challenge_test_list": []}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved as a checkpoint whose config.yaml says: math reward, the
    demo's short instruction, 8 new tokens per attempt."""
    d = tmp_path_factory.mktemp("ckpt") / "checkpoint-7"
    tok = demo_task.build_tokenizer()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    c = Config(rollout=RolloutConfig(max_new_tokens=8, instruction=demo_task.DEMO_INSTRUCTION))
    (d / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(c)))
    return str(d)


# ------------------------------------------------------------------ \boxed extraction
@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),                      # nested braces
    (r"\boxed{\frac{\sqrt{2}}{\sqrt{\frac{4}{1}}}}", r"\frac{\sqrt{2}}{\sqrt{\frac{4}{1}}}"),
    (r"first \boxed{2}, then \boxed{3} and \boxed{4}", "4"),            # the last one
    (r"\fbox{7} then \boxed {8}", "8"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                                   # escaped braces
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),               # an unpaired \{
    (r"so \boxed 5$ done", "5"),                                        # MATH's brace-less form
    (r"\boxed{}", ""),
    (r"\boxed{2} but \boxed{3", None),            # the last box never closes: no answer
    ("no box here, 42", None),
    ("", None),
])
def test_last_boxed(text, expected):
    assert ev.last_boxed(text) == expected


def test_normalize_answer_and_keys():
    same = [r"\dfrac{1}{2}", r"\frac {1}{2}", r"\tfrac{1}{2}.", r"\frac{1}{2}\!"]
    assert {ev.normalize_answer(a) for a in same} == {r"\frac{1}{2}"}
    assert ev.normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert {ev.normalize_answer(a) for a in ["1,000", "1000.0", "1000", r"1000\%", r"\$1000",
                                             "1e3"]} == {"1000"}
    assert ev.normalize_answer("0.50") == ev.normalize_answer(".5") == "0.5"
    assert ev.normalize_answer("-0.0") == "0"
    assert ev.normalize_answer(r"5\text{ cm}") == "5cm"
    assert ev.normalize_answer(r"90^\circ") == "90"
    assert ev.normalize_answer(r"x \rightarrow 1") == r"x\rightarrow1"  # not \right
    assert ev.answer_key("Final Answer: The final answer is $3.0$. I hope it is correct.") == "3"
    assert ev.answer_key("no idea") is None
    a = "```python\ndef f(x):\n    # double it\n    return 2*x\n```"
    b = "Here:\n```python\ndef f(x):\n\n    return 2 * x  # times two\n```"
    assert ev.program_key(a) == ev.program_key(b) == "def f(x):\n    return 2 * x"
    assert ev.program_key("    return x  \n\n") == "    return x"  # a body: not parseable
    assert ev.program_key("```python\n```") is None


def test_majority_vote_ties_and_missing_answers():
    assert ev.majority_vote(["3", "2", "2", "3", "1"]) == 0   # tie 2:2 -> "3" came first
    assert ev.majority_vote(["2", "3", "3", "2"]) == 0
    assert ev.majority_vote(["1", "2", "2"]) == 1             # majority, first occurrence
    assert ev.majority_vote([None, "7", None, "5", "5"]) == 3  # None does not vote
    assert ev.majority_vote([None, None, "7"]) == 2
    assert ev.majority_vote([None, None]) is None
    assert ev.majority_vote([]) is None


# ------------------------------------------------------------------ format detection
def test_detect_config_from_fields():
    math500 = ev.detect_config(MATH500, "m.jsonl")
    assert math500.reward.kind == "math" and math500.answer_field() == "answer"
    assert ev.detect_config(MATH, "m.jsonl").reward.kind == "math"
    assert ev.detect_config(HUMANEVAL, "h.jsonl").reward.kind == "code"
    assert ev.detect_config(MBPP, "b.jsonl").reward.kind == "code"
    sanitized = [{"prompt": "Add.", "test_list": ["assert add(1, 1) == 2"], "code": ""}]
    assert ev.detect_config(sanitized, "s.jsonl").reward.kind == "code"

    # the checkpoint's kind wins while the data fits it, with its own fields/instruction
    custom = Config(reward=RewardConfig(kind="custom", function="m:f"),
                    rollout=RolloutConfig(instruction="Fix:"))
    assert ev.detect_config(MATH500, "m.jsonl", custom) is custom
    gsm = Config(data=DataConfig(problem_field="question"))
    assert ev.detect_config([{"question": "1+1?", "answer": "2"}], "g.jsonl", gsm) is gsm
    # ... and gives way when it does not: another kind, its default fields and instruction
    code = ev.detect_config(HUMANEVAL, "h.jsonl", custom)
    assert (code.reward.kind, code.reward.function, code.instruction()) == (
        "code", "", CODE_INSTRUCTION)
    assert code.train == custom.train and code.rollout.max_new_tokens == 1024
    math = ev.detect_config(MATH, "m.jsonl", Config(reward=RewardConfig(kind="code")))
    assert math.reward.kind == "math"
    # kind forced
    assert ev.detect_config(MATH500, "m.jsonl", custom, kind="math").reward.kind == "math"


def test_detect_config_errors_name_file_and_fields():
    rows = [{"question": "1+1?", "label": "2", "id": 1}, {"question": "2+2?", "label": "4"}]
    with pytest.raises(DataError, match=r"q\.jsonl: cannot evaluate as math or code: math "
                       r"needs `problem` and `answer` or `solution`.*HumanEval.*MBPP.*"
                       r"the fields every row has: label, question$"):
        ev.detect_config(rows, "q.jsonl")
    custom = Config(reward=RewardConfig(kind="custom", function="m:f"))
    with pytest.raises(DataError, match="the checkpoint's custom reward needs 'problem', "
                                        "'answer'; math needs"):
        ev.detect_config(rows, "q.jsonl", custom)
    with pytest.raises(DataError, match=r"h\.jsonl: cannot evaluate as math: math needs.*"
                                        r"entry_point, prompt, task_id, test$"):
        ev.detect_config(HUMANEVAL, "h.jsonl", kind="math")


def test_prepare_rows():
    problems, rows = ev.prepare_rows(MATH, ev.detect_config(MATH, "m"), "m")
    assert problems == [f"{MATH_PROMPT}\n\nProblem:\n{p}" for p in ("What is 6/3?", "Half of 1?")]
    assert [r["answer"] for r in rows] == ["2", r"\frac{1}{2}"]  # last \boxed / \fbox
    assert "answer" not in MATH[0]  # the file's rows are not changed
    problems, rows = ev.prepare_rows(MBPP, ev.detect_config(MBPP, "b"), "b")
    assert problems == ["You are an expert Python programmer, and here is your task: Write a "
                        "function to add two numbers. Your code should pass these tests:\n\n"
                        + "\n".join(MBPP[0]["test_list"])]
    assert rows == MBPP
    problems, _ = ev.prepare_rows(HUMANEVAL, ev.detect_config(HUMANEVAL, "h"), "h")
    assert problems == [r["prompt"] for r in HUMANEVAL]
    bad = [MATH[0], {"problem": "?", "solution": r"no box", "answer": " "}]
    with pytest.raises(DataError, match=r"row 2 of m\.jsonl: no 'answer' and no closed "
                                        r"\\boxed\{\.\.\.\} in 'solution'"):
        ev.prepare_rows(bad, ev.detect_config(bad, "m.jsonl"), "m.jsonl")
    with pytest.raises(DataError, match=r"row 1 of h: field 'test' is null"):
        ev.prepare_rows([{**HUMANEVAL[0], "test": None}], Config(reward=RewardConfig("code")),
                        "h")
    with pytest.raises(DataError, match="row 1 of b: 'test_list' must be a non-empty list"):
        ev.prepare_rows([{**MBPP[0], "test_list": []}], Config(reward=RewardConfig("code")),
                        "b")


# ------------------------------------------------------------------ per-group metrics
def test_breakdown_metrics_by_hand():
    rows = [{"level": 1, "subject": "Algebra"}, {"level": 10, "subject": "Algebra"},
            {"level": 2}, {"level": 1, "subject": "Geometry"}]
    c1, c2 = [True, False, True, False], [True, True, False, False]
    # edit ratios per row: 0, 2/4 ("ab" -> "cd"), 1/5 ("ab" -> "abc"), 0
    t1, t2 = ["ab", "ab", "ab", "abcd"], ["ab", "cd", "abc", "abcd"]
    table = ev.breakdown_metrics(rows, c1, c2, t1, t2)
    assert list(table) == ["all", "level=1", "level=2", "level=10", "subject=Algebra",
                           "subject=Geometry", "subject=none"]  # no `type`: no type rows
    assert format_table(table, label="group", count=True, edit_ratio=True) == "\n".join([
        "| group | n | Acc@t1 | Acc@t2 | Delta | Delta_i->c | Delta_c->i | edit ratio |",
        "|---|---|---|---|---|---|---|---|",
        "| all | 4 | 50.0 | 50.0 | 0.0 | 25.0 | 25.0 | 0.175 |",
        "| level=1 | 2 | 50.0 | 50.0 | 0.0 | 0.0 | 0.0 | 0.000 |",
        "| level=2 | 1 | 100.0 | 0.0 | -100.0 | 0.0 | 100.0 | 0.200 |",
        "| level=10 | 1 | 0.0 | 100.0 | 100.0 | 100.0 | 0.0 | 0.500 |",
        "| subject=Algebra | 2 | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 | 0.250 |",
        "| subject=Geometry | 1 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.000 |",
        "| subject=none | 1 | 100.0 | 0.0 | -100.0 | 0.0 | 100.0 | 0.200 |"])
    one_level = ev.breakdown_metrics([{"level": 3}] * 2, [1, 0], [1, 1], ["a", "b"], ["a", "b"])
    assert list(one_level) == ["all"]  # one value: nothing to break down


# ------------------------------------------------------------------ CLI, scripted attempts
def scripted(monkeypatch, answers):
    """Replace the rollout: answers[problem] is a list of (attempt 1, attempt 2) texts, one
    pair for the greedy pass and K pairs for --samples K. Records each call's sampling."""
    calls = []

    def fake(model, tokenizer, formatter, problems, *, samples, greedy=False,
             temperature=1.0, **_):
        calls.append((samples, greedy, temperature))
        eps = []
        for i, p in enumerate(problems):
            p = p.split("\n\nProblem:\n", 1)[-1]  # the MATH prompt's problem
            pairs = answers[p][:1] if samples == 1 else answers[p][1:]
            assert len(pairs) == samples
            eps += [Episode(i, [], [], [], [], t1, t2) for t1, t2 in pairs]
        return eps, {}
    monkeypatch.setattr(ev, "rollout", fake)
    return calls


B = r"\boxed{%s}"


def test_cli_math500_scripted_numbers(tmp_path, checkpoint, monkeypatch, capsys):
    """Greedy table and --samples 4 through the real math reward, numbers by hand."""
    data = write_jsonl(tmp_path / "math500.jsonl", MATH500)
    # right at attempt 1: rows 1, 3, 6; at attempt 2: rows 1, 2, 5, 6
    greedy = [  # (t1, t2): equivalent forms count as right
        (B % "0.5", B % r"\frac{1}{2}"), (B % "4", B % "3"),
        ("Final Answer: The final answer is $10$. I hope it is correct.", B % "11"),
        (B % "x-1", B % "x"), (B % "9", "so 2*4 = 8, the final answer is 8"), (B % "7", B % "7.0")]
    k4 = {  # K = 4 samples: (attempt 1, attempt 2) per sample
        0: [(B % "0.5", B % "0.5"), (B % "1", B % "1"), (B % "1", B % "1"),
            (B % "0.50", B % "1")],  # attempt 1: tie 0.5 / 1, 0.5 first -> right;
        # attempts 2 of the first two samples: tie, 0.5 first -> right (all four: 1 wins)
        1: [("no idea", B % "4"), (B % "4", "none"), (B % "3", B % "3"), (B % "3", B % "3")],
        # attempt 1: 3 wins 2:1 -> right; attempts 2: only "4" votes -> wrong
        2: [(B % "1", B % r"\dfrac{20}{2}"), (B % "1", B % "10"), (B % "10", B % "1"),
            (B % "1,0", B % "1")],  # attempt 1: 1 -> wrong; 2: tie, first -> right
        3: [("x", "y")] * 4,  # no answer anywhere -> wrong in both arms
        4: [(B % "8", B % "8")] * 4,  # right in both
        5: [(B % "6", B % "7"), (B % "7", B % "7"), (B % "6", B % "6"), (B % "7", B % "6")]}
    # attempt 1: tie 6 / 7, 6 first -> wrong; attempts 2: 7 -> right
    calls = scripted(monkeypatch, {r["problem"]: [greedy[i]] + k4[i]
                                   for i, r in enumerate(MATH500)})
    assert main(["eval", "--checkpoint", checkpoint, "--data", data, "--samples", "4"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"checkpoint-7 on {data}: math, 6 problems, both attempts greedy"
    assert lines[1].startswith("| checkpoint-7 | n | Acc@t1 | Acc@t2 | Delta | Delta_i->c "
                               "| Delta_c->i | edit ratio |")
    # i->c: rows 2 and 5; c->i: row 3 (of 6); each group by hand from the rows above
    expect = ["| all | 6 | 50.0 | 66.7 | 16.7 | 33.3 | 16.7 |",
              "| level=1 | 2 | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 |",
              "| level=2 | 3 | 33.3 | 33.3 | 0.0 | 33.3 | 33.3 |",
              "| level=3 | 1 | 100.0 | 100.0 | 0.0 | 0.0 | 0.0 |",
              "| subject=Algebra | 4 | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 |",
              "| subject=Geometry | 2 | 50.0 | 0.0 | -50.0 | 0.0 | 50.0 |"]
    for line, e in zip(lines[3:9], expect):
        assert line.startswith(e), (line, e)
    # self-consistency: rows 1, 2, 5 right -> 50.0; self-correction: 1, 3, 5, 6 -> 66.7
    assert lines[10:] == [
        "| inference-time scaling: K=4, temperature 0.7, 6 problems | accuracy |", "|---|---|",
        "| self-consistency: majority of 4 first attempts | 50.0 |",
        "| self-correction: majority of 2 second attempts (2 first + 2 second) | 66.7 |"]
    assert calls == [(1, True, 1.0), (4, False, 0.7)]  # greedy, then sampled at 0.7


def test_cli_humaneval_scripted_numbers(tmp_path, checkpoint, monkeypatch, capsys):
    """The saved math kind gives way to the file's HumanEval fields; programs run in the
    code sandbox; no level/subject: only the "all" row."""
    data = write_jsonl(tmp_path / "humaneval.jsonl", HUMANEVAL)
    fence = "```python\n%s\n```"
    scripted(monkeypatch, {
        HUMANEVAL[0]["prompt"]: [("    return a - b\n",
                                  fence % "def add(a, b):\n    return a + b")],
        HUMANEVAL[1]["prompt"]: [("    return -x\n", "    return x\n")]})
    assert main(["eval", "--checkpoint", checkpoint, "--data", data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": code, 2 problems, both attempts greedy")
    assert len(lines) == 4 and lines[3].startswith("| all | 2 | 50.0 | 50.0 | 0.0 | 50.0 | 50.0 |")


def test_cli_eval_logs_progress_per_batch_not_on_stdout(tmp_path, checkpoint, monkeypatch,
                                                        capsys, caplog):
    """score-fast eval with the checkpoint's rollout.gen_batch_size=2: the greedy pass
    takes the 6 problems 2 at a time (--samples 4: 1 at a time, at least a problem a batch),
    logging "eval: done/total problems" after each batch; stdout holds the same tables as
    one batch of all 6 (the default gen_batch_size 64), and no progress."""
    import shutil
    ckpt = tmp_path / "checkpoint-7"
    shutil.copytree(checkpoint, ckpt)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    saved["rollout"]["gen_batch_size"] = 2
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    data = write_jsonl(tmp_path / "math500.jsonl", MATH500)
    # right at attempt 1, wrong at attempt 2, in every pass
    answers = {r["problem"]: [(B % r["answer"], B % "wrong")] * 5 for r in MATH500}
    calls = scripted(monkeypatch, answers)
    assert main(["eval", "--checkpoint", checkpoint, "--data", data]) == 0  # one batch of 64
    one_batch = capsys.readouterr().out
    assert calls == [(1, True, 1.0)]
    calls.clear()
    with caplog.at_level("INFO", logger="score_fast"):
        assert main(["eval", "--checkpoint", str(ckpt), "--data", data, "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert calls == [(1, True, 1.0)] * 3 + [(4, False, 0.7)] * 6
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval:")]
    assert [re.sub(r"\(\d+ s\)", "(T s)", m) for m in progress] == [
        "eval: 6 problems, both attempts greedy, up to 8 new tokens an attempt",
        "eval: 2/6 problems (T s)", "eval: 4/6 problems (T s)", "eval: 6/6 problems (T s)",
        "eval: 6 problems, 4 sampled episodes each at temperature 0.7, up to 8 new tokens "
        "an attempt"] + [f"eval: {i}/6 problems (T s)" for i in range(1, 7)]
    assert out.startswith(one_batch) and "eval:" not in out
    assert out.splitlines()[10:] == [
        "| inference-time scaling: K=4, temperature 0.7, 6 problems | accuracy |", "|---|---|",
        "| self-consistency: majority of 4 first attempts | 100.0 |",
        "| self-correction: majority of 2 second attempts (2 first + 2 second) | 0.0 |"]


# ------------------------------------------------------------------ CLI, the real model
def test_cli_real_model_math_and_humaneval(tmp_path, checkpoint, capsys, caplog):
    """The tiny random model end to end: MATH500 and MATH files (breakdowns), HumanEval (the
    saved math kind gives way, logged), and --samples 4. The greedy numbers must equal the
    same rows decoded and scored from scratch (rollout, reward, self_correction_metrics)."""
    from score_fast.metrics import self_correction_metrics
    from score_fast.models import load_model, load_tokenizer
    from score_fast.prompts import PromptBuilder
    from score_fast.rewards import make_reward_from
    from score_fast.rollout import Formatter, rollout
    m500 = write_jsonl(tmp_path / "math500.jsonl", MATH500)
    res = run_eval(parse_config(["eval", "--checkpoint", checkpoint, "--data", m500,
                                 "--samples", "4"]))
    printed = capsys.readouterr().out
    assert res["kind"] == "math"
    assert [(k, m["n"]) for k, m in res["metrics"].items()] == [
        ("all", 6), ("level=1", 2), ("level=2", 3), ("level=3", 1), ("subject=Algebra", 4),
        ("subject=Geometry", 2)]
    assert format_table(res["metrics"], label="checkpoint-7", count=True,
                        edit_ratio=True) in printed
    s = res["scaling"]
    assert s["samples"] == 4 and s["n"] == 6
    assert all(6 * s[a] == int(6 * s[a]) for a in ("self_consistency", "self_correction"))
    assert ev.format_scaling(s) in printed
    task = ev.load_task(m500, ev.detect_config(MATH500, m500))
    config = dataclasses.replace(task.config, rollout=RolloutConfig(
        max_new_tokens=8, instruction=demo_task.DEMO_INSTRUCTION))  # the checkpoint's
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    prompts = PromptBuilder.from_config(config)
    with torch.no_grad():
        eps, _ = rollout(model.eval(), tok, Formatter(tok, prompts.instruction),
                         [prompts.render(r, "row") for r in task.rows], samples=1, greedy=True,
                         max_new_tokens=8)
    text1, text2 = [e.text1 for e in eps], [e.text2 for e in eps]
    with make_reward_from(task.config) as reward:
        ok1 = [score > 0 for score in reward.score(text1, task.rows)]
        ok2 = [score > 0 for score in reward.score(text2, task.rows)]
    ref = self_correction_metrics(ok1, ok2, text1, text2)
    assert res["metrics"]["all"] == {**ref, "n": 6}

    math = write_jsonl(tmp_path / "math.jsonl", MATH)
    res = run_eval(parse_config(["eval", "--checkpoint", checkpoint, "--data", math]))
    assert list(res["metrics"]) == ["all", "level=Level 1", "level=Level 2", "type=Algebra",
                                    "type=Prealgebra"]
    he = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    with caplog.at_level("INFO", logger="score_fast"):
        res = run_eval(parse_config(["eval", "--checkpoint", checkpoint, "--data", he,
                                     "--limit", "1"]))
    assert res["kind"] == "code" and list(res["metrics"]) == ["all"]
    assert res["metrics"]["all"]["n"] == 1
    assert "trained with the math reward" in caplog.text and "evaluating with the code" \
        in caplog.text


def test_cli_errors(tmp_path, checkpoint, capsys):
    with pytest.raises(ValueError, match="--samples must be an even number >= 2"):
        parse_config(["eval", "--checkpoint", checkpoint, "--data", "x", "--samples", "3"])
    with pytest.raises(ValueError, match="eval kind must be math, code or unset"):
        parse_config(["eval", "--checkpoint", checkpoint, "--data", "x", "--kind", "maths"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "?", "label": "1"}])
    # the CLI prints the error on one line (exit 2); the API raises it
    assert main(["eval", "--checkpoint", checkpoint, "--data", bad]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert re.match(r"score-fast: error: .*bad\.jsonl: cannot evaluate as math or code.*the "
                    r"fields every row has: label, question.*DataError", last)
    assert main(["eval", "--checkpoint", checkpoint, "--data", bad, "--kind", "code"]) == 2
    assert re.search(r"bad\.jsonl: cannot evaluate as code", capsys.readouterr().err)
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot evaluate as code"):
        run_eval(parse_config(["eval", "--checkpoint", checkpoint, "--data", bad, "--kind",
                               "code"]))


def test_paper_code_setup_mbpp_recipe_evaluated_on_humaneval(tmp_path, capsys):
    """The paper's code setup through the CLI: `--recipe mbpp` (MBPP's prompt) with a
    HumanEval train.eval_file, then `score-fast eval` of its checkpoint on HumanEval: the
    HumanEval rows are prompted as HumanEval (their own `prompt`) with the run's code
    instruction, not refused for lacking MBPP's test_list."""
    from helpers import make_run
    c = make_run(tmp_path)  # the tiny model and its char tokenizer
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", MBPP * 4)
    he = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    run = tmp_path / "mbpp_run"
    assert main(["train", "--recipe", "mbpp", f"--model.path={c.model.path}",
                 f"--data.train_file={mbpp}", f"--train.eval_file={he}",
                 f"--train.run_dir={run}", "--stage1.steps=1", "--stage2.steps=1",
                 "--train.prompts_per_step=2", "--rollout.samples_per_prompt=2",
                 "--rollout.max_new_tokens=4", "--train.save_every=2"]) == 0
    evals = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval/acc_t1" in m]
    assert len(evals) == 1 and 0 <= evals[0]["eval/acc_t1"] <= 1
    saved = yaml.safe_load((run / "checkpoint-2" / "config.yaml").read_text())
    assert saved["data"]["prompt"] == "mbpp" and saved["reward"]["kind"] == "code"
    config = ev.detect_config(HUMANEVAL, he, parse_config(
        ["train", "--recipe", "mbpp", "--model.path=m"]))
    assert (config.data.prompt, config.reward.kind, config.instruction()) == (
        "auto", "code", CODE_INSTRUCTION)
    problems, _ = ev.prepare_rows(HUMANEVAL, config, he)
    assert problems == [r["prompt"] for r in HUMANEVAL]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "checkpoint-2"), "--data", he]) == 0
    out = capsys.readouterr().out
    assert ": code, 2 problems, both attempts greedy" in out and "| all | 2 |" in out
    # MBPP rows still get MBPP's prompt from the same checkpoint
    assert main(["eval", "--checkpoint", str(run / "checkpoint-2"), "--data", mbpp,
                 "--limit", "1"]) == 0
