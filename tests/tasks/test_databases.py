"""Which databases a tool run may open (tasks/databases.py, issue 19): the operator's, named in
agent.yml (agent.namespace, Datus's section) or DQ_DATABASES; a request names one or gives a URL
that matches one; the job store never. Checked at submit (JobClient.validate) and on the worker
(tasks.jobs, before the model is called; tasks.runner, before the SQL server is started). `dq
batch --db URL` registers its URL for its own batch."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from datus.models.config import AgentConfig
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.databases import (
    DatabaseNotAllowed,
    database_refusal,
    fingerprint,
    register_for_batch,
    resolve_database,
)
from datus_queue.tasks.runner import servers
from datus_queue.tasks.schemas import JobRequest
from datus_queue.tasks.settings import Settings

REDIS_URL = os.environ.get("DQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
SECRET = "s3cret-in-the-env"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"shop": tmp_path / "shop.db", "jobs": tmp_path / "jobs.db", "other": tmp_path / "other.db"}
    for path in paths.values():
        sqlite3.connect(path).close()
    return paths


@pytest.fixture
def config(files: dict[str, Path]) -> AgentConfig:
    return AgentConfig.from_dict({"agent": {"models": {"scripted": {"type": "fake", "model": "scripted"}}, "namespace": {
        "shop": {"type": "sqlite", "name": "SHOP", "uri": str(files["shop"])},
        "dw": {"type": "postgresql", "host": "db.internal", "port": 5432, "username": "reader",
               "password": "${DQ_TEST_DW_PASSWORD}", "database": "dw"},
        "lake": {"type": "sqlite", "path_pattern": "benchmark/**/*.sqlite"},  # no single database: not offered
        "jobs": {"type": "sqlite", "uri": str(files["jobs"])},  # the store, configured by mistake
    }}})


@pytest.fixture
def settings(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DQ_TEST_DW_PASSWORD", SECRET)
    monkeypatch.delenv("DQ_SESSION_URL", raising=False)
    return Settings(database_url=f"sqlite:///{files['jobs']}", redis_url=REDIS_URL,
                    databases={"reports": "postgresql://analyst:${DQ_TEST_DW_PASSWORD}@reports:6543/r?sslmode=require"})


def test_a_configured_name_opens_its_url(config: AgentConfig, settings: Settings, files: dict[str, Path]) -> None:
    assert resolve_database("shop", config, settings) == f"sqlite:///{files['shop']}"
    assert resolve_database("dw", config, settings) == f"postgresql://reader:{SECRET}@db.internal:5432/dw"
    assert SECRET in resolve_database("reports", config, settings)  # DQ_DATABASES, ${VAR} expanded here


def test_a_url_must_match_a_configured_one(config: AgentConfig, settings: Settings, files: dict[str, Path]) -> None:
    # the same database, user and query; the driver and the password are not compared, the
    # configured URL (with its password) is what is opened
    assert resolve_database("postgresql+psycopg2://reader@db.internal/dw", config, settings).endswith(
        f"reader:{SECRET}@db.internal:5432/dw")
    assert resolve_database("postgresql://analyst@reports:6543/r?sslmode=require", config, settings)
    assert resolve_database(f"sqlite:///{files['shop'].parent}/./shop.db", config, settings)
    for refused in (f"sqlite:///{files['other']}", "postgresql://reader@db.internal/other",
                    "postgresql://admin@db.internal/dw", "postgresql://reader@elsewhere/dw",
                    "postgresql://analyst@reports:6543/r",  # the query differs: sslmode is the operator's
                    "postgresql://reader@db.internal/dw?options=-c%20default_transaction_read_only%3Doff"):
        with pytest.raises(DatabaseNotAllowed, match="^database: .*agent.namespace in agent.yml or DQ_DATABASES"):
            resolve_database(refused, config, settings)
    with pytest.raises(DatabaseNotAllowed, match="no database of that name is configured; known: dw, jobs, reports, shop"):
        resolve_database("nope", config, settings)
    with pytest.raises(DatabaseNotAllowed, match="no database of that name"):
        resolve_database("lake", config, settings)


def test_the_job_store_is_refused_however_it_is_spelled(config: AgentConfig, settings: Settings,
                                                         files: dict[str, Path]) -> None:
    respelled = f"sqlite+pysqlite:///{files['jobs'].parent}/../{files['jobs'].parent.name}/jobs.db"
    for value in ("jobs", f"sqlite:///{files['jobs']}", respelled):
        with pytest.raises(DatabaseNotAllowed, match="own store"):
            resolve_database(value, config, settings, registered=[fingerprint(f"sqlite:///{files['jobs']}")])
    pg_store = Settings(database_url="postgresql://dq:pw@127.0.0.1/jobs", redis_url=REDIS_URL)
    with pytest.raises(DatabaseNotAllowed, match="own store"):  # any user, any spelling of the host
        resolve_database("postgresql://reader@localhost:5432/jobs", config, pg_store,
                         registered=[fingerprint("postgresql://reader@localhost:5432/jobs")])


def test_errors_never_show_a_urls_secret_parts(config: AgentConfig, settings: Settings) -> None:
    with pytest.raises(DatabaseNotAllowed) as raised:
        resolve_database("postgresql://tok3n-user@evil.example:5432/x?api_key=tok3n-query", config, settings)
    message = str(raised.value)
    assert "evil.example" in message and "tok3n" not in message


def _client(config: AgentConfig, settings: Settings) -> JobClient:
    return JobClient(settings=settings, agent_config=config, app=object(), store=object())


def test_submit_refuses_what_the_operator_did_not_allow(config: AgentConfig, settings: Settings,
                                                        files: dict[str, Path]) -> None:
    client = _client(config, settings)
    try:
        request = {"model": "scripted", "kind": "tool_run", "prompt": "hi"}
        assert client.validate({**request, "database": "shop"})[0].database == "shop"
        assert client.validate({**request, "database": f"sqlite:///{files['shop']}"})
        for value, expected in ((f"sqlite:///{files['jobs']}", "own store"), ("jobs", "own store"),
                                (f"sqlite:///{files['other']}", "not a database the operator allows"),
                                ("warehouse", "no database of that name")):
            with pytest.raises(InvalidJob, match=f"invalid job request: database: .*{expected}"):
                client.validate({**request, "database": value})
        # the operator (dq batch --db) allows its own URL, never the store
        client.allow_database(f"sqlite:///{files['other']}")
        assert client.validate({**request, "database": f"sqlite:///{files['other']}"})
        with pytest.raises(InvalidJob, match="own store"):
            client.allow_database(f"sqlite:///{files['jobs']}")
    finally:
        client.close()


class _Redis:
    def __init__(self, members: dict[str, set[str]]) -> None:
        self.members = members

    async def smembers(self, key: str) -> set[bytes]:
        return {member.encode() for member in self.members.get(key, set())}


def test_the_worker_checks_again(config: AgentConfig, settings: Settings, files: dict[str, Path]) -> None:
    """A request sent around the client (a forged message, a config changed since) is refused
    before the database is opened; a batch's registered URL serves that batch only."""
    other = f"sqlite:///{files['other']}"
    registered = {"dq:batch:b1:databases": {fingerprint(other)}}
    ctx = SimpleNamespace(agent_config=config, settings=settings, aredis=_Redis(registered))

    def refusal(**fields: Any) -> str | None:
        request = JobRequest(model="scripted", kind="tool_run", prompt="hi", **fields)
        return asyncio.run(database_refusal(ctx, request))

    assert refusal() is None and refusal(database="shop") is None
    assert refusal(database=other, batch_id="b1", item_id="q1") is None
    assert "not a database the operator allows" in (refusal(database=other, batch_id="b2", item_id="q1") or "")
    assert "not a database the operator allows" in (refusal(database=other) or "")
    assert "own store" in (refusal(database=f"sqlite:///{files['jobs']}", batch_id="b1", item_id="q1") or "")
    assert "refused on the worker" in (refusal(database="nope") or "")


def test_the_sql_server_gets_the_configured_url_in_its_environment(config: AgentConfig, settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("datus_queue.tasks.settings.get_settings", lambda: settings)
    request = JobRequest(model="scripted", kind="tool_run", prompt="hi", database="dw")
    spec = (servers(request, config) or {})["sql"]
    assert spec["env"] == {"DQ_SQL_URL": f"postgresql://reader:{SECRET}@db.internal:5432/dw"}
    assert not any(SECRET in arg or "postgresql" in arg for arg in spec["args"])  # ps shows args
    with pytest.raises(DatabaseNotAllowed):
        servers(JobRequest(model="scripted", kind="tool_run", prompt="hi", database="sqlite:///elsewhere.db"), config)


def test_a_batch_registers_its_url_in_redis(files: dict[str, Path]) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    batch_id = f"test-{uuid.uuid4().hex}"
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    try:
        register_for_batch(client, batch_id, f"sqlite:///{files['other']}", ttl_s=60)
        key = f"dq:batch:{batch_id}:databases"
        assert client.smembers(key) == {fingerprint(f"sqlite:///{files['other']}").encode()}
        assert 0 < client.ttl(key) <= 60
        assert str(files["other"]).encode() not in b"".join(client.smembers(key))  # no URL in Redis
    finally:
        client.delete(f"dq:batch:{batch_id}:databases")
        client.close()


# -- through a real worker ----------------------------------------------------------------------


def test_a_worker_opens_a_named_database_and_refuses_a_forged_one(job_env: Any, worker: Any, client: Any,
                                                                   fake: Any) -> None:
    """A job names the operator's database and its run reads it through the SQL tools; a job
    written around the client (row and message forged) with another URL fails
    ``database_not_allowed`` before the model is asked anything; the job store is refused at submit."""
    import json as _json

    from datus.models.scripted import Reply, ScriptedToolCall
    from datus_queue.tasks.client import publish_job
    from datus_queue.tasks.schemas import JobStatus
    from tests.tasks.conftest import generations, make_shop_db

    databases = {"shopdb": f"sqlite:///{job_env.shop_db}"}
    worker("openai", env={"DQ_DATABASES": _json.dumps(databases)})
    client.settings = job_env.settings(databases=databases)  # the client reads the same operator list
    query = "SELECT count(*) AS n FROM orders"
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("read_query", {"query": query})]),
                    Reply(text="There are 5 orders."), match=lambda request: "named-db:" in _json.dumps(request.body))
    named = client.submit({"model": "openai", "kind": "tool_run", "database": "shopdb",
                           "prompt": "named-db: how many orders?"})
    with pytest.raises(InvalidJob, match="database: .*own store"):
        client.submit({"model": "openai", "kind": "tool_run", "database": job_env.database_url.split("?")[0],
                       "prompt": "store-db: read the jobs"})

    other = make_shop_db(job_env.dir / "other.db")
    forged = JobRequest(model="openai", kind="tool_run", prompt="forged-db: hi", database=f"sqlite:///{other}")
    forged_id = uuid.uuid4().hex
    client.store.create_job(forged_id, forged, "openai")
    with client.app.producer_or_acquire() as producer:
        publish_job(client.app, producer, forged_id, forged, "openai")

    result = client.result(named, timeout=60)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.output == "There are 5 orders." and [c["sql_query"] for c in result.sql_contexts] == [query]
    refused = client.result(forged_id, timeout=60)
    assert refused.status is JobStatus.FAILED and refused.error is not None
    assert refused.error.code == "database_not_allowed" and "refused on the worker" in refused.error.message
    assert generations(fake, "forged-db:") == []  # the model was never asked
