"""``previous_response_id`` and a hosted tool through the job system: a real ``dq worker`` runs a
tool-run job for ``o3-pro`` with ``store: true`` and OpenAI's web search; its second turn fails
past the in-process retries, so the job is retried and resumes from the job store's
checkpoints. The resumed turn continues turn 1's stored response — the id came back from the
job store, not from the worker's memory — sending only the tool's output, and the search OpenAI
ran is a TOOL step of the job."""

from __future__ import annotations

import pytest
import yaml

from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, recorded_events, tool_run_skip_reason

PRO = "openai-pro-stored"


@pytest.fixture
def stored_env(job_env: JobEnv) -> JobEnv:
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["models"][PRO] = {**config["agent"]["models"]["openai"], "model": "o3-pro", "store": True,
                                      "hosted_tools": [{"type": "web_search"}]}
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return job_env


@pytest.mark.skipif(bool(tool_run_skip_reason()), reason=str(tool_run_skip_reason()))
def test_a_retried_job_continues_the_stored_response_from_its_checkpoints(
        stored_env: JobEnv, worker: StartWorker, client: JobClient, fake: FakeProviderServer) -> None:
    fake.script.add(Reply(reasoning="tables first", tool_calls=[
                        ScriptedToolCall("web_search", {"query": "shop schema"}),
                        ScriptedToolCall("list_tables", {}, id="c1")]),
                    *[Fault("status", status=500)] * 5, Reply(text="Two tables."), match="chain-pro")
    worker("openai")
    job = client.submit({"model": PRO, "kind": "tool_run", "mcp_servers": ["shop"],
                         "prompt": "chain-pro: which tables?"})
    result = client.result(job, timeout=60)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.attempts == 2 and result.output == "Two tables."

    turns = [r.body for r in fake.requests if r.path == "/v1/responses"]
    first, later = turns[0], turns[1:]
    assert "previous_response_id" not in first and {"type": "web_search"} in first["tools"]
    assert len(later) == 6  # turn 2: five 500s over two attempts, then the answer
    anchors = {body["previous_response_id"] for body in later}
    assert len(anchors) == 1  # the same stored response before and after the retry
    for body in later:
        assert body["store"] is True and {"type": "web_search"} in body["tools"]
        assert body["input"] == [{"type": "function_call_output", "call_id": "c1", "output": body["input"][0]["output"]}]

    steps = [event.step for event in recorded_events(client, job)]
    searches = [s for s in steps if s["role"] == "tool" and s["action_type"] == "web_search"]
    assert searches and all(s["input"]["hosted"] is True for s in searches)
    assert searches[0]["input"]["arguments"] == {"type": "search", "query": "shop schema"}
    assert len({s["action_id"] for s in searches}) == 1  # replayed on resume under the same id
    assert [s["action_type"] for s in steps if s["role"] == "workflow"] == ["retry", "resumed"]
