"""A worker process's model objects (tasks/context.py): bounded, least recently used dropped,
a dropped model's SDK client closed on its loop once nothing uses it; every model gets the
fleet's limiter (unless it is turned off)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from datus.models.config import AgentConfig
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.context import JobContext
from datus_queue.tasks.ratelimit import ModelLimiter
from datus_queue.tasks.settings import Settings
from tests.tasks.conftest import KNOWN_KEY


def agent_config(fake: FakeProviderServer) -> AgentConfig:
    model = {"type": "openai", "api_key": KNOWN_KEY, "base_url": fake.openai_base_url}
    return AgentConfig.from_dict({"agent": {"models": {
        "a": {**model, "model": "gpt-4o-mini", "rate_limits": {"requests_per_minute": 600}},
        "b": {**model, "model": "gpt-4o"},
        "c": {**model, "model": "o3-mini"},
    }, "rate_limits": {"openai": {"max_concurrency": 20, "requests_per_minute": 60}}}})


@pytest.fixture
async def context(dq_redis_url: str, fake: FakeProviderServer) -> AsyncIterator[JobContext]:
    ctx = JobContext(Settings(redis_url=dq_redis_url, model_cache_size=2), agent_config(fake))
    yield ctx
    await ctx.aclose()


async def test_the_model_cache_is_bounded_and_a_dropped_model_is_closed_on_its_loop(context: JobContext) -> None:
    first = context.model("a", in_process_retries=False)
    assert (await first.agenerate("hi")) == "echo: hi"  # it now has an SDK client on this loop
    client = first._clients[asyncio.get_running_loop()]
    assert context.model("a", in_process_retries=False) is first  # cached
    context.model("b", in_process_retries=False)
    context.model("a", in_process_retries=False)  # used again: now the most recent
    context.model("c", in_process_retries=False)  # over the bound: "b" goes, not "a"
    assert [m.model_name for m in context.models()] == ["gpt-4o-mini", "o3-mini"]
    context.model("b", in_process_retries=True)  # another retry mode is another entry: "a" goes
    assert "gpt-4o-mini" not in [m.model_name for m in context.models()]
    assert not client.is_closed()  # still in use here
    del first
    gc.collect()
    for _ in range(50):  # the finalizer schedules the close on this loop
        if client.is_closed():
            break
        await asyncio.sleep(0.02)
    assert client.is_closed()


async def test_every_model_gets_the_fleets_limiter_with_its_merged_limits(context: JobContext,
                                                                          dq_redis_url: str,
                                                                          fake: FakeProviderServer) -> None:
    limiter = context.model("a", in_process_retries=False).request_limiter
    assert isinstance(limiter, ModelLimiter)
    # the model's own requests_per_minute over its provider's defaults, field by field
    assert (limiter.limits.requests_per_minute, limiter.limits.max_concurrency) == (600, 20)
    tool_runs = context.model("b", in_process_retries=True)
    assert tool_runs.retry_policy.rate_limit_wait_s == context.settings.rate_limit_max_wait_s
    off = JobContext(Settings(redis_url=dq_redis_url, rate_limiter=False), agent_config(fake))
    assert off.model("a", in_process_retries=False).request_limiter is None
