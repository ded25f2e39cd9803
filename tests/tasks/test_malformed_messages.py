"""No message stops a worker: whatever a message on a job queue holds — headers of the wrong
type, a body of the wrong shape, a body that is not JSON, one of many megabytes, a task name no
worker knows — it is dead-lettered (or run) and acknowledged, a job it names that waits for its
message is failed (replayable with `dq dead replay`) instead of staying queued, and the next
normal job runs.

The messages are hand-made Redis envelopes pushed straight onto the queue's list (what kombu's
Redis transport reads), so nothing a producer checks stands between them and the worker.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobRequest, JobStatus
from tests.tasks.conftest import StartWorker, generations, wait_for

QUEUE = "llm.openai"


def payload(prompt: str = "never asked") -> dict[str, Any]:
    return {"provider": "openai", "request": {"model": "openai", "prompt": prompt}}


@dataclass
class Envelope:
    """One message as kombu's Redis transport stores it in a queue's list."""

    name: str  # what the case is, and the id of its dead letter when it carries a usable id
    headers: Any = field(default_factory=dict)
    body: Any = None  # JSON-encoded unless raw is set
    raw: bytes | None = None  # the body's bytes, as they are
    content_type: Any = "application/json"
    properties: dict[str, Any] = field(default_factory=dict)
    names_job: bool = False  # the message names a queued job row: it must not stay queued
    runs: bool = False  # a message Celery can read after all: it runs, and its job succeeds

    def wire(self) -> str:
        data = self.raw if self.raw is not None else json.dumps(self.body).encode()
        return json.dumps({
            "body": base64.b64encode(data).decode(), "content-encoding": "utf-8", "content-type": self.content_type,
            "headers": self.headers,
            "properties": {"delivery_tag": f"dq-test-{uuid.uuid4()}", "body_encoding": "base64", "priority": 0,
                           "delivery_info": {"exchange": "", "routing_key": QUEUE}, **self.properties}})


def job_headers(job_id: str, task: Any = "dq.generate", **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": job_id, "retries": 0, "argsrepr": "(malformed)", **extra}


def corpus(job: Any) -> list[Envelope]:
    """``job(name)`` makes a queued job row and returns its id (a message naming it must not
    leave it queued)."""
    cases: list[Envelope] = []

    def named(name: str, headers: dict[str, Any] | None = None, body: Any = None, **options: Any) -> None:
        job_id = job(name)
        cases.append(Envelope(name, job_headers(job_id, **(headers or {})),
                              [[job_id, payload()], {}, {}] if body is None else body(job_id), names_job=True,
                              **options))

    # headers of the wrong type or range
    named("retries-text", {"retries": "abc"})
    named("retries-negative", {"retries": -3})
    named("retries-huge", {"retries": 10 ** 30})
    named("retries-float", {"retries": 1.5})
    named("infra-retries-text", {"dq_infra_retries": "x"})
    named("eta-garbage", {"eta": "not a date"})
    named("expires-garbage", {"expires": {"when": "never"}})
    named("timelimit-text", {"timelimit": "abc"})
    named("timelimit-short", {"timelimit": [1]})
    named("shadow-number", {"shadow": 5})
    named("argsrepr-object", {"argsrepr": {"x": 1}})
    named("traceparent-garbage", {"traceparent": "00-zzz-yyy-01", "tracestate": 7})
    named("stamps-garbage", {"stamped_headers": 5, "stamps": "x"})
    named("priority-text", properties={"priority": "high"})
    # bodies of the wrong shape or type
    named("embed-not-a-mapping", body=lambda job_id: [[job_id, payload()], {}, "embed"])
    # links a job task never follows (the worker's pool runs no callbacks): the job runs
    named("embed-links", body=lambda job_id: [[job_id, payload("runs: links")], {}, {"callbacks": "x", "chain": 7}],
          runs=True)
    # Celery's hybrid protocol (a protocol 1 body under protocol 2 headers): Celery reads it, the job runs
    named("body-a-mapping", body=lambda job_id: {"args": [job_id, payload("runs: hybrid")]}, runs=True)
    named("body-two-items", body=lambda job_id: [[job_id, payload()], {}])
    named("kwargs-a-list", body=lambda job_id: [[job_id, payload()], ["x"], {}])
    named("args-a-string", body=lambda job_id: [job_id, {}, {}])
    named("payload-a-list", body=lambda job_id: [[job_id, [1, 2]], {}, {}])
    named("payload-wrong-types", body=lambda job_id: [[job_id, {"provider": 5, "request": {"model": []}}], {}, {}])
    named("payload-kwargs", body=lambda job_id: [[], {"job_id": job_id, "payload": payload(), "extra": 1}, {}])
    named("not-json", raw=b"{not json")
    named("not-utf8", raw=b"\xff\xfe\x00garbage")
    named("pickle", raw=b"\x80\x04K\x01.", content_type="application/x-python-serialize")
    named("unknown-content-type", content_type="application/x-unheard-of")
    named("deeply-nested", raw=b"[" * 100_000 + b"]" * 100_000)
    named("huge-body", body=lambda job_id: [[job_id, {"garbage": "x" * 20_000_000}], {}, {}])
    named("unknown-task", {"task": "dq.no_such_task"})
    named("task-a-number", {"task": 17})
    # ids a job never has: these carry no usable job id, so their dead letters get ids of their own
    cases += [
        Envelope("no-id", {"lang": "py", "task": "dq.generate", "retries": 0}, [["no-id", payload()], {}, {}]),
        Envelope("id-an-object", job_headers({"a": 1}), [[{"a": 1}, payload()], {}, {}]),  # type: ignore[arg-type]
        Envelope("id-huge", job_headers("j" * 5000), [["j" * 5000, payload()], {}, {}]),
        Envelope("id-control-chars", job_headers("bad\x00id\n"), [["bad\x00id\n", payload()], {}, {}]),
        Envelope("headers-a-list", ["task", "dq.generate"], [["x", payload()], {}, {}]),
        Envelope("headers-null", None, [["x", payload()], {}, {}]),
    ]
    return cases


def push_and_run_one_good_job(client: JobClient, worker: StartWorker, messages: list[Envelope]) -> None:
    """A worker at concurrency 4 (as few slots as a small worker has: a slot a message never
    gives back shows), the messages straight onto its queue, then a normal job, which succeeds."""
    running = worker("openai", concurrency=4)
    for message in messages:
        client.redis.lpush(QUEUE, message.wire())
    after = client.submit({"model": "openai", "prompt": "a good job after the malformed ones"})
    result = client.result(after, timeout=60)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert running.alive(), running.log()[-3000:]


def assert_all_acknowledged(client: JobClient) -> None:
    """Nothing left unacknowledged (kombu's ``unacked`` hash) and nothing left on the queue."""
    wait_for(lambda: client.redis.hlen("unacked") == 0, 10, "every message acknowledged")
    assert client.redis.llen(QUEUE) == 0, client.redis.lrange(QUEUE, 0, -1)


@pytest.mark.slow
def test_malformed_job_messages_are_dead_lettered_and_acknowledged_and_the_next_job_runs(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    made: dict[str, str] = {}

    def job(name: str) -> str:
        # the row's request is what a job runs with (the store is the truth); a message's own
        # request (the previous format's `payload()`, "never asked") is never used
        made[name] = client.store.create_job(f"job-{name}", JobRequest(model="openai", prompt=f"row of {name}"),
                                             "openai")[0]
        return made[name]

    messages = corpus(job)
    push_and_run_one_good_job(client, worker, messages)
    dead = [message for message in messages if not message.runs]
    # every one that cannot run is a dead letter (those naming a job under the job's id), once
    wait_for(lambda: len(client.store.dead_letters()) >= len(dead), 30, f"{len(dead)} dead letters")
    letters = client.store.dead_letters()
    assert len(letters) == len(dead), [(letter.dead_id[:40], letter.reason[:80]) for letter in letters]
    by_job = {letter.job_id: letter for letter in letters if letter.job_id}
    assert {made[m.name] for m in dead if m.names_job} <= by_job.keys(), sorted(by_job)
    assert all(letter.replayable for letter in by_job.values())  # `dq dead replay` runs each from its row
    assert not any("never asked" in letter.reason for letter in letters)  # the reason, never the content
    assert_all_acknowledged(client)
    # no job a message named waits for it: it failed, or it ran (a message Celery can read after all)
    for message in messages:
        if message.names_job:
            row = client.store.get(made[message.name])
            assert row is not None, message.name
            if message.runs:
                assert row.status is JobStatus.SUCCEEDED, (message.name, row.status, row.error)
            else:
                assert row.status is JobStatus.FAILED, (message.name, row.status)
                assert row.error is not None and row.error.code in ("invalid_message", "invalid_payload"), message.name
    asked = {json.dumps(request.body) for request in generations(fake)}
    assert len(asked) == 3 and not any("never asked" in body for body in asked)  # the good job and the two that ran
    assert sum("row of embed-links" in body or "row of body-a-mapping" in body for body in asked) == 2


# what kombu's Redis transport reads off the list before Celery sees a task message
TRANSPORT_CASES = [
    Envelope("no-task-header-not-json", {"lang": "py", "id": "no-task"}, raw=b"\x00\x01 not json"),
    Envelope("no-task-header-json", {"lang": "py", "id": "no-task-2"}, [["x", payload()], {}, {}]),
    Envelope("unknown-task-no-id", {"lang": "py", "task": "dq.no_such_task"}, [[], {}, {}]),
    Envelope("unknown-task-id-an-object", {"lang": "py", "task": "dq.no_such_task", "id": [1]}, [[], {}, {}]),
]


@pytest.mark.slow
def test_messages_celery_cannot_take_are_dead_lettered_and_acknowledged(
        worker: StartWorker, client: JobClient) -> None:
    raw = [b"\x00 not an envelope", b'["an envelope", "that is a list"]',
           b'{"headers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]  # nested past the JSON decoder's depth
    for item in raw:
        client.redis.lpush(QUEUE, item)
    push_and_run_one_good_job(client, worker, TRANSPORT_CASES)
    wait_for(lambda: len(client.store.dead_letters()) >= len(TRANSPORT_CASES) + len(raw), 30, "the dead letters")
    assert len(client.store.dead_letters()) == len(TRANSPORT_CASES) + len(raw)
    assert_all_acknowledged(client)
