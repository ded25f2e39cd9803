"""The fake server's ``agent`` fallback through the official SDKs (openai, anthropic,
google-genai): JSON with the keys a prompt names, schema-valid JSON and tool arguments, and a
tool run that lists tables, queries a real SQLite database and then answers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from google import genai
from google.genai import types

from datus.models.scripted import Reply
from datus.testing.fake_server import FakeProviderServer, answer_to_json

# Datus-agent's tools as openai-agents hands them over: strict schemas, every property
# required, the optional ones nullable with a default (callsites.md §8)
NULLABLE_TEXT = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": ""}
LIST_TABLES = {"type": "object", "additionalProperties": False,
               "properties": {"catalog": NULLABLE_TEXT, "database": NULLABLE_TEXT, "schema_name": NULLABLE_TEXT,
                              "include_views": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": True}},
               "required": ["catalog", "database", "schema_name", "include_views"]}
DESCRIBE_TABLE = {"type": "object", "additionalProperties": False,
                  "properties": {"table_name": {"type": "string"}, "catalog": NULLABLE_TEXT},
                  "required": ["table_name", "catalog"]}
READ_QUERY = {"type": "object", "additionalProperties": False, "properties": {"sql": {"type": "string"}},
              "required": ["sql"]}
SCHEMAS = {"describe_table": DESCRIBE_TABLE, "read_query": READ_QUERY, "list_tables": LIST_TABLES}
WRITE_QUERY = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}


def openai_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, "description": name.replace("_", " "),
                                              "parameters": schema, "strict": True}}
            for name, schema in SCHEMAS.items()]


@pytest.fixture
def agent_server(fake_agent_server: FakeProviderServer) -> FakeProviderServer:
    assert fake_agent_server.fallback_name == "agent"
    return fake_agent_server


@pytest.fixture
def shop_db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with sqlite3.connect(tmp_path / "shop.db") as db:
        db.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
                         "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL);"
                         "INSERT INTO customers VALUES (1, 'Ann'), (2, 'Bo');"
                         "INSERT INTO orders VALUES (1, 1, 9.5), (2, 1, 3.0), (3, 2, 7.25);")
        yield db


def run_tool(db: sqlite3.Connection, name: str, arguments: dict[str, Any], *, python_repr: bool = False) -> str:
    """Datus's tools, for real: the result dict, sent back as openai-agents does (``str``) or as JSON."""
    jsonschema.validate(arguments, SCHEMAS[name])  # every call the fake makes is schema-valid
    if name == "list_tables":
        rows = db.execute("SELECT type, name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
        result: Any = [{"type": kind, "name": table} for kind, table in rows]
    elif name == "read_query":
        cursor = db.execute(arguments["sql"])
        result = {"original_columns": [column[0] for column in cursor.description], "rows": cursor.fetchall()}
    else:
        result = {"columns": db.execute("SELECT name FROM pragma_table_info(?)", (arguments["table_name"],)).fetchall()}
    answer = {"success": 1, "error": None, "result": result}
    return str(answer) if python_repr else json.dumps(answer)


def openai_client(server: FakeProviderServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)


def ask_json(server: FakeProviderServer, messages: list[dict[str, Any]], **options: Any) -> Any:
    completion = openai_client(server).chat.completions.create(model="deepseek-chat", messages=messages, **options)
    return json.loads(completion.choices[0].message.content or "")


def openai_tool_run(server: FakeProviderServer, db: sqlite3.Connection, question: str, *, stream: bool = False,
                    python_repr: bool = False, history: list[dict[str, Any]] | None = None
                    ) -> tuple[list[tuple[str, dict[str, Any]]], str, list[dict[str, Any]]]:
    """The loop an agent runner drives: ask, run the tools asked for, ask again, until text."""
    client = openai_client(server)
    messages = [*(history or [{"role": "system", "content": "You are a SQLite expert."}]),
                {"role": "user", "content": question}]
    calls: list[tuple[str, dict[str, Any]]] = []
    for _ in range(6):
        if stream:
            text, requested = "", {}
            for chunk in client.chat.completions.create(model="gpt-4o", messages=messages, tools=openai_tools(),
                                                        stream=True):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    for call in choice.delta.tool_calls or []:
                        slot = requested.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] += call.id or ""
                        slot["name"] += call.function.name or "" if call.function else ""
                        slot["arguments"] += call.function.arguments or "" if call.function else ""
            tool_calls = list(requested.values())
        else:
            message = client.chat.completions.create(model="gpt-4o", messages=messages,
                                                     tools=openai_tools()).choices[0].message
            text = message.content or ""
            tool_calls = [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
                          for call in message.tool_calls or []]
        if not tool_calls:
            return calls, text, messages + [{"role": "assistant", "content": text}]
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            for call in tool_calls]})
        for call in tool_calls:
            arguments = json.loads(call["arguments"])
            calls.append((call["name"], arguments))
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": run_tool(db, call["name"], arguments, python_repr=python_repr)})
    raise AssertionError(f"the tool run did not end: {calls}")


# -- JSON ------------------------------------------------------------------------------------

DATUS_JSON_PROMPTS = [  # Datus-agent's model tests, and what they assert
    ([{"role": "user", "content": "Respond with a JSON object containing 'greeting': 'hello'"}], {"greeting": "hello"}),
    ([{"role": "user", "content": "Respond with a JSON object containing 'message': 'hello' and 'language': 'en'"}],
     {"message": "hello", "language": "en"}),
    ([{"role": "user", "content": "Respond with a JSON object containing 'response': 'hello world'"}],
     {"response": "hello world"}),
    ([{"role": "system", "content": "You are a helpful assistant. Respond in JSON format with 'question' and 'answer' "
                                    "fields."},
      {"role": "user", "content": "How many r's are in 'strawberry'?"}], {"question": None, "answer": None}),
]


@pytest.mark.parametrize(("messages", "expected"), DATUS_JSON_PROMPTS)
def test_json_mode_answers_with_the_keys_the_prompt_names(agent_server: FakeProviderServer,
                                                          messages: list[dict[str, Any]],
                                                          expected: dict[str, Any]) -> None:
    answer = ask_json(agent_server, messages, response_format={"type": "json_object"})
    assert set(answer) == set(expected)
    assert {key: value for key, value in answer.items() if expected[key] is not None} == \
        {key: value for key, value in expected.items() if value is not None}
    assert all(isinstance(value, str) and value for value in answer.values())


def test_a_prompt_asking_for_json_gets_json_without_a_response_format(agent_server: FakeProviderServer) -> None:
    messages = [{"role": "user", "content": "Respond with a JSON object containing a greeting message"}]
    answer = ask_json(agent_server, messages)
    assert isinstance(answer, dict) and answer


def test_json_schema_answers_are_valid_for_the_schema(agent_server: FakeProviderServer) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["sql", "tables", "confidence", "kind"],
              "properties": {"sql": {"type": "string"}, "tables": {"type": "array", "items": {"type": "string"}},
                             "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                             "kind": {"enum": ["select", "update"]}}}
    answer = ask_json(agent_server, [{"role": "user", "content": "Write the query."}],
                      response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                              "strict": True}})
    jsonschema.validate(answer, schema)
    assert answer["sql"].startswith("SELECT")


# -- tool runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("python_repr", [False, True], ids=["json-results", "python-repr-results"])
def test_openai_tool_run_lists_tables_then_queries_then_answers(agent_server: FakeProviderServer,
                                                                shop_db: sqlite3.Connection,
                                                                python_repr: bool) -> None:
    calls, text, _ = openai_tool_run(agent_server, shop_db, "How many rows are in the orders table?",
                                     python_repr=python_repr)
    assert calls == [("list_tables", {"catalog": "", "database": "", "schema_name": "", "include_views": True}),
                     ("read_query", {"sql": "SELECT COUNT(*) AS row_count FROM orders"})]
    assert "SELECT COUNT(*) AS row_count FROM orders" in text and "3" in text


def test_streaming_and_plain_tool_runs_make_the_same_calls(agent_server: FakeProviderServer,
                                                            shop_db: sqlite3.Connection) -> None:
    question = "Show a few customers"
    plain = openai_tool_run(agent_server, shop_db, question)
    streamed = openai_tool_run(agent_server, shop_db, question, stream=True)
    assert streamed[0] == plain[0] == [("list_tables", plain[0][0][1]),
                                       ("read_query", {"sql": "SELECT * FROM customers LIMIT 5"})]
    assert streamed[1] == plain[1]


def test_every_user_turn_gets_its_own_tool_calls(agent_server: FakeProviderServer,
                                                 shop_db: sqlite3.Connection) -> None:
    _, _, history = openai_tool_run(agent_server, shop_db, "Show me all the tables in the database")
    calls, text, _ = openai_tool_run(agent_server, shop_db, "Count the rows in the customers table", history=history)
    assert [name for name, _ in calls] == ["list_tables", "read_query"]
    assert calls[1][1] == {"sql": "SELECT COUNT(*) AS row_count FROM customers"}
    assert "2" in text


def test_a_final_answer_follows_an_output_template_in_the_instructions(agent_server: FakeProviderServer,
                                                                        shop_db: sqlite3.Connection) -> None:
    template = 'Output format: {\n  "sql": "SELECT ...",\n  "result": "Query results...",\n  "explanation": "..."\n}'
    history = [{"role": "system", "content": "You are a SQLite expert.\n" + template}]
    calls, text, _ = openai_tool_run(agent_server, shop_db, "Count the orders", history=history)
    answer = json.loads(text)
    assert set(answer) == {"sql", "result", "explanation"}
    assert answer["sql"] == calls[-1][1]["sql"]


def test_sql_tools_that_write_are_never_called(agent_server: FakeProviderServer) -> None:
    tools = [{"type": "function", "function": {"name": "write_query", "parameters": WRITE_QUERY}},
             {"type": "function", "function": {"name": "read_query", "parameters": READ_QUERY}}]
    message = openai_client(agent_server).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "What is in the database?"}],
        tools=tools).choices[0].message
    assert [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []] == \
        [("read_query", {"sql": "SELECT 1"})]
    assert message.content == 'Let me use read_query ({"sql": "SELECT 1"}).'  # a word beside the call


def test_tool_choice_none_and_plain_prompts_get_the_echo(agent_server: FakeProviderServer) -> None:
    client = openai_client(agent_server)
    messages = [{"role": "user", "content": "Hello"}]
    message = client.chat.completions.create(model="gpt-4o", messages=messages, tools=openai_tools(),
                                             tool_choice="none").choices[0].message
    assert message.tool_calls is None and message.content == "echo: Hello"
    assert client.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message.content == "echo: Hello"


def test_anthropic_forced_tool_and_tool_loop(agent_server: FakeProviderServer, shop_db: sqlite3.Connection) -> None:
    client = anthropic.Anthropic(base_url=agent_server.url, api_key="sk-ant-test", max_retries=0)
    schema = {"type": "object", "required": ["sql", "explanation"],
              "properties": {"sql": {"type": "string"}, "explanation": {"type": "string"}}}
    forced = client.messages.create(model="claude-sonnet-4-5", max_tokens=200, messages=[
        {"role": "user", "content": "Answer with 'sql' and 'explanation' fields"}],
        tools=[{"name": "answer", "input_schema": schema}], tool_choice={"type": "tool", "name": "answer"})
    assert [block.type for block in forced.content] == ["tool_use"] and forced.content[0].name == "answer"
    jsonschema.validate(forced.content[0].input, schema)

    tools = [{"name": name, "description": name, "input_schema": schema} for name, schema in SCHEMAS.items()]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "How many customers are there?"}]
    calls = []
    while True:
        reply = client.messages.create(model="claude-sonnet-4-5", max_tokens=500, messages=messages, tools=tools)
        uses = [block for block in reply.content if block.type == "tool_use"]
        if reply.stop_reason != "tool_use":
            break
        calls += [(block.name, block.input) for block in uses]
        messages += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in reply.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                                   "content": run_tool(shop_db, block.name, block.input)}
                                                  for block in uses]}]
    assert [name for name, _ in calls] == ["list_tables", "read_query"]
    assert calls[1][1] == {"sql": "SELECT COUNT(*) AS row_count FROM customers"}
    assert reply.content[0].type == "text" and "read_query" in reply.content[0].text


def test_thinking_requests_get_reasoning_that_replays(agent_server: FakeProviderServer,
                                                      shop_db: sqlite3.Connection) -> None:
    reasoner = openai_client(agent_server).chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "Hello"}]).choices[0].message
    assert reasoner.content == "echo: Hello"  # a plain prompt stays the echo, without reasoning
    qwen = openai_client(agent_server).chat.completions.create(
        model="qwen-plus", messages=[{"role": "user", "content": "Answer in JSON with 'a': 'b'"}],
        extra_body={"enable_thinking": True}).choices[0].message
    assert json.loads(qwen.content or "") == {"a": "b"} and (qwen.model_extra or {})["reasoning_content"]

    client = anthropic.Anthropic(base_url=agent_server.url, api_key="sk-ant-test", max_retries=0)
    tools = [{"name": name, "input_schema": schema} for name, schema in SCHEMAS.items()]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "List the tables"}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    first = client.messages.create(model="claude-sonnet-4-5", max_tokens=2048, messages=messages, tools=tools,
                                   thinking=thinking)
    assert [block.type for block in first.content] == ["thinking", "text", "tool_use"]
    use = first.content[2]
    messages += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,  # type: ignore[union-attr]
                                               "content": run_tool(shop_db, use.name, use.input)}]}]  # type: ignore[union-attr]
    second = client.messages.create(model="claude-sonnet-4-5", max_tokens=2048, messages=messages, tools=tools,
                                    thinking=thinking)  # the fake checks the replayed signature
    assert [block.type for block in second.content] == ["thinking", "text", "tool_use"]


def test_gemini_json_and_function_calls(agent_server: FakeProviderServer, shop_db: sqlite3.Connection) -> None:
    client = genai.Client(api_key="gm-test", http_options=types.HttpOptions(base_url=agent_server.url,
                                                                            api_version="v1beta"))
    answer = client.models.generate_content(
        model="gemini-2.5-flash", contents="Respond with a JSON object containing 'response': 'hello world'",
        config=types.GenerateContentConfig(response_mime_type="application/json"))
    assert json.loads(answer.text or "") == {"response": "hello world"}

    declarations = [  # both schema spellings the SDK sends: JSON Schema and Gemini's OpenAPI subset
        types.FunctionDeclaration(name="list_tables", description="list tables", parameters_json_schema=LIST_TABLES),
        types.FunctionDeclaration(name="read_query", description="run SQL", parameters=types.Schema(
            type=types.Type.OBJECT, properties={"sql": types.Schema(type=types.Type.STRING)}, required=["sql"])),
    ]
    config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=declarations)],
                                         automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    contents = [types.Content(role="user", parts=[types.Part(text="Count the rows in the orders table")])]
    calls = []
    for _ in range(4):
        reply = client.models.generate_content(model="gemini-2.5-flash", contents=contents, config=config)
        if not reply.function_calls:
            break
        contents.append(reply.candidates[0].content)  # type: ignore[index]
        parts = []
        for call in reply.function_calls:
            calls.append((call.name, call.args))
            result = json.loads(run_tool(shop_db, str(call.name), dict(call.args or {})))
            parts.append(types.Part.from_function_response(name=str(call.name), response=result))
        contents.append(types.Content(role="user", parts=parts))
    assert calls == [("list_tables", {"catalog": "", "database": "", "schema_name": "", "include_views": True}),
                     ("read_query", {"sql": "SELECT COUNT(*) AS row_count FROM orders"})]
    assert "SELECT COUNT(*)" in (reply.text or "")


# -- choosing the fallback -------------------------------------------------------------------


def test_the_default_fallback_is_still_the_echo(fake_server: FakeProviderServer) -> None:
    completion = openai_client(fake_server).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Respond with JSON containing 'a': 'b'"}],
        response_format={"type": "json_object"}, tools=openai_tools())
    assert completion.choices[0].message.content == "echo: Respond with JSON containing 'a': 'b'"
    assert fake_server.fallback_name == "echo"


def test_scripted_answers_win_over_the_agent_fallback(agent_server: FakeProviderServer) -> None:
    agent_server.script.add(Reply(text="4"), match="3 apples", times=None)
    client = openai_client(agent_server)
    for question in ("If I have 3 apples and buy 1 more?", "Again: 3 apples and 1 more?"):
        answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": question}])
        assert answer.choices[0].message.content == "4"


def test_fallback_is_chosen_over_http_and_reset_restores_the_first(fake_server: FakeProviderServer) -> None:
    admin = httpx.Client(base_url=fake_server.url)
    assert admin.post("/_fake/script", json={"fallback": "agent"}).json() == {"pending": 0, "fallback": "agent"}
    assert admin.get("/_fake/health").json()["fallback"] == "agent"
    assert ask_json(fake_server, [{"role": "user", "content": "JSON with 'x': 'y'"}]) == {"x": "y"}
    bad = admin.post("/_fake/script", json={"fallback": "oracle"})
    assert bad.status_code == 400 and "echo, agent" in bad.json()["error"]
    admin.post("/_fake/script", json={"reset": True, "entries": [answer_to_json(Reply(text="scripted"))]})
    assert admin.get("/_fake/health").json()["fallback"] == "echo"
    with FakeProviderServer(fallback="agent") as started_as_agent:
        started_as_agent.set_fallback("echo")
        started_as_agent.reset()
        assert started_as_agent.fallback_name == "agent"


def test_command_line_fallback_flag() -> None:
    process = subprocess.Popen([sys.executable, "-m", "datus.testing.fake_server", "--port", "0", "--fallback", "agent"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("fake provider server listening on http://") and line.rstrip().endswith("(fallback: agent)")
        url = line.split()[5]
        assert httpx.get(url + "/_fake/health").json()["fallback"] == "agent"
    finally:
        process.terminate()
        process.wait(timeout=10)
