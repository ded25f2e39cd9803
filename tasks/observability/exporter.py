"""``dq metrics``: the fleet's gauges, read from Redis and the job store at each scrape.

    dq_queue_messages{queue}          messages waiting in each queue (every priority step summed)
    dq_messages_unacked               messages taken by workers and not acknowledged yet
    dq_dead_letters                   dead letters in the store (``dq dead list``)
    dq_store_jobs{status}             jobs in the store by status

One exporter serves the whole fleet (the workers each serve their own counters); a scrape
costs one pipeline of LLEN/HLEN and two indexed queries.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from datus_queue.tasks.routing import MAINTENANCE_QUEUE, Queue

__all__ = ["FleetCollector", "serve_fleet_metrics"]

logger = logging.getLogger("datus_queue.tasks.observability.exporter")
_UNACKED = "unacked"  # kombu's Redis transport: the hash of delivered, unacknowledged messages
_SEP = "\x06\x16"  # kombu's separator between a queue's name and a priority step


class FleetCollector(Collector):
    NAMES = ("dq_queue_messages", "dq_messages_unacked", "dq_dead_letters", "dq_store_jobs")

    def __init__(self, redis_client: Any, store: Any, transport_options: dict[str, Any] | None = None) -> None:
        self.redis, self.store = redis_client, store
        options = transport_options or {}
        self.steps = [step for step in options.get("priority_steps", [0]) if step]
        self.sep = options.get("sep", _SEP)
        self.unacked_key = options.get("unacked_key", _UNACKED)
        self.queues = [queue.value for queue in Queue] + [MAINTENANCE_QUEUE]

    def _keys(self, queue: str) -> list[str]:
        return [queue] + [f"{queue}{self.sep}{step}" for step in self.steps]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("dq_queue_messages", "Messages waiting in a queue", labels=["queue"])
        pipe = self.redis.pipeline(transaction=False)
        for queue in self.queues:
            for key in self._keys(queue):
                pipe.llen(key)
        pipe.hlen(self.unacked_key)
        replies = pipe.execute()
        at = 0
        for queue in self.queues:
            count = len(self._keys(queue))
            depth.add_metric([queue], sum(replies[at:at + count]))
            at += count
        yield depth
        yield GaugeMetricFamily("dq_messages_unacked", "Messages taken by workers, not acknowledged yet",
                                value=replies[at])
        yield GaugeMetricFamily("dq_dead_letters", "Dead letters in the job store",
                                value=self.store.count_dead_letters())
        jobs = GaugeMetricFamily("dq_store_jobs", "Jobs in the job store by status", labels=["status"])
        for status, count in self.store.count_by_status().items():
            jobs.add_metric([status], count)
        yield jobs


def serve_fleet_metrics(port: int, addr: str = "0.0.0.0", stop: threading.Event | None = None) -> None:
    """Serve the fleet's gauges on ``addr:port`` until SIGTERM/SIGINT (or ``stop``)."""
    import redis
    from prometheus_client import start_http_server

    from datus_queue.tasks.app import app
    from datus_queue.tasks.settings import get_settings
    from datus_queue.tasks.store import JobStore

    settings = get_settings()
    registry = CollectorRegistry()
    client = redis.Redis.from_url(settings.redis_url)
    registry.register(FleetCollector(client, JobStore(settings.database_url),
                                     dict(app.conf.broker_transport_options or {})))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    stop = stop or threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logger.info("fleet metrics on http://%s:%d/metrics", addr, port)
    print(f"dq metrics: serving http://{addr}:{port}/metrics (queue depths, dead letters, jobs by status)",
          flush=True)
    stop.wait()
    server.shutdown()
    thread.join(5)
    client.close()
