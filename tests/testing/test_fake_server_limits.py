"""The fake provider as a rate-limited provider: limits enforced over a short window (429 with
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


def test_a_limit_is_a_bucket_of_window_s_refilled_at_its_rate() -> None:
    now = [0.0]
    enforcer = LimitEnforcer(ProviderLimits(requests_per_minute=600, window_s=1), clock=lambda: now[0])
    assert [enforcer.admit(10).admitted for _ in range(11)] == [True] * 10 + [False]  # 10 at once, not 600
    limited = enforcer.admit(10)
    assert not limited.admitted and limited.retry_after_s == pytest.approx(0.1)
    now[0] = 0.1
    assert enforcer.admit(10).admitted and not enforcer.admit(10).admitted  # one more every 100 ms
    tokens = LimitEnforcer(ProviderLimits(input_tokens_per_minute=6000, window_s=2), clock=lambda: now[0])
    assert tokens.admit(150).admitted and not tokens.admit(100).admitted  # 200 tokens at once
    assert enforcer.counts()["limited"] == 3 and enforcer.counts()["admitted"] == 11


def test_over_http_limits_answer_429_with_retry_after_and_every_answer_has_budget_headers() -> None:
    with FakeProviderServer(api_key=KEY) as server:
        assert httpx.post(f"{server.url}/_fake/limits", json={"requests_per_minute": 120, "window_s": 1}).status_code == 200
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
        assert httpx.post(f"{server.url}/_fake/limits", json={"requests_pm": 1}).status_code == 400
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
