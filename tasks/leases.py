"""The leases of a process's running jobs: the heartbeat that tells the fleet a worker is alive.

Starting a job sets its ``lease_until`` to ``DQ_LEASE_S`` (15 s) from now (`tasks.store.writes.running`).
While it runs, one renewer per event loop renews the leases of every job the loop holds, every
third of the lease: one write each, submitted in the same loop turn, so the group commit applies
them as one ``UPDATE … WHERE job_id IN (…)`` — a statement per process per interval, not one
per job. A live worker therefore keeps a lease at least two renewals ahead of its end.

A worker that dies stops renewing. Once its jobs' leases pass, the next sweep — every worker runs
one every ``DQ_SWEEP_INTERVAL_S``, `tasks.maintenance.sweep_loop` — sends them again, and the
delivery on a live worker takes them over: at most ``DQ_LEASE_S + 1.25 × DQ_SWEEP_INTERVAL_S``
(about 28 s) after the death, without waiting for the broker's visibility timeout. A worker that
merely stalls past its lease (a store that blocks writes for two thirds of a lease) is taken over
the same way; the writes' guards keep that safe (one finish wins, a tool run's steps are
checkpointed once).

A delivery that gives its job back unfinished at shutdown (the message is requeued) releases
the lease, so the requeued message can start the job at once instead of waiting it out.

The store failing does not stop the renewer: it logs the outage once (`Outage`) and renews again
on its next turn; a lease renewed late is still renewed if the store is back within the lease.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from datus_queue.tasks.maintenance.outages import Outage, is_outage

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("datus_queue.tasks.leases")


class LeaseKeeper:
    def __init__(self, store: Any, lease_s: float) -> None:
        self.store, self.lease_s = store, lease_s
        self.every_s = lease_s / 3
        self._held: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Counter[str]] = weakref.WeakKeyDictionary()
        self._renewers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary())
        self._outage = Outage(logger, "the job store")

    @asynccontextmanager
    async def hold(self, job_id: str) -> AsyncIterator[None]:
        """Keep ``job_id``'s lease renewed while the block runs (it was set when the job started)."""
        loop = asyncio.get_running_loop()
        held = self._held.setdefault(loop, Counter())
        held[job_id] += 1
        renewer = self._renewers.get(loop)
        if renewer is None or renewer.done():
            self._renewers[loop] = loop.create_task(self._renew(held), name="dq-lease-renewer")
        try:
            yield
        except asyncio.CancelledError:
            try:  # queued before the first suspension: the write stands even if this wait is cancelled again
                await self.store.arelease(job_id)
            except Exception as exc:  # noqa: BLE001 - the lease then runs out by itself
                logger.warning("job %s: could not release its lease (%s); it runs out in %.0fs", job_id, exc,
                               self.lease_s)
            raise
        finally:
            held[job_id] -= 1
            if held[job_id] <= 0:
                del held[job_id]

    async def _renew(self, held: Counter[str]) -> None:
        while held:
            await asyncio.sleep(self.every_s)
            ids = list(held)
            if not ids:
                break
            results = await asyncio.gather(*(self.store.arenew(job_id, self.lease_s) for job_id in ids),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if not failed:
                self._outage.ok()
            elif all(is_outage(exc) for exc in failed):
                self._outage.failed(failed[0], f"renewing {len(failed)} job lease(s)")
            else:  # not the store being away: say what it was, every time
                logger.error("renewing %d job lease(s) failed: %s: %s", len(failed), type(failed[0]).__name__,
                             failed[0])
