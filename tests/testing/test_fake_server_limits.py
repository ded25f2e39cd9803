"""The fake provider as a rate-limited provider: limits enforced over short windows as the
providers document them (quantized windows, a token bucket, a sliding window; 429 with
Retry-After), budget headers on every answer, fault mixes — scripted in-process and over HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from datus.models.scripted import Fault
from datus.testing.fake_server import FakeProviderServer
from datus.testing.limits import LimitEnforcer, ProviderLimits

KEY = "sk-fake-limits"


def api(server: FakeProviderServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def admitted(enforcer: LimitEnforcer, clock: Clock, at: list[float], tokens: int = 10) -> list[bool]:
    answers = []
    for when in at:
        clock.now = when
        answers.append(enforcer.admit(tokens).admitted)
    return answers


def test_by_default_a_per_minute_limit_is_quantized_into_1s_windows_as_openai_documents() -> None:
    clock = Clock(100.0)  # a window starts at every whole second
    limits = ProviderLimits(requests_per_minute=600)
    assert (limits.enforcement, limits.window_s) == ("quantized", 1.0)
    enforcer = LimitEnforcer(limits, clock=clock)
    assert admitted(enforcer, clock, [100.0 + i * 0.01 for i in range(11)]) == [True] * 10 + [False]  # not 600
    clock.now = 100.5
    refused = enforcer.admit(10)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(0.5)  # until the next window
    assert refused.requests.remaining == 0 and refused.requests.reset_s == pytest.approx(0.5)
    # a window's count starts again at its boundary: 10 at its end and 10 at the next one's start pass
    assert admitted(enforcer, clock, [101.0 + i * 0.01 for i in range(10)]) == [True] * 10


def test_a_token_bucket_refills_continuously_as_anthropic_documents() -> None:
    clock = Clock()
    enforcer = LimitEnforcer(ProviderLimits.documented("claude", requests_per_minute=600), clock=clock)
    assert enforcer.limits.enforcement == "token_bucket"
    assert admitted(enforcer, clock, [100.0] * 11) == [True] * 10 + [False]  # a second's worth at once
    clock.now = 100.0
    assert enforcer.admit(10).retry_after_s == pytest.approx(0.1)  # one more every 100 ms, not at a boundary
    assert admitted(enforcer, clock, [100.1, 100.1, 100.25, 100.3]) == [True, False, True, True]


def test_a_sliding_window_counts_the_last_window_s_at_every_moment() -> None:
    clock = Clock()
    enforcer = LimitEnforcer(ProviderLimits(requests_per_minute=600, window_s=2, enforcement="sliding_window"),
                             clock=clock)
    spaced = [100.0 + i * 0.1 for i in range(20)]  # 20 in 1.9 s: the window's 20
    assert admitted(enforcer, clock, spaced) == [True] * 20
    clock.now = 101.95
    refused = enforcer.admit(10)  # a 21st within 2 s of the first: a fixed window could have let it in
    assert not refused.admitted and refused.retry_after_s == pytest.approx(0.05)
    assert admitted(enforcer, clock, [102.0, 102.05, 102.1]) == [True, False, True]  # as the oldest leave


def test_requests_count_when_they_arrived_and_one_handled_out_of_order_counts_at_the_latest() -> None:
    clock = Clock()
    enforcer = LimitEnforcer(ProviderLimits(requests_per_minute=120, window_s=1, enforcement="sliding_window"),
                             clock=clock)  # 2 a second
    clock.now = 105.0  # the server got round to them late: they count when they arrived
    assert [enforcer.admit(1, at=at).admitted for at in (100.0, 100.5, 100.9, 101.01)] == [True, True, False, True]
    # handled after 101.01 though it arrived at 100.95: it counts at 101.01, and the window is full then
    assert not enforcer.admit(1, at=100.95).admitted
    assert enforcer.admit(1, at=101.6).admitted


def test_tokens_are_counted_in_the_same_windows_and_a_limit_below_one_a_window_stretches_it() -> None:
    clock = Clock()
    tokens = LimitEnforcer(ProviderLimits(input_tokens_per_minute=6000, window_s=2), clock=clock)
    assert admitted(tokens, clock, [100.0, 100.1], tokens=150) == [True, False]  # 200 tokens a window
    slow = LimitEnforcer(ProviderLimits(requests_per_minute=30), clock=clock)  # half a request a second
    assert admitted(slow, clock, [100.0, 100.5, 101.9, 102.0]) == [True, False, False, True]  # one per 2 s


def test_each_provider_documents_its_shape() -> None:
    shapes = {name: ProviderLimits.documented(name, requests_per_minute=60) for name in
              ("openai", "qwen", "claude", "gemini", "deepseek")}
    assert {name: (s.enforcement, s.window_s) if s else None for name, s in shapes.items()} == {
        "openai": ("quantized", 1.0), "qwen": ("quantized", 1.0), "claude": ("token_bucket", 1.0),
        "gemini": ("sliding_window", 60.0), "deepseek": None}  # DeepSeek: no per-user limit
    with pytest.raises(ValueError, match="no documented limits"):
        ProviderLimits.documented("mistral")
    with pytest.raises(ValueError, match="enforcement must be one of"):
        ProviderLimits(requests_per_minute=60, enforcement="leaky")  # type: ignore[arg-type]


def test_over_http_limits_answer_429_with_retry_after_and_every_answer_has_budget_headers() -> None:
    with FakeProviderServer(api_key=KEY) as server:
        assert httpx.post(f"{server.url}/_fake/limits", json={"requests_per_minute": 120, "window_s": 1,
                                                              "enforcement": "token_bucket"}).status_code == 200
        first = api(server).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
        api(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError) as refused:
            api(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        headers = refused.value.response.headers
        assert float(headers["retry-after"]) > 0 and int(headers["retry-after-ms"]) > 0
        assert headers["x-ratelimit-remaining-requests"] == "0"
        counts = httpx.get(f"{server.url}/_fake/limits").json()
        assert (counts["admitted"], counts["limited"]) == (2, 1)
        assert counts["limits"]["enforcement"] == "token_bucket"
        assert httpx.post(f"{server.url}/_fake/limits", json={"requests_pm": 1}).status_code == 400
        assert httpx.post(f"{server.url}/_fake/limits", json={"requests_per_minute": 1,
                                                              "enforcement": "fixed"}).status_code == 400
        httpx.post(f"{server.url}/_fake/limits", json={})
        assert httpx.get(f"{server.url}/_fake/limits").json()["limits"] is None
        assert "x-ratelimit-limit-requests" not in api(server).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).headers


def test_a_fault_mix_over_http_fires_on_every_nth_request() -> None:
    with FakeProviderServer(api_key=KEY) as server:
        entries = [{"fault": {"kind": "rate_limit"}, "every": 4}, {"fault": {"kind": "status", "status": 500}, "every": 3}]
        httpx.post(f"{server.url}/_fake/script", json={"entries": entries, "reset": True}).raise_for_status()
        outcomes = []
        for _ in range(12):
            try:
                api(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append(429)
            except openai.InternalServerError:
                outcomes.append(500)
        assert outcomes == ["ok", "ok", 500, 429, "ok", 500, "ok", 429, 500, "ok", "ok", 429]  # 12: the first listed wins
        assert server.script.pending() == 2  # a mix stays until reset
        server.script.add(Fault("rate_limit"), every=2)  # times defaults to 1 in Python
        assert server.script.pending() == 3
