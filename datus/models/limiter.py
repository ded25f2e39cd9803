"""The request limiter hook: what runs before and after every request a model sends.

A model object with a limiter installed (``model.request_limiter``) calls it around each HTTP
request to its provider — every attempt of every call, streamed or not, each turn of a tool
run::

    permit = await limiter.before(planned)      # may wait; may raise
    ... the request ...
    await limiter.after(permit, outcome)        # usage, the provider's budget headers, or the error
    await limiter.wait(delay, error)            # instead of sleeping, when the retry policy retries

``before`` gets a `PlannedRequest`: the estimated input tokens (counted offline, on demand)
and the output tokens the request may use (``max_tokens``). Whatever it raises reaches the
caller unchanged: a `ModelError` is treated as the request's own error (a permanent one is not
retried), any other exception passes through the retry policy untouched. ``after`` always
runs once ``before`` returned, also when the request failed or was cancelled; an exception
in it is logged, never allowed to lose an answer. ``wait`` waits out the retry policy's delay
before the next attempt; like ``before`` it may raise instead (to hand a long wait elsewhere).

The model layer ships no limiter and knows nothing of where budgets live: the job system
installs one that shares them across its workers in Redis (``tasks.ratelimit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from datus.models.errors import ModelError
from datus.models.rate_limit_headers import ProviderBudget
from datus.models.usage import Usage

__all__ = ["PlannedRequest", "RequestLimiter", "RequestOutcome"]


@dataclass
class PlannedRequest:
    """One request about to be sent."""

    provider: str
    model: str
    max_output_tokens: int | None
    _count_input: Callable[[], int] = field(repr=False)
    _input_tokens: int | None = field(default=None, repr=False)

    def input_tokens(self) -> int:
        """The prompt's tokens, counted offline with the provider's tokenizer (or estimated);
        computed on first use, so a limiter without a token budget never pays for it."""
        if self._input_tokens is None:
            self._input_tokens = int(self._count_input())
        return self._input_tokens


@dataclass(frozen=True)
class RequestOutcome:
    """How a request ended: its usage (answered), the error (failed), and the provider's
    rate-limit headers when it sent any. All None: cancelled before an answer."""

    usage: Usage | None = None
    budget: ProviderBudget | None = None
    error: ModelError | None = None


@runtime_checkable
class RequestLimiter(Protocol):
    async def before(self, request: PlannedRequest) -> Any:
        """Wait until the request may be sent; returns a permit handed to `after`."""

    async def after(self, permit: Any, outcome: RequestOutcome) -> None:
        """The request ended: give back or charge what it used."""

    async def wait(self, seconds: float, error: ModelError) -> None:
        """Wait ``seconds`` before the request is tried again after ``error``."""
