"""The leases of a process's running jobs.

Starting a job sets its ``lease_until`` (`tasks.store.writes.running`); while it runs, one
renewer per event loop renews the leases of every job the loop holds, every third of the lease:
one write each, submitted in the same loop turn, so the group commit applies them as one
``UPDATE … WHERE job_id IN (…)`` — a statement per process per interval, not one per job. A
worker that dies stops renewing; once its jobs' leases pass, the sweeper sends them again and a
redelivery may take them over.

A delivery that gives its job back unfinished at shutdown (the message is requeued) releases
the lease, so the requeued message can start the job at once instead of waiting it out.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("datus_queue.tasks.leases")


class LeaseKeeper:
    def __init__(self, store: Any, lease_s: float) -> None:
        self.store, self.lease_s = store, lease_s
        self.every_s = lease_s / 3
        self._held: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Counter[str]] = weakref.WeakKeyDictionary()
        self._renewers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary())

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
            if failed:
                logger.warning("renewing %d job lease(s) failed: %s", len(failed), failed[0])
