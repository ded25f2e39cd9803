"""Waiting out an outage of Redis or the job store: one log line when it starts, one when it ends.

A long-running process (`dq worker`'s sweeps and lease renewals, `dq beat`, `dq metrics`) that
loses Redis or the job store keeps trying on its own schedule. Logging every failed try — with
a traceback — buries the one fact an operator needs under thousands of lines; `Outage` logs the
first failure of a spell as one readable line ("Redis is unreachable …; waiting for it") and the
first success after it ("Redis is back after 12s"), and nothing in between.

`is_outage` says which errors are such an outage (a dependency that cannot be reached or does not
answer), as opposed to a bug, which is logged with its traceback wherever it happens.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["Outage", "is_outage"]


def is_outage(exc: BaseException) -> bool:
    """Redis or the job store unreachable, not answering, or still loading — not a bug."""
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)):
        return True  # BusyLoadingError (Redis reading its AOF at start) is a ConnectionError
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)):
        return True  # a refused or dropped connection, SQLite's "unable to open" or "locked", a full pool
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # the socket's own errors
        return True
    cause = exc.__cause__  # e.g. the store's StoreError("cannot open the job store …") from OperationalError
    return cause is not None and cause is not exc and is_outage(cause)


class Outage:
    """The state of one dependency as seen by one process: up, or down since when."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, doing: str = "") -> None:
        """A try failed with ``exc``: logged if it is the first failure of a spell."""
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        cause = " ".join(str(exc).split()) or type(exc).__name__
        self.logger.warning("%s is unreachable%s (%s: %s); waiting for it", self.what,
                            f" ({doing})" if doing else "", type(exc).__name__, cause[:300])

    def ok(self) -> None:
        """A try succeeded: the end of a spell is logged."""
        if self._since is None:  # the common case: no lock taken
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            self.logger.warning("%s is back after %.0fs", self.what, time.monotonic() - since)
