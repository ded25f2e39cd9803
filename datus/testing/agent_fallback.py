"""The fake server's ``agent`` fallback: answers like a plausible model, not an echo.

Tests written against real models (Datus-agent's own model tests) assert what a model does:
a JSON object with the keys the prompt names, a tool run that calls a tool and then answers.
`agent_handler` does that, provider-neutrally (it reads the `ScriptedRequest` every wire
protocol produces), in this order:

1. **A forced tool** (OpenAI ``tool_choice`` naming a function or ``"required"``, Anthropic
   ``{"type": "tool" | "any"}``, Gemini ``functionCallingConfig.mode: ANY``): a call of it, with
   arguments valid for its schema. Anthropic's structured output by a forced tool lands here.
2. **JSON mode** (``response_format`` ``json_object``/``json_schema``, Gemini's
   ``responseMimeType: application/json``, Anthropic's ``output_format``): a JSON object
   valid for the schema, else with the keys the prompt names (``'greeting': 'hello'``,
   ``'question' and 'answer' fields``, an ``Output format: {"sql": ...}`` template), else
   ``{"response": ...}``.
3. **Tools offered**, per user turn (the messages after the last user message):
   no tool result yet → one call of the best-fitting tool: one that needs no invented input
   (every required argument defaulted or nullable, like Datus's ``list_tables``) and whose
   name shares words with the prompt, else a read-only SQL tool with ``SELECT 1``, else the
   tool needing the fewest inputs; each call comes with a sentence saying what it does, as
   models often write (callers see a message step beside it). Once results are in, if a SQL
   tool is offered, not used yet this turn and a table is known from any tool result of the
   conversation: one SQL call
   (``SELECT COUNT(*)`` when the question counts, else ``SELECT * ... LIMIT 5``) on the
   table the question names, else the first one. Then a final answer: text naming the tools,
   the tables and the SQL with a preview of its result — or JSON (as in 2) when the prompt
   asks for JSON or shows an output template. At most two calls per turn, so a run always ends.
4. **A prompt asking for JSON** in so many words, no tools: as in 2.
5. Otherwise the echo, like the default fallback.

When the request asks for thinking (Anthropic ``thinking``, Gemini ``includeThoughts``, Qwen's
``enable_thinking``, DeepSeek's ``thinking`` or a ``*reasoner`` model), every answer but the
echo carries a short reasoning text too, so thinking blocks, signatures and reasoning fields
travel as they do with a real reasoning model.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from datus.models.scripted import Reply, ScriptedRequest, ScriptedToolCall, echo_handler
from datus.testing.json_values import instance_of, keys_named_in, needs_input, wants_json

__all__ = ["OfferedTool", "agent_handler"]

_WRITES = re.compile(r"write|insert|update|delete|drop|create|alter|truncate|merge", re.IGNORECASE)
_SQL_ARGUMENTS = ("sql", "query", "sql_query", "statement")
_COUNTING = re.compile(r"\b(count|how many|number of)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+")
_RESULT_KEYS = ("result", "results", "answer", "output", "data", "rows")
_EXPLAIN_KEYS = ("explanation", "reason", "reasoning", "summary", "insight", "description", "analysis")


@dataclass(frozen=True)
class OfferedTool:
    name: str
    description: str
    schema: dict[str, Any]

    @property
    def sql_argument(self) -> str | None:
        """The argument taking SQL, for a tool that reads with SQL (never one that writes)."""
        if _WRITES.search(self.name):
            return None
        properties = self.schema.get("properties") or {}
        return next((name for name in _SQL_ARGUMENTS if name in properties), None)


@dataclass
class _Turn:
    """What the conversation tells the fake: the question, the tools used, what they said."""

    question: str
    instructions: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # this turn, in order
    results: list[tuple[str, str]] = field(default_factory=list)  # this turn: (tool name, content)
    tables: list[str] = field(default_factory=list)  # learnt from any tool result of the conversation

    @property
    def sql(self) -> str | None:
        for _, arguments in reversed(self.calls):
            for name in _SQL_ARGUMENTS:
                if isinstance(arguments.get(name), str):
                    return arguments[name]
        return None

    @property
    def preview(self) -> str:
        return _shorten(self.results[-1][1], 300) if self.results else ""


def agent_handler(request: ScriptedRequest) -> Reply:
    """A plausible model's answer to ``request`` (see the module docstring)."""
    reply = _answer(request)
    if _wants_reasoning(request) and not reply.text.startswith("echo: "):
        step = f"call {reply.tool_calls[0].name}" if reply.tool_calls else "answer"
        reply = replace(reply, reasoning=f"The user asks: {_shorten(_read_turn(request).question, 120)} I will {step}.")
    return reply


def _answer(request: ScriptedRequest) -> Reply:
    turn = _read_turn(request)
    tools = [] if _tools_disabled(request) else _offered_tools(request)
    forced = _forced_tool(request, tools, turn)
    if forced is not None:
        given = keys_named_in(turn.instructions + "\n" + turn.question)
        return _call(forced, instance_of(forced.schema, _chooser(turn, given)))
    schema = _json_mode(request)
    if schema is not None:
        return Reply(text=json.dumps(_json_answer(turn, schema)))
    if tools:
        step = _next_call(turn, tools)
        if step is None:
            return Reply(text=_final_answer(turn))
        # a word before the call, as models often say: callers see a message step beside the call
        call = step.tool_calls[0]
        return replace(step, text=f"Let me use {call.name} ({_shorten(call.arguments_json(), 80)}).")
    if wants_json(turn.question + "\n" + turn.instructions):
        return Reply(text=json.dumps(_json_answer(turn, {})))
    return echo_handler(request)


# -- reading the request ------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else json.dumps(content)


def _read_turn(request: ScriptedRequest) -> _Turn:
    messages = request.messages
    last_user = max((index for index, message in enumerate(messages) if message.get("role") == "user"), default=-1)
    instructions = "\n".join(_text(message.get("content")) for message in messages
                             if message.get("role") in ("system", "developer"))
    turn = _Turn(question=_text(messages[last_user].get("content")) if last_user >= 0 else "", instructions=instructions)
    names: dict[str, str] = {}  # call id -> tool name
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            function = call.get("function") or call  # wire shapes nest it; the in-process one does not
            names[str(call.get("id"))] = str(function.get("name", ""))
            if index > last_user:
                turn.calls.append((str(function.get("name", "")), _arguments(function.get("arguments"))))
        if message.get("role") == "tool":
            name = message.get("name") or names.get(str(message.get("tool_call_id")), "")
            content = _text(message.get("content"))
            for table in _tables_in(content, name):
                if table not in turn.tables:
                    turn.tables.append(table)
            if index > last_user:
                turn.results.append((name, content))
    return turn


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _tables_in(content: str, tool_name: str) -> list[str]:
    """Table names in a tool result: JSON or a Python repr (openai-agents sends ``str(dict)``)."""
    value: Any = None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(content)
            break
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    if isinstance(value, dict) and isinstance(value.get("text"), str):  # an MCP text content block
        return _tables_in(value["text"], tool_name)
    found: list[str] = []

    def walk(node: Any, listing: bool) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("table_name"), str):
                found.append(node["table_name"])
            elif isinstance(node.get("name"), str) and (listing or str(node.get("type", "")).lower() in (
                    "table", "view", "materialized_view", "base table")):
                found.append(node["name"])
            for item in node.values():
                walk(item, listing)
        elif isinstance(node, list):
            for item in node:
                if listing and isinstance(item, str) and re.fullmatch(r"[A-Za-z_][\w.]*", item):
                    found.append(item)
                else:
                    walk(item, listing)

    lowered = tool_name.lower()
    walk(value, "tables" in lowered or ("list" in lowered and "table" in lowered))
    return found


def _offered_tools(request: ScriptedRequest) -> list[OfferedTool]:
    tools: list[OfferedTool] = []
    for tool in request.tools:
        if not isinstance(tool, dict):
            continue
        if request.protocol == "openai":
            if tool.get("type") != "function":
                continue
            spec = tool.get("function") or {}
            schema = spec.get("parameters")
        elif request.protocol == "anthropic":
            if tool.get("type") not in (None, "custom"):  # server tools (web search, ...) run upstream
                continue
            spec, schema = tool, tool.get("input_schema")
        else:  # gemini function declarations, either schema spelling
            spec = tool
            schema = next((tool[key] for key in ("parametersJsonSchema", "parameters_json_schema", "parameters")
                           if isinstance(tool.get(key), dict)), None)
        if spec.get("name"):
            tools.append(OfferedTool(str(spec["name"]), str(spec.get("description") or ""), schema or {}))
    return tools


def _wants_reasoning(request: ScriptedRequest) -> bool:
    body = request.body
    if request.protocol == "anthropic":
        return (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    if request.protocol == "gemini":
        config = body.get("generationConfig") or body.get("generation_config") or {}
        thinking = config.get("thinkingConfig") or config.get("thinking_config") or {}
        return bool(thinking.get("includeThoughts") or thinking.get("include_thoughts"))
    thinking = body.get("thinking")
    return (body.get("enable_thinking") is True or "reasoner" in request.model
            or (isinstance(thinking, dict) and thinking.get("type") == "enabled"))


def _tools_disabled(request: ScriptedRequest) -> bool:
    choice = request.body.get("tool_choice")
    config = request.body.get("toolConfig") or request.body.get("tool_config") or {}
    calling = config.get("functionCallingConfig") or config.get("function_calling_config") or {}
    return (choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")
            or str(calling.get("mode", "")).upper() == "NONE")


def _forced_tool(request: ScriptedRequest, tools: list[OfferedTool], turn: _Turn) -> OfferedTool | None:
    if not tools:
        return None
    choice = request.body.get("tool_choice")
    config = request.body.get("toolConfig") or request.body.get("tool_config") or {}
    calling = config.get("functionCallingConfig") or config.get("function_calling_config") or {}
    named: str | None = None
    if isinstance(choice, dict):
        if choice.get("type") == "function":  # OpenAI
            named = (choice.get("function") or {}).get("name") or choice.get("name")
        elif choice.get("type") == "tool":  # Anthropic
            named = choice.get("name")
        elif choice.get("type") != "any":
            return None
    elif choice == "required":
        named = None
    elif str(calling.get("mode", "")).upper() == "ANY":
        allowed = calling.get("allowedFunctionNames") or calling.get("allowed_function_names") or []
        named = allowed[0] if len(allowed) == 1 else None
    else:
        return None
    by_name = {tool.name: tool for tool in tools}
    return by_name.get(named) if named else _best_first_tool(turn, tools)


def _json_mode(request: ScriptedRequest) -> dict[str, Any] | None:
    """The schema the request demands JSON for ({} when any object will do), or None."""
    body = request.body
    response_format = body.get("response_format") or {}
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_object":
            return {}
        if response_format.get("type") == "json_schema":
            return (response_format.get("json_schema") or {}).get("schema") or {}
    output_format = body.get("output_format") or {}  # Anthropic structured outputs
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        return output_format.get("schema") or {}
    config = body.get("generationConfig") or body.get("generation_config") or {}
    if (config.get("responseMimeType") or config.get("response_mime_type")) == "application/json":
        for key in ("responseJsonSchema", "response_json_schema", "responseSchema", "response_schema"):
            if isinstance(config.get(key), dict):
                return config[key]
        return {}
    return None


# -- answering ----------------------------------------------------------------------------


def _call(tool: OfferedTool, arguments: Any) -> Reply:
    return Reply(tool_calls=(ScriptedToolCall(tool.name, arguments if isinstance(arguments, dict) else {}),))


def _words(text: str) -> set[str]:
    return {word.rstrip("s") for word in _WORD.findall(text.lower()) if len(word) > 2}


def _best_first_tool(turn: _Turn, tools: list[OfferedTool]) -> OfferedTool:
    asked = _words(turn.question + " " + turn.instructions)

    def rank(tool: OfferedTool) -> tuple[int, int, int]:
        inputs = len(needs_input(tool.schema))
        overlap = len(_words(tool.name.replace("_", " ")) & asked)
        return (min(inputs, 1), -overlap, -("list" in tool.name.lower()))

    free = [tool for tool in tools if not needs_input(tool.schema)]
    if free:
        return min(free, key=rank)
    sql_tool = next((tool for tool in tools if tool.sql_argument), None)
    return sql_tool or min(tools, key=lambda tool: (len(needs_input(tool.schema)), rank(tool)))


def _next_call(turn: _Turn, tools: list[OfferedTool]) -> Reply | None:
    if not turn.results:
        tool = _best_first_tool(turn, tools)
        if tool.sql_argument and needs_input(tool.schema):
            return _sql_call(turn, tool)
        return _call(tool, instance_of(tool.schema, _chooser(turn, {})))
    used = {name for name, _ in turn.calls}
    if any(tool.sql_argument for tool in tools if tool.name in used) or not turn.tables:
        return None
    sql_tool = next((tool for tool in tools if tool.sql_argument), None)
    return _sql_call(turn, sql_tool) if sql_tool is not None else None


def _sql_call(turn: _Turn, tool: OfferedTool) -> Reply:
    table = _table_asked_for(turn)
    if table is None:
        sql = "SELECT 1"
    elif _COUNTING.search(turn.question):
        sql = f"SELECT COUNT(*) AS row_count FROM {_quoted(table)}"
    else:
        sql = f"SELECT * FROM {_quoted(table)} LIMIT 5"
    arguments = instance_of(tool.schema, _chooser(turn, {}))
    arguments = arguments if isinstance(arguments, dict) else {}
    arguments[str(tool.sql_argument)] = sql
    return _call(tool, arguments)


def _table_asked_for(turn: _Turn) -> str | None:
    if not turn.tables:
        return None
    asked = _words(turn.question)
    return next((table for table in turn.tables if table.lower().rstrip("s") in asked), turn.tables[0])


def _quoted(table: str) -> str:
    return table if re.fullmatch(r"[A-Za-z_][\w.]*", table) else '"' + table.replace('"', '""') + '"'


def _chooser(turn: _Turn, given: dict[str, Any]) -> Any:
    """Values for named properties, from the prompt and what the tools said (see instance_of)."""

    def choose(key: str, schema: dict[str, Any]) -> Any:
        kinds = json.dumps(schema).lower()
        takes_string = '"string"' in kinds or "type" not in kinds
        lower = key.lower()
        if given.get(key) is not None and takes_string:
            return given[key]
        if '"array"' in kinds and "table" in lower and turn.tables:
            return list(turn.tables)
        if not takes_string:
            return None
        if "sql" in lower:
            return turn.sql or (f"SELECT * FROM {_quoted(turn.tables[0])} LIMIT 5" if turn.tables else "SELECT 1")
        if "table" in lower and turn.tables:
            return _table_asked_for(turn)
        if lower in _RESULT_KEYS:
            return turn.preview or _summary(turn)
        if lower in _EXPLAIN_KEYS:
            return _summary(turn)
        if lower in ("query_text", "question", "text", "prompt", "task"):
            return turn.question
        return None

    return choose


def _json_answer(turn: _Turn, schema: dict[str, Any]) -> Any:
    given = keys_named_in(turn.instructions + "\n" + turn.question)
    choose = _chooser(turn, given)
    if schema.get("properties") or schema.get("type") not in (None, "object", "OBJECT"):
        return instance_of(schema, choose)
    if not given:
        return {"response": _summary(turn)}
    return {key: value if value is not None else (choose(key, {"type": "string"}) or _summary(turn))
            for key, value in given.items()}


def _final_answer(turn: _Turn) -> str:
    template = keys_named_in(turn.instructions + "\n" + turn.question)
    if template and (wants_json(turn.instructions + turn.question) or "{" in turn.instructions + turn.question):
        return json.dumps(_json_answer(turn, {}))
    return _summary(turn)


def _summary(turn: _Turn) -> str:
    if not turn.calls:
        return f"echo: {turn.question}"
    parts = [f"I used {', '.join(dict.fromkeys(name for name, _ in turn.calls))} to answer: {_shorten(turn.question, 200)}"]
    if turn.tables:
        parts.append(f"The database has these tables: {', '.join(turn.tables)}.")
    if turn.sql:
        parts.append(f"I ran `{turn.sql}`, which returned: {turn.preview}")
    return " ".join(parts)


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
