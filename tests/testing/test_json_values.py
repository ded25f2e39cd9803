"""Unit tests of `datus.testing.json_values`: the keys a prompt names, and values valid for
the three schema dialects the providers send."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from datus.testing.json_values import instance_of, keys_named_in, needs_input, wants_json


@pytest.mark.parametrize(("text", "keys"), [
    ("Respond with a JSON object containing 'greeting': 'hello'", {"greeting": "hello"}),
    ("containing 'message': 'hello' and 'language': 'en'", {"message": "hello", "language": "en"}),
    (("You are a helpful assistant. Respond in JSON format with 'question' and 'answer' fields.\n"
      "How many r's are in 'strawberry'?"), {"question": None, "answer": None}),
    # a template's placeholders name keys, not values
    ('Output format: {\n "sql": "SELECT ...",\n "result": "Query results...",\n "explanation": "..."\n}',
     {"sql": None, "result": None, "explanation": None}),
    ("Show me all the tables in the database", {}),
])
def test_keys_named_in_prompts(text: str, keys: dict[str, Any]) -> None:
    assert keys_named_in(text) == keys


def test_wants_json_needs_the_word() -> None:
    assert wants_json("Respond in JSON format") and not wants_json("Respond with the jsonschema library")


STRICT = {"type": "object", "additionalProperties": False,
          "properties": {"table_name": {"type": "string"},
                         "catalog": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": ""},
                         "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                         "include_views": {"type": ["boolean", "null"], "default": True}},
          "required": ["table_name", "catalog", "limit", "include_views"]}


def test_strict_schemas_get_defaults_nulls_and_invented_values_only_where_needed() -> None:
    assert needs_input(STRICT) == ["table_name"]
    value = instance_of(STRICT)
    jsonschema.validate(value, STRICT)
    assert value == {"table_name": "table_name", "catalog": "", "limit": None, "include_views": True}
    chosen = instance_of(STRICT, lambda name, schema: "orders" if name == "table_name" else None)
    assert chosen["table_name"] == "orders"


def test_gemini_openapi_schemas_are_read_like_json_schema() -> None:
    schema = {"type": "OBJECT", "required": ["sql", "rows", "ok", "kind"],
              "properties": {"sql": {"type": "STRING"}, "rows": {"type": "INTEGER", "minimum": 3},
                             "ok": {"type": "BOOLEAN"}, "kind": {"type": "STRING", "enum": ["a", "b"]},
                             "note": {"type": "STRING", "nullable": True},
                             "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "minItems": 2}}}
    assert instance_of(schema) == {"sql": "sql", "rows": 3, "ok": True, "kind": "a"}
    assert needs_input({**schema, "required": ["note", "sql"]}) == ["sql"]
