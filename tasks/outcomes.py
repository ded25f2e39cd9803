"""How one delivery of a job message ended — a closed set of types — and which errors are the
infrastructure's.

`tasks.jobs.run_message` (and `execute` and `_run` below it) return exactly one of:

- `Finished(status, error_code)`: this delivery made the job final (succeeded, failed, dead or
  cancelled); the message is acknowledged.
- `Retry(countdown, error, infra_retries)`: the job runs again as its next run — the same
  message with ``retries + 1`` after ``countdown`` — published before this delivery is
  acknowledged. ``infra_retries`` counts the infrastructure retries in a row (0: a model's
  retry or a limiter's wait).
- `ComeBack(countdown)`: another delivery of the same run holds a live lease. The same
  message (same ``retries``: a newer run could start at once, next to the running one)
  comes back after ``countdown``, when that lease can have lapsed, and this delivery is
  acknowledged: a duplicate is never dropped while its job is unfinished — when it comes back
  it finds the job final, or takes it over from a worker that died.
- `Dropped(reason)`: this delivery has nothing to do: the job is final already (`FINAL`), a newer
  run or another delivery has it (`SUPERSEDED`), or the message could not be a job's and
  was dead-lettered (`REJECTED`).

The worker's pool (`workers.pool`), `run_task` (Celery's own pools), the metrics and the traces
match on the type. `is_infrastructure` decides which exceptions are worth an infrastructure
retry: Redis, the broker or the job store failing, never a bug.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from enum import Enum

from datus_queue.tasks.schemas import FINAL_STATUSES, JobError, JobStatus

__all__ = ["INFRA_HEADER", "ComeBack", "DropReason", "Dropped", "Finished", "Outcome", "Retry", "is_infrastructure"]

INFRA_HEADER = "dq_infra_retries"  # carried by a retry message: infrastructure retries so far, in a row


@dataclass(frozen=True)
class Finished:
    status: JobStatus  # one of FINAL_STATUSES
    error_code: str | None = None  # failed or dead: the JobError's code

    def __post_init__(self) -> None:
        if self.status not in FINAL_STATUSES:
            raise ValueError(f"Finished takes a final status, not {self.status.value!r}")


@dataclass(frozen=True)
class Retry:
    countdown: float
    error: JobError
    infra_retries: int = 0

    def headers(self) -> dict[str, int]:
        """What the retry message carries besides the trace context."""
        return {INFRA_HEADER: self.infra_retries}


@dataclass(frozen=True)
class ComeBack:
    countdown: float


class DropReason(str, Enum):
    FINAL = "final"  # the job is final (done, cancelled, failed) or has no row
    SUPERSEDED = "superseded"  # a newer run, or another delivery of this one, has the job
    REJECTED = "rejected"  # not a job's message: dead-lettered


@dataclass(frozen=True)
class Dropped:
    reason: DropReason


Outcome = Finished | Retry | ComeBack | Dropped

# OSError numbers of a network that failed (not of a file, a permission or an argument)
_NETWORK_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "EHOSTDOWN", "ENETUNREACH",
    "ENETDOWN", "ENETRESET", "ENOTCONN", "ESHUTDOWN", "EADDRNOTAVAIL") if hasattr(errno, name))


def is_infrastructure(exc: BaseException) -> bool:
    """Redis, the broker or the job store failing — worth a retry later — as opposed to a bug,
    which fails its job at once. An error raised ``from`` one of these counts as one (a wrapper
    names what failed; its cause says why); so does a group whose every member is one. A model
    error never does, whatever caused it: the model's retry policy decides about those."""
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    from datus.models.errors import ModelError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModelError):
            return False
        if isinstance(current, BaseExceptionGroup):
            return all(is_infrastructure(member) for member in current.exceptions)
        if isinstance(current, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                redis.exceptions.ReadOnlyError, redis.exceptions.ClusterDownError,
                                redis.exceptions.TryAgainError, redis.exceptions.MasterDownError)):
            return True  # ConnectionError covers BusyLoadingError (a Redis still loading its data)
        if isinstance(current, kombu.exceptions.OperationalError):  # the broker's connection
            return True
        if isinstance(current, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                                sqlalchemy.exc.TimeoutError, sqlalchemy.exc.DisconnectionError)):
            return True  # OperationalError: lost connection, locked database, statement timeout
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
            return True  # builtins: refused, reset, aborted, broken pipe; socket and asyncio timeouts
        if isinstance(current, OSError) and current.errno in _NETWORK_ERRNOS:
            return True
        current = current.__cause__
    return False
