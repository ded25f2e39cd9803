"""Every Redis key and channel name of the job system, in one place."""

from __future__ import annotations

__all__ = [
    "DEAD_LETTER",
    "PREFIX",
    "job_cancel",
    "job_channel",
    "job_deliveries",
    "job_event_seq",
    "job_events",
    "ratelimit",
]

PREFIX = "dq"
DEAD_LETTER = f"{PREFIX}:dead"  # a list of JSON records: job id, task, reason, when


def job_events(job_id: str) -> str:
    """The job's capped, expiring Redis Stream of ActionHistory events (for replay)."""
    return f"{PREFIX}:job:{job_id}:events"


def job_event_seq(job_id: str) -> str:
    """The job's event counter: the last ``seq`` handed out (shared by every attempt of the job)."""
    return f"{PREFIX}:job:{job_id}:seq"


def job_channel(job_id: str) -> str:
    """The job's pub/sub channel (live followers)."""
    return f"{PREFIX}:job:{job_id}"


def job_cancel(job_id: str) -> str:
    """Set when a running job is asked to stop at its next step."""
    return f"{PREFIX}:job:{job_id}:cancel"


def job_deliveries(job_id: str) -> str:
    """How many times a worker started the job's message (for dead-lettering)."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def ratelimit(provider: str) -> str:
    return f"{PREFIX}:ratelimit:{provider}"
