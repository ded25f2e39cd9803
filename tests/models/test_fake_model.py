"""The base interface through the scripted in-process model: JSON output and repair,
streaming, usage and cost, traces, retries and concurrency."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from datus.models import track_usage
from datus.models.config import ModelConfig
from datus.models.errors import AuthenticationError, ModelOutputError, ModelTimeoutError, RateLimitError
from datus.models.fake_model import FakeModel
from datus.models.scripted import Fault, Reply


def fake(replies=None, **config) -> FakeModel:
    return FakeModel(ModelConfig(type="fake", model="scripted", retry_base_delay_s=0.0, **config), replies=replies)


class Answer(BaseModel):
    sql: str
    confidence: float


def test_generate_sync_and_echo_fallback() -> None:
    model = fake(["first"])
    assert model.generate("hello") == "first"
    assert model.generate("hello again") == "echo: hello again"


def test_messages_prompt_and_per_call_options_reach_the_model() -> None:
    seen = []
    model = FakeModel(ModelConfig(type="fake", model="s", temperature=0.1),
                      handler=lambda request: seen.append(request) or Reply(text="ok"))
    model.generate([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                   max_tokens=200, temperature=0.5)
    assert [m["role"] for m in seen[0].messages] == ["system", "user"]
    assert seen[0].body["options"]["max_tokens"] == 200
    assert seen[0].body["options"]["temperature"] == 0.5
    model.generate("again")
    assert seen[1].body["options"]["temperature"] == 0.1  # config default


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="unknown option.*'temprature'"):
        fake().generate("x", temprature=0.2)
    with pytest.raises(ValueError, match="temperature"):
        fake().generate("x", temperature=7)


def test_json_output_accepts_all_format_kinds() -> None:
    model = fake([
        '```json\n{"sql": "SELECT 1", "confidence": 0.9,}\n```',
        'Here you go: {"a": 1} hope it helps',
        '{"sql": "SELECT 2", "confidence": 1}',
    ])
    assert model.generate_with_json_output("q", response_format=Answer) == {"sql": "SELECT 1", "confidence": 0.9}
    assert model.generate_with_json_output("q", response_format={"type": "json_object"}) == {"a": 1}
    schema = {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]}
    assert model.generate_with_json_output("q", response_format=schema)["sql"] == "SELECT 2"


def test_json_output_re_asks_with_the_reason_then_succeeds() -> None:
    seen = []
    answers = iter(["not json at all", '{"sql": "SELECT 1"}', '{"sql": "SELECT 1", "confidence": 0.5}'])
    model = FakeModel(ModelConfig(type="fake", model="s"),
                      handler=lambda request: seen.append(request) or Reply(text=next(answers)))
    assert model.generate_with_json_output("q", response_format=Answer)["confidence"] == 0.5
    assert len(seen) == 3
    assert "not valid JSON" in seen[1].messages[-1]["content"]
    assert "confidence" in seen[2].messages[-1]["content"]


def test_json_output_gives_up_with_an_error_not_an_error_dict() -> None:
    model = fake(["nope", "still nope", "never"], json_repair_attempts=1)
    with pytest.raises(ModelOutputError, match="no valid JSON after 2") as info:
        model.generate_with_json_output("q")
    assert info.value.details["last_answer"] == "still nope"
    assert model.script.pending() == 1


def test_usage_and_cost_recorded_per_call() -> None:
    model = fake([Reply(text="x", input_tokens=1000, output_tokens=500, cached_tokens=400, reasoning_tokens=100)])
    with track_usage() as calls:
        model.generate("q")
    (usage,) = calls
    # fake prices: 1.00 in, 2.00 out, 0.10 cached per million tokens
    assert usage.cost_usd == pytest.approx((600 * 1.0 + 400 * 0.10 + 500 * 2.0) / 1e6)
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens) == (1000, 500, 400, 100)
    assert usage.attempts == 1 and usage.latency_ms >= 0 and usage.provider == "fake"


def test_pricing_override_from_config() -> None:
    model = fake([Reply(text="x", input_tokens=1_000_000, output_tokens=0)],
                 pricing={"input_per_mtok": 7.0, "output_per_mtok": 1.0})
    with track_usage() as calls:
        model.generate("q")
    assert calls[0].cost_usd == pytest.approx(7.0)


def test_retries_transient_faults_and_counts_attempts() -> None:
    model = fake([Fault("rate_limit", retry_after=0.05), Fault("status", status=503), "done"])
    with track_usage() as calls:
        assert model.generate("q") == "done"
    assert calls[0].attempts == 3


def test_permanent_fault_fails_at_once() -> None:
    model = fake([Fault("status", status=401, message="bad key"), "never"])
    with pytest.raises(AuthenticationError, match="bad key"):
        model.generate("q")
    assert model.script.pending() == 1


def test_retries_are_bounded() -> None:
    model = fake([Fault("rate_limit", retry_after=0.01)] * 5, max_retries=2)
    with pytest.raises(RateLimitError) as info:
        model.generate("q")
    assert info.value.details["attempts"] == 3


def test_hang_becomes_a_timeout() -> None:
    model = fake([Fault("hang", seconds=5)], timeout_s=0.2, max_retries=0)
    with pytest.raises(ModelTimeoutError):
        model.generate("q")


async def test_stream_equals_complete() -> None:
    reply = Reply(text="SELECT name FROM users WHERE id = 1", reasoning="think first")
    model = fake([reply, reply])
    whole = await model.acomplete("q")
    pieces, final = [], None
    async for item in model.astream("q"):
        if hasattr(item, "usage"):
            final = item
        else:
            pieces.append(item)
    assert "".join(p.text for p in pieces) == whole.text == final.text
    assert "".join(p.reasoning for p in pieces) == whole.reasoning == final.reasoning
    assert final.usage.input_tokens == whole.usage.input_tokens


async def test_stream_retries_before_first_delta() -> None:
    model = fake([Fault("status", status=500), "streamed answer"])
    assert "".join([d async for d in model.agenerate_stream("q")]) == "streamed answer"


async def test_one_model_object_serves_concurrent_calls() -> None:
    model = FakeModel(ModelConfig(type="fake", model="s"),
                      handler=lambda request: Reply(text=request.last_user_text.upper(), latency_s=0.05))
    with track_usage() as calls:
        answers = await asyncio.gather(*(model.agenerate(f"q{i}") for i in range(200)))
    assert answers == [f"Q{i}" for i in range(200)]
    assert len(calls) == 200


def test_trace_one_file_per_call(tmp_path) -> None:
    model = fake(["a", "b", Fault("status", status=400, message="bad")], save_llm_trace=True,
                 trace_dir=str(tmp_path), api_key="sk-never-in-traces")
    model.generate("one")
    model.generate("two")
    with pytest.raises(Exception):
        model.generate("three")
    files = sorted((tmp_path / "fake").glob("*.json"))
    assert len(files) == 3
    records = [json.loads(f.read_text()) for f in files]
    assert {r.get("text") for r in records} >= {"a", "b"}
    assert any(r.get("error", {}).get("type") == "BadRequestError" for r in records)
    assert all("sk-never-in-traces" not in f.read_text() for f in files)
