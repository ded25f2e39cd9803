"""Datus's plain calls: generate, JSON output, token counts, budgets."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from datus.models.base import LLMBaseModel
from datus.models.scripted import Reply
from datus.testing.fake_server import FakeProviderServer

PROVIDERS = ["deepseek", "qwen", "anthropic", "openai-4o-mini", "gemini-2.5"]


@pytest.mark.parametrize("name", PROVIDERS)
def test_probe_generate_returns_text(datus_config: Any, name: str) -> None:
    """datus/agent/agent.py:167-172 (probe_llm): generate("Hello, can you hear me?") -> str."""
    reply = LLMBaseModel.create_model(model_name=name, agent_config=datus_config).generate("Hello, can you hear me?")
    assert isinstance(reply, str) and "Hello, can you hear me?" in reply


def test_generate_with_messages_and_temperature(datus_config: Any, server: FakeProviderServer) -> None:
    """tools/llms_tools/match_schema.py:188: generate([system, user], temperature=0.3)."""
    model = LLMBaseModel.create_model(datus_config)
    messages = [{"role": "system", "content": "You match schemas."}, {"role": "user", "content": "tables?"}]
    assert "tables?" in model.generate(messages, temperature=0.3)
    body = server.requests[-1].body
    assert body["temperature"] == 0.3 and [m["role"] for m in body["messages"]] == ["system", "user"]


@pytest.mark.parametrize("name", ["deepseek", "anthropic", "gemini-2.5", "openai-4o-mini", "qwen"])
def test_token_budget_is_numeric_for_every_provider(datus_config: Any, name: str) -> None:
    """match_schema.py:193-194: token_count(str(messages)) compared with max_tokens() (Datus's
    ClaudeModel has no max_tokens(): its callers crash; ours has it everywhere);
    agentic_node.py:84,214-220,304-312: context_length() budgets a session."""
    model = LLMBaseModel.create_model(model_name=name, agent_config=datus_config)
    prompt = str([{"role": "user", "content": "x " * 500}])
    assert isinstance(model.token_count(prompt), int) and model.token_count(prompt) > 0
    assert isinstance(model.max_tokens(), int) and 0 < model.max_tokens() < model.context_length()


@pytest.mark.parametrize("prompt", [
    "Return the SQL as JSON",  # reflect.py:44, selection_node.py:187, date_parser.py:73,141 pass a str
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "SQL?"}],  # generate_sql_node.py:268
])
def test_json_output_is_a_dict(datus_config: Any, server: FakeProviderServer, prompt: Any) -> None:
    """CP-6: every site calls generate_with_json_output(prompt) without options and reads keys
    with .get (generate_sql_node.py:268-290 "sql", "tables", "explanation")."""
    answer = {"sql": "SELECT 1", "tables": ["t"], "explanation": "one"}
    server.script.add(Reply(text=json.dumps(answer)))
    result = LLMBaseModel.create_model(datus_config).generate_with_json_output(prompt)
    assert isinstance(result, dict) and result.get("sql") == "SELECT 1" and result.get("tables") == ["t"]


def test_json_output_with_a_temperature(datus_config: Any, server: FakeProviderServer) -> None:
    """tests/test_other_models.py:61: generate_with_json_output(prompt, temperature=0.1)."""
    server.script.add(Reply(text='{"greeting": "hello"}'))
    model = LLMBaseModel.create_model(datus_config, "openai-4o-mini")
    assert model.generate_with_json_output("Respond with JSON", temperature=0.1) == {"greeting": "hello"}


def test_json_output_in_fences_is_still_a_dict(datus_config: Any, server: FakeProviderServer) -> None:
    """Datus's callers strip ```json fences themselves when they get a str (generate_sql_node.py:
    271-279); this layer returns the dict, so that branch is never needed."""
    server.script.add(Reply(text='```json\n{"classification": "DONE"}\n```'))
    result = LLMBaseModel.create_model(datus_config).generate_with_json_output("classify")
    assert result.get("classification") == "DONE"


def test_concurrent_sync_calls_from_threads(datus_config: Any) -> None:
    """match_schema.py:213-224 runs generate() on one model object from a ThreadPoolExecutor."""
    model = LLMBaseModel.create_model(datus_config)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: model.generate(f"part {i}"), range(16)))
    assert all(f"part {i}" in reply for i, reply in enumerate(replies))


def test_sync_json_call_from_inside_a_running_event_loop(datus_config: Any, server: FakeProviderServer) -> None:
    """tools/func_tool/date_parsing_tools.py:22-25,68: a function tool, run inside a tool run's
    event loop, calls the model's sync generate_with_json_output (date_parser.py:73)."""
    server.script.add(Reply(text='{"dates": []}'))
    model = LLMBaseModel.create_model(datus_config)

    async def tool_body() -> dict[str, Any]:
        return model.generate_with_json_output("extract the dates")

    assert asyncio.run(tool_body()) == {"dates": []}


def test_thinking_switch_on_generate(datus_config: Any, server: FakeProviderServer) -> None:
    """tests/test_deepseek_model.py:45 generate(..., enable_thinking=True, max_tokens=1000);
    test_qwen_model.py:76-87 the same with enable_thinking True and False."""
    qwen = LLMBaseModel.create_model(datus_config, "qwen")
    for flag in (True, False):
        assert qwen.generate("Think step by step", enable_thinking=flag, temperature=0.1, max_tokens=300)
        assert server.requests[-1].body.get("enable_thinking") is flag
    reasoner = LLMBaseModel.create_model(datus_config, "deepseek-r1")
    assert reasoner.generate("what's deepseek r1", enable_thinking=True, max_tokens=1000)
