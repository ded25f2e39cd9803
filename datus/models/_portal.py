"""Runs the async implementation for the sync twins (``generate`` and friends).

One background event loop in a daemon thread serves every sync call of the process: SDK
clients bound to that loop are reused across calls, and a sync call works even when the
calling thread already runs an event loop (a notebook, an async framework).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Awaitable
from typing import TypeVar

from datus.models import _clients

__all__ = ["run_sync"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _portal_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            _clients.keep(loop)
            thread = threading.Thread(target=loop.run_forever, name="datus-sync-portal", daemon=True)
            thread.start()
            _loop = loop
            atexit.register(_close, loop)
        return _loop


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """At exit: close the SDK clients the portal's calls opened."""
    from datus.models._clients import aclose_loop_clients

    if loop.is_running():
        with contextlib.suppress(Exception):  # exiting: nothing to report to
            asyncio.run_coroutine_threadsafe(aclose_loop_clients(), loop).result(2)


def run_sync(awaitable: Awaitable[T]) -> T:
    loop = _portal_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("a sync model method was called from inside its own async call; use the a* twin")

    async def _wrap() -> T:
        return await awaitable

    return asyncio.run_coroutine_threadsafe(_wrap(), loop).result()
