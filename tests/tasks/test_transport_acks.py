"""tasks/transport.py's acknowledgements on a real Redis through kombu: the consumer loop's
acknowledgements of one turn are written together when the turn ends, each other one at once,
and a channel that closes writes what it still holds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub, set_event_loop

from datus_queue.tasks.transport import TurnAckQoS

QUEUE = "test.acks"


@pytest.fixture
def channel(dq_redis_url: str) -> Iterator[Any]:
    connection = Connection(dq_redis_url, transport="datus_queue.tasks.transport:Transport")
    channel = connection.channel()
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    queue(channel).declare()
    producer = connection.Producer(channel)
    for n in range(5):
        producer.publish({"n": n}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue])
    yield channel
    if not channel.closed:
        channel.close()
    connection.release()


@pytest.fixture
def hub() -> Iterator[Hub]:
    """A hub whose loop is this thread, as Celery's consumer has it."""
    hub = Hub()
    hub._loop_thread = threading.get_ident()  # what Hub.create_loop sets as the loop starts
    set_event_loop(hub)
    yield hub
    set_event_loop(None)


def _take(channel: Any, n: int) -> list[Any]:
    messages = [channel.basic_get(QUEUE) for _ in range(n)]
    assert all(messages), "the published messages are on the queue"
    return messages


def _zrem_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_zrem", {}).get("calls", 0))


def test_one_turns_acknowledgements_are_written_together_when_the_turn_ends(channel: Any, hub: Hub,
                                                                             dq_redis: redis.Redis) -> None:
    assert isinstance(channel.qos, TurnAckQoS)
    messages = _take(channel, 5)
    assert dq_redis.hlen("unacked") == 5
    zrem_before = _zrem_calls(dq_redis)
    for message in messages:
        message.ack()
    assert dq_redis.hlen("unacked") == 5, "not written before the turn ends"
    for tick in list(hub.on_tick):  # the end of the turn (Hub.create_loop calls these before it polls)
        tick()
    assert dq_redis.hlen("unacked") == 0 and dq_redis.zcard("unacked_index") == 0
    assert _zrem_calls(dq_redis) - zrem_before == 1, "five acknowledgements, one ZREM"


def test_an_acknowledgement_off_the_consumer_loop_is_written_at_once(channel: Any, hub: Hub,
                                                                      dq_redis: redis.Redis) -> None:
    message = _take(channel, 1)[0]
    worker = threading.Thread(target=message.ack)
    worker.start()
    worker.join(10)
    assert dq_redis.hlen("unacked") == 0


def test_without_a_hub_each_acknowledgement_is_written_at_once(channel: Any, dq_redis: redis.Redis) -> None:
    set_event_loop(None)
    message = _take(channel, 1)[0]
    message.ack()
    assert dq_redis.hlen("unacked") == 0


def test_a_closing_channel_writes_the_acknowledgements_it_holds_and_puts_back_the_rest(
        channel: Any, hub: Hub, dq_redis: redis.Redis) -> None:
    acked, _kept = _take(channel, 2)  # the second stays unacknowledged
    acked.ack()
    channel.close()
    assert dq_redis.hlen("unacked") == 0, "the acknowledged one removed, the other put back on its queue"
    assert dq_redis.llen(QUEUE) == 4, "the unacknowledged message is back; the acknowledged one is not"
    assert not hub.on_tick, "the closed channel's flush left the hub"
