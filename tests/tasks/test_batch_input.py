"""Reading batch questions (tasks/batch/input.py): JSONL and CSV, bad rows with their line
numbers, whole-file errors, and reading one row at a time."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path

import pytest

from datus_queue.tasks.batch.input import BadRow, BatchInputError, Question, iter_questions, read_questions


def write(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def bad_lines(bad: list[BadRow]) -> dict[int, str]:
    return {row.line: row.reason for row in bad}


# -- JSONL ------------------------------------------------------------------------------------


def test_jsonl_fields_defaults_and_extra(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", "\n".join([
        json.dumps({"id": "a1", "question": "How many users?", "db_id": "shop", "schema": "CREATE TABLE u (id int)",
                    "evidence": "users are rows of u", "gold_sql": "SELECT COUNT(*) FROM u", "difficulty": "easy"}),
        json.dumps({"question": "  Second?  "}),
        json.dumps({"id": 7, "question": "Third?", "gold_sql": None}),
    ]) + "\n")
    questions, bad = read_questions(path)
    assert bad == []
    first, second, third = questions
    assert first.id == "a1" and first.question == "How many users?" and first.db_id == "shop"
    assert first.schema_text == "CREATE TABLE u (id int)" and first.evidence == "users are rows of u"
    assert first.gold_sql == "SELECT COUNT(*) FROM u" and first.extra == {"difficulty": "easy"}
    assert first.model_dump(by_alias=True)["schema"] == "CREATE TABLE u (id int)"
    # no id: the line number; an integer id becomes its string
    assert (second.id, second.question, second.line, second.gold_sql, second.extra) == ("2", "Second?", 2, None, {})
    assert third.id == "7"


def test_jsonl_every_bad_row_kind_with_its_line(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "ok1", "question": "fine"}),              # 1
        "{not json",                                                 # 2
        json.dumps(["a", "list"]),                                   # 3
        json.dumps({"id": "x"}),                                     # 4 no question
        json.dumps({"question": "   "}),                             # 5 empty question
        json.dumps({"question": 42}),                                # 6 question not a string
        json.dumps({"id": "ok1", "question": "again"}),              # 7 duplicate id
        json.dumps({"id": True, "question": "q"}),                   # 8 id of the wrong type
        json.dumps({"question": "q", "gold_sql": ["SELECT 1"]}),     # 9 gold_sql of the wrong type
        json.dumps({"question": "q", "evidence": 3}),                # 10
        '"just a string"',                                           # 11
        json.dumps({"id": "ok2", "question": "also fine"}),          # 12
    ]
    questions, bad = read_questions(write(tmp_path / "q.jsonl", "\n".join(lines)))
    assert [q.id for q in questions] == ["ok1", "ok2"]
    reasons = bad_lines(bad)
    assert sorted(reasons) == list(range(2, 12))
    assert reasons[2].startswith("not JSON")
    assert reasons[3] == "not a JSON object but an array"
    assert reasons[4] == "no 'question'"
    assert reasons[5] == "'question' is empty"
    assert reasons[6] == "'question' must be a string, not a number"
    assert reasons[7] == "duplicate id 'ok1' (first on line 1)"
    assert reasons[8] == "'id' must be a string or an integer, not a boolean"
    assert reasons[9] == "'gold_sql' must be a string, not an array"
    assert reasons[10] == "'evidence' must be a string, not a number"
    assert reasons[11] == "not a JSON object but a string"
    assert next(row for row in bad if row.line == 2).raw == "{not json"


def test_default_id_colliding_with_an_explicit_one_is_a_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '{"question": "first"}\n{"id": "1", "question": "second"}\n')
    questions, bad = read_questions(path)
    assert [q.id for q in questions] == ["1"] and questions[0].question == "first"
    assert bad_lines(bad) == {2: "duplicate id '1' (first on line 1)"}


def test_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    text = '\ufeff{"question": "één"}\r\n\r\n   \r\n{"question": "two"}\r\n\r\n'
    questions, bad = read_questions(write(tmp_path / "q.jsonl", text))
    assert bad == []
    assert [(q.id, q.question) for q in questions] == [("1", "één"), ("4", "two")]


def test_a_line_that_is_not_utf8_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"question": "ok"}\n{"question": "\xff\xfe"}\n{"question": "ok too"}\n')
    questions, bad = read_questions(path)
    assert [q.line for q in questions] == [1, 3]
    assert bad[0].line == 2 and bad[0].reason.startswith("not UTF-8")


def test_long_raw_is_an_excerpt(tmp_path: Path) -> None:
    _, bad = read_questions(write(tmp_path / "q.jsonl", "{" + "x" * 5000 + "\n"))
    assert len(bad[0].raw) == 200


def test_dot_json_is_json_lines_but_a_json_array_is_refused(tmp_path: Path) -> None:
    questions, _ = read_questions(write(tmp_path / "q.json", '{"question": "a"}\n{"question": "b"}\n'))
    assert [q.question for q in questions] == ["a", "b"]
    array = write(tmp_path / "array.json", '[\n  {"question": "a"}\n]\n')
    with pytest.raises(BatchInputError, match="JSON array; write one JSON object per line"):
        read_questions(array)


# -- CSV --------------------------------------------------------------------------------------


def test_csv_fields_quoting_and_extra(tmp_path: Path) -> None:
    text = (
        "id,Question,gold_sql,evidence,source\r\n"
        'c1,"How many, in total?","SELECT COUNT(*) FROM t",,bird\r\n'
        ',"A question\r\nover two lines","SELECT ""x"" FROM t",a hint,spider\r\n'
        "c3,Short one\r\n"
    )
    questions, bad = read_questions(write(tmp_path / "q.csv", text))
    assert bad == []
    first, second, third = questions
    assert (first.id, first.question, first.gold_sql, first.evidence) == ("c1", "How many, in total?",
                                                                           "SELECT COUNT(*) FROM t", None)
    assert first.extra == {"source": "bird"}
    # no id: the line the row starts on (line 1 is the header)
    assert second.id == "3" and second.line == 3 and second.question == "A question\nover two lines"
    assert second.gold_sql == 'SELECT "x" FROM t' and second.evidence == "a hint"
    # missing trailing cells are empty
    assert (third.id, third.line, third.gold_sql, third.extra) == ("c3", 5, None, {})


def test_csv_bad_rows_with_their_lines(tmp_path: Path) -> None:
    text = (
        "\ufeffid,question,gold_sql\n"
        "a,first,SELECT 1\n"      # 2
        "b,,SELECT 2\n"           # 3 empty question
        "\n"                      # 4 blank: skipped
        ",,\n"                    # 5 all empty: a blank row, skipped
        "a,dup,SELECT 3\n"        # 6 duplicate id
        "c,x,SELECT 4,extra\n"    # 7 too many fields
        "d,last,\n"               # 8
    )
    questions, bad = read_questions(write(tmp_path / "q.csv", text))
    assert [(q.id, q.line) for q in questions] == [("a", 2), ("d", 8)]
    assert bad_lines(bad) == {
        3: "'question' is empty",
        6: "duplicate id 'a' (first on line 2)",
        7: "4 fields but the header has 3",
    }
    assert next(row for row in bad if row.line == 7).raw == "c,x,SELECT 4,extra"


def test_a_csv_cell_past_the_csv_modules_default_limit_fails_its_row_alone(tmp_path: Path) -> None:
    from datus_queue.tasks.schemas import Bounds

    long_ok = "y" * 200_000  # past the csv module's 131,072-character default, within the prompt bound
    too_long = "z" * (Bounds.PROMPT_BYTES + 1)
    text = f"id,question\na,{long_ok}\nb,{too_long}\nc,last\n"
    questions, bad = read_questions(write(tmp_path / "q.csv", text))
    assert [(q.id, len(q.question)) for q in questions] == [("a", 200_000), ("c", 4)]
    assert bad_lines(bad) == {3: f"'question' is longer than {Bounds.PROMPT_BYTES} bytes"}


def test_csv_without_a_question_column_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id,text\n1,hello\n")
    with pytest.raises(BatchInputError, match=r"no 'question' column \(it has: id, text\)") as info:
        read_questions(path)
    assert info.value.path == str(path)


def test_csv_with_only_a_header_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no rows"):
        read_questions(write(tmp_path / "q.csv", "id,question\n\n"))


def test_csv_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id,question\n1,caf\u00e9\n", encoding="latin-1")
    with pytest.raises(BatchInputError, match="not UTF-8"):
        read_questions(path)


# -- the file as a whole ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q.jsonl", "q.csv"])
def test_missing_and_empty_files_name_the_path(tmp_path: Path, name: str) -> None:
    missing = tmp_path / name
    with pytest.raises(BatchInputError, match="no such file") as info:
        iter_questions(missing)  # raised at the call, before any iteration
    assert str(missing) in str(info.value)
    empty = write(tmp_path / f"empty-{name}", "")
    with pytest.raises(BatchInputError, match="is empty") as info:
        read_questions(empty)
    assert str(empty) in str(info.value)


def test_blank_only_file_has_no_rows(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no rows"):
        read_questions(write(tmp_path / "q.jsonl", "\ufeff\n\r\n   \n"))


def test_unknown_extension_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.txt", '{"question": "a"}\n')
    with pytest.raises(BatchInputError, match=r"unknown input format '\.txt'.*\.jsonl, \.json or \.csv"):
        read_questions(path)


def test_errors_pickle() -> None:
    error = pickle.loads(pickle.dumps(BatchInputError("/x/q.jsonl", "the file is empty")))
    assert str(error) == "/x/q.jsonl: the file is empty" and error.path == "/x/q.jsonl"


# -- streaming --------------------------------------------------------------------------------


def test_rows_come_one_at_a_time_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '{"question": "a"}\nbad\n{"question": "c"}\n')
    items = iter_questions(path)
    first = next(items)
    assert isinstance(first, Question) and first.question == "a"
    # the file changes after the first row was read: what follows is read as it comes
    with path.open("a") as handle:
        handle.write('{"question": "d"}\n')
    rest = list(items)
    assert [type(item).__name__ for item in rest] == ["BadRow", "Question", "Question"]
    assert [item.line for item in rest] == [2, 3, 4]


def test_a_large_file_is_not_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    padding = "x" * 400
    with path.open("w") as handle:
        for number in range(100_000):
            handle.write(json.dumps({"question": f"question {number} {padding}"}) + "\n")
    assert path.stat().st_size > 40_000_000
    tracemalloc.start()
    try:
        count = sum(1 for item in iter_questions(path) if isinstance(item, Question))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    # the seen ids (100k short strings) are all it keeps: far below the file's 40+ MB
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB"
