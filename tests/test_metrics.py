"""score_fast.metrics: the paper's self-correction metrics on hand-made cases, the identity
delta == i2c - c2i, edit distance against a plain DP, and the markdown table."""
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from score_fast.metrics import edit_distance, format_table, self_correction_metrics


def reference_edit_distance(a, b):
    """Textbook Wagner-Fischer DP, the definition edit_distance must match."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_each_outcome_once():
    # (t1, t2) = (wrong, wrong), (wrong, right), (right, wrong), (right, right)
    m = self_correction_metrics([0, 0, 1, 1], [0, 1, 0, 1])
    assert m == {"acc_t1": 0.5, "acc_t2": 0.5, "delta": 0.0, "delta_i2c": 0.25,
                 "delta_c2i": 0.25}


def test_fractions_are_of_all_problems():
    # 1 of 5 fixed; i2c divides by all 5 problems, not by the 3 wrong at t1.
    m = self_correction_metrics([True, True, False, False, False],
                                [True, True, True, False, False])
    assert m["delta_i2c"] == pytest.approx(0.2)
    assert m["delta_c2i"] == 0.0
    assert m["acc_t1"] == pytest.approx(0.4) and m["acc_t2"] == pytest.approx(0.6)
    assert m["delta"] == pytest.approx(0.2)


def test_accepts_floats_and_numpy_and_torch():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    expected = self_correction_metrics([1, 0], [1, 1])
    assert self_correction_metrics([1.0, 0.0], np.array([1, 1])) == expected
    assert self_correction_metrics(torch.tensor([True, False]), torch.tensor([1.0, 1.0])) \
        == expected


def test_paper_math_base_row():
    """MATH500 base model (Table 2): 52.6 -> 41.4, i->c 4.6, c->i 15.8 on 500 problems,
    i.e. 23 fixed and 79 broken of 263 right at t1."""
    right_right, i2c, c2i = 263 - 79, 23, 79
    wrong_wrong = 500 - right_right - i2c - c2i
    c1 = [1] * right_right + [0] * i2c + [1] * c2i + [0] * wrong_wrong
    c2 = [1] * right_right + [1] * i2c + [0] * c2i + [0] * wrong_wrong
    m = self_correction_metrics(c1, c2)
    assert format_table({"base model": m}).splitlines()[-1] == \
        "| base model | 52.6 | 41.4 | -11.2 | 4.6 | 15.8 |"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_delta_is_i2c_minus_c2i(pairs):
    c1, c2 = zip(*pairs)
    m = self_correction_metrics(c1, c2)
    assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"], abs=1e-12)
    assert m["delta"] == pytest.approx(m["acc_t2"] - m["acc_t1"], abs=1e-12)
    assert 0 <= m["delta_i2c"] <= 1 - m["acc_t1"] + 1e-12
    assert 0 <= m["delta_c2i"] <= m["acc_t1"] + 1e-12


def test_edit_ratio():
    # "abc" -> "abd": 1 edit over 6 characters; "" / "": 0 by definition;
    # "ab" -> "": 2 edits over 2 characters (nothing kept).
    m = self_correction_metrics([1, 0, 1], [1, 1, 0], ["abc", "", "ab"], ["abd", "", ""])
    assert m["edit_ratio"] == pytest.approx((1 / 6 + 0 + 1) / 3)
    assert "edit_ratio" not in self_correction_metrics([1], [1])
    assert self_correction_metrics([1], [1], ["same"], ["same"])["edit_ratio"] == 0.0


@pytest.mark.parametrize("args,match", [
    (([1, 0], [1]), "correct2 has 1 entries but correct1 has 2"),
    (([], []), "correct1 is empty"),
    (([1], []), "correct2 is empty"),
    (([1, 0.5], [1, 1]), r"correct1\[1\] = 0.5: expected a binary reward"),
    (([1], ["yes"]), r"correct2\[0\] = 'yes' is not a bool or 0/1"),
    (([1], [None]), r"correct2\[0\] = None"),
    (([1, 1], [1, 1], ["a", "b"], ["a"]), "attempt2 has 1 entries but correct1 has 2"),
    (([1, 1], [1, 1], ["a"], ["a", "b"]), "attempt1 has 1 entries"),
    (([1], [1], ["a"], None), "attempt2 is missing"),
    (([1], [1], None, ["a"]), "attempt1 is missing"),
])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        self_correction_metrics(*args)


def test_type_errors():
    with pytest.raises(TypeError, match="correct1"):
        self_correction_metrics("1010", [1, 0, 1, 0])
    with pytest.raises(TypeError, match="attempt1 must be a sequence of strings"):
        self_correction_metrics([1, 1], [1, 1], "ab", ["a", "b"])
    with pytest.raises(TypeError, match=r"attempt2\[1\] is int"):
        self_correction_metrics([1, 1], [1, 1], ["a", "b"], ["a", 3])
    with pytest.raises(TypeError, match="two str"):
        edit_distance("a", None)


@pytest.mark.parametrize("a,b,d", [
    ("", "", 0), ("", "abc", 3), ("abc", "", 3), ("kitten", "sitting", 3),
    ("flaw", "lawn", 2), ("37+58=95", "37+58=96", 1), ("abc", "abc", 0), ("ab", "ba", 2),
    ("a" * 70, "b" * 70, 70), ("x" * 64 + "y", "x" * 65, 1),  # across 64-bit word edges
])
def test_edit_distance_hand_cases(a, b, d):
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc\n", max_size=80), st.text(alphabet="abcd\n", max_size=80))
def test_edit_distance_matches_dp(a, b):
    assert edit_distance(a, b) == reference_edit_distance(a, b)


def test_edit_distance_unicode():
    assert edit_distance("naïve café", "naive cafe") == 2
    assert edit_distance("x²+y²", "x^2+y^2") == 4


def test_edit_distance_fast_on_1000_chars():
    rng = random.Random(0)
    alphabet = "0123456789+-=() abcdefghij\n"
    a = "".join(rng.choice(alphabet) for _ in range(1000))
    b = "".join(rng.choice(alphabet) for _ in range(1000))
    best = min(_timed(edit_distance, a, b) for _ in range(3))
    assert best < 0.05, f"edit_distance on 2 x 1000 chars took {best * 1e3:.1f} ms"
    small = 200  # spot check the long case against the DP on a prefix
    assert edit_distance(a[:small], b[:small]) == reference_edit_distance(a[:small], b[:small])


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def test_format_table():
    rows = {
        "base": {"acc_t1": 0.526, "acc_t2": 0.414, "delta": -0.112, "delta_i2c": 0.046,
                 "delta_c2i": 0.158, "edit_ratio": 0.3},
        "after Stage II": self_correction_metrics([1, 0, 0, 0, 1], [1, 1, 0, 0, 1]),
        "a|b": {"acc_t1": 0.0, "acc_t2": -0.0001, "delta": -0.0004, "delta_i2c": 1,
                "delta_c2i": 0.00049},
    }
    assert format_table(rows) == "\n".join([
        "| model | Acc@t1 | Acc@t2 | Delta | Delta_i->c | Delta_c->i |",
        "|---|---|---|---|---|---|",
        "| base | 52.6 | 41.4 | -11.2 | 4.6 | 15.8 |",
        "| after Stage II | 40.0 | 60.0 | 20.0 | 20.0 | 0.0 |",
        "| a\\|b | 0.0 | 0.0 | 0.0 | 100.0 | 0.0 |",
    ])


def test_format_table_errors():
    with pytest.raises(ValueError, match="rows is empty"):
        format_table({})
    with pytest.raises(ValueError, match=r"rows\['base'\] lacks delta_i2c, delta_c2i"):
        format_table({"base": {"acc_t1": 0.5, "acc_t2": 0.5, "delta": 0.0}})


def test_attempt1_only_has_acc_t1_alone():
    """No attempt 2 (a train.single_turn step): acc_t1 only; the attempt-2 metrics are
    undefined, not 0, and format_table names what it lacks."""
    from score_fast.metrics import format_table, self_correction_metrics
    assert self_correction_metrics([True, False, 1, 0], None) == {"acc_t1": 0.5}
    with pytest.raises(ValueError, match="attempt2 is given but correct2 is None"):
        self_correction_metrics([True], None, ["a"], ["b"])
    with pytest.raises(ValueError, match="lacks acc_t2, delta"):
        format_table({"x": {"acc_t1": 0.5}})
