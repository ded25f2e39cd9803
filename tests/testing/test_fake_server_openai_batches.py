"""OpenAI's Files + Batch API on the fake server, as the official `openai` SDK sees it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from datus.models.scripted import Fault, Reply
from datus.testing.fake_server import FakeProviderServer

ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def api(fake_server: FakeProviderServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake_server.openai_base_url, api_key="sk-test", max_retries=0) as client:
        yield client


def lines(n: int, model: str = "gpt-4o", prefix: str = "item") -> bytes:
    return "\n".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": ENDPOINT,
                                 "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]}})
                     for i in range(n)).encode()


def run(api: openai.OpenAI, content: bytes, **create: Any) -> Any:
    upload = api.files.create(file=("in.jsonl", content), purpose="batch")
    return api.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h", **create)


def wait_final(api: openai.OpenAI, batch_id: str) -> Any:
    for _ in range(500):  # the fake's clock: well under a second per batch
        batch = api.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} never ended")


def read(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines() if line]


def test_a_batch_runs_to_completion_and_its_answers_are_the_online_ones(api: openai.OpenAI,
                                                                        fake_server: FakeProviderServer) -> None:
    # seed: a fixed answering order, so "out of order" is a fact of this test, not a chance
    fake_server.batches.configure(seed=7)
    batch = run(api, lines(8), metadata={"dq_part": "p1"})
    assert batch.status == "validating" and batch.request_counts.total == 8
    assert batch.metadata == {"dq_part": "p1"}
    seen = set()
    for _ in range(500):
        batch = api.batches.retrieve(batch.id)
        seen.add(batch.status)
        if batch.status == "completed":
            break
        time.sleep(0.01)
    assert batch.status == "completed"
    assert {"in_progress", "completed"} <= seen
    assert batch.request_counts.completed == 8 and batch.request_counts.failed == 0
    assert batch.error_file_id is None and batch.completed_at is not None
    output = read(api, batch.output_file_id)
    ids = [line["custom_id"] for line in output]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(8)) and ids != [f"item-{i}" for i in range(8)]
    online = api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "question 3"}])
    answer = next(line for line in output if line["custom_id"] == "item-3")
    assert answer["response"]["status_code"] == 200 and answer["error"] is None
    assert answer["response"]["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content


def test_scripted_faults_fail_their_items_only(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Fault("status", status=500), match="question 2")
    fake_server.script.add(Reply(text="SELECT 42"), match="question 4")
    batch = wait_final(api, run(api, lines(5)).id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 1)
    errors = read(api, batch.error_file_id)
    assert [line["custom_id"] for line in errors] == ["item-2"]
    assert errors[0]["response"]["status_code"] == 500 and errors[0]["response"]["body"]["error"]["type"]
    output = {line["custom_id"]: line for line in read(api, batch.output_file_id)}
    assert output["item-4"]["response"]["body"]["choices"][0]["message"]["content"] == "SELECT 42"


def test_an_expired_batch_keeps_what_it_answered(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    fake_server.batches.configure(expire_after=3)
    batch = wait_final(api, run(api, lines(7)).id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 4)
    assert len(read(api, batch.output_file_id)) == 3
    errors = read(api, batch.error_file_id)
    assert len(errors) == 4 and {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert all(line["response"] is None for line in errors)


def test_a_cancelled_batch(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    # a long run, so the cancel lands while the batch is in progress
    fake_server.batches.configure(run_s=30)
    batch = run(api, lines(4))
    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = wait_final(api, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert {line["error"]["code"] for line in read(api, batch.error_file_id)} == {"batch_cancelled"}
    with pytest.raises(openai.BadRequestError):
        api.batches.cancel(batch.id)


def test_validation_failures_fail_the_batch(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    duplicate = lines(2) + b"\n" + lines(1)
    batch = wait_final(api, run(api, duplicate).id)
    assert batch.status == "failed" and batch.errors is not None
    assert [error.code for error in batch.errors.data] == ["duplicate_custom_id"]
    # a lowered limit, so a few lines exceed it (the real one is 50,000 per file)
    fake_server.batches.configure(openai_max_requests=3)
    batch = wait_final(api, run(api, lines(4)).id)
    assert batch.status == "failed" and batch.errors.data[0].code == "too_many_requests"
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_missing")
    with pytest.raises(openai.BadRequestError):
        api.batches.create(input_file_id="file-missing", endpoint=ENDPOINT, completion_window="24h")


def test_list_finds_a_batch_by_its_metadata(api: openai.OpenAI) -> None:
    first = run(api, lines(1), metadata={"dq_part": "a"})
    second = run(api, lines(1), metadata={"dq_part": "b"})
    listed = list(api.batches.list(limit=1))  # paging with after=, as the SDK's iterator does
    assert [batch.id for batch in listed] == [second.id, first.id]
    assert next(b for b in listed if (b.metadata or {}).get("dq_part") == "a").id == first.id


async def test_the_async_client(fake_server: FakeProviderServer) -> None:
    async with openai.AsyncOpenAI(base_url=fake_server.openai_base_url, api_key="sk-test", max_retries=0) as client:
        upload = await client.files.create(file=("in.jsonl", lines(2)), purpose="batch")
        batch = await client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h")
        for _ in range(500):
            batch = await client.batches.retrieve(batch.id)
            if batch.status == "completed":
                break
            await asyncio.sleep(0.02)
        assert batch.status == "completed"
        content = await client.files.content(batch.output_file_id)
        assert len(content.text.splitlines()) == 2


def test_a_wrong_key_is_refused(fake_server: FakeProviderServer) -> None:
    fake_server.api_key = "sk-right"
    with (openai.OpenAI(base_url=fake_server.openai_base_url, api_key="sk-wrong", max_retries=0) as client,
          pytest.raises(openai.AuthenticationError)):
        client.files.create(file=("in.jsonl", lines(1)), purpose="batch")


def test_a_repeated_prefix_is_read_from_the_cache(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    # OpenAI caches by itself: the longest prefix seen before, from 1,024 tokens in 128-token steps
    shared = "You know this schema by heart. " * 200  # about 1,500 tokens
    content = "\n".join(json.dumps({"custom_id": f"c-{i}", "method": "POST", "url": ENDPOINT, "body": {
        "model": "gpt-4o", "messages": [{"role": "user", "content": shared + f"question {i}"}]}}) for i in range(4))
    fake_server.batches.configure(seed=1)
    batch = wait_final(api, run(api, content.encode()).id)
    usage = {line["custom_id"]: line["response"]["body"]["usage"] for line in read(api, batch.output_file_id)}
    cached = sorted(u["prompt_tokens_details"]["cached_tokens"] for u in usage.values())
    assert cached[0] == 0 and len(set(cached[1:])) == 1 and 1024 <= cached[1] <= len(shared) / 4
    assert cached[1] % 128 == 0
    assert all(u["prompt_tokens"] > cached[1] for u in usage.values())
