"""What Datus-agent 0.2.2 hands a tool run and what it does with the steps, written small and
our own (no Datus import): its database function tools as ``trans_to_function_tool`` makes
them (tools/func_tool/base.py:49-100, database.py:281-303), its plan and generation tools, hooks
shaped like its ``PlanModeHooks`` (cli/plan_hooks.py) and ``GenerationHooks``
(cli/generation_hooks.py), the action manager a node has filled before it calls the model, and
the rules its nodes and CLI apply to the steps (each names the Datus file:line it mirrors).

The ``FunctionTool`` shape (openai-agents 0.3.2's fields) and the MCP server object come from
`tests.models.agents_shapes`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datus.schemas.action_history import ActionHistory, ActionHistoryManager, ActionRole, ActionStatus
from datus.schemas.node_models import SQLContext
from tests.models.agents_shapes import (
    DuckMCPServer,
    FunctionToolShape,
    PlanningPhaseException,
    UserCancelledException,
    strict_schema,
)

__all__ = [
    "CITY_SQL", "DatusDBTools", "GenerationLikeHooks", "PlanModeLikeHooks", "PlanningPhaseException",
    "UserCancelledException", "add_in_sql_context", "chat_answer", "compare_answer", "compare_tokens",
    "datus_function_tool", "gen_sql_answer", "generation_tools", "llm_result2json", "make_sales_db", "node_manager",
    "node_tokens", "plan_tools", "sql_server_object", "stream_line", "summary_answer", "tool_stats", "tool_view",
]

CITY_SQL = "SELECT city, count(*) AS n FROM customers GROUP BY city ORDER BY city"
_NULLABLE_STR = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": ""}


def make_sales_db(path: Path, customers: int = 30) -> Path:
    """A real SQLite file: ``customers`` (half in Berlin, half in Lisbon) and ``orders``."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript("""
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, amount REAL NOT NULL);
            CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
        """)
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                         [(i, f"c{i}", "Berlin" if i % 2 else "Lisbon") for i in range(1, customers + 1)])
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(i, i, 50.0 * i) for i in range(1, customers + 1)])
        conn.commit()
    return path


def datus_function_tool(method: Callable[..., Any], schema: dict[str, Any], description: str,
                        calls: list[tuple[Any, str]] | None = None) -> FunctionToolShape:
    """``trans_to_function_tool`` (tools/func_tool/base.py:49-100): the invoker takes
    ``(tool_ctx, args_str)``, answers ``{"success": 0, "error": "Invalid JSON arguments", ...}``
    for arguments that are not JSON, calls the method with them and returns its dict; what the
    method raises propagates. ``calls`` records each ``(tool_ctx, args_str)``."""

    async def final_invoker(tool_ctx: Any, args_str: Any) -> Any:
        if calls is not None:
            calls.append((tool_ctx, args_str))
        try:
            args = (json.loads(args_str) if isinstance(args_str, str) else dict(args_str)) if args_str else {}
        except (TypeError, json.JSONDecodeError):
            return {"success": 0, "error": "Invalid JSON arguments", "result": None}
        return method(**args)

    return FunctionToolShape(name=method.__name__, description=description, params_json_schema=schema,
                             on_invoke_tool=final_invoker)


def _ok(result: Any) -> dict[str, Any]:
    return {"success": 1, "error": None, "result": result}  # FuncToolResult.model_dump()


def _failed(error: str) -> dict[str, Any]:
    return {"success": 0, "error": error, "result": None}


class DatusDBTools:
    """``DBFuncTool`` on a SQLite file: ``list_tables``, ``describe_table``, ``read_query``,
    ``get_table_ddl`` with Datus's strict schemas (callsites.md §8) and answers (``read_query``:
    ``DataCompressor.compress`` — over 20 rows, the first and last 10 around ``...``)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.calls: list[tuple[Any, str]] = []  # (tool context, raw JSON arguments) of every call

    def _rows(self, sql: str, *params: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            cursor = conn.execute(sql, params)
            return [d[0] for d in cursor.description or []], cursor.fetchall()

    def list_tables(self, catalog: str | None = "", database: str | None = "", schema_name: str | None = "",
                    include_views: bool | None = True) -> dict[str, Any]:
        kinds = ("table", "view") if include_views else ("table", "table")
        _, rows = self._rows("SELECT type, name FROM sqlite_master WHERE type IN (?, ?) ORDER BY name", *kinds)
        return _ok([{"type": kind, "name": name} for kind, name in rows])

    def describe_table(self, table_name: str, catalog: str | None = "", database: str | None = "",
                       schema_name: str | None = "") -> dict[str, Any]:
        columns, rows = self._rows(f"PRAGMA table_info({json.dumps(table_name)})")
        if not rows:
            return _failed(f"Table {table_name} not found")
        return _ok({"table_info": {}, "columns": [dict(zip(columns, row, strict=True)) for row in rows]})

    def read_query(self, sql: str) -> dict[str, Any]:
        try:
            columns, rows = self._rows(sql)
        except sqlite3.Error as exc:
            return _failed(str(exc))
        shown = rows if len(rows) <= 20 else [*rows[:10], None, *rows[-10:]]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in shown:
            writer.writerow(row if row is not None else ["..."])
        return _ok({"original_rows": len(rows), "original_columns": columns, "is_compressed": len(rows) > 20,
                    "compressed_data": out.getvalue(), "removed_columns": [],
                    "compression_type": "rows" if len(rows) > 20 else "none"})

    def get_table_ddl(self, table_name: str, catalog: str | None = "", database: str | None = "",
                      schema_name: str | None = "") -> dict[str, Any]:
        _, rows = self._rows("SELECT sql, type FROM sqlite_master WHERE name = ?", table_name)
        if not rows:
            return _failed(f"Table {table_name} not found")
        return _ok({"identifier": table_name, "catalog_name": "", "database_name": "main", "schema_name": "",
                    "table_name": table_name, "definition": rows[0][0], "table_type": rows[0][1]})

    def available_tools(self) -> list[FunctionToolShape]:
        """In ``available_tools()``'s order for sqlite (no list_databases/list_schemas)."""
        coordinates = {"catalog": _NULLABLE_STR, "database": _NULLABLE_STR, "schema_name": _NULLABLE_STR}
        table = {"table_name": {"type": "string"}, **coordinates}
        return [
            datus_function_tool(self.list_tables, strict_schema(**coordinates, include_views={
                "anyOf": [{"type": "boolean"}, {"type": "null"}], "default": True}),
                "Return table-like objects (tables, views, materialized views) visible to the connector.", self.calls),
            datus_function_tool(self.describe_table, strict_schema(**table),
                                "Fetch detailed column metadata for the given table.", self.calls),
            datus_function_tool(self.read_query, strict_schema(sql={"type": "string"}),
                                "Execute arbitrary SQL and return the result rows (optionally compressed).",
                                self.calls),
            datus_function_tool(self.get_table_ddl, strict_schema(**table),
                                "Return the connector's DDL definition for the requested table.", self.calls),
        ]


def plan_tools(todos: list[dict[str, Any]]) -> list[FunctionToolShape]:
    """``PlanTool.available_tools()`` (tools/func_tool/plan_tools.py): ``todo_read``,
    ``todo_write(todos_json)``, ``todo_update(todo_id, status)`` over ``todos``."""

    def todo_read() -> dict[str, Any]:
        return _ok({"todos": list(todos)})

    def todo_write(todos_json: str) -> dict[str, Any]:
        todos[:] = json.loads(todos_json)
        return _ok({"message": f"Saved {len(todos)} todos", "todos": list(todos)})

    def todo_update(todo_id: str, status: str) -> dict[str, Any]:
        for todo in todos:
            if todo.get("id") == todo_id:
                todo["status"] = status
                return _ok({"todo": todo})
        return _failed(f"Todo {todo_id} not found")

    return [
        datus_function_tool(todo_read, strict_schema(), "Read the todo list."),
        datus_function_tool(todo_write, strict_schema(todos_json={"type": "string"}), "Write the todo list."),
        datus_function_tool(todo_update, strict_schema(todo_id={"type": "string"}, status={"type": "string"}),
                            "Update one todo's status."),
    ]


def generation_tools(workdir: Path) -> list[FunctionToolShape]:
    """``write_file`` (FilesystemFuncTool) and ``end_generation`` (GenerationTools), writing
    real files under ``workdir``; their answers are what GenerationHooks parses."""

    def write_file(path: str, content: str, file_type: str = "") -> dict[str, Any]:
        target = workdir / path
        target.write_text(content)
        return _ok(f"File written successfully: {target}")

    def end_generation(filepath: str) -> dict[str, Any]:
        return _ok({"message": "Generation complete", "filepath": str(workdir / filepath)})

    return [
        datus_function_tool(write_file, strict_schema(path={"type": "string"}, content={"type": "string"},
                                                      file_type={"type": "string"}), "Write a file."),
        datus_function_tool(end_generation, strict_schema(filepath={"type": "string"}), "Finish the generation."),
    ]


class PlanModeLikeHooks:
    """What ``PlanModeHooks`` does with the hook calls (cli/plan_hooks.py:29-337): reads
    ``getattr(tool, "name", ...)`` and ``context.tool_arguments`` (JSON text) in
    ``on_tool_start`` to spot ``todo_update`` with ``status == "pending"`` (l.302-330), and
    after ``todo_write`` (the plan) raises what the user's choice says (l.150, 154)."""

    def __init__(self, choice: str = "replan") -> None:
        self.choice = choice
        self.started: list[tuple[str, dict[str, Any]]] = []  # (tool name, parsed tool_arguments)
        self.pending_updates: list[dict[str, Any]] = []
        self.ended: list[str] = []
        self.events: list[str] = []

    async def on_start(self, context: Any, agent: Any) -> None:
        self.events.append("start")

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        self.events.append("end")

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        name = getattr(tool, "name", getattr(tool, "__name__", str(tool)))
        arguments = json.loads(context.tool_arguments) if context.tool_arguments else {}
        self.started.append((name, arguments))
        if name == "todo_update" and arguments.get("status") == "pending":
            self.pending_updates.append(arguments)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        name = getattr(tool, "name", str(tool))
        self.ended.append(name)
        if name != "todo_write":
            return
        if self.choice == "replan":
            raise PlanningPhaseException("REPLAN_REQUIRED: Revise the plan with feedback: split step 2")
        if self.choice == "cancel":
            raise UserCancelledException("User cancelled plan execution")


class GenerationLikeHooks:
    """What ``GenerationHooks.on_tool_end`` reads (cli/generation_hooks.py:55-104, 180-197):
    ``end_generation`` → the raw dict's ``result["result"]["filepath"]`` (then the file);
    ``write_file`` with ``file_type == "sql_summary"`` in ``context.tool_arguments`` → the path
    after ``"File written successfully: "`` in ``result["result"]``."""

    def __init__(self) -> None:
        self.generated: list[tuple[str, str]] = []  # (path, file content) of end_generation
        self.summaries: list[str] = []  # paths of sql_summary files written
        self.unreadable: list[Any] = []  # results neither branch could read (Datus logs a warning)
        self.tools_ended: list[str] = []

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        self.tools_ended.append(tool.name)
        if tool.name == "end_generation":
            inner = result.get("result", {}) if isinstance(result, dict) else None
            path = inner.get("filepath", "") if isinstance(inner, dict) else ""
            if path and Path(path).exists():
                self.generated.append((path, Path(path).read_text()))
            else:
                self.unreadable.append(result)
        elif tool.name == "write_file":
            arguments = json.loads(context.tool_arguments) if context.tool_arguments else {}
            if arguments.get("file_type") != "sql_summary":
                return
            message = str(result.get("result", "")) if isinstance(result, dict) else ""
            if "File written successfully" in message:
                self.summaries.append(message.split(": ")[-1].strip())
            else:
                self.unreadable.append(result)


def sql_server_object(db: Path, allowed: list[str] | None = None, name: str = "sql") -> DuckMCPServer:
    """An openai-agents-shaped stdio server object (like Datus's ``SilentMCPServerStdio``) on
    the shipped SQL server; ``allowed`` is a static tool filter, as Datus's filesystem server
    carries (tools/mcp_tools/mcp_server.py:217-231)."""
    return DuckMCPServer(name=name, command=[sys.executable, "-m", "datus.mcp_servers.sql_server", "--url",
                                             f"sqlite:///{db}"],
                         tool_filter={"allowed_tool_names": allowed} if allowed is not None else None)


# ---------------------------------------------------------------- what a node does around the call


def llm_result2json(text: str) -> dict[str, Any] | None:
    """utils/json_utils.py:186: a JSON object, plain or in a ```json fence; None otherwise."""
    fenced = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.DOTALL)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def node_manager(user_message: str, manager: ActionHistoryManager | None = None) -> ActionHistoryManager:
    """The manager as an agentic node hands it over: its USER action (PROCESSING,
    gen_sql_agentic_node.py:460-468) and its ``llm_generation`` ASSISTANT action (PROCESSING,
    l.498-506) already added. The CLI passes one manager for every turn (cli/repl.py:101)."""
    manager = manager if manager is not None else ActionHistoryManager()
    manager.add_action(ActionHistory.create_action(ActionRole.USER, "chat", f"User: {user_message}",
                                                   {"user_message": user_message}, status=ActionStatus.PROCESSING))
    manager.add_action(ActionHistory.create_action(ActionRole.ASSISTANT, "llm_generation",
                                                   "Generating response with tools...", {"prompt": user_message},
                                                   status=ActionStatus.PROCESSING))
    return manager


def _successful_dicts(actions: list[ActionHistory]) -> list[dict[str, Any]]:
    return [a.output for a in actions if a.status == ActionStatus.SUCCESS and isinstance(a.output, dict) and a.output]


def chat_answer(yielded: list[ActionHistory]) -> str:
    """chat_agentic_node.py:391-417: ``content`` or ``response`` of each SUCCESS dict output,
    ``raw_output`` only of ``message`` steps; else the last SUCCESS dict output's fields."""
    answer: Any = ""
    for action in yielded:
        if action.status == ActionStatus.SUCCESS and isinstance(action.output, dict) and action.output:
            said = action.output.get("raw_output", "") if action.action_type == "message" else ""
            answer = action.output.get("content", "") or action.output.get("response", "") or said or answer
    last = (_successful_dicts(yielded) or [None])[-1]
    if not answer and last:
        answer = (last.get("content", "") or last.get("text", "") or last.get("response", "")
                  or last.get("raw_output", "") or str(last))
    return answer


def gen_sql_answer(yielded: list[ActionHistory]) -> Any:
    """gen_sql_agentic_node.py:524-545: ``content``, ``response`` or ``raw_output`` of every
    SUCCESS dict output (tool steps' raw dicts included), the last one winning."""
    answer: Any = ""
    for output in _successful_dicts(yielded):
        answer = output.get("content", "") or output.get("response", "") or output.get("raw_output", "") or answer
    return answer


def summary_answer(yielded: list[ActionHistory]) -> Any:
    """sql_summary_agentic_node.py:436-458 (semantic_agentic_node.py:468-491 the same): the
    ``raw_output`` (dict or str) of the last SUCCESS dict output that has one."""
    answer: Any = ""
    for output in _successful_dicts(yielded):
        raw = output.get("raw_output", "")
        if isinstance(raw, dict) or raw:
            answer = raw
    return answer


def compare_answer(yielded: list[ActionHistory]) -> Any:
    """compare_agentic_node.py:244-258: ``raw_output`` of SUCCESS dict outputs, a non-dict
    output as it is."""
    answer: Any = ""
    for action in yielded:
        if action.status == ActionStatus.SUCCESS and action.output:
            if isinstance(action.output, dict):
                answer = action.output.get("raw_output") or answer
            else:
                answer = action.output
    return answer


def node_tokens(manager: ActionHistoryManager) -> int:
    """chat_agentic_node.py:449-468 (gen_sql l.578-596, sql_summary l.469-487): newest first,
    the first ``role == "assistant"`` action whose dict output has a truthy
    ``usage["total_tokens"]``."""
    for action in reversed(manager.get_actions()):
        if action.role == "assistant" and action.output and isinstance(action.output, dict):
            usage = action.output.get("usage", {})
            if usage and isinstance(usage, dict) and usage.get("total_tokens"):
                return int(usage["total_tokens"])
    return 0


def compare_tokens(manager: ActionHistoryManager) -> int:
    """compare_agentic_node.py:261-270: ``total_tokens or output_tokens`` of the newest
    ASSISTANT action with a usage dict."""
    for action in reversed(manager.get_actions()):
        if action.role == ActionRole.ASSISTANT and isinstance(action.output, dict):
            usage = action.output.get("usage", {})
            if isinstance(usage, dict) and (usage.get("total_tokens") or usage.get("output_tokens")):
                return int(usage.get("total_tokens") or usage.get("output_tokens"))
    return 0


def tool_stats(manager: ActionHistoryManager) -> dict[str, Any]:
    """chat_agentic_node.py:470-479: the execution stats a node reports."""
    actions = manager.get_actions()
    tool_calls = [action for action in actions if action.role == ActionRole.TOOL]
    return {"total_actions": len(actions), "tool_calls_count": len(tool_calls),
            "tools_used": sorted({action.action_type for action in tool_calls})}


def add_in_sql_context(sql: str, incremental_actions: list[ActionHistory]) -> SQLContext | None:
    """cli/chat_commands.py:693-734: the newest finished ``read_query`` tool action; its
    ``raw_output`` read as the tool's dict."""
    last = next((a for a in reversed(incremental_actions) if a and a.is_done() and a.role == ActionRole.TOOL
                 and a.function_name() == "read_query"), None)
    if last is None:
        return None
    output = last.output
    if not output.get("success", "True"):
        error, sql_return, row_count = output.get("error", "") or output.get("raw_output", ""), None, 0
    else:
        tool_result = output.get("raw_output", {})
        if tool_result.get("success", 0) == 1:
            data = tool_result.get("result")
            error, row_count, sql_return = None, data.get("original_rows", 0), data.get("compressed_data", "")
        else:
            error, sql_return, row_count = tool_result.get("error", ""), "", 0
    return SQLContext(sql_query=sql, sql_error=error, sql_return=sql_return, row_count=row_count, explanation="")


def tool_view(action: ActionHistory) -> dict[str, Any]:
    """How the CLI's action screens read a tool step (cli/screen/action_display_app.py:188-345,
    cli/action_history_display.py:313-380): the title from ``input["function_name"]``,
    ``raw_output`` (a dict, or JSON text parsed), ``success == 0`` → "Execute Failed", a
    ``read_query``'s ``result.compressed_data``, an MCP ``{"text": ...}`` content parsed, else
    ``result`` items."""
    name = str(action.input.get("function_name", "unknown")) if isinstance(action.input, dict) else "unknown"
    view: dict[str, Any] = {"title": f"Tool call - {name}"}
    data = action.output.get("raw_output", action.output)
    if isinstance(data, str):
        data = json.loads(data)  # Datus shows the text as it is when this fails
    if "success" in data and data["success"] == 0:
        view["failed"] = f"Execute Failed: {data.get('error')}"
    elif name == "read_query" and "result" in data:
        view["rows"] = data["result"]["compressed_data"]
    elif "text" in data and isinstance(data["text"], str):
        view["items"] = json.loads(data["text"].replace("'", '"').replace("None", "null"))
    elif "result" in data:
        view["items"] = data["result"]
    return view


def stream_line(action: ActionHistory) -> str:
    """The line the web UI streams for a step (cli/web/chat_executor.py:125-176): tools with
    their input (less ``function_name``) and an output preview, assistant text as thinking."""
    if action.role == ActionRole.TOOL:
        name = action.function_name() or "unknown"
        params = {k: v for k, v in action.input.items() if k != "function_name"} if isinstance(action.input, dict) else {}
        shown = f" ({str(params)[:100]}{'...' if len(str(params)) > 100 else ''})" if params else ""
        if action.status != ActionStatus.SUCCESS:
            return f"{'⟳' if action.status == ActionStatus.PROCESSING else '✗'}Tool call: {name}{shown}"
        output = action.output
        if isinstance(output, dict) and "result" in output:
            preview = f" → {str(output['result'])[:80]}"
        elif isinstance(output, dict) and output:
            preview = f" → {next(iter(output))}: ..."
        else:
            preview = f" → {str(output)[:80]}" if output else ""
        return f"✓Tool call: {name}{shown}{preview}"
    if action.role == ActionRole.ASSISTANT and action.messages:
        message = action.messages.strip().removeprefix("Thinking: ").strip()
        return f"💭Thinking: {message[:100]}{'...' if len(message) > 100 else ''}" if message else ""
    return ""
