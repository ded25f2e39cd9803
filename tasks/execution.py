"""How a task runs its coroutine.

By default ``asyncio.run`` (a task called in-process, a test). The worker runtime installs
its long-lived per-process event loop here at process start, so every task of the process
shares one loop and one set of SDK clients, and hundreds of calls stay in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["install_runner", "run_coroutine", "uninstall_runner"]

T = TypeVar("T")
_runner: Callable[[Coroutine[Any, Any, Any]], Any] | None = None


def install_runner(runner: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    global _runner
    _runner = runner


def uninstall_runner() -> None:
    global _runner
    _runner = None


def run_coroutine(coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    if _runner is not None:
        return _runner(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]
