"""The sweeper: the job store is the source of truth, Redis only the transport.

A sweep (every worker runs one in turn, every ``DQ_SWEEP_INTERVAL_S``: `tasks.maintenance.sweep_loop`)
asks the store for the open jobs that are overdue (`tasks.store.sweeps`): running with a lease that
has passed (``DQ_LEASE_S``: its worker stopped renewing it), or queued or retrying
``DQ_RESEND_AFTER_S`` past due. It drops those that still have a live message in Redis
(`tasks.maintenance.live_messages`), and sends each of the others again with the same task id —
after claiming it in one conditional update, so two sweeps at once never both send it. A running
job whose worker is gone is queued again; the same run starts anew (a tool run resumes from its
checkpoints). A re-sent job's abandoned message (in kombu's unacked hash, where a dead worker left
it) is deleted, so the visibility timeout does not hand it out again an hour later.

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
from datus_queue.tasks.maintenance.live_messages import drop_abandoned, scan_messages
from datus_queue.tasks.schemas import JobError, JobRequest, JobStatus
from datus_queue.tasks.settings import Settings

__all__ = ["SweepReport", "sweep"]

logger = logging.getLogger("datus_queue.tasks.maintenance.sweeper")
LIMIT = 1000  # overdue jobs looked at per sweep; the rest wait for the next one
_WHY = {JobStatus.QUEUED: "its message is in no queue and in no live worker's hands",
        JobStatus.RETRYING: "its retry is past due and no live worker holds its message",
        JobStatus.RUNNING: "its worker stopped renewing the lease"}
_GIVEN_BACK = "its worker gave the lease back and no live worker holds its message"  # a stop, or a lost connection


class SweepReport(BaseModel):
    overdue: int = 0  # open jobs past their lease or past due
    live: int = 0  # of those, with a message still in Redis
    resent: list[str] = []
    dead: list[str] = []
    dropped: int = 0  # abandoned messages deleted from kombu's unacked hash (their jobs were sent again)


def sweep(store: Any, redis: Any, app: Any, settings: Settings, limit: int = LIMIT) -> SweepReport:
    grace_s = settings.resend_after_s
    overdue = store.overdue_jobs(grace_s, limit)
    report = SweepReport(overdue=len(overdue))
    if not overdue:
        return report
    scan = scan_messages(redis, [job.job_id for job in overdue], {job.provider for job in overdue},
                         datetime.now(UTC), grace_s)
    report.live = len(scan.live)
    lost = {job.job_id: job for job in overdue if job.job_id not in scan.live}
    threshold = settings.dead_letter_threshold
    report.dead = _dead_letter(store, redis, settings, [job for job in lost.values() if job.resends >= threshold])
    claimed = store.claim_resends([job_id for job_id, job in lost.items() if job.resends < threshold], grace_s)
    unsent: list[tuple[str, Exception]] = []
    if claimed:
        with app.producer_or_acquire() as producer:
            for resend in claimed:
                was = lost[resend.job_id]
                try:
                    publish_job(app, producer, resend.job_id, JobRequest.model_validate(resend.request),
                                resend.provider, retries=resend.retries)
                except Exception as exc:  # noqa: BLE001 - the claim made it overdue again later: a later sweep sends it
                    unsent.append((resend.job_id, exc))
                    continue
                report.resent.append(resend.job_id)
                why = _GIVEN_BACK if was.status is JobStatus.RUNNING and was.lease_until is None else _WHY[was.status]
                logger.warning("sweeper: job %s was %s and %s: sent again (re-send %d of %d)", resend.job_id,
                               was.status.value, why, resend.resends, threshold)
    if unsent:  # one line for all of them: when the broker is away, every send fails alike
        job_id, exc = unsent[0]
        logger.error("sweeper: could not send %d job(s) again (%s, …): %s: %s; a later sweep sends them",
                     len(unsent), job_id, type(exc).__name__, exc)
    gone = [tag for job_id in [*report.resent, *report.dead] for tag in scan.abandoned.get(job_id, [])]
    drop_abandoned(redis, gone)
    report.dropped = len(gone)
    return report


def _dead_letter(store: Any, redis: Any, settings: Settings, jobs: list[Any]) -> list[str]:
    if not jobs:
        return []
    reason = f"re-sent {settings.dead_letter_threshold} times by the sweeper without a result"
    error = JobError(code="dead_letter", type="DeadLetter", message=reason)
    dead = store.dead_overdue([job.job_id for job in jobs], settings.resend_after_s, error)
    publisher = EventPublisher(redis, settings.event_ttl_s, settings.event_maxlen)
    for job_id in dead:
        store.record_dead_letter(job_id, reason, job_id=job_id)
        publisher.publish(job_id, ActionHistory.create_action(
            ActionRole.WORKFLOW, "error", f"DeadLetter: {reason}", None, error.model_dump(), ActionStatus.FAILED),
            terminal=True, status=JobStatus.DEAD)
        logger.warning("sweeper: job %s dead-lettered: %s", job_id, reason)
    return dead
