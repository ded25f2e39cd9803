"""Size caps on what a run hands on: a tool's answer on its way into the model's context, and
any JSON document (a step, an event, a checkpoint row) on its way to a store or a reader.

``cap_text(text, limit)``: a text longer than ``limit`` characters is cut to its first
``limit`` characters followed by a marker the model can read and act on::

    [truncated: 65536 of 5242880 characters; narrow the query]

``shrink_json(value, max_bytes)``: a JSON-ready value (dicts, lists, strings, numbers) whose
UTF-8 JSON is larger than ``max_bytes`` is shrunk until it fits: long strings are cut (each
with a ``[truncated: ...]`` marker), long lists and dicts keep their first items and say how
many there were. The value keeps its shape wherever it can; only as a last resort is it
replaced by a preview string. Neither function raises on any JSON-ready input.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DEFAULT_TOOL_RESULT_CHARS", "cap_text", "json_bytes", "shrink_json", "truncation_marker"]

DEFAULT_TOOL_RESULT_CHARS = 65_536  # 64 Ki characters of a tool's answer reach the model


def truncation_marker(kept: int, total: int, unit: str = "characters", hint: str = "narrow the query") -> str:
    return f"[truncated: {kept} of {total} {unit}" + (f"; {hint}]" if hint else "]")


def cap_text(text: str, limit: int | None) -> tuple[str, int | None]:
    """(``text``, None) when it fits in ``limit`` characters (None: no cap); else (its first
    ``limit`` characters and the marker, the original length)."""
    if limit is None or len(text) <= limit:
        return text, None
    limit = max(0, int(limit))
    return f"{text[:limit]}\n{truncation_marker(limit, len(text))}", len(text)


def json_bytes(value: Any) -> int:
    """The size of ``value`` as compact UTF-8 JSON (what a store or Redis keeps)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8",
                                                                                                "surrogatepass"))


def shrink_json(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """(``value``, False) when its JSON fits in ``max_bytes``; else (a smaller copy that fits,
    True). Strings longer than a per-string budget are cut, lists and dicts keep their first
    items; the budget halves until the copy fits."""
    if json_bytes(value) <= max_bytes:
        return value, False
    chars = max(64, max_bytes // 2)
    items = max(8, max_bytes // 64)
    while chars > 16 or items > 1:
        shrunk = _shrink(value, chars, items)
        if json_bytes(shrunk) <= max_bytes:
            return shrunk, True
        chars, items = max(16, chars // 2), max(1, items // 2)
    # nothing left to cut but structure: a preview of the whole value as text
    text = json.dumps(value, ensure_ascii=False, default=str)
    room = max(0, max_bytes // 4 - 64)
    preview, _ = cap_text(text, room)
    while json_bytes(preview) > max_bytes and room > 0:
        room //= 2
        preview, _ = cap_text(text, room)
    return preview, True


def _shrink(value: Any, chars: int, items: int) -> Any:
    if isinstance(value, str):
        if len(value) <= chars:
            return value
        return f"{value[:chars]}…{truncation_marker(chars, len(value), hint='')}"
    if isinstance(value, dict):
        kept = list(value.items())
        out = {str(key): _shrink(item, chars, items) for key, item in kept[:max(items, 1)]}
        if len(kept) > items:
            out["…"] = truncation_marker(items, len(kept), "keys", hint="")
        return out
    if isinstance(value, (list, tuple)):
        out_list = [_shrink(item, chars, items) for item in value[:items]]
        if len(value) > items:
            out_list.append(truncation_marker(items, len(value), "items", hint=""))
        return out_list
    return value
