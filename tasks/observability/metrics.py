"""The worker's Prometheus metrics, served on ``dq worker --metrics-port`` (``DQ_METRICS_PORT``).

Labels stay low-cardinality: provider, job kind, status, error code, model name (bounded by
``agent.allowed_models``) — never a job id, a prompt or a message. The recording functions are
what `tasks.jobs` calls; each is a few counter increments, so they are always on.

    dq_jobs_total{provider,kind,status}            jobs that ended here (succeeded, failed, cancelled, dead)
    dq_job_retries_total{provider,code}            job retries scheduled, by error code
    dq_job_failures_total{provider,code}           jobs failed, by error code
    dq_tokens_total{provider,model,type}           tokens of model calls: input, output, cached
    dq_cost_usd_total{provider,model}              their cost
    dq_model_call_seconds{provider,model}          a model call's latency, its retries included (histogram)
    dq_queue_wait_seconds{provider,kind}           from submit to the job's first start (histogram)
    dq_jobs_in_flight{provider}                    jobs running in this process
    dq_ratelimit_waits_total{provider,model,how}   waits for the fleet's limits: on the loop, or deferred as a retry
    dq_ratelimit_wait_seconds_total{provider,model}
    dq_ratelimit_cooldowns_total{provider,model}   cooldowns this worker set after a 429/529
    dq_mcp_sessions{server}                        open sessions of this process's MCP pool
    dq_mcp_server_starts_total{server}, dq_mcp_server_losses_total{server}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

__all__ = [
    "cooldown_set", "first_start", "in_flight", "job_finished", "job_retried", "model_calls", "rate_limit_wait",
    "serve", "watch_mcp_pools",
]

logger = logging.getLogger("datus_queue.tasks.observability.metrics")
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_WAIT = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)

JOBS = Counter("dq_jobs", "Jobs that ended in this worker", ["provider", "kind", "status"])
RETRIES = Counter("dq_job_retries", "Job retries scheduled, by error code", ["provider", "code"])
FAILURES = Counter("dq_job_failures", "Jobs failed, by error code", ["provider", "code"])
TOKENS = Counter("dq_tokens", "Tokens of model calls", ["provider", "model", "type"])
COST = Counter("dq_cost_usd", "Cost of model calls in USD", ["provider", "model"])
CALL_SECONDS = Histogram("dq_model_call_seconds", "Latency of a model call, its retries included",
                         ["provider", "model"], buckets=_SECONDS)
QUEUE_WAIT = Histogram("dq_queue_wait_seconds", "From submit to the job's first start",
                       ["provider", "kind"], buckets=_WAIT)
IN_FLIGHT = Gauge("dq_jobs_in_flight", "Jobs running in this worker process", ["provider"])
RATE_WAITS = Counter("dq_ratelimit_waits", "Waits for the fleet's rate limits", ["provider", "model", "how"])
RATE_WAIT_SECONDS = Counter("dq_ratelimit_wait_seconds", "Time spent waiting for the fleet's rate limits",
                            ["provider", "model"])
COOLDOWNS = Counter("dq_ratelimit_cooldowns", "Cooldowns this worker set after a 429 or an overload",
                    ["provider", "model"])


@contextmanager
def in_flight(provider: str) -> Iterator[None]:
    """Counts a job as running here while the block runs."""
    gauge = IN_FLIGHT.labels(provider)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def first_start(provider: str, kind: str, submitted: datetime | None) -> None:
    """A job starts for the first time: its wait since it was submitted."""
    if submitted is not None:
        QUEUE_WAIT.labels(provider, kind).observe(max(0.0, (datetime.now(UTC) - submitted).total_seconds()))


def job_finished(provider: str, kind: str, status: str, error_code: str | None = None) -> None:
    """The job reached ``status`` (succeeded, failed, cancelled, dead) here."""
    JOBS.labels(provider, kind, status).inc()
    if status == "failed":
        FAILURES.labels(provider, error_code or "unknown").inc()


def job_retried(provider: str, code: str) -> None:
    RETRIES.labels(provider, code).inc()


def model_calls(calls: Iterable[Any]) -> None:
    """The `Usage` records of a job's model calls."""
    for usage in calls:
        provider, model = usage.provider or "unknown", usage.model or "unknown"
        TOKENS.labels(provider, model, "input").inc(usage.input_tokens)
        TOKENS.labels(provider, model, "output").inc(usage.output_tokens)
        TOKENS.labels(provider, model, "cached").inc(usage.cached_tokens)
        COST.labels(provider, model).inc(usage.cost_usd)
        CALL_SECONDS.labels(provider, model).observe(usage.latency_ms / 1000.0)


def rate_limit_wait(provider: str, model: str, seconds: float, deferred: bool) -> None:
    RATE_WAITS.labels(provider, model, "deferred" if deferred else "loop").inc()
    RATE_WAIT_SECONDS.labels(provider, model).inc(max(0.0, seconds))


def cooldown_set(provider: str, model: str) -> None:
    COOLDOWNS.labels(provider, model).inc()


class _PoolCollector(Collector):
    """The MCP pools' sessions and restarts, read at scrape time (`MCPPool.stats`)."""

    def __init__(self, pools: Callable[[], Iterable[Any]]) -> None:
        self._pools = pools

    def collect(self) -> Iterable[Any]:
        sessions = GaugeMetricFamily("dq_mcp_sessions", "Open sessions of this process's MCP server pool",
                                     labels=["server"])
        starts = CounterMetricFamily("dq_mcp_server_starts", "MCP server sessions started by the pool",
                                     labels=["server"])
        losses = CounterMetricFamily("dq_mcp_server_losses", "MCP server sessions lost (the server died)",
                                     labels=["server"])
        totals: dict[str, dict[str, int]] = {}
        for pool in list(self._pools()):
            for _ in range(3):  # the loop may change the pool while this thread reads it
                try:
                    stats = pool.stats()
                    break
                except RuntimeError:
                    continue
            else:
                continue
            for server, entry in stats.items():
                into = totals.setdefault(server, {"sessions": 0, "starts": 0, "losses": 0})
                for key in into:
                    into[key] += entry.get(key, 0)
        for server, entry in sorted(totals.items()):
            sessions.add_metric([server], entry["sessions"])
            starts.add_metric([server], entry["starts"])
            losses.add_metric([server], entry["losses"])
        yield from (sessions, starts, losses)


_pool_collector: _PoolCollector | None = None


def watch_mcp_pools(pools: Callable[[], Iterable[Any]]) -> None:
    """Report the MCP pools ``pools()`` returns (once per process)."""
    global _pool_collector
    if _pool_collector is None:
        _pool_collector = _PoolCollector(pools)
        REGISTRY.register(_pool_collector)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` from a thread of this process."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr)
    logger.info("metrics on http://%s:%d/metrics", addr, port)
