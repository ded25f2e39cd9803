"""A model on OpenAI's Responses API through the job system: a real ``dq worker`` (pinned to the
openai queue) runs a streamed generate job and a tool-run job for ``o3-pro`` — a model that
answers only on ``/v1/responses`` — against the fake server over HTTP; the tool run's second
and third turns carry the first turn's encrypted reasoning item (the fake refuses anything
else). And a tool-run job retried after its second turn failed resumes from the job store's
checkpoints, replaying that item."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus.testing.protocols.openai_responses import decrypt
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, generations, recorded_events, tool_run_skip_reason
from tests.tasks.test_jobs_e2e import assert_one_gapless_stream

PRO = "openai-pro"


@pytest.fixture
def pro_env(job_env: JobEnv) -> JobEnv:
    """The test's agent.yml with ``openai-pro`` (o3-pro: no ``api:`` key, chosen by its name) —
    written before the client and the worker read it."""
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["models"][PRO] = {**config["agent"]["models"]["openai"], "model": "o3-pro"}
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return job_env


@pytest.mark.skipif(bool(tool_run_skip_reason()), reason=str(tool_run_skip_reason()))
def test_generate_and_tool_run_jobs_on_the_responses_api(pro_env: JobEnv, worker: StartWorker, client: JobClient,
                                                         fake: FakeProviderServer) -> None:
    running = worker("openai")
    fake.script.add(Reply(text="SELECT count(*) FROM orders", reasoning="orders it is", input_tokens=20,
                          output_tokens=8, cached_tokens=5, reasoning_tokens=3), match="gen-pro")
    streamed = client.submit({"model": PRO, "prompt": "gen-pro: how many orders?"})
    result = client.result(streamed, timeout=30)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert (result.output, result.provider, result.model) == ("SELECT count(*) FROM orders", "openai", PRO)
    usage: dict[str, Any] = result.usage or {}
    assert (usage["input_tokens"], usage["output_tokens"], usage["cached_tokens"], usage["reasoning_tokens"]) == (
        20, 8, 5, 3)
    assert usage["cost_usd"] == pytest.approx((20 * 20 + 8 * 80) / 1e6)
    steps = list(client.stream(streamed, timeout=30))
    deltas = [step for step in steps if step.action_type == "assistant_delta"]
    assert len(deltas) >= 2 and "".join(step.output["text"] for step in deltas) == result.output
    assert steps[-1].action_type == "final_response"
    assert_one_gapless_stream(recorded_events(client, streamed))
    [request] = generations(fake, "gen-pro")
    assert request.path == "/v1/responses" and request.body["stream"] is True and request.body["store"] is False

    query = "SELECT count(*) AS n FROM orders"
    fake.script.add(Reply(reasoning="look at the tables first", tool_calls=[ScriptedToolCall("list_tables", {})]),
                    Reply(tool_calls=[ScriptedToolCall("read_query", {"query": query})]),
                    Reply(text="There are 5 orders."), match="tool-pro")
    job = client.submit({"model": PRO, "kind": "tool_run", "mcp_servers": ["shop"],
                         "prompt": "tool-pro: how many orders are there?"})
    outcome = client.result(job, timeout=60)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.output == "There are 5 orders."
    assert [context["sql_query"] for context in outcome.sql_contexts] == [query]
    turns = generations(fake, "tool-pro")
    assert len(turns) == 3 and all(turn.path == "/v1/responses" for turn in turns)
    for later in turns[1:]:
        [item] = [item for item in later.body["input"] if item.get("type") == "reasoning"]
        assert decrypt(item["encrypted_content"]) == {"model": "o3-pro", "reasoning": "look at the tables first"}
    assert "row_count" in json.dumps(turns[2].body)
    assert f"[{job}] received" in running.log()


@pytest.mark.skipif(bool(tool_run_skip_reason()), reason=str(tool_run_skip_reason()))
def test_a_job_retry_resumes_from_its_checkpoints_replaying_the_reasoning_item(
        pro_env: JobEnv, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    """Five 500s on the second turn outlast the model's four in-process retries: the job is
    retried, and the run resumes from the job store's checkpoints — turn 1 (with its encrypted
    reasoning item) is not asked again, and every turn-2 request, before and after the retry,
    carries that item intact."""
    fake.script.add(Reply(reasoning="tables first", tool_calls=[ScriptedToolCall("list_tables", {}, id="c1")]),
                    *[Fault("status", status=500)] * 5, Reply(text="Two tables."), match="resume-pro")
    worker("openai")
    job = client.submit({"model": PRO, "kind": "tool_run", "mcp_servers": ["shop"],
                         "prompt": "resume-pro: which tables?"})
    result = client.result(job, timeout=60)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.attempts == 2 and result.output == "Two tables."
    turns = generations(fake, "resume-pro")
    first = [t for t in turns if not any(i.get("type") == "function_call_output" for i in t.body["input"])]
    later = [t for t in turns if t not in first]
    assert len(first) == 1 and len(later) == 6  # turn 1 once; turn 2: five 500s, then the answer
    for turn in later:
        [item] = [item for item in turn.body["input"] if item.get("type") == "reasoning"]
        assert decrypt(item["encrypted_content"]) == {"model": "o3-pro", "reasoning": "tables first"}
    steps = [event.step for event in recorded_events(client, job)]
    assert [s["action_type"] for s in steps if s["role"] == "workflow"] == ["retry", "resumed"]
