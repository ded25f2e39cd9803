"""The Redis calls made during one turn of an event loop (Lua scripts, plain commands), sent in one pipeline.

A worker keeps hundreds of requests in flight and the limiter makes a call before and after
each. Awaited one by one, a call costs about 75 µs of the worker's CPU (measured here,
redis-py with hiredis: most of it the event loop's round trip); pipelined, about 15 µs. So a
call is queued and awaited, and at the end of the loop's turn everything queued goes in one
pipeline (like the store's group commit: a lone call goes at once, there is no timer).

Scripts are called by SHA; a Redis that does not know one (restarted, flushed) gets it loaded
and the calls that missed it are sent again. Plain commands (`command`: a job's cancel flag)
go in the same pipeline.

One batch per client (`of`): the worker's client belongs to one event loop, so the limiter's
calls, the events and the cancel-flag reads of a turn share one pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["RedisBatch"]

logger = logging.getLogger("datus_queue.tasks.redis_batch")
Orphan = Callable[[Any], None]  # what to do with the result of a call whose caller went away
# one queued call: the script (None: a plain command), its arguments, its caller's future, the orphan hook
_Call = tuple["str | None", tuple[Any, ...], "asyncio.Future[Any]", "Orphan | None"]
_BATCHES: weakref.WeakKeyDictionary[Any, RedisBatch] = weakref.WeakKeyDictionary()


class RedisBatch:
    """One per event loop and Redis client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._shas: dict[str, str] = {}

    @classmethod
    def of(cls, client: Any) -> RedisBatch:
        """The batch of ``client`` (an asyncio client, which serves one event loop)."""
        batch = _BATCHES.get(client)
        if batch is None:  # a proxy: the batch must not keep its key, the client, alive
            batch = _BATCHES[client] = cls(weakref.proxy(client))
        return batch

    def call(self, script: str, keys: list[str], args: list[Any], orphan: Orphan | None = None) -> asyncio.Future[Any]:
        """Queue ``EVALSHA script keys args``; the future has its reply. ``orphan`` gets the
        reply if the caller cancelled meanwhile (e.g. to give back a slot it was granted)."""
        return self._queue(script, (len(keys), *keys, *args), orphan)

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a plain command (``"EXISTS", key``); the future has its reply."""
        return self._queue(None, args, None)

    def _queue(self, script: str | None, args: tuple[Any, ...], orphan: Orphan | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, args, future, orphan))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _sha(self, script: str) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        return sha

    async def _send(self, batch: list[_Call]) -> None:
        import redis.exceptions

        try:
            replies = await self._execute(batch)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
            if missing:
                for script in {batch[i][0] for i in missing}:
                    await self._client.script_load(script)
                again = await self._execute([batch[i] for i in missing])
                for i, reply in zip(missing, again):
                    replies[i] = reply
        except Exception as exc:  # noqa: BLE001 - every caller hears how its call ended
            replies = [exc] * len(batch)
        for (_, _, future, orphan), reply in zip(batch, replies):
            if future.cancelled():
                if orphan is not None and not isinstance(reply, BaseException):
                    try:
                        orphan(reply)
                    except Exception:
                        logger.exception("the limiter could not give back an orphaned grant")
            elif isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:  # no pipeline object for a lone call
            script, args, _, _ = batch[0]
            try:
                if script is None:
                    return [await self._client.execute_command(*args)]
                return [await self._client.evalsha(self._sha(script), *args)]
            except Exception as exc:
                import redis.exceptions

                if isinstance(exc, redis.exceptions.ResponseError):
                    return [exc]
                raise
        pipe = self._client.pipeline(transaction=False)
        for script, args, _, _ in batch:
            if script is None:
                pipe.execute_command(*args)
            else:
                pipe.evalsha(self._sha(script), *args)
        return await pipe.execute(raise_on_error=False)
