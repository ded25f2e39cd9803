"""The fake server's ``POST /v1/responses`` as the official `openai` SDK sees it: its typed
``Response`` and stream events, errors, and the check on replayed reasoning items."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from datus.models.scripted import Fault, Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus.testing.protocols.openai_responses import decrypt


@pytest.fixture
def api(fake_server: FakeProviderServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake_server.openai_base_url, api_key="sk-test", max_retries=0) as client:
        yield client


def test_a_plain_response_parses_into_the_sdks_types(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text="Hi.", reasoning="Greet.", tool_calls=[ScriptedToolCall("run_sql", {"sql": "1"},
                                                                                             id="call_1")],
                                 input_tokens=12, output_tokens=7, cached_tokens=4, reasoning_tokens=2))
    response = api.responses.create(model="o3-pro", input="hello", store=False,
                                    include=["reasoning.encrypted_content"], reasoning={"summary": "auto"})
    assert response.status == "completed" and response.output_text == "Hi."
    reasoning, message, call = response.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Greet."
    assert decrypt(reasoning.encrypted_content) == {"model": "o3-pro", "reasoning": "Greet."}
    assert message.type == "message" and call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "run_sql", '{"sql": "1"}')
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 7, 19)
    assert usage.input_tokens_details.cached_tokens == 4 and usage.output_tokens_details.reasoning_tokens == 2
    [seen] = fake_server.requests
    assert seen.protocol == "openai_responses" and seen.path == "/v1/responses"


def test_no_encrypted_content_or_summary_unless_asked(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text="x", reasoning="hidden"))
    [reasoning, _] = api.responses.create(model="o3", input="q").output
    assert reasoning.summary == [] and getattr(reasoning, "encrypted_content", None) is None


def test_the_stream_is_the_apis_event_sequence(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Reply(text="Hello world", reasoning="Think",
                                 tool_calls=[ScriptedToolCall("f", {"a": 1}, id="c1")]))
    events = list(api.responses.create(model="o3-pro", input="q", stream=True, reasoning={"summary": "auto"}))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello world"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == "Think"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == '{"a": 1}'
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    final = events[-1].response
    assert final.output_text == "Hello world" and final.usage is not None


def test_the_input_is_read_as_a_chat(fake_server: FakeProviderServer, api: openai.OpenAI) -> None:
    seen: list[ScriptedRequest] = []
    fake_server.script.add(lambda request: seen.append(request) or Reply(text="ok"))
    api.responses.create(model="gpt-4.1", instructions="Be brief.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ])
    [request] = seen
    assert request.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                            "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert request.last_user_text == "q"


def test_errors_and_refused_reasoning(api: openai.OpenAI, fake_server: FakeProviderServer) -> None:
    fake_server.script.add(Fault("rate_limit", retry_after=3))
    with pytest.raises(openai.RateLimitError) as limited:
        api.responses.create(model="o3-pro", input="q")
    assert limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.BadRequestError, match="not persisted"):
        api.responses.create(model="o3-pro", store=False, input=[
            {"role": "user", "content": "q"}, {"type": "reasoning", "id": "rs_1", "summary": []}])
    issued = api.responses.create(model="o3-pro", input="q", store=False, include=["reasoning.encrypted_content"])
    assert issued.output_text.startswith("echo")  # the echo fallback has no reasoning: script one
    fake_server.script.add(Reply(text="a", reasoning="r"))
    [item, _] = api.responses.create(model="o3-pro", input="q", store=False,
                                     include=["reasoning.encrypted_content"]).output
    replay = {"type": "reasoning", "id": item.id, "summary": [], "encrypted_content": item.encrypted_content}
    assert api.responses.create(model="o3-pro", store=False, input=[replay, {"role": "user", "content": "q"}])
    with pytest.raises(openai.BadRequestError, match="could not be verified"):  # another model's
        api.responses.create(model="gpt-5-pro", store=False, input=[replay, {"role": "user", "content": "q"}])
    with pytest.raises(openai.AuthenticationError):
        fake_server.api_key = "sk-the-only-key"
        api.responses.create(model="o3-pro", input="q")
