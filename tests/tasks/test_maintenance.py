"""The maintenance pieces in-process, on a real Redis and job store (SQLite; Postgres with
``job_db_url`` "postgres"): where a live message is found, what a sweep sends again (and what
not), leases, pruning in short transactions, schedules, dead letters. The same pieces under
`dq beat` and `dq worker` subprocesses are in test_scheduler_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import event, select, update

from datus.models.config import AgentConfig, ConfigError
from datus_queue.tasks import keys
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.events import read_events
from datus_queue.tasks.leases import LeaseKeeper
from datus_queue.tasks.maintenance.dead_letters import NotReplayable, parse_age, purge, replay
from datus_queue.tasks.maintenance.live_messages import scan_messages
from datus_queue.tasks.maintenance.prune import prune
from datus_queue.tasks.maintenance.schedules import latest_slot, load_schedules, parse_cron, run_schedule
from datus_queue.tasks.maintenance.sweeper import sweep
from datus_queue.tasks.schemas import JobError, JobRequest, JobStatus
from datus_queue.tasks.store import JobStore, ScheduleRun
from datus_queue.tasks.store.schema import dead_letters, job_checkpoints, jobs
from tests.tasks.conftest import JobEnv

BACKENDS = ["sqlite", "postgres"]
LEASE_S = 0.3


def _request(prompt: str = "How many orders?", **fields: Any) -> JobRequest:
    return JobRequest(model="openai", prompt=prompt, **fields)


def _messages(client: JobClient, queue: str = "llm.openai") -> dict[str, dict[str, Any]]:
    """job id -> the message waiting in the queue's list."""
    found = {}
    for raw in client.redis.lrange(queue, 0, -1):
        message = json.loads(raw)
        found[message["headers"]["id"]] = message
    return found


def _take(client: JobClient, job_id: str, delivered_at: float | None) -> dict[str, Any]:
    """Take the job's message off its list as a worker does; record it in kombu's unacked hash
    unless ``delivered_at`` is None (the restart that falls between the two)."""
    for raw in client.redis.lrange("llm.openai", 0, -1):
        message = json.loads(raw)
        if message["headers"]["id"] == job_id:
            client.redis.lrem("llm.openai", 1, raw)
            if delivered_at is not None:
                tag = message["properties"]["delivery_tag"]
                client.redis.hset("unacked", tag, json.dumps([message, "", "llm.openai"]))
                client.redis.zadd("unacked_index", {tag: delivered_at})
            return message
    raise AssertionError(f"no message for {job_id}")


def _set(store: JobStore, job_id: str, **values: Any) -> None:
    with store._writer.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(**values))


# -- live messages -------------------------------------------------------------------------------


def test_a_message_is_live_in_a_queue_list_or_freshly_taken_and_lost_elsewhere(client: JobClient) -> None:
    ids = {name: client.store.create_job(f"job-{name}", _request(name), "openai")[0]
           for name in ("waiting", "priority", "taken", "held", "abandoned", "dropped")}
    for name, job_id in ids.items():  # messages as the client sends them
        client.app.send_task("dq.generate", args=(job_id, {}), task_id=job_id, queue="llm.openai",
                             priority=3 if name == "priority" else None,
                             countdown=600 if name == "held" else None)
    assert client.redis.llen("llm.openai\x06\x163") == 1  # kombu's list for priority 3
    now = time.time()
    _take(client, ids["taken"], delivered_at=now - 1)  # a worker took it a second ago
    _take(client, ids["held"], delivered_at=now - 3600)  # taken long ago, held for its countdown (eta)
    _take(client, ids["abandoned"], delivered_at=now - 3600)  # taken long ago by a worker that is gone
    _take(client, ids["dropped"], delivered_at=None)  # popped, then Redis restarted: in neither place

    scan = scan_messages(client.redis, list(ids.values()), ["openai"], datetime.now(UTC), grace_s=60)
    assert scan.live == {ids["waiting"], ids["priority"], ids["taken"], ids["held"]}
    # the message a gone worker left in kombu's unacked hash, named by its delivery tag
    abandoned_tag = next(tag.decode() for tag, raw in client.redis.hgetall("unacked").items()
                         if ids["abandoned"].encode() in raw)
    assert scan.abandoned == {ids["abandoned"]: [abandoned_tag]}
    assert scan_messages(client.redis, ["job-nowhere"], ["openai", "claude"], datetime.now(UTC), 60).live == set()


# -- the sweeper -----------------------------------------------------------------------------------


@pytest.mark.parametrize("job_db_url", BACKENDS, indirect=True)
def test_a_sweep_sends_each_lost_job_once_and_leaves_live_ones_alone(job_env: JobEnv, client: JobClient) -> None:
    # a grace of 0.3 s instead of DQ_RESEND_AFTER_S's 10 s: the test waits it out (the length does not
    # change which jobs a sweep sends; with the defaults: test_recovery.py's lost-message test)
    settings = job_env.settings(resend_after_s=LEASE_S, dead_letter_threshold=2)
    store = client.store
    waiting = client.submit(_request("waiting"))
    lost = client.submit(_request("lost"))
    _take(client, lost, delivered_at=None)  # its message is gone
    abandoned = client.submit(_request("abandoned"))
    _take(client, abandoned, delivered_at=time.time() - 3600)  # its worker took it, then died: still in unacked
    store.mark_running(abandoned, 1, lease_s=0)  # …and its lease has passed: nobody renews it
    retrying = store.create_job("job-retrying", _request("retrying"), "openai")[0]
    store.mark_running(retrying, 1)
    store.mark_retrying(retrying, 1, JobError(code="x", type="RateLimitError", message="429"), 0.0)
    hopeless = client.submit(_request("hopeless"))
    _take(client, hopeless, delivered_at=None)
    _set(store, hopeless, resends=2)  # re-sent as often as the threshold allows already
    waiting_out = store.create_job("job-waiting-out", _request("waiting out"), "openai")[0]
    store.mark_running(waiting_out, 1, lease_s=0)  # a rate-limit wait: running, its retry held with an eta
    client.app.send_task("dq.generate", args=(waiting_out, {}), task_id=waiting_out, queue="llm.openai",
                         countdown=600)
    _take(client, waiting_out, delivered_at=time.time() - 3600)
    time.sleep(LEASE_S + 0.1)  # everything is overdue now

    with ThreadPoolExecutor(2) as pool:  # two sweeps at once (two workers took two sweep messages)
        reports = list(pool.map(lambda _: sweep(store, client.redis, client.app, settings), range(2)))

    resent = [job_id for report in reports for job_id in report.resent]
    assert sorted(resent) == sorted([lost, abandoned, retrying])  # each once, by one of the two
    # the dead worker's message of the re-sent job is gone from kombu's unacked hash (no duplicate an
    # hour later, after the visibility timeout); the retry a live worker holds for its eta stays
    assert sum(report.dropped for report in reports) == 1
    assert [json.loads(raw)[0]["headers"]["id"] for raw in client.redis.hvals("unacked")] == [waiting_out]
    assert client.redis.zcard("unacked_index") == 1
    assert [job_id for report in reports for job_id in report.dead] == [hopeless]
    messages = _messages(client)
    assert set(messages) == {waiting, lost, abandoned, retrying}
    assert messages[lost]["headers"]["retries"] == 0  # run 1
    assert messages[abandoned]["headers"]["retries"] == 0  # run 1 again, from the start
    assert messages[retrying]["headers"]["retries"] == 1  # its next run, 2
    assert "request for openai" in messages[lost]["headers"]["argsrepr"]  # a label, not the prompt
    rows = {job_id: store.get(job_id) for job_id in (waiting, lost, abandoned, retrying, hopeless, waiting_out)}
    assert {job_id: row.resends for job_id, row in rows.items()} == {
        waiting: 0, lost: 1, abandoned: 1, retrying: 1, hopeless: 2, waiting_out: 0}
    assert rows[abandoned].status is JobStatus.QUEUED and rows[retrying].status is JobStatus.RETRYING
    assert rows[hopeless].status is JobStatus.DEAD and rows[hopeless].error.code == "dead_letter"
    letter = store.dead_letter(hopeless)
    assert letter is not None and "re-sent 2 times by the sweeper" in letter.reason and letter.replayable
    [terminal] = [e for e in read_events(client.redis, hopeless) if e.terminal]
    assert terminal.status is JobStatus.DEAD

    # the next sweep finds nothing to do: the re-sent jobs are due again only a grace later
    assert sweep(store, client.redis, client.app, settings).resent == []


# -- every worker sweeps, one per interval ------------------------------------------------------------


def test_one_worker_of_many_sweeps_per_interval_and_an_outage_is_one_line(
        job_env: JobEnv, client: JobClient, caplog: pytest.LogCaptureFixture) -> None:
    from datus_queue.tasks.cli.services import free_port
    from datus_queue.tasks.maintenance.sweep_loop import SweepLoop

    # a turn of 0.5 s instead of DQ_SWEEP_INTERVAL_S's 10 s: the test waits one out (one sweep per turn
    # holds at any length; the default turn is what test_recovery.py's worker tests run on)
    settings = job_env.settings(sweep_interval_s=0.5)
    loops = [SweepLoop(settings, client.store, client.app, node=f"worker-{n}") for n in range(3)]
    try:
        assert [loop.run_once() is not None for loop in loops] == [True, False, False]  # the first offer wins
        assert [loop.run_once() is not None for loop in loops] == [False, False, False]  # its turn lasts
        time.sleep(0.6)
        assert loops[2].run_once() is not None and loops[0].run_once() is None  # the next offer after it wins
        assert int(client.redis.hget(keys.maintenance("sweep"), "runs")) == 2  # `dq status` shows each run
    finally:
        for loop in loops:
            loop.stop()

    # Redis away: every offer fails, one line says so; the first offer that gets through says it is back
    away = SweepLoop(job_env.settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), client.store, client.app)
    with caplog.at_level("WARNING", logger="datus_queue.tasks.maintenance.sweep_loop"):
        assert [away.run_once() for _ in range(5)] == [None] * 5
        away.redis = redis.Redis.from_url(job_env.redis_url)  # Redis is back
        away.run_once()
        away.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "is unreachable (taking the sweep's turn) (ConnectionError" in messages[0]
    assert messages[0].endswith("waiting for it") and " is back after " in messages[1]
    assert not any(record.exc_info for record in caplog.records)  # no traceback


def test_the_sweep_loop_writes_the_catalogue_again_once_an_interval_has_passed(
        job_env: JobEnv, client: JobClient) -> None:
    from datus.models.config import AgentConfig
    from datus_queue.tasks.maintenance.sweep_loop import SweepLoop

    # an interval of 0.5 s instead of 10 s: the test waits one out (what the interval spaces does
    # not depend on its length; test_queue_model.py's worker test runs on the default)
    loop = SweepLoop(job_env.settings(sweep_interval_s=0.5), client.store, client.app,
                     catalog=AgentConfig.from_file(job_env.agent_yml))
    try:
        loop.run_once()
        assert b"openai" in client.redis.hgetall(keys.model_catalog())
        client.redis.delete(keys.model_catalog())  # what a Redis restarted without persistence has
        loop.run_once()
        assert client.redis.hgetall(keys.model_catalog()) == {}  # not again within the interval
        time.sleep(0.6)
        loop.run_once()
        assert b"openai" in client.redis.hgetall(keys.model_catalog())
    finally:
        loop.stop()


# -- leases ------------------------------------------------------------------------------------------


async def test_a_lease_is_renewed_for_all_running_jobs_in_one_statement(client: JobClient) -> None:
    store = client.store
    ids = [store.create_job(f"job-lease-{n}", _request(f"lease {n}"), "openai")[0] for n in range(3)]
    assert all([await store.amark_running(job_id, 1, LEASE_S) for job_id in ids])
    renewals: list[list[str]] = []

    @event.listens_for(store._engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().startswith("UPDATE jobs SET lease_until"):
            renewals.append([p for p in (parameters.values() if isinstance(parameters, dict) else parameters)
                             if isinstance(p, str) and p.startswith("job-lease-")])

    keeper = LeaseKeeper(store, LEASE_S)
    started = asyncio.Event()

    async def run(job_id: str) -> None:
        async with keeper.hold(job_id):
            started.set()
            await asyncio.sleep(LEASE_S * 3)  # three leases long: alive only if renewed

    jobs_running = [asyncio.create_task(run(job_id)) for job_id in ids]
    await started.wait()
    await asyncio.sleep(LEASE_S * 2)
    assert await store.amark_running(ids[0], 1, LEASE_S) is None  # a duplicate delivery: the lease holds
    await asyncio.gather(*jobs_running)
    event.remove(store._engine, "before_cursor_execute", _seen)
    assert len(renewals) >= 4  # every third of a lease…
    assert all(sorted(renewed) == sorted(ids) for renewed in renewals)  # …one statement for all three jobs

    await asyncio.sleep(LEASE_S + 0.05)  # no one renews now: a redelivery takes the job over
    taken = await store.amark_running(ids[0], 1, LEASE_S)
    assert taken is not None and taken.deliveries == 2


async def test_a_job_given_back_at_shutdown_releases_its_lease(client: JobClient) -> None:
    store = client.store
    job_id = store.create_job("job-requeued", _request(), "openai")[0]
    await store.amark_running(job_id, 1, 300.0)
    keeper = LeaseKeeper(store, 300.0)

    async def run() -> None:
        async with keeper.hold(job_id):
            await asyncio.sleep(60)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.05)
    task.cancel()  # the worker's soft shutdown: the message goes back to the queue
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.aget(job_id)).lease_until is None
    assert await store.amark_running(job_id, 1, 300.0) is not None  # the requeued message starts it at once


# -- pruning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_db_url", BACKENDS, indirect=True)
def test_pruning_keeps_the_young_removes_the_old_a_chunk_per_transaction(job_env: JobEnv, client: JobClient) -> None:
    store = client.store
    settings = job_env.settings(job_retention_days=30)
    old, young = datetime.now(UTC) - timedelta(days=31), datetime.now(UTC) - timedelta(days=29)
    ids: dict[str, list[str]] = {"old": [], "young": [], "open": []}
    for n in range(25 + 5 + 3):
        kind = "old" if n < 25 else "young" if n < 30 else "open"
        job_id = store.create_job(f"job-{kind}-{n}", _request(f"q{n}"), "openai")[0]
        if kind != "open":
            store.finish(job_id, JobStatus.SUCCEEDED, output="ok", run=1)
        _set(store, job_id, created_at=old, **({} if kind == "open" else {"finished_at": old if kind == "old" else young}))
        ids[kind].append(job_id)
    store.record_dead_letter("m-old", "undecodable message")
    store.record_dead_letter("m-young", "undecodable message")
    with store._writer.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.dead_id == "m-old").values(at=old, first_at=old))
    store.claim_schedule_run(ScheduleRun(schedule="nightly", slot=old, status="completed", started_at=old))
    with store._writer.begin() as conn:  # a tool-run step of an old job and of a young one
        conn.execute(job_checkpoints.insert(), [
            {"job_id": job_id, "position": 0, "kind": "turn", "run": 1, "step": {"kind": "turn"}, "created_at": old}
            for job_id in (ids["old"][0], ids["young"][0])])
    client.redis.xadd(keys.job_events("stray"), {"event": "{}"})  # an event stream with no expiry
    client.redis.set(keys.job_cancel("kept"), 1, ex=500)

    order: list[tuple[str, int]] = []

    @event.listens_for(store._engine, "after_cursor_execute")
    def _statement(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().startswith("DELETE FROM jobs"):
            order.append(("delete", cursor.rowcount))

    @event.listens_for(store._engine, "commit")
    def _commit(conn: Any) -> None:
        order.append(("commit", 0))

    report = prune(store, client.redis, settings, chunk=10)
    event.remove(store._engine, "after_cursor_execute", _statement)
    event.remove(store._engine, "commit", _commit)

    assert report.jobs == 25 and report.dead_letters == 1 and report.schedule_runs == 1
    assert report.keys_given_ttl == 1
    deletes = [rows for what, rows in order if what == "delete"]
    assert deletes == [10, 10, 5]  # at most a chunk per statement…
    starts = [i for i, (what, _) in enumerate(order) if what == "delete"]
    assert all(any(what == "commit" for what, _ in order[a:b]) for a, b in pairwise(starts))  # …each committed
    assert all(store.get(job_id) is None for job_id in ids["old"])
    assert all(store.get(job_id) is not None for job_id in ids["young"] + ids["open"])  # young, or not finished
    assert [letter.dead_id for letter in store.dead_letters()] == ["m-young"]
    with store._engine.connect() as conn:  # the pruned job's checkpoints went with it
        assert list(conn.execute(select(job_checkpoints.c.job_id)).scalars()) == [ids["young"][0]]
    assert 0 < client.redis.ttl(keys.job_events("stray")) <= settings.event_ttl_s
    assert 0 < client.redis.ttl(keys.job_cancel("kept")) <= 500  # its own expiry is left as it was


# -- schedules -----------------------------------------------------------------------------------------


def _agent(schedules: Any) -> AgentConfig:
    return AgentConfig.from_dict({"agent": {"schedules": schedules}})


def test_schedules_are_checked_and_name_what_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQ_TEST_WAREHOUSE", "sqlite:///w.db")
    schedules = load_schedules(_agent({"nightly": {"cron": "0 2 * * *", "input": "q.jsonl", "model": "deepseek",
                                                   "db": "${DQ_TEST_WAREHOUSE}", "mode": "tool_run",
                                                   "tools": ["warehouse"], "budget_usd": 5}}))
    nightly = schedules["nightly"]
    assert nightly.db == "sqlite:///w.db"
    command = nightly.command("nightly@2026-01-02T02:00Z", Path("out.jsonl"))
    assert command[3:5] == ["batch", str(Path("q.jsonl").absolute())] and "--resume" in command  # never an option
    assert "--tools=warehouse" in command  # a value is never read as an option
    # the database URL (a password, as a rule) is not on the command line, which ps shows: in the environment
    assert not any("w.db" in part for part in command) and nightly.environment() == {"DQ_BATCH_DB": "sqlite:///w.db"}
    assert load_schedules(AgentConfig.from_dict({"agent": {}})) == {}
    for bad, message in [
        ({"n": {"cron": "0 2 * *", "input": "q", "model": "m"}}, r"agent.schedules.n: cron: .* five fields"),
        ({"n": {"cron": "0 25 * * *", "input": "q", "model": "m"}}, r"agent.schedules.n: cron: '0 25"),
        ({"n": {"cron": "0 0 31 2 *", "input": "q", "model": "m"}}, r"never occurs"),
        ({"n": {"cron": "* * * * *", "input": "q", "model": "m", "when": 1}}, r"when: Extra inputs"),
        ({"n": {"cron": "* * * * *", "model": "m"}}, r"agent.schedules.n: input: Field required"),
        ({"n": {"cron": "* * * * *", "input": "q", "model": "m", "mode": "chat"}}, r"mode: Input should be"),
        ({"n": {"cron": "* * * * *", "input": "${DQ_TEST_UNSET_VAR}", "model": "m"}}, r"DQ_TEST_UNSET_VAR"),
        (["n"], r"agent.schedules must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_schedules(_agent(bad))


def test_the_latest_slot_of_a_cron_expression() -> None:
    at = datetime(2026, 3, 4, 10, 7, 30, tzinfo=UTC)  # a Wednesday
    assert latest_slot(parse_cron("*/15 * * * *"), at) == datetime(2026, 3, 4, 10, 0, tzinfo=UTC)
    assert latest_slot(parse_cron("7 10 * * *"), at) == datetime(2026, 3, 4, 10, 7, tzinfo=UTC)  # its own minute
    assert latest_slot(parse_cron("0 2 * * *"), at) == datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
    assert latest_slot(parse_cron("30 23 * * *"), at) == datetime(2026, 3, 3, 23, 30, tzinfo=UTC)
    assert latest_slot(parse_cron("0 9 * * 1"), at) == datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # Mondays
    assert latest_slot(parse_cron("0 0 29 2 *"), at) == datetime(2024, 2, 29, 0, 0, tzinfo=UTC)


def test_a_slot_runs_once_however_often_it_is_delivered(job_env: JobEnv, client: JobClient, tmp_path: Path) -> None:
    """The claim without a batch behind it: a schedule whose input is missing runs (and fails)
    for its slot once; a second delivery of that slot does nothing."""
    config = AgentConfig.from_dict({"agent": {"schedules": {"nightly": {
        "cron": "0 2 * * *", "input": str(tmp_path / "missing.jsonl"), "model": "openai"}}}})
    settings = job_env.settings(schedule_dir=str(tmp_path / "runs"))
    slot = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
    now = slot + timedelta(hours=1)  # the slot is due
    first = run_schedule(client.store, settings, config, "nightly", slot, now=now)
    assert first is not None and first.status == "failed" and first.exit_code == 1
    assert "missing.jsonl: no such file" in Path(first.log).read_text()  # dq batch's own error line
    assert run_schedule(client.store, settings, config, "nightly", slot, now=now) is None
    assert run_schedule(client.store, settings, config, "unknown", slot, now=now) is None
    [run] = client.store.schedule_runs("nightly")
    assert (run.slot, run.status, run.exit_code) == (slot, "failed", 1)


# -- dead letters ----------------------------------------------------------------------------------------


def test_replay_runs_a_dead_job_again_from_its_row_as_new(job_env: JobEnv, client: JobClient) -> None:
    store = client.store
    job_id = store.create_job("job-dead", _request("poison"), "openai")[0]
    store.mark_running(job_id, 1)  # run 1 only waited for the limiter; run 2 died
    asyncio.run(store.amark_retrying(job_id, 1, JobError(code="rate_limit_wait", type="RateLimitWait", message="w"),
                                     0.0, rate_limit_retries=0, rate_limit_waits=1, rate_limited_since=datetime.now(UTC)))
    store.mark_running(job_id, 2)
    store.finish(job_id, JobStatus.DEAD, error=JobError(code="dead_letter", type="DeadLetter", message="x"),
                 run=2)
    store.record_dead_letter(job_id, "delivered 6 times (5 redeliveries without a result)", job_id=job_id)
    client.redis.set(keys.job_cancel(job_id), 1)
    client.redis.xadd(keys.job_events(job_id), {"event": "{}"})

    assert replay(client, job_id) == job_id
    row = store.get(job_id)
    assert (row.status, row.runs, row.attempts, row.deliveries, row.resends, row.replays) == (JobStatus.QUEUED, 0, 0, 0,
                                                                                              0, 1)
    assert (row.rate_limit_retries, row.rate_limit_waits, row.rate_limited_since) == (0, 0, None)  # as new
    assert row.error is None and row.replayed_at is not None
    assert not client.redis.exists(keys.job_cancel(job_id), keys.job_events(job_id))  # its Redis keys start afresh
    assert _messages(client)[job_id]["headers"]["retries"] == 0
    assert store.dead_letter(job_id) is None
    store.record_dead_letter(job_id, "a stale record", job_id=job_id)
    with pytest.raises(NotReplayable, match="job job-dead is queued now; only dead or failed jobs are replayed"):
        replay(client, job_id)

    store.record_dead_letter("m-garbage", "undecodable message: JSONDecodeError: Expecting value")
    with pytest.raises(NotReplayable, match="m-garbage is a message that was not a job"):
        replay(client, "m-garbage")
    gone = store.create_job("job-gone", JobRequest(model="openai-removed", prompt="x"), "openai")[0]
    store.finish(gone, JobStatus.DEAD, run=1)
    with pytest.raises(InvalidJob, match="job job-gone cannot be replayed as it is: unknown model 'openai-removed'"):
        replay(client, gone)
    assert store.get(gone).status is JobStatus.DEAD  # nothing changed


def test_purge_by_age_and_by_id(client: JobClient) -> None:
    store = client.store
    for dead_id in ("m-1", "m-2", "m-3"):
        store.record_dead_letter(dead_id, "undecodable message")
    with store._writer.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.dead_id == "m-1")
                     .values(at=datetime.now(UTC) - timedelta(days=8)))
    assert purge(store, parse_age("7d")) == 1
    assert purge(store, None, ["m-2", "m-nope"]) == 1
    assert [letter.dead_id for letter in store.dead_letters()] == ["m-3"]
    assert parse_age("30m") == timedelta(minutes=30) and parse_age("2w") == timedelta(days=14)
    with pytest.raises(ValueError, match="give a number and a unit"):
        parse_age("7 days")


def test_bad_scheduler_input_is_one_line_naming_what_to_fix(tmp_path: Path) -> None:
    config = tmp_path / "agent.yml"
    config.write_text('agent:\n  schedules:\n    nightly: {cron: "0 2 * *", input: q.jsonl, model: deepseek}\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")} | {"DQ_CONFIG": str(config)}
    for argv, extra, code, line in [
        (["beat"], {}, 1, "error: agent.schedules.nightly: cron: '0 2 * *' is not a cron expression"),
        (["beat"], {"DQ_BEAT_LOCK_TIMEOUT_S": "0.5"}, 1, "error: DQ_BEAT_LOCK_TIMEOUT_S='0.5': Input should be"),
        (["dead", "purge"], {}, 2, "dq dead purge: give --older-than AGE (e.g. 7d) or the ids to delete"),
        (["dead", "purge", "--older-than", "soon"], {}, 2, "give a number and a unit, e.g. 30m, 12h, 7d, 2w"),
    ]:
        done = subprocess.run([*dq_command(), *argv], env=env | extra, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == code and line in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr
