"""Reading a batch's questions from JSONL or CSV, one row at a time.

A file is JSON lines (``.jsonl``, ``.json``: one object per line) or CSV with a header
(``.csv``). Each row has ``question`` (required) and optionally ``id``, ``db_id``, ``schema``,
``evidence``, ``gold_sql``; other fields are kept in `Question.extra`. A row that cannot be a
question is a `BadRow` with its line number and is skipped; the rest run. A file that cannot
be read at all (missing, empty, unknown extension, a CSV without a ``question`` column, a JSON
array) is a `BatchInputError`.

``id`` defaults to the number of the line the row starts on (what an editor or a spreadsheet
shows), so it is stable across runs, which ``--resume`` relies on.

A row is bounded as a job request is (`tasks.schemas.Bounds`): an ``id`` of more than
``Bounds.ID_CHARS`` characters, a ``question`` of more than ``Bounds.PROMPT_BYTES`` bytes, text
that is not valid Unicode (a lone surrogate such as ``"\\ud800"``) or JSON nested deeper than
Python can read is a `BadRow` naming the field and the bound; the batch goes on.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from datus_queue.tasks.schemas import Bounds

__all__ = ["BadRow", "BatchInputError", "Question", "iter_questions", "read_questions"]

_EXCERPT = 200
_OPTIONAL = ("db_id", "schema", "evidence", "gold_sql")
_KNOWN = frozenset(("id", "question", *_OPTIONAL))


class BatchInputError(ValueError):
    """The input file as a whole cannot be read; ``path`` names it."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        super().__init__(str(path), message)  # both in args, so it pickles
        self.path = str(path)
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class Question(BaseModel):
    """One question of a batch."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str
    question: str
    db_id: str | None = None
    # "schema" would shadow a BaseModel attribute; it is still "schema" in files and dumps (by_alias)
    schema_text: str | None = Field(default=None, alias="schema")
    evidence: str | None = None
    gold_sql: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    line: int = Field(description="the line of the input file the row starts on")


class BadRow(BaseModel):
    """A row that was skipped, and why."""

    model_config = ConfigDict(frozen=True)

    line: int
    reason: str
    raw: str = Field(description=f"the row's text, at most {_EXCERPT} characters")


def read_questions(path: str | os.PathLike[str]) -> tuple[list[Question], list[BadRow]]:
    """All questions of ``path`` and the rows that were skipped."""
    questions: list[Question] = []
    bad: list[BadRow] = []
    for item in iter_questions(path):
        (questions if isinstance(item, Question) else bad).append(item)
    return questions, bad


def iter_questions(path: str | os.PathLike[str]) -> Iterator[Question | BadRow]:
    """Each row of ``path`` as a `Question` or a `BadRow`, in file order, read one at a time
    (only the ids seen so far are kept, to refuse duplicates). Raises `BatchInputError` at once
    for a missing, empty or unknown-format file, and while iterating for one with no rows or
    that cannot be read as a whole."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise BatchInputError(path, f"unknown input format {suffix or '(no extension)'!r}: use .jsonl, .json or .csv")
    if not file.is_file():
        raise BatchInputError(path, "no such file" if not file.exists() else "not a file")
    if file.stat().st_size == 0:
        raise BatchInputError(path, "the file is empty")
    # checked here, when called; the rows are read only as they are asked for
    return _items(file, _jsonl_rows(file) if suffix != ".csv" else _csv_rows(file))


def _items(file: Path, rows: Iterator[_Row]) -> Iterator[Question | BadRow]:
    seen: dict[str, int] = {}
    any_row = False
    for line, fields, raw in rows:
        any_row = True
        item = _question(line, fields, raw) if isinstance(fields, dict) else BadRow(line=line, reason=fields, raw=raw)
        if isinstance(item, Question):
            if item.id in seen:
                item = BadRow(line=line, reason=f"duplicate id {item.id!r} (first on line {seen[item.id]})", raw=raw)
            else:
                seen[item.id] = line
        yield item
    if not any_row:
        raise BatchInputError(file, "the file has no rows")


# A row on its way: (line, its fields or the reason it is bad, its text excerpt)
_Row = tuple[int, "dict[str, Any] | str", str]


def _jsonl_rows(file: Path) -> Iterator[_Row]:
    first = True
    with file.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1:
                data = data.removeprefix(b"\xef\xbb\xbf")
            try:
                text = data.decode("utf-8").strip()  # strip() also drops the CR of CRLF
            except UnicodeDecodeError as exc:
                yield number, f"not UTF-8 (byte {exc.start + 1})", data[:_EXCERPT].decode("utf-8", "replace")
                continue
            if not text:
                continue
            if first and text.startswith("["):
                raise BatchInputError(file, "this is a JSON array; write one JSON object per line (JSONL)")
            first = False
            raw = text[:_EXCERPT]
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, f"not JSON: {exc.msg} (column {exc.colno})", raw
                continue
            except (RecursionError, ValueError):  # nested too deep; a number of more than 4300 digits
                yield number, "not JSON this reader takes: nested too deep or a number too long", raw
                continue
            if not isinstance(value, dict):
                yield number, f"not a JSON object but {_json_kind(value)}", raw
                continue
            yield number, value, raw


# the csv module refuses a cell over 131,072 characters by default, and refuses it by aborting the
# whole file: a question over the prompt bound must instead fail its own row (`_question`), so
# cells get room well past that bound; a cell past this is a file the reader gives up on
_CSV_CELL_CHARS = 4 * Bounds.PROMPT_BYTES


def _csv_rows(file: Path) -> Iterator[_Row]:
    # newline="" lets the csv module see quoted newlines and CRLF itself; utf-8-sig drops a BOM.
    if csv.field_size_limit() < _CSV_CELL_CHARS:
        csv.field_size_limit(_CSV_CELL_CHARS)
    with file.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        end = 0  # line_num is the line a record ends on; the next one starts after it
        try:
            header: list[str] | None = None
            for record in reader:
                start, end = end + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    continue
                if header is None:
                    header = _csv_header(file, record)
                    continue
                raw = ",".join(record)[:_EXCERPT]
                if len(record) > len(header):
                    yield start, f"{len(record)} fields but the header has {len(header)}", raw
                    continue
                # fewer fields than the header: the missing trailing ones are empty (a spreadsheet trims them)
                # a quoted cell keeps the file's line ends; CRLF is the file's, not the text's
                fields = {name: value.replace("\r\n", "\n") for name, value in zip(header, record, strict=False)}
                yield start, fields, raw
        except UnicodeDecodeError as exc:
            raise BatchInputError(file, f"not UTF-8 (after line {end})") from exc
        except csv.Error as exc:
            raise BatchInputError(file, f"malformed CSV on line {reader.line_num}: {exc}") from exc
        if header is None:
            raise BatchInputError(file, "the file has no rows")


def _csv_header(file: Path, record: Iterable[str]) -> list[str]:
    # Known names match whatever their case ("Question" from a spreadsheet); others stay as written.
    header = [name.strip().lower() if name.strip().lower() in _KNOWN else name.strip() for name in record]
    if "question" not in header:
        raise BatchInputError(file, f"the CSV header has no 'question' column (it has: {', '.join(header)})")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise BatchInputError(file, f"the CSV header repeats {', '.join(duplicates)}")
    return header


def _question(line: int, fields: dict[str, Any], raw: str) -> Question | BadRow:
    def bad(reason: str) -> BadRow:
        return BadRow(line=line, reason=reason, raw=raw)

    try:
        json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return bad("holds text that is not valid Unicode (a lone surrogate)")
    except (ValueError, RecursionError):
        return bad("a field is nested too deep")
    question = fields.get("question")
    if question is None:
        return bad("no 'question'")
    if not isinstance(question, str):
        return bad(f"'question' must be a string, not {_json_kind(question)}")
    if not question.strip():
        return bad("'question' is empty")
    if len(question.encode("utf-8")) > Bounds.PROMPT_BYTES:
        return bad(f"'question' is longer than {Bounds.PROMPT_BYTES} bytes")
    row_id = fields.get("id")
    # bool is an int to Python, but `"id": true` is a mistake, not the id "True"
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    elif isinstance(row_id, str):
        row_id = row_id.strip() or None
    elif row_id is not None:
        return bad(f"'id' must be a string or an integer, not {_json_kind(row_id)}")
    if row_id is not None and len(row_id) > Bounds.ID_CHARS:
        return bad(f"'id' is longer than {Bounds.ID_CHARS} characters")
    optional: dict[str, str | None] = {}
    for name in _OPTIONAL:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            return bad(f"'{name}' must be a string, not {_json_kind(value)}")
        optional[name] = value if value and value.strip() else None  # CSV has no null: empty means absent
    return Question(
        id=row_id if row_id is not None else str(line),
        question=question.strip(),
        db_id=optional["db_id"],
        schema=optional["schema"],
        evidence=optional["evidence"],
        gold_sql=optional["gold_sql"],
        extra={key: value for key, value in fields.items() if key not in _KNOWN},
        line=line,
    )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else type(value).__name__
