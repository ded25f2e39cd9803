"""The Redis transport with four changes.

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
- Acknowledgements are recorded in Redis once per turn of the consumer's loop, all of that
  turn's in one ``ZREM``/``HDEL`` pair, instead of one ``MULTI``/``EXEC`` round trip each: they
  were a quarter of the consumer thread's CPU at 150 jobs/s, and that thread shares the GIL with
  the jobs' event loop. A turn's acknowledgements are flushed right after its callbacks ran and
  before the loop waits again (the hub's ``on_tick``), and when the channel closes. One never
  written (the process died in between) leaves its message in the unacked hash: it comes back
  and ends at once, its job being final (`tasks.jobs`). An acknowledgement from any thread but
  the consumer loop's (no hub: the solo pool, a script draining by hand) is written at once, as
  kombu does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

__all__ = ["SentinelTransport", "Transport"]

logger = logging.getLogger("datus_queue.tasks.transport")
_BAD_BODY = (ValueError, KeyError, TypeError, AttributeError, RecursionError)  # RecursionError: JSON nested too deep


class TurnAckQoS(kombu_redis.QoS):
    """kombu's Redis QoS whose acknowledgements are written once per consumer-loop turn (the
    module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acked: list[str] = []
        self._hub: Any = None  # the hub whose turns flush them, once the first one came

    def ack(self, delivery_tag: str) -> None:
        hub = get_event_loop()
        if hub is None or threading.get_ident() != getattr(hub, "_loop_thread", None):
            super().ack(delivery_tag)
            return
        virtual.QoS.ack(self, delivery_tag)  # no longer ours to restore; its Redis record goes this turn
        self._acked.append(delivery_tag)
        if self._hub is not hub:
            self._hub = hub
            hub.on_tick.add(self.flush_acks)

    def flush_acks(self) -> None:
        """Write the acknowledgements not yet written, in one round trip."""
        tags, self._acked = self._acked, []
        if not tags:
            return
        try:
            with self.channel.conn_or_acquire() as client:
                client.pipeline().zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as exc:  # noqa: BLE001 - the consumer's loop must go on; see the module docstring
            logger.warning("%d acknowledgements not written (%s: %s): their messages come back and end, their jobs "
                           "being final", len(tags), type(exc).__name__, exc)

    def stop_flushing(self) -> None:
        self.flush_acks()
        if self._hub is not None:
            self._hub.on_tick.discard(self.flush_acks)
            self._hub = None


class GuardedChannel(kombu_redis.Channel):
    QoS = TurnAckQoS
    _sync_client: Any = None

    def close(self) -> None:
        qos = self.__dict__.get("_qos")
        if isinstance(qos, TurnAckQoS) and not self.closed:
            qos.stop_flushing()  # before kombu puts back what is unacknowledged
        super().close()

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
