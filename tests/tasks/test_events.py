"""Job events on a real Redis: numbering, replay, live follow without gaps or duplicates."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import redis.asyncio

from datus.schemas.action_history import ActionHistory, ActionRole
from datus_queue.tasks import keys
from datus_queue.tasks.events import AsyncEventPublisher, EventPublisher, afollow, aread_events, follow, read_events
from datus_queue.tasks.schemas import JobEvent, JobStatus

TTL = 300


@pytest.fixture
def job() -> str:
    return f"test-{uuid.uuid4().hex}"


def step(i: int) -> ActionHistory:
    return ActionHistory.create_action(ActionRole.ASSISTANT, "message", f"step {i}", {"i": i})


def seqs(events: list[JobEvent]) -> list[int]:
    return [e.seq for e in events]


def record_only(r: redis.Redis, job: str, data: dict[str, Any], terminal: bool = False) -> int:
    """Number and record an event without PUBLISH: what a publisher that died between the two,
    or a subscriber that missed the message, leaves behind. Mirrors the publisher's format."""
    seq = r.incr(keys.job_event_seq(job))
    event = JobEvent(job_id=job, seq=seq, step=data, terminal=terminal)
    r.xadd(keys.job_events(job), {"event": event.model_dump_json()}, id=f"{seq}-0")
    return seq


def follow_in_thread(r: redis.Redis, job: str, **kwargs: Any) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.extend(follow(r, job, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# --- publishing ----------------------------------------------------------------------------

def test_publish_records_and_publishes_the_same_numbered_json(r: redis.Redis, job: str) -> None:
    pubsub = r.pubsub()
    pubsub.subscribe(keys.job_channel(job))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=1000)
    steps = [step(i) for i in range(3)]
    published = [publisher.publish(job, s) for s in steps]
    published.append(publisher.publish(job, {"answer": 42}, terminal=True, status=JobStatus.SUCCEEDED))

    assert seqs(published) == [1, 2, 3, 4]
    assert read_events(r, job) == published
    live = [JobEvent.model_validate_json(pubsub.get_message(timeout=2)["data"]) for _ in published]
    assert live == published
    assert [entry_id for entry_id, _ in r.xrange(keys.job_events(job))] == [b"1-0", b"2-0", b"3-0", b"4-0"]
    assert published[-1].terminal and published[-1].status is JobStatus.SUCCEEDED
    # the step a reader decodes is the ActionHistory that was published
    assert [ActionHistory.model_validate(e.step) for e in published[:3]] == steps
    pubsub.close()


def test_events_survive_pickle_and_json_with_iso_datetimes(r: redis.Redis, job: str) -> None:
    when = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    event = EventPublisher(r, ttl_s=TTL, maxlen=100).publish(job, {"at": when, "role": ActionRole.TOOL})
    assert event.step == {"at": "2024-05-01T12:30:00Z", "role": "tool"}
    assert datetime.fromisoformat(event.step["at"]) == when
    assert pickle.loads(pickle.dumps(event)) == event
    assert JobEvent.model_validate_json(event.model_dump_json()) == event == read_events(r, job)[0]
    with pytest.raises(TypeError, match="ActionHistory or a dict"):
        EventPublisher(r, ttl_s=TTL, maxlen=100).publish(job, ["not", "a", "step"])  # type: ignore[arg-type]


def test_ttl_and_maxlen_are_set_on_the_stream_and_the_counter(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=120, maxlen=50)
    for i in range(400):
        publisher.publish(job, {"i": i})
    assert 0 < r.ttl(keys.job_events(job)) <= 120
    assert 0 < r.ttl(keys.job_event_seq(job)) <= 120
    assert 50 <= r.xlen(keys.job_events(job)) < 400  # MAXLEN ~ trims whole nodes, so "about" 50
    kept = read_events(r, job)
    assert seqs(kept) == list(range(401 - len(kept), 401))
    # without arguments the settings apply (event_ttl_s defaults to a day)
    EventPublisher(r).publish(job, {"i": 400})
    assert r.ttl(keys.job_events(job)) > 3600


def test_a_retried_job_continues_the_sequence_even_if_its_counter_was_lost(redis_url: str, job: str) -> None:
    first, second = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    assert seqs([EventPublisher(first, TTL, 100).publish(job, {"attempt": 1}) for _ in range(3)]) == [1, 2, 3]
    assert seqs([EventPublisher(second, TTL, 100).publish(job, {"attempt": 2}) for _ in range(3)]) == [4, 5, 6]
    first.delete(keys.job_event_seq(job))  # evicted or expired while the stream lived on
    assert EventPublisher(second, TTL, 100).publish(job, {"attempt": 3}).seq == 7
    assert seqs(read_events(first, job)) == [1, 2, 3, 4, 5, 6, 7]
    first.close()
    second.close()


def test_concurrent_publishers_in_threads_number_without_gaps(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=10_000)
    got: dict[int, list[int]] = {}

    def run(worker: int) -> None:
        got[worker] = [publisher.publish(job, {"worker": worker, "i": i}).seq for i in range(150)]

    threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for worker_seqs in got.values() for s in worker_seqs) == list(range(1, 1201))
    assert all(worker_seqs == sorted(worker_seqs) for worker_seqs in got.values())
    assert seqs(read_events(r, job)) == list(range(1, 1201))


_CHILD = """
import sys, redis
from datus_queue.tasks.events import EventPublisher
url, job, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = redis.Redis.from_url(url)
publisher = EventPublisher(r, ttl_s=300, maxlen=10000)
r.rpush(go + ":ready", 1)
r.blpop(go, timeout=30)  # start together, so the two processes really interleave
for i in range(n):
    publisher.publish(job, {"pid": sys.argv[5], "i": i})
"""


def test_concurrent_publishers_in_two_processes_number_without_gaps(r: redis.Redis, redis_url: str, job: str) -> None:
    go = f"{job}:go"
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, redis_url, job, go, "400", name])
                for name in ("a", "b")]
    for _ in children:
        assert r.blpop(f"{go}:ready", timeout=30) is not None
    r.rpush(go, 1, 1)
    assert [child.wait(60) for child in children] == [0, 0]
    events = read_events(r, job)
    assert seqs(events) == list(range(1, 801))
    for name in ("a", "b"):  # each publisher's own order is kept
        assert [e.step["i"] for e in events if e.step["pid"] == name] == list(range(400))
    assert {e.step["pid"] for e in events[:400]} == {"a", "b"}


# --- replay and follow ---------------------------------------------------------------------

def test_a_late_reader_gets_every_step_exactly_once(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=1000)
    for i in range(5):
        publisher.publish(job, step(i))
    thread, out = follow_in_thread(r, job, timeout_s=10)
    for i in range(5, 10):
        time.sleep(0.01)
        publisher.publish(job, step(i))
    publisher.publish(job, {"done": True}, terminal=True, status="succeeded")
    thread.join(10)
    assert out == read_events(r, job)
    assert seqs(out) == list(range(1, 12)) and out[-1].terminal


def test_a_reader_that_reconnects_with_after_seq_gets_the_rest_once(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=10_000)

    def publish_all() -> None:
        for i in range(300):
            publisher.publish(job, {"i": i})
            time.sleep(0.0005)
        publisher.publish(job, {}, terminal=True, status="succeeded")

    thread = threading.Thread(target=publish_all)
    thread.start()
    seen: list[JobEvent] = []
    for stop_after in (40, 100, None):  # drop the connection twice while the job is running
        reader = follow(r, job, after_seq=seen[-1].seq if seen else 0, timeout_s=20)
        for event in reader:
            seen.append(event)
            if stop_after is not None and len(seen) >= stop_after:
                reader.close()
                break
    thread.join()
    assert seqs(seen) == list(range(1, 302)) and seen[-1].terminal


@pytest.mark.parametrize("join_at", [0, 1, 500, 999])
def test_a_follower_racing_a_fast_publisher_sees_each_seq_once_in_order(r: redis.Redis, job: str,
                                                                        join_at: int) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=10_000)
    joined = threading.Event()

    def publish_all() -> None:
        for i in range(1, 1001):
            if i == join_at + 1:
                joined.set()
            publisher.publish(job, {"i": i}, terminal=i == 1000, status="succeeded" if i == 1000 else None)

    thread = threading.Thread(target=publish_all)
    thread.start()
    joined.wait(10)
    out = list(follow(r, job, timeout_s=30))
    thread.join()
    assert seqs(out) == list(range(1, 1001))
    assert [e.step["i"] for e in out] == list(range(1, 1001)) and out[-1].terminal


@pytest.mark.timeout(30)  # fails the test instead of waiting for the idle poll an hour away
def test_a_missed_message_is_filled_from_the_stream(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=1000)
    publisher.publish(job, {"n": 1})
    # no overall timeout and an idle poll an hour away: only the seq gap of the next live
    # message can bring event 2 back (a follower that skipped it would yield 3 alone)
    reader = follow(r, job, idle_poll_s=3600)
    assert next(reader).seq == 1
    record_only(r, job, {"n": 2})
    publisher.publish(job, {"n": 3})
    assert [next(reader).step["n"], next(reader).step["n"]] == [2, 3]
    publisher.publish(job, {"n": 4}, terminal=True)
    assert [e.step["n"] for e in reader] == [4]


def test_a_terminal_event_missed_live_is_found_when_idle(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=1000)
    publisher.publish(job, {"n": 1})
    thread, out = follow_in_thread(r, job, timeout_s=10, idle_poll_s=0.05)
    time.sleep(0.2)
    record_only(r, job, {"n": 2}, terminal=True)
    thread.join(5)
    assert not thread.is_alive()
    assert [e.step["n"] for e in out] == [1, 2]


def kill_subscriptions(r: redis.Redis, client_name: str) -> int:
    """Drop the follower's pub/sub connection, as Redis does to a subscriber that falls behind."""
    return sum(r.client_kill_filter(_id=c["id"]) for c in r.client_list(_type="pubsub") if c["name"] == client_name)


def test_a_dropped_subscription_loses_nothing(r: redis.Redis, redis_url: str, job: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    name = f"follower-{job[-8:]}"
    reader_client = redis.Redis.from_url(redis_url, client_name=name)
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=10_000)
    thread, out = follow_in_thread(reader_client, job, timeout_s=30, idle_poll_s=0.1)
    killed = 0
    for i in range(1, 601):
        publisher.publish(job, {"i": i}, terminal=i == 600)
        if i % 150 == 0:
            killed += kill_subscriptions(r, name)
        time.sleep(0.0005)
    thread.join(30)
    assert not any(isinstance(e, Exception) for e in out), out[-1:]
    assert seqs(out) == list(range(1, 601))
    assert killed >= 2 and "lost the Redis connection" in caplog.text
    reader_client.close()


def test_the_terminal_event_ends_iteration(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=1000)
    thread, out = follow_in_thread(r, job, timeout_s=10)
    publisher.publish(job, {"n": 1})
    publisher.publish(job, {"n": 2}, terminal=True, status=JobStatus.FAILED)
    thread.join(5)
    assert not thread.is_alive() and seqs(out) == [1, 2] and out[-1].status is JobStatus.FAILED
    publisher.publish(job, {"n": 3})  # a stray late event is not part of the job's story
    assert seqs(list(follow(r, job, timeout_s=5))) == [1, 2]
    assert seqs(list(follow(r, job, after_seq=1, timeout_s=5))) == [2]


@pytest.mark.timeout(30)  # fails the test if the timeout never fires
def test_timeout_bounds_the_whole_wait(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=10_000)
    publisher.publish(job, {"n": 1})
    stop = threading.Event()

    def keep_publishing() -> None:  # never quiet for long: a timeout per quiet spell would never fire
        n = 1
        while not stop.wait(0.05):
            n += 1
            publisher.publish(job, {"n": n})

    thread = threading.Thread(target=keep_publishing, daemon=True)
    thread.start()
    got: list[JobEvent] = []
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=f"job {job}: no terminal event within 0.4s"):
            got.extend(follow(r, job, timeout_s=0.4, idle_poll_s=0.1))  # keeps what came before the timeout
    finally:
        stop.set()
        thread.join(10)
    assert time.monotonic() - started >= 0.4  # not before its time
    assert got and seqs(got) == list(range(1, len(got) + 1))


def test_an_expired_stream_of_a_final_job_ends_the_follower(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=1, maxlen=100)
    for i in range(3):
        publisher.publish(job, {"n": i})
    deadline = time.monotonic() + 5
    while r.exists(keys.job_events(job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    asked: list[str] = []

    def is_final(job_id: str) -> bool:
        asked.append(job_id)
        return True

    # ends at the first quiet spell, asking once: waiting on would ask again, then time out
    assert list(follow(r, job, timeout_s=5, is_final=is_final, idle_poll_s=0.05)) == []
    assert asked == [job]
    with pytest.raises(TimeoutError):  # a job that is not final keeps its reader waiting
        list(follow(r, job, timeout_s=0.3, is_final=lambda _: False, idle_poll_s=0.05))


def test_a_final_job_without_a_terminal_event_ends_after_a_quiet_spell(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=TTL, maxlen=100)
    publisher.publish(job, {"n": 1})
    publisher.publish(job, {"n": 2})  # then the worker died and the job was dead-lettered
    out = list(follow(r, job, timeout_s=5, is_final=lambda _: True, idle_poll_s=0.05))
    assert seqs(out) == [1, 2]


# --- async ---------------------------------------------------------------------------------

async def test_async_publish_and_late_follow(ar: redis.asyncio.Redis, job: str) -> None:
    publisher = AsyncEventPublisher(ar, ttl_s=TTL, maxlen=1000)
    first = [await publisher.publish(job, step(i)) for i in range(3)]
    assert seqs(first) == [1, 2, 3] and await aread_events(ar, job) == first

    async def collect() -> list[JobEvent]:
        return [e async for e in afollow(ar, job, timeout_s=10)]

    reader = asyncio.create_task(collect())
    for i in range(3, 8):
        await asyncio.sleep(0.01)
        await publisher.publish(job, step(i))
    await publisher.publish(job, {}, terminal=True, status=JobStatus.SUCCEEDED)
    out = await asyncio.wait_for(reader, 10)
    assert out == await aread_events(ar, job) and seqs(out) == list(range(1, 10))


async def test_async_follower_racing_a_fast_publisher(ar: redis.asyncio.Redis, redis_url: str, job: str) -> None:
    publisher_client = redis.asyncio.Redis.from_url(redis_url)
    publisher = AsyncEventPublisher(publisher_client, ttl_s=TTL, maxlen=10_000)

    async def publish_all() -> None:
        for i in range(1, 1001):
            await publisher.publish(job, {"i": i}, terminal=i == 1000)
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the follower join mid-stream

    writer = asyncio.create_task(publish_all())
    await asyncio.sleep(0)
    out = [e async for e in afollow(ar, job, timeout_s=30)]
    await writer
    assert seqs(out) == list(range(1, 1001))
    await publisher_client.aclose()


async def test_async_reconnect_and_gap_repair(ar: redis.asyncio.Redis, r: redis.Redis, job: str) -> None:
    publisher = AsyncEventPublisher(ar, ttl_s=TTL, maxlen=1000)
    for i in range(4):
        await publisher.publish(job, {"n": i})
    async with aclosing(afollow(ar, job, timeout_s=10, idle_poll_s=60)) as reader:
        head = [await anext(reader) for _ in range(4)]
        record_only(r, job, {"n": 4})
        await publisher.publish(job, {"n": 5})
        head += [await anext(reader), await anext(reader)]
    assert [e.step["n"] for e in head] == list(range(6))
    await publisher.publish(job, {"n": 6}, terminal=True)
    rest = [e async for e in afollow(ar, job, after_seq=head[-1].seq, timeout_s=5)]
    assert seqs(rest) == [7] and rest[-1].terminal


async def test_async_timeout_and_async_is_final(ar: redis.asyncio.Redis, job: str) -> None:
    with pytest.raises(TimeoutError, match=job):
        [e async for e in afollow(ar, job, timeout_s=0.3)]

    async def is_final(job_id: str) -> bool:
        return job_id == job

    # nothing was ever recorded for the job (the stream is gone) and it is final: end, empty
    assert [e async for e in afollow(ar, job, timeout_s=5, is_final=is_final, idle_poll_s=0.05)] == []


async def test_async_dropped_subscription_loses_nothing(r: redis.Redis, redis_url: str, job: str) -> None:
    name = f"afollower-{job[-8:]}"
    reader_client = redis.asyncio.Redis.from_url(redis_url, client_name=name)
    publisher = AsyncEventPublisher(reader_client, ttl_s=TTL, maxlen=10_000)
    reader = asyncio.create_task(_acollect(afollow(reader_client, job, timeout_s=30, idle_poll_s=0.1)))
    killed = 0
    for i in range(1, 301):
        await publisher.publish(job, {"i": i}, terminal=i == 300)
        if i % 100 == 0:
            killed += kill_subscriptions(r, name)
        await asyncio.sleep(0.0005)
    assert seqs(await asyncio.wait_for(reader, 30)) == list(range(1, 301))
    assert killed >= 2
    await reader_client.aclose()


async def _acollect(events: AsyncIterator[JobEvent]) -> list[JobEvent]:
    return [e async for e in events]
