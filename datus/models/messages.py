"""Provider-neutral chat messages: what sessions store and every adapter converts from.

A conversation started on one provider continues on another because nothing here is
spelled in one provider's wire format. Provider-specific material that must be replayed
exactly (Anthropic thinking blocks with their signatures) rides in ``reasoning_details``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatMessage", "Prompt", "ToolCall", "to_messages"]


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    arguments: str = "{}"  # JSON text, as the model produced it

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict; raises ValueError with what is wrong."""
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool {self.name!r} arguments are not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ValueError(f"tool {self.name!r} arguments must be a JSON object")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    reasoning: str | None = None
    reasoning_details: list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None  # the tool's name on tool results


Prompt = str | Sequence[ChatMessage | dict[str, Any]]


def to_messages(prompt: Prompt, instruction: str | None = None) -> list[ChatMessage]:
    """A string becomes one user message; a list of dicts in the OpenAI chat shape (or of
    ChatMessage) is taken as the conversation. ``instruction`` is prepended as a system
    message unless the conversation already starts with one."""
    if isinstance(prompt, str):
        messages = [ChatMessage(role="user", content=prompt)]
    else:
        messages = [_coerce(item, index) for index, item in enumerate(prompt)]
        if not messages:
            raise ValueError("prompt is an empty list of messages")
    if instruction and messages[0].role != "system":
        messages.insert(0, ChatMessage(role="system", content=instruction))
    return messages


def _coerce(item: ChatMessage | dict[str, Any], index: int) -> ChatMessage:
    if isinstance(item, ChatMessage):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"message {index} must be a dict or ChatMessage, not {type(item).__name__}")
    data = dict(item)
    content = data.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        data["content"] = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    elif content is None:
        data["content"] = ""
    if "reasoning_content" in data:  # DeepSeek's spelling
        data["reasoning"] = data.pop("reasoning_content")
    calls = data.get("tool_calls")
    if calls:
        data["tool_calls"] = [
            call if isinstance(call, ToolCall) else ToolCall(
                id=call["id"],
                name=call.get("function", call).get("name"),
                arguments=call.get("function", call).get("arguments", "{}"),
            )
            for call in calls
        ]
    try:
        return ChatMessage.model_validate(data)
    except Exception as exc:
        raise ValueError(f"message {index} is not a valid chat message: {exc}") from None
