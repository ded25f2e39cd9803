"""JSON output: what ``response_format`` may be, and turning an answer into a dict.

``response_format`` may be ``None`` or ``{"type": "json_object"}`` (JSON mode), a JSON schema
(bare, or OpenAI's ``{"type": "json_schema", "json_schema": {...}}``), or a pydantic model
class. Parsing repairs what models commonly get wrong (code fences, prose around the object,
trailing commas) before the caller re-asks the model.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from datus.models.generation import JsonFormat

__all__ = ["JsonOutputInvalid", "normalize_response_format", "parse_json_output"]


class JsonOutputInvalid(ValueError):
    """The answer is not the JSON asked for; the message says why (it is shown to the model
    when re-asking)."""


def normalize_response_format(response_format: Any) -> JsonFormat:
    if response_format is None:
        return JsonFormat()
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        return JsonFormat(
            schema=response_format.model_json_schema(),
            name=response_format.__name__,
            pydantic_model=response_format,
        )
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object" and len(response_format) == 1:
            return JsonFormat()
        if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            spec = response_format["json_schema"]
            if not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format json_schema needs a 'schema' object")
            return JsonFormat(schema=spec["schema"], name=spec.get("name", "response"),
                              strict=bool(spec.get("strict", False)))
        if "properties" in response_format or kind == "object":
            return JsonFormat(schema=response_format, name=response_format.get("title", "response"))
    raise ValueError(
        "response_format must be None, {'type': 'json_object'}, a JSON schema of an object, "
        f"{{'type': 'json_schema', 'json_schema': {{...}}}} or a pydantic model class; got {response_format!r}"
    )


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _candidates(text: str) -> list[str]:
    stripped = text.strip()
    found = [stripped]
    found += [match.strip() for match in _FENCE.findall(stripped)]
    start, end = stripped.find("{"), stripped.rfind("}")
    if 0 <= start < end:
        found.append(stripped[start : end + 1])
    found += [_TRAILING_COMMA.sub(r"\1", candidate) for candidate in list(found)]
    return list(dict.fromkeys(found))


def parse_json_output(text: str, fmt: JsonFormat) -> dict[str, Any]:
    """The answer as a dict, validated against the schema or pydantic model if one was asked
    for; raises ``JsonOutputInvalid``."""
    value: Any = None
    error = "the answer is empty" if not text.strip() else "the answer is not valid JSON"
    for candidate in _candidates(text):
        try:
            value = json.loads(candidate)
            break
        except json.JSONDecodeError as exc:
            error = f"the answer is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    else:
        raise JsonOutputInvalid(error)
    if not isinstance(value, dict):
        raise JsonOutputInvalid(f"expected a JSON object, got {type(value).__name__}")
    if fmt.pydantic_model is not None:
        try:
            return fmt.pydantic_model.model_validate(value).model_dump(mode="json")
        except ValidationError as exc:
            raise JsonOutputInvalid(f"the JSON does not match {fmt.name}: {exc}") from None
    if fmt.schema is not None:
        import jsonschema  # only needed when a raw schema is given

        try:
            jsonschema.validate(value, fmt.schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(part) for part in exc.absolute_path) or "(root)"
            raise JsonOutputInvalid(f"the JSON does not match the schema at {where}: {exc.message}") from None
        except jsonschema.SchemaError as exc:
            raise ValueError(f"response_format schema is not a valid JSON schema: {exc.message}") from None
    return value
