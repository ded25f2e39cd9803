"""Every output is bounded (issue 19), in the job system: an event over ``DQ_MAX_EVENT_BYTES``
is published with its long fields cut and marked ``truncated`` (never dropped, never raising),
a checkpoint row over ``DQ_MAX_CHECKPOINT_BYTES`` is stored cut the same way while keeping the
tool result the model read whole, and, end to end, a real worker running a tool that answers
5 MB: the model gets the capped text, the checkpoint rows and the events stay bounded, the run
finishes, and the turn asked again after a job retry (resumed from the checkpoints) carries the
same truncated text."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import yaml

from datus.models.output_bounds import json_bytes
from datus.models.run_journal import RunStep
from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks import keys
from datus_queue.tasks.checkpoints import StoreJournal, bounded_row
from datus_queue.tasks.events import AsyncEventPublisher, EventPublisher, read_events
from datus_queue.tasks.schemas import JobStatus
from datus_queue.tasks.settings import get_settings
from tests.tasks.conftest import JobEnv, StartWorker, generations, recorded_events

FAKES = Path(__file__).resolve().parents[1] / "fakes"
BIG = 5_000_000
EVENT_CAP = 262_144  # DQ_MAX_EVENT_BYTES' default


@pytest.fixture
def job() -> str:
    return f"test-bounds-{uuid.uuid4().hex}"


def huge_tool_step() -> ActionHistory:
    step = ActionHistory.create_action(ActionRole.TOOL, "read_query", "Tool call: read_query('...')",
                                       {"function_name": "read_query", "arguments": {"query": "SELECT 1"}},
                                       {"success": True, "raw_output": "r" * BIG, "summary": "rrr"},
                                       ActionStatus.SUCCESS)
    return step


def stream_entries(r: redis.Redis, job: str) -> list[bytes]:
    return [fields[b"event"] for _, fields in r.xrange(keys.job_events(job))]


def test_a_big_event_is_published_bounded_and_marked(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=300, maxlen=100)
    assert publisher.max_bytes == EVENT_CAP  # the setting's default
    pubsub = r.pubsub()
    pubsub.subscribe(keys.job_channel(job))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    big = huge_tool_step()
    event = publisher.publish(job, big)
    publisher.publish(job, {"action_id": "x", "action_type": "user_input", "messages": "ü" * BIG,
                            "input": {"prompt": "ü" * BIG}, "output": None}, terminal=True, status="succeeded")

    entries = stream_entries(r, job)
    live = []
    while (message := pubsub.get_message(timeout=5)) is not None and len(live) < 2:
        if message["type"] == "message":
            live.append(message["data"])
    pubsub.close()
    assert live == entries and len(entries) == 2  # the same bounded JSON in the stream and on the channel
    assert all(len(entry) <= EVENT_CAP for entry in entries)
    first, second = read_events(r, job)
    assert first.seq == event.seq == 1 and first.step == event.step
    assert first.step["truncated"] is True and first.step["output"]["truncated"] is True
    raw = first.step["output"]["raw_output"]
    assert raw.startswith("rrrr") and f"of {BIG} characters]" in raw
    assert first.step["input"] == big.input  # short fields are kept as they were
    step = ActionHistory.model_validate(first.step)  # still a step a client reads
    assert step.action_id == big.action_id and step.output["truncated"] is True
    assert second.terminal and second.status is JobStatus.SUCCEEDED and second.step["truncated"] is True
    assert second.step["messages"].startswith("üüü")


def test_ordinary_events_and_deltas_go_out_as_they_are(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=300, maxlen=100, max_bytes=4096)
    delta = ActionHistory(action_id="a", role=ActionRole.ASSISTANT, action_type="assistant_delta", messages="Hel",
                          output={"kind": "text", "text": "Hel", "reasoning": None}, status=ActionStatus.PROCESSING)
    step = ActionHistory.create_action(ActionRole.ASSISTANT, "message", "x" * 3000, None, {"success": True})
    publisher.publish(job, delta)
    publisher.publish(job, step)
    first, second = read_events(r, job)
    assert first.step == delta.model_dump(mode="json") and second.step == step.model_dump(mode="json")
    assert "truncated" not in first.step and "truncated" not in second.step


def test_an_event_of_any_shape_is_bounded_and_never_raises(r: redis.Redis, job: str) -> None:
    publisher = EventPublisher(r, ttl_s=300, maxlen=100, max_bytes=8192)
    shapes: list[dict[str, Any]] = [
        {"action_id": "keys", "output": {f"k{i}": i for i in range(200_000)}},
        {"action_id": "many", **{f"field{i}": "v" * 100 for i in range(5000)}},
        {"action_id": "deep", "output": [[[["d" * 50_000]]]] * 100},
        {"action_id": "list", "output": list(range(1_000_000))},
    ]
    for shape in shapes:
        publisher.publish(job, shape)
    events = read_events(r, job)
    assert [event.step.get("action_id") for event in events] == ["keys", "many", "deep", "list"]
    assert all(event.step["truncated"] is True for event in events)
    assert all(len(entry) <= 8192 for entry in stream_entries(r, job))


async def test_the_async_publisher_bounds_its_events_too(ar: redis.asyncio.Redis, r: redis.Redis, job: str) -> None:
    publisher = AsyncEventPublisher(ar, ttl_s=300, maxlen=100, max_bytes=65_536)
    events = await asyncio.gather(*(publisher.publish(job, huge_tool_step()) for _ in range(3)))
    assert sorted(event.seq for event in events) == [1, 2, 3]
    assert all(len(entry) <= 65_536 for entry in stream_entries(r, job))
    assert all(event.step["output"]["truncated"] for event in read_events(r, job))


def tool_row(content: str, raw: Any) -> dict[str, Any]:
    action = huge_tool_step().model_dump(mode="json")
    action["output"]["raw_output"] = raw
    step = RunStep(kind="tool", turn=1, call=0, action=action,
                   message={"role": "tool", "tool_call_id": "c", "name": "read_query", "content": content})
    return step.model_dump(mode="json", exclude_defaults=True)


def test_a_checkpoint_row_is_bounded_and_keeps_the_result_the_model_read() -> None:
    read = "m" * 60_000 + "\n[truncated: 60000 of 5000000 characters; narrow the query]"
    row = bounded_row(tool_row(read, {"rows": [["x" * 100]] * 50_000}), 131_072)
    assert json_bytes(row) <= 131_072
    assert row["message"]["content"] == read  # what the model read, whole: a resume replays it
    assert row["action"]["output"]["truncated"] is True
    replayed = RunStep.model_validate(row)  # still a row the journal loads
    assert ActionHistory.model_validate(replayed.action).action_type == "read_query"

    small = tool_row("ok", "ok")
    assert bounded_row(small, 131_072) == small  # a row under the cap is stored as it is
    # the conversation a run began with is not counted (submit bounds it), and never cut
    start = {"messages": [{"role": "user", "content": "p" * 500_000}], "session_messages": 0}
    turn = RunStep(kind="turn", turn=1, message={"role": "assistant", "content": "a" * 300_000},
                   start=start).model_dump(mode="json", exclude_defaults=True)
    bounded = bounded_row(turn, 131_072)
    assert bounded["start"] == turn["start"] and "[truncated:" in bounded["message"]["content"]
    assert json_bytes({k: v for k, v in bounded.items() if k != "start"}) <= 131_072
    RunStep.model_validate(bounded)


def test_the_journal_caps_tool_results_to_fit_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        journal = StoreJournal(None, "job", 1, False)  # type: ignore[arg-type]
        assert (journal.max_bytes, journal.max_tool_result_chars) == (1_048_576, 65_536)  # the defaults
        monkeypatch.setenv("DQ_MAX_CHECKPOINT_BYTES", "262144")
        get_settings.cache_clear()
        assert StoreJournal(None, "job", 1, False).max_tool_result_chars == 16_384  # type: ignore[arg-type]
        monkeypatch.setenv("DQ_MAX_TOOL_RESULT_CHARS", "1000")
        get_settings.cache_clear()
        assert StoreJournal(None, "job", 1, False).max_tool_result_chars == 1000  # type: ignore[arg-type]
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------- end to end: a real worker


@pytest.fixture
def tools_server(job_env: JobEnv) -> None:
    """agent.yml gets a ``tools`` server: the fake MCP server with its ``blob`` tool."""
    config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
    config["agent"]["mcp_servers"]["tools"] = {"command": sys.executable, "args": [str(FAKES / "mcp_tool_server.py")]}
    job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def tool_results(request: Any) -> list[str]:
    return [message["content"] for message in request.body["messages"] if message.get("role") == "tool"]


@pytest.mark.slow
def test_a_5mb_tool_answer_in_a_job_is_bounded_everywhere_and_replayed_the_same_after_a_retry(
        tools_server: None, worker: StartWorker, client: Any, fake: FakeProviderServer) -> None:
    cap = 20_000  # DQ_MAX_TOOL_RESULT_CHARS for the fleet, below the model config's 65,536
    tag = f"bounds-{uuid.uuid4().hex[:8]}"
    marker = f"\n[truncated: {cap} of {BIG} characters; narrow the query]"
    # turn 2 fails more often than the model's own retries allow: the job is retried, and its
    # new delivery resumes from the checkpoints (the tool is not called again)
    fake.script.add(Reply(text="Fetching it.", tool_calls=[ScriptedToolCall("blob", {"size": BIG}, id="call-big")]),
                    *[Fault("status", status=500)] * 5, Reply(text=f"done {tag}"), match=tag)
    worker("openai", env={"DQ_MAX_TOOL_RESULT_CHARS": str(cap)})
    prompt = f"please {tag} " + "p" * 600_000  # a big prompt: its user_input event is over the event cap
    job_id = client.submit({"model": "openai", "kind": "tool_run", "prompt": prompt, "mcp_servers": ["tools"]})
    result = client.result(job_id, timeout=90)

    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.output == f"done {tag}" and result.attempts == 2  # finished, after one job retry
    # the model read the capped text, the same on every request of turn 2, before and after the retry
    turn_two = [tool_results(request) for request in generations(fake, tag) if tool_results(request)]
    assert len(turn_two) == 6  # five 500s (the first delivery's and its retries), then the resumed one
    assert all(results == ["x" * cap + marker] for results in turn_two)

    # the checkpoint rows: bounded, and the tool row holds what the model read
    rows = client.store.checkpoints(job_id)
    assert all(json_bytes({k: v for k, v in row.items() if k != "start"}) <= 1_048_576 for row in rows)
    [tool] = [row for row in rows if row["kind"] == "tool"]
    assert tool["message"]["content"] == "x" * cap + marker
    assert tool["action"]["output"]["truncated"] is True and tool["action"]["output"]["original_chars"] == BIG
    assert len(json.dumps(tool)) < 3 * cap

    # the events: each within the cap, the tool step and the big prompt marked
    events = recorded_events(client, job_id)
    entries = [fields[b"event"] for _, fields in client.redis.xrange(keys.job_events(job_id))]
    assert entries and all(len(entry) <= EVENT_CAP for entry in entries)
    steps = [event.step for event in events if event.step["action_type"] != "assistant_delta"]
    [user] = [step for step in steps if step["action_type"] == "user_input"]
    assert user["truncated"] is True and user["messages"].startswith(f"please {tag}")
    [tool_step] = [step for step in steps if step["action_type"] == "blob" and step["status"] == "success"]
    assert tool_step["output"]["truncated"] is True and tool_step["output"]["raw_output"] == "x" * cap + marker
    assert "truncated" not in tool_step  # the step was under the event cap: published as it was
    assert steps[-1]["action_type"] == "final_response" and events[-1].terminal
