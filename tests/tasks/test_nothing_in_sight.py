"""Nothing secret or private in sight (issue 19): planted secrets and a planted prompt, real jobs
through a real ``dq worker``, and every place a person or another process can read, scanned.

Planted secrets: a token in an MCP server's URL query (``?api_key=…``, a shape no key pattern
knows: only URL masking can catch it), a provider error echoing the configured key and a token
of its own (the fake's scripted fault), a stdio MCP server's secret passed as ``${VAR}`` in its
``env:``. Planted prompt: every job's prompt carries `PROMPT`.

Scanned: the job store (every table and column), Redis (every key: the queues' raw messages —
what ``celery inspect active|reserved`` and Flower show —, kombu's unacked hash while a job is
in flight, the event streams), the pub/sub messages as a subscriber received them, the worker's
log (stdout and stderr, at DEBUG), ``dq status`` of every job, ``celery inspect`` itself, and the
command line of every process on the machine (``ps``) while a stdio MCP server runs a tool.

The secrets may be nowhere. The prompt may be only in the job's own conversation: the store's
``request`` column, the tool run's checkpoints (the model's messages) and the job's own event
stream (its ``user_input`` step, read by the job's client) — never in a task message, a log
line, a command line, ``dq status`` or a dead letter.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
import redis
import yaml
from sqlalchemy import create_engine, inspect, text

from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import (
    KNOWN_KEY,
    JobEnv,
    StartWorker,
    _environment,
    free_port,
    generations,
    tool_run_skip_reason,
    wait_for,
    worker_logs,
)
from tests.tasks.test_jobs_secrets import dump_redis

RUN = uuid.uuid4().hex[:10]
PROMPT = f"PLANTED-PROMPT-{RUN}"
MCP_TOKEN = f"mcptok{RUN}"  # in an MCP URL's query: no key shape, only URL masking catches it
ERROR_TOKEN = f"errtok{RUN}"  # in a provider's error, as a URL's query value
ENV_SECRET = f"envsecret{RUN}"  # a stdio MCP server's ${VAR} secret, in its env:
SECRETS = (KNOWN_KEY, MCP_TOKEN, ERROR_TOKEN, ENV_SECRET)


def assert_no_secret(where: str, blob: str | bytes) -> None:
    data = blob if isinstance(blob, str) else blob.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in data, f"{secret!r} found in {where}"


def assert_no_prompt(where: str, blob: str | bytes) -> None:
    data = blob if isinstance(blob, str) else blob.decode("utf-8", "replace")
    assert PROMPT not in data, f"the prompt found in {where}"


def task_messages(client: redis.Redis) -> list[tuple[str, Any]]:
    """Every job message in Redis — on a queue, or taken and not yet acknowledged (kombu's
    ``unacked`` hash) — as its headers and decoded body: what inspect and Flower show."""
    found: list[tuple[str, Any]] = []
    raw: list[tuple[str, bytes]] = []
    for key in client.scan_iter(count=500):
        kind = client.type(key).decode()
        if kind == "list":
            raw += [(key.decode(), entry) for entry in client.lrange(key, 0, -1)]
        elif kind == "hash" and key == b"unacked":
            raw += [("unacked", entry) for entry in client.hvals(key)]
    for where, entry in raw:
        try:
            envelope = json.loads(entry)
            if where == "unacked":  # [message, exchange, routing_key]
                envelope = envelope[0]
            if not isinstance(envelope, dict) or "body" not in envelope:
                continue
        except (ValueError, IndexError, KeyError, TypeError):
            continue
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        found.append((where, {"headers": envelope.get("headers"), "body": json.loads(body)}))
    return found


class Subscriber:
    """Every pub/sub message published while it listens, as received."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("*")
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self.stop.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                self.received.append(message["channel"] + b" " + bytes(message["data"]))

    def close(self) -> list[bytes]:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()
        return self.received


class CommandLines:
    """The command line of every process on the machine (``ps -eww``), sampled until stopped."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
        self.seen.update(line.strip() for line in out.splitlines())

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.1)

    def close(self) -> set[str]:
        self.stop.set()
        self.thread.join(5)
        self.sample()
        return self.seen


def store_cells(database_url: str) -> list[tuple[str, str, str]]:
    """Every non-null cell of the job store as ``(table, column, text)``."""
    engine = create_engine(database_url)
    cells: list[tuple[str, str, str]] = []
    try:
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                result = conn.execute(text(f'SELECT * FROM "{table}"'))
                columns = list(result.keys())
                for row in result:
                    cells += [(table, column, value if isinstance(value, str) else repr(value))
                              for column, value in zip(columns, row) if value is not None]
    finally:
        engine.dispose()
    return cells


def add_servers(job_env: JobEnv, mcp_port: int) -> None:
    """Two MCP servers in the test's agent.yml: one reached over HTTP with a token in its URL's
    query (nothing listens there: the job fails naming the URL), and the shipped SQL server
    over stdio with a secret handed to it in ``env:`` as ``${VAR}``."""
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["mcp_servers"].update({
        "tokened": {"url": f"http://127.0.0.1:{mcp_port}/mcp?api_key={MCP_TOKEN}", "timeout_s": 2},
        "vault": {"command": sys.executable, "args": ["-m", "datus.mcp_servers.sql_server"],
                  "env": {"DQ_SQL_URL": f"sqlite:///{job_env.shop_db}", "VAULT_TOKEN": "${DQ_TEST_VAULT_TOKEN}"}},
    })
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))
@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps (procps) to read every process's command line")
def test_a_planted_secret_is_nowhere_and_a_planted_prompt_only_in_the_jobs_own_conversation(
        job_env: JobEnv, worker: StartWorker, dq_redis: redis.Redis, fake: FakeProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from datus.models.config import AgentConfig
    from datus_queue.tasks.app import create_app

    monkeypatch.setenv("DQ_TEST_VAULT_TOKEN", ENV_SECRET)  # the client reads agent.yml too
    add_servers(job_env, free_port())
    settings = job_env.settings()
    app = create_app(settings)
    client = JobClient(settings=settings, agent_config=AgentConfig.from_file(job_env.agent_yml), app=app)
    subscriber = Subscriber(job_env.redis_url)
    command_lines = CommandLines()
    try:
        fake.script.add(Reply(text="a plain answer", latency_s=5.0), match=f"slow {PROMPT}")
        fake.script.add(Reply(text="another plain answer"), match=f"generate {PROMPT}")
        fake.script.add(Fault("status", status=401, message=(
            f"Incorrect API key provided: {KNOWN_KEY}. See https://fake.example/keys?token={ERROR_TOKEN}")),
            match=f"denied {PROMPT}")
        fake.script.add(Reply(tool_calls=[ScriptedToolCall("list_tables", {})]),
                        Reply(text="the tables are customers and orders"), match=f"tools {PROMPT}")
        running = worker("openai", loglevel="DEBUG", env={"DQ_TEST_VAULT_TOKEN": ENV_SECRET})

        # a message nobody consumes (no deepseek worker): what `celery inspect reserved` / Flower show
        waiting = client.submit({"model": "deepseek", "prompt": f"waiting {PROMPT}",
                                 "metadata": {"owner": f"meta {PROMPT}"}})
        slow = client.submit({"model": "openai", "prompt": f"slow {PROMPT}", "metadata": {"owner": PROMPT}})
        wait_for(lambda: client.status(slow) is JobStatus.RUNNING, 20, "the slow job to run")
        in_flight = task_messages(dq_redis)  # the slow one is taken, not yet acknowledged
        inspected: dict[str, Any] = {}
        for _ in range(3):  # as `celery inspect active` asks the worker (a busy machine may answer late)
            inspected = app.control.inspect(timeout=2).active() or {}
            if any(slow in json.dumps(active, default=str) for active in inspected.values()):
                break
        assert {where for where, _ in in_flight} >= {"unacked"}, in_flight
        assert any(message["headers"]["id"] == waiting for _, message in in_flight)

        jobs = {
            "slow": slow,
            "generate": client.submit({"model": "openai", "prompt": f"generate {PROMPT}"}),
            "denied": client.submit({"model": "openai", "prompt": f"denied {PROMPT}"}),
            "tokened": client.submit({"model": "openai", "kind": "tool_run", "prompt": f"tokened {PROMPT}",
                                      "mcp_servers": ["tokened"]}),
            "tools": client.submit({"model": "openai", "kind": "tool_run", "prompt": f"tools {PROMPT}",
                                    "mcp_servers": ["vault"]}),
        }
        results = {name: client.result(job_id, timeout=60) for name, job_id in jobs.items()}
        for name in ("slow", "generate", "tools"):
            assert results[name].status is JobStatus.SUCCEEDED, (name, results[name].error)
        for name in ("denied", "tokened"):
            assert results[name].status is JobStatus.FAILED and results[name].error is not None, name
        # the secrets were really there, masked: the error names what happened
        assert "Incorrect API key provided: ***" in results["denied"].error.message
        assert "token=***" in results["denied"].error.message
        assert "api_key=***" in results["tokened"].error.message, results["tokened"].error
        # the key was really sent, the stdio server really ran with its secret (pooled: still running)
        assert any(KNOWN_KEY in json.dumps(request.headers) for request in generations(fake))
        seen = command_lines.close()
        assert any("datus.mcp_servers.sql_server" in line for line in seen), "ps saw the stdio MCP server"
        statuses = [subprocess.run([*dq_command(), "status", job_id], check=False, env=_environment(
            job_env, {"DQ_TEST_VAULT_TOKEN": ENV_SECRET}), cwd=job_env.dir, capture_output=True, text=True,
            timeout=60) for job_id in [*jobs.values(), waiting]]
        after = task_messages(dq_redis)
        redis_dump = dump_redis(dq_redis)
    finally:
        received = subscriber.close()
        command_lines.close()
        client.close()
        client.store.close()
        app.close()
    running.stop()

    # task messages (queued and unacknowledged; what inspect and Flower show): no prompt, no URL
    messages = in_flight + after
    assert messages
    for where, message in messages:
        _, payload = message["body"][0]
        assert set(payload) <= {"schema_version", "provider", "kind", "model"}, payload
        assert_no_secret(f"the task message in {where}", json.dumps(message))
        assert_no_prompt(f"the task message in {where}", json.dumps(message))
    assert any(slow in json.dumps(active, default=str) for active in inspected.values()), inspected  # it answered
    for worker_name, active in inspected.items():
        assert_no_secret(f"celery inspect active of {worker_name}", json.dumps(active, default=str))
        assert_no_prompt(f"celery inspect active of {worker_name}", json.dumps(active, default=str))

    # Redis, every key and value; pub/sub as received (events: the job's own conversation)
    assert any(slow.encode() in key for key in redis_dump)
    for key, value in redis_dump.items():
        assert_no_secret(f"Redis key {key!r}", key + b"\n" + value)
        if b"events" not in key:  # an event stream is the job's own steps (its user_input): the prompt may be there
            assert_no_prompt(f"Redis key {key!r}", key + b"\n" + value)
    assert received, "the subscriber heard the events"
    for message in received:
        assert_no_secret("a pub/sub message", message)

    # the job store: the secrets nowhere; the prompt only in the request and the model's own messages
    cells = store_cells(job_env.database_url)
    assert any(table == "jobs" and column == "request" and PROMPT in value for table, column, value in cells)
    for table, column, value in cells:
        assert_no_secret(f"the job store's {table}.{column}", value)
        if (table, column) not in (("jobs", "request"), ("job_checkpoints", "step")):
            assert_no_prompt(f"the job store's {table}.{column}", value)

    # the worker's log (its stdout and stderr, at DEBUG): it logged the jobs, neither secret nor prompt
    logs = worker_logs(job_env)
    assert logs and all(jobs["denied"] in log for log in logs.values())
    for name, log in logs.items():
        assert_no_secret(name, log)
        assert_no_prompt(name, log)

    # dq status of every job
    for done in statuses:
        assert done.returncode == 0, done.stderr
        assert_no_secret("dq status", done.stdout + done.stderr)
        assert_no_prompt("dq status", done.stdout + done.stderr)
    assert any("api_key=***" in done.stdout for done in statuses)

    # every command line on the machine while the stdio MCP server ran its tool
    for line in seen:
        assert_no_secret("a command line (ps)", line)
        assert_no_prompt("a command line (ps)", line)
