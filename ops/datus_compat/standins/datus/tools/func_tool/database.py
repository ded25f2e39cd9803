"""The stand-in database tools: Datus's SQLite tool set over one database file, read-only.

Names, argument schemas (strict: every property required, optional ones nullable with a
default) and result dicts (``{"success": 0|1, "error": ..., "result": ...}``) are the ones
Datus-agent 0.2.2 gives for a SQLite namespace; ``search_table`` answers as Datus does before a
schema store is built. Tools are ``agents.FunctionTool`` objects when openai-agents is
installed (Datus's tests install it), else a dataclass with the same fields.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FunctionTool", "db_function_tools"]

try:  # the class Datus's own tools are; the model layer must accept either
    from agents import FunctionTool
except ImportError:  # pragma: no cover - only without openai-agents

    @dataclass
    class FunctionTool:  # type: ignore[no-redef]
        name: str
        description: str
        params_json_schema: dict[str, Any]
        on_invoke_tool: Callable[[Any, str], Awaitable[Any]]
        strict_json_schema: bool = True
        is_enabled: bool = True


_NULLABLE_TEXT = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": ""}
_COORDINATES = {"catalog": _NULLABLE_TEXT, "database": _NULLABLE_TEXT, "schema_name": _NULLABLE_TEXT}
_ROWS_KEPT = 10  # Datus's compressor keeps the first and last ten rows of a longer result
_NOT_READY = "Table search is unavailable because schema storage is not ready."


def _schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _ok(result: Any) -> dict[str, Any]:
    return {"success": 1, "error": None, "result": result}


def _failed(error: str) -> dict[str, Any]:
    return {"success": 0, "error": error, "result": None}


class _SqliteTools:
    def __init__(self, path: Path, database_name: str) -> None:
        self.path = path
        self.database_name = database_name

    def _connect(self) -> sqlite3.Connection:
        # read-only at the database: a tool run must never change the test data
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)

    def list_tables(self, catalog: str | None = "", database: str | None = "", schema_name: str | None = "",
                    include_views: bool | None = True) -> dict[str, Any]:
        kinds = ("table", "view") if include_views is not False else ("table",)
        marks = ", ".join("?" * len(kinds))
        with self._connect() as db:
            rows = db.execute(f"SELECT type, name FROM sqlite_master WHERE type IN ({marks}) "
                              "AND name NOT LIKE 'sqlite_%' ORDER BY rowid", kinds).fetchall()
        return _ok([{"type": kind, "name": name} for kind, name in rows])

    def describe_table(self, table_name: str, catalog: str | None = "", database: str | None = "",
                       schema_name: str | None = "") -> dict[str, Any]:
        with self._connect() as db:
            cursor = db.execute("SELECT * FROM pragma_table_info(?)", (table_name.split(".")[-1],))
            names = [column[0] for column in cursor.description]
            columns = [dict(zip(names, row)) for row in cursor.fetchall()]
        return _ok({"table_info": {}, "columns": columns})

    def search_table(self, query_text: str, catalog_name: str = "", database_name: str = "", schema_name: str = "",
                     top_n: int = 5, simple_sample_data: bool = True) -> dict[str, Any]:
        return _failed(_NOT_READY)

    def read_query(self, sql: str) -> dict[str, Any]:
        try:
            with self._connect() as db:
                cursor = db.execute(sql)
                columns = [column[0] for column in cursor.description or []]
                rows = cursor.fetchall()
        except sqlite3.Error as exc:
            return _failed(str(exc))
        return _ok(_compressed(columns, rows))

    def get_table_ddl(self, table_name: str, catalog: str | None = "", database: str | None = "",
                      schema_name: str | None = "") -> dict[str, Any]:
        name = table_name.split(".")[-1]
        with self._connect() as db:
            row = db.execute("SELECT type, sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        if row is None or not row[1]:
            return _failed(f"Table '{table_name}' not found or no DDL available")
        return _ok({"identifier": f"{self.database_name}.{name}", "catalog_name": "",
                    "database_name": self.database_name, "schema_name": "", "table_name": name,
                    "definition": row[1], "table_type": row[0]})


def _compressed(columns: list[str], rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Datus's result summary: CSV with an index column; first and last rows of a long result."""
    kept = list(enumerate(rows))
    compressed = len(rows) > 2 * _ROWS_KEPT
    if compressed:
        kept = kept[:_ROWS_KEPT] + [None] + kept[-_ROWS_KEPT:]  # type: ignore[list-item]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", *columns])
    for item in kept:
        writer.writerow(["..."] if item is None else [item[0], *item[1]])
    return {"original_rows": len(rows), "original_columns": columns, "is_compressed": compressed,
            "compressed_data": out.getvalue().rstrip("\n"), "removed_columns": [],
            "compression_type": "rows" if compressed else "none"}


_TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "list_tables": ("Return table-like objects (tables, views, materialized views) visible to the connector.",
                    {**_COORDINATES, "include_views": {"anyOf": [{"type": "boolean"}, {"type": "null"}],
                                                       "default": True}}),
    "describe_table": ("Fetch detailed column metadata (and optional semantic model info) for the given table.",
                       {"table_name": {"type": "string", "description": "Table identifier to describe."},
                        **_COORDINATES}),
    "search_table": ("Retrieve table candidates by semantic similarity over stored schema metadata and sample rows.",
                     {"query_text": {"type": "string", "description": "Description of the table you want."},
                      "catalog_name": {"type": "string", "default": ""},
                      "database_name": {"type": "string", "default": ""},
                      "schema_name": {"type": "string", "default": ""},
                      "top_n": {"type": "integer", "default": 5},
                      "simple_sample_data": {"type": "boolean", "default": True}}),
    "read_query": ("Execute arbitrary SQL and return the result rows (optionally compressed).",
                   {"sql": {"type": "string", "description": "SQL text to run against the connector."}}),
    "get_table_ddl": ("Return the connector's DDL definition for the requested table.",
                      {"table_name": {"type": "string", "description": "Target table identifier."},
                       **_COORDINATES}),
}


def _function_tool(tools: _SqliteTools, name: str) -> FunctionTool:
    description, properties = _TOOLS[name]
    method = getattr(tools, name)

    async def on_invoke_tool(context: Any, arguments: str | dict[str, Any]) -> dict[str, Any]:
        # Datus's tools ignore the context and take the arguments as JSON text (or a dict)
        values = json.loads(arguments or "{}") if isinstance(arguments, str) else dict(arguments)
        return method(**{key: value for key, value in values.items() if value is not None})

    return FunctionTool(name=name, description=description, params_json_schema=_schema(properties),
                        on_invoke_tool=on_invoke_tool, strict_json_schema=True)


def db_function_tools(agent_config: Any, database_name: str = "", sub_agent_name: str | None = None) -> list[Any]:
    """Datus's tools for the config's current namespace (a SQLite file: ``uri`` or ``path``)."""
    namespace = agent_config.namespace_config()
    if namespace.get("type") != "sqlite":
        raise ValueError(f"the stand-in database tools serve SQLite namespaces only, not {namespace.get('type')!r}")
    location = str(namespace.get("uri") or namespace.get("path") or "")
    path = Path(location.removeprefix("sqlite:///")).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the namespace's database {str(path)!r} does not exist")
    tools = _SqliteTools(path.resolve(), database_name or str(namespace.get("name") or path.stem))
    return [_function_tool(tools, name) for name in _TOOLS]
