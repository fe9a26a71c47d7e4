"""The SCoRe paper's self-correction metrics (Kumar et al., arXiv 2409.12917, Section 3).

Computed over greedy attempts: y1 is the first attempt at each problem, y2 the attempt made
after the self-correction instruction, and correct1[i] / correct2[i] their binary rewards.

| key        | definition                                                              |
|------------|-------------------------------------------------------------------------|
| acc_t1     | Accuracy@t1: fraction of problems whose first attempt is correct         |
| acc_t2     | Accuracy@t2: fraction of problems whose second attempt is correct        |
| delta      | Delta(t1, t2) = acc_t2 - acc_t1                                          |
| delta_i2c  | Delta_i->c: fraction of ALL problems wrong at t1 and right at t2        |
| delta_c2i  | Delta_c->i: fraction of ALL problems right at t1 and wrong at t2        |
| edit_ratio | "edit distance between y1 and y2 over their total length": the mean     |
|            | over problems of edit_distance(y1, y2) / (len(y1) + len(y2)), with 0    |
|            | for a problem whose attempts are both empty. In [0, 1]: 0 means y2 = y1, |
|            | 1 means no character kept (Levenshtein on characters, unit costs).      |

Both Delta_i->c and Delta_c->i divide by the number of ALL problems (not by the number wrong
or right at t1), so delta == delta_i2c - delta_c2i exactly as counts; as floats, to rounding.

With no second attempt (correct2=None: a train.single_turn step samples attempt 1 only)
only acc_t1 is returned: the others are undefined, not zero.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["self_correction_metrics", "edit_distance", "format_table", "COLUMNS"]

# (metric key, column header) for format_table, in the paper's column order (Tables 2-4).
COLUMNS = (("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"), ("delta", "Delta"),
           ("delta_i2c", "Delta_i->c"), ("delta_c2i", "Delta_c->i"))


def self_correction_metrics(correct1: Sequence[Any], correct2: Sequence[Any] | None,
                            attempt1: Sequence[str] | None = None,
                            attempt2: Sequence[str] | None = None) -> dict[str, float]:
    """The table above as fractions in [0, 1] (delta in [-1, 1]), keyed as named there.

    correct1[i] / correct2[i] say whether attempt 1 / 2 at problem i is right: bools, or
    numbers equal to 0 or 1 (binary rewards; a shaped reward is rejected rather than read
    as "right if > 0"). edit_ratio is included only when attempt1 and attempt2 are given.
    correct2=None (no attempt 2 was made): {"acc_t1"} only.
    """
    c1 = _as_bools(correct1, "correct1")
    if correct2 is None:
        if attempt2 is not None:
            raise ValueError("attempt2 is given but correct2 is None")
        return {"acc_t1": sum(c1) / len(c1)}
    c2 = _as_bools(correct2, "correct2")
    if len(c2) != len(c1):
        raise ValueError(f"correct2 has {len(c2)} entries but correct1 has {len(c1)}")
    n = len(c1)
    i2c = sum(1 for a, b in zip(c1, c2) if not a and b)
    c2i = sum(1 for a, b in zip(c1, c2) if a and not b)
    out = {"acc_t1": sum(c1) / n, "acc_t2": sum(c2) / n,
           # From counts, so that delta == delta_i2c - delta_c2i up to one rounding.
           "delta": (i2c - c2i) / n, "delta_i2c": i2c / n, "delta_c2i": c2i / n}
    if (attempt1 is None) != (attempt2 is None):
        missing = "attempt2" if attempt2 is None else "attempt1"
        raise ValueError(f"{missing} is missing: edit_ratio needs both attempt1 and attempt2")
    if attempt1 is not None and attempt2 is not None:
        for name, seq in (("attempt1", attempt1), ("attempt2", attempt2)):
            if isinstance(seq, str):  # one string would be read as one attempt per character
                raise TypeError(f"{name} must be a sequence of strings, not a string")
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries but correct1 has {n}")
        total = 0.0
        for i, (y1, y2) in enumerate(zip(attempt1, attempt2)):
            if not isinstance(y1, str) or not isinstance(y2, str):
                bad, y = ("attempt1", y1) if not isinstance(y1, str) else ("attempt2", y2)
                raise TypeError(f"{bad}[{i}] is {type(y).__name__}, not str")
            length = len(y1) + len(y2)
            total += edit_distance(y1, y2) / length if length else 0.0
        out["edit_ratio"] = total / n
    return out


def _as_bools(values: Sequence[Any], name: str) -> list[bool]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of bools or 0/1, not a string")
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)  # also takes numpy / torch scalars
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] = {v!r} is not a bool or 0/1") from None
        if x not in (0.0, 1.0):
            raise ValueError(f"{name}[{i}] = {v!r}: expected a binary reward (0 or 1)")
        out.append(x == 1.0)
    if not out:
        raise ValueError(f"{name} is empty: no problems to score")
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between strings a and b: the fewest single-character insertions,
    deletions and substitutions turning a into b.

    Bit-parallel (Myers 1999, in Hyyro's form for global distance): one column of the DP
    table is two bit vectors over the shorter string, held in Python ints, and each character
    of the longer string updates them with a dozen big-int operations. Time is
    O(len(a) * len(b) / 64) word operations, memory O(min(len(a), len(b))) bits. Measured on
    the 2-core CPU box: 2 x 1000 random characters, 2.2 ms (a numpy row-at-a-time DP took
    17 ms and a plain Python DP 350 ms); 4000 x 3900, 10 ms.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(f"edit_distance takes two str, got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if a == b:
        return 0
    if len(a) > len(b):
        a, b = b, a
    m = len(a)
    if m == 0:
        return len(b)
    # peq[c]: bit i set where a[i] == c.
    peq: dict[str, int] = {}
    for i, c in enumerate(a):
        peq[c] = peq.get(c, 0) | (1 << i)
    mask = (1 << m) - 1  # Python ints are unbounded: ~x must be clipped to m bits
    top = 1 << (m - 1)   # the bit for the last row, whose value is the distance
    pv, mv, dist = mask, 0, m  # vertical deltas of column 0 are all +1 (D[i][0] = i)
    for c in b:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)  # horizontal delta +1
        mh = pv & xh                   # horizontal delta -1
        if ph & top:
            dist += 1
        elif mh & top:
            dist -= 1
        # Shift in a +1 at row 0: D[0][j] = j (global distance; a search would shift in 0).
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return dist


def format_table(rows: Mapping[str, Mapping[str, float]], *, label: str = "model",
                 count: bool = False, edit_ratio: bool = False) -> str:
    """A markdown table, one row per named model (e.g. "base", "after Stage I", "after
    Stage II"), columns Acc@t1, Acc@t2, Delta, Delta_i->c, Delta_c->i in percent with one
    decimal, as in the paper's tables (Delta -11.2, no "+" on positive values). `rows` maps
    a name to a self_correction_metrics() result. `label` heads the name column; `count`
    adds an "n" column (each row's "n": its number of problems) after the names, and
    `edit_ratio` an "edit ratio" column last (a fraction with three decimals, as defined
    above). Other keys are ignored."""
    if not rows:
        raise ValueError("rows is empty: no models to tabulate")
    need = [k for k, _ in COLUMNS] + ["n"] * count + ["edit_ratio"] * edit_ratio
    heads = ["n"] * count + [h for _, h in COLUMNS] + ["edit ratio"] * edit_ratio
    lines = [f"| {label} | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for name, metrics in rows.items():
        missing = [k for k in need if k not in metrics]
        if missing:
            raise ValueError(f"rows[{name!r}] lacks {', '.join(missing)}")
        # + 0.0 turns a rounded -0.0 into 0.0, so a zero never prints as "-0.0".
        cells = [f"{round(100 * float(metrics[k]), 1) + 0.0:.1f}" for k, _ in COLUMNS]
        if count:
            cells.insert(0, str(int(metrics["n"])))
        if edit_ratio:
            cells.append(f"{float(metrics['edit_ratio']):.3f}")
        name = str(name).replace("|", "\\|")  # a bare "|" would split the row
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
