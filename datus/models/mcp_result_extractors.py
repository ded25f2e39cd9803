"""SQL contexts from the steps of a tool run.

Which tools run SQL, and under which argument the SQL text travels, differs per database
server; it lives in one table, `SQL_QUERY_FUNCTIONS`, which config extends
(``agent.sql_query_functions: {db_type: {tool_name: argument}}``) or callers extend per call.
A tool's SQL argument not in the table is looked for under ``query``, ``sql`` and ``statement``.

A tool's answer is read in each shape it comes in: Datus-agent's ``read_query`` function tool
(argument ``sql``) answers ``{"success": 0|1, "error": ..., "result": {"original_rows": n,
"compressed_data": <CSV>, ...}}`` — ``sql_return`` is the CSV, ``row_count`` ``original_rows``,
``sql_error`` the reported error; MCP servers answer text (JSON, a Python literal, or wrapped
as openai-agents renders MCP content, ``{"type": "text", "text": ...}``).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping
from typing import Any

from datus.schemas.action_history import ActionHistory, ActionRole
from datus.schemas.node_models import SQLContext

__all__ = ["SQL_QUERY_FUNCTIONS", "extract_sql_contexts", "get_function_call_names"]

# db_type -> tool name -> the argument that holds the SQL text.
SQL_QUERY_FUNCTIONS: dict[str, dict[str, str]] = {
    "snowflake": {"execute_sql": "sql", "read_query": "query", "run_snowflake_query": "statement"},
    "sqlite": {"execute_sql": "sql", "read_query": "query", "write_query": "query"},
    "starrocks": {"execute_sql": "sql", "read_query": "query", "write_query": "query"},
    "duckdb": {"execute_sql": "sql", "query": "query"},
    "postgres": {"execute_sql": "sql", "read_query": "query", "query": "sql"},
    "datus_sql": {"read_query": "query"},  # the read-only server shipped in datus.mcp_servers
}

_SQL_ARGUMENT_NAMES = ("query", "sql", "statement")


def get_function_call_names(db_type: str, extra: Mapping[str, Mapping[str, str]] | None = None) -> set[str]:
    return set(_functions(db_type, extra))


def _functions(db_type: str, extra: Mapping[str, Mapping[str, str]] | None) -> dict[str, str]:
    table = dict(SQL_QUERY_FUNCTIONS.get(db_type, {}))
    if extra and db_type in extra:
        table.update(extra[db_type])
    return table


def extract_sql_contexts(
    steps: Iterable[ActionHistory | Mapping[str, Any]],
    db_type: str = "datus_sql",
    extra_functions: Mapping[str, Mapping[str, str]] | None = None,
) -> list[SQLContext]:
    """One `SQLContext` per finished SQL tool call, in order. ``sql_query`` is the SQL text;
    the assistant text that follows the result (before the next tool call) is its
    explanation. Steps may be `ActionHistory` objects or their JSON dicts."""
    functions = _functions(db_type, extra_functions)
    actions = [step if isinstance(step, ActionHistory) else ActionHistory.model_validate(step) for step in steps]
    contexts: list[SQLContext] = []
    for index, action in enumerate(actions):
        if action.role != ActionRole.TOOL.value or action.status == "processing":
            continue
        data = action.input if isinstance(action.input, dict) else {}
        tool = data.get("tool") or data.get("function_name") or action.action_type
        if tool not in functions:
            continue
        arguments = _arguments(data.get("arguments"))
        sql = arguments.get(functions[tool]) or next(
            (arguments[name] for name in _SQL_ARGUMENT_NAMES if isinstance(arguments.get(name), str)), None
        )
        if not isinstance(sql, str):
            continue
        output = action.output if isinstance(action.output, dict) else {"raw_output": action.output}
        raw = _unwrapped(output.get("raw_output"))
        # a Datus function tool answers {"success": 0|1, "error": ..., "result": ...}
        datus_answer = isinstance(raw, dict) and "success" in raw and ("result" in raw or "error" in raw)
        refused = datus_answer and raw.get("success") in (0, False)
        failed = action.status == "failed" or output.get("success") is False or refused
        if datus_answer and not failed:
            text = _datus_result_text(raw.get("result"))
        else:
            text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
        error = str(raw.get("error") or output.get("error") or text) if refused else str(output.get("error") or text)
        contexts.append(SQLContext(
            sql_query=sql,
            explanation=_following_explanation(actions, index),
            sql_return="" if failed else text,
            sql_error=error if failed else "",  # Datus's nodes keep the contexts whose sql_error == ""
            row_count=None if failed else _row_count(raw),
        ))
    return contexts


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _unwrapped(raw: Any) -> Any:
    """The text of an MCP result as openai-agents renders one (``{"type": "text", "text": ...}``
    as JSON, what a Datus step's ``raw_output`` holds for MCP tools); anything else as it is."""
    if isinstance(raw, str) and raw.startswith("{"):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return raw
        if isinstance(value, dict) and value.get("type") == "text" and isinstance(value.get("text"), str):
            return value["text"]
    return raw


def _datus_result_text(result: Any) -> str:
    """What a Datus ``read_query`` returned, as text: its rows (``compressed_data``, CSV) when
    the answer has them, else the result as JSON."""
    if isinstance(result, dict) and isinstance(result.get("compressed_data"), str):
        return result["compressed_data"]
    return result if isinstance(result, str) else json.dumps(result, default=str)


def _following_explanation(actions: list[ActionHistory], index: int) -> str:
    for later in actions[index + 1:]:
        if later.role == ActionRole.TOOL.value:
            return ""
        if later.role == ActionRole.ASSISTANT.value and later.action_type in ("message", "final_response"):
            return later.messages or ""
    return ""


def _row_count(raw: Any) -> int | None:
    """Rows in a tool's answer: our server's JSON ``row_count``, or the length of a list
    given as JSON or as a Python literal (what the reference sqlite server prints)."""
    value = raw
    if isinstance(raw, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(raw)
                break
            except (ValueError, SyntaxError, json.JSONDecodeError):
                continue
        else:
            return None
    if isinstance(value, dict) and "result" in value and "success" in value:  # a Datus function tool's answer
        value = value["result"]
        if isinstance(value, dict) and isinstance(value.get("original_rows"), int):
            return value["original_rows"]
    if isinstance(value, dict):
        count = value.get("row_count")
        if isinstance(count, int):
            return count
        rows = value.get("rows")
        return len(rows) if isinstance(rows, list) else None
    return len(value) if isinstance(value, list) else None
