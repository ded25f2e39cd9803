"""Chat messages as openai-agents Responses input items: the form sessions are stored in.

Datus-agent keeps a session as the items openai-agents' Runner saves, and its web UI reads
them straight from the database, so we store the same items. A `ChatMessage` becomes::

    user, system   {"role": "user"|"system", "content": <text>}
    assistant      one item each, in this order, for what it holds:
                   {"type": "reasoning", "id": ..., "summary": [{"type": "summary_text", "text": <reasoning>}]}
                   {"type": "message", "id": ..., "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": <content>, "annotations": []}]}
                   {"type": "function_call", "id": ..., "call_id": <id>, "name": <name>, "arguments": <JSON text>}
    tool           {"type": "function_call_output", "call_id": <tool_call_id>, "output": <content>}

(an assistant message with nothing in it is one message item with empty text; ``id`` is
openai-agents' ``"__fake_id__"``, its mark for items that did not come from the Responses API.)

What a standard item cannot say rides under one extra key, ``"datus"`` — readers of the
standard shape (Datus's web UI, openai-agents' chat-completions converter) ignore unknown
keys: ``{"fields": {...}}`` holds the message's fields the items do not express (provider
replay data in ``reasoning_details``, such as Claude's thinking signatures; a tool result's
``name``), and ``{"new_message": true}`` marks an assistant message that directly follows
another one and would otherwise be read as its continuation.

Reading groups assistant items as openai-agents writes them: a function call continues the
assistant message before it, a message item continues a reasoning item, a reasoning item
continues a reasoning item; anything else starts a new message. Items of other types
(hosted tool calls, references) end the assistant message and are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from datus.models.messages import ChatMessage, ToolCall

__all__ = ["EXTRA_KEY", "ItemKind", "item_kind", "items_to_messages", "messages_to_items", "user_text"]

EXTRA_KEY = "datus"
_FAKE_ID = "__fake_id__"  # openai-agents' id for items that were not produced by the Responses API

ItemKind = Literal["user", "system", "reasoning", "message", "function_call", "function_call_output", "other"]
_ASSISTANT_KINDS = frozenset({"reasoning", "message", "function_call"})


def item_kind(item: Any) -> ItemKind:
    if not isinstance(item, dict):
        return "other"
    kind, role = item.get("type"), item.get("role")
    if kind in ("reasoning", "function_call", "function_call_output"):
        return kind
    if kind in (None, "message"):
        if role == "assistant":
            return "message"
        if role == "user":
            return "user"
        if role in ("system", "developer"):
            return "system"
    return "other"


def _continues(previous: ItemKind | None, kind: ItemKind) -> bool:
    """Whether an item of ``kind`` right after one of ``previous`` belongs to the same message."""
    if previous not in _ASSISTANT_KINDS:
        return False
    return kind == "function_call" or (kind in ("message", "reasoning") and previous == "reasoning")


def messages_to_items(messages: Iterable[ChatMessage], previous: ItemKind | None = None) -> list[dict[str, Any]]:
    """The items for ``messages``; ``previous`` is the kind of the item they follow in the
    session (so an assistant message after an assistant message is marked as new)."""
    items: list[dict[str, Any]] = []
    for message in messages:
        own = _standard_items(message)
        extra: dict[str, Any] = {}
        fields = _unexpressed(message, own)
        if fields:
            extra["fields"] = fields
        if message.role == "assistant" and _continues(previous, item_kind(own[0])):
            extra["new_message"] = True
        if extra:
            own[0][EXTRA_KEY] = extra
        previous = item_kind(own[-1])
        items += own
    return items


def _standard_items(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role in ("user", "system"):
        return [{"role": message.role, "content": message.content}]
    if message.role == "tool":
        return [{"type": "function_call_output", "call_id": message.tool_call_id or "", "output": message.content}]
    items: list[dict[str, Any]] = []
    if message.reasoning is not None or message.reasoning_details:
        summary = [] if message.reasoning is None else [{"type": "summary_text", "text": message.reasoning}]
        items.append({"type": "reasoning", "id": _FAKE_ID, "summary": summary})
    if message.content or not message.tool_calls and not items:
        items.append({"type": "message", "id": _FAKE_ID, "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": message.content, "annotations": []}]})
    items += [{"type": "function_call", "id": _FAKE_ID, "call_id": call.id, "name": call.name,
               "arguments": call.arguments} for call in message.tool_calls]
    return items


def _unexpressed(message: ChatMessage, items: list[dict[str, Any]]) -> dict[str, Any]:
    # what reading the standard items alone would get wrong is kept verbatim
    [plain] = items_to_messages(items)
    wanted, got = message.model_dump(mode="json"), plain.model_dump(mode="json")
    return {name: value for name, value in wanted.items() if got[name] != value}


def items_to_messages(items: Iterable[Any]) -> list[ChatMessage]:
    """The conversation held by ``items`` (ours, or openai-agents' own)."""
    messages: list[ChatMessage] = []
    current: dict[str, Any] | None = None  # the assistant message being gathered
    previous: ItemKind | None = None

    def flush() -> None:
        nonlocal current
        if current is not None:
            messages.append(_build(current))
            current = None

    for item in items:
        kind = item_kind(item)
        if kind in _ASSISTANT_KINDS:
            extra = item.get(EXTRA_KEY) or {}
            if current is None or extra.get("new_message") or not _continues(previous, kind):
                flush()
                current = {"role": "assistant", "content": "", "reasoning": None, "tool_calls": [], "fields": {}}
            _gather(current, kind, item)
            current["fields"].update(extra.get("fields") or {})
        else:
            flush()
            if kind in ("user", "system"):
                fields = (item.get(EXTRA_KEY) or {}).get("fields") or {}
                messages.append(_build({"role": kind, "content": _text(item.get("content")), "fields": fields}))
            elif kind == "function_call_output":
                fields = (item.get(EXTRA_KEY) or {}).get("fields") or {}
                messages.append(_build({"role": "tool", "tool_call_id": item.get("call_id"),
                                        "content": _text(item.get("output")), "fields": fields}))
        previous = kind
    flush()
    return messages


def _gather(current: dict[str, Any], kind: ItemKind, item: dict[str, Any]) -> None:
    if kind == "reasoning":
        # the summary; openai-agents keeps Claude's thinking in ``content`` (reasoning_text parts)
        parts = item.get("summary") or item.get("content") or []
        texts = [str(part.get("text", "")) for part in parts if isinstance(part, dict)]
        if texts:
            text = "\n\n".join(texts)
            current["reasoning"] = text if current["reasoning"] is None else f"{current['reasoning']}\n\n{text}"
    elif kind == "message":
        current["content"] += _text(item.get("content"))
    else:
        arguments = item.get("arguments")
        current["tool_calls"].append(ToolCall(
            id=str(item.get("call_id") or ""), name=str(item.get("name") or ""),
            arguments=arguments if isinstance(arguments, str) else json.dumps(arguments or {})))


def _build(data: dict[str, Any]) -> ChatMessage:
    fields = data.pop("fields")
    return ChatMessage.model_validate({**data, **fields})


def _text(content: Any) -> str:
    """The text of a content value: a string, or a list of text parts (input, output,
    refusal)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            str(part.get("text") if "text" in part else part.get("refusal", ""))
            for part in content if isinstance(part, dict))
    return str(content)


def user_text(item: Any) -> str | None:
    """The text of a user item; None for any other item."""
    return _text(item.get("content")) if item_kind(item) == "user" else None
