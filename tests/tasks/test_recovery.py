"""Recovery with the settings a user gets by default: real `dq worker` subprocesses, real Redis (a
private redis-server with AOF where Redis is restarted), the fake provider, the job store.

- A worker SIGKILLed mid call, or while it holds a retry's countdown message, or after a tool ran:
  another worker runs every one of its jobs again — no `dq beat` runs; the visibility timeout stays
  an hour. What the timing stands for is asserted: each job was sent again once by the sweep
  (``resends``, the sweeper's log line), not handed out by a visibility-timeout redelivery; each
  job that had not reached the provider made exactly one call; no tool ran twice; nothing of the
  dead worker is left in kombu's unacked hash for the visibility timeout to hand out later.
- A message lost between kombu's pop and its bookkeeping, or one that turns up after its job was
  sent again.
- Redis restarted under load: every job runs, and the worker does not die.
- `dq worker`, `dq beat` and `dq metrics` started while Redis (or the store) is away: each logs the
  outage once and carries on when it is back.

Timeouts only guard against hanging; the defaults bound recovery at DQ_LEASE_S + 1.25 ×
DQ_SWEEP_INTERVAL_S (27.5 s); ``ops/bench/recovery.py`` measures it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from datus.models.config import AgentConfig
from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.app import create_app
from datus_queue.tasks.cli.services import dq_command, free_port, redis_server_binary
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, Worker, generations, wait_for

FAKES = Path(__file__).resolve().parents[1] / "fakes"
pytestmark = pytest.mark.slow
RECOVERY_S = 120  # a guard against hanging; recovery takes about 30 s with the defaults


# -- a Redis of its own, to kill and start again -------------------------------------------------


class AofRedis:
    """A redis-server with AOF (fsync always) on a port and directory of its own, which a test
    can stop (SIGTERM), kill (SIGKILL) and start again on the same data."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 20, "redis-server to answer")
        client.close()

    def stop(self, how: str = "kill") -> None:
        assert self.proc is not None
        self.proc.kill() if how == "kill" else self.proc.terminate()
        self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def _pings(client: redis.Redis) -> bool:
    with contextlib.suppress(redis.exceptions.ConnectionError):
        return bool(client.ping())
    return False


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    """Not started: the test starts it (ask for it first: it is torn down after the processes)."""
    server = AofRedis(tmp_path / "redis")
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


@pytest.fixture
def client_on(job_env: JobEnv) -> Iterator[Any]:
    """``client_on(redis_url)``: a JobClient on another Redis (the job store and agent.yml as usual)."""
    made: list[tuple[JobClient, Any]] = []

    def make(redis_url: str) -> JobClient:
        settings = job_env.settings(redis_url=redis_url)
        app = create_app(settings)
        job_client = JobClient(settings=settings, agent_config=AgentConfig.from_file(job_env.agent_yml), app=app)
        made.append((job_client, app))
        return job_client

    yield make
    for job_client, app in made:
        job_client.close()
        job_client.store.close()
        app.close()


# -- dq beat and dq metrics with the defaults ------------------------------------------------------


def _environment(job_env: JobEnv, env: dict[str, str]) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
    environment.update({"DQ_CONFIG": str(job_env.agent_yml), "DQ_REDIS_URL": job_env.redis_url,
                        "DQ_DATABASE_URL": job_env.database_url, "PYTHONUNBUFFERED": "1", **env})
    return environment


@pytest.fixture
def service(job_env: JobEnv) -> Iterator[Any]:
    """``service("beat" | "metrics", *args, env=..., ready_text=...)``: `dq <name>` with the default
    settings (``env`` on top), logging to a file; stopped at teardown."""
    started: list[Worker] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None, ready_text: str = "") -> Worker:
        log_path = job_env.dir / f"{name}-{len(started) + 1}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*dq_command(), name, *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=_environment(job_env, env or {}), cwd=job_env.dir,
                                    start_new_session=True)
        handle = Worker(proc, log_path, (name,), ready_text=ready_text)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.alive():
            handle.terminate()
    for handle in started:
        handle.stop()


def _unacked_headers(client: redis.Redis) -> list[dict[str, Any]]:
    """The headers of the messages in kombu's unacked hash."""
    return [json.loads(raw)[0]["headers"] for raw in client.hvals("unacked")]


def _held(client: redis.Redis) -> dict[str, bool]:
    """Job id -> whether the message kombu's unacked hash holds for it has an eta (a retry's countdown)."""
    return {headers["id"]: bool(headers.get("eta")) for headers in _unacked_headers(client)}


def _unacked(client: redis.Redis) -> list[str]:
    """The job ids of the messages in kombu's unacked hash."""
    return [headers["id"] for headers in _unacked_headers(client)]


# -- a worker killed mid call, or holding a retry's countdown ---------------------------------------


@pytest.mark.timeout(300)
def test_a_killed_workers_jobs_run_again_on_another_worker_with_the_defaults_and_no_beat(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer, dq_redis: redis.Redis) -> None:
    # their calls hang at the provider when the worker dies (the dot: "in-flight-1." is no part of "in-flight-10.")
    in_flight = [f"in-flight-{i}." for i in range(20)]
    retrying = [f"retrying-{i}." for i in range(10)]  # answered 500 with Retry-After: the worker holds their retry
    for prompt in in_flight:
        fake.script.add(Reply(text="never seen", latency_s=300), match=prompt)
    for prompt in retrying:  # Retry-After 25 s: the countdown message is in the dead worker's hands at the kill
        fake.script.add(Fault("status", status=500, retry_after=25), match=prompt)
    first = worker("openai", concurrency=50)  # every setting at its default (no DQ_* in its environment)
    jobs = {prompt: client.submit({"model": "openai", "prompt": prompt, "stream": False})
            for prompt in in_flight + retrying}
    wait_for(lambda: len(generations(fake, "in-flight-")) == len(in_flight), 60, "every in-flight call at the provider")
    wait_for(lambda: all(client.status(jobs[p]) is JobStatus.RETRYING for p in retrying), 60,
             "the retries to be scheduled")
    # a job is marked retrying before its countdown message is published and its first message
    # acknowledged: wait until the worker holds each retry's countdown message (its eta) and nothing else
    # of those jobs, else a kill in between leaves the countdown message in the queue list for the next
    # worker to take (a recovery without a sweep, which is not what this test is about)
    wait_for(lambda: _held(dq_redis) == {**dict.fromkeys((jobs[p] for p in in_flight), False),
                                         **dict.fromkeys((jobs[p] for p in retrying), True)}
             and len(_unacked(dq_redis)) == len(jobs), 30, "the worker to hold every retry message")
    first.kill()  # SIGKILL: no lease released, no message given back
    second = worker("openai", concurrency=50)

    results = {prompt: client.result(job_id, timeout=RECOVERY_S) for prompt, job_id in jobs.items()}

    assert {prompt: r.status for prompt, r in results.items()} == dict.fromkeys(jobs, JobStatus.SUCCEEDED)
    assert all(results[prompt].output == f"echo: {prompt}" for prompt in jobs)
    rows = {prompt: client.store.get(job_id) for prompt, job_id in jobs.items()}
    # each was sent again once, by the sweep of the new worker (no dq beat runs, and the visibility
    # timeout of an hour never passed): the same attempt for a call cut off, the next for a retry
    assert {prompt: row.resends for prompt, row in rows.items()} == dict.fromkeys(jobs, 1)
    assert {(row.attempts, row.deliveries) for p, row in rows.items() if p in in_flight} == {(1, 2)}
    assert {row.attempts for p, row in rows.items() if p in retrying} == {2}
    # the call the kill cut off, then exactly one: none of these jobs made a call twice after the kill
    assert {prompt: len(generations(fake, prompt)) for prompt in jobs} == dict.fromkeys(jobs, 2)
    log = second.log()
    for prompt in in_flight:
        assert f"sweeper: job {jobs[prompt]} was running and its worker stopped renewing the lease" in log
    for prompt in retrying:
        assert f"sweeper: job {jobs[prompt]} was retrying and its retry is past due" in log
    # what the dead worker held was deleted once its jobs were sent again: nothing for kombu to hand
    # out again after the visibility timeout
    assert _unacked(dq_redis) == [] and dq_redis.zcard("unacked_index") == 0


# -- a tool run killed after its tool ran -----------------------------------------------------------


@pytest.fixture
def record_file(job_env: JobEnv) -> Path:
    """agent.yml gets a ``recorder`` MCP server writing each tool call to this file (ask for it before
    ``client`` and ``worker``, which read agent.yml)."""
    path = job_env.dir / "record.log"
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["mcp_servers"]["recorder"] = {
        "command": sys.executable, "args": [str(FAKES / "mcp_tool_server.py"), "--record", str(path)],
        "max_sessions": 1}
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _tool_calls(path: Path) -> Counter[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return Counter(line.split()[1] for line in lines if line.startswith("call "))


def _turns(fake: FakeProviderServer, tag: str) -> Counter[int]:
    """How many requests of each turn the fake received (turn n carries n-1 tool results)."""
    return Counter(1 + sum(1 for message in request.body["messages"] if message.get("role") == "tool")
                   for request in generations(fake, f"please {tag}"))


@pytest.mark.timeout(300)
def test_a_tool_run_killed_after_its_tool_ran_resumes_on_another_worker_without_running_it_again(
        record_file: Path, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    tags = [f"killed-tool-{i}" for i in range(4)]
    for tag in tags:  # turn 1 calls the tool; turn 2 hangs at the provider (the kill lands there); then the answer
        fake.script.add(Reply(reasoning="record it first",
                              tool_calls=[ScriptedToolCall("record", {"tag": tag}, id=f"call-{tag}")]),
                        Fault("hang", seconds=300), Reply(text=f"done {tag}"), match=tag)
    first = worker("openai")  # the default settings
    jobs = {tag: client.submit({"model": "openai", "kind": "tool_run", "prompt": f"please {tag}",
                                "mcp_servers": ["recorder"]}) for tag in tags}
    wait_for(lambda: all(_turns(fake, tag)[2] == 1 for tag in tags), 60, "every tool run in its second turn")
    first.kill()
    second = worker("openai")

    results = {tag: client.result(job_id, timeout=RECOVERY_S) for tag, job_id in jobs.items()}

    assert {tag: (r.status, r.output) for tag, r in results.items()} == {
        tag: (JobStatus.SUCCEEDED, f"done {tag}") for tag in tags}
    assert _tool_calls(record_file) == Counter(tags)  # each tool ran exactly once: before the kill
    assert {tag: _turns(fake, tag) for tag in tags} == {tag: Counter({1: 1, 2: 2}) for tag in tags}
    assert {client.store.get(job_id).resends for job_id in jobs.values()} == {1}  # sent again by the sweep
    log = second.log()
    assert all(f"sweeper: job {job_id} was running and its worker stopped renewing the lease" in log
               for job_id in jobs.values())


# -- lost and late messages ------------------------------------------------------------------------


def test_a_job_whose_message_was_lost_is_sent_again_once_without_beat(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer, dq_redis: redis.Redis) -> None:
    job_id = client.submit({"model": "openai", "prompt": "lost-message", "stream": False})
    assert dq_redis.delete("llm.openai") == 1  # its message, gone (as between kombu's pop and its bookkeeping)
    running = worker("openai")
    result = client.result(job_id, timeout=RECOVERY_S)
    assert result.status is JobStatus.SUCCEEDED and result.output == "echo: lost-message"
    row = client.store.get(job_id)
    assert (row.resends, row.attempts) == (1, 1)  # exactly one re-send by the sweep
    assert len(generations(fake, "lost-message")) == 1
    assert (f"sweeper: job {job_id} was queued and its message is in no queue and in no live worker's hands: "
            f"sent again (re-send 1 of 5)") in running.log()


def test_a_message_that_turns_up_after_its_resend_makes_no_second_call(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer, dq_redis: redis.Redis) -> None:
    fake.script.add(Reply(text="answered once", latency_s=4.0), match="late-message")
    job_id = client.submit({"model": "openai", "prompt": "late-message", "stream": False})
    assert dq_redis.rpoplpush("llm.openai", "elsewhere")  # the message is somewhere the sweep does not see
    worker("openai")
    wait_for(lambda: generations(fake, "late-message"), RECOVERY_S, "the re-sent message to start the job")
    assert dq_redis.rpoplpush("elsewhere", "llm.openai")  # the first message turns up while the job runs
    result = client.result(job_id, timeout=RECOVERY_S)
    assert result.status is JobStatus.SUCCEEDED and result.output == "answered once"
    # the late duplicate is handled (and acknowledged) without a second call
    wait_for(lambda: not dq_redis.llen("llm.openai") and not _unacked(dq_redis), RECOVERY_S,
             "the late message to be handled")
    assert len(generations(fake, "late-message")) == 1
    assert client.store.get(job_id).resends == 1


# -- Redis restarted under load ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "terminate"])
@pytest.mark.timeout(300)
def test_redis_restarted_right_after_a_submit_every_job_runs_and_the_worker_lives_on(
        aof_redis: AofRedis, how: str, worker: StartWorker, client_on: Any, fake: FakeProviderServer) -> None:
    """Issue 18 measured 92 of 200 jobs `queued` for good after this. Where they were: in kombu's
    unacked hash — the worker had taken them, and when the connection dropped it tried to put them
    back while Redis was down — and in some runs the worker process had died on kombu's second close
    of the dead channel. Now the worker lives on and the sweep sends those jobs again."""
    aof_redis.start()
    fake.latency_s = 1.0
    # DQ_WORKER_CONCURRENCY's default (the fixture's is 8); every other setting at its default too
    running = worker("openai", concurrency=200, env={"DQ_REDIS_URL": aof_redis.url})
    client = client_on(aof_redis.url)
    jobs = client.submit_many([{"model": "openai", "prompt": f"restart-{i}.", "stream": False} for i in range(200)])
    wait_for(lambda: len(generations(fake, "restart-")) >= 10, 30, "the run to be under way")
    aof_redis.stop(how)  # calls in flight, messages waiting and taken, acknowledgements on their way
    time.sleep(2.0)
    aof_redis.start()

    results = {job_id: client.result(job_id, timeout=RECOVERY_S) for job_id in jobs}

    assert {r.status for r in results.values()} == {JobStatus.SUCCEEDED}, [
        (job_id, r.status, r.error) for job_id, r in results.items() if r.status is not JobStatus.SUCCEEDED]
    assert [r.output for r in results.values()] == [f"echo: restart-{i}." for i in range(200)]
    assert running.alive(), running.log()[-3000:]
    log = running.log()
    assert "Unrecoverable error" not in log
    # one line for the outage and one for its end, not one per reconnect attempt or per job
    assert log.count("consumer: Connection to broker lost") == 1 and log.count("again after") == 1
    assert all(len(generations(fake, f"restart-{i}.")) <= 2 for i in range(200))  # at most the cut-off call again
    with contextlib.closing(aof_redis.client()) as check:
        wait_for(lambda: not _unacked(check), 30, "nothing left in kombu's unacked hash")


# -- started while Redis is away --------------------------------------------------------------------


def _scrape(port: int) -> dict[str, float]:
    """The samples `dq metrics` serves ({} while it does not listen yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def _outage_lines(log: str) -> int:
    return sum(1 for line in log.splitlines() if "waiting for it" in line)


@pytest.mark.timeout(300)
def test_worker_beat_and_metrics_started_while_redis_is_down_carry_on_once_it_is_up(
        aof_redis: AofRedis, worker: StartWorker, service: Any, client_on: Any, fake: FakeProviderServer) -> None:
    env = {"DQ_REDIS_URL": aof_redis.url}  # nothing listens there yet; every other setting at its default
    port = free_port()
    running = worker("openai", env=env, wait=False)
    scheduler = service("beat", env=env)
    metrics = service("metrics", "--port", str(port), env=env)
    wait_for(lambda: _scrape(port), 60, "dq metrics to serve")
    assert _scrape(port)["dq_redis_up"] == 0 and _scrape(port)["dq_store_up"] == 1  # it serves what it can
    for process in (running, scheduler, metrics):  # dq metrics tries Redis at each scrape
        wait_for(lambda p=process: _outage_lines(p.log()) or not p.alive(), 60, f"{process.providers} to wait")
    time.sleep(6.0)  # several reconnect attempts of each: still one line each
    assert all(process.alive() for process in (running, scheduler, metrics))

    aof_redis.start()

    running.wait_ready()
    job = client_on(aof_redis.url).submit({"model": "openai", "prompt": "after the outage", "stream": False})
    assert client_on(aof_redis.url).result(job, timeout=RECOVERY_S).output == "echo: after the outage"
    wait_for(lambda: "beat: Acquired lock" in scheduler.log(), 60, "dq beat to take its lock")
    wait_for(lambda: _scrape(port).get("dq_redis_up") == 1, 30, "dq metrics to read Redis")
    assert "dq_queue_messages{queue=\"llm.openai\"}" in _scrape(port)
    wait_for(lambda: _scrape(port).get("dq_sweeps", 0) >= 1, 60, "the worker's first sweep")
    for process in (running, scheduler, metrics):
        log = process.log()
        assert process.alive(), log[-3000:]
        assert _outage_lines(log) == 1, log[-3000:]  # one readable line for the outage…
        assert "Traceback" not in log and "CRITICAL" not in log, log[-3000:]  # …and no traceback storm
    assert "dq beat: Redis is back after" in scheduler.log()
    assert "Connected to" in running.log() and "again after" in running.log()


@pytest.mark.timeout(300)
def test_a_job_store_away_at_start_is_waited_for_by_the_worker_and_dq_metrics(
        job_env: JobEnv, worker: StartWorker, service: Any) -> None:
    # the store (a SQLite file) cannot be opened at first: its path is taken by a directory
    path = job_env.dir / "away" / "jobs.db"
    path.mkdir(parents=True)
    env = {"DQ_DATABASE_URL": f"sqlite:///{path}"}
    port = free_port()
    running = worker("openai", env=env)
    metrics = service("metrics", "--port", str(port), env=env)
    wait_for(lambda: "the job store is unreachable" in running.log(), 60, "the worker's sweep to find the store away")
    wait_for(lambda: _scrape(port).get("dq_store_up") == 0, 60, "dq metrics to find the store away")
    assert _scrape(port)["dq_redis_up"] == 1

    path.rmdir()  # the store can be opened now

    wait_for(lambda: _scrape(port).get("dq_store_up") == 1, 60, "dq metrics to read the store")
    wait_for(lambda: "the job store is back after" in running.log(), 60, "the worker's sweep to find the store")
    for process in (running, metrics):
        log = process.log()
        assert process.alive() and log.count("the job store is unreachable") == 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
