"""A read-only SQL MCP server over any SQLAlchemy URL (SQLite, Postgres, ...)::

    python -m datus.mcp_servers.sql_server --url sqlite:///path/to.db [--max-rows 200] [--timeout-s 10]
    DQ_SQL_URL=postgresql://reader@db/warehouse python -m datus.mcp_servers.sql_server

Tools: ``list_tables``, ``describe_table``, ``read_query``. Writes are refused twice over:
each query is parsed (sqlglot) and must be exactly one read (SELECT, WITH ... SELECT, VALUES,
or EXPLAIN of those), and it then runs where the database itself refuses writes: SQLite is
opened ``mode=ro`` with ``PRAGMA query_only`` and no ATTACH, Postgres runs inside ``SET TRANSACTION READ
ONLY``. Other databases get the parser check only, so give the server a read-only user
there (and everywhere: a read can still be expensive, or call a function with side effects).
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import json
import logging
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import sqlglot
import sqlglot.errors
from pydantic import Field
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError
from sqlglot import exp

from datus.models.sql_engines import create_read_only_engine, with_driver

__all__ = ["ReadOnlyDatabase", "ReadOnlyViolation", "build_server", "check_read_only", "main", "stdio_config"]

logger = logging.getLogger(__name__)


class ReadOnlyViolation(ValueError):
    """The SQL is not exactly one read statement (or does not parse)."""


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
_SQLGLOT_DIALECTS = {
    "postgresql": "postgres", "mssql": "tsql", "mariadb": "mysql", "sqlite": "sqlite", "mysql": "mysql",
    "oracle": "oracle", "duckdb": "duckdb", "snowflake": "snowflake", "bigquery": "bigquery",
    "trino": "trino", "clickhouse": "clickhouse", "redshift": "redshift", "databricks": "databricks",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_Schema = Annotated[str | None, Field(description="database schema; default: the connection's default schema")]


def check_read_only(sql: str, dialect: str | None = None) -> str:
    """Raise `ReadOnlyViolation` unless ``sql`` is exactly one read statement; return its kind,
    ``"explain"`` or ``"query"``."""
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


class ReadOnlyDatabase:
    """One database, opened so that it refuses writes wherever the database can."""

    def __init__(self, url: str | URL, *, max_rows: int = 200, timeout_s: float = 10.0) -> None:
        if max_rows < 1 or timeout_s <= 0:
            raise ValueError("max_rows must be at least 1 and timeout_s positive")
        self.url = with_driver(url)
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.backend = self.url.get_backend_name()
        self.dialect = _SQLGLOT_DIALECTS.get(self.backend)
        self.engine = _create_engine(self.url)

    def ping(self) -> None:
        self.execute("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()

    def list_tables(self, schema: str | None = None) -> dict[str, list[str]]:
        inspector = inspect(self.engine)  # a fresh inspector: it caches, and tables change
        return {
            "tables": sorted(inspector.get_table_names(schema=schema)),
            "views": sorted(inspector.get_view_names(schema=schema)),
        }

    def describe_table(self, table_name: str, schema: str | None = None) -> dict[str, Any]:
        inspector = inspect(self.engine)
        try:
            columns = inspector.get_columns(table_name, schema=schema)
        except NoSuchTableError:
            known = self.list_tables(schema)
            raise LookupError(
                f"unknown table {table_name!r}; tables: {', '.join(known['tables'] + known['views']) or '(none)'}"
            ) from None
        primary_key = inspector.get_pk_constraint(table_name, schema=schema).get("constrained_columns") or []
        described: dict[str, Any] = {
            "table": table_name,
            "columns": [
                {
                    "name": column["name"],
                    "type": _type_name(column["type"]),
                    "nullable": bool(column.get("nullable", True)),
                    "default": None if column.get("default") is None else str(column["default"]),
                    "primary_key": column["name"] in primary_key,
                }
                for column in columns
            ],
            "primary_key": primary_key,
            "foreign_keys": [
                {
                    "columns": fk["constrained_columns"],
                    "references": f"{fk['referred_table']}({', '.join(fk['referred_columns'])})",
                }
                for fk in inspector.get_foreign_keys(table_name, schema=schema)
            ],
        }
        if self.backend == "sqlite":
            with self.engine.connect() as conn:
                described["create_statement"] = conn.execute(
                    text("SELECT sql FROM sqlite_master WHERE name = :name"), {"name": table_name}
                ).scalar()
        return described

    def execute(self, sql: str, *, stream: bool = True) -> dict[str, Any]:
        """Run one statement where the database refuses writes; at most ``max_rows`` rows.

        No parsing here (that is `check_read_only`): this is the second wall. ``stream`` reads
        Postgres rows through a server-side cursor (SELECT and VALUES only, not EXPLAIN)."""
        # A raw DBAPI cursor: SQLAlchemy's text() would read ':name' as a bind parameter and
        # psycopg2 would read '%' as a placeholder; the SQL must reach the database verbatim.
        raw = self.engine.raw_connection()
        try:
            with self._read_only_transaction(raw):
                # psycopg's plain cursor would fetch every row into memory, not just max_rows + 1.
                named = stream and self.backend == "postgresql"
                cursor = raw.cursor(name=f"datus_read_{os.getpid()}") if named else raw.cursor()
                try:
                    cursor.execute(sql)
                    # a named cursor describes its columns only after the first fetch
                    rows = list(cursor.fetchmany(self.max_rows + 1)) if named or cursor.description else []
                    columns = [d[0] for d in cursor.description or ()]
                finally:
                    cursor.close()
        finally:
            try:
                raw.rollback()
            finally:
                raw.close()
        truncated = len(rows) > self.max_rows
        kept = [[_json_value(value) for value in row] for row in rows[: self.max_rows]]
        return {"columns": columns, "rows": kept, "row_count": len(kept), "truncated": truncated}

    @contextmanager
    def _read_only_transaction(self, raw: Any) -> Iterator[None]:
        if self.backend == "postgresql":
            setup = raw.cursor()
            setup.execute("SET TRANSACTION READ ONLY")
            setup.execute(f"SET LOCAL statement_timeout = {int(self.timeout_s * 1000)}")
            setup.close()
            yield
        elif self.backend == "sqlite":
            # sqlite3 has no statement timeout: a progress handler aborts the query at the deadline.
            deadline = time.monotonic() + self.timeout_s
            connection = raw.driver_connection
            connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            try:
                yield
            except sqlite3.OperationalError as exc:
                if "interrupted" in str(exc):
                    raise TimeoutError(f"the query ran longer than {self.timeout_s:g}s and was stopped") from None
                raise
            finally:
                connection.set_progress_handler(None, 0)
        else:
            yield


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        logger.warning("%s: writes are refused by the SQL check only; connect as a read-only user",
                       url.get_backend_name())
    return create_read_only_engine(url)


def _type_name(column_type: Any) -> str:
    try:
        return str(column_type)
    except Exception:  # some dialect types cannot compile without their dialect
        return type(column_type).__name__


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return str(value)


def _error_text(exc: BaseException) -> str:
    # The DBAPI's own message, without SQLAlchemy's "(Background on this error ...)" link.
    original = getattr(exc, "orig", None) or exc
    return " ".join(str(original).split()) or type(original).__name__


def _shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing in it to hide
        return repr(url)


def build_server(db: ReadOnlyDatabase) -> Any:
    """The MCP server exposing ``db``: three tools, all read-only (a FastMCP on mcp 1.x, an
    MCPServer on 2.x; run it with `datus.models.mcp.sdk.run_server`)."""
    from mcp.types import ToolAnnotations

    from datus.models.mcp import sdk
    from datus.models.mcp.sdk import ToolError

    # by the wire names, which both SDKs accept (their attribute names differ)
    reads = ToolAnnotations.model_validate(
        {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False})
    server = sdk.new_server(
        "datus-sql",
        instructions=(
            f"Read-only access to a {db.backend} database. Find tables with list_tables, their columns with "
            f"describe_table, then run one SELECT at a time with read_query (at most {db.max_rows} rows)."
        ),
    )

    @server.tool(annotations=reads, structured_output=False)
    def list_tables(schema: _Schema = None) -> str:
        """List the tables and views, as JSON: {"tables": [...], "views": [...]}."""
        try:
            return json.dumps(db.list_tables(schema))
        except SQLAlchemyError as exc:
            raise ToolError(_error_text(exc)) from exc

    @server.tool(annotations=reads, structured_output=False)
    def describe_table(
        table_name: Annotated[str, Field(description="the table or view name, as list_tables gives it")],
        schema: _Schema = None,
    ) -> str:
        """Describe a table as JSON: columns (name, type, nullable, default, primary_key), keys, CREATE statement."""
        try:
            return json.dumps(db.describe_table(table_name, schema))
        except LookupError as exc:
            raise ToolError(str(exc)) from exc
        except SQLAlchemyError as exc:
            raise ToolError(_error_text(exc)) from exc

    @server.tool(annotations=reads, structured_output=False)
    def read_query(query: Annotated[str, Field(description="one SELECT, WITH ... SELECT, VALUES or EXPLAIN")]) -> str:
        """Run one read-only SQL statement; JSON {"columns", "rows", "row_count", "truncated"}, rows capped."""
        try:
            kind = check_read_only(query, db.dialect)
            return json.dumps(db.execute(query, stream=kind != "explain"))
        except ReadOnlyViolation as exc:
            raise ToolError(f"refused: {exc}") from exc
        except TimeoutError as exc:
            raise ToolError(str(exc)) from exc
        except Exception as exc:  # the DBAPI's errors share no base class across drivers
            raise ToolError(f"query failed: {_error_text(exc)}") from exc

    return server


def stdio_config(url: str) -> dict[str, Any]:
    """The ``agent.mcp_servers`` entry that runs this server on ``url`` over stdio, with the
    interpreter running now (so it finds this package)."""
    return {"command": sys.executable, "args": ["-m", "datus.mcp_servers.sql_server", "--url", url]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datus.mcp_servers.sql_server", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("DQ_SQL_URL"), help="SQLAlchemy URL (default: $DQ_SQL_URL)")
    parser.add_argument("--max-rows", type=int, default=200, help="rows returned per query at most")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="time limit of one query")
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="streamable-http only")
    parser.add_argument("--port", type=int, default=8000, help="streamable-http only")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("no database: pass --url or set DQ_SQL_URL (a SQLAlchemy URL, e.g. sqlite:///path/to.db)")
    logging.getLogger("sqlglot").setLevel(logging.ERROR)  # its "falling back to Command" notices are ours to judge
    try:
        db = ReadOnlyDatabase(args.url, max_rows=args.max_rows, timeout_s=args.timeout_s)
        db.ping()  # fail at start, where the client reports it, not at the first tool call
    except Exception as exc:
        print(f"datus-sql: cannot open {_shown_url(args.url)}: {_error_text(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    from datus.models.mcp import sdk

    server = build_server(db)
    try:
        sdk.run_server(server, args.transport, host=args.host, port=args.port)
    finally:
        db.dispose()


if __name__ == "__main__":
    main()
