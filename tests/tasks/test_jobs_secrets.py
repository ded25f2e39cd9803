"""No secret anywhere: with a known fake key configured for every provider, after a run of
jobs that succeed, stream, retry, fail and are cancelled, the key is in no Redis key or value,
no job store row or database file, and no worker log (at DEBUG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from datus.models.scripted import Fault, Reply
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import KNOWN_KEY, REJECTED_KEY, JobEnv, StartWorker, generations, wait_for, worker_logs

SECRETS = (KNOWN_KEY.encode(), REJECTED_KEY.encode(), b"SECRET-0123456789", b"REJECTED-9876543210")


def dump_redis(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key of the database and its value as bytes, whatever its type."""
    dumped: dict[bytes, bytes] = {}
    for key in client.scan_iter(count=500):
        kind = client.type(key).decode()
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        elif kind == "none":  # expired between SCAN and TYPE
            continue
        else:
            raise AssertionError(f"a Redis key of a type this scan does not read: {key!r} is a {kind}")
        dumped[key] = repr(value).encode()
    return dumped


def dump_store(database_url: str) -> str:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            tables = inspect(conn).get_table_names()
            assert "jobs" in tables
            return "\n".join(repr(tuple(row)) for table in tables
                             for row in conn.execute(text(f'SELECT * FROM "{table}"')))
    finally:
        engine.dispose()


def assert_no_secret(where: str, blob: bytes) -> None:
    for secret in SECRETS:
        assert secret not in blob, f"{secret.decode()!r} found in {where}"


def test_no_secret_in_redis_the_store_or_the_logs(job_env: JobEnv, worker: StartWorker, client: JobClient,
                                                  dq_redis: redis.Redis, fake: FakeProviderServer) -> None:
    fake.script.add(Reply(text="slow answer", latency_s=2.0), match="secret-slow")
    fake.script.add(Fault("rate_limit", retry_after=0.2), match="secret-429")
    fake.script.add(Fault("status", status=403), match="secret-403")
    fake.script.add(Reply(text=json.dumps({"sql": "SELECT 1", "explanation": "one"})), match="secret-json")
    providers = job_env.providers  # every provider the fake speaks
    worker(*providers, loglevel="DEBUG")

    slow = client.submit({"model": "openai", "prompt": "secret-slow"})
    wait_for(lambda: client.status(slow) is JobStatus.RUNNING, 15, "the slow job to run")
    in_flight = dump_redis(dq_redis)  # its message is taken, not yet acknowledged
    assert any(slow.encode() in key + value for key, value in in_flight.items())

    submitted = {provider: client.submit({"model": provider, "prompt": f"secret-gen-{provider}"})
                 for provider in providers}
    submitted |= {
        "json": client.submit({"model": "deepseek", "kind": "json", "prompt": "secret-json",
                               "idempotency_key": "secret-idem", "metadata": {"team": "bi"}}),
        "retried": client.submit({"model": "openai", "prompt": "secret-429"}),
        "forbidden": client.submit({"model": "gemini", "prompt": "secret-403"}),
        "rejected": client.submit({"model": "openai-badkey", "prompt": "secret-badkey"}),
        "unreachable": client.submit({"model": "openai-down", "prompt": "secret-down"}),
    }
    cancelled = client.submit({"model": "openai", "prompt": "secret-cancel", "stream": False})
    client.cancel(cancelled)
    results = {name: client.result(job_id, timeout=40) for name, job_id in submitted.items()}
    assert client.result(slow, timeout=30).status is JobStatus.SUCCEEDED
    for provider in providers:
        assert results[provider].status is JobStatus.SUCCEEDED, results[provider].error
    assert results["json"].status is JobStatus.SUCCEEDED and results["retried"].attempts == 2
    assert results["retried"].status is JobStatus.SUCCEEDED
    assert {results[name].status for name in ("forbidden", "rejected", "unreachable")} == {JobStatus.FAILED}
    assert results["unreachable"].error and results["unreachable"].error.code == "model_connection_error"

    # the key was really in use: the fake saw it on every protocol, and accepted no other
    sent = [json.dumps(request.headers) for request in generations(fake)]
    assert any(f"Bearer {KNOWN_KEY}" in headers for headers in sent)
    assert any(KNOWN_KEY in headers and "x-goog-api-key" in headers for headers in sent)
    assert any(REJECTED_KEY in headers for headers in sent)

    # Redis: every key and value of the test's database, during the run and after it
    after = dump_redis(dq_redis)
    assert any(submitted["openai"].encode() in key for key in after), "the scan reads the job's events"
    for key, value in {**in_flight, **after}.items():
        assert_no_secret(f"Redis key {key!r}", key + b"\n" + value)

    # the job store: every table as text, and every file SQLite left behind
    dumped = dump_store(job_env.database_url)
    assert "secret-gen-openai" in dumped and "Incorrect API key provided" in dumped
    assert_no_secret("the job store", dumped.encode())
    client.store.close()
    database = Path(make_url(job_env.database_url).database or "")
    files = [path for path in database.parent.iterdir() if path.name.startswith(database.name)]
    assert database in files
    for path in files:
        assert_no_secret(str(path), path.read_bytes())

    # the worker logs, at DEBUG
    logs = worker_logs(job_env)
    assert logs and all(submitted["openai"] in log for log in logs.values())
    for name, log in logs.items():
        assert_no_secret(name, log.encode())
