"""Group commit: the store writes asked for on an event loop are made by a writer thread, many
in one transaction, so the loop never waits for the database.

A worker keeps hundreds of jobs in flight; each writes its row at least twice (start and
finish). Made one by one those writes cost more CPU than the model call they record: a
transaction each, SQLAlchemy's per-statement work, a thread hand-off there and back for every
write. Here a write is queued and awaited. At the end of the loop's turn everything the turn
queued is handed to the store's writer thread in one piece (one lock and one wake-up per turn,
not per write); the thread applies what it has been handed in one transaction with one
statement per kind of write (`tasks.store.writes`), then wakes each waiting loop once. While a
transaction runs, the turns that follow keep handing over theirs: under load the next
transaction takes all of them, so groups grow by themselves; a lone write goes at once (there
is no timer to wait for).

Why a thread and not the loop: SQLite makes a writer wait up to its busy timeout (30 s) for
the write lock, and a Postgres row lock has no limit at all. While a transaction waited on the
loop's own thread — a ``dq batch`` load, a sweep or another process holding the lock — every
job, every pub/sub delivery, the MCP pool's health checks and the limiter's slot renewals in
the process stopped with it. Now only the jobs whose writes wait, wait. Why not SQLAlchemy's
asyncio extension: on SQLite its driver (aiosqlite) runs each connection in a thread of its own
anyway and hands every statement, fetch and commit across separately, several hand-offs per
transaction against one here; and the store's writes stay one code path (`writes.apply` on a
plain connection) for the worker, the CLI and the sweeper. ``ops/bench/group_commit.py``
measures the CPU per job of both ways of committing and how long the loop stalls.

The caller's contract: ``await`` returns only after the transaction holding the write has
committed, so "the result is stored before the message is acknowledged" holds. A waiter that
is cancelled does not cancel its write. If a group's transaction fails, each of its writes is
tried alone, so a write that cannot be made fails only its own caller — unless the database
itself is unavailable (the lock wait ran out, the connection is gone): then every write of the
group gets that error at once, instead of each waiting its own busy timeout.

One writer thread per store and process, started with the first write and idle (blocked on a
condition, no CPU) when there is nothing to write; after a fork the child starts its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError

__all__ = ["GroupCommit", "database_unavailable"]

logger = logging.getLogger("datus_queue.tasks.store.group_commit")
Op = TypeVar("Op")
# transact(ops) -> one result per op, in order, all in one committed transaction; raises if it fails
Transact = Callable[[Sequence[Op]], list[Any]]
# one queued write: the op, its waiter's future and that future's loop
_Queued = tuple[Any, "asyncio.Future[Any]", asyncio.AbstractEventLoop]

MAX_GROUP = 1000  # writes per transaction: bounds its statements' parameter lists and its lock time


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be written at all (SQLite's lock wait ran
    out; the connection was lost), not that one write was wrong: trying each write of the group
    alone would only wait again."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    return getattr(exc.orig, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class GroupCommit(Generic[Op]):
    """``await submit(op)`` from any event loop; ``transact`` runs in this object's writer thread."""

    def __init__(self, transact: Transact[Op], *, unavailable: Callable[[BaseException], bool] = database_unavailable,
                 name: str = "dq-store-writer") -> None:
        self._transact = transact
        self._unavailable = unavailable
        self._name = name
        self._start_state()

    def _start_state(self) -> None:
        """The per-process state (again in a forked child: the parent's thread, lock holders and
        waiters do not exist there)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: list[_Queued] = []  # handed over, not yet taken by the writer (under _lock)
        self._busy = False  # the writer holds a group it has not settled yet (under _lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        # each loop's writes of its current turn; touched by that loop's thread, the dict under _lock
        self._turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Queued]] = weakref.WeakKeyDictionary()

    async def submit(self, op: Op) -> Any:
        """Queue ``op`` and wait until the transaction holding it has committed: its result, or
        the exception it raised."""
        if self._pid != os.getpid():
            self._start_state()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        turn = self._turns.get(loop)
        if turn is None:  # the first write of this turn: hand the turn over once its callbacks have run
            with self._lock:
                turn = self._turns[loop] = []
            loop.call_soon(self._hand_over, loop)
        turn.append((op, future, loop))
        return await future

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Let the writes handed over so far commit, then stop the writer thread (a later write
        starts a new one)."""
        with self._lock:
            thread = self._thread
            self._closing = True
            self._wake.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # -- the loop's side -----------------------------------------------------------------------

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            turn = self._turns.pop(loop, None)
            if not turn:
                return
            self._queue.extend(turn)
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif not self._busy:
                self._wake.notify()  # an idle writer; a busy one looks at the queue when it is done

    @staticmethod
    def _settle(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
        for future, result in settled:
            if future.done():  # the waiter was cancelled; the write itself stands
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                self._busy = False
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:  # closing, and everything handed over is committed
                    self._thread = None
                    return
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                self._busy = True
            results = self._commit([op for op, _, _ in group])
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
            for (_, future, loop), result in zip(group, results):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, settled in by_loop.items():  # one wake-up per loop
                try:
                    loop.call_soon_threadsafe(self._settle, settled)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    pass

    def _commit(self, ops: list[Op]) -> list[Any]:
        try:
            return self._transact(ops)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear how its write ended
            if len(ops) == 1 or self._unavailable(exc):
                logger.warning("a group of %d store writes failed: %s: %s", len(ops), type(exc).__name__, exc)
                return [exc] * len(ops)
            logger.warning("a group of %d store writes failed (%s: %s); making them one by one",
                           len(ops), type(exc).__name__, exc)
        results: list[Any] = []
        shared: BaseException | None = None  # the database went away meanwhile: the rest fail alike
        for op in ops:
            if shared is not None:
                results.append(shared)
                continue
            try:
                results.append(self._transact([op])[0])
            except Exception as exc:  # noqa: BLE001 - handed to that write's caller
                results.append(exc)
                shared = exc if self._unavailable(exc) else None
        return results
