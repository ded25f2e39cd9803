"""Every worker sweeps: recovering a dead worker's jobs needs no `dq beat`.

Each `dq worker` process runs a `SweepLoop` — a thread of its own, off the event loop — that offers
to sweep every quarter of ``DQ_SWEEP_INTERVAL_S`` (10 s). One offer per interval wins, fleet-wide:
the winner sets ``dq:maintenance:sweep:turn`` with ``SET NX PX <interval>`` and runs
`tasks.maintenance.sweeper.sweep`; the others find the key and do nothing (one Redis command). So the
fleet sweeps once every interval to 1.25 intervals, however many workers there are, and as long as
one of them is alive. The turn is not given back when a sweep ends: it is what spaces the sweeps.
A sweep that outlasts its turn may overlap the next one; that is safe (`tasks.store.sweeps` claims
each job in one conditional update).

The worst case from a worker's death to its jobs being sent again is a lease (the death came right
after a renewal) plus a turn and a quarter (the sweep that came just before the lease ran out found
nothing): ``DQ_LEASE_S + 1.25 × DQ_SWEEP_INTERVAL_S``, 27.5 s by default. A retry whose countdown
message the dead worker held is sent again ``DQ_RESEND_AFTER_S`` + 1.25 intervals after it was due.

The loop also keeps the worker's models in the fleet's catalogue (`tasks.catalog`): it writes them
at its first offer and again once an interval has passed, so a Redis that lost them (restarted
without persistence, flushed, away when the worker started) has them back within an interval.

Redis or the job store being away is an outage (`Outage`): one line when it starts, one when it
ends, and the loop goes on offering. Anything else is a bug: its traceback is logged once, and
again only when it changes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from datus_queue.tasks import keys
from datus_queue.tasks.maintenance.outages import Outage, is_outage
from datus_queue.tasks.maintenance.runs import record_run
from datus_queue.tasks.maintenance.sweeper import SweepReport, sweep
from datus_queue.tasks.settings import Settings

__all__ = ["TURN_KEY", "SweepLoop"]

logger = logging.getLogger("datus_queue.tasks.maintenance.sweep_loop")
TURN_KEY = f"{keys.maintenance('sweep')}:turn"  # a string with an expiry: who sweeps this interval


class SweepLoop:
    """The sweeps of one worker process. ``store`` is the process's `JobStore`, ``app`` its Celery
    app, ``catalog`` the agent.yml whose models it keeps in the fleet's catalogue (None: none)."""

    def __init__(self, settings: Settings, store: Any, app: Any, node: str | None = None,
                 catalog: Any = None) -> None:
        from datus_queue.tasks.redis_connect import connect

        self.settings, self.store, self.app = settings, store, app
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        # a client of its own with timeouts: a Redis that stops answering must not hang the loop
        self.redis = connect(settings, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)
        self.every_s = max(0.05, settings.sweep_interval_s / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis = Outage(logger, f"Redis ({_where(settings.redis_url)})")
        self._store = Outage(logger, "the job store")
        self._bug: str | None = None
        self._catalog = catalog
        self._published_at: float | None = None  # time.monotonic() of the last catalogue write

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="dq-sweeper", daemon=True)
        self._thread.start()
        logger.info("sweeper: this worker offers to sweep every %.1fs (one worker sweeps per %.0fs; leases %.0fs)",
                    self.every_s, self.settings.sweep_interval_s, self.settings.lease_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.redis.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.every_s)

    def run_once(self) -> SweepReport | None:
        """Sweep if it is this worker's turn: the report, or None (not its turn, or it failed)."""
        try:
            self._publish_catalog()
        except Exception as exc:  # noqa: BLE001 - as below; the next offer writes it again
            self._failed(exc, "writing the model catalogue")
            return None
        try:
            mine = bool(self.redis.set(TURN_KEY, self.node, nx=True, px=max(1, int(self.settings.sweep_interval_s * 1000))))
        except Exception as exc:  # noqa: BLE001 - an outage is waited out; anything else is logged
            self._failed(exc, "taking the sweep's turn")
            return None
        self._redis.ok()
        if not mine:
            return None
        try:
            report = sweep(self.store, self.redis, self.app, self.settings)
        except Exception as exc:  # noqa: BLE001 - as above; the next turn tries again
            self._failed(exc, "sweeping")
            return None
        self._store.ok()
        self._bug = None
        record_run(self.redis, "sweep", report.model_dump())
        return report

    def _publish_catalog(self) -> None:
        if self._catalog is None:
            return
        at = time.monotonic()
        if self._published_at is not None and at - self._published_at < self.settings.sweep_interval_s:
            return
        from datus_queue.tasks.catalog import publish

        count = publish(self.redis, self._catalog)
        if self._published_at is None:
            logger.info("published %d model(s) to the fleet's catalogue", count)
        self._published_at = at

    def _failed(self, exc: BaseException, doing: str) -> None:
        import redis.exceptions

        if is_outage(exc):
            (self._redis if isinstance(exc, (redis.exceptions.RedisError, ConnectionError)) else self._store).failed(
                exc, doing)
            return
        seen = f"{type(exc).__name__}: {exc}"
        if seen != self._bug:  # a bug repeats every turn: its traceback once
            self._bug = seen
            logger.exception("sweeper: %s failed", doing)


def _where(url: str) -> str:
    """host:port/db of a Redis URL (each sentinel's), without its password."""
    from datus_queue.tasks.redis_connect import where

    return where(url)
