"""The sweeper: the job store is the source of truth, Redis only the transport.

Every ``DQ_SWEEP_INTERVAL_S`` (`dq beat` sends ``dq.sweep``) it asks the store for the open
jobs that are overdue by ``DQ_QUEUED_LEASE_S`` (`tasks.store.sweeps`: queued or retrying that
long past due, or running with a lease that has passed), drops those that still have a live
message in Redis (`tasks.maintenance.live_messages`), and sends each of the others again with
the same task id — after claiming it in one conditional update, so two sweeps at once never
both send it. A running job whose worker is gone is queued again; the same attempt runs anew.

Re-sending is always safe: a job that is already final, or running under another delivery's
live lease, makes no model call (`tasks.store.writes`). Each re-send is logged and counted in
the row (``resends``); a job already re-sent ``DQ_DEAD_LETTER_THRESHOLD`` times goes to the dead
letters instead of looping.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus_queue.tasks.client import publish_job
from datus_queue.tasks.events import EventPublisher
from datus_queue.tasks.maintenance.live_messages import live_job_ids
from datus_queue.tasks.schemas import JobError, JobRequest, JobStatus
from datus_queue.tasks.settings import Settings

__all__ = ["SweepReport", "sweep"]

logger = logging.getLogger("datus_queue.tasks.maintenance.sweeper")
LIMIT = 1000  # overdue jobs looked at per sweep; the rest wait for the next one
_WHY = {JobStatus.QUEUED: "its message is not in Redis",
        JobStatus.RETRYING: "its retry message is not in Redis",
        JobStatus.RUNNING: "its worker stopped renewing the lease"}


class SweepReport(BaseModel):
    overdue: int = 0  # open jobs past their lease
    live: int = 0  # of those, with a message still in Redis
    resent: list[str] = []
    dead: list[str] = []


def sweep(store: Any, redis: Any, app: Any, settings: Settings, limit: int = LIMIT) -> SweepReport:
    lease_s = settings.queued_lease_s
    overdue = store.overdue_jobs(lease_s, limit)
    report = SweepReport(overdue=len(overdue))
    if not overdue:
        return report
    live = live_job_ids(redis, [job.job_id for job in overdue], {job.provider for job in overdue},
                        datetime.now(UTC), lease_s)
    report.live = len(live)
    lost = {job.job_id: job for job in overdue if job.job_id not in live}
    threshold = settings.dead_letter_threshold
    report.dead = _dead_letter(store, redis, settings, [job for job in lost.values() if job.resends >= threshold])
    claimed = store.claim_resends([job_id for job_id, job in lost.items() if job.resends < threshold], lease_s)
    if claimed:
        with app.producer_or_acquire() as producer:
            for resend in claimed:
                was = lost[resend.job_id]
                try:
                    publish_job(app, producer, resend.job_id, JobRequest.model_validate(resend.request),
                                resend.provider, retries=resend.retries)
                except Exception as exc:  # noqa: BLE001 - counted; the next sweep tries again
                    logger.error("sweeper: could not send job %s again: %s", resend.job_id, exc)
                    continue
                report.resent.append(resend.job_id)
                logger.warning("sweeper: job %s was %s and %s: sent again (re-send %d of %d)", resend.job_id,
                               was.status.value, _WHY[was.status], resend.resends, threshold)
    return report


def _dead_letter(store: Any, redis: Any, settings: Settings, jobs: list[Any]) -> list[str]:
    if not jobs:
        return []
    reason = f"re-sent {settings.dead_letter_threshold} times by the sweeper without a result"
    error = JobError(code="dead_letter", type="DeadLetter", message=reason)
    dead = store.dead_overdue([job.job_id for job in jobs], settings.queued_lease_s, error)
    publisher = EventPublisher(redis, settings.event_ttl_s, settings.event_maxlen)
    for job_id in dead:
        store.record_dead_letter(job_id, reason, job_id=job_id)
        publisher.publish(job_id, ActionHistory.create_action(
            ActionRole.WORKFLOW, "error", f"DeadLetter: {reason}", None, error.model_dump(), ActionStatus.FAILED),
            terminal=True, status=JobStatus.DEAD)
        logger.warning("sweeper: job %s dead-lettered: %s", job_id, reason)
    return dead
