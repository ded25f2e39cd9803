from __future__ import annotations

import asyncio
import json
import pickle
import time
from email.utils import formatdate

import pytest

from datus.models import errors as E
from datus.models.retry import RetryPolicy
from datus.utils.exceptions import DatusException, ErrorCode


@pytest.mark.parametrize(
    ("status", "codes", "expected"),
    [
        (400, (), E.BadRequestError),
        (400, ("context_length_exceeded",), E.ContextLengthExceededError),
        (400, ("content_filter",), E.ContentFilterError),
        (400, ("data_inspection_failed",), E.ContentFilterError),
        (401, (), E.AuthenticationError),
        (403, (), E.PermissionDeniedError),
        (404, (), E.NotFoundError),
        (408, (), E.ServerError),
        (409, (), E.ServerError),
        (413, (), E.RequestTooLargeError),
        (422, (), E.BadRequestError),
        (429, ("rate_limit_exceeded",), E.RateLimitError),
        (429, ("insufficient_quota",), E.QuotaExceededError),
        (500, (), E.ServerError),
        (503, (), E.OverloadedError),
        (529, (), E.OverloadedError),
        (500, ("overloaded_error",), E.OverloadedError),
        (418, (), E.BadRequestError),
    ],
)
def test_status_mapping(status: int, codes: tuple[str, ...], expected: type[E.ModelError]) -> None:
    error = E.error_from_status(status, "provider says no", codes=codes, headers={"retry-after": "3"},
                                provider="openai", model="gpt-4o")
    assert type(error) is expected
    assert error.reason == "provider says no" and error.status_code == status
    assert isinstance(error, DatusException)
    assert error.retryable == (expected in (E.RateLimitError, E.ServerError, E.OverloadedError))
    assert error.retry_after == (3.0 if error.retryable else None)


def test_retry_after_forms() -> None:
    assert E.parse_retry_after({"Retry-After": "2.5"}) == 2.5
    assert E.parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    now = time.time()
    assert 9 <= E.parse_retry_after({"Retry-After": formatdate(now + 10, usegmt=True)}, now=now) <= 10
    assert E.parse_retry_after({"Retry-After": "soon"}) is None
    assert E.parse_retry_after({}) is None


def test_errors_survive_pickle_and_json() -> None:
    error = E.RateLimitError("slow down", provider="claude", model="m", status_code=429, retry_after=4.0)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is E.RateLimitError and clone.retry_after == 4.0 and clone.reason == "slow down"
    back = E.error_from_dict(json.loads(json.dumps(error.to_dict())))
    assert type(back) is E.RateLimitError and back.code is ErrorCode.MODEL_RATE_LIMIT and back.provider == "claude"
    assert E.error_from_dict({"type": "Whatever", "message": "x"}).__class__ is E.ModelError


def test_backoff_is_full_jitter_and_capped() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0)
    assert policy.backoff(1, rand=lambda: 1.0) == 1.0
    assert policy.backoff(3, rand=lambda: 1.0) == 4.0
    assert policy.backoff(9, rand=lambda: 1.0) == 8.0
    assert policy.backoff(9, rand=lambda: 0.0) == 0.0


def test_delay_honours_retry_after_and_bounds() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.1, max_delay_s=1.0, max_total_wait_s=10.0)
    limited = E.RateLimitError("x", retry_after=5.0)
    assert policy.delay_for(limited, 1) == 5.0
    assert policy.delay_for(limited, 3) is None  # attempts used up
    assert policy.delay_for(limited, 1, waited_s=6.0) is None  # would pass the total wait
    assert policy.delay_for(E.AuthenticationError("x"), 1) is None
    assert policy.delay_for(ValueError("not ours"), 1) is None


async def test_run_retries_transient_then_succeeds_and_counts_attempts() -> None:
    sleeps: list[float] = []
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise E.RateLimitError("busy", retry_after=0.25)
        return "ok"

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    result, attempts = await RetryPolicy(max_attempts=4, base_delay_s=0.01).run(flaky, sleep=fake_sleep)
    assert (result, attempts) == ("ok", 3)
    assert all(s >= 0.25 for s in sleeps) and len(sleeps) == 2


async def test_run_fails_fast_on_permanent_and_reports_attempts() -> None:
    async def denied() -> str:
        raise E.AuthenticationError("bad key")

    with pytest.raises(E.AuthenticationError) as info:
        await RetryPolicy().run(denied, sleep=asyncio.sleep)
    assert info.value.details["attempts"] == 1
