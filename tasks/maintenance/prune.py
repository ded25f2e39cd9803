"""Expiry: what is older than its retention goes, in bounded chunks.

- Job rows that finished more than ``DQ_JOB_RETENTION_DAYS`` ago, their dead-letter records
  and scheduled-run records: deleted ``chunk`` rows per transaction, oldest first, so no lock
  is held for long (the workers' writes go in between). Batches and their items stay: they hold
  the scored results, and ``dq status BATCH_ID`` reads them.
- A job's Redis keys (its event stream, event counter, delivery counter, cancel flag) expire by
  themselves: every write gives them ``DQ_EVENT_TTL_S``. A key that has no expiry (written by
  hand, or by an older release) gets it here; the scan goes ``chunk`` keys at a time.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from datus_queue.tasks import keys
from datus_queue.tasks.settings import Settings

__all__ = ["PruneReport", "expire_stray_keys", "prune"]

logger = logging.getLogger("datus_queue.tasks.maintenance.prune")
CHUNK = 1000


class PruneReport(BaseModel):
    jobs: int = 0
    dead_letters: int = 0
    schedule_runs: int = 0
    keys_given_ttl: int = 0


def prune(store: Any, redis: Any, settings: Settings, chunk: int = CHUNK, now: datetime | None = None) -> PruneReport:
    before = (now or datetime.now(UTC)) - timedelta(days=settings.job_retention_days)
    report = PruneReport(jobs=store.prune_jobs(before, chunk), dead_letters=store.purge_dead_letters(before, chunk),
                         schedule_runs=store.prune_schedule_runs(before, chunk),
                         keys_given_ttl=expire_stray_keys(redis, settings.event_ttl_s, chunk))
    if any(report.model_dump().values()):
        logger.info("pruned %s (older than %s)", report.model_dump(), before.isoformat(timespec="seconds"))
    return report


def expire_stray_keys(redis: Any, ttl_s: int, chunk: int = CHUNK) -> int:
    """Give every job key without an expiry ``ttl_s``; how many needed it."""
    fixed = 0
    cursor = 0
    while True:
        cursor, names = redis.scan(cursor, match=f"{keys.PREFIX}:job:*", count=chunk)
        if names:
            with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.ttl(name)
                ttls = pipe.execute()
            strays = [name for name, ttl in zip(names, ttls) if ttl == -1]
            if strays:
                with redis.pipeline(transaction=False) as pipe:
                    for name in strays:
                        pipe.expire(name, ttl_s)
                    fixed += sum(bool(done) for done in pipe.execute())
        if int(cursor) == 0:
            return fixed
