"""Usage records: what one call cost in tokens, dollars, time and attempts.

Every model call produces one `Usage` and hands it to `record_usage`, which logs it and
appends it to every active `track_usage()` block. The record travels with results instead
of living on the model object, so one model object can serve many concurrent calls.

Token convention, the same for every provider: ``input_tokens`` counts the whole prompt,
cache reads (``cached_tokens``) and cache writes (``cache_write_tokens``) included;
``output_tokens`` counts the whole answer, reasoning (``reasoning_tokens``) included.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Usage", "record_usage", "track_usage"]

logger = logging.getLogger("datus.models.usage")


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = ""
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True  # False when no price was known for the model: cost_usd is then 0
    latency_ms: float = 0.0
    attempts: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self, context_length: int | None = None) -> dict[str, Any]:
        """The usage dict Datus-agent's callers read (``requests``, ``input_tokens``,
        ``output_tokens``, ``total_tokens``, ``cached_tokens``, ``reasoning_tokens``,
        ``cache_hit_rate``, ``context_usage_ratio``), with this record's other fields after them."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cache_hit_rate": round(self.cached_tokens / self.input_tokens, 3) if self.input_tokens else 0,
            "context_usage_ratio": round(self.total_tokens / context_length, 3) if context_length else 0,
            **self.model_dump(exclude={"requests", "input_tokens", "output_tokens", "cached_tokens",
                                       "reasoning_tokens"}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        """Inverse of `to_dict` (the derived keys are dropped)."""
        return cls.model_validate({key: value for key, value in data.items() if key in cls.model_fields})

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            provider=self.provider if self.provider == other.provider or not other.provider else (
                other.provider if not self.provider else "mixed"),
            model=self.model if self.model == other.model or not other.model else (
                other.model if not self.model else "mixed"),
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            priced=self.priced and other.priced,
            latency_ms=self.latency_ms + other.latency_ms,
            attempts=self.attempts + other.attempts,
            requests=self.requests + other.requests,
        )

    def summary(self) -> str:
        cost = f"${self.cost_usd:.6f}" if self.priced else "unpriced"
        return (
            f"{self.model}: {self.input_tokens} in ({self.cached_tokens} cached) / "
            f"{self.output_tokens} out ({self.reasoning_tokens} reasoning), {cost}, "
            f"{self.latency_ms:.0f} ms, {self.attempts} attempt(s)"
        )


_trackers: contextvars.ContextVar[tuple[list[Usage], ...]] = contextvars.ContextVar(
    "datus_usage_trackers", default=()
)


@contextlib.contextmanager
def track_usage() -> Iterator[list[Usage]]:
    """Collect the usage record of every model call made inside the block (including calls
    in tasks started inside it)::

        with track_usage() as calls:
            model.generate("hi")
        calls[0].cost_usd
    """
    records: list[Usage] = []
    token = _trackers.set((*_trackers.get(), records))
    try:
        yield records
    finally:
        _trackers.reset(token)


def record_usage(usage: Usage) -> None:
    for records in _trackers.get():
        records.append(usage)
    logger.debug("usage %s", usage.summary())
