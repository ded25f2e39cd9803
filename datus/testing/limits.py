"""Provider-side rate limits for the fake servers: what a real provider enforces, so that a
fleet of workers can be shown to stay inside it.

`ProviderLimits` sets a per-minute limit on requests and on input tokens, enforced as a
provider does over a short window: each is a bucket holding ``window_s`` seconds' worth of
the limit, refilled continuously at the limit's rate. A request that does not fit is answered
429 with ``Retry-After`` (and ``retry-after-ms``) saying when it would fit; one that fits takes
its share. Every answer carries the provider's budget headers (`WireProtocol.budget_headers`)
describing the buckets. The counts of admitted and limited requests tell a test whether a
client stayed inside.

``period_s`` is the limit's period (60: per minute; a test may shorten it to run faster).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Admission", "BucketState", "LimitEnforcer", "ProviderLimits"]


@dataclass(frozen=True)
class ProviderLimits:
    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    window_s: float = 60.0  # how much of the limit may be used at once (the bucket's size, in seconds)
    period_s: float = 60.0  # the "minute" the limits are per

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "input_tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.window_s <= 0 or self.period_s <= 0:
            raise ValueError("window_s and period_s must be positive")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderLimits:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown limit field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass(frozen=True)
class BucketState:
    """One budget as the headers describe it: its size, what is left, seconds until whole."""

    limit: float
    remaining: float
    reset_s: float


@dataclass(frozen=True)
class Admission:
    admitted: bool
    retry_after_s: float  # 0 when admitted
    requests: BucketState | None
    input_tokens: BucketState | None


class _Bucket:
    def __init__(self, per_period: float, limits: ProviderLimits, now: float) -> None:
        self.rate = per_period / limits.period_s  # units per second
        self.capacity = max(1.0, self.rate * limits.window_s)
        self.level = self.capacity
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` fits (a cost above the whole bucket waits for a full one)."""
        needed = min(cost, self.capacity) - self.level
        return max(0.0, needed / self.rate)

    def state(self) -> BucketState:
        return BucketState(self.capacity, max(0.0, math.floor(self.level)), (self.capacity - self.level) / self.rate)


class LimitEnforcer:
    """Thread-safe; one per server. `admit` is called once per generation request."""

    def __init__(self, limits: ProviderLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._requests = _Bucket(limits.requests_per_minute, limits, now) if limits.requests_per_minute else None
        self._tokens = _Bucket(limits.input_tokens_per_minute, limits, now) if limits.input_tokens_per_minute else None
        self.admitted = 0
        self.limited = 0

    def admit(self, input_tokens: int) -> Admission:
        with self._lock:
            now = self._clock()
            buckets = [(bucket, cost) for bucket, cost in ((self._requests, 1.0), (self._tokens, float(input_tokens)))
                       if bucket is not None]
            for bucket, _ in buckets:
                bucket.refill(now)
            wait = max((bucket.wait_for(cost) for bucket, cost in buckets), default=0.0)
            if wait <= 0:
                for bucket, cost in buckets:
                    bucket.level -= min(cost, bucket.level) if cost > bucket.capacity else cost
                self.admitted += 1
            else:
                self.limited += 1
            return Admission(wait <= 0, wait, self._requests.state() if self._requests else None,
                             self._tokens.state() if self._tokens else None)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"limits": asdict(self.limits), "admitted": self.admitted, "limited": self.limited}
