"""The worker's event loop never waits on the store: while another connection holds the job
store's SQLite write lock, a real ``dq worker`` goes on publishing other jobs' events on Redis
pub/sub and renewing the limiter's concurrency slots in Redis; once the lock is released, every
job finishes.

The jobs' writes wait for the lock in the store's writer thread (`tasks.store.group_commit`).
Were they made on the loop's thread, the first write to meet the lock would stop everything
else in the process until the lock went: no event, no renewal, until the release.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import yaml
from sqlalchemy.engine import make_url

from datus.models.scripted import Reply
from datus_queue.tasks.schemas import JobStatus

from .conftest import JobEnv, StartWorker, generations, wait_for

HOLD_S = 10.0  # how long the lock is held (not asserted: the assertions are about order)
SHORT = [f"short-{n}" for n in range(6)]  # answered 3..8 s after they arrive: while the lock is held
LONG = [f"long-{n}" for n in range(2)]  # answered after 18 s: in their calls, holding slots, all along


@dataclass
class Seen:
    """What the test's Redis connections saw, in the order they saw it (``time.monotonic()``)."""

    events: list[tuple[float, str, str, bool]] = field(default_factory=list)  # (at, job id, action type, terminal)
    renewals: list[tuple[float, str]] = field(default_factory=list)  # (at, slot id): a slot's lease moved on
    errors: list[str] = field(default_factory=list)  # what the watchers met (they go on after it)
    stop: threading.Event = field(default_factory=threading.Event)


def _follow_events(redis_url: str, job_ids: set[str], seen: Seen, subscribed: threading.Event) -> None:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("dq:job:*")  # pub/sub spans Redis databases: only this test's jobs count
    try:
        while not seen.stop.is_set():
            message = pubsub.get_message(timeout=0.05)
            if message is None:
                if pubsub.subscribed:
                    subscribed.set()
                continue
            event = json.loads(message["data"])
            if event.get("job_id") in job_ids:
                seen.events.append((time.monotonic(), event["job_id"], event["step"].get("action_type", ""),
                                    bool(event.get("terminal"))))
    finally:
        pubsub.close()
        client.close()


def _watch_slots(redis_url: str, seen: Seen) -> None:
    """A slot whose score (its lease's end) goes up was renewed; a new slot is an acquire."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)  # a hung read is an error seen, not a silent watcher
    leases: dict[str, float] = {}
    try:
        while not seen.stop.is_set():
            try:
                for key in client.scan_iter("dq:rl:*:slots"):
                    for member, score in client.zrange(key, 0, -1, withscores=True):
                        slot = member.decode()
                        if slot in leases and score > leases[slot]:
                            seen.renewals.append((time.monotonic(), slot))
                        leases[slot] = max(score, leases.get(slot, 0.0))
            except redis.RedisError as exc:
                seen.errors.append(f"{time.monotonic():.3f} slot watcher: {exc!r}")
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture
def watched(job_env: JobEnv) -> Iterator[tuple[Seen, set[str]]]:
    """``(seen, job_ids)``: fill ``job_ids`` with the jobs to follow; both watchers stop at teardown."""
    seen, job_ids, subscribed = Seen(), set(), threading.Event()
    threads = [threading.Thread(target=_follow_events, args=(job_env.redis_url, job_ids, seen, subscribed)),
               threading.Thread(target=_watch_slots, args=(job_env.redis_url, seen))]
    for thread in threads:
        thread.start()
    assert subscribed.wait(10), "the pub/sub follower never subscribed"
    yield seen, job_ids
    seen.stop.set()
    for thread in threads:
        thread.join(10)


def _with_concurrency_limit(job_env: JobEnv) -> None:
    """The ``openai`` model gets ``max_concurrency``, so each of its calls holds a limiter slot
    that the worker renews in Redis while the call runs."""
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["models"]["openai"]["rate_limits"] = {"max_concurrency": 50}
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _hold_write_lock(database_url: str, seconds: float) -> tuple[float, float, dict[str, Any]]:
    """BEGIN IMMEDIATE on the job store from a connection of the test's own, for ``seconds``:
    ``(taken_at, released_at, what the store said just before the release)``."""
    conn = sqlite3.connect(make_url(database_url).database, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        taken_at = time.monotonic()
        time.sleep(seconds)
        # read by another connection while the lock is still held (WAL readers do not wait)
        reader = sqlite3.connect(make_url(database_url).database, timeout=30)
        final = dict(reader.execute("SELECT job_id, status FROM jobs").fetchall())
        reader.close()
        released_at = time.monotonic()
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return taken_at, released_at, final


def test_events_and_slot_renewals_flow_while_the_store_is_locked(
        job_env: JobEnv, worker: StartWorker, client: Any, watched: tuple[Seen, set[str]]) -> None:
    seen, job_ids = watched
    _with_concurrency_limit(job_env)
    # a slot lease of 3 s instead of 30 s: renewals every second instead of every ten, so that
    # several fall inside the hold (how a renewal is made does not depend on the lease)
    started = worker("openai", concurrency=16, env={"DQ_RATE_LIMIT_SLOT_LEASE_S": "3"})

    delays = {marker: 3.0 + n for n, marker in enumerate(SHORT)} | dict.fromkeys(LONG, 18.0)
    for marker, delay in delays.items():  # each answer comes that long after its request arrives
        job_env.fake.script.add(Reply(text=f"{marker} is answered in a few words", latency_s=delay), match=marker)
    jobs = {marker: client.submit({"model": "openai", "prompt": f"{marker}: how many orders?"}) for marker in delays}
    job_ids.update(jobs.values())
    # every job has started (its row written) and its call is under way before the lock is taken
    wait_for(lambda: all(generations(job_env.fake, marker) for marker in delays), 30, "every call to arrive")
    wait_for(lambda: all(client.store.get(job_id).status is JobStatus.RUNNING for job_id in jobs.values()), 30,
             "every job to be running")

    taken_at, released_at, final_at_release = _hold_write_lock(job_env.database_url, HOLD_S)

    results = {marker: client.result(job_id, timeout=60) for marker, job_id in jobs.items()}
    assert all(result.status is JobStatus.SUCCEEDED for result in results.values()), results
    wait_for(lambda: {job for _, job, _, terminal in seen.events if terminal} == set(jobs.values()), 15,
             "every terminal event")
    events = list(seen.events)
    during = [(at, job, kind) for at, job, kind, _ in events if taken_at < at < released_at]
    answered = [(at, job) for at, job, kind in during if kind == "assistant_delta"]
    assert answered, f"no call was answered while the lock was held: {events}"
    # a job answered while the lock was held could not write its finish: it stayed running until
    # the release, and its terminal event (published after the write) came after it, once
    for job in {job for _, job in answered}:
        assert final_at_release[job] == JobStatus.RUNNING.value
        assert [at > released_at for at, j, _, terminal in events if j == job and terminal] == [True]
    # after the first of them met the lock, other jobs' events went on flowing and the
    # limiter's slots went on being renewed, until the release
    first_at, first_job = answered[0]
    others = {job for at, job, _ in during if at > first_at and job != first_job}
    assert len(others) >= 2, f"after {first_job} met the lock, events came only from {others}: {events}"
    assert any(first_at < at < released_at for at, _ in seen.renewals), (
        f"no slot renewal between the first blocked write ({first_at:.3f}) and the release ({released_at:.3f}, "
        f"taken {taken_at:.3f}): {seen.renewals}; watcher errors {seen.errors}; worker log:\n{started.log()[-6000:]}")
