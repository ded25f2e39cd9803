"""The providers' rate-limit headers, in neutral terms: what is left of each budget and when
it is whole again.

OpenAI (and the OpenAI-style providers that copy it)::

    x-ratelimit-limit-requests: 600          x-ratelimit-limit-tokens: 200000
    x-ratelimit-remaining-requests: 599      x-ratelimit-remaining-tokens: 199000
    x-ratelimit-reset-requests: 100ms        x-ratelimit-reset-tokens: 6m0s

Anthropic, per budget (``requests``, ``input-tokens``, ``output-tokens``, ``tokens``)::

    anthropic-ratelimit-input-tokens-limit / -remaining / -reset (RFC 3339: when it is whole)

Gemini sends none. Each adapter reads them at its one boundary (answers and errors alike);
the parse is a few dictionary lookups and is skipped when no such header is there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Budget", "ProviderBudget", "anthropic_budget", "openai_budget", "parse_duration"]


@dataclass(frozen=True)
class Budget:
    """One budget as the provider reported it: its size, what is left, and seconds until it
    is whole again (None when not said)."""

    limit: float | None
    remaining: float | None
    reset_s: float | None

    def refill_seconds_per_unit(self) -> float | None:
        """How long the provider takes to give back one unit, judged from what it said:
        what was used refills by ``reset_s``."""
        if self.limit is None or self.remaining is None or not self.reset_s:
            return None
        used = self.limit - self.remaining
        return self.reset_s / used if used > 0 else None


@dataclass(frozen=True)
class ProviderBudget:
    """What the provider said is left of its limits after one request (None: not sent)."""

    requests: Budget | None = None
    input_tokens: Budget | None = None
    output_tokens: Budget | None = None
    tokens: Budget | None = None  # input and output together (OpenAI's TPM, Anthropic's combined limit)


_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: str | None) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``; a bare number
    is seconds. None when it is not one of those."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _SECONDS[unit] for number, unit in parts)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _lowered(headers: Mapping[str, str]) -> Mapping[str, str]:
    # httpx's Headers look up case-insensitively already; a plain dict does not
    return headers if hasattr(headers, "get_list") else {key.lower(): value for key, value in headers.items()}


def openai_budget(headers: Mapping[str, str] | None) -> ProviderBudget | None:
    if not headers:
        return None
    found = _lowered(headers)
    if "x-ratelimit-remaining-requests" not in found and "x-ratelimit-remaining-tokens" not in found:
        return None

    def budget(kind: str) -> Budget | None:
        remaining = _number(found.get(f"x-ratelimit-remaining-{kind}"))
        limit = _number(found.get(f"x-ratelimit-limit-{kind}"))
        if remaining is None and limit is None:
            return None
        return Budget(limit, remaining, parse_duration(found.get(f"x-ratelimit-reset-{kind}")))

    return ProviderBudget(requests=budget("requests"), tokens=budget("tokens"))


def anthropic_budget(headers: Mapping[str, str] | None, now: float | None = None) -> ProviderBudget | None:
    if not headers:
        return None
    found = _lowered(headers)
    if not any(f"anthropic-ratelimit-{kind}-remaining" in found
               for kind in ("requests", "input-tokens", "output-tokens", "tokens")):
        return None
    at = time.time() if now is None else now

    def budget(kind: str) -> Budget | None:
        remaining = _number(found.get(f"anthropic-ratelimit-{kind}-remaining"))
        limit = _number(found.get(f"anthropic-ratelimit-{kind}-limit"))
        if remaining is None and limit is None:
            return None
        return Budget(limit, remaining, _seconds_until(found.get(f"anthropic-ratelimit-{kind}-reset"), at))

    return ProviderBudget(requests=budget("requests"), input_tokens=budget("input-tokens"),
                          output_tokens=budget("output-tokens"), tokens=budget("tokens"))


def _seconds_until(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip())  # 3.11 reads a trailing Z
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
