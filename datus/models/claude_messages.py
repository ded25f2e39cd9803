"""The Anthropic Messages wire format, both ways, with no SDK import.

Neutral ``ChatMessage``s become Anthropic turns (system pulled out, consecutive roles merged,
tool calls as ``tool_use`` blocks, tool results as ``tool_result`` blocks in a user turn,
thinking blocks replayed first and intact); answers — a whole message or one rebuilt from
stream events by ``MessageAccumulator`` — become the parts of a ``Generation`` through one
mapping, so streaming and non-streaming cannot drift apart.

Prompt caching (``prompt_cache: auto``) places at most three ``cache_control`` breakpoints
(Anthropic allows four, so one stays free for callers' ``extra_body``):

1. the end of the system prompt;
2. the last tool definition (tools are cached as a whole);
3. the last stable message: the turn just before the final user turn, i.e. everything a
   follow-up request repeats. The final user turn (this call's question, tool results or
   repair request) varies between calls, so writing it to the cache would cost the 25%
   write premium for nothing. When the final user turn is the whole conversation there is
   nothing before it, and the breakpoint goes on it: a one-message prompt is what a retry or
   the next turn repeats. The breakpoint sits on the turn's last block that may carry one
   (never a thinking block).

Prefixes shorter than the model's minimum (1024-4096 tokens) are simply not cached by
Anthropic and cost nothing extra, so placing breakpoints always is safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from datus.models.generation import StreamDelta, ToolSpec
from datus.models.messages import ChatMessage, ToolCall
from datus.models.usage import Usage

__all__ = [
    "EPHEMERAL",
    "MessageAccumulator",
    "add_cache_breakpoints",
    "content_parts",
    "finish_reason_of",
    "json_hint",
    "json_tool",
    "tool_choice",
    "usage_of",
    "wire_messages",
    "wire_tools",
]

EPHEMERAL: dict[str, str] = {"type": "ephemeral"}
THINKING_TYPES = frozenset({"thinking", "redacted_thinking"})
# Anthropic stop reasons in the neutral vocabulary the rest of datus uses (OpenAI's).
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
}


# ---- requests ---------------------------------------------------------------------------


def wire_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Anthropic turns (system messages are left to the caller). Consecutive turns of one
    role are merged, since the API wants user and assistant to alternate."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role, blocks = _blocks(message)
        if not blocks:  # the API rejects empty content; an empty turn says nothing anyway
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        # Thinking must open an assistant turn and tool results must open a user turn;
        # merging can break either, so restore the order (stable: the rest keeps its order).
        first = THINKING_TYPES if turn["role"] == "assistant" else frozenset({"tool_result"})
        turn["content"].sort(key=lambda block: block["type"] not in first)
    return turns


def _blocks(message: ChatMessage) -> tuple[str, list[dict[str, Any]]]:
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id or ""}
        if message.content:
            result["content"] = message.content
        return "user", [result]
    blocks: list[dict[str, Any]] = []
    if message.role == "assistant":
        # Only Anthropic's own blocks replay (they carry signatures); reasoning from another
        # provider has none, and the API would reject it.
        blocks += [_thinking_block(detail) for detail in message.reasoning_details or ()
                   if detail.get("type") in THINKING_TYPES]
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    if message.role == "assistant":
        blocks += [{"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call.arguments)}
                   for call in message.tool_calls]
    return message.role, blocks


def _thinking_block(detail: Mapping[str, Any]) -> dict[str, Any]:
    if detail["type"] == "redacted_thinking":
        return {"type": "redacted_thinking", "data": detail.get("data", "")}
    return {"type": "thinking", "thinking": detail.get("thinking", ""), "signature": detail.get("signature", "")}


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}  # the API takes objects only; unparseable arguments cannot be replayed
    return value if isinstance(value, dict) else {}


def wire_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    wired = []
    for tool in tools:
        entry: dict[str, Any] = {"name": tool.name, "input_schema": tool.parameters or {"type": "object",
                                                                                         "properties": {}}}
        if tool.description:
            entry["description"] = tool.description
        wired.append(entry)
    return wired


def json_tool(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The tool a schema-constrained answer is forced through: its input is the answer."""
    return {
        "name": name,
        "description": "Give your final answer by calling this tool; its input is the answer.",
        "input_schema": schema,
    }


def json_hint(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "Reply with a single JSON object and nothing else."
    return ("Reply with a single JSON object and nothing else. It must match this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False))


def tool_choice(choice: str | None) -> dict[str, Any] | None:
    if not choice:
        return None
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    return {"type": "tool", "name": choice}


def add_cache_breakpoints(system: list[dict[str, Any]], tools: list[dict[str, Any]],
                          turns: list[dict[str, Any]]) -> None:
    """Mark the breakpoints of the module docstring on freshly built wire structures."""
    if system:
        system[-1]["cache_control"] = dict(EPHEMERAL)
    if tools:
        tools[-1]["cache_control"] = dict(EPHEMERAL)
    last_user = next((i for i in range(len(turns) - 1, -1, -1) if turns[i]["role"] == "user"), None)
    if last_user is None:
        return
    stable = turns[last_user - 1] if last_user > 0 else turns[last_user]
    for block in reversed(stable["content"]):
        if block["type"] not in THINKING_TYPES:
            block["cache_control"] = dict(EPHEMERAL)
            return


# ---- answers ----------------------------------------------------------------------------


def content_parts(
    content: Sequence[Mapping[str, Any]], forced_tool: str | None
) -> tuple[str, str | None, list[dict[str, Any]] | None, list[ToolCall], bool]:
    """``(text, reasoning, reasoning_details, tool_calls, answered_by_tool)`` of a message's
    content blocks. A call of ``forced_tool`` is the JSON answer: its input becomes the text."""
    texts: list[str] = []
    thoughts: list[str] = []
    details: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    answer: str | None = None
    for block in content:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind in THINKING_TYPES:
            details.append(_thinking_block(block))
            if kind == "thinking":
                thoughts.append(block.get("thinking") or "")
        elif kind == "tool_use":
            arguments = _dump_arguments(block.get("input"))
            if forced_tool is not None and block.get("name") == forced_tool and answer is None:
                answer = arguments
            else:
                calls.append(ToolCall(id=block.get("id") or "", name=block.get("name") or "", arguments=arguments))
    text = answer if answer is not None else "".join(texts)
    return text, "".join(thoughts) or None, details or None, calls, answer is not None


def _dump_arguments(value: Any) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):  # a streamed input that is not valid JSON: keep it as sent
        return value
    return json.dumps(value, ensure_ascii=False)


def finish_reason_of(stop_reason: str | None, answered_by_tool: bool = False) -> str | None:
    if answered_by_tool and stop_reason == "tool_use":
        return "stop"  # the forced JSON tool is how the answer arrived, not a call to run
    return _FINISH.get(stop_reason or "", stop_reason)


def usage_of(usage: Mapping[str, Any] | None) -> Usage:
    """Anthropic's ``input_tokens`` excludes cache reads and writes; ours includes both."""
    usage = usage or {}
    read = usage.get("cache_read_input_tokens") or 0
    write = usage.get("cache_creation_input_tokens") or 0
    details = usage.get("output_tokens_details") or {}
    return Usage(
        input_tokens=(usage.get("input_tokens") or 0) + read + write,
        output_tokens=usage.get("output_tokens") or 0,
        cached_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=details.get("thinking_tokens") or 0,
    )


class MessageAccumulator:
    """Rebuilds the message a stream describes, as the non-streaming API would have sent it.

    ``feed`` takes each event as a dict and returns the text or thinking delta it carries."""

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.complete = False
        self._json: dict[int, list[str]] = {}

    def feed(self, event: Mapping[str, Any]) -> StreamDelta | None:
        kind = event.get("type")
        if kind == "message_start":
            start = event.get("message") or {}
            self.message = {**start, "content": [], "usage": dict(start.get("usage") or {})}
            return None
        if self.message is None:
            raise ValueError(f"stream event {kind!r} before message_start")
        content: list[dict[str, Any]] = self.message["content"]
        if kind == "content_block_start":
            index = event.get("index", len(content))
            content.extend({} for _ in range(index + 1 - len(content)))
            content[index] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta":
            return self._delta(content[event["index"]], event["index"], event.get("delta") or {})
        elif kind == "content_block_stop":
            pieces = self._json.pop(event.get("index", -1), None)
            if pieces is not None:
                content[event["index"]]["input"] = _parse_input("".join(pieces))
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            for key in ("stop_reason", "stop_sequence", "stop_details"):
                if key in delta:
                    self.message[key] = delta[key]
            # Counts on message_delta are cumulative: they replace, and absent ones keep the
            # value from message_start.
            self.message["usage"].update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            self.complete = True
        return None

    def _delta(self, block: dict[str, Any], index: int, delta: Mapping[str, Any]) -> StreamDelta | None:
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta.get("text", "")
            return StreamDelta(text=delta.get("text", ""))
        if kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            return StreamDelta(reasoning=delta.get("thinking", ""))
        if kind == "signature_delta":
            block["signature"] = block.get("signature", "") + delta.get("signature", "")
        elif kind == "input_json_delta":
            self._json.setdefault(index, []).append(delta.get("partial_json", ""))
        return None


def _parse_input(text: str) -> Any:
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
