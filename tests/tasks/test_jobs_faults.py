"""The job system when things go wrong, end to end: workers killed or stopped mid-job, a
429 storm, permanent provider errors, and payloads that never came from a `JobClient`."""

from __future__ import annotations

import base64
import json
import pathlib
import re
import threading
import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from datus.models.scripted import Answer, Fault, Reply, ScriptedRequest
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobRequest, JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, generations, recorded_events, wait_for


def dead_letters(client: JobClient) -> dict[str, str]:
    """dead letter id (the job id, when the message had one) -> reason, from the job store."""
    return {letter.dead_id: letter.reason for letter in client.store.dead_letters()}


def terminal_steps(client: JobClient, job_id: str) -> list[dict]:
    return [event.step for event in recorded_events(client, job_id) if event.terminal]


# -- workers that die or are stopped -------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_killed_mid_job_every_job_completes_exactly_once(worker: StartWorker, client: JobClient,
                                                                  fake: FakeProviderServer) -> None:
    visibility_s = 4  # longer than the 3 s call
    fake.latency_s = 3.0
    # a lease shorter than this test's 4 s visibility timeout (the defaults: 15 s and an hour), so the
    # redelivery finds the dead worker's lease passed and takes the job over. This is the redelivery
    # path; the same guarantee with the defaults (the sweep, no short visibility timeout) is
    # test_recovery.py::test_a_killed_workers_jobs_run_again_on_another_worker_with_the_defaults_and_no_beat
    lease = {"DQ_LEASE_S": "2"}
    first = worker("openai", visibility_timeout_s=visibility_s, env=lease)
    jobs = [client.submit({"model": "openai", "prompt": f"kill-{i}", "stream": False}) for i in range(4)]
    wait_for(lambda: len(generations(fake, "kill-")) == 4, 20, "all four calls in flight")
    delivered = time.monotonic()
    first.kill()
    assert {client.status(job_id) for job_id in jobs} == {JobStatus.RUNNING}

    # Redis hands an unacknowledged message out again once it has been taken for longer than the
    # visibility timeout; a worker sweeps for such messages when it starts.
    time.sleep(max(0.0, delivered + visibility_s + 0.5 - time.monotonic()))
    second = worker("openai", visibility_timeout_s=visibility_s, env=lease)
    results = [client.result(job_id, timeout=30) for job_id in jobs]

    for i, (job_id, result) in enumerate(zip(jobs, results)):
        assert result.status is JobStatus.SUCCEEDED, result.error
        assert result.output == f"echo: kill-{i}"
        assert (result.attempts, result.deliveries) == (1, 2)  # a redelivery, not a retry
        assert len(generations(fake, f"kill-{i}")) == 2  # the killed call, then the one that finished
        assert [step["action_type"] for step in terminal_steps(client, job_id)] == ["final_response"]
        assert f"[{job_id}] received" in second.log()
    assert client.store.count_by_status()["succeeded"] == 4 == sum(client.store.count_by_status().values())


@pytest.mark.slow
def test_sigterm_requeues_jobs_in_flight_at_once(worker: StartWorker, client: JobClient,
                                                 fake: FakeProviderServer) -> None:
    # the default settings: the visibility timeout of an hour, the lease, the heartbeat and the sweep
    fake.hold()  # the first worker's calls get no answer until released: it cannot wait them out
    first = worker("openai")
    jobs = [client.submit({"model": "openai", "prompt": f"term-{i}", "stream": False}) for i in range(3)]
    wait_for(lambda: len(generations(fake, "term-")) == 3, 20, "all three calls in flight")
    first.terminate()
    # it exits with its three calls still held unanswered: it did not wait for them
    assert first.wait_exit(30) is not None, first.log()[-3000:]
    assert fake.in_flight >= 3  # (>=: the shared fake may still be sleeping on an earlier test's calls)
    fake.release()
    second = worker("openai")
    results = [client.result(job_id, timeout=60) for job_id in jobs]

    assert all(result.status is JobStatus.SUCCEEDED for result in results), [r.error for r in results]
    assert all((result.attempts, result.deliveries) == (1, 2) for result in results)  # a redelivery
    # requeued by the stopping worker itself: not sent again by the sweep (which, with the dead worker's
    # heartbeat gone, would have after about DQ_LEASE_S + a sweep interval) nor by the visibility timeout
    assert [client.store.get(job_id).resends for job_id in jobs] == [0, 0, 0]
    assert all(len(terminal_steps(client, job_id)) == 1 for job_id in jobs)
    # the second worker ran every job
    assert all(f"[{job_id}] received" in second.log() for job_id in jobs), first.log()[-2000:]
    assert all(len(generations(fake, f"term-{i}")) == 2 for i in range(3))


# -- a duplicate delivery while its job runs ------------------------------------------------------


def send_duplicate(client: JobClient, job_id: str) -> None:
    """The job's message once more, as the sweeper re-sends it or the broker restores it
    (`publish_job`: the one way a job is sent)."""
    from datus_queue.tasks.client import publish_job

    request = client.store.get_request(job_id)
    assert request is not None
    with client.app.producer_or_acquire() as producer:
        publish_job(client.app, producer, job_id, request, "openai")


def all_acknowledged(client: JobClient) -> bool:
    """No message waits in a queue or in a worker's hands (kombu's ``unacked`` hash: a message
    held for its countdown is there too)."""
    return client.redis.hlen("unacked") == 0 and client.redis.llen("llm.openai") == 0


@pytest.mark.slow
def test_a_duplicate_that_meets_a_live_lease_comes_back_and_ends_once_the_job_is_final(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    """Default settings. The duplicate makes no model call next to the running one, and it is not
    dropped either: it comes back when the lease can have lapsed, finds the job final, and ends."""
    running = worker("openai")
    fake.hold()  # the job's call is in flight until released
    job_id = client.submit({"model": "openai", "prompt": "dup-live: hello", "stream": False})
    wait_for(lambda: generations(fake, "dup-live:"), 20, "the job's model call")
    send_duplicate(client, job_id)
    wait_for(lambda: f"job {job_id}: run 1 is running elsewhere" in running.log(), 20,
             "the duplicate to meet the live lease")
    # published again (received again: held until its countdown ends), this delivery acknowledged
    wait_for(lambda: running.log().count(f"[{job_id}] received") == 3, 10, "the duplicate published again")
    fake.release()
    result = client.result(job_id, timeout=30)
    assert result.status is JobStatus.SUCCEEDED and (result.attempts, result.deliveries) == (1, 1)

    # the duplicate is held for its countdown (in kombu's unacked hash) until the lease's end, then
    # runs, finds the job final and is acknowledged: nothing is left anywhere
    wait_for(lambda: all_acknowledged(client), client.settings.lease_s + 30, "the duplicate to come back and end")
    wait_for(lambda: f"job {job_id} is succeeded; this delivery ends" in running.log(), 5, "the duplicate's end")
    assert len(generations(fake, "dup-live:")) == 1  # one model call in all
    assert len(terminal_steps(client, job_id)) == 1


@pytest.mark.slow
def test_a_duplicate_that_meets_a_dead_workers_lease_takes_the_job_over_once_it_lapses(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    """Default settings. A worker dies holding the job; its lease runs on (nobody renews it) while a
    duplicate of the message reaches another worker: the duplicate comes back after the lease and
    takes the job over instead of being dropped (the job would otherwise wait for the sweeper)."""
    first = worker("openai")
    fake.hold()
    job_id = client.submit({"model": "openai", "prompt": "dup-dead: hello", "stream": False})
    wait_for(lambda: generations(fake, "dup-dead:"), 20, "the job's model call")
    first.kill()
    second = worker("openai")
    send_duplicate(client, job_id)
    wait_for(lambda: f"job {job_id}: run 1 is running elsewhere" in second.log(), 30,
             "the duplicate to meet the dead worker's lease")
    fake.release()  # the killed call's answer goes nowhere

    result = client.result(job_id, timeout=client.settings.lease_s + 40)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert (result.attempts, result.deliveries) == (1, 2)  # the same attempt, taken over once
    assert len(generations(fake, "dup-dead:")) == 2  # the killed call, then the one that finished
    assert [step["action_type"] for step in terminal_steps(client, job_id)] == ["final_response"]


# -- bugs and the infrastructure ---------------------------------------------------------------------


def test_a_bug_fails_its_job_at_once_with_one_log_line_and_no_retry(worker: StartWorker, client: JobClient,
                                                                   fake: FakeProviderServer) -> None:
    """A request the client accepts and the worker cannot run stands for a bug, with no code changed
    for the test: a message whose content is not text breaks the model layer's `to_messages`
    (ValueError). It is not an infrastructure error: the job fails at once, never retried."""
    running = worker("openai", concurrency=2)
    job_id = client.submit({"model": "openai", "messages": [{"role": "user", "content": 42}]})
    result = client.result(job_id, timeout=30)
    assert result.status is JobStatus.FAILED and result.error is not None
    assert (result.error.code, result.error.type, result.attempts) == ("internal_error", "ValueError", 1)
    [terminal] = terminal_steps(client, job_id)
    assert terminal["action_type"] == "error" and terminal["output"]["code"] == "internal_error"
    after = client.submit({"model": "openai", "prompt": "bug: a good job after"})
    assert client.result(after, timeout=30).status is JobStatus.SUCCEEDED

    log = running.log()
    assert log.count(f"job {job_id} failed with an internal error") == 1  # one log record, with its traceback
    record = log.split(f"job {job_id} failed with an internal error", 1)[1].split("\n[20", 1)[0]
    assert "Traceback (most recent call last):" in record and "ValueError" in record
    assert "infrastructure error" not in log and "retry in" not in log
    assert generations(fake) == generations(fake, "bug: a good job after")  # the bad job made no call


@pytest.mark.parametrize("job_db_url", ["postgres"], indirect=True)
def test_the_store_failing_mid_job_is_an_infrastructure_retry_and_the_job_succeeds(
        job_env: JobEnv, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    """The store stops answering while a job's model call is in flight: the result cannot be written
    (OperationalError), the job is retried later — not failed — and succeeds once the store is back.
    The fault: this test locks the jobs table, and Postgres cancels a statement of the worker's that
    waits for it longer than 1 s (``statement_timeout`` on the worker's connections only: without
    it the worker would wait the lock out instead of failing). DQ_ settings are the defaults."""
    url = make_url(job_env.database_url)
    worker_url = url.update_query_dict({"options": f"{url.query['options']} -cstatement_timeout=1000"})
    running = worker("openai", env={"DQ_DATABASE_URL": worker_url.render_as_string(hide_password=False)})
    fake.hold()
    job_id = client.submit({"model": "openai", "prompt": "infra: hello", "stream": False})
    wait_for(lambda: generations(fake, "infra:"), 20, "the job's model call")
    engine = create_engine(job_env.database_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")  # held until the rollback
            fake.release()  # the answer arrives: writing it waits for the lock, and is cancelled
            wait_for(lambda: f"job {job_id}: infrastructure error" in running.log(), 30, "an infrastructure retry")
            conn.rollback()
    finally:
        engine.dispose()

    result = client.result(job_id, timeout=60)
    assert result.status is JobStatus.SUCCEEDED and result.output == "echo: infra: hello", result.error
    log = running.log()
    assert f"job {job_id}: infrastructure error OperationalError" in log
    assert "internal error" not in log
    assert len(generations(fake, "infra:")) >= 2  # the answer that could not be stored, then the retry's
    assert [step["action_type"] for step in terminal_steps(client, job_id)] == ["final_response"]


# -- a 429 storm ---------------------------------------------------------------------------------


class RateLimitStorm:
    """The fake's answer to every request: ``faults`` 429s with Retry-After per prompt, then an
    echo; records when each request of each prompt arrived."""

    def __init__(self, faults: int, retry_after_s: float) -> None:
        self.faults, self.retry_after_s = faults, retry_after_s
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def __call__(self, request: ScriptedRequest) -> Answer:
        with self._lock:
            self.arrivals[request.last_user_text].append(time.monotonic())
            seen = len(self.arrivals[request.last_user_text])
        if seen <= self.faults:
            return Fault("rate_limit", retry_after=self.retry_after_s)
        return Reply(text=f"ok after {seen - 1} rate limits")


def test_a_429_storm_with_retry_after_every_job_succeeds_and_no_retry_comes_early(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    storm = RateLimitStorm(faults=3, retry_after_s=1.0)
    running = worker("openai", "gemini", concurrency=8)
    for model in ("openai", "gemini"):  # first calls import the SDKs: not during the storm
        warm_up = client.result(client.submit({"model": model, "prompt": f"warm-up {model}"}), timeout=40)
        assert warm_up.status is JobStatus.SUCCEEDED, warm_up.error
    fake.script.fallback = storm
    prompts = [f"storm-{i}" for i in range(6)]
    fake.hold()  # every job's first request is in before the first 429: later arrivals would wait out its cooldown
    jobs = {prompt: client.submit({"model": "openai" if i % 3 else "gemini", "prompt": prompt})
            for i, prompt in enumerate(prompts)}
    wait_for(lambda: len(generations(fake, "storm-")) == len(prompts), 30, "every job's first request")
    fake.release()
    results = {prompt: client.result(job_id, timeout=40) for prompt, job_id in jobs.items()}

    for prompt, result in results.items():
        assert result.status is JobStatus.SUCCEEDED, result.error
        # four attempts: runs that only waited out another job's cooldown are not attempts
        assert result.output == "ok after 3 rate limits" and result.attempts == 4 and result.error is None
        arrivals = storm.arrivals[prompt]
        assert len(arrivals) == 4
        waits = [later - earlier for earlier, later in pairwise(arrivals)]
        assert min(waits) >= 1.0, (prompt, waits)  # never sooner than Retry-After
        retries = [event.step for event in recorded_events(client, jobs[prompt])
                   if event.step["action_type"] == "retry"]
        assert [step["output"]["attempt"] for step in retries] == [1, 2, 3]
        assert all(step["output"]["countdown_s"] >= 1.0 for step in retries)
        assert all(step["output"]["error"]["code"] == "model_rate_limit" for step in retries)
    countdowns = [float(s) for s in re.findall(r"RateLimitError; retry in ([0-9.]+)s", running.log())]
    assert len(countdowns) == 3 * len(prompts) and min(countdowns) >= 1.0
    # the jobs wait side by side, not one after another: every job had made its first request
    # before any job made its last (one after another, a job's last would precede the next's first)
    firsts = {prompt: storm.arrivals[prompt][0] for prompt in prompts}
    lasts = {prompt: storm.arrivals[prompt][-1] for prompt in prompts}
    assert max(firsts.values()) < min(lasts.values()), (firsts, lasts)


# -- permanent errors ------------------------------------------------------------------------------


def test_permanent_errors_fail_fast_with_the_providers_message_and_the_queue_goes_on(
        worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    fake.script.add(Fault("status", status=401), match="perm-401")
    fake.script.add(Fault("status", status=400, message="Invalid value for 'temperature': 3 is greater than 2."),
                    match="perm-400")
    fake.script.add(Fault("context_length"), match="perm-context")
    worker("openai", concurrency=1)  # one job at a time: the good ones queue behind the bad ones
    failing = {
        "perm-401": (client.submit({"model": "openai", "prompt": "perm-401"}),
                     "model_authentication_error", 401, "Incorrect API key provided."),
        "perm-400": (client.submit({"model": "openai", "prompt": "perm-400"}),
                     "model_bad_request", 400, "Invalid value for 'temperature': 3 is greater than 2."),
        "perm-context": (client.submit({"model": "openai", "prompt": "perm-context"}),
                         "model_context_length_exceeded", 400, "maximum context length"),
        "perm-badkey": (client.submit({"model": "openai-badkey", "prompt": "perm-badkey"}),
                        "model_authentication_error", 401, "Incorrect API key provided: sk-*****3210"),
    }
    good = [client.submit({"model": "openai", "prompt": f"perm-ok-{i}"}) for i in range(2)]

    for marker, (job_id, code, status_code, message) in failing.items():
        result = client.result(job_id, timeout=30)
        assert result.status is JobStatus.FAILED and result.error is not None, marker
        assert (result.error.code, result.error.status_code, result.error.retryable) == (code, status_code, False)
        assert message in result.error.message, (marker, result.error.message)
        assert result.error.provider == "openai" and result.attempts == 1
        assert len(generations(fake, marker)) == 1, "a permanent error is never retried"
        assert result.run_ms is not None
        steps = [event.step for event in recorded_events(client, job_id)]
        assert not [step for step in steps if step["action_type"] == "retry"], "failed at once: no retry scheduled"
        [terminal] = terminal_steps(client, job_id)
        assert terminal["action_type"] == "error" and terminal["output"]["code"] == code
    for job_id in good:
        assert client.result(job_id, timeout=30).status is JobStatus.SUCCEEDED


# -- payloads that did not come from a JobClient ---------------------------------------------------


def _valid_payload(prompt: str) -> dict:
    return {"provider": "openai", "request": {"model": "openai", "prompt": prompt}}


def test_bad_payloads_sent_around_the_client_are_rejected_recorded_and_the_worker_keeps_running(
        job_env: JobEnv, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    running = worker("openai", concurrency=2)
    app = client.app
    # a row the client wrote, then a payload for it that is garbage
    known = client.store.create_job("job-known", JobRequest(model="openai", prompt="never asked"), "openai")[0]
    app.send_task("dq.generate", args=(known, {"garbage": 1}), queue="llm.openai")
    app.send_task("dq.generate", args=("job-garbage", {"garbage": 1}), queue="llm.openai")
    smuggled = _valid_payload("x")
    smuggled["request"]["api_key"] = "sk-smuggled-0000"
    app.send_task("dq.generate", args=("job-smuggled", smuggled), queue="llm.openai")
    command = {"provider": "openai", "request": {"model": "openai", "kind": "tool_run", "prompt": "x",
                                                 "mcp_servers": ["sh -c reboot"]}}
    app.send_task("dq.tool_run", args=("job-command", command), queue="llm.openai")
    numeric = app.send_task("dq.generate", args=(12345, _valid_payload("numeric id")), queue="llm.openai").id
    app.send_task("dq.unknown", args=("job-unknown",), queue="llm.openai")
    # pickle is refused before it is ever loaded: this one would create a file if unpickled
    marker = job_env.dir / "unpickled"

    class Evil:
        def __reduce__(self) -> tuple:
            return (pathlib.Path.touch, (marker,))

    app.send_task("dq.generate", args=("job-pickle", Evil()), queue="llm.openai", serializer="pickle")
    # a well-formed envelope whose body is not JSON, pushed straight onto the queue's list
    envelope = {"body": base64.b64encode(b"{not json").decode(), "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"lang": "py", "task": "dq.generate", "id": "job-badbody", "retries": 0},
                "properties": {"delivery_tag": "dq-test-badbody", "body_encoding": "base64", "priority": 0,
                               "delivery_info": {"exchange": "", "routing_key": "llm.openai"}}}
    client.redis.lpush("llm.openai", json.dumps(envelope))

    # a number is no job id: that message's dead letter goes by its message id
    wait_for(lambda: {known, "job-garbage", "job-smuggled", "job-command", numeric} <= dead_letters(client).keys(),
             20, "the dead-letter records")
    after = client.submit({"model": "openai", "prompt": "a good job after the garbage"})
    assert client.result(after, timeout=30).status is JobStatus.SUCCEEDED
    assert running.alive()

    reasons = dead_letters(client)
    assert "provider" in reasons["job-garbage"] and "job id" in reasons[numeric]
    # the worker runs what the job store holds, never a request carried in a message: a forged message with a
    # smuggled key or a command for a server runs nothing (the store has no such job)
    assert "no such job" in reasons["job-smuggled"] and "no such job" in reasons["job-command"]
    assert not any("sk-smuggled" in json.dumps(request.headers) for request in fake.requests)
    row = client.result(known, timeout=1)
    assert row.status is JobStatus.FAILED and row.error and row.error.code == "invalid_payload"
    assert not marker.exists()
    log = running.log()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert "unknown task 'dq.unknown'" in log
    assert "job-badbody" in log  # the undecodable body is logged, not run
    assert generations(fake) == generations(fake, "a good job after the garbage")  # no garbage reached the model


def test_a_wrong_argument_count_is_dead_lettered(worker: StartWorker, client: JobClient) -> None:
    running = worker("openai", concurrency=2)
    client.app.send_task("dq.generate", args=("job-short",), queue="llm.openai")
    client.app.send_task("dq.tool_run", args=("job-long", _valid_payload("x"), "extra"), queue="llm.openai")
    after = client.submit({"model": "openai", "prompt": "a good job after"})
    assert client.result(after, timeout=30).status is JobStatus.SUCCEEDED
    assert running.alive()
    wait_for(lambda: {"job-short", "job-long"} <= dead_letters(client).keys(), 10, "both messages dead-lettered")


def test_raw_non_json_on_a_queue_list_is_rejected_and_the_worker_keeps_running(
        worker: StartWorker, client: JobClient) -> None:
    running = worker("openai")
    client.redis.lpush("llm.openai", b"\x00not json{")
    client.redis.lpush("llm.openai", b'{"foo": 1}')
    after = client.submit({"model": "openai", "prompt": "a good job after raw garbage"})
    wait_for(lambda: not running.alive() or client.status(after) is JobStatus.SUCCEEDED, 20,
             "the worker to run the next job or die")
    assert running.alive(), running.log()[-1500:]
    assert client.status(after) is JobStatus.SUCCEEDED
    letters = client.store.dead_letters()
    assert len(letters) == 2 and all(letter.reason.startswith("undecodable message") for letter in letters)
    assert all(letter.job_id is None and letter.kind is None for letter in letters)  # messages, not jobs


# -- task events (what Flower shows) ---------------------------------------------------------------


def test_task_events_reach_flower_through_the_workers_own_pool(worker: StartWorker, client: JobClient,
                                                                fake: FakeProviderServer) -> None:
    """With DQ_TASK_EVENTS=1 a job run on the event-loop pool sends the events a threads pool
    would: received, started, retried (a 429), succeeded — and never the request text."""
    fake.script.fallback = RateLimitStorm(faults=1, retry_after_s=0.2)
    seen: list[dict[str, Any]] = []
    done = threading.Event()
    job_ids: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event)
        if event.get("type") == "task-succeeded" and event.get("uuid") in job_ids:
            done.set()

    with client.app.connection_for_read() as connection:
        receiver = client.app.events.Receiver(connection, handlers={"*": on_event})
        listening = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                                     daemon=True)
        listening.start()
        worker("openai", env={"DQ_TASK_EVENTS": "1"})
        time.sleep(0.5)  # the receiver is subscribed before the job is sent
        job_ids.append(client.submit({"model": "openai", "prompt": "events: a secret question"}))
        assert client.result(job_ids[0], timeout=30).status is JobStatus.SUCCEEDED
        assert done.wait(10), sorted({e.get("type") for e in seen})
        receiver.should_stop = True
    mine = [event["type"] for event in seen if event.get("uuid") == job_ids[0]]
    assert mine.count("task-received") == 2 and mine.count("task-started") == 2  # the first try and the retry
    assert mine.count("task-retried") == 1 and mine.count("task-succeeded") == 1
    leaks = [(e["type"], k) for e in seen for k, v in e.items() if "a secret question" in json.dumps(v, default=str)]
    assert leaks == []  # argsrepr is a label, not the request
