"""OpenAI's hosted tools on the Responses API (`datus.models.openai_responses`): web search, file
search and code interpreter from the model's config, run by OpenAI (the fake server, through
the official `openai` SDK over HTTP), never by the tool loop; their calls become TOOL steps and
are replayed in the conversation — or held by the chain when stored."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from pydantic import ValidationError

from datus.models.config import ModelConfig
from datus.models.errors import ModelConfigError
from datus.models.generation import Generation
from datus.models.openai_responses import HOSTED_DETAIL
from datus.models.scripted import Reply
from datus.models.scripted import ScriptedToolCall as Call
from datus.schemas.action_history import ActionHistory, ActionRole
from datus.testing.fake_server import FakeProviderServer
from tests.models.test_openai_responses import KEY, model_of, responses

WEB = [{"type": "web_search"}]
SOURCE = "https://example.org/population-of-berlin-2024"
RAN: list[str] = []


def population(city: str) -> str:
    """The population on record for a city."""
    RAN.append(city)
    return f"{city}: 3.7 million on record"


def hosted(generation: Generation) -> list[dict[str, Any]]:
    return [d for d in generation.reasoning_details or () if d.get("type") == HOSTED_DETAIL]


def kinds(body: dict[str, Any]) -> list[str]:
    return [item.get("type") or item["role"] for item in body["input"]]


async def test_web_search_is_sent_run_by_openai_and_its_call_kept_both_ways(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server, "o3-pro", hosted_tools=WEB)
    reply = Reply(text="About 3.7 million.", reasoning="Look it up.",
                  tool_calls=[Call("web_search", {"query": "population of Berlin 2024"})])
    fake_server.script.add(reply, reply)
    try:
        plain = await model.acomplete("How many people live in Berlin?")
        items = [item async for item in model.astream("How many people live in Berlin?")]
    finally:
        await model.aclose()
    streamed = items[-1]
    assert isinstance(streamed, Generation)
    body = fake_server.requests[0].body
    assert body["tools"] == WEB
    assert body["include"] == ["reasoning.encrypted_content", "web_search_call.action.sources"]
    for generation in (plain, streamed):
        # OpenAI ran the search inside the answer: no tool call is left for our loop
        assert generation.text == "About 3.7 million." and generation.tool_calls == []
        assert generation.finish_reason == "stop"
        [call] = hosted(generation)
        assert (call["name"], call["status"], call["follows"]) == ("web_search", "completed", 0)
        assert call["input"] == {"type": "search", "query": "population of Berlin 2024"}
        assert call["output"] == {"sources": [{"type": "url", "url": SOURCE}]}
        assert call["item"]["type"] == "web_search_call" and call["item"]["id"] == call["call_id"]
    strip = ("call_id", "item")
    assert [{k: v for k, v in d.items() if k not in strip} for d in hosted(plain)] == \
        [{k: v for k, v in d.items() if k not in strip} for d in hosted(streamed)]


@pytest.mark.parametrize("store", [False, True], ids=["sent-whole", "chained"])
async def test_a_tool_run_with_web_search_beside_a_function_tool(store: bool, fake_server: FakeProviderServer) -> None:
    """The function tool runs in our loop, the search at OpenAI; the search is a TOOL step, and
    the next turn carries its call where it was (store off) or leaves it to the chain."""
    model = model_of(fake_server, "o3-pro", hosted_tools=WEB, store=store)
    fake_server.script.add(
        Reply(reasoning="Search, then check the record.", tool_calls=[
            Call("web_search", {"query": "population of Berlin"}), Call("population", {"city": "Berlin"}, id="c1")]),
        Reply(text="Berlin has about 3.7 million people."))
    RAN.clear()
    try:
        steps: list[ActionHistory] = [step async for step in model.generate_with_tools_stream(
            "How many people live in Berlin?", tools=[population])]
    finally:
        await model.aclose()
    assert RAN == ["Berlin"]  # our loop ran the function tool once, and nothing else
    tool_steps = [(s.action_type, s.input["hosted"] if "hosted" in s.input else False)
                  for s in steps if s.role == ActionRole.TOOL]
    assert tool_steps == [("web_search", True), ("population", False)]
    search = next(s for s in steps if s.action_type == "web_search")
    assert search.output["success"] is True and search.output["hosted"] is True
    assert search.input["arguments"] == {"type": "search", "query": "population of Berlin"}
    assert search.output["raw_output"] == {"sources": [{"type": "url", "url": "https://example.org/population-of-berlin"}]}
    assert steps[-1].action_type == "final_response" and steps[-1].output["content"] == "Berlin has about 3.7 million people."

    first, second = (r.body for r in responses(fake_server))
    assert [t.get("name") or t["type"] for t in second["tools"]] == ["population", "web_search"]
    if store:
        assert second["previous_response_id"] and kinds(second) == ["function_call_output"]
    else:
        # the answer's items in their order: reasoning, the search, then our call and its output
        assert kinds(second) == ["user", "reasoning", "web_search_call", "function_call", "function_call_output"]
        [replayed] = [item for item in second["input"] if item.get("type") == "web_search_call"]
        assert replayed["action"]["query"] == "population of Berlin" and replayed["status"] == "completed"


async def test_file_search_and_code_interpreter_calls_are_kept_with_their_results(
        fake_server: FakeProviderServer) -> None:
    tools = [{"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "code_interpreter",
                                                                   "container": {"type": "auto"}}]
    model = model_of(fake_server, "gpt-5-codex", hosted_tools=tools)
    fake_server.script.add(Reply(text="42, says the file.", tool_calls=[
        Call("file_search", {"query": "the answer"}), Call("code_interpreter", {"code": "print(6 * 7)"})]))
    try:
        generation = await model.acomplete("What is the answer?")
    finally:
        await model.aclose()
    body = fake_server.requests[0].body
    assert body["tools"] == tools
    assert body["include"][1:] == ["file_search_call.results", "code_interpreter_call.outputs"]
    files, code = hosted(generation)
    assert files["name"] == "file_search" and files["input"] == {"queries": ["the answer"]}
    assert files["output"]["results"][0]["filename"] == "notes.md"
    assert code["name"] == "code_interpreter" and code["input"]["code"] == "print(6 * 7)"
    assert code["output"] == {"outputs": [{"type": "logs", "logs": "42\n"}]}


async def test_hosted_tool_settings_are_checked(fake_server: FakeProviderServer) -> None:
    with pytest.raises(ValidationError, match="unknown type 'web_serch'"):
        ModelConfig(type="openai", model="o3-pro", hosted_tools=[{"type": "web_serch"}])
    with pytest.raises(ModelConfigError, match="hosted_tools need the Responses API"):
        model_of(fake_server, "gpt-4o", hosted_tools=WEB)  # Chat Completions has no hosted tools
    with pytest.raises(ModelConfigError, match="store need the Responses API"):
        model_of(fake_server, "gpt-4o", store=True)  # nor previous_response_id
    # the service's own check, held by the fake: file search needs its vector stores
    client = openai.AsyncOpenAI(api_key=KEY, base_url=fake_server.openai_base_url, max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError, match=r"tools\[0\]\.vector_store_ids"):
            await client.responses.create(model="o3-pro", input="q", tools=[{"type": "file_search"}])  # type: ignore[list-item]
    finally:
        await client.close()
