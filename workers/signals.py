"""Celery signal hooks of the worker: start and stop the runtime and the sweeps, and keep
Celery's log readable while the broker is away.

- The runtime (the process's event loop) starts at worker init (prefork: in each child after the
  fork) and stops at shutdown.
- The sweeps (`tasks.maintenance.sweep_loop`) start once the worker consumes (``worker_ready``,
  in the main process under every pool) and stop at shutdown: recovery needs no `dq beat`. The
  same loop keeps the worker's models in the fleet's catalogue (`tasks.catalog`).
- While Redis is away Celery's consumer logs every reconnect attempt and, for each running job it
  stops, a line and a traceback: hundreds of lines for one outage. `OutageLogFilter` keeps the
  first line of the outage and the line that ends it, and says there how many jobs were stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals
from celery.worker.consumer import consumer as celery_consumer

from datus_queue.workers.runtime import runtime

__all__ = ["OutageLogFilter", "connect"]

logger = logging.getLogger("datus_queue.workers.signals")
_connected = False
_sweeps: Any = None  # the process's SweepLoop, once the worker consumes
_sweeps_lock = threading.Lock()


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


def _start_sweeps(**_: Any) -> None:
    """Every worker offers to sweep (one per interval fleet-wide): a dead worker's jobs run again
    without `dq beat`; and it keeps its models in the fleet's catalogue."""
    global _sweeps
    from datus_queue.tasks.app import app
    from datus_queue.tasks.context import get_context
    from datus_queue.tasks.maintenance.sweep_loop import SweepLoop

    with _sweeps_lock:
        if _sweeps is None:
            ctx = get_context()
            _sweeps = SweepLoop(ctx.settings, ctx.store, app, catalog=ctx.agent_config)
            _sweeps.start()


def _stop_sweeps(**_: Any) -> None:
    global _sweeps
    with _sweeps_lock:
        sweeps, _sweeps = _sweeps, None
    if sweeps is not None:
        sweeps.stop()


def _stop(**_: Any) -> None:
    runtime.stop()
    from datus_queue.tasks.observability import traces

    traces.shutdown()  # send the spans and runs still queued


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
    signals.worker_ready.connect(_start_sweeps, weak=False)
    signals.worker_shutdown.connect(_stop_sweeps, weak=False)
    from datus.models.redact import install_log_redaction

    install_log_redaction()  # no token, key or secret URL in any log line of the worker
    quiet = OutageLogFilter()
    for name in OutageLogFilter.LOGGERS:  # logger objects live as long as the process: the filter stays
        logging.getLogger(name).addFilter(quiet)
    _connected = True


def _start_unless_prefork(sender: Any = None, **_: Any) -> None:
    if not _is_prefork(sender):
        _start()
    _serve_metrics()  # the main process (prefork is refused with a metrics port)


class OutageLogFilter(logging.Filter):
    """One line when the broker connection is lost (or cannot be made at start), one when it is
    back; the reconnect attempts and the per-job cancellations in between are counted, not logged.
    The acknowledgements that then fail on the lost connection (each a CRITICAL line with a
    traceback in kombu) become one line: those messages stay in kombu's unacked hash, and the
    sweep sends their jobs again."""

    LOGGERS = ("celery.worker.consumer.consumer", "celery.worker.consumer.connection", "celery.worker.request")
    _CANCELLING = (celery_consumer.TERMINATING_TASK_ON_RESTART_AFTER_A_CONNECTION_LOSS,
                   "Failed to cancel active request %r after connection loss")
    _UNACKNOWLEDGED = ("Couldn't ack %r, reason:%r", "Couldn't reject %r, reason: %r")  # kombu.message

    def __init__(self) -> None:
        super().__init__()
        self._since: float | None = None  # the outage's start (monotonic), None while connected
        self._stopped = 0  # running jobs Celery stopped at the connection loss
        self._unacknowledged_noted = False  # since the last outage began
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        with self._lock:
            if msg in self._CANCELLING:
                self._stopped += msg == self._CANCELLING[0]
                return False
            if msg in self._UNACKNOWLEDGED:
                if self._unacknowledged_noted:
                    return False
                self._unacknowledged_noted = True
                reason = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else ""
                record.msg = ("could not acknowledge messages taken on the lost broker connection (%r): they "
                              "stay in kombu's unacked hash, and the sweep sends their jobs again")
                record.args, record.exc_info, record.exc_text = (reason,), None, None
                record.levelno, record.levelname = logging.WARNING, "WARNING"  # kombu's CRITICAL: nothing is lost
                return True
            lost = msg == "%s (%r)" and bool(record.args) and record.args[0] == celery_consumer.CONNECTION_RETRY
            if lost or msg == celery_consumer.CONNECTION_ERROR:
                if self._since is not None:
                    return False  # the outage was logged already
                self._since, self._unacknowledged_noted = time.monotonic(), False
                if msg == celery_consumer.CONNECTION_ERROR:  # at start: the URL, the error, no retry schedule
                    uri, exc = record.args[:2] if isinstance(record.args, tuple) else ("the broker", "")
                    record.msg, record.args = "consumer: cannot connect to %s (%s); waiting for it", (uri, exc)
                else:
                    record.msg = "%s (%r); waiting for it"
                return True
            if msg == "Connected to %s" and self._since is not None:
                away, stopped = time.monotonic() - self._since, self._stopped
                self._since, self._stopped = None, 0
                record.msg = "Connected to %s again after %.0fs" + (
                    f"; the {stopped} job(s) running at the connection loss were stopped and the sweep sends "
                    f"them again" if stopped else "")
                record.args = (*(record.args or ()), away)
        return True
