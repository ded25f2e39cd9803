"""The one retry policy: exponential backoff with full jitter, never shorter than the
provider's Retry-After, bounded in attempts and in total wait.

It retries single requests only (one HTTP call to a provider), never a whole tool run, so a
tool that already ran is never run again. SDK clients run with ``max_retries=0``: retries
live here (in-process) or in the job system, which asks this policy for its countdown, so
they never multiply.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from datus.models.errors import ModelError

__all__ = ["RetryPolicy"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_total_wait_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.max_total_wait_s < 0:
            raise ValueError("retry delays must not be negative")

    @classmethod
    def from_config(cls, config: Any) -> "RetryPolicy":
        """The policy a model config asks for (``max_retries`` retries after the first try)."""
        return cls(
            max_attempts=config.max_retries + 1,
            base_delay_s=config.retry_base_delay_s,
            max_delay_s=config.retry_max_delay_s,
            max_total_wait_s=config.retry_max_wait_s,
        )

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** max(0, attempt - 1)))
        return rand() * ceiling

    def delay_for(
        self,
        error: BaseException,
        attempt: int,
        waited_s: float = 0.0,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        Gives up on permanent errors, after ``max_attempts`` and when the wait would take the
        total past ``max_total_wait_s``."""
        if not isinstance(error, ModelError) or not error.retryable:
            return None
        if attempt >= self.max_attempts:
            return None
        delay = max(error.retry_after or 0.0, self.backoff(attempt, rand))
        if waited_s + delay > self.max_total_wait_s:
            return None
        return delay

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        describe: str = "model request",
    ) -> tuple[T, int]:
        """Await ``call()`` until it succeeds or the policy gives up; returns
        ``(result, attempts)``. The last error is raised with ``details["attempts"]`` set."""
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                return await call(), attempt
            except ModelError as exc:
                delay = self.delay_for(exc, attempt, waited)
                if delay is None:
                    exc.details["attempts"] = attempt
                    raise
                logger.info(
                    "%s failed (%s, attempt %d/%d); retrying in %.2fs",
                    describe, type(exc).__name__, attempt, self.max_attempts, delay,
                )
                waited += delay
                await sleep(delay)
