"""``dq metrics``: the fleet's gauges, read from Redis and the job store at each scrape.

    dq_queue_messages{queue}          messages waiting in each queue (every priority step summed)
    dq_messages_unacked               messages taken by workers and not acknowledged yet
    dq_sweeps                         sweeps run so far, fleet-wide (every worker sweeps in turn)
    dq_sweep_last_run_timestamp_seconds   when the last sweep ran (alert when it falls behind)
    dq_dead_letters                   dead letters in the store (``dq dead list``)
    dq_store_jobs{status}             jobs in the store by status
    dq_redis_up, dq_store_up          1 when that part answered this scrape, else 0
    dq_provider_batches{provider,state}   provider batches by state (`metrics_provider_batches`)

One exporter serves the whole fleet (the workers each serve their own counters); a scrape
costs one pipeline of LLEN/HLEN/HGET and two indexed queries.

Redis or the store being away (when the exporter starts too) is not an error of the scrape: the
gauges of the part that answered are served, the other's ``*_up`` is 0, and the exporter logs one
line when the outage starts and one when it ends (`Outage`). It keeps serving until stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from datus_queue.tasks import keys
from datus_queue.tasks.maintenance.outages import Outage, is_outage
from datus_queue.tasks.routing import MAINTENANCE_QUEUE, Queue

__all__ = ["FleetCollector", "serve_fleet_metrics"]

logger = logging.getLogger("datus_queue.tasks.observability.exporter")
_UNACKED = "unacked"  # kombu's Redis transport: the hash of delivered, unacknowledged messages
_SEP = "\x06\x16"  # kombu's separator between a queue's name and a priority step


class FleetCollector(Collector):
    NAMES = ("dq_queue_messages", "dq_messages_unacked", "dq_sweeps", "dq_sweep_last_run_timestamp_seconds",
             "dq_dead_letters", "dq_store_jobs", "dq_redis_up", "dq_store_up")

    def __init__(self, redis_client: Any, store: Any, transport_options: dict[str, Any] | None = None) -> None:
        """``store``: a `JobStore`, or a function making one (called at the first scrape)."""
        self.redis = redis_client
        self._store, self._make_store = (None, store) if callable(store) else (store, None)
        options = transport_options or {}
        self.steps = [step for step in options.get("priority_steps", [0]) if step]
        self.sep = options.get("sep", _SEP)
        self.unacked_key = options.get("unacked_key", _UNACKED)
        self.queues = [queue.value for queue in Queue] + [MAINTENANCE_QUEUE]
        self._redis_outage = Outage(logger, "dq metrics: Redis")
        self._store_outage = Outage(logger, "dq metrics: the job store")

    def _keys(self, queue: str) -> list[str]:
        return [queue] + [f"{queue}{self.sep}{step}" for step in self.steps]

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = self._make_store()  # type: ignore[misc]
        return self._store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        redis_up = yield from self._redis_gauges()
        yield GaugeMetricFamily("dq_redis_up", "1 if Redis answered this scrape", value=int(redis_up))
        store_up = yield from self._store_gauges()
        yield GaugeMetricFamily("dq_store_up", "1 if the job store answered this scrape", value=int(store_up))

    def _redis_gauges(self) -> Any:
        pipe = self.redis.pipeline(transaction=False)
        for queue in self.queues:
            for key in self._keys(queue):
                pipe.llen(key)
        pipe.hlen(self.unacked_key)
        pipe.hmget(keys.maintenance("sweep"), ["runs", "last_at"])
        try:
            replies = pipe.execute()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._redis_outage.failed(exc, "reading queue depths")
            return False
        self._redis_outage.ok()
        depth = GaugeMetricFamily("dq_queue_messages", "Messages waiting in a queue", labels=["queue"])
        at = 0
        for queue in self.queues:
            count = len(self._keys(queue))
            depth.add_metric([queue], sum(replies[at:at + count]))
            at += count
        yield depth
        yield GaugeMetricFamily("dq_messages_unacked", "Messages taken by workers, not acknowledged yet",
                                value=replies[at])
        runs, last_at = replies[at + 1]
        yield GaugeMetricFamily("dq_sweeps", "Sweeps run so far, fleet-wide", value=int(runs or 0))
        if last_at:
            yield GaugeMetricFamily("dq_sweep_last_run_timestamp_seconds", "When the last sweep ran (Unix time)",
                                    value=datetime.fromisoformat(last_at.decode()).timestamp())
        return True

    def _store_gauges(self) -> Any:
        try:
            dead = self.store.count_dead_letters()
            by_status = self.store.count_by_status()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._store_outage.failed(exc, "counting jobs")
            return False
        self._store_outage.ok()
        yield GaugeMetricFamily("dq_dead_letters", "Dead letters in the job store", value=dead)
        jobs = GaugeMetricFamily("dq_store_jobs", "Jobs in the job store by status", labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        return True


def serve_fleet_metrics(port: int, addr: str = "0.0.0.0", stop: threading.Event | None = None) -> None:
    """Serve the fleet's gauges on ``addr:port`` until SIGTERM/SIGINT (or ``stop``)."""
    from prometheus_client import start_http_server

    from datus_queue.tasks.app import app
    from datus_queue.tasks.redis_connect import connect
    from datus_queue.tasks.settings import get_settings
    from datus_queue.tasks.store import JobStore

    settings = get_settings()
    registry = CollectorRegistry()
    # timeouts: a scrape must not hang on a Redis that stops answering
    client = connect(settings, socket_timeout=5, socket_connect_timeout=2)
    make_store: Callable[[], Any] = lambda: JobStore(settings.database_url)
    fleet = FleetCollector(client, make_store, dict(app.conf.broker_transport_options or {}))
    registry.register(fleet)
    from datus_queue.tasks.observability.metrics_provider_batches import ProviderBatchCollector

    registry.register(ProviderBatchCollector(lambda: fleet.store))
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
