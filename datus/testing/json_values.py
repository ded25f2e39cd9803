"""Values a plausible model would write: a JSON object with the keys a prompt names, and
arguments that satisfy a tool's JSON schema.

Used by the fake server's ``agent`` fallback (`datus.testing.agent_fallback`). Schemas come in
three dialects — JSON Schema (OpenAI, Anthropic, Gemini's ``parametersJsonSchema``), its
strict variant where every property is required but may be null, and Gemini's OpenAPI
subset (upper-case ``type`` names, ``nullable``) — and are read alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["instance_of", "is_nullable", "keys_named_in", "needs_input", "wants_json"]

# 'key': 'value' / "key": "value" pairs, as in "a JSON object containing 'greeting': 'hello'"
_PAIR = re.compile(r"""(['"])([A-Za-z_][\w ]{0,40}?)\1\s*:\s*(['"])(.*?)\3""")
# a quoted identifier: 'question', "answer"; a quote inside a word (r's) is not an opening
_QUOTED = re.compile(r"""(?<![\w'"])(['"])([A-Za-z_]\w{0,40})\1(?![\w'"])""")
# a JSON-ish template key: `"sql": "SELECT ..."`
_TEMPLATE_KEY = re.compile(r""""([A-Za-z_]\w{0,40})"\s*:""")
_PLACEHOLDER = re.compile(r"\.\.\.|\u2026")
_JSON_WORD = re.compile(r"\bjson\b", re.IGNORECASE)
_KEY_CONTEXT = re.compile(r"\b(json|fields?|keys?|properties|containing|format)\b", re.IGNORECASE)


def wants_json(text: str) -> bool:
    """Does a prompt ask for JSON in so many words?"""
    return bool(_JSON_WORD.search(text))


def keys_named_in(text: str) -> dict[str, Any]:
    """The keys (with values, where given) a prompt asks a JSON answer to hold, in order:
    ``'greeting': 'hello'`` pairs, template keys (``{"sql": "...", ...}``), and quoted names
    in a sentence about the format (``with 'question' and 'answer' fields``)."""
    found: dict[str, Any] = {}
    for _, key, _, value in _PAIR.findall(text):
        # a template's placeholder ("SELECT ...") names the key, not its value
        found.setdefault(key.strip(), None if _PLACEHOLDER.search(value) or not value.strip() else value)
    for key in _TEMPLATE_KEY.findall(text):
        found.setdefault(key, None)
    for sentence in re.split(r"(?<=[.!?\n])\s+", text):
        if _KEY_CONTEXT.search(sentence):
            for _, key in _QUOTED.findall(sentence):
                if key not in found.values():  # a quoted value is not a key
                    found.setdefault(key, None)
    return found


def _type_of(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    return [str(item).lower() for item in kinds]


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for key in ("anyOf", "oneOf", "any_of") for item in schema.get(key) or [] if isinstance(item, dict)]


def is_nullable(schema: dict[str, Any]) -> bool:
    return ("null" in _type_of(schema) or bool(schema.get("nullable"))
            or any("null" in _type_of(variant) for variant in _variants(schema)))


def needs_input(schema: dict[str, Any]) -> list[str]:
    """The required properties a caller must invent a value for: neither defaulted nor
    nullable (strict schemas list every property as required, defaults included)."""
    properties = schema.get("properties") or {}
    return [name for name in schema.get("required") or []
            if not (isinstance(properties.get(name), dict)
                    and ("default" in properties[name] or is_nullable(properties[name])))]


Chooser = Callable[[str, dict[str, Any]], Any]  # (property name, its schema) -> a value, or None for "no idea"


def instance_of(schema: dict[str, Any], choose: Chooser | None = None, name: str = "", depth: int = 0) -> Any:
    """A value valid for ``schema``: defaults and enums as given, ``choose(name, schema)`` for
    anything else it has an answer for, then a short value of the right type. Optional
    properties of an object are left out unless ``choose`` has a value; required ones are
    always there (null where nullable and nothing better is known)."""
    chosen = choose(name, schema) if choose is not None and name else None
    if chosen is not None:
        return chosen
    if "const" in schema:
        return schema["const"]
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    variants = [variant for variant in _variants(schema) if "null" not in _type_of(variant)]
    if variants:
        return instance_of(variants[0], choose, name, depth + 1)
    kinds = [kind for kind in _type_of(schema) if kind != "null"]
    kind = kinds[0] if kinds else ("object" if "properties" in schema else "null" if _type_of(schema) else "string")
    if kind == "object":
        return _object_of(schema, choose, depth)
    if kind == "array":
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        count = int(schema.get("minItems") or 0)
        return [instance_of(items, choose, name, depth + 1) for _ in range(count)] if depth < 6 else []
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = max(1, int(low) + (1 if "exclusiveMinimum" in schema else 0))
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = f"{name or 'value'}"
    return text.ljust(int(schema.get("minLength") or 0), "x")


def _object_of(schema: dict[str, Any], choose: Chooser | None, depth: int) -> dict[str, Any]:
    if depth >= 6:
        return {}
    properties: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    out: dict[str, Any] = {}
    for key, sub in properties.items():
        sub = sub if isinstance(sub, dict) else {}
        if key in required:
            out[key] = None if (is_nullable(sub) and "default" not in sub and not _knows(choose, key, sub)) \
                else instance_of(sub, choose, key, depth + 1)
        elif _knows(choose, key, sub):
            out[key] = instance_of(sub, choose, key, depth + 1)
    return out


def _knows(choose: Chooser | None, key: str, schema: dict[str, Any]) -> bool:
    return choose is not None and choose(key, schema) is not None
