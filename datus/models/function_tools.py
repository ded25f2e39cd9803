"""Tools for a tool run: Python functions, openai-agents ``FunctionTool`` objects and MCP server
tools behind one shape.

A `Tool` has a `ToolSpec` (name, description, JSON schema of its arguments) and an async
``call(arguments, ctx) -> ToolOutcome``; ``ctx`` is the `ToolContext` of the call (what
openai-agents hands its tools and hooks). An outcome keeps the tool's raw return value
(``raw``: the step's ``output["raw_output"]``, what hooks get) next to its text (``text``: what
goes back to the model). A tool that raises becomes a failed outcome, which goes back to the
model as a tool result: the model can read the error and try something else.

``as_tools`` accepts, per item: a `Tool`; anything shaped like an openai-agents ``FunctionTool``
(``name``, ``params_json_schema``, ``on_invoke_tool``; see `datus.models.agents_compat`);
or a plain function.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError, create_model

from datus.models.generation import ToolSpec

__all__ = ["FunctionTool", "Tool", "ToolContext", "ToolOutcome", "as_tools", "reported_failure", "tool_text"]


@dataclass
class ToolOutcome:
    text: str
    is_error: bool = False
    structured: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    raw: Any = None  # the value the tool returned, as it returned it; None: ``text`` is all there is


@dataclass
class ToolContext:
    """One tool call, with the attributes of openai-agents' ``ToolContext``: the run's
    ``context`` and ``usage`` (a `RunContext`'s) and the call's name, id and raw JSON arguments."""

    tool_name: str
    tool_call_id: str
    tool_arguments: str
    context: Any = None
    usage: Any = None


class Tool(Protocol):
    spec: ToolSpec

    async def call(self, arguments: dict[str, Any], ctx: ToolContext | None = None) -> ToolOutcome: ...


class FunctionTool:
    """A Python function (sync or async) as a tool; its signature and type hints give the
    argument schema and its docstring the description. Arguments are validated before the
    call, so the model gets a readable error instead of a TypeError."""

    def __init__(self, func: Callable[..., Any], name: str | None = None, description: str | None = None) -> None:
        self.func = func
        signature = inspect.signature(func)
        hints = _type_hints(func)
        fields: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ValueError(f"tool function {func.__name__!r} cannot take *args or **kwargs")
            annotation = hints.get(param.name, Any)
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (annotation, default)
        self._arguments_model = create_model(f"{func.__name__}_arguments", **fields)  # type: ignore[call-overload]
        schema = self._arguments_model.model_json_schema()
        schema.pop("title", None)
        self.spec = ToolSpec(
            name=name or func.__name__,
            description=(description or inspect.getdoc(func) or "").strip(),
            parameters=schema,
        )

    @property
    def name(self) -> str:  # what hooks read (``tool.name``)
        return self.spec.name

    async def call(self, arguments: dict[str, Any], ctx: ToolContext | None = None) -> ToolOutcome:
        try:
            values = self._arguments_model.model_validate(arguments)
        except ValidationError as exc:
            return ToolOutcome(f"invalid arguments for {self.spec.name}: {exc}", is_error=True)
        kwargs = {name: getattr(values, name) for name in type(values).model_fields}
        try:
            if inspect.iscoroutinefunction(self.func):
                result = await self.func(**kwargs)
            else:
                result = await asyncio.to_thread(self.func, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a tool error is an answer for the model, not a crash
            return ToolOutcome(f"{type(exc).__name__}: {exc}", is_error=True)
        return ToolOutcome(tool_text(result), structured=None if isinstance(result, str) else result, raw=result)


def as_tools(tools: Any) -> list[Tool]:
    """Accepts None, one tool or function, or a list of them."""
    from datus.models.agents_compat import AgentsFunctionTool, is_function_tool_object

    if tools is None:
        return []
    items = tools if isinstance(tools, (list, tuple)) else [tools]
    out: list[Tool] = []
    for item in items:
        if hasattr(item, "spec") and hasattr(item, "call"):
            out.append(item)
        elif is_function_tool_object(item):
            out.append(AgentsFunctionTool(item))
        elif callable(item):
            out.append(FunctionTool(item))
        else:
            raise TypeError(f"a tool must be a function, a Tool or a FunctionTool-shaped object "
                            f"(name, params_json_schema, on_invoke_tool), not {type(item).__name__}")
    return out


def tool_text(value: Any) -> str:
    """What the model reads of a tool's return value: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def reported_failure(value: Any) -> str | None:
    """The error a tool reported in its answer, Datus's convention: ``{"success": 0, "error":
    ..., "result": ...}`` (a dict or an object with those attributes). None: no failure reported."""
    if isinstance(value, Mapping):
        success, error, shaped = value.get("success"), value.get("error"), "success" in value and (
            "error" in value or "result" in value)
    else:
        success, error = getattr(value, "success", None), getattr(value, "error", None)
        shaped = success is not None and (hasattr(value, "error") or hasattr(value, "result"))
    if not shaped or success not in (0, False):
        return None
    return str(error) if error else "the tool reported a failure"


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        import typing

        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - hints that cannot be resolved leave the arguments untyped
        return {}
