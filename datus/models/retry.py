"""The one retry policy: exponential backoff with full jitter, never shorter than the
provider's Retry-After, bounded in attempts and in total wait.

With ``rate_limit_wait_s`` set (the job system sets it), rate-limit and overload answers
(429, 529/overloaded) are not failures of the request but the provider asking for time: they
do not count against ``max_attempts`` and are retried until their waits together pass
``rate_limit_wait_s``. Other retryable errors keep the attempt budget.

It retries single requests only (one HTTP call to a provider), never a whole tool run, so a
tool that already ran is never run again. SDK clients run with ``max_retries=0``: retries
live here (in-process) or in the job system, which asks this policy for its countdown, so
they never multiply.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from datus.models.errors import ModelError, OverloadedError, RateLimitError

__all__ = ["Retries", "RetryPolicy", "is_rate_limited"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 7
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_total_wait_s: float = 120.0
    rate_limit_wait_s: float | None = None  # None: rate limits count as attempts like any error

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.max_total_wait_s < 0:
            raise ValueError("retry delays must not be negative")
        if self.rate_limit_wait_s is not None and self.rate_limit_wait_s < 0:
            raise ValueError("rate_limit_wait_s must not be negative")

    @classmethod
    def from_config(cls, config: Any) -> RetryPolicy:
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

    def rate_limit_delay(self, error: ModelError, times: int, waited_s: float = 0.0,
                         rand: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait after the ``times``-th rate-limit answer, or None once the waits
        would pass ``rate_limit_wait_s`` (only meaningful when that is set)."""
        delay = max(error.retry_after or 0.0, self.backoff(times, rand))
        if self.rate_limit_wait_s is None or waited_s + delay > self.rate_limit_wait_s:
            return None
        return delay

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        wait: Callable[[float, ModelError], Awaitable[object]] | None = None,
        describe: str = "model request",
    ) -> tuple[T, int]:
        """Await ``call()`` until it succeeds or the policy gives up; returns
        ``(result, attempts)``. The last error is raised with ``details["attempts"]`` set.
        ``wait(delay, error)``, when given, waits between attempts instead of ``sleep``."""
        retries = Retries(self)
        while True:
            retries.attempts += 1
            try:
                return await call(), retries.attempts
            except ModelError as exc:
                delay = retries.delay(exc)
                if delay is None:
                    raise
                logger.info(
                    "%s failed (%s, attempt %d/%d); retrying in %.2fs",
                    describe, type(exc).__name__, retries.attempts, self.max_attempts, delay,
                )
                await (wait(delay, exc) if wait is not None else sleep(delay))


def is_rate_limited(error: BaseException) -> bool:
    """A 429 (not quota) or an overloaded answer: the provider asks for time."""
    return isinstance(error, (RateLimitError, OverloadedError))


class Retries:
    """The retry state of one request: how many attempts were made, how long was waited,
    and the next delay. ``attempts`` is counted by the caller (one per try)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempts = 0
        self._counted = 0  # attempts that failed with an error counted against max_attempts
        self._waited = 0.0
        self._rate_limited = 0
        self._rate_waited = 0.0

    def delay(self, error: ModelError) -> float | None:
        """The wait before the next attempt, or None to give up (``details["attempts"]`` is
        then set on ``error``)."""
        if self.policy.rate_limit_wait_s is not None and is_rate_limited(error):
            self._rate_limited += 1
            delay = self.policy.rate_limit_delay(error, self._rate_limited, self._rate_waited)
            if delay is not None:
                self._rate_waited += delay
        else:
            self._counted += 1
            delay = self.policy.delay_for(error, self._counted, self._waited)
            if delay is not None:
                self._waited += delay
        if delay is None:
            error.details["attempts"] = self.attempts
        return delay
