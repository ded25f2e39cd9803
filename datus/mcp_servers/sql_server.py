"""A read-only SQL MCP server over any SQLAlchemy URL (SQLite, Postgres, MySQL/MariaDB, ...)::

    python -m datus.mcp_servers.sql_server --url sqlite:///path/to.db [--max-rows 200] [--max-bytes 256000]
        [--max-cell-bytes 16000] [--timeout-s 10]
    DQ_SQL_URL=postgresql://reader@db/warehouse python -m datus.mcp_servers.sql_server

Tools: ``list_tables``, ``describe_table``, ``read_query``. Queries run through the one read-only
executor (`datus.models.sql_readonly`), shared with the batch scorer: the database refuses writes
(SQLite ``mode=ro`` + ``PRAGMA query_only``, no ATTACH; Postgres ``SET TRANSACTION READ ONLY``;
MySQL/MariaDB ``START TRANSACTION READ ONLY``), and the parser (sqlglot) is a second wall that
takes exactly one read (SELECT, WITH ... SELECT, VALUES, EXPLAIN of those) and refuses MySQL
executable comments. Give the server a read-only user all the same: a read can be expensive, or
call a function with side effects, and a read-only transaction does not stop ``INTO OUTFILE``.

Results are bounded in rows, bytes (as JSON) and per cell (``DQ_SQL_MAX_ROWS``,
``DQ_SQL_MAX_BYTES``, ``DQ_SQL_MAX_CELL_BYTES`` or the options); a cut result says so
(``"truncated": true`` with ``truncated_by`` and a ``reason``), a cut cell ends in
``…[truncated N bytes]``. Fetching and serialising count against the timeout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Annotated, Any

from pydantic import Field
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from datus.models.sql_readonly import (
    OutputLimits,
    ReadOnlyExecutor,
    ReadOnlyViolation,
    check_read_only,
)
from datus.models.sql_readonly import error_text as _error_text

__all__ = ["ReadOnlyDatabase", "ReadOnlyViolation", "build_server", "check_read_only", "main", "stdio_config"]

logger = logging.getLogger(__name__)

_Schema = Annotated[str | None, Field(description="database schema; default: the connection's default schema")]


class ReadOnlyDatabase:
    """One database, opened so that it refuses writes wherever the database can."""

    def __init__(self, url: str | URL, *, max_rows: int | None = None, timeout_s: float = 10.0,
                 max_bytes: int | None = None, max_cell_bytes: int | None = None) -> None:
        if (max_rows is not None and max_rows < 1) or timeout_s <= 0:
            raise ValueError("max_rows must be at least 1 and timeout_s positive")
        given = {name: value for name, value in (("max_rows", max_rows), ("max_bytes", max_bytes),
                                                 ("max_cell_bytes", max_cell_bytes)) if value is not None}
        self.limits = OutputLimits(**{**_asdict(OutputLimits.from_env()), **given})  # options over DQ_SQL_*
        self.executor = ReadOnlyExecutor(url, timeout_s=timeout_s, limits=self.limits)
        self.engine = self.executor.engine
        self.url = self.executor.url
        self.max_rows = self.limits.max_rows
        self.timeout_s = timeout_s
        self.backend = self.executor.backend
        self.dialect = self.executor.dialect

    def ping(self) -> None:
        self.execute("SELECT 1")

    def dispose(self) -> None:
        self.executor.dispose()

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
        """Run one statement where the database refuses writes; its result within the limits.

        No parsing here (that is `check_read_only`): this is the database's wall alone. ``stream``
        reads rows through a server-side / unbuffered cursor (reads only, not EXPLAIN)."""
        return self.executor.execute(sql, stream=stream).to_dict()


def _asdict(limits: OutputLimits) -> dict[str, int]:
    return {"max_rows": limits.max_rows, "max_bytes": limits.max_bytes, "max_cell_bytes": limits.max_cell_bytes}


def _type_name(column_type: Any) -> str:
    try:
        return str(column_type)
    except Exception:  # some dialect types cannot compile without their dialect
        return type(column_type).__name__


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
            f"describe_table, then run one SELECT at a time with read_query (at most {db.max_rows} rows and "
            f"{db.limits.max_bytes} bytes of JSON; a longer cell is cut and ends in '…[truncated N bytes]')."
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
        """Run one read-only SQL statement; JSON {"columns", "rows", "row_count", "truncated"} (when truncated,
        also "truncated_by" and "reason"); rows, bytes and cells capped."""
        try:
            # checked, fetched and serialised within the limits and the timeout: the dumps below is
            # of at most max_bytes of rows
            return json.dumps(db.executor.query(query).to_dict())
        except ReadOnlyViolation as exc:
            raise ToolError(f"refused: {exc}") from exc
        except TimeoutError as exc:
            raise ToolError(str(exc)) from exc
        except Exception as exc:  # the DBAPI's errors share no base class across drivers
            raise ToolError(f"query failed: {_error_text(exc)}") from exc

    return server


def stdio_config(url: str, limits: OutputLimits | None = None) -> dict[str, Any]:
    """The ``agent.mcp_servers`` entry that runs this server on ``url`` over stdio, with the
    interpreter running now (so it finds this package), and the output limits (default: this
    process's ``DQ_SQL_*``, which a stdio server's environment would not carry). The URL travels
    in the server's environment (``DQ_SQL_URL``), not its command line, which ``ps`` shows."""
    limits = limits or OutputLimits.from_env()
    return {"command": sys.executable, "env": {"DQ_SQL_URL": url}, "args": [
        "-m", "datus.mcp_servers.sql_server", "--max-rows", str(limits.max_rows),
        "--max-bytes", str(limits.max_bytes), "--max-cell-bytes", str(limits.max_cell_bytes)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datus.mcp_servers.sql_server", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("DQ_SQL_URL"), help="SQLAlchemy URL (default: $DQ_SQL_URL)")
    defaults = OutputLimits()
    parser.add_argument("--max-rows", type=int, default=None,
                        help=f"rows returned per query at most (default: $DQ_SQL_MAX_ROWS or {defaults.max_rows})")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help=f"bytes of rows (as JSON) per query at most (default: $DQ_SQL_MAX_BYTES or "
                             f"{defaults.max_bytes})")
    parser.add_argument("--max-cell-bytes", type=int, default=None,
                        help=f"bytes of one cell at most, longer ones are cut (default: $DQ_SQL_MAX_CELL_BYTES or "
                             f"{defaults.max_cell_bytes})")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="time limit of one query")
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="streamable-http only")
    parser.add_argument("--port", type=int, default=8000, help="streamable-http only")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("no database: pass --url or set DQ_SQL_URL (a SQLAlchemy URL, e.g. sqlite:///path/to.db)")
    logging.getLogger("sqlglot").setLevel(logging.ERROR)  # its "falling back to Command" notices are ours to judge
    try:
        db = ReadOnlyDatabase(args.url, max_rows=args.max_rows, timeout_s=args.timeout_s, max_bytes=args.max_bytes,
                              max_cell_bytes=args.max_cell_bytes)
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
