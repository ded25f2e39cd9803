"""One read-only SQL executor, for the SQL MCP server (`datus.mcp_servers.sql_server`) and the
batch scorer (`datus_queue.tasks.batch.scoring`).

Two walls, the database first:

- **The database refuses writes**, on every dialect, whatever the statement: SQLite is opened
  ``mode=ro`` (`create_read_only_engine`) and runs with ``PRAGMA query_only = ON`` (set for the
  query, and put back, on an engine of the caller's), ATTACH limited to 0 databases; Postgres
  runs inside ``SET TRANSACTION READ ONLY``; MySQL and MariaDB inside ``START TRANSACTION READ
  ONLY``. Any other backend gets a plain transaction that is rolled back, and a warning: connect
  as a read-only user there. A read-only user is the advice everywhere: a read-only transaction
  does not stop ``SELECT ... INTO OUTFILE`` (MySQL's FILE privilege does), nor a function with
  side effects, nor an expensive read.
- **The parser** (`check_read_only`, sqlglot): exactly one read statement (SELECT, WITH ...
  SELECT, VALUES, EXPLAIN of those), nothing that writes anywhere in its tree, and no MySQL
  executable comment (``/*! ... */``, ``/*M! ... */``): MySQL runs their text, every parser
  reads them as comments.

Bounded output (`OutputLimits`): at most ``max_rows`` rows, ``max_bytes`` bytes of rows as JSON,
and ``max_cell_bytes`` per cell. Rows are fetched in chunks sized to what is left of the byte
budget and converted as they come, so a result of gigabytes is never held: the fetch stops at the
first cap. A cut cell ends in ``…[truncated N bytes]``; a cut result has ``truncated`` and, for
the model and the reader, a ``reason``. Fetching and converting count against the timeout.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlglot
import sqlglot.errors
from sqlalchemy.engine import URL, Engine
from sqlglot import exp

from datus.models.sql_engines import create_read_only_engine, with_driver

__all__ = [
    "CELL_MARKER", "ConnectionFailed", "OutputLimits", "QueryResult", "ReadOnlyExecutor", "ReadOnlyViolation",
    "check_read_only", "error_text", "sqlglot_dialect",
]

logger = logging.getLogger(__name__)

CELL_MARKER = "…[truncated {} bytes]"  # ends a cell that was cut; {} is the bytes left out
_EXECUTABLE_COMMENT = re.compile(r"/\*M?!", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_CHUNK = 256
_FETCH_BUDGET = 4_000_000  # the driver's values held at once, about

# SQLAlchemy backend name -> sqlglot dialect (the one map: the server's and the scorer's differed)
_SQLGLOT_DIALECTS = {
    "postgresql": "postgres", "mssql": "tsql", "mariadb": "mysql", "sqlite": "sqlite", "mysql": "mysql",
    "oracle": "oracle", "duckdb": "duckdb", "snowflake": "snowflake", "bigquery": "bigquery",
    "trino": "trino", "clickhouse": "clickhouse", "redshift": "redshift", "databricks": "databricks",
}


def sqlglot_dialect(backend: str | None) -> str | None:
    """sqlglot's name for a SQLAlchemy backend (``postgresql`` -> ``postgres``); an unknown one as it is."""
    if not backend:
        return None
    return _SQLGLOT_DIALECTS.get(backend, backend)


class ReadOnlyViolation(ValueError):
    """The SQL is not exactly one read statement (or does not parse)."""


class ConnectionFailed(RuntimeError):
    """The database could not be reached or opened (not the SQL's fault)."""


# -- the parser: the second wall ----------------------------------------------------------------

# Refused anywhere in the tree, not only at the top: Postgres' `WITH d AS (DELETE ...
# RETURNING *) SELECT ...` is a SELECT at the root, `SELECT ... INTO t` creates a table.
_FORBIDDEN: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, name)
    for name in (
        "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "TruncateTable", "Command",
        "Pragma", "Attach", "Detach", "Copy", "Transaction", "Commit", "Rollback", "Set", "Use",
        "Into", "Lock", "LoadData", "Grant", "Revoke", "Analyze", "Cache", "Uncache", "Refresh",
        "Kill", "Comment", "Export", "Declare",
    )
    if hasattr(exp, name)
)
_READ_ROOTS = (exp.Select, exp.SetOperation, exp.Values, exp.Subquery)
_KINDS = {"Into": "SELECT ... INTO", "Lock": "a locking clause (FOR UPDATE/SHARE)", "SetOperation": "a set operation"}
# EXPLAIN options that only plan; ANALYZE would run the statement, so it is not here.
_EXPLAIN_OPTIONS = frozenset({
    "QUERY", "PLAN", "VERBOSE", "COSTS", "SETTINGS", "GENERIC_PLAN", "SUMMARY", "BUFFERS", "MEMORY",
    "FORMAT", "JSON", "TEXT", "XML", "YAML", "TRUE", "FALSE", "ON", "OFF", "0", "1", "(", ")", ",",
})
_STATEMENT_START = frozenset({"SELECT", "WITH", "VALUES"})


def check_read_only(sql: str, dialect: str | None = None) -> str:
    """Raise `ReadOnlyViolation` unless ``sql`` is exactly one read statement; return its kind,
    ``"explain"`` or ``"query"``. ``dialect`` is sqlglot's (or a SQLAlchemy backend name)."""
    dialect = sqlglot_dialect(dialect)
    if _EXECUTABLE_COMMENT.search(sql):
        # MySQL/MariaDB run the text of /*! ... */ and /*M! ... */; a parser sees a comment.
        # Refused on every dialect, wherever it is (even inside a string literal): no read needs one.
        raise ReadOnlyViolation("executable comments (/*! ... */, /*M! ... */) are not allowed")
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.SqlglotError as exc:
        raise ReadOnlyViolation(f"could not parse the SQL: {_parse_message(exc)}") from None
    if not statements:
        raise ReadOnlyViolation("the query is empty")
    if len(statements) > 1:
        raise ReadOnlyViolation(f"one statement per query, found {len(statements)}")
    statement = statements[0]
    if isinstance(statement, exp.Command) and str(statement.this).upper() == "EXPLAIN":
        _check_explain(statement.expression.name if statement.expression else "", dialect)
        return "explain"
    if isinstance(statement, exp.Condition) and not isinstance(statement, exp.Query):
        # a bare expression ('selec', 'x + 1') is what sqlglot makes of a mistyped keyword
        raise ReadOnlyViolation(f"{sql.strip()[:60]!r} is not a SQL statement")
    if not isinstance(statement, _READ_ROOTS):
        raise ReadOnlyViolation(
            f"only reads are allowed (SELECT, WITH ... SELECT, VALUES, EXPLAIN), not {_kind(statement)}"
        )
    for node in statement.walk():
        if isinstance(node, _FORBIDDEN):
            raise ReadOnlyViolation(f"only reads are allowed; the query contains {_kind(node)}")
    return "query"


def _check_explain(rest: str, dialect: str | None) -> None:
    # sqlglot keeps EXPLAIN's body as raw text: skip the planning options, then the body
    # must itself pass as a read (tokens drop comments, so `/**/ ANALYZE` is still seen).
    try:
        tokens = sqlglot.tokenize(rest, read=dialect)
    except sqlglot.errors.SqlglotError as exc:
        raise ReadOnlyViolation(f"could not parse the SQL: {_parse_message(exc)}") from None
    for index, token in enumerate(tokens):
        word = token.text.upper()
        following = tokens[index + 1].text.upper() if index + 1 < len(tokens) else ""
        if word in _STATEMENT_START or (word == "(" and following in _STATEMENT_START):
            check_read_only(rest[token.start:], dialect)
            return
        if word not in _EXPLAIN_OPTIONS:
            raise ReadOnlyViolation(
                f"EXPLAIN takes planning options (never ANALYZE) and a read statement, not {token.text!r}"
            )
    raise ReadOnlyViolation("EXPLAIN needs a SELECT, WITH ... SELECT or VALUES statement")


def _kind(node: exp.Expression) -> str:
    name = type(node).__name__
    if isinstance(node, exp.Command):
        return str(node.this).upper()
    return _KINDS.get(name, name.upper())


def _parse_message(exc: sqlglot.errors.SqlglotError) -> str:
    errors = getattr(exc, "errors", None) or []
    if errors:
        first = errors[0]
        where = f"line {first.get('line')}, column {first.get('col')}"
        return f"{first.get('description')} near {first.get('highlight')!r} ({where})"
    return _ANSI.sub("", str(exc)).strip()


def error_text(exc: BaseException) -> str:
    """The DBAPI's own message, without SQLAlchemy's wrapper and "(Background on this error ...)" link."""
    original = getattr(exc, "orig", None) or exc
    return " ".join(str(original).split()) or type(original).__name__


# -- bounded output -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """Caps of one query's result. ``max_bytes`` counts the rows as JSON (``json.dumps``, ASCII),
    ``max_cell_bytes`` one cell's text (UTF-8; a binary cell's bytes before it becomes hex)."""

    max_rows: int = 200
    max_bytes: int = 256_000
    max_cell_bytes: int = 16_000

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_bytes < 64 or self.max_cell_bytes < 16:
            raise ValueError("max_rows must be at least 1, max_bytes at least 64, max_cell_bytes at least 16")

    @classmethod
    def from_env(cls, prefix: str = "DQ_SQL_", **defaults: int) -> OutputLimits:
        """``DQ_SQL_MAX_ROWS``, ``DQ_SQL_MAX_BYTES``, ``DQ_SQL_MAX_CELL_BYTES``, else ``defaults``,
        else the class's defaults."""
        values: dict[str, int] = {}
        for name in ("max_rows", "max_bytes", "max_cell_bytes"):
            raw = os.environ.get(f"{prefix}{name.upper()}")
            if raw not in (None, ""):
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{prefix}{name.upper()} must be an integer") from None
            elif name in defaults:
                values[name] = defaults[name]
        return cls(**values)


@dataclass(slots=True)
class QueryResult:
    """Rows (lists of JSON values, or the driver's values as tuples with ``values="raw"``) and
    what was left out."""

    columns: list[str]
    rows: list[Any]
    truncated_by: list[str] = field(default_factory=list)  # "rows", "bytes", "cells"
    reason: str | None = None
    cells_truncated: int = 0
    bytes: int = 0  # the rows as JSON
    elapsed_ms: float = 0.0

    @property
    def truncated(self) -> bool:
        return bool(self.truncated_by)

    def to_dict(self) -> dict[str, Any]:
        """What the SQL server answers: columns, rows, row_count, truncated; and when truncated,
        ``truncated_by`` and a ``reason`` for the model."""
        answer: dict[str, Any] = {"columns": self.columns, "rows": self.rows, "row_count": len(self.rows),
                                  "truncated": self.truncated}
        if self.truncated:
            answer["truncated_by"] = list(self.truncated_by)
            answer["reason"] = self.reason
        return answer


def _cut_text(text: str, cap: int) -> tuple[str, bool]:
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= cap:
        return text, False
    kept = encoded[:cap].decode("utf-8", "ignore")
    return kept + CELL_MARKER.format(len(encoded) - len(kept.encode("utf-8", "surrogatepass"))), True


def _json_value(value: Any, cap: int) -> tuple[Any, bool]:
    """A cell as a JSON value, cut to ``cap`` bytes (binary: ``cap`` bytes of hex)."""
    if value is None or isinstance(value, (bool, int)):
        return value, False
    if isinstance(value, str):
        return _cut_text(value, cap)
    if isinstance(value, float):
        return (value if math.isfinite(value) else str(value)), False
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value), False
        return (int(value) if value == value.to_integral_value() else float(value)), False
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat(), False
    if isinstance(value, (bytes, bytearray, memoryview)):
        size = len(value)
        if size * 2 <= cap:
            return bytes(value).hex(), False
        kept = cap // 2
        return bytes(value[:kept]).hex() + CELL_MARKER.format(size - kept), True
    if isinstance(value, (list, tuple, dict)):
        converted = _nested(value, cap)
        text = json.dumps(converted)
        if len(text) <= cap:
            return converted, False
        return _cut_text(text, cap)
    return _cut_text(str(value), cap)


def _nested(value: Any, cap: int) -> Any:
    if isinstance(value, (list, tuple)):
        return [_nested(item, cap) for item in value]
    if isinstance(value, dict):
        return {str(key): _nested(item, cap) for key, item in value.items()}
    return _json_value(value, cap)[0]


def _raw_value(value: Any, cap: int) -> tuple[Any, bool]:
    """A cell as the driver gave it (memoryview as bytes), a long text or binary cut to ``cap``."""
    if isinstance(value, memoryview):
        value = bytes(value)
    if isinstance(value, (bytes, bytearray)) and len(value) > cap:
        return bytes(value[:cap]), True
    if isinstance(value, str) and len(value) > cap // 4:  # cheap check first: 4 bytes a character at most
        return _cut_text(value, cap)
    return value, False


# -- the executor: the first wall ---------------------------------------------------------------


class ReadOnlyExecutor:
    """One database, opened where it refuses writes; `query` checks the SQL then runs it,
    `execute` only runs it (the database's wall alone).

    ``db``: a URL (an engine of its own, `create_read_only_engine`), or an `Engine` of the
    caller's, used as it is with the same per-query guards."""

    def __init__(self, db: str | URL | Engine, *, timeout_s: float = 10.0, limits: OutputLimits | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self.limits = limits or OutputLimits()
        self.owns_engine = not isinstance(db, Engine)
        self.engine = db if isinstance(db, Engine) else create_read_only_engine(with_driver(db))
        self.url = self.engine.url
        self.backend = self.engine.dialect.name
        self.dialect = sqlglot_dialect(self.backend)
        if self.backend not in ("sqlite", "postgresql", "mysql", "mariadb"):
            logger.warning("%s: no read-only transaction is known for it; writes are refused by the SQL check "
                           "only, so connect as a read-only user", self.backend)

    def dispose(self) -> None:
        if self.owns_engine:
            self.engine.dispose()

    def query(self, sql: str, *, values: Literal["json", "raw"] = "json", limits: OutputLimits | None = None,
              timeout_s: float | None = None) -> QueryResult:
        """`check_read_only`, then `execute` (EXPLAIN without a server-side cursor)."""
        kind = check_read_only(sql, self.dialect)
        return self.execute(sql, stream=kind != "explain", values=values, limits=limits, timeout_s=timeout_s)

    def execute(self, sql: str, *, stream: bool = True, values: Literal["json", "raw"] = "json",
                limits: OutputLimits | None = None, timeout_s: float | None = None) -> QueryResult:
        """Run one statement where the database refuses writes, its result bounded. No parsing.

        Raises `ConnectionFailed` when the database cannot be reached, `TimeoutError` past the
        deadline (fetching and converting included), and the DBAPI's errors otherwise. ``stream``
        reads Postgres through a server-side cursor and MySQL through an unbuffered one (reads
        only: not EXPLAIN)."""
        limits = limits or self.limits
        timeout_s = timeout_s or self.timeout_s
        try:
            # A raw DBAPI connection: SQLAlchemy's text() would read ':name' as a bind parameter
            # and psycopg2 '%' as a placeholder; the SQL must reach the database verbatim.
            raw = self.engine.raw_connection()
        except Exception as exc:  # the DBAPIs' errors share no base class
            raise ConnectionFailed(f"cannot connect to {self.url.render_as_string(hide_password=True)}: "
                                   f"{error_text(exc)}") from exc
        started = time.monotonic()
        deadline = started + timeout_s
        drained = True
        try:
            with self._read_only(raw, deadline, timeout_s):
                cursor = self._cursor(raw, stream)
                try:
                    cursor.execute(sql)
                    result, drained = _fetch(cursor, limits, values, deadline, timeout_s)
                finally:
                    if not drained and self.backend in ("mysql", "mariadb"):
                        _abandon_unbuffered(cursor)
                    cursor.close()
        finally:
            _release(raw, self.backend, drained)
        result.elapsed_ms = (time.monotonic() - started) * 1000
        return result

    def _cursor(self, raw: Any, stream: bool) -> Any:
        if stream and self.backend == "postgresql":
            # psycopg's plain cursor would fetch every row into memory first
            return raw.cursor(name=f"datus_read_{os.getpid()}_{id(raw)}")
        if stream and self.backend in ("mysql", "mariadb"):
            unbuffered = _mysql_unbuffered_cursor(raw)
            if unbuffered is not None:
                return raw.cursor(unbuffered)
        return raw.cursor()

    @contextmanager
    def _read_only(self, raw: Any, deadline: float, timeout_s: float) -> Iterator[None]:
        if self.backend == "sqlite":
            connection = raw.driver_connection
            # sqlite3 has no statement timeout: a progress handler aborts the query at the deadline
            connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 1_000)
            was_on = connection.execute("PRAGMA query_only").fetchone()[0]
            if not was_on:  # an engine of the caller's: guarded for this query, given back as it was
                connection.execute("PRAGMA query_only = ON")
            try:
                yield
            except sqlite3.OperationalError as exc:
                if "interrupt" in str(exc) and time.monotonic() >= deadline:
                    raise TimeoutError(f"the query ran longer than {timeout_s:g}s and was stopped") from None
                raise
            finally:
                connection.set_progress_handler(None, 0)
                if not was_on:
                    connection.execute("PRAGMA query_only = OFF")
        elif self.backend == "postgresql":
            setup = raw.cursor()
            setup.execute("SET TRANSACTION READ ONLY")
            setup.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")
            setup.close()
            try:
                yield
            except Exception as exc:
                if "57014" in (getattr(exc, "pgcode", None), getattr(exc, "sqlstate", None)):
                    raise TimeoutError(f"the query ran longer than {timeout_s:g}s and was stopped "
                                       "(statement timeout)") from None
                raise
        elif self.backend in ("mysql", "mariadb"):
            mariadb = "mariadb" in str(getattr(raw.driver_connection, "get_server_info", lambda: "")()).lower()
            setup = raw.cursor()
            if mariadb:
                setup.execute(f"SET SESSION max_statement_time = {max(timeout_s, 0.001):.3f}")
            else:
                setup.execute(f"SET SESSION max_execution_time = {max(1, int(timeout_s * 1000))}")
            setup.execute("START TRANSACTION READ ONLY")
            setup.close()
            try:
                yield
            except Exception as exc:
                code = exc.args[0] if getattr(exc, "args", None) else None
                if code in (1969, 3024) or (time.monotonic() >= deadline and "interrupt" in str(exc).lower()):
                    raise TimeoutError(f"the query ran longer than {timeout_s:g}s and was stopped") from None
                raise
        else:
            yield


def _mysql_unbuffered_cursor(raw: Any) -> Any:
    module = type(raw.driver_connection).__module__.split(".")[0]
    try:
        if module == "pymysql":
            import pymysql.cursors

            return pymysql.cursors.SSCursor
        if module == "MySQLdb":
            import MySQLdb.cursors  # type: ignore[import-not-found]

            return MySQLdb.cursors.SSCursor
    except ImportError:  # pragma: no cover
        return None
    return None


def _fetch(cursor: Any, limits: OutputLimits, values: str, deadline: float,
           timeout_s: float) -> tuple[QueryResult, bool]:
    """The rows, fetched in chunks sized to the byte budget left, converted as they come;
    stops at the first cap. Returns the result and whether the cursor was read to its end."""
    convert = _json_value if values == "json" else _raw_value
    cap = limits.max_cell_bytes
    rows: list[Any] = []
    used = 2  # "[]"
    cells_cut = 0
    stop: str | None = None
    chunk = 1
    fetched = 0  # the driver's bytes of the rows kept, about
    columns: list[str] | None = None
    if cursor.description is None and not _is_named(cursor):
        return QueryResult([], []), True  # a statement without rows
    drained = False
    while stop is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the query ran longer than {timeout_s:g}s and was stopped (reading its rows)")
        batch = cursor.fetchmany(chunk)
        if columns is None:  # a server-side cursor describes its columns only after the first fetch
            columns = [d[0] for d in cursor.description or ()]
        if not batch:
            drained = True
            break
        for row in batch:
            if len(rows) >= limits.max_rows:
                stop = "rows"
                break
            fetched += sum(len(value) if isinstance(value, (str, bytes, bytearray, memoryview)) else 16
                           for value in row)
            converted = [convert(value, cap) for value in row]
            cut = sum(1 for _, was_cut in converted if was_cut)
            kept = [value for value, _ in converted]
            shown = kept if values == "json" else [_json_value(value, cap)[0] for value in kept]
            size = len(json.dumps(shown)) + (2 if rows else 0)  # ", " between rows
            if used + size > limits.max_bytes:
                stop = "bytes"
                break
            rows.append(kept if values == "json" else tuple(kept))
            used += size
            cells_cut += cut
        average = used / max(1, len(rows))
        # as many rows as the byte budget left takes, and no more than _FETCH_BUDGET of the
        # driver's values at once (cells are cut after the driver has read them whole)
        raw_average = fetched / max(1, len(rows))
        chunk = int(max(1, min(_MAX_CHUNK, limits.max_rows + 1 - len(rows), (limits.max_bytes - used) // average,
                               _FETCH_BUDGET // max(1.0, raw_average))))
    truncated_by: list[str] = []
    reasons: list[str] = []
    if stop == "rows":
        truncated_by.append("rows")
        reasons.append(f"more than {limits.max_rows} rows; only the first {limits.max_rows} are shown "
                       "(add a LIMIT, a WHERE or an aggregate)")
    elif stop == "bytes":
        truncated_by.append("bytes")
        reasons.append(f"the rows passed {limits.max_bytes} bytes as JSON; only the first {len(rows)} are shown "
                       "(select fewer or shorter columns)")
    if cells_cut:
        truncated_by.append("cells")
        reasons.append(f"{cells_cut} cell(s) longer than {limits.max_cell_bytes} bytes were cut; they end in "
                       f"{CELL_MARKER.format('N')!r}")
    result = QueryResult(columns or [], rows, truncated_by, "; ".join(reasons) or None, cells_cut, used)
    return result, drained or stop is None


def _abandon_unbuffered(cursor: Any) -> None:
    """An unbuffered MySQL cursor left with rows on the wire would read them all to close (the
    gigabytes the caps are there to avoid): it is told there is nothing left, and the connection
    is dropped (`_release`), not reused."""
    result = getattr(cursor, "_result", None)
    if result is not None and hasattr(result, "unbuffered_active"):
        result.unbuffered_active = False


def _is_named(cursor: Any) -> bool:
    return bool(getattr(cursor, "name", None))


def _release(raw: Any, backend: str, drained: bool) -> None:
    try:
        if not drained and backend in ("mysql", "mariadb"):
            # rows still on the wire: rolling back would first read them all. Drop the connection.
            raw.invalidate()
            return
        raw.rollback()
        if backend in ("mysql", "mariadb"):
            cursor = raw.cursor()
            try:
                cursor.execute("SET SESSION max_statement_time = DEFAULT" if "mariadb" in str(
                    getattr(raw.driver_connection, "get_server_info", lambda: "")()).lower()
                    else "SET SESSION max_execution_time = DEFAULT")
            finally:
                cursor.close()
    finally:
        raw.close()
