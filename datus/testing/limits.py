"""Provider-side rate limits for the fake servers: what the providers document they enforce,
so that a fleet of workers can be shown to stay inside it.

`ProviderLimits` sets a per-minute limit on requests and on input tokens and says how the
provider holds a client to it over a short window of ``window_s`` seconds, which allows
``window_s`` seconds' worth of the limit (at least one request). The three ways providers
document (``enforcement``):

- ``"quantized"`` — fixed windows: a counter per ``window_s``, reset at each boundary.
  OpenAI: "Rate limits can be quantized, meaning they are enforced over shorter periods of
  time (e.g. 60,000 requests/minute may be enforced as 1,000 requests/second)" (help center
  article 6891753, "Rate limit reached for requests"). Alibaba Model Studio (DashScope, Qwen):
  "rate limiting may be enforced at the per-second level for requests per second (RPS), which
  is RPM/60, and tokens per second (TPS), which is TPM/60. Even if the total number of calls
  per minute does not exceed the limit, a burst of requests in a short period may also
  trigger rate limiting" (help.aliyun.com/en/model-studio/rate-limit).
- ``"token_bucket"`` — a bucket holding ``window_s`` seconds' worth, refilled continuously.
  Anthropic: "We use the token bucket algorithm to do rate limiting. This means that your
  capacity is continuously replenished up to your maximum limit, rather than being reset at
  fixed intervals", and limits "may be enforced over shorter time intervals", e.g. 60 RPM as
  1 request per second (docs.claude.com/en/api/rate-limits).
- ``"sliding_window"`` — what arrived in the last ``window_s`` seconds, at any moment: the
  strictest reading of "N per window" (every fixed window is one of its windows). Gemini
  documents only the minute ("if your RPM limit is 20, making 21 requests within a minute will
  result in an error", ai.google.dev/gemini-api/docs/rate-limits); read as a sliding minute.

DeepSeek documents no per-user limit ("DeepSeek API does NOT constrain user's rate limit",
api-docs.deepseek.com/quick_start/rate_limit): 429 / 503 only under its own load, which the
fake's scripted faults stand for. `ProviderLimits.documented` builds each provider's shape.

The defaults — 1 s quantized windows — are the shortest window any of them documents, and the
wire most of them speak (OpenAI's, which DeepSeek and DashScope's compatible mode copy).

A request that does not fit is answered 429 with ``Retry-After`` (and ``retry-after-ms``)
saying when it would fit; one that fits takes its share. Every answer carries the provider's
budget headers (`WireProtocol.budget_headers`) describing the window (``limit``: what it
allows, ``remaining``, ``reset_s``: until it is whole again). The counts of admitted and
limited requests tell a test whether a client stayed inside.

``period_s`` is the limit's period (60: per minute; a test may shorten it to run faster).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

__all__ = ["Admission", "BucketState", "Enforcement", "LimitEnforcer", "ProviderLimits"]

Enforcement = Literal["quantized", "token_bucket", "sliding_window"]
_EPSILON = 1e-9  # a refill short of a unit by float rounding only is a full unit


@dataclass(frozen=True)
class ProviderLimits:
    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    window_s: float = 1.0  # the window the limit is enforced over (see the module docstring)
    enforcement: Enforcement = "quantized"
    period_s: float = 60.0  # the "minute" the limits are per

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "input_tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.window_s <= 0 or self.period_s <= 0:
            raise ValueError("window_s and period_s must be positive")
        if self.enforcement not in get_args(Enforcement):
            raise ValueError(f"enforcement must be one of {', '.join(get_args(Enforcement))}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderLimits:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown limit field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    @classmethod
    def documented(cls, provider: str, requests_per_minute: float | None = None,
                   input_tokens_per_minute: float | None = None) -> ProviderLimits | None:
        """The limits as ``provider`` (a model type: openai, claude, qwen, gemini, deepseek)
        documents enforcing them; None for DeepSeek, which documents no per-user limit."""
        shapes: dict[str, tuple[Enforcement, float] | None] = {
            "openai": ("quantized", 1.0),  # 60,000/min "may be enforced as 1,000 requests/second"
            "qwen": ("quantized", 1.0),  # RPS = RPM/60, TPS = TPM/60
            "claude": ("token_bucket", 1.0),  # continuously replenished; 60 RPM as 1 request/s
            "gemini": ("sliding_window", 60.0),  # "21 requests within a minute" over 20 RPM
            "deepseek": None,  # "does NOT constrain user's rate limit"
        }
        if provider not in shapes:
            raise ValueError(f"no documented limits for {provider!r}; known: {', '.join(shapes)}")
        shape = shapes[provider]
        if shape is None:
            return None
        enforcement, window_s = shape
        return cls(requests_per_minute, input_tokens_per_minute, window_s, enforcement)


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


class _Budget:
    """One limit (requests or input tokens) as one enforcement counts it."""

    def __init__(self, per_period: float, limits: ProviderLimits, now: float) -> None:
        self.rate = per_period / limits.period_s  # units per second
        # what one window allows; a limit under one unit per window is one unit per longer window
        self.window_s = max(limits.window_s, 1.0 / self.rate)
        self.allowance = self.rate * self.window_s
        self.enforcement = limits.enforcement
        self.level = self.allowance  # token bucket: what is in it
        # token bucket: when it was last refilled; quantized: the start of the current window
        self.at = math.floor(now / self.window_s) * self.window_s if self.enforcement == "quantized" else now
        self.used = 0.0  # quantized: taken in the current window
        self.log: deque[tuple[float, float]] = deque()  # sliding window: (when, cost) admitted
        self.in_log = 0.0

    def advance(self, now: float) -> None:
        if self.enforcement == "token_bucket":
            self.level = min(self.allowance, self.level + (now - self.at) * self.rate)
            self.at = now
        elif self.enforcement == "quantized":
            start = math.floor(now / self.window_s) * self.window_s
            if start > self.at:
                self.at, self.used = start, 0.0
        else:
            while self.log and self.log[0][0] <= now - self.window_s:
                self.in_log -= self.log.popleft()[1]

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` fits; a cost above the whole allowance fits an untouched window
        (or a full bucket) and takes all of it."""
        cost = min(cost, self.allowance)
        if self.enforcement == "token_bucket":
            short = cost - self.level
            return short / self.rate if short > _EPSILON else 0.0
        if self.enforcement == "quantized":
            return 0.0 if self.used + cost <= self.allowance else self.at + self.window_s - now
        room, wait = self.allowance - self.in_log, 0.0
        for when, taken in self.log:  # the oldest leave first
            if room >= cost:
                break
            room, wait = room + taken, when + self.window_s - now
        return max(0.0, wait)

    def take(self, cost: float, now: float) -> None:
        cost = min(cost, self.allowance)
        if self.enforcement == "token_bucket":
            self.level -= cost
        elif self.enforcement == "quantized":
            self.used += cost
        else:
            self.log.append((now, cost))
            self.in_log += cost

    def state(self, now: float) -> BucketState:
        if self.enforcement == "token_bucket":
            left, whole_in = self.level, (self.allowance - self.level) / self.rate
        elif self.enforcement == "quantized":
            left, whole_in = self.allowance - self.used, (self.at + self.window_s - now) if self.used else 0.0
        else:
            left, whole_in = self.allowance - self.in_log, (self.log[-1][0] + self.window_s - now) if self.log else 0.0
        return BucketState(self.allowance, max(0.0, math.floor(left)), max(0.0, whole_in))


class LimitEnforcer:
    """Thread-safe; one per server. `admit` is called once per generation request."""

    def __init__(self, limits: ProviderLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._requests = _Budget(limits.requests_per_minute, limits, now) if limits.requests_per_minute else None
        self._tokens = _Budget(limits.input_tokens_per_minute, limits, now) if limits.input_tokens_per_minute else None
        self.admitted = 0
        self.limited = 0
        self._last = now

    def admit(self, input_tokens: int, at: float | None = None) -> Admission:
        """``at``: when the request arrived, on this enforcer's clock (default: now). Arrivals
        handled out of order count at the latest time seen, so the windows only move forward."""
        with self._lock:
            now = self._last = max(self._clock() if at is None else at, self._last)
            budgets = [(budget, cost) for budget, cost in ((self._requests, 1.0), (self._tokens, float(input_tokens)))
                       if budget is not None]
            for budget, _ in budgets:
                budget.advance(now)
            wait = max((budget.wait_for(cost, now) for budget, cost in budgets), default=0.0)
            if wait <= 0:
                for budget, cost in budgets:
                    budget.take(cost, now)
                self.admitted += 1
            else:
                self.limited += 1
            return Admission(wait <= 0, wait, self._requests.state(now) if self._requests else None,
                             self._tokens.state(now) if self._tokens else None)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"limits": asdict(self.limits), "admitted": self.admitted, "limited": self.limited}
