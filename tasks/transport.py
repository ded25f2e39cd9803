"""The Redis transport with three changes.

- A message body that is not a message is recorded as a dead letter (in the job store) and
  skipped, instead of stopping the worker: kombu decodes what it pops from a queue list unguarded, so
  raw bytes pushed onto ``llm.openai`` by anything but Celery would otherwise end the worker
  process ("Unrecoverable error").
- One Redis client per channel for its synchronous commands. kombu builds a new client object
  for every acknowledgement and every prefetched message (``conn_or_acquire``), and building
  one copies redis-py's table of ~170 response callbacks: about 4% of a busy worker's CPU.
  The client shares the channel's connection pool, as the ones built each time did.
- A channel whose connection is closed says so with a connection error. When the worker loses
  Redis, Celery closes the connection twice (``collect``, then ``close``); if the consumer was
  waiting in BRPOP at the time, the first close fails before it marks the channel closed, the
  connection drops its transport, and the second close tries to put the unacknowledged messages
  back through a pool it can no longer build: kombu raised ``AttributeError`` there, which Celery
  does not expect, and the worker process ended ("Unrecoverable error: 'NoneType' object has no
  attribute 'hostname'") on a Redis restart under load. A connection error is what both closes
  ignore. The messages stay in kombu's ``unacked`` hash (Redis was away: nothing could move them);
  the sweep sends their jobs again (`tasks.maintenance.live_messages`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

__all__ = ["SentinelTransport", "Transport"]

logger = logging.getLogger("datus_queue.tasks.transport")
_BAD_BODY = (ValueError, KeyError, TypeError, AttributeError, RecursionError)  # RecursionError: JSON nested too deep


class GuardedChannel(kombu_redis.Channel):
    _sync_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self.connection is None or self.connection.client is None:  # closed: see the module docstring
            raise redis.exceptions.ConnectionError("the broker connection of this channel is closed")
        shared = self._sync_client
        if shared is None or shared.connection_pool is not self.pool:  # first use, or the pool was replaced
            shared = self._sync_client = self._create_client()
        yield shared

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _BAD_BODY as exc:
            self._dead_letter(exc)
            raise kombu_redis.Empty() from None

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except _BAD_BODY as exc:
            self._dead_letter(exc, queue)
            raise kombu_redis.Empty() from None

    def _dead_letter(self, exc: BaseException, queue: str | None = None) -> None:
        """The reason only: the message itself could hold anything, a secret included."""
        from datus_queue.tasks.context import get_context
        from datus_queue.tasks.store.dead_letters import message_id

        dead_id = message_id()
        logger.warning("dropped a message that is not a Celery message (%s); dead letter %s", type(exc).__name__,
                       dead_id)
        try:
            get_context().store.record_dead_letter(
                dead_id, f"undecodable message: {type(exc).__name__}: {exc}"[:500], queue=queue)
        except Exception as err:  # noqa: BLE001 - recording must never take the consumer down
            logger.warning("could not record the dropped message: %s", err)


class Transport(kombu_redis.Transport):
    Channel = GuardedChannel


class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (it asks the sentinels for the master on every (re)connect) with
    the three changes above: the method resolution order puts `GuardedChannel`'s overrides first
    and `SentinelChannel`'s pools below them."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """For ``sentinel://`` URLs (`tasks.redis_connect`)."""

    Channel = GuardedSentinelChannel
