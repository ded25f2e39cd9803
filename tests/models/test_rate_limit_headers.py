"""The providers' rate-limit headers, read in neutral terms (datus/models/rate_limit_headers.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from datus.models.rate_limit_headers import Budget, anthropic_budget, openai_budget, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("", None), ("soon", None),
    ("6m0", None),
])
def test_openai_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_openai_headers() -> None:
    budget = openai_budget({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599",
                            "x-ratelimit-reset-requests": "100ms", "x-ratelimit-limit-tokens": "200000",
                            "x-ratelimit-remaining-tokens": "150000", "x-ratelimit-reset-tokens": "15s",
                            "content-type": "application/json"})
    assert budget is not None
    assert budget.requests == Budget(600, 599, 0.1) and budget.tokens == Budget(200000, 150000, 15.0)
    assert budget.requests.refill_seconds_per_unit() == pytest.approx(0.1)
    assert openai_budget({"content-type": "application/json"}) is None  # Gemini, or a proxy that strips them
    assert openai_budget(None) is None


def test_anthropic_headers() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    budget = anthropic_budget({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "3",
                               "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:30Z",
                               "anthropic-ratelimit-input-tokens-limit": "30000",
                               "anthropic-ratelimit-input-tokens-remaining": "29000",
                               "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:02+00:00"}, now=now)
    assert budget is not None
    assert budget.requests == Budget(50, 3, 30.0) and budget.input_tokens == Budget(30000, 29000, 2.0)
    assert budget.output_tokens is None and budget.tokens is None
    assert anthropic_budget({"request-id": "req_1"}) is None
