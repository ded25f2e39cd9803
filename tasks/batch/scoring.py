"""Checking and scoring the SQL a model wrote for a question.

    extract_sql(answer)                     the SQL in an answer (a fence, JSON "sql", or prose)
    validate_sql(sql, dialect)              exactly one read statement (sqlglot), or why not
    execute_sql(db, sql, timeout_s)         run it where the database refuses writes, with a deadline
    compare_results(pred, gold, gold_sql)   result-set equality, ordered only if the gold orders
    score_item(answer, gold_sql, db, ...)   all of the above -> ScoreResult with a stable error code
    schema_text(db, max_tokens)             the schema as CREATE TABLE text, for a prompt

Only a problem with the database itself (a SQLite file that is not there, a server that does
not answer) raises, as `DatabaseUnavailable`: it would fail every item alike. Whatever an
item's SQL does wrong is data (`ExecResult.error`, `ScoreResult.error_code`).
"""

from __future__ import annotations

import decimal
import functools
import json
import math
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlglot
import sqlglot.errors
from pydantic import BaseModel, ConfigDict
from sqlalchemy import inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.reflection import ObjectKind
from sqlglot import exp

from datus.models.sql_engines import SQLiteFileNotFoundError, create_read_only_engine, with_driver
from datus.models.sql_readonly import (
    ConnectionFailed,
    OutputLimits,
    ReadOnlyExecutor,
    ReadOnlyViolation,
    check_read_only,
    sqlglot_dialect,
)

__all__ = [
    "DatabaseUnavailable", "ErrorCode", "ExecResult", "ScoreResult", "compare_results", "dialect_of",
    "dispose_engines", "execute_sql", "extract_sql", "schema_text", "score_item", "validate_sql",
]

ErrorCode = Literal["no_sql", "invalid_sql", "execution_error", "timeout", "gold_error", "mismatch"]
Database = str | URL | Engine

_FLOAT_DIGITS = 6  # significant digits compared: SUM/AVG differ in the last bits between plans
_ENGINES_KEPT = 32
# the scorer's result caps: a gold result of 10,000 rows fits; 200 rows of 2 MB blobs do not
SCORE_MAX_BYTES = 32_000_000
SCORE_MAX_CELL_BYTES = 1_000_000


class DatabaseUnavailable(RuntimeError):
    """The database cannot be opened or reached: a setup problem, not the SQL's."""


# -- extracting -------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed fence runs to the end
_START = re.compile(  # SELECT, or WITH that opens a CTE ("with" alone is too common a word)
    r"\bSELECT\b|\bWITH\s+(?:RECURSIVE\s+)?[\w\"`\[\]]+\s*(?:\([^()]*\)\s*)?AS\s*(?:NOT\s+)?(?:MATERIALIZED\s+)?\(",
    re.IGNORECASE,
)


def extract_sql(answer: str) -> str | None:
    """The SQL in a model's answer: the last ```sql fenced block (else the last fence of any
    language that is not prose), else a JSON object's ``"sql"``, else prose from the first
    SELECT or WITH up to a ``;``, a blank line or the end. None when there is none.

    The last fence, because a model that corrects itself writes the correction last."""
    if not answer or not answer.strip():
        return None
    fences = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    for lang, body in reversed(fences):
        if lang == "sql" and (sql := _clean(body)):
            return sql
    for lang, body in reversed(fences):  # unlabelled or another language: only if SQL is in it
        if lang != "sql" and (sql := _json_sql(body) or _prose_sql(body, fenced=True)):
            return sql
    sql = _json_sql(answer)
    if sql:
        return sql
    return _prose_sql(answer)


def _json_sql(text: str) -> str | None:
    # raw_decode from each "{" in turn: the object may sit among prose with braces of its own
    decoder = json.JSONDecoder()
    start = text.find("{")
    for _ in range(50):
        if start < 0:
            return None
        try:
            value, _end = decoder.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("sql"), str):
            return _clean(value["sql"])
        start = text.find("{", start + 1)
    return None


def _prose_sql(text: str, *, fenced: bool = False) -> str | None:
    # "select" and "with" are English too: of the candidates, the first that parses wins.
    candidates = [_clean(_until_end(text[match.start():], fenced)) for match in _START.finditer(text)]
    candidates = [sql for sql in candidates if sql]
    for sql in candidates:
        try:
            if len([s for s in sqlglot.parse(sql) if s is not None]) == 1:
                return sql
        except sqlglot.errors.SqlglotError:
            continue
    return candidates[0] if candidates else None


def _until_end(text: str, fenced: bool) -> str:
    """``text`` up to the first ``;`` outside quotes, or (in prose) the first blank line."""
    quote: str | None = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"`":
            quote = char
        elif char == ";" or (char == "\n" and not fenced and not text[index + 1:].split("\n", 1)[0].strip()):
            return text[:index]
    return text


def _clean(sql: str) -> str | None:
    sql = sql.strip().rstrip(";").strip()
    while sql.endswith(";"):
        sql = sql.rstrip(";").strip()
    return sql or None


# -- validating -------------------------------------------------------------------------------


def dialect_of(db: Database) -> str:
    """The sqlglot dialect of a SQLAlchemy URL or engine (``postgresql`` -> ``postgres``)."""
    backend = db.dialect.name if isinstance(db, Engine) else make_url(db).get_backend_name()
    return sqlglot_dialect(backend) or backend


def validate_sql(sql: str, dialect: str | None) -> str | None:
    """None when ``sql`` is exactly one query (SELECT, a set operation, WITH ... SELECT) in
    ``dialect``; else why not. An unknown dialect raises ValueError."""
    dialect = sqlglot_dialect(dialect)
    if dialect:
        sqlglot.Dialect.get_or_raise(dialect)  # a bad --dialect is the user's error, not the model's
    try:
        kind = check_read_only(sql, dialect)
    except ReadOnlyViolation as exc:
        return str(exc)
    if kind == "explain":
        return "an EXPLAIN does not answer a question; write the query itself"
    statement = _parse_one(sql, dialect)
    if not isinstance(statement, (exp.Select, exp.SetOperation)):
        return f"expected a SELECT, not {type(statement).__name__.upper()}"
    return None


def _parse_one(sql: str, dialect: str | None) -> exp.Expression | None:
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.SqlglotError:
        return None
    statement = statements[0] if len(statements) == 1 else None
    while isinstance(statement, exp.Subquery):  # (SELECT ...) is still a query
        statement = statement.this
    return statement


# -- executing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a query returned; ``error`` is set instead of raising (``timed_out`` says which)."""

    rows: list[tuple[Any, ...]]
    columns: list[str]
    error: str | None = None
    truncated: bool = False
    elapsed_ms: float = 0.0
    timed_out: bool = False
    truncation: str | None = None  # why it was truncated (rows, bytes, cells cut)


_engines: OrderedDict[str, Engine] = OrderedDict()
_engines_lock = threading.Lock()
_engines_pid = os.getpid()


def execute_sql(db: Database, sql: str, timeout_s: float = 10, max_rows: int = 10_000,
                max_bytes: int = SCORE_MAX_BYTES, max_cell_bytes: int = SCORE_MAX_CELL_BYTES) -> ExecResult:
    """Run ``sql`` read-only with a deadline, through the one read-only executor
    (`datus.models.sql_readonly`, the SQL server's too): at most ``max_rows`` rows and
    ``max_bytes`` of them as JSON (``truncated`` if more), a cell longer than ``max_cell_bytes``
    cut (``truncated`` too). No parsing here: that is `validate_sql`.

    A URL gets an engine of its own, cached: SQLite opened ``mode=ro`` with ``PRAGMA
    query_only`` and no ATTACH, Postgres inside ``SET TRANSACTION READ ONLY``, MySQL/MariaDB
    inside ``START TRANSACTION READ ONLY``. An `Engine` of the caller's is used as it is, with
    the same per-query guards."""
    if timeout_s <= 0 or max_rows < 1:
        raise ValueError("timeout_s must be positive and max_rows at least 1")
    engine = db if isinstance(db, Engine) else _engine(db)
    limits = OutputLimits(max_rows=max_rows, max_bytes=max_bytes, max_cell_bytes=max_cell_bytes)
    executor = ReadOnlyExecutor(engine, timeout_s=timeout_s, limits=limits)
    started = time.monotonic()
    try:
        result = executor.execute(sql, values="raw")
    except ConnectionFailed as exc:
        raise DatabaseUnavailable(str(exc)) from exc
    except TimeoutError:
        elapsed = (time.monotonic() - started) * 1000
        message = f"the query ran longer than {timeout_s:g}s and was stopped"
        return ExecResult([], [], message, elapsed_ms=elapsed, timed_out=True)
    except Exception as exc:  # noqa: BLE001 - whatever the SQL does wrong is the result, not a crash
        return ExecResult([], [], _error_text(exc), elapsed_ms=(time.monotonic() - started) * 1000)
    return ExecResult(result.rows, result.columns, truncated=result.truncated, elapsed_ms=result.elapsed_ms,
                      truncation=result.reason)


def _engine(db: str | URL) -> Engine:
    global _engines_pid
    url = with_driver(db)
    key = url.render_as_string(hide_password=False)
    with _engines_lock:
        if _engines_pid != os.getpid():  # a forked child must not share its parent's connections
            for inherited in _engines.values():
                inherited.dispose(close=False)
            _engines.clear()
            _engines_pid = os.getpid()
        engine = _engines.get(key)
        if engine is not None:
            _engines.move_to_end(key)
            return engine
        engine = _new_engine(url)
        _engines[key] = engine
        if len(_engines) > _ENGINES_KEPT:
            _engines.popitem(last=False)[1].dispose()
        return engine


def _new_engine(url: URL) -> Engine:
    try:
        return create_read_only_engine(url)
    except SQLiteFileNotFoundError as exc:
        raise DatabaseUnavailable(f"the SQLite database {exc.path!r} does not exist") from exc
    except ValueError as exc:  # in-memory SQLite
        raise DatabaseUnavailable("an in-memory SQLite database is empty: give a file, e.g. sqlite:///path/to.db") from exc


def dispose_engines() -> None:
    """Close the cached engines' connections (at the end of a batch, and between tests)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _error_text(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc  # the DBAPI's words, not SQLAlchemy's wrapper
    return " ".join(str(original).split()) or type(original).__name__


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


# -- comparing --------------------------------------------------------------------------------


def compare_results(
    predicted_rows: Iterable[Sequence[Any]], gold_rows: Iterable[Sequence[Any]], gold_sql: str | None,
    *, dialect: str | None = None,
) -> bool:
    """Whether two results are the same: the same rows as tuples (column names ignored), as a
    multiset, or as a sequence when ``gold_sql`` has a top-level ORDER BY. Numbers compare by
    value to 6 significant digits (1 == 1.0 == Decimal("1.000000001"))."""
    predicted = [tuple(_normal(value) for value in row) for row in predicted_rows]
    gold = [tuple(_normal(value) for value in row) for row in gold_rows]
    if gold_sql and _orders(gold_sql, sqlglot_dialect(dialect)):
        return predicted == gold
    return Counter(predicted) == Counter(gold)


@functools.lru_cache(maxsize=4096)  # one gold query is compared once per model and mode
def _orders(sql: str, dialect: str | None) -> bool:
    statement = _parse_one(sql, dialect)
    return statement is not None and statement.args.get("order") is not None


def _normal(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        value = float(value) if value.is_finite() else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # nan != nan would make equal results differ
        if value.is_integer() or (rounded := float(f"{value:.{_FLOAT_DIGITS}g}")).is_integer():
            # integral floats become ints, so 3 (COUNT) and 3.0 (SUM of REAL) compare equal
            return int(value if value.is_integer() else rounded)
        return rounded
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)):  # Postgres arrays
        return tuple(_normal(item) for item in value)
    if isinstance(value, dict):  # Postgres json
        return json.dumps(value, sort_keys=True, default=str)
    try:
        hash(value)
    except TypeError:  # rows are counted, so every value must hash
        return repr(value)
    return value


# -- scoring ----------------------------------------------------------------------------------


class ScoreResult(BaseModel):
    """How one answer fared. ``match`` is None without a gold SQL (or when the gold failed)."""

    model_config = ConfigDict(frozen=True)

    sql: str | None
    valid: bool
    executed: bool
    match: bool | None
    error: str | None = None
    error_code: ErrorCode | None = None
    rows_returned: int | None = None


def score_item(
    answer_text: str, gold_sql: str | None, db_url: Database | None, dialect: str | None = None,
    timeout_s: float = 10, *, max_rows: int = 10_000,
) -> ScoreResult:
    """Extract, validate, run and compare one answer. Without ``db_url`` only validity is
    judged; ``dialect`` defaults to the database's. A failing gold SQL is ``gold_error``, the
    benchmark's fault, not the model's. Raises only `DatabaseUnavailable`."""
    sql = extract_sql(answer_text)
    if sql is None:
        return ScoreResult(sql=None, valid=False, executed=False, match=None,
                           error="no SQL found in the answer", error_code="no_sql")
    if dialect is None and db_url is not None:
        dialect = dialect_of(db_url)
    problem = validate_sql(sql, dialect)
    if problem:
        return ScoreResult(sql=sql, valid=False, executed=False, match=None, error=problem, error_code="invalid_sql")
    if db_url is None:
        return ScoreResult(sql=sql, valid=True, executed=False, match=None)
    predicted = execute_sql(db_url, sql, timeout_s, max_rows)
    if predicted.error is not None:
        return ScoreResult(sql=sql, valid=True, executed=False, match=None, error=predicted.error,
                           error_code="timeout" if predicted.timed_out else "execution_error")
    rows = len(predicted.rows)
    if not gold_sql:
        return ScoreResult(sql=sql, valid=True, executed=True, match=None, rows_returned=rows)
    gold = execute_sql(db_url, gold_sql, timeout_s, max_rows)
    if gold.error is not None:
        return ScoreResult(sql=sql, valid=True, executed=True, match=None, rows_returned=rows,
                           error=f"the gold SQL failed: {gold.error}", error_code="gold_error")
    if compare_results(predicted.rows, gold.rows, gold_sql, dialect=dialect):
        return ScoreResult(sql=sql, valid=True, executed=True, match=True, rows_returned=rows)
    return ScoreResult(sql=sql, valid=True, executed=True, match=False, rows_returned=rows,
                       error=_difference(predicted, gold), error_code="mismatch")


def _difference(predicted: ExecResult, gold: ExecResult) -> str:
    def width(result: ExecResult) -> int:
        return len(result.rows[0]) if result.rows else len(result.columns)

    if width(predicted) != width(gold):
        return f"{width(predicted)} column(s) where the gold query returns {width(gold)}"
    if len(predicted.rows) != len(gold.rows):
        return f"{len(predicted.rows)} row(s) where the gold query returns {len(gold.rows)}"
    if compare_results(predicted.rows, gold.rows, None):
        return "the gold query's rows, in another order (the gold query orders them)"
    return f"{len(gold.rows)} row(s) like the gold query, with different values"


# -- schema text ------------------------------------------------------------------------------


def schema_text(
    db_url: Database, max_tokens: int | None = None, token_counter: Callable[[str], int] | None = None,
    *, schema: str | None = None,
) -> str:
    """The tables and views of ``db_url`` (its default schema, or ``schema``) as CREATE
    statements with types, NOT NULL, primary and foreign keys and CHECK constraints. With ``max_tokens``, tables
    then columns are dropped from the end until it fits, and a comment says what is missing;
    ``token_counter`` defaults to about four characters a token."""
    count = token_counter or (lambda text: (len(text) + 3) // 4)
    tables = _tables(db_url if isinstance(db_url, Engine) else _engine(db_url), schema)
    full = _render(tables, sum(len(table["lines"]) for table in tables))
    if max_tokens is None or count(full) <= max_tokens:
        return full
    # The longest prefix of columns (in table order) that fits; a binary search, since counting
    # tokens of a large schema is not free.
    low, high = 0, sum(len(table["lines"]) for table in tables) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if count(_render(tables, middle)) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return _render(tables, low)


def _tables(engine: Engine, schema: str | None) -> list[dict[str, Any]]:
    try:
        inspector = inspect(engine)
        view_columns = inspector.get_multi_columns(schema=schema, kind=ObjectKind.ANY_VIEW)
        columns = {**inspector.get_multi_columns(schema=schema, kind=ObjectKind.TABLE), **view_columns}
        primary = inspector.get_multi_pk_constraint(schema=schema)
        foreign = inspector.get_multi_foreign_keys(schema=schema)
        try:  # CHECKs often list a column's values (status IN (...)), which a model needs to know
            checks = inspector.get_multi_check_constraints(schema=schema)
        except NotImplementedError:
            checks = {}
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot read the schema of {_shown(engine.url)}: {_error_text(exc)}") from exc
    tables = []
    for key in sorted(columns, key=lambda k: (k in view_columns, k[1])):
        keys = (primary.get(key) or {}).get("constrained_columns") or []
        lines = []
        for column in columns[key]:
            line = f"{_quoted(column['name'])} {_type_name(column['type'])}"
            if keys == [column["name"]]:
                line += " PRIMARY KEY"
            elif not column.get("nullable", True):
                line += " NOT NULL"
            lines.append(line)
        constraints = [f"PRIMARY KEY ({', '.join(map(_quoted, keys))})"] if len(keys) > 1 else []
        for fk in foreign.get(key) or []:
            target = ".".join(map(_quoted, filter(None, (fk.get("referred_schema"), fk["referred_table"]))))
            constraints.append(f"FOREIGN KEY ({', '.join(map(_quoted, fk['constrained_columns']))}) "
                               f"REFERENCES {target} ({', '.join(map(_quoted, fk['referred_columns']))})")
        constraints += [f"CHECK ({check['sqltext']})" for check in checks.get(key) or [] if check.get("sqltext")]
        kind = "VIEW" if key in view_columns else "TABLE"
        tables.append({"name": key[1], "header": f"CREATE {kind} {_quoted(key[1])} (", "lines": lines,
                       "constraints": constraints})
    return tables


def _render(tables: list[dict[str, Any]], columns_kept: int) -> str:
    blocks: list[str] = []
    left = columns_kept
    for index, table in enumerate(tables):
        if left <= 0:
            names = [other["name"] for other in tables[index:]]
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            blocks.append(f"-- {len(names)} more table(s) not shown: {shown}")
            break
        lines = table["lines"][:left]
        if len(lines) == len(table["lines"]):
            body = ",\n".join(f"  {line}" for line in lines + table["constraints"])
        else:
            body = ",\n".join(f"  {line}" for line in lines)
            body += f"\n  -- {len(table['lines']) - len(lines)} more column(s) not shown"
        blocks.append(f"{table['header']}\n{body}\n);")
        left -= len(table["lines"])
    return "\n\n".join(blocks)


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _quoted(name: str) -> str:
    return name if _PLAIN.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def _type_name(column_type: Any) -> str:
    try:
        return str(column_type)
    except Exception:  # noqa: BLE001 - some dialect types do not compile outside their dialect
        return type(column_type).__name__
