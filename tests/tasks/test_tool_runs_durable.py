"""Durable tool runs and the worker's MCP pool, end to end: real `dq worker` processes, a
recording MCP server (tests/fakes/mcp_tool_server.py: every call of its ``record`` tool is a
line in a file) and the fake provider over HTTP.

The crash of issue 13 as a test: the tool has run, the worker dies while the model holds the
next turn's request (a scripted hang), a new worker takes the job over. Each tool ran exactly
once, no answered turn was asked again, the event stream holds each step once, and the result
is an uninterrupted run's. And of issue 18: the job's event stream is gone (expired, or trimmed
by its cap) when the run resumes, which it does from the job store alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
import yaml

from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks import keys
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.events import read_events
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import SHORT_SCHEDULER, JobEnv, StartBeat, StartWorker, generations, recorded_events, wait_for

FAKES = Path(__file__).resolve().parents[1] / "fakes"
pytestmark = pytest.mark.slow


@pytest.fixture
def record_file(job_env: JobEnv) -> Path:
    """agent.yml gets a ``recorder`` server (one session, so one process) writing to this file
    (ask for it before ``client`` and ``worker``, which read agent.yml)."""
    path = job_env.dir / "record.log"
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["mcp_servers"]["recorder"] = {
        "command": sys.executable, "args": [str(FAKES / "mcp_tool_server.py"), "--record", str(path)],
        "max_sessions": 1}
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def record_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def calls(path: Path) -> Counter[str]:
    return Counter(parts[1] for parts in record_lines(path) if parts[0] == "call")


def server_pids(path: Path) -> list[int]:
    return [int(parts[1]) for parts in record_lines(path) if parts[0] == "start"]


def script_run(fake: FakeProviderServer, tag: str, turn_two: list, hold_s: float = 0.0) -> None:
    """Turn 1: call ``record(tag)``; turn 2: ``turn_two`` (faults), then the final answer."""
    fake.script.add(Reply(reasoning="record it first",
                          tool_calls=[ScriptedToolCall("record", {"tag": tag, "hold_s": hold_s}, id=f"call-{tag}")]),
                    *turn_two, Reply(text=f"done {tag}"), match=tag)


def submit(client: JobClient, tag: str, **extra: object) -> str:
    return client.submit({"model": "openai", "kind": "tool_run", "prompt": f"please {tag}",
                          "mcp_servers": ["recorder"], **extra})


def turn_requests(fake: FakeProviderServer, tag: str) -> Counter[int]:
    """How many requests of each turn the fake received (turn n carries n-1 tool results)."""
    found: Counter[int] = Counter()
    for request in generations(fake, f"please {tag}"):
        found[1 + sum(1 for message in request.body["messages"] if message.get("role") == "tool")] += 1
    return found


def assert_steps_once(client: JobClient, job_id: str, workflow: list[str]) -> None:
    events = recorded_events(client, job_id)
    assert [event.seq for event in events] == list(range(1, len(events) + 1))  # no gap
    steps = [event.step for event in events if event.step["action_type"] != "assistant_delta"]
    keys = [(step["action_id"], step["status"]) for step in steps]
    assert len(keys) == len(set(keys)), "a step was published twice"
    run = [(step["action_type"], step["status"]) for step in steps if step["role"] != "workflow"]
    assert run == [("user_input", "success"), ("message", "success"), ("record", "processing"),
                   ("record", "success"), ("final_response", "success")]
    assert [step["action_type"] for step in steps if step["role"] == "workflow"] == workflow


@pytest.mark.parametrize("stop", ["sigkill", "sigkill-sweeper", "sigterm"])
def test_a_worker_stopped_after_the_tool_resumes_without_running_it_again(
        record_file: Path, stop: str, worker: StartWorker, beat: StartBeat, client: JobClient,
        fake: FakeProviderServer) -> None:
    # sigkill: Redis hands the message out again after the visibility timeout, and the dead
    # worker's lease (2 s) has passed by then; sigkill-sweeper: the visibility timeout stays an
    # hour and the sweeper of `dq beat` sends the job again once the lease passed
    visibility_s = 3600 if stop == "sigkill-sweeper" else 4
    env = dict(SHORT_SCHEDULER)
    first = worker("openai", visibility_timeout_s=visibility_s, env=env)
    if stop == "sigkill-sweeper":
        beat()
    script_run(fake, f"{stop}-r", [])  # a run nothing stops, to compare with (same lengths: same token counts)
    reference = client.result(submit(client, f"{stop}-r"), timeout=30)
    tags = [f"{stop}-{i}" for i in range(3)]
    for tag in tags:
        script_run(fake, tag, [Fault("hang", seconds=60)])
    jobs = {tag: submit(client, tag) for tag in tags}
    # every tool has run and every turn 2 is being held by the fake: the kill lands in between
    wait_for(lambda: all(turn_requests(fake, tag)[2] == 1 for tag in tags), 30, "every turn-2 request held")
    delivered = time.monotonic()
    if stop == "sigkill":
        first.kill()
        time.sleep(max(0.0, delivered + visibility_s + 0.5 - time.monotonic()))  # Redis hands it out again then
    elif stop == "sigkill-sweeper":
        first.kill()
    else:
        first.terminate()  # soft shutdown: the jobs are requeued at once
        assert first.wait_exit(30) is not None
    second = worker("openai", visibility_timeout_s=visibility_s, env=env)
    results = {tag: client.result(job_id, timeout=40) for tag, job_id in jobs.items()}

    assert reference.status is JobStatus.SUCCEEDED
    assert calls(record_file) == Counter({f"{stop}-r": 1, **{tag: 1 for tag in tags}})  # each tool ran exactly once
    for tag, result in results.items():
        assert result.status is JobStatus.SUCCEEDED, result.error
        assert result.output == f"done {tag}" and result.attempts == 1
        # turn 1 was asked once; turn 2 twice: the request the stop cut off, then the one answered
        assert turn_requests(fake, tag) == Counter({1: 1, 2: 2})
        assert_steps_once(client, jobs[tag], ["resumed"])
        assert f"[{jobs[tag]}] received" in second.log()
        # the same answer, and the usage of both turns, as the run that was never stopped
        assert (result.usage["input_tokens"], result.usage["output_tokens"], result.usage["requests"]) == (
            reference.usage["input_tokens"], reference.usage["output_tokens"], reference.usage["requests"])
        assert result.sql_contexts == reference.sql_contexts


@pytest.mark.parametrize(("stop", "lost"), [("sigterm", "deleted"), ("sigterm", "trimmed"), ("sigkill", "deleted")])
def test_a_run_whose_event_stream_is_gone_resumes_from_the_store_alone(
        record_file: Path, stop: str, lost: str, worker: StartWorker, client: JobClient, fake: FakeProviderServer,
        dq_redis: redis.Redis) -> None:
    # default settings throughout: a SIGTERM requeues the job at once; after a SIGKILL the
    # lease lapses and the job is sent again
    tag = f"lost-{stop}-{lost}"
    script_run(fake, tag, [], hold_s=60.0)  # the tool call is under way when the worker stops
    first = worker("openai")
    job_id = submit(client, tag)
    wait_for(lambda: calls(record_file)[tag] == 1, 30, "the tool call in flight")
    before = [event.step for event in read_events(client.redis, job_id)]
    if stop == "sigkill":
        first.kill()
    else:
        first.terminate()
        assert first.wait_exit(30) is not None
    if lost == "deleted":  # as when it expired: the stream and its counter
        dq_redis.delete(keys.job_events(job_id), keys.job_event_seq(job_id))
    else:  # as when a long run's deltas pushed its first entries past the cap: only the newest is left
        dq_redis.xtrim(keys.job_events(job_id), maxlen=1, approximate=False)
    left = [event.step for event in read_events(client.redis, job_id)]
    assert left == ([] if lost == "deleted" else before[-1:])
    worker("openai")
    result = client.result(job_id, timeout=90)

    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.output == f"done {tag}"
    assert calls(record_file)[tag] == 2  # the call under way is made again: the one thing that can repeat
    assert turn_requests(fake, tag) == Counter({1: 1, 2: 1})  # the answered turn was not asked again
    published = [(s["action_type"], s["status"]) for s in before if s["action_type"] != "assistant_delta"]
    assert published == [("user_input", "success"), ("message", "success"), ("record", "processing")]
    steps = [event.step for event in recorded_events(client, job_id)]
    after = [step for step in steps[len(left):] if step["action_type"] != "assistant_delta"]
    # the new delivery publishes only what no delivery published before: none of the steps above
    assert [(step["action_type"], step["status"]) for step in after] == [
        ("resumed", "success"), ("record", "success"), ("final_response", "success")]
    assert after[1]["action_id"] == before[-1]["action_id"] and after[1]["output"]["resumed"] is True
    keys_ = [(step["action_id"], step["status"]) for step in steps if step["action_type"] != "assistant_delta"]
    assert len(keys_) == len(set(keys_)), "a step was published twice"


@pytest.mark.parametrize("job_db_url", ["sqlite", "postgres"], indirect=True)
def test_a_server_error_after_the_tool_is_a_job_retry_that_resumes(
        record_file: Path, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    # the model config allows 4 in-process retries: five 500s outlast them
    script_run(fake, "broken", [Fault("status", status=500)] * 5)
    worker("openai")
    job_id = submit(client, "broken")
    result = client.result(job_id, timeout=40)

    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.attempts == 2 and result.output == "done broken"
    assert calls(record_file) == Counter({"broken": 1})
    assert turn_requests(fake, "broken") == Counter({1: 1, 2: 6})  # five 500s, then the answer
    assert_steps_once(client, job_id, ["retry", "resumed"])


def test_a_long_rate_limit_after_the_tool_goes_back_to_the_queue_and_resumes(
        record_file: Path, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    # a 429 spends the job's time budget, not its attempts; its Retry-After is longer than a
    # wait in the worker, so the job is handed back to the queue and its next delivery resumes
    script_run(fake, "limited", [Fault("rate_limit", retry_after=2)])
    worker("openai")
    job_id = submit(client, "limited")
    result = client.result(job_id, timeout=40)

    assert result.status is JobStatus.SUCCEEDED, result.error
    assert (result.attempts, result.rate_limit_waits) == (1, 1) and result.output == "done limited"
    assert calls(record_file) == Counter({"limited": 1})
    assert turn_requests(fake, "limited") == Counter({1: 1, 2: 2})  # the 429, then the answer
    assert_steps_once(client, job_id, ["rate_limit_wait", "resumed"])


def test_a_pooled_server_killed_mid_batch_is_restarted_once_and_the_batch_completes(
        record_file: Path, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    running = worker("openai", concurrency=8)
    tags = [f"batch-{i}" for i in range(6)]
    for tag in tags:
        script_run(fake, tag, [], hold_s=30.0)  # the calls stay in flight until the server dies
    jobs = {tag: submit(client, tag) for tag in tags}
    wait_for(lambda: len(calls(record_file)) == len(tags), 30, "every tool call in flight on the one server")
    [pid] = server_pids(record_file)
    os.kill(pid, signal.SIGKILL)  # the calls in flight fail; made again on the new server, they answer at once
    results = {tag: client.result(job_id, timeout=60) for tag, job_id in jobs.items()}

    assert all(result.status is JobStatus.SUCCEEDED for result in results.values()), [
        (tag, r.error) for tag, r in results.items()]
    assert len(server_pids(record_file)) == 2, "started once, restarted once"
    steps = {tag: [e.step for e in read_events(client.redis, job_id)] for tag, job_id in jobs.items()}
    for tag in tags:
        done = [s for s in steps[tag] if s["action_type"] == "record" and s["status"] != "processing"]
        assert [s["output"].get("resumed") for s in done] == [True]  # it was in flight: it may repeat, and says so
        assert calls(record_file)[tag] == 2
    assert running.alive()


def test_sigterm_leaves_no_mcp_server_running(record_file: Path, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    running = worker("openai")
    script_run(fake, "orphans", [])
    assert client.result(submit(client, "orphans"), timeout=30).status is JobStatus.SUCCEEDED
    [pid] = server_pids(record_file)
    assert _alive(pid), "the pooled server outlives the job"
    running.terminate()
    assert running.wait_exit(30) is not None
    wait_for(lambda: not _alive(pid), 10, "the pooled server to exit with the worker")
    assert [p for p in _processes_running(str(record_file))] == []


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def _processes_running(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes() and _alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
    return found
