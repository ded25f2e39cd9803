"""Anthropic's Message Batches on the fake server, as the official `anthropic` SDK sees it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from datus.models.scripted import Fault
from datus.testing.fake_server import FakeProviderServer

MODEL = "claude-sonnet-4-5"


@pytest.fixture
def api(fake_server: FakeProviderServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake_server.url, api_key="sk-test", max_retries=0) as client:
        yield client


def requests(n: int, prefix: str = "item") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}",
             "params": {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(n)]


def wait_ended(api: anthropic.Anthropic, batch_id: str) -> Any:
    for _ in range(500):  # the fake's clock: well under a second per batch
        batch = api.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} never ended")


def test_a_batch_ends_with_results_out_of_order(api: anthropic.Anthropic, fake_server: FakeProviderServer) -> None:
    # seed: a fixed answering order, so "out of order" is a fact of this test, not a chance
    fake_server.batches.configure(seed=3)
    batch = api.messages.batches.create(requests=requests(8))
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 8
    batch = wait_ended(api, batch.id)
    assert batch.request_counts.succeeded == 8 and batch.ended_at is not None and batch.results_url
    results = list(api.messages.batches.results(batch.id))
    ids = [result.custom_id for result in results]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(8)) and ids != [f"item-{i}" for i in range(8)]
    online = api.messages.create(model=MODEL, max_tokens=256, messages=[{"role": "user", "content": "question 5"}])
    item = next(result for result in results if result.custom_id == "item-5")
    assert item.result.type == "succeeded"
    assert item.result.message.content[0].text == online.content[0].text
    assert item.result.message.usage.input_tokens == online.usage.input_tokens


def test_errored_and_expired_items(api: anthropic.Anthropic, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Fault("overloaded"), match="question 1")
    fake_server.batches.configure(expire_after=3, seed=0)
    batch = wait_ended(api, api.messages.batches.create(requests=requests(6)).id)
    counts = batch.request_counts
    assert counts.expired == 3 and counts.succeeded + counts.errored == 3
    results = {result.custom_id: result.result for result in api.messages.batches.results(batch.id)}
    kinds = sorted(result.type for result in results.values())
    assert kinds.count("expired") == 3
    if results["item-1"].type == "errored":  # answered before the batch expired
        assert results["item-1"].error.error.type == "overloaded_error"


def test_a_cancelled_batch(api: anthropic.Anthropic, fake_server: FakeProviderServer) -> None:
    fake_server.batches.configure(run_s=30)  # long, so the cancel lands mid-run
    batch = api.messages.batches.create(requests=requests(3))
    canceling = api.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    batch = wait_ended(api, batch.id)
    assert batch.request_counts.canceled == 3
    assert {result.result.type for result in api.messages.batches.results(batch.id)} == {"canceled"}


def test_bad_batches_are_refused(api: anthropic.Anthropic, fake_server: FakeProviderServer) -> None:
    with pytest.raises(anthropic.BadRequestError):
        api.messages.batches.create(requests=requests(1) + requests(1))  # duplicate custom_id
    with pytest.raises(anthropic.BadRequestError):
        api.messages.batches.create(requests=[{**requests(1)[0], "custom_id": "has spaces"}])
    fake_server.batches.configure(anthropic_max_requests=2)  # lowered, so three requests exceed it
    with pytest.raises(anthropic.BadRequestError):
        api.messages.batches.create(requests=requests(3))
    with pytest.raises(anthropic.NotFoundError):
        api.messages.batches.retrieve("msgbatch_missing")


def test_list_newest_first(api: anthropic.Anthropic) -> None:
    first = api.messages.batches.create(requests=requests(1))
    second = api.messages.batches.create(requests=requests(1))
    assert [batch.id for batch in api.messages.batches.list(limit=1)] == [second.id, first.id]


async def test_the_async_client(fake_server: FakeProviderServer) -> None:
    async with anthropic.AsyncAnthropic(base_url=fake_server.url, api_key="sk-test", max_retries=0) as client:
        batch = await client.messages.batches.create(requests=requests(2))
        for _ in range(500):
            batch = await client.messages.batches.retrieve(batch.id)
            if batch.processing_status == "ended":
                break
            await asyncio.sleep(0.02)
        results = [result async for result in await client.messages.batches.results(batch.id)]
        assert sorted(result.custom_id for result in results) == ["item-0", "item-1"]


def test_a_cache_control_prefix_is_written_once_then_read(api: anthropic.Anthropic,
                                                          fake_server: FakeProviderServer) -> None:
    shared = "You know this schema by heart. " * 200  # about 1,500 tokens: over the 1,024 minimum
    fake_server.batches.configure(seed=1)
    batch = api.messages.batches.create(requests=[
        {"custom_id": f"c-{i}", "params": {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "text", "text": shared, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": f"question {i}"}]}]}} for i in range(4)]
        + [{"custom_id": "short", "params": {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "too short to cache", "cache_control": {"type": "ephemeral"}}]}]}},
           # Haiku 4.5 caches from 4,096 tokens: the same prefix is too short there
           {"custom_id": "haiku", "params": {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [
               {"role": "user", "content": [{"type": "text", "text": shared, "cache_control": {"type": "ephemeral"}}]}]}}])
    wait_ended(api, batch.id)
    usage = {result.custom_id: result.result.message.usage for result in api.messages.batches.results(batch.id)}
    writes = [u.cache_creation_input_tokens for key, u in usage.items() if key.startswith("c-")]
    reads = [u.cache_read_input_tokens for key, u in usage.items() if key.startswith("c-")]
    assert sorted(writes) == [0, 0, 0, max(writes)] and max(writes) > 1024
    assert sorted(reads) == [0, max(writes), max(writes), max(writes)]  # the writer reads nothing
    # Anthropic's input_tokens is the uncached rest: the question, not the prefix
    assert all(u.input_tokens < 20 for key, u in usage.items() if key.startswith("c-"))
    for key in ("short", "haiku"):
        assert usage[key].cache_creation_input_tokens == usage[key].cache_read_input_tokens == 0
