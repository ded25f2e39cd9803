"""Celery signal hooks of the worker: start and stop the runtime, and log each task's end
with low-cardinality labels (task name, state — never arguments or messages)."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from datus_queue.workers.runtime import runtime

__all__ = ["connect"]

logger = logging.getLogger("datus_queue.workers.signals")
_connected = False


def _start(**_: Any) -> None:
    _quiet_http_logs()
    runtime.start()


def _start_tracing(**_: Any) -> None:
    """Set up the trace backends at start, once logging is (a bad setting is a warning then),
    in the process that runs the jobs: prefork children after the fork (their exporters' threads
    must not be forked), the main process otherwise."""
    from datus_queue.tasks.observability import traces

    traces.tracers()


def _start_tracing_unless_prefork(sender: Any = None, instance: Any = None, **_: Any) -> None:
    if not _is_prefork(instance):
        _start_tracing()


def _is_prefork(worker: Any) -> bool:
    pool = getattr(worker, "pool_cls", None)
    return "prefork" in getattr(pool, "__module__", str(pool))


def _serve_metrics() -> None:
    """``/metrics`` of this process, when DQ_METRICS_PORT (or --metrics-port) asks for it."""
    from datus_queue.tasks.settings import get_settings

    settings = get_settings()
    if settings.metrics_port is None:
        return
    from datus_queue.tasks.context import get_context
    from datus_queue.tasks.observability import metrics

    metrics.watch_mcp_pools(get_context().mcp_pools)
    metrics.serve(settings.metrics_port, settings.metrics_addr)


def _quiet_http_logs() -> None:
    # one INFO line per HTTP request drowns the worker's own log at hundreds of calls a second
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "anthropic", "google_genai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _stop(**_: Any) -> None:
    runtime.stop()
    from datus_queue.tasks.observability import traces

    traces.shutdown()  # send the spans and runs still queued


def _unknown(sender: Any = None, name: str | None = None, id: str | None = None, **_: Any) -> None:
    logger.warning("rejected a message for unknown task %r (id %s)", name, id)


def connect() -> None:
    """prefork children start their runtime after fork; the threads pool starts it in the
    main process. Both stop it at shutdown."""
    global _connected
    if _connected:
        return
    signals.worker_process_init.connect(_start, weak=False)
    signals.worker_process_init.connect(_start_tracing, weak=False)
    signals.celeryd_after_setup.connect(_start_tracing_unless_prefork, weak=False)
    signals.worker_process_shutdown.connect(_stop, weak=False)
    signals.worker_init.connect(_start_unless_prefork, weak=False)
    signals.worker_shutdown.connect(_stop, weak=False)
    signals.task_unknown.connect(_unknown, weak=False)
    _connected = True


def _start_unless_prefork(sender: Any = None, **_: Any) -> None:
    if not _is_prefork(sender):
        _start()
    _serve_metrics()  # the main process (prefork is refused with a metrics port)
