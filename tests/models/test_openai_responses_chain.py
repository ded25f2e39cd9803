"""``previous_response_id`` on OpenAI's Responses API (`datus.models.openai_responses`), through
the official `openai` SDK over HTTP to the fake server, which stores responses made with
``store: true``, resolves a chain as the service does and refuses what the service refuses (an
unknown or deleted previous response, an item sent again on top of the chain that holds it, a
call without its output)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus.models.errors import TransientModelError
from datus.models.generation import CallOptions, ModelRequest
from datus.models.messages import ChatMessage, to_messages
from datus.models.openai_responses import RESPONSE_DETAIL, chain_point, responses_params
from datus.models.scripted import Fault, Reply
from datus.testing.fake_server import FakeProviderServer
from datus.testing.protocols.openai_responses import decrypt
from tests.models.test_openai_responses import (
    KEY,
    REASONING,
    agent_config,
    made,  # noqa: F401 (a fixture)
    model_of,
    reasoning_items,
    responses,
    sessions,  # noqa: F401 (a fixture)
    shop_db,  # noqa: F401 (a fixture)
)
from tests.models.test_tool_runs import ANSWER, StoredJournal, sql_exchange, streamed

QUESTION = "How many customers per city?"


# the SQL server's two tools as Python tools (sql_exchange calls them): no server process to start
def list_tables() -> dict[str, Any]:
    """The tables."""
    return {"tables": ["customers", "orders"]}


def read_query(query: str) -> dict[str, Any]:
    """Run a read-only query."""
    return {"rows": [["Berlin", 2], ["Paris", 1]], "query": query}


SQL = [list_tables, read_query]


@pytest.fixture
async def sdk(fake_server: FakeProviderServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(api_key=KEY, base_url=fake_server.openai_base_url, max_retries=0)
    yield client
    await client.close()


def kinds(body: dict[str, Any]) -> list[str]:
    return [item.get("type") or item["role"] for item in body["input"]]


def anchor(message: ChatMessage) -> dict[str, Any]:
    [detail] = [d for d in message.reasoning_details or () if d.get("type") == RESPONSE_DETAIL]
    return detail


# ---------------------------------------------------------------- a tool run


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_stored_tool_run_sends_each_later_turn_as_previous_response_id_and_its_new_items(
        stream: bool, fake_server: FakeProviderServer, shop_db: Path, sdk: openai.AsyncOpenAI,
        made: Callable[[AgentConfig, str], LLMBaseModel]) -> None:
    model = made(agent_config(fake_server, shop_db, pro={"model": "o3-pro", "store": True}), "pro")
    fake_server.script.add(*sql_exchange())
    if stream:  # with Python tools; the plain run with the MCP server
        steps = await streamed(model, QUESTION, tools=SQL)
        assert steps[-1].output["content"] == ANSWER
    else:
        result = await model.generate_with_tools(QUESTION, mcp_servers=["sql"])
        assert result["content"] == ANSWER and result["turns_used"] == 3
        # the service bills the whole context of a chained request: the usage is the same as sent whole
        assert (result["usage"]["input_tokens"], result["usage"]["requests"]) == (600, 3)

    first, second, third = (r.body for r in responses(fake_server))
    for body in (first, second, third):
        assert body["store"] is True and body["include"] == ["reasoning.encrypted_content"]
        assert body["tools"] == first["tools"] != []  # tools are not carried over by the chain: sent each time
    assert "previous_response_id" not in first and kinds(first) == ["user"]
    # turn 2: the answer of turn 1 (its reasoning item, text and call) is at OpenAI; only the output goes
    assert kinds(second) == ["function_call_output"] and second["input"][0]["call_id"] == "call_1"
    assert kinds(third) == ["function_call_output"] and third["input"][0]["call_id"] == "call_2"
    assert third["previous_response_id"] != second["previous_response_id"]

    # each names the response before it, which OpenAI holds with its reasoning item
    earlier = await sdk.responses.retrieve(second["previous_response_id"])
    assert [item.type for item in earlier.output] == ["reasoning", "message", "function_call"]
    assert decrypt(earlier.output[0].encrypted_content) == {"model": "o3-pro", "reasoning": REASONING}
    latest = await sdk.responses.retrieve(third["previous_response_id"])
    assert latest.previous_response_id == second["previous_response_id"]
    assert [item.type for item in latest.output] == ["function_call"]


async def test_store_off_stays_the_default_and_an_extra_body_can_turn_it_on(fake_server: FakeProviderServer) -> None:
    model = model_of(fake_server, "gpt-5-pro")
    fake_server.script.add(Reply(text="a", reasoning="r1"), Reply(text="b"), Reply(text="c", reasoning="r3"),
                           Reply(text="d"))
    try:
        first = await model.acomplete("q1")
        history = [{"role": "user", "content": "q1"}, first.message().model_dump(), {"role": "user", "content": "q2"}]
        await model.acomplete(history)
        stored = await model.acomplete("q1", extra_body={"store": True})
        again = [{"role": "user", "content": "q1"}, stored.message().model_dump(), {"role": "user", "content": "q2"}]
        await model.acomplete(again, extra_body={"store": True})
    finally:
        await model.aclose()
    off, off_again, on, on_again = (r.body for r in fake_server.requests)
    assert (off["store"], off_again["store"]) == (False, False)
    assert "previous_response_id" not in off_again and kinds(off_again) == ["user", "reasoning", "assistant", "user"]
    assert not [d for d in first.reasoning_details or () if d.get("type") == RESPONSE_DETAIL]
    assert on["store"] is True and on_again["previous_response_id"] == stored.response_id
    assert on_again["input"] == [{"role": "user", "content": "q2"}]


# ---------------------------------------------------------------- gone, resumed, sessions


async def test_a_resumed_run_continues_from_its_journal_and_a_gone_response_is_sent_whole(
        sessions: str, fake_server: FakeProviderServer, shop_db: Path, sdk: openai.AsyncOpenAI,
        made: Callable[[AgentConfig, str], LLMBaseModel]) -> None:
    """The response id rides in the journal's messages, so a run resumed anywhere (another
    worker, a new model object) continues the chain; when OpenAI no longer holds it (deleted
    here, as expiry does), the 400 previous_response_not_found is answered by sending the
    conversation whole, encrypted reasoning included — not by failing, nor by a retry."""
    config = agent_config(fake_server, shop_db, pro={"model": "o3-pro", "store": True})
    model = made(config, "pro")
    model.retry_policy = model.retry_policy.__class__(max_attempts=1, base_delay_s=0)
    journal = StoredJournal("resume-chain")  # steps through JSON, as the job store keeps them
    session = model.create_session()
    first, second, answer = sql_exchange()
    fake_server.script.add(first, second, Fault("status", status=503))
    with pytest.raises(TransientModelError):
        await model.generate_with_tools(QUESTION, tools=SQL, session=session, journal=journal)
    turn_two = journal.steps[2].message
    assert anchor(turn_two)["model"] == "o3-pro"

    # resumed on a fresh model object: the unanswered turn continues turn 2's response
    fake_server.clear_requests()
    fake_server.script.add(answer)
    resumed = made(config, "pro")
    result = await resumed.generate_with_tools(QUESTION, tools=SQL, session=session, journal=journal)
    assert result["content"] == ANSWER and result["turns_used"] == 3
    [sent] = [r.body for r in responses(fake_server)]
    assert sent["previous_response_id"] == anchor(turn_two)["id"]
    assert kinds(sent) == ["function_call_output"] and sent["input"][0]["call_id"] == "call_2"

    # the same resume once OpenAI has dropped that response: one refused request, then the whole conversation
    journal.steps = journal.steps[:4]
    await sdk.responses.delete(anchor(turn_two)["id"])
    fake_server.clear_requests()
    fake_server.script.add(answer)
    result = await resumed.generate_with_tools(QUESTION, tools=SQL, journal=journal)
    assert result["content"] == ANSWER
    refused, whole = (r.body for r in responses(fake_server))
    assert refused["previous_response_id"] == anchor(turn_two)["id"]
    assert "previous_response_id" not in whole
    assert kinds(whole) == ["user", "reasoning", "assistant", "function_call", "function_call_output",
                            "function_call", "function_call_output"]
    assert decrypt(reasoning_items(whole)[0]["encrypted_content"])["reasoning"] == REASONING

    # the session's next question continues the first resumed run's final answer
    fake_server.clear_requests()
    fake_server.script.add(Reply(text="Thirty in all."))
    followup = await resumed.generate_with_tools("And in total?", session=session)
    assert followup["content"] == "Thirty in all."
    [body] = [r.body for r in responses(fake_server)]
    final = [m for m in session.get_messages() if m.role == "assistant"][-2]
    assert final.content == ANSWER and body["previous_response_id"] == anchor(final)["id"]
    assert body["input"] == [{"role": "user", "content": "And in total?"}]


def test_a_conversation_changed_before_the_stored_answer_is_sent_whole() -> None:
    """The chain is used only while the items before the stored answer are the input it
    answered: another system prompt, an edited or cut history, is sent whole."""
    history = to_messages([{"role": "user", "content": "q1"}], "Be brief.")
    answer = ChatMessage(role="assistant", content="a1", reasoning_details=[
        {"type": RESPONSE_DETAIL, "id": "resp_1", "model": "o3-pro", "input": ""}])
    from datus.models.openai_responses import input_digest

    answer.reasoning_details[0]["input"] = input_digest(history, "o3-pro")  # type: ignore[index]
    follow = ChatMessage(role="user", content="q2")

    def params(messages: list[ChatMessage], model: str = "o3-pro") -> dict[str, Any]:
        request = ModelRequest(messages, CallOptions(), None, ())
        return responses_params(request, model, temperature=False, reasoning=True, store=True)

    chained = params([*history, answer, follow])
    assert chained["previous_response_id"] == "resp_1" and chained["input"] == [{"role": "user", "content": "q2"}]
    assert chain_point([*history, answer, follow], "o3-pro") == ("resp_1", 2)
    other_prompt = to_messages([{"role": "user", "content": "q1"}], "Be thorough.")
    for messages in ([*other_prompt, answer, follow], [history[1], answer, follow]):
        whole = params(messages)
        assert "previous_response_id" not in whole and len(whole["input"]) == len(messages)
    assert "previous_response_id" not in params([*history, answer, follow], "gpt-5-pro")  # another model's
    request = ModelRequest([*history, answer, follow], CallOptions(), None, ())
    assert "previous_response_id" not in responses_params(request, "o3-pro", temperature=False, reasoning=True)


# ---------------------------------------------------------------- the fake holds the service's line


async def test_the_fake_refuses_what_the_service_refuses_in_a_chain(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as unknown:
        await sdk.responses.create(model="o3-pro", input="q", previous_response_id="resp_never")
    assert unknown.value.status_code == 400 and unknown.value.code == "previous_response_not_found"
    assert unknown.value.param == "previous_response_id"
    assert "Previous response with id 'resp_never' not found." in unknown.value.message  # openai 1.x: the whole body

    first = await sdk.responses.create(model="o3-pro", input="q", store=True)
    chained = await sdk.responses.create(model="o3-pro", input="again", store=True, previous_response_id=first.id)
    assert chained.previous_response_id == first.id

    with pytest.raises(openai.BadRequestError, match="No tool call found for function call output with call_id c9"):
        await sdk.responses.create(model="o3-pro", previous_response_id=first.id, store=True,
                                   input=[{"type": "function_call_output", "call_id": "c9", "output": "x"}])
    with pytest.raises(openai.BadRequestError, match="Item with id 'rs_unknown' not found"):
        await sdk.responses.create(model="o3-pro", store=True, input=[
            {"role": "user", "content": "q"}, {"type": "reasoning", "id": "rs_unknown", "summary": []},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}])


async def test_a_reasoning_item_sent_again_on_top_of_its_chain_is_a_duplicate(
        fake_server: FakeProviderServer, sdk: openai.AsyncOpenAI) -> None:
    fake_server.script.add(Reply(text="a", reasoning="thought"), Reply(text="b"), Reply(text="c"))
    first = await sdk.responses.create(model="o3-pro", input="q", store=True, include=["reasoning.encrypted_content"])
    [item] = [item.model_dump(exclude_none=True) for item in first.output if item.type == "reasoning"]
    replayed = {key: item[key] for key in ("type", "id", "summary", "encrypted_content")}
    with pytest.raises(openai.BadRequestError, match=f"Duplicate item found with id {item['id']}"):
        await sdk.responses.create(model="o3-pro", store=True, previous_response_id=first.id,
                                   input=[replayed, {"role": "assistant", "content": "a"},
                                          {"role": "user", "content": "q2"}])
    # stored: the item may be named by its id alone, without the chain
    named = await sdk.responses.create(model="o3-pro", store=True, input=[
        {"role": "user", "content": "q"}, {"type": "reasoning", "id": item["id"], "summary": []},
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}])
    assert named.output_text == "b"
