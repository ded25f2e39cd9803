"""Closing the SDK clients a model opens, one per event loop, before that loop goes away.

A client left open when its loop ends (aiohttp's, above all) is garbage-collected open and
complains. Every client `LLMBaseModel` creates is registered here with its model's way of
closing it, and is closed by whichever comes first:

- its model's ``aclose()`` (the worker runtime at shutdown);
- the end of ``asyncio.run`` — it closes async generators before the loop, and each loop with
  a client gets one that closes that loop's clients;
- the sync portal's exit hook (a loop that never ends);
- its model being dropped while the loop runs on (a finalizer schedules the close there);
- the end of the last tool run using it, on a loop nobody said is kept (`keep`): Datus's web UI
  drives each turn on a new loop it closes with ``loop.close()`` alone, which runs none of the
  above. Kept loops (the sync portal's, a worker's runtime) keep their clients for every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Closer", "aclose_loop_clients", "close_soon", "forget_loop_guard", "keep", "kept", "register"]

Closer = Callable[[Any], Awaitable[None]]

_open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Any, Closer]] = (
    weakref.WeakKeyDictionary())
_loop_end: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
_kept: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def keep(loop: asyncio.AbstractEventLoop) -> None:
    """``loop`` lives as long as its process (the sync portal's, a worker's runtime): the
    clients made on it serve every call, and close with it."""
    _kept.add(loop)


def kept(loop: asyncio.AbstractEventLoop) -> bool:
    return loop in _kept


async def forget_loop_guard() -> None:
    """The running loop has no registered client left: finish its end-of-loop guard now, so a
    loop closed without ``shutdown_asyncgens`` leaves no pending generator behind."""
    loop = asyncio.get_running_loop()
    if _open.get(loop):
        return
    _open.pop(loop, None)
    guard = _loop_end.pop(loop, None)
    if guard is not None:
        await guard.aclose()


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
