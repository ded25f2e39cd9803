"""tasks/redis_batch.py on a real Redis: the calls of one loop turn go in one pipeline —
the limiter's scripts, the events' and plain commands (a job's cancel flag) alike."""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio

from datus_queue.tasks.redis_batch import RedisBatch

_ECHO = "return {KEYS[1], ARGV[1]}"
_INCR = "return redis.call('INCR', KEYS[1])"


@pytest.fixture
def key() -> str:
    return f"test-batch-{uuid.uuid4().hex}"


def _count_pipelines(client: Any) -> list[int]:
    made: list[int] = []
    pipeline = client.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return pipeline(*args, **kwargs)

    client.pipeline = counting
    return made


async def test_scripts_and_commands_of_one_turn_share_one_pipeline(ar: redis.asyncio.Redis, key: str) -> None:
    await ar.set(f"{key}:flag", "1")
    for script in (_ECHO, _INCR):  # known to Redis: a script it does not know is sent again once loaded
        await ar.script_load(script)
    made = _count_pipelines(ar)
    batch = RedisBatch.of(ar)
    futures = [batch.command("EXISTS", f"{key}:flag"), batch.call(_ECHO, [key], ["a"]),
               batch.command("EXISTS", f"{key}:none"), batch.call(_INCR, [f"{key}:n"], [])]
    replies = await asyncio.gather(*futures)
    assert replies == [1, [key.encode(), b"a"], 0, 1]
    assert len(made) == 1  # one round trip for the four
    # a lone call goes without a pipeline object
    assert await batch.command("EXISTS", f"{key}:flag") == 1 and len(made) == 1
    await ar.delete(f"{key}:flag", f"{key}:n")


async def test_an_error_fails_only_its_own_caller(ar: redis.asyncio.Redis, key: str) -> None:
    await ar.set(f"{key}:text", "not a number")
    batch = RedisBatch.of(ar)
    bad, good = batch.command("INCR", f"{key}:text"), batch.command("INCR", f"{key}:n")
    with pytest.raises(redis.exceptions.ResponseError):
        await bad
    assert await good == 1
    await ar.delete(f"{key}:text", f"{key}:n")


async def test_a_script_redis_forgot_is_loaded_and_nothing_runs_twice(ar: redis.asyncio.Redis, key: str) -> None:
    batch = RedisBatch.of(ar)
    assert await asyncio.gather(batch.call(_INCR, [f"{key}:a"], []), batch.command("INCR", f"{key}:b")) == [1, 1]
    await ar.script_flush()  # a restarted or flushed Redis
    replies = await asyncio.gather(batch.call(_INCR, [f"{key}:a"], []), batch.command("INCR", f"{key}:b"))
    assert replies == [2, 2]  # the script sent again once loaded; the command answered the first time
    assert int(await ar.get(f"{key}:a")) == 2 and int(await ar.get(f"{key}:b")) == 2
    await ar.delete(f"{key}:a", f"{key}:b")


async def test_one_batch_per_client_which_it_does_not_keep_alive(redis_url: str) -> None:
    first, second = redis.asyncio.Redis.from_url(redis_url), redis.asyncio.Redis.from_url(redis_url)
    try:
        assert RedisBatch.of(first) is RedisBatch.of(first)
        assert RedisBatch.of(first) is not RedisBatch.of(second)
    finally:
        await first.aclose()
        await second.aclose()
    import weakref

    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None
