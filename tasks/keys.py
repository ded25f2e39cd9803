"""Every Redis key and channel name of the job system, in one place."""

from __future__ import annotations

__all__ = [
    "BEAT_PREFIX",
    "PREFIX",
    "batch_databases",
    "beat_entry",
    "beat_lock",
    "job_caller",
    "job_cancel",
    "job_channel",
    "job_event_seq",
    "job_events",
    "job_keys",
    "maintenance",
    "model_catalog",
    "ratelimit_input_log",
    "ratelimit_slots",
    "ratelimit_state",
]

PREFIX = "dq"
# redbeat's keys (dq beat): its entries are BEAT_PREFIX + name, its lock and schedule index
# BEAT_PREFIX + ":lock" / ":schedule" (redbeat joins them with a second colon)
BEAT_PREFIX = f"{PREFIX}:beat:"


def batch_databases(batch_id: str) -> str:
    """Fingerprints of the database URLs ``dq batch --db`` registered for its batch's tool runs
    (tasks/databases.py); a set, expiring."""
    return f"{PREFIX}:batch:{batch_id}:databases"


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


def job_caller(job_id: str) -> str:
    """A hash of the job's calls of the caller's own tools (tasks/caller_tools.py): per call id,
    when the worker first asked (``asked:ID``), whether a request step carried it (``sent:ID``)
    and the caller's result, stored once (``result:ID``); and the caller's last heartbeat
    (``beat``; times on Redis's clock). Expiring."""
    return f"{PREFIX}:job:{job_id}:caller"


def job_keys(job_id: str) -> list[str]:
    """Every key of one job (a replay starts it afresh)."""
    return [job_events(job_id), job_event_seq(job_id), job_cancel(job_id), job_caller(job_id)]


def maintenance(task: str) -> str:
    """A hash of the maintenance task's runs: how many, the last one's time and report."""
    return f"{PREFIX}:maintenance:{task}"


def model_catalog() -> str:
    """A hash of the models the fleet's workers serve (tasks/catalog.py): agent.yml name -> what a
    caller may know of it (type, model id...; never a key). Written by each worker at start."""
    return f"{PREFIX}:models"


def beat_entry(name: str) -> str:
    """A periodic entry of dq beat, as redbeat keeps it (definition and last run)."""
    return f"{BEAT_PREFIX}{name}"


def beat_lock() -> str:
    """The lock the active dq beat holds; a second dq beat waits for it (hot standby)."""
    return f"{BEAT_PREFIX}:lock"


def _ratelimit_tag(provider: str, key_fingerprint: str, model: str) -> str:
    # one budget per (provider, API key, model); the braces are a Redis Cluster hash tag, so a
    # limiter's keys share a slot and one Lua call may touch them all
    return f"{PREFIX}:rl:{{{provider}:{key_fingerprint}:{model}}}"


def ratelimit_state(provider: str, key_fingerprint: str, model: str) -> str:
    """A hash: the budget buckets' theoretical arrival times, the waiting lines, the cooldown
    and the header-driven pace of one (provider, key fingerprint, model). Never the key."""
    return _ratelimit_tag(provider, key_fingerprint, model)


def ratelimit_slots(provider: str, key_fingerprint: str, model: str) -> str:
    """A sorted set: the concurrency slots held, scored by when their lease runs out."""
    return f"{_ratelimit_tag(provider, key_fingerprint, model)}:slots"


def ratelimit_input_log(provider: str, key_fingerprint: str, model: str) -> str:
    """A sorted set: the input tokens of each request started in the last window, scored by
    its start (the limiter's log for mixed request sizes, ``tasks.ratelimit_lua``)."""
    return f"{_ratelimit_tag(provider, key_fingerprint, model)}:log:in"
