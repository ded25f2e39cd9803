"""The job system end to end, as a user sees it: a `JobClient` submits into a real Redis,
``python -m datus_queue.workers`` subprocesses pinned to a provider run the jobs against the fake provider
server over HTTP (the official SDKs on the wire), results land in the SQL job store and every
step streams back. Faults are in test_jobs_faults.py, the secret scan in test_jobs_secrets.py."""

from __future__ import annotations

import importlib
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from datus.models.scripted import Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.events import read_events
from datus_queue.tasks.schemas import JobEvent, JobStatus
from tests.tasks.conftest import (
    PROVIDERS,
    JobEnv,
    StartWorker,
    Worker,
    _environment,
    generations,
    recorded_events,
    tool_run_skip_reason,
    wait_for,
)

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"sql": {"type": "string"}, "explanation": {"type": "string"}},
    "required": ["sql", "explanation"],
}
# where each provider's generation requests land on the fake
PATHS = {"openai": "/v1/chat/completions", "deepseek": "/v1/chat/completions", "qwen": "/v1/chat/completions",
         "gemini": "generateContent", "claude": "/v1/messages"}
MODELS = {"openai": "gpt-4o-mini", "deepseek": "deepseek-chat", "qwen": "qwen-plus", "gemini": "gemini-2.5-flash",
          "claude": "claude-sonnet-4-5"}


def assert_one_gapless_stream(events: list[JobEvent]) -> None:
    """seq 1..n, each once, exactly one terminal event and it is the last."""
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert [event.terminal for event in events].count(True) == 1 and events[-1].terminal


def test_registered_task_names_are_the_wire_contract() -> None:
    from datus_queue.tasks.app import TASK_MODULES, app
    from datus_queue.tasks.client import TASK_NAMES

    for module in TASK_MODULES:  # what a worker imports
        importlib.import_module(module)
    from datus_queue.tasks.routing import MAINTENANCE_TASKS

    ours = {name for name in app.tasks if not name.startswith("celery.")}
    assert ours == {"dq.generate", "dq.tool_run", "dq.sweep", "dq.prune", "dq.run_schedule"}
    # the client and dq beat send only names a worker knows
    assert set(TASK_NAMES.values()) | MAINTENANCE_TASKS == ours


def _generate_json_and_stream(provider: str, worker: StartWorker, client: JobClient,
                              fake: FakeProviderServer) -> None:
    running = worker(provider)
    banner = running.log().split("[tasks]", 1)[1].split("\n\n", 1)[0]
    assert {line.strip(" .") for line in banner.strip().splitlines()} == {
        "dq.generate", "dq.tool_run", "dq.sweep", "dq.prune", "dq.run_schedule"}

    fake.script.add(Reply(text="SELECT count(*) FROM orders", input_tokens=20, output_tokens=8),
                    match=f"gen-{provider}")
    answer = {"sql": "SELECT city, count(*) FROM customers GROUP BY city", "explanation": "customers per city"}
    fake.script.add(Reply(text=json.dumps(answer)), match=f"json-{provider}")
    fake.script.add(Reply(text="plain answer"), match=f"plain-{provider}")

    streamed = client.submit({"model": provider, "prompt": f"gen-{provider}: how many orders?"})
    as_json = client.submit({"model": provider, "kind": "json", "prompt": f"json-{provider}: customers per city",
                             "output_schema": ANSWER_SCHEMA})
    plain = client.submit({"model": provider, "prompt": f"plain-{provider}: hello", "stream": False})

    steps = list(client.stream(streamed, timeout=30))
    result = client.result(streamed, timeout=30)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert (result.output, result.provider, result.model, result.attempts) == (
        "SELECT count(*) FROM orders", provider, provider, 1)
    assert result.usage and result.usage["input_tokens"] == 20 and result.usage["output_tokens"] == 8
    assert result.run_ms is not None and result.queue_ms is not None
    assert steps[0].action_type == "user_input" and steps[0].messages == f"gen-{provider}: how many orders?"
    deltas = [step for step in steps if step.action_type == "assistant_delta"]
    assert len(deltas) >= 2, "a streamed job publishes its text deltas"
    assert "".join(step.output["text"] for step in deltas) == result.output
    assert steps[-1].action_type == "final_response" and steps[-1].output["content"] == result.output
    assert_one_gapless_stream(recorded_events(client, streamed))

    json_result = client.result(as_json, timeout=30)
    assert json_result.status is JobStatus.SUCCEEDED, json_result.error
    assert json_result.output == answer
    plain_result = client.result(plain, timeout=30)
    assert plain_result.status is JobStatus.SUCCEEDED and plain_result.output == "plain answer"
    plain_steps = [event.step["action_type"] for event in recorded_events(client, plain)]
    assert plain_steps == ["user_input", "final_response"]

    # the fake saw each job once, on this provider's wire format and model
    for marker, stream in ((f"gen-{provider}", True), (f"json-{provider}", None), (f"plain-{provider}", False)):
        [request] = generations(fake, marker)
        assert PATHS[provider].lower() in request.path.lower() and request.protocol == fake_protocol(provider)
        assert MODELS[provider] in json.dumps(request.body) + request.path
        if stream is not None:
            streaming = "stream" in request.path.lower() if provider == "gemini" else bool(request.body.get("stream"))
            assert streaming is stream, (marker, request.path)
    # and the job ran on the worker pinned to this provider's queue
    assert f"[{streamed}] received" in running.log()


def fake_protocol(provider: str) -> str:
    return {"gemini": "gemini", "claude": "anthropic"}.get(provider, "openai")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_generate_json_and_streaming_on_each_providers_queue(provider: str, worker: StartWorker, client: JobClient,
                                                            fake: FakeProviderServer) -> None:
    _generate_json_and_stream(provider, worker, client, fake)


@pytest.mark.parametrize("job_db_url", ["postgres"], indirect=True)
def test_end_to_end_with_the_store_on_postgres(job_env: JobEnv, worker: StartWorker, client: JobClient,
                                               fake: FakeProviderServer) -> None:
    assert job_env.database_url.startswith("postgresql")
    _generate_json_and_stream("openai", worker, client, fake)
    engine = create_engine(job_env.database_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all()
    engine.dispose()
    assert dict(rows) == {"succeeded": 3}


@pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))
def test_tool_run_against_the_sql_mcp_server_on_each_providers_queue(
        job_env: JobEnv, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    providers = job_env.providers  # claude too when the fake speaks it
    workers = {provider: worker(provider, wait=False) for provider in providers}  # start side by side
    for running in workers.values():
        running.wait_ready()
    query = "SELECT count(*) AS n FROM orders"
    for provider in providers:  # the runs go side by side: each provider's turns match its own prompt
        def mine(request: ScriptedRequest, marker: str = f"tool-{provider}:") -> bool:
            return marker in json.dumps(request.body)

        fake.script.add(Reply(reasoning="look at the tables first", tool_calls=[ScriptedToolCall("list_tables", {})]),
                        Reply(tool_calls=[ScriptedToolCall("read_query", {"query": query})]),
                        Reply(text=f"There are 5 orders ({provider})."), match=mine)
    jobs = {provider: client.submit({"model": provider, "kind": "tool_run", "mcp_servers": ["shop"],
                                     "prompt": f"tool-{provider}: how many orders are there?"})
            for provider in providers}
    wait_for(lambda: len(generations(fake)) >= 3 * len(providers), 30, "every run's three turns")

    problems: dict[str, Any] = {}
    for provider, job_id in jobs.items():
        try:
            result = client.result(job_id, timeout=60)
            assert result.status is JobStatus.SUCCEEDED, result.error
            assert result.output == f"There are 5 orders ({provider})."
            assert [context["sql_query"] for context in result.sql_contexts] == [query]
            assert result.sql_contexts[0]["row_count"] == 1 and "5" in result.sql_contexts[0]["sql_return"]
            steps = list(client.stream(job_id, timeout=10))
            tools = [step for step in steps if step.role == "tool" and step.status != "processing"]
            assert [step.action_type for step in tools] == ["list_tables", "read_query"]
            assert "customers" in tools[0].output["raw_output"] and "5" in tools[1].output["raw_output"]
            assert steps[0].action_type == "user_input" and steps[-1].action_type == "final_response"
            assert_one_gapless_stream(recorded_events(client, job_id, timeout=10))
            turns = generations(fake, f"tool-{provider}:")
            assert len(turns) == 3  # a turn per tool call, then the answer
            # the model saw each tool's result before its next turn
            assert "customers" in json.dumps(turns[1].body) and "row_count" in json.dumps(turns[2].body)
            assert f"[{job_id}] received" in workers[provider].log()
        except (AssertionError, TimeoutError) as exc:
            problems[provider] = exc
    assert not problems, problems


@pytest.fixture
def solo_worker(job_env: JobEnv) -> Iterator[Worker]:
    """``dq worker --pool solo``: the job tasks run through Celery's own tracer (`tasks.jobs.run_task`)
    instead of the worker's event-loop pool, one at a time."""
    log_path = job_env.dir / "worker-solo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*dq_command(), "worker", "--pool", "solo", "--provider", "openai"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_environment(job_env, None),
                                cwd=job_env.dir, start_new_session=True)
    handle = Worker(proc, log_path, ("openai",))
    handle.wait_ready()
    yield handle
    handle.stop()


def test_job_tasks_under_celerys_own_pool_finish_retry_and_dead_letter(solo_worker: Worker, client: JobClient,
                                                                       fake: FakeProviderServer) -> None:
    from datus.models.scripted import Fault

    fake.script.add(Fault("status", status=500), Reply(text="second time lucky"), match="solo-retried")
    retried = client.submit({"model": "openai", "prompt": "solo-retried", "stream": False})
    bug = client.submit({"model": "openai", "messages": [{"role": "user", "content": 42}]})  # to_messages raises
    client.app.send_task("dq.generate", args=("solo-garbage", {"garbage": 1}), queue="llm.openai")
    plain = client.submit({"model": "openai", "prompt": "solo-plain"})

    result = client.result(retried, timeout=30)
    assert (result.status, result.output, result.attempts) == (JobStatus.SUCCEEDED, "second time lucky", 2)
    failed = client.result(bug, timeout=30)
    assert failed.status is JobStatus.FAILED and failed.error is not None and failed.error.code == "internal_error"
    assert client.result(plain, timeout=30).status is JobStatus.SUCCEEDED
    assert "solo-garbage" in {letter.dead_id for letter in client.store.dead_letters()}
    assert len(generations(fake, "solo-retried")) == 2 and solo_worker.alive()


def test_stream_replay_late_and_reconnecting_readers_get_every_step_once(worker: StartWorker, client: JobClient,
                                                                         fake: FakeProviderServer) -> None:
    worker("openai")
    fake.latency_s = 1.5  # the model call is in flight while readers come and go
    fake.script.add(Reply(text="one two three four five six seven eight nine ten", reasoning="thinking it over"))
    job_id = client.submit({"model": "openai", "prompt": "count to ten"})

    live: list[JobEvent] = []
    from_start = threading.Thread(target=lambda: live.extend(client.events(job_id, timeout=30)))
    from_start.start()
    # a reader joining mid-job: the first step is recorded, the answer is not there yet
    wait_for(lambda: read_events(client.redis, job_id), 15, "the job's first step")
    assert client.status(job_id) is JobStatus.RUNNING
    midway: list[JobEvent] = []
    joiner = threading.Thread(target=lambda: midway.extend(client.events(job_id, timeout=30)))
    joiner.start()
    # a reader that drops after two events and reconnects with after_seq
    first = client.events(job_id, timeout=30)
    resumed = [next(first), next(first)]
    first.close()
    resumed += client.events(job_id, after_seq=resumed[-1].seq, timeout=30)
    from_start.join(30)
    joiner.join(30)
    late = list(client.events(job_id, timeout=30))  # after the job finished

    assert client.result(job_id, timeout=5).status is JobStatus.SUCCEEDED
    assert_one_gapless_stream(late)
    kinds = [event.step["action_type"] for event in late]
    assert kinds[0] == "user_input" and kinds[-1] == "final_response" and "assistant_delta" in kinds
    for reader in (live, midway, resumed):
        assert [(e.seq, e.step) for e in reader] == [(e.seq, e.step) for e in late]
    # and the plain ActionHistory view replays the same steps
    assert [step.action_type for step in client.stream(job_id, after_seq=2, timeout=5)] == kinds[2:]


def test_the_same_idempotency_key_returns_the_same_job_and_one_row(worker: StartWorker, client: JobClient,
                                                                   fake: FakeProviderServer) -> None:
    worker("openai")
    request = {"model": "openai", "prompt": "idem: how many customers?", "idempotency_key": "batch-7/item-42"}
    first = client.submit(request)
    again = client.submit(dict(request))
    assert again == first
    assert client.result(first, timeout=30).status is JobStatus.SUCCEEDED
    assert client.submit(dict(request)) == first  # also once it is final
    assert client.submit({**request, "prompt": "idem: a different question"}) == first  # the key decides
    assert client.store.count_by_status()["succeeded"] == 1 and sum(client.store.count_by_status().values()) == 1
    assert len(generations(fake, "idem:")) == 1
    assert client.result(first).attempts == 1


def test_submit_many_queues_all_or_nothing_and_keeps_idempotency(worker: StartWorker, client: JobClient,
                                                                    fake: FakeProviderServer) -> None:
    earlier = client.submit({"model": "openai", "prompt": "many: already asked", "idempotency_key": "k-0"})
    with pytest.raises(InvalidJob, match="acme"):  # one bad request: nothing is queued
        client.submit_many([{"model": "openai", "prompt": "many: fine"}, {"model": "acme:large", "prompt": "x"}])
    assert sum(client.store.count_by_status().values()) == 1
    requests = [{"model": "openai", "prompt": f"many: question {i}", "idempotency_key": f"k-{i % 20}"}
                for i in range(25)] + [{"model": "claude", "prompt": "many: no key"}]
    ids = client.submit_many(requests)
    assert ids[0] == earlier and ids[20:25] == ids[0:5] and len(set(ids)) == 21
    worker("openai", "claude")
    assert {client.result(job_id, timeout=60).status for job_id in ids} == {JobStatus.SUCCEEDED}
    assert len(generations(fake, "many:")) == 21  # each job ran once, duplicates and all
    assert client.store.count_by_status()["succeeded"] == 21


def test_cancel_a_queued_job_never_runs(worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    queued = client.submit({"model": "openai", "prompt": "cancelled-before-it-ran"})
    assert client.cancel(queued) is JobStatus.CANCELLED  # no worker yet: it is still queued
    steps = list(client.stream(queued, timeout=10))
    assert [step.action_type for step in steps] == ["cancelled"]
    worker("openai")
    after = client.submit({"model": "openai", "prompt": "a job after the cancelled one"})
    assert client.result(after, timeout=30).status is JobStatus.SUCCEEDED  # the queue went past it
    result = client.result(queued, timeout=5)
    assert (result.status, result.attempts, result.output) == (JobStatus.CANCELLED, 0, None)
    assert generations(fake, "cancelled-before-it-ran") == []
    assert client.cancel(queued) is JobStatus.CANCELLED  # cancelling again changes nothing


def test_cancel_a_running_job_stops_at_its_next_step(worker: StartWorker, client: JobClient,
                                                     fake: FakeProviderServer) -> None:
    worker("openai")
    fake.latency_s = 2.0
    job_id = client.submit({"model": "openai", "prompt": "a slow streamed answer"})
    wait_for(lambda: client.status(job_id) is JobStatus.RUNNING and generations(fake, "a slow streamed"), 15,
             "the job's model call")
    assert client.cancel(job_id) is JobStatus.RUNNING  # the worker stops it at its next step
    steps = list(client.stream(job_id, timeout=30))
    result = client.result(job_id, timeout=10)
    assert result.status is JobStatus.CANCELLED and result.output is None
    assert steps[-1].action_type == "cancelled"
    assert "final_response" not in [step.action_type for step in steps]
    assert len(generations(fake, "a slow streamed")) == 1


def mcp_servers_of(pid: int) -> list[int]:
    """The SQL MCP server processes a worker started (its children running the server)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == pid and b"datus.mcp_servers.sql_server" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))
def test_cancel_a_running_tool_run_stops_before_its_next_tool(worker: StartWorker, client: JobClient,
                                                             fake: FakeProviderServer) -> None:
    running = worker("openai")
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("list_tables", {})]),
                    Reply(tool_calls=[ScriptedToolCall("read_query", {"query": "SELECT 1"})], latency_s=2.0),
                    Reply(text="never said"))
    job_id = client.submit({"model": "openai", "kind": "tool_run", "prompt": "cancel me mid-run",
                            "mcp_servers": ["shop"]})
    wait_for(lambda: any(event.step["action_type"] == "list_tables" and event.step["status"] == "success"
                         for event in read_events(client.redis, job_id)), 20, "the first tool's result")
    servers = mcp_servers_of(running.pid)
    assert servers, "the run's MCP server is up"
    assert client.cancel(job_id) is JobStatus.RUNNING  # the model is thinking about its next tool

    steps = list(client.stream(job_id, timeout=20))
    result = client.result(job_id, timeout=10)
    assert result.status is JobStatus.CANCELLED and result.output is None
    assert steps[-1].action_type == "cancelled"
    assert [step.action_type for step in steps if step.role == "tool" and step.status == "success"] == [
        "list_tables"]  # the next tool never ran
    assert "final_response" not in [step.action_type for step in steps]
    assert len(generations(fake, "cancel me mid-run")) == 2  # and the model was not asked again
    # the server is the worker's, not the run's: it stays up for the next tool run
    assert mcp_servers_of(running.pid) == servers
    assert running.alive()


def test_invalid_requests_fail_before_anything_is_sent(job_env: JobEnv, client: JobClient,
                                                       dq_redis: Any, fake: FakeProviderServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "gpt-5-turbo", "prompt": "x"}, "gpt-5-turbo"),  # not a configured model
        ({"model": "acme:large", "prompt": "x"}, "acme"),  # not a provider
        ({"model": "openai", "kind": "tool_run", "prompt": "x", "mcp_servers": ["warehouse"]}, "warehouse"),
        ({"model": "openai", "prompt": "x", "temprature": 0.2}, "temprature"),  # a typo is an error
        ({"model": "openai", "prompt": "x", "options": {"max_tokenz": 5}}, "max_tokenz"),
        ({"model": "openai", "prompt": "x", "api_key": "sk-smuggled"}, "api_key"),  # no key rides in a request
        ({"model": "openai", "prompt": "x", "metadata": {"openai_api_key": "sk-smuggled"}}, "openai_api_key"),
        ({"model": "openai", "kind": "tool_run", "prompt": "x", "mcp_servers": ["rm -rf /"]}, "rm -rf /"),
        ({"model": "openai", "prompt": "   "}, "prompt"),
    ]
    for request, named in cases:
        with pytest.raises(InvalidJob) as raised:
            client.submit(request)
        assert named in str(raised.value), (request, str(raised.value))
    assert dq_redis.dbsize() == 0, sorted(dq_redis.keys())  # nothing queued, nothing published
    assert sum(client.store.count_by_status().values()) == 0  # and no job row
    assert generations(fake) == []
