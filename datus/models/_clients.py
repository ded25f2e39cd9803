"""Closing the SDK clients a model opens, one per event loop, before that loop goes away.

A client left open when its loop ends (aiohttp's, above all) is garbage-collected open and
complains. Every client `LLMBaseModel` creates is registered here with its model's way of
closing it, and is closed by whichever comes first:

- its model's ``aclose()`` (the worker runtime at shutdown);
- the end of ``asyncio.run`` — it closes async generators before the loop, and each loop with
  a client gets one that closes that loop's clients;
- the sync portal's exit hook (a loop that never ends);
- its model being dropped while the loop runs on (a finalizer schedules the close there).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Closer", "aclose_loop_clients", "close_soon", "register"]

Closer = Callable[[Any], Awaitable[None]]

_open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Any, Closer]] = (
    weakref.WeakKeyDictionary())
_loop_end: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def register(client: Any, closer: Closer) -> None:
    """``client`` was made on the running loop; ``closer`` closes it."""
    loop = asyncio.get_running_loop()
    _open.setdefault(loop, weakref.WeakKeyDictionary())[client] = closer
    if loop not in _loop_end:
        guard = _loop_end[loop] = _close_at_loop_end()
        loop.create_task(guard.__anext__())  # started: asyncio.run will close it


async def close(client: Any, closer: Closer) -> None:
    """Close ``client`` now (on its loop) and forget it."""
    with contextlib.suppress(TypeError):  # a client that cannot be weakly referenced was never registered
        _open.get(asyncio.get_running_loop(), {}).pop(client, None)
    await closer(client)


async def aclose_loop_clients() -> None:
    """Close every registered client of the running loop."""
    for client, closer in list(_open.pop(asyncio.get_running_loop(), {}).items()):
        await closer(client)


def close_soon(clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any], closer: Closer) -> None:
    """From any thread: close ``clients`` (loop → client) on their loops that still run."""
    for loop, client in list(clients.items()):
        if client is None or loop.is_closed() or not loop.is_running():  # None: a model with no SDK client
            continue
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(loop.create_task, close(client, closer))


async def _close_at_loop_end() -> Any:
    try:
        yield
    finally:
        await aclose_loop_clients()
