"""The HTTP stack under the async SDK clients (``ModelConfig.http_client``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus.models.errors import ModelConnectionError
from datus.models.http_clients import connect_failure
from datus.testing.fake_server import FakeProviderServer


def _model(provider: str, base_url: str, **settings: Any) -> LLMBaseModel:
    config = AgentConfig.from_dict({"models": {"m": {
        "type": provider, "model": MODELS[provider], "api_key": "sk-test", "base_url": base_url, **settings}}})
    return LLMBaseModel.create_model(config, "m")


MODELS = {"openai": "gpt-4o-mini", "claude": "claude-sonnet-4-6"}


def _base_url(server: FakeProviderServer, provider: str) -> str:
    return server.openai_base_url if provider == "openai" else server.url


# claude: anthropic 0.51 (Datus-agent's pin) has no DefaultAioHttpClient; the same client is built for it
@pytest.mark.parametrize("provider", ["openai", "claude"])
@pytest.mark.parametrize(("stack", "aiohttp"), [(None, True), ("aiohttp", True), ("httpx", False)])
def test_the_configured_stack_carries_the_calls(fake_server: FakeProviderServer, provider: str,
                                                stack: str | None, aiohttp: bool) -> None:
    model = _model(provider, _base_url(fake_server, provider), **({} if stack is None else {"http_client": stack}))

    async def run() -> tuple[str, Any]:
        text = await model.agenerate("hello")
        return text, model._client()._client

    text, http = asyncio.run(run())
    assert text and ("Aio" in type(http).__name__) is aiohttp
    if aiohttp:  # asyncio.run closed it before closing its loop: no "Unclosed client session"
        assert http.is_closed


@pytest.mark.parametrize("provider", ["openai", "claude"])
@pytest.mark.parametrize("stack", ["aiohttp", "httpx"])
def test_a_refused_connection_is_a_connection_error_not_a_timeout(provider: str, stack: str) -> None:
    model = _model(provider, f"http://127.0.0.1:{_closed_port()}", max_retries=0, http_client=stack)
    with pytest.raises(ModelConnectionError):
        model.generate("hello")


def test_connect_failure_finds_the_refusal_behind_a_timeout() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as refused:
            raise TimeoutError("connect timed out") from refused
    except TimeoutError as reported:
        assert isinstance(connect_failure(reported), ConnectionRefusedError)
    assert connect_failure(TimeoutError("read timed out")) is None


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
