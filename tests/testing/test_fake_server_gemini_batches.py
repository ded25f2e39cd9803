"""Gemini's batch mode (inline requests) on the fake server, as `google-genai`'s ``client.batches`` sees it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

from datus.models.scripted import Fault
from datus.testing.fake_server import FakeProviderServer

MODEL = "gemini-2.5-flash"


@pytest.fixture
def api(fake_server: FakeProviderServer) -> Iterator[genai.Client]:
    client = genai.Client(api_key="key-test", http_options=types.HttpOptions(base_url=fake_server.url,
                                                                             api_version="v1beta"))
    yield client
    client.close()


def requests(n: int) -> list[types.InlinedRequest]:
    return [types.InlinedRequest(contents=[types.Content(role="user", parts=[types.Part(text=f"question {i}")])],
                                 metadata={"key": f"item-{i}"},
                                 config=types.GenerateContentConfig(system_instruction="be brief", max_output_tokens=64))
            for i in range(n)]


def wait_done(api: genai.Client, name: str) -> Any:
    for _ in range(500):  # the fake's clock: well under a second per batch
        batch = api.batches.get(name=name)
        if batch.state.value in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {name} never ended")


def test_a_batch_succeeds_with_the_online_answers(api: genai.Client, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Fault("status", status=500), match="question 1")
    batch = api.batches.create(model=MODEL, src=requests(3), config={"display_name": "part-1"})
    assert batch.name.startswith("batches/") and batch.state.value == "JOB_STATE_PENDING"
    assert batch.display_name == "part-1"
    batch = wait_done(api, batch.name)
    assert batch.state.value == "JOB_STATE_SUCCEEDED"
    answers = {entry.metadata["key"]: entry for entry in batch.dest.inlined_responses}
    online = api.models.generate_content(model=MODEL, contents="question 2",
                                         config=types.GenerateContentConfig(system_instruction="be brief"))
    assert answers["item-2"].response.text == online.text
    assert answers["item-1"].response is None and answers["item-1"].error.code == 500
    [job] = fake_server.batches.jobs.values()
    assert job.items[0].body["systemInstruction"]["parts"][0]["text"] == "be brief"  # the SDK's request, as sent
    assert [b.display_name for b in api.batches.list()] == ["part-1"]


def test_expired_and_cancelled(api: genai.Client, fake_server: FakeProviderServer) -> None:
    fake_server.batches.configure(expire_after=1)
    batch = wait_done(api, api.batches.create(model=MODEL, src=requests(3)).name)
    assert batch.state.value == "JOB_STATE_EXPIRED"
    assert sum(entry.error is not None for entry in batch.dest.inlined_responses) == 2
    fake_server.batches.configure(expire_after=None, run_s=30)  # long, so the cancel lands mid-run
    batch = api.batches.create(model=MODEL, src=requests(2))
    api.batches.cancel(name=batch.name)
    assert wait_done(api, batch.name).state.value == "JOB_STATE_CANCELLED"
    with pytest.raises(errors.ClientError):
        api.batches.get(name="batches/missing")
