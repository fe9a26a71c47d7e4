"""Math reward: extraction, math-verify equivalence, reasons, and the hard timeout."""
import time

import pytest

from score_fast.rewards import MathReward, MathRewardConfig, make_reward
from score_fast.rewards.math import extract_answer

PAPER = "Final Answer: The final answer is ${}$. I hope it is correct."
TABLE = [
    # (response, reference answer, expected reason)
    (PAPER.format(r"\frac{1}{2}"), "0.5", "ok"),
    (PAPER.format("0.5"), r"\frac{1}{2}", "ok"),
    (r"So the result is $\boxed{\dfrac12}$.", "1/2", "ok"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}", "ok"),
    ("Half of it, so the answer is 0.5", r"\frac12", "no_answer"),  # no final answer stated
    (PAPER.format(r"10\%"), "0.1", "ok"),
    (PAPER.format("0.1"), r"10\%", "ok"),
    (PAPER.format(r"50\%"), r"\frac{1}{2}", "ok"),
    (PAPER.format("-3"), "-3", "ok"),
    (r"\boxed{-\frac{3}{4}}", "-0.75", "ok"),
    (PAPER.format("1,000"), "1000", "ok"),
    (PAPER.format(r"5\text{ cm}"), "5", "ok"),
    (PAPER.format(r"12 \text{ meters}"), "12", "ok"),
    (PAPER.format(r"90^\circ"), "90", "ok"),
    (PAPER.format(r"\$5"), "5", "ok"),
    (PAPER.format("(1, 2]"), "(1,2]", "ok"),
    (PAPER.format(r"(-\infty, 3)"), r"(-\infty,3)", "ok"),
    (PAPER.format(r"\{1,2,3\}"), r"\{3,2,1\}", "ok"),
    (PAPER.format(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"), r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", "ok"),
    (PAPER.format("2, 3"), "3, 2", "ok"),
    (PAPER.format("x^2+2x+1"), "(x+1)^2", "ok"),
    (r"thus \boxed{\frac{1}{\sqrt{\frac{4}{1}}}} is it", r"\frac12", "ok"),
    (PAPER.format(r"\text{(A)}"), "A", "ok"),
    (PAPER.format("3.0"), "3", "ok"),
    (PAPER.format(r"\frac{6}{4}"), r"\frac{3}{2}", "ok"),
    (PAPER.format(r"\pi/2"), r"\frac{\pi}{2}", "ok"),
    ("Step 1: 3+4=7.\n\n" + PAPER.format("7"), "7", "ok"),
    ("so we get 12 apples and then 42", "42", "no_answer"),
    (r"\boxed{0.333333}", r"\frac13", "ok"),
    (PAPER.format("3.14"), "3.14", "ok"),
    (PAPER.format(r"\sqrt{8}"), r"2\sqrt{2}", "ok"),
    ("The final answer is $-2$", "-2", "ok"),
    # not equivalent
    (PAPER.format("-3"), "3", "wrong_answer"),
    (PAPER.format("0.333"), r"\frac13", "wrong_answer"),
    (PAPER.format("(1,2)"), "[1,2]", "wrong_answer"),
    (PAPER.format(r"\{1,2\}"), r"\{1,2,3\}", "wrong_answer"),
    (PAPER.format(r"\frac{1}{2}"), "2", "wrong_answer"),
    (PAPER.format(r"\begin{pmatrix}1&2\\3&5\end{pmatrix}"), r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", "wrong_answer"),
    (PAPER.format(r"2 \text{ or } 3"), "2", "wrong_answer"),  # two answers: a hedge
    (r"either $2$ and $3$, The final answer is $2$ and $3$", "2", "wrong_answer"),
    (r"First \boxed{2}, no wait, \boxed{3}", "2", "hedged"),  # two answers: 0 either way
    (PAPER.format("3.14"), r"\pi", "wrong_answer"),
    (PAPER.format("x+1"), "x-1", "wrong_answer"),
    (PAPER.format("1001"), "1000", "wrong_answer"),
    (PAPER.format(r"-\frac{3}{4}"), "0.75", "wrong_answer"),
    # ways a response was paid without giving the answer (issue 18), now 0
    (r"First \boxed{6}. Actually \boxed{5}", "5", "hedged"),
    (PAPER.format("6") + " " + PAPER.format("5"), "5", "hedged"),
    (r"\boxed{3,3,3}", "3", "wrong_answer"),  # three items against one
    (r"\boxed{2,3,3}", "2,3", "wrong_answer"),
    (r"\boxed{2,2,3}", "2,3,3", "wrong_answer"),  # equal counts: matched as a multiset
    (r"\boxed{3\%}", "3", "wrong_answer"),  # 3% is 0.03
    (r"\boxed{3\text{ km}}", r"3\text{ m}", "wrong_answer"),  # units on both sides differ
    (PAPER.format(r"4 \text{ cm}^2"), r"4\text{ cm}", "wrong_answer"),
    # ... and what still counts as equal
    (r"\boxed{\frac12}, that is \boxed{0.5}", "1/2", "ok"),  # two boxes, one value
    (PAPER.format(r"\boxed{5}"), "5", "ok"),
    (r"\boxed{3,2,3}", "2,3,3", "ok"),
    (r"\boxed{300\%}", "3", "ok"),  # percent is part of the value
    (r"\boxed{25}", r"25\%", "ok"),  # "what percent": the number of percent
    (r"\boxed{0.25}", r"25\%", "ok"),
    (r"\boxed{3\text{ meters}}", r"3\text{ m}", "ok"),
    (r"\boxed{3}", r"3\text{ m}", "ok"),  # a unit on one side only is dropped
    (r"\boxed{1,000}", "1000", "ok"),  # thousands separators are not a list
    (r"\boxed{\{1,2\}}", r"\{2,1\}", "ok"),
    ("The answer: 1 2 3 4 5 6 7", "7", "no_answer"),  # no last-number fallback by default
    # nothing to extract
    ("I don't know.", "5", "no_answer"),
    ("", "5", "no_answer"),
    (r"\boxed{}", "5", "no_answer"),
    ("The final answer is $$. I hope it is correct.", "5", "no_answer"),
    # a broken reference is the data's fault, reported as such
    (PAPER.format("5"), "", "bad_reference"),
]


@pytest.fixture(scope="module")
def reward():
    with make_reward("math", workers=2) as r:
        yield r


def test_table(reward):
    assert len(TABLE) >= 40
    result = reward.evaluate([r for r, _, _ in TABLE], [{"answer": a} for _, a, _ in TABLE])
    wrong = [(resp, ref, want, got) for (resp, ref, want), got in zip(TABLE, result.reasons)
             if got != want]
    assert not wrong, wrong
    assert result.scores == [1.0 if want == "ok" else 0.0 for _, _, want in TABLE]
    assert result.failures()["no_answer"] == 7


@pytest.mark.parametrize("response,answer", [
    (PAPER.format(r"\frac{1}{2}"), r"\frac{1}{2}"),
    (r"a \boxed{x^{2}+\frac{1}{2}} b \boxed{\frac{\sqrt{3}}{2}} c", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"unbalanced \boxed{\frac{1}{2} and 7", None),  # no closing brace, nothing stated
    ("The final answer is $2$ or $3$. Done", "2 or 3"),
    (r"costs \$1,000.50 in total", None),
    ("no digits here", None),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.parametrize("response,answer", [
    (r"unbalanced \boxed{\frac{1}{2} and 7", "7"),  # lenient: falls to the last number
    (r"costs \$1,000.50 in total", "1,000.50"),
    ("no digits here", None),
    (PAPER.format("4") + " 99", "4"),  # a stated answer still wins
])
def test_extract_answer_lenient(response, answer):
    assert extract_answer(response, lenient=True) == answer


# A fixed set of responses of the kind a policy writes on MATH (reference "12" or "7"): the
# paper's checker ("final answer matches") against the lenient last-number fallback.
FIXED = [
    (PAPER.format("12"), "12"), (r"so $x = \boxed{12}$.", "12"), ("The final answer is 12.", "12"),
    (PAPER.format("13"), "12"), (r"\boxed{7} is it", "7"),
    ("We have 3 boxes of 4, that is 12 in total", "12"),      # never states an answer
    ("Let me compute 3 * 4 = 12", "12"),                       # never states an answer
    ("Adding 5 and 2 gives 7", "7"),                           # never states an answer
    ("5 + 2 is 7, or maybe 8", "7"),                           # never states an answer
    ("I think it might be around 12 or 13", "12"),             # never states an answer
    ("Step 1: 2 + 5 = 7. Step 2: check 7 - 5 = 2", "7"),       # never states an answer
    ("I don't know.", "12"), (PAPER.format("7") + " (step 3 had 12)", "7"),
]


def test_strict_and_lenient_on_a_fixed_set():
    with make_reward("math", workers=2) as strict, \
            make_reward("math", workers=2, lenient=True) as lenient:
        rows = [{"answer": a} for _, a in FIXED]
        a = strict.evaluate([r for r, _ in FIXED], rows)
        b = lenient.evaluate([r for r, _ in FIXED], rows)
    changed = [r for (r, _), x, y in zip(FIXED, a.scores, b.scores) if x != y]
    assert sum(a.scores) == 5 and sum(b.scores) == 8  # 3 of 13 scores change, all 0 -> 1
    assert changed == [FIXED[5][0], FIXED[6][0], FIXED[7][0]]
    assert all(reason == "no_answer" for (r, _), reason in zip(FIXED, a.reasons)
               if r in changed)


def test_score_is_floats_and_lengths_checked(reward):
    assert reward.score([PAPER.format("4")], [{"answer": "4"}]) == [1.0]
    with pytest.raises(ValueError, match="2 responses but 1 rows"):
        reward.score(["a", "b"], [{"answer": "1"}])


def test_answer_field():
    with MathReward(MathRewardConfig(answer_field="solution", workers=1)) as r:
        assert r.score([PAPER.format("3")], [{"solution": "3"}]) == [1.0]


def test_hostile_input_times_out_without_blocking_others():
    """A tower of powers makes sympy compute for ever; the alarm in the worker ends that check
    only, and the other items of the batch still get their answers."""
    tower = PAPER.format("2^{2^{2^{2^{2^{99}}}}}")
    responses = [tower] + [PAPER.format("4")] * 4
    with MathReward(MathRewardConfig(timeout_s=1, workers=2)) as r:
        r.score([PAPER.format("1")], [{"answer": "1"}])  # start the workers
        t0 = time.monotonic()
        result = r.evaluate(responses, [{"answer": "4"}] * len(responses))
        elapsed = time.monotonic() - t0
    assert result.scores == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert result.reasons[0] == "timeout"
    assert elapsed < 2 * 1 + 5, elapsed  # below the hard kill: the alarm did it


@pytest.mark.parametrize("text", ["final answer is " * 20_000, "\\boxed{" * 50_000, "1," * 100_000,
                                  "$" * 100_000 + "final answer is" + "$a" * 100_000])
def test_extraction_is_linear_on_hostile_text(text):
    t0 = time.monotonic()
    extract_answer(text)
    assert time.monotonic() - t0 < 1.0  # ~0.1 s on the CI machine; quadratic would be hours


def test_pool_kills_a_stuck_or_dead_worker():
    """The backstop behind the alarm: a worker stuck where signals cannot reach (a long C
    call) or dead is SIGKILLed / reaped, its item gets a reason, and the slot is reused."""
    import sys
    from score_fast.rewards.sandbox.pool import WorkerPool

    script = ("import json, sys, time\n"
              "for line in sys.stdin:\n"
              "    r = json.loads(line)\n"
              "    if r['do'] == 'hang': time.sleep(1000)\n"
              "    if r['do'] == 'die': sys.exit(3)\n"
              "    print(json.dumps({'score': 1.0, 'reason': 'ok'}), flush=True)\n")
    pool = WorkerPool(1, lambda slot: ([sys.executable, "-c", script], {}))
    try:
        t0 = time.monotonic()
        out = pool.map([{"do": "hang"}, {"do": "ok"}, {"do": "die"}, {"do": "ok"}], timeout=1.0)
        assert [o["reason"] for o in out] == ["timeout", "ok", "crash", "ok"]
        assert time.monotonic() - t0 < 10
    finally:
        pool.close()


def test_check_runs_off_the_main_thread(reward):
    """math-verify's own signal timeout fails outside the main thread; ours does not care."""
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(reward.score([r"\boxed{0.5}"], [{"answer": "1/2"}])))
    t.start()
    t.join(60)
    assert out == [[1.0]]


def test_hendrycks_math_rows_train_with_the_boxed_reference(tmp_path, capsys):
    """Hendrycks' MATH rows (problem + solution, no answer field) train through the CLI: the
    reference is the last \\boxed of the solution, a row's own answer wins, and a row with
    neither stops the run naming its row."""
    import dataclasses
    import json

    from helpers import make_run, write_config
    from score_fast.cli import main
    from score_fast.config import RewardConfig
    from score_fast.data import DataError
    from score_fast.rewards.math import with_reference
    from score_fast.trainer import Trainer
    rows = [{"problem": "What is 1+1?", "solution": r"First \boxed{3}? No: $\boxed{2}$.",
             "level": "Level 1", "type": "Algebra"},
            {"problem": "What is 2+3?", "answer": "5", "solution": r"$\boxed{4}$"},
            {"problem": "What is 6/3?", "answer": " ", "solution": r"\fbox{2}"}]
    data = tmp_path / "math_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = make_run(tmp_path, save_every=100)
    c = dataclasses.replace(c, reward=RewardConfig(kind="math"),
                            data=dataclasses.replace(c.data, train_file=str(data)))
    assert [r["answer"] for r in Trainer(c).rows] == ["2", "5", "2"]
    c.train.run_dir = str(tmp_path / "cli_run")
    assert main(["train", "--config", write_config(c, tmp_path / "run.yaml"),
                 "--stage1.steps=1", "--stage2.steps=1"]) == 0
    assert len((tmp_path / "cli_run" / "metrics.jsonl").read_text().splitlines()) == 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + [
        {"problem": "What is 9-2?", "solution": "seven, unboxed"}]))
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "run.yaml"),
                 f"--train.run_dir={tmp_path / 'bad'}"]) == 2
    assert (f"row 2 of {data}: no 'answer' and no closed \\boxed{{...}} in 'solution': no "
            f"reference answer") in capsys.readouterr().err
    with pytest.raises(DataError, match=r"row 7 of f: no 'answer' and no closed"):
        with_reference({"problem": "x", "solution": r"\boxed{1"}, "answer", "row 7 of f")
