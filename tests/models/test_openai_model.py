"""OpenAIModel through the official `openai` SDK, over HTTP to the fake server.

The cases every OpenAI-style provider shares live in ``openai_style.py``; here are OpenAI's
own: reasoning models, native JSON schema, tiktoken counts, and the package-level promises
(no SDK at import, a provider added as the contributor guide shows). Cases marked
``acceptance`` also run live with ``DQ_LIVE=1`` and ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig, ModelConfig
from datus.models.openai_compatible import OpenAICompatibleModel
from datus.models.openai_model import OpenAIModel
from datus.models.scripted import Reply
from datus.models.tokens import ensure_tiktoken_cache
from datus.testing.fake_server import FakeProviderServer
from tests.models.openai_style import (
    KEY,
    OpenAIStyleSuite,
    Provider,
    SqlAnswer,
    Target,
    bodies,
    chat_requests,
    collect,
    make_model,
    schema_in_system_message,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiktoken_count(text: str, model: str) -> int:
    ensure_tiktoken_cache()  # offline: seeds tiktoken's cache from the shipped files
    import tiktoken

    try:
        encoding = tiktoken.encoding_for_model(model)
    except KeyError:  # the reference is tiktoken's own map; older tiktokens (0.9) lack newer models
        pytest.skip(f"tiktoken {tiktoken.__version__} maps no encoding to {model}: no reference to check against")
    # Special-token lookalikes in user text are plain text, as the API treats them.
    return len(encoding.encode(text, allowed_special=set(), disallowed_special=()))


OPENAI = Provider(
    name="openai",
    model_class=OpenAIModel,
    model="gpt-4o",
    key_envs=("OPENAI_API_KEY",),
    prices=(2.50, 10.00, 1.25),  # gpt-4o: input, output, cached input per MTok
    native_json_schema=True,
    reference_count=tiktoken_count,
)


class TestOpenAI(OpenAIStyleSuite):
    provider = OPENAI


# ---- reasoning models ------------------------------------------------------------------------


@pytest.fixture(params=["fake", "live"])
def target(request: pytest.FixtureRequest) -> Any:
    if request.param == "live":
        if not OPENAI.live:
            pytest.skip("live openai: set DQ_LIVE=1 and OPENAI_API_KEY")
        return Target(OPENAI, None)
    server = request.getfixturevalue("fake_server")
    server.api_key = KEY
    return Target(OPENAI, server)


@pytest.mark.acceptance
@pytest.mark.parametrize("name", ["o4-mini", "gpt-5"])
async def test_reasoning_models_send_max_completion_tokens_and_no_temperature(target: Target, name: str) -> None:
    target.script(Reply(text="pong", reasoning_tokens=64), Reply(text="pong"))
    model = target.model(model=name, temperature=0.3, top_p=0.9, max_tokens=2000)
    generation = await model.acomplete("Reply with exactly the word pong.", temperature=0.5, max_tokens=3000)
    _, streamed = await collect(model.astream("Reply with exactly the word pong."))
    assert "pong" in generation.text.lower() and "pong" in streamed.text.lower()
    if target.live:  # the live API rejects temperature on these models: reaching here proves it was not sent
        return
    assert generation.usage.reasoning_tokens == 64
    plain, stream = target.bodies()
    assert plain["model"] == name
    assert plain["max_completion_tokens"] == 3000 and stream["max_completion_tokens"] == 2000
    for body in (plain, stream):
        assert not {"max_tokens", "temperature", "top_p"} & set(body)


def test_reasoning_model_json_output_keeps_the_schema(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text='{"sql": "SELECT 1", "tables": []}'))
    model = make_model(OPENAI, fake_server, model="o4-mini", temperature=0.3, max_tokens=500)
    assert model.generate_with_json_output("q", SqlAnswer)["sql"] == "SELECT 1"
    [body] = bodies(fake_server)
    assert body["response_format"]["type"] == "json_schema" and body["max_completion_tokens"] == 500
    assert "temperature" not in body


def test_gpt5_chat_is_not_a_reasoning_model(fake_server: FakeProviderServer) -> None:
    make_model(OPENAI, fake_server, model="gpt-5-chat-latest").generate("q", temperature=0.4, max_tokens=10)
    [body] = bodies(fake_server)
    assert (body["temperature"], body["max_tokens"]) == (0.4, 10)


# ---- JSON forms ------------------------------------------------------------------------------


def test_json_mode_asks_for_json_object_and_says_so_in_the_prompt(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text='{"a": 1}'))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "q"}]
    assert make_model(OPENAI, fake_server).generate_with_json_output(messages, {"type": "json_object"}) == {"a": 1}
    [body] = bodies(fake_server)
    assert body["response_format"] == {"type": "json_object"}
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You are terse.")
    assert "JSON" in system["content"] and len(body["messages"]) == 2  # the hint joins the system message


def test_openai_json_schema_form_is_sent_as_given(fake_server: FakeProviderServer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    fake_server.script.add(Reply(text='{"n": 2}'))
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}}
    assert make_model(OPENAI, fake_server).generate_with_json_output("q", fmt) == {"n": 2}
    assert bodies(fake_server)[0]["response_format"] == fmt


def test_models_without_json_schema_fall_back_to_json_mode(fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text='{"sql": "SELECT 1", "tables": []}'))
    make_model(OPENAI, fake_server, model="gpt-4").generate_with_json_output("q", SqlAnswer)
    [body] = bodies(fake_server)
    assert body["response_format"] == {"type": "json_object"}
    assert schema_in_system_message(body) == SqlAnswer.model_json_schema()


# ---- client, tokens --------------------------------------------------------------------------


async def test_default_base_url_is_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    model = OpenAIModel(model_config=ModelConfig(type="openai", model="gpt-4o", api_key=KEY, timeout_s=42))
    client = model._create_client()
    try:
        assert str(client.base_url) == "https://api.openai.com/v1/"
        assert client.max_retries == 0 and client.timeout == 42  # retries are ours, never the SDK's
    finally:
        await client.close()


def test_base_url_from_config_is_used(fake_server: FakeProviderServer) -> None:
    make_model(OPENAI, fake_server).generate("hi")
    assert chat_requests(fake_server)[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("name", ["gpt-4o-mini", "gpt-4.1", "o4-mini", "gpt-5", "gpt-4", "gpt-3.5-turbo"])
def test_token_count_uses_the_models_own_encoding(name: str) -> None:
    model = make_model(OPENAI, None, model=name)
    for text in ("数据库查询：统计每个用户的订单数量", "SELECT * FROM t -- 👋🏽", "ünïcödé <|endoftext|> x" * 3):
        assert model.token_count(text) == tiktoken_count(text, name)
    # o200k and cl100k disagree on this text, so the right encoding must have been chosen
    assert tiktoken_count("数据库查询：统计每个用户的订单数量", "gpt-4o") != tiktoken_count(
        "数据库查询：统计每个用户的订单数量", "gpt-4")


# ---- the package -----------------------------------------------------------------------------


def test_importing_the_model_layer_imports_no_provider_sdk() -> None:
    code = (
        "import json, sys\n"
        "import datus.models, datus.models.openai_model, datus.models.deepseek_model, datus.models.qwen_model\n"
        "sdks = ('openai', 'anthropic', 'google.genai', 'tiktoken', 'mcp')\n"
        "print(json.dumps([name for name in sdks if name in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == []


# A provider written exactly as Datus's contributor guide ("Adding a New LLM Model") shows.
class NewModelModel(OpenAICompatibleModel):
    def __init__(self, model_config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(model_config, **kwargs)

    def _get_api_key(self) -> str:
        api_key = self.model_config.api_key or os.getenv("NEWMODEL_API_KEY")
        if not api_key:
            raise ValueError("NewModel API key must be provided or set as NEWMODEL_API_KEY environment variable")
        return api_key

    def _get_base_url(self) -> str | None:
        return self.model_config.base_url or "https://api.newmodel.com/v1"

    def token_count(self, prompt: str) -> int:
        return int(len(prompt) * 0.3 + 0.5)


async def test_a_provider_added_as_the_contributor_guide_shows(fake_server: FakeProviderServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    provider, module_name = "newmodel_under_test", "datus.models.newmodel_under_test_model"
    fake_server.api_key = KEY
    config = AgentConfig.from_dict({"agent": {"target": "mine", "models": {
        "mine": {"type": provider, "model": "new-model-1", "base_url": fake_server.openai_base_url},
        "default_url": {"type": provider, "model": "new-model-1"},
    }}})
    with monkeypatch.context() as patch:
        module = types.ModuleType(module_name)
        module.NewModelModel = NewModelModel  # type: ignore[attr-defined]
        patch.setitem(sys.modules, module_name, module)
        patch.setitem(LLMBaseModel.MODEL_TYPE_MAP, provider, "NewModelModel")
        patch.setenv("NEWMODEL_API_KEY", KEY)

        model = LLMBaseModel.create_model(config)
        assert type(model) is NewModelModel and model.model_name == "new-model-1"
        assert await model.agenerate("hello") == "echo: hello"
        assert model.generate("hi", temperature=0.2) == "echo: hi"
        assert "".join([t async for t in model.agenerate_stream("streamed")]) == "echo: streamed"
        fake_server.script.add(Reply(text='{"sql": "SELECT 1", "tables": []}'))
        assert (await model.agenerate_with_json_output("q", SqlAnswer))["sql"] == "SELECT 1"
        assert model.token_count("x" * 10) == 3
        requests = chat_requests(fake_server)
        assert len(requests) == 4
        assert all(r.headers["authorization"] == f"Bearer {KEY}" and r.body["model"] == "new-model-1"
                   for r in requests)
        assert requests[1].body["temperature"] == 0.2

        client = LLMBaseModel.create_model(config, "default_url")._create_client()
        assert str(client.base_url) == "https://api.newmodel.com/v1/"
        await client.close()
    assert provider not in LLMBaseModel.MODEL_TYPE_MAP and module_name not in sys.modules  # nothing leaks
