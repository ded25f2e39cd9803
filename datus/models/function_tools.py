"""Tools for a tool run: plain Python functions and MCP server tools behind one shape.

A `Tool` has a `ToolSpec` (name, description, JSON schema of its arguments) and an async
`call(arguments) -> ToolOutcome`. A tool that raises becomes a failed outcome, which goes back
to the model as a tool result: the model can read the error and try something else.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError, create_model

from datus.models.generation import ToolSpec

__all__ = ["FunctionTool", "Tool", "ToolOutcome", "as_tools"]


@dataclass
class ToolOutcome:
    text: str
    is_error: bool = False
    structured: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


class Tool(Protocol):
    spec: ToolSpec

    async def call(self, arguments: dict[str, Any]) -> ToolOutcome: ...


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

    async def call(self, arguments: dict[str, Any]) -> ToolOutcome:
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
        except Exception as exc:  # a tool error is an answer for the model, not a crash
            return ToolOutcome(f"{type(exc).__name__}: {exc}", is_error=True)
        return ToolOutcome(_as_text(result), structured=None if isinstance(result, str) else result)


def as_tools(tools: Any) -> list[Tool]:
    """Accepts None, one tool or function, or a list of them."""
    if tools is None:
        return []
    items = tools if isinstance(tools, (list, tuple)) else [tools]
    out: list[Tool] = []
    for item in items:
        if hasattr(item, "spec") and hasattr(item, "call"):
            out.append(item)
        elif callable(item):
            out.append(FunctionTool(item))
        else:
            raise TypeError(f"a tool must be a function or a Tool, not {type(item).__name__}")
    return out


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        import typing

        return typing.get_type_hints(func)
    except Exception:
        return {}


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)

