"""The caller's own tools run in the caller (issue 20, second part): a queue model's ``tools=``
(Python functions, openai-agents ``FunctionTool``s) are declared to the job (``caller_tools``),
offered to the model by the worker, and each call is handed back to the caller — the job holding
no worker slot while it waits — which runs the tool and sends the answer back
(`JobClient.send_tool_result`); the run resumes from its journal. Real ``dq worker`` processes,
Redis and the fake provider server scripting the tool calls."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus.models.errors import ModelTimeoutError
from datus.models.scripted import Reply, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks import keys
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.schemas import JobRequest, JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, _environment, generations, wait_for


@pytest.fixture
def caller(job_env: JobEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentConfig]:
    """The caller's side: the fleet's DQ_ settings and an agent.yml whose model is a queue model."""
    for name, value in {"DQ_REDIS_URL": job_env.redis_url, "DQ_DATABASE_URL": job_env.database_url,
                        "DQ_CONFIG": str(job_env.agent_yml),
                        "DQ_SESSION_URL": f"sqlite:///{tmp_path / 'sessions.db'}"}.items():
        monkeypatch.setenv(name, value)
    yield AgentConfig.from_dict({"agent": {"target": "fleet", "models": {"fleet": {"type": "queue",
                                                                                   "model": "openai"}}}})


def local(job_env: JobEnv) -> LLMBaseModel:
    return LLMBaseModel.create_model(AgentConfig.from_file(job_env.agent_yml), "openai")


def tool_messages(fake: FakeProviderServer, tag: str) -> list[dict[str, Any]]:
    """The tool results the model was sent in the last request of a run tagged ``tag``."""
    requests = generations(fake, tag)
    assert requests, f"no request of {tag}"
    return [m for m in requests[-1].body["messages"] if m.get("role") == "tool"]


def turn_one_requests(fake: FakeProviderServer, tag: str) -> int:
    return sum(1 for r in generations(fake, tag) if not any(m.get("role") == "tool" for m in r.body["messages"]))


def shape(steps: list[Any]) -> list[tuple[Any, ...]]:
    return [(s.role, s.action_type, s.status, s.messages, json.dumps((s.output or {}).get("raw_output"), default=str),
             (s.output or {}).get("success")) for s in steps]


def test_a_caller_tool_that_returns_and_one_that_raises_are_the_in_process_runs(
        job_env: JobEnv, caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer,
        client: JobClient) -> None:
    worker("openai")
    ran: Counter[str] = Counter()

    def lookup(key: str) -> dict[str, Any]:
        """Look a key up in the caller's own data."""
        ran["lookup"] += 1
        return {"key": key, "value": f"value of {key}"}

    async def broken(reason: str) -> str:
        """A tool that fails."""
        ran["broken"] += 1
        raise ValueError(f"cannot: {reason}")

    def script(tag: str) -> None:
        fake.script.add(Reply(text="Let me look.", tool_calls=[ScriptedToolCall("lookup", {"key": "k1"}, id="c1"),
                                                               ScriptedToolCall("broken", {"reason": "no"}, id="c2")],
                              input_tokens=30, output_tokens=5),
                        Reply(text="k1 is value of k1.", input_tokens=40, output_tokens=6), match=tag)

    queued, inproc = LLMBaseModel.create_model(caller, "fleet"), local(job_env)

    async def run(model: LLMBaseModel, tag: str) -> list[Any]:
        script(tag)
        return [step async for step in model.generate_with_tools_stream(f"{tag}: what is k1?",
                                                                        tools=[lookup, broken])]

    local_steps = asyncio.run(run(inproc, "cq-local"))
    queue_steps = asyncio.run(run(queued, "cq-queue"))
    assert shape(local_steps) == shape(queue_steps)
    assert [s.action_type for s in queue_steps] == ["message", "lookup", "broken", "final_response"]
    assert queue_steps[-1].output["content"] == "k1 is value of k1."
    assert ran == Counter(lookup=2, broken=2)  # once per run, in-process and queued
    # the model read the same tool results either way: the value, and the error as a tool result
    local_tools, queue_tools = tool_messages(fake, "cq-local"), tool_messages(fake, "cq-queue")
    assert [m["content"] for m in local_tools] == [m["content"] for m in queue_tools]
    assert json.loads(queue_tools[0]["content"]) == {"key": "k1", "value": "value of k1"}
    assert queue_tools[1]["content"] == "ValueError: cannot: no"
    assert queue_steps[2].output["success"] is False and "resumed" not in queue_steps[1].output
    assert turn_one_requests(fake, "cq-queue") == 1  # the first turn was not asked again on resume

    job_id = queued.recent_jobs[-1]
    result = client.get(job_id)
    assert result.status is JobStatus.SUCCEEDED
    # handing the job back to wait for the caller is not an attempt: the run counts as one, as uninterrupted
    assert result.attempts == 1
    requests = [step for step in client.stream(job_id) if step.action_type == "caller_tool_request"]
    # the turn's two calls went to the caller together: one request, one hand-back, its own count
    assert len(requests) == 1 and [call["name"] for call in requests[0].output["calls"]] == ["lookup", "broken"]
    assert (result.caller_waits, result.rate_limit_waits) == (1, 0)


def test_a_slow_caller_tool_holds_no_worker_slot(
        job_env: JobEnv, caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer,
        client: JobClient) -> None:
    worker("openai", concurrency=1)  # one slot: a job that held it while waiting would block the second
    started, release = threading.Event(), threading.Event()

    def slow(seconds: int) -> str:
        """A tool that takes its time."""
        started.set()
        assert release.wait(60), "never released"
        return "slow answer"

    fake.script.add(Reply(tool_calls=[ScriptedToolCall("slow", {"seconds": 30}, id="s1")]), Reply(text="slow done"),
                    match="cq-slow")
    fake.script.add(Reply(text="second answer"), match="cq-second")
    queued = LLMBaseModel.create_model(caller, "fleet")
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = asyncio.run(queued.generate_with_tools("cq-slow: go", tools=[slow]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert started.wait(30), "the caller's tool never started"
        first = queued.recent_jobs[-1]
        assert client.get(first).status is JobStatus.RETRYING  # waiting, in no worker's hands
        second = client.submit({"model": "openai", "prompt": "cq-second: hello", "stream": False})
        done = client.result(second, timeout=20)  # runs on the one slot while the first waits
        assert done.status is JobStatus.SUCCEEDED and done.output == "second answer"
        assert not client.get(first).final
    finally:
        release.set()
        thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["content"] == "slow done"


def test_a_huge_caller_tool_answer_is_bounded_like_any_tool_result(
        caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer, client: JobClient) -> None:
    worker("openai")

    def dump() -> str:
        """Everything."""
        return "x" * 300_000

    fake.script.add(Reply(tool_calls=[ScriptedToolCall("dump", {}, id="d1")]), Reply(text="too much"),
                    match="cq-huge")
    queued = LLMBaseModel.create_model(caller, "fleet")
    steps = asyncio.run(collect(queued.generate_with_tools_stream("cq-huge: all of it", tools=[dump])))
    sent = tool_messages(fake, "cq-huge")[0]["content"]
    assert len(sent) < 70_000 and "[truncated: 65536 of 300000 characters" in sent
    step = next(s for s in steps if s.action_type == "dump")
    assert step.output["truncated"] is True and len(json.dumps(step.output)) < 150_000
    stored = client.redis.hgetall(keys.job_caller(queued.recent_jobs[-1]))
    assert all(len(value) < 70_000 for value in stored.values())  # the answer was cut before it was stored


def test_a_caller_tool_past_its_bound_fails_the_job_while_the_caller_lives(
        job_env: JobEnv, caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer,
        client: JobClient) -> None:
    # DQ_CALLER_TOOL_TIMEOUT_S shortened from its 300 s default so the test waits seconds, not
    # minutes: it bounds one tool's run while the caller is alive (beating all along here)
    worker("openai", env={"DQ_CALLER_TOOL_TIMEOUT_S": "2"})
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("lookup", {"key": "k"}, id="g1")]), Reply(text="never"),
                    match="cq-bound")
    ran: Counter[str] = Counter()

    def lookup(key: str) -> str:
        """A lookup that outlives the bound: it returns once the job has failed."""
        ran[key] += 1
        wait_for(lambda: client.get(queued.recent_jobs[-1]).final, 60, "the job to give up on the tool")
        return "too late"

    queued = LLMBaseModel.create_model(caller, "fleet")
    with pytest.raises(ModelTimeoutError) as raised:
        asyncio.run(queued.generate_with_tools("cq-bound: go", tools=[lookup]))
    assert raised.value.details["job_error_code"] == "caller_tool_timeout"
    result = client.get(queued.recent_jobs[-1])
    assert result.status is JobStatus.FAILED and result.error is not None
    assert result.error.code == "caller_tool_timeout" and "DQ_CALLER_TOOL_TIMEOUT_S" in result.error.message
    assert ran == Counter(k=1) and len(generations(fake, "cq-bound")) == 1  # no second turn
    # the caller beat all along: while it lives, only the tool's own bound ends the wait
    assert client.redis.hget(keys.job_caller(result.job_id), "beat") is not None


def test_a_live_callers_tool_may_outlast_the_liveness_window(
        caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer, client: JobClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # DQ_CALLER_LIVENESS_S shortened from 30 s (worker and caller alike) so the tool outlives
    # several windows in seconds: the job comes back each window, finds the caller beating, and
    # waits on without asking again
    monkeypatch.setenv("DQ_CALLER_LIVENESS_S", "2")
    worker("openai", env={"DQ_CALLER_LIVENESS_S": "2"})
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("audit", {"table": "orders"}, id="l1")]),
                    Reply(text="audited"), match="cq-long")
    ran: Counter[str] = Counter()

    def audit(table: str) -> str:
        """A long audit of a table of the caller's."""
        ran[table] += 1
        # the job came back to look, found the caller alive, and was handed back again, twice
        wait_for(lambda: client.get(queued.recent_jobs[-1]).caller_waits >= 3, 60, "the job to look again")
        return "clean"

    queued = LLMBaseModel.create_model(caller, "fleet")
    result = asyncio.run(queued.generate_with_tools("cq-long: audit orders", tools=[audit]))
    assert result["content"] == "audited" and ran == Counter(orders=1)
    job_id = queued.recent_jobs[-1]
    assert [step.action_type for step in client.stream(job_id)].count("caller_tool_request") == 1
    assert turn_one_requests(fake, "cq-long") == 1 and client.get(job_id).attempts == 1


CALLER_SCRIPT = """
import asyncio, time
from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig

config = AgentConfig.from_dict({"agent": {"models": {"fleet": {"type": "queue", "model": "openai"}}}})
model = LLMBaseModel.create_model(config, "fleet")

def inventory(sku: str) -> str:
    \"\"\"Count the stock of a SKU in the caller's own warehouse (slow).\"\"\"
    print(model.recent_jobs[-1], flush=True)  # the tool runs: the test may kill this caller now
    time.sleep(3600)
    return "never"

asyncio.run(model.generate_with_tools("cq-dies: how many?", tools=[inventory]))
"""


def test_a_caller_killed_mid_wait_fails_the_job_caller_gone_with_default_settings(
        job_env: JobEnv, worker: StartWorker, fake: FakeProviderServer, client: JobClient) -> None:
    """Every setting at its default: the caller's heartbeat, not the 300 s tool bound, is what
    notices it died."""
    worker("openai")
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("inventory", {"sku": "A-1"}, id="i1")]),
                    Reply(text="never"), match="cq-dies")
    env = {**os.environ, "DQ_REDIS_URL": job_env.redis_url, "DQ_DATABASE_URL": job_env.database_url,
           "DQ_CONFIG": str(job_env.agent_yml)}
    env = {name: value for name, value in env.items() if not name.startswith("DQ_CALLER")}
    process = subprocess.Popen([sys.executable, "-c", CALLER_SCRIPT], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.strip(), f"the caller's tool never ran: {process.stderr.read() if process.stderr else ''}"
        job_id = line.strip()
        assert client.get(job_id).status is JobStatus.RETRYING  # waiting for the caller, in no worker's hands
    finally:
        process.kill()  # SIGKILL: no cancel, no goodbye; its heartbeat just stops
        process.communicate(timeout=30)
    result = client.result(job_id, timeout=120)
    assert result.status is JobStatus.FAILED and result.error is not None
    assert result.error.code == "caller_gone", result.error
    assert "no heartbeat" in result.error.message and "DQ_CALLER_LIVENESS_S=30" in result.error.message
    assert len(generations(fake, "cq-dies")) == 1  # the model was not asked again
    assert result.attempts == 1 and result.caller_waits >= 1


def test_a_turns_caller_calls_go_to_the_caller_in_one_round_trip_and_each_runs_once(
        job_env: JobEnv, caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer, client: JobClient) -> None:
    worker("openai")
    together = threading.Barrier(3, timeout=30)  # passes only if the three calls run at the same time
    ran: Counter[str] = Counter()

    def make(name: str) -> Any:
        def tool(key: str) -> str:
            together.wait()
            ran[name] += 1
            return f"{name}:{key}"
        tool.__name__, tool.__doc__ = name, f"Look {name} up."
        return tool

    # caller, MCP (the fleet's shop server), caller, caller: all in one model turn
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("alpha", {"key": "1"}, id="m1"),
                                      ScriptedToolCall("list_tables", {}, id="m2"),
                                      ScriptedToolCall("beta", {"key": "2"}, id="m3"),
                                      ScriptedToolCall("gamma", {"key": "3"}, id="m4")]),
                    Reply(text="all four"), match="cq-many")
    queued = LLMBaseModel.create_model(caller, "fleet")
    result = asyncio.run(queued.generate_with_tools("cq-many: go", mcp_servers=["shop"],
                                                    tools=[make("alpha"), make("beta"), make("gamma")]))
    assert result["content"] == "all four"
    assert ran == Counter(alpha=1, beta=1, gamma=1)  # concurrently (the barrier), once each
    answers = [m["content"] for m in tool_messages(fake, "cq-many")]
    assert answers[0] == "alpha:1" and answers[2:] == ["beta:2", "gamma:3"] and "orders" in answers[1]
    assert turn_one_requests(fake, "cq-many") == 1
    job_id = queued.recent_jobs[-1]
    requests = [step for step in client.stream(job_id) if step.action_type == "caller_tool_request"]
    assert len(requests) == 1
    calls = requests[0].output["calls"]
    assert [call["name"] for call in calls] == ["alpha", "beta", "gamma"] and len({c["call_id"] for c in calls}) == 3
    done = client.get(job_id)
    assert (done.status, done.attempts, done.caller_waits) == (JobStatus.SUCCEEDED, 1, 1)  # one re-send
    # dq status shows the wait under its own name, not as an attempt or a rate-limit wait
    shown = subprocess.run([*dq_command(), "status", job_id], env=_environment(job_env, None), cwd=job_env.dir,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "attempts=1" in shown and "caller_waits=1" in shown and "rate_limit" not in shown, shown


def test_a_caller_wait_ends_at_the_jobs_deadline(
        worker: StartWorker, fake: FakeProviderServer, client: JobClient) -> None:
    worker("openai")
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("lookup", {"key": "k"}, id="d1")]), Reply(text="never"),
                    match="cq-deadline")
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    job_id = client.submit({"model": "openai", "kind": "tool_run", "prompt": "cq-deadline: go",
                            "deadline": deadline.isoformat(), "caller_tools": [{"name": "lookup"}]})
    stop = threading.Event()

    def alive() -> None:  # a live caller that never answers: neither liveness nor the tool bound ends the wait
        while not stop.wait(0.5):
            client.caller_heartbeat(job_id)

    client.caller_heartbeat(job_id)
    beating = threading.Thread(target=alive, daemon=True)
    beating.start()
    try:
        result = client.result(job_id, timeout=60)
    finally:
        stop.set()
        beating.join(5)
    assert result.status is JobStatus.FAILED and result.error is not None
    assert result.error.code == "deadline_exceeded" and "waited for the caller" in result.error.message
    assert "caller_tool_request" in [step.action_type for step in client.stream(job_id)]
    assert len(generations(fake, "cq-deadline")) == 1


def test_a_worker_killed_while_the_callers_tool_runs_the_tool_runs_once_and_the_job_finishes(
        caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer, client: JobClient) -> None:
    first_worker = worker("openai")
    started, release = threading.Event(), threading.Event()
    ran: Counter[str] = Counter()

    def count(table: str) -> int:
        """Rows in a table of the caller's database."""
        ran[table] += 1
        started.set()
        assert release.wait(60), "never released"
        return 42

    fake.script.add(Reply(tool_calls=[ScriptedToolCall("count", {"table": "orders"}, id="k1")]),
                    Reply(text="42 orders"), match="cq-kill")
    queued = LLMBaseModel.create_model(caller, "fleet")
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = asyncio.run(queued.generate_with_tools("cq-kill: how many orders?", tools=[count]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert started.wait(30), "the caller's tool never started"
        first_worker.kill()  # SIGKILL while the caller's tool runs
        worker("openai")  # the fleet goes on with another worker
    finally:
        release.set()
        thread.join(90)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["content"] == "42 orders"
    assert ran == Counter(orders=1)  # the tool ran once
    assert turn_one_requests(fake, "cq-kill") == 1
    assert client.get(queued.recent_jobs[-1]).status is JobStatus.SUCCEEDED


def test_two_callers_with_same_named_tools_each_get_their_own(
        caller: AgentConfig, worker: StartWorker, fake: FakeProviderServer) -> None:
    worker("openai")
    calls: list[str] = []

    def make(answer: str) -> Any:
        def lookup(key: str) -> str:
            """Look a key up."""
            calls.append(answer)
            time.sleep(0.3)  # both callers' tools run at the same time
            return f"{answer}:{key}"
        return lookup

    for tag in ("cq-alpha", "cq-beta"):  # the same call id in both jobs
        fake.script.add(Reply(tool_calls=[ScriptedToolCall("lookup", {"key": "k"}, id="same")]),
                        Reply(text=f"done {tag}"), match=tag)
    one, two = LLMBaseModel.create_model(caller, "fleet"), LLMBaseModel.create_model(caller, "fleet")

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(one.generate_with_tools("cq-alpha: go", tools=[make("alpha")]),
                                         two.generate_with_tools("cq-beta: go", tools=[make("beta")])))

    results = asyncio.run(both())
    assert [r["content"] for r in results] == ["done cq-alpha", "done cq-beta"]
    assert sorted(calls) == ["alpha", "beta"]
    assert tool_messages(fake, "cq-alpha")[0]["content"] == "alpha:k"
    assert tool_messages(fake, "cq-beta")[0]["content"] == "beta:k"


def test_caller_tools_are_bounded_and_refused_at_submit_when_malformed(client: JobClient) -> None:
    base = {"model": "openai", "kind": "tool_run", "prompt": "hi"}
    for tools, why in [([{"name": "has space"}], "caller_tools.0.name"),
                       ([{"name": "f", "parameters": {"type": "string"}}], "type 'object'"),
                       ([{"name": "f"}, {"name": "f"}], "a name of its own"),
                       ([{"name": "f", "command": "rm -rf /"}], "caller_tools.0.command"),
                       ([{"name": f"t{i}"} for i in range(65)], "caller_tools"),
                       ([{"name": "f", "description": "d" * 10_001}], "caller_tools.0.description"),
                       ([{"name": "f", "parameters": {"type": "object", "x": "y" * 100_001}}], "at most 100000 bytes")]:
        with pytest.raises(InvalidJob, match="invalid job request") as refused:
            client.submit({**base, "caller_tools": tools})
        assert why in str(refused.value), (why, str(refused.value))
    with pytest.raises(InvalidJob, match="only apply to kind 'tool_run'"):
        client.submit({"model": "openai", "prompt": "hi", "caller_tools": [{"name": "f"}]})
    # a job without caller tools is stored as before: no new field in its request
    assert "caller_tools" not in JobRequest(model="openai", prompt="hi").model_dump(mode="json")


async def collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


def test_a_caller_that_answers_twice_is_stored_once(client: JobClient) -> None:
    job_id = client.submit({"model": "openai", "kind": "tool_run", "prompt": "cq-twice: go",
                            "caller_tools": [{"name": "f"}]})  # no worker: it stays queued
    assert client.send_tool_result(job_id, "call-1", "first") is True
    assert client.send_tool_result(job_id, "call-1", "second") is False
    stored = client.redis.hget(keys.job_caller(job_id), "result:call-1")
    assert json.loads(stored)["text"] == "first"
    wait_for(lambda: client.redis.ttl(keys.job_caller(job_id)) > 0, 2, "an expiry on the caller hash")


def test_a_string_raw_unlike_the_text_is_kept_for_the_steps_raw_output() -> None:
    """`bounded_result`: an MCP tool run in the caller (a server object's) answers the model
    with its text and the step with openai-agents' content item as JSON text (its ``raw``): that
    string is kept, cut like the text; a raw equal to the text adds nothing."""
    from datus_queue.tasks.caller_tools import bounded_result

    item = json.dumps({"type": "text", "text": "city,n"})
    assert bounded_result("city,n", False, item, None) == {"text": "city,n", "is_error": False, "raw": item}
    assert bounded_result("plain", False, "plain", None) == {"text": "plain", "is_error": False}
    cut = bounded_result("x" * 50, False, "y" * 60, 10)
    assert (cut["text"], cut["raw"], cut["original_chars"]) == ("x" * 10, "y" * 10, 50)


def test_a_caller_tools_step_is_made_as_in_process() -> None:
    """The worker marks a caller tool's step ``server: "caller"``; the queue model hands it out
    as the in-process loop makes it: a function's step names no server, an MCP server object's
    names the object and its tool's own name."""
    from datus.models.function_tools import as_tools
    from datus.models.queue_tool_runs import _as_in_process
    from datus.schemas.action_history import ActionHistory, ActionRole

    class MCPLike:  # a server object's tool as `datus.models.agents_mcp.AgentsMCPTool` has it
        def __init__(self) -> None:
            self.meta = {"server": "fs", "tool": "read"}

    def lookup(key: str) -> str:
        return key

    tools = {"lookup": as_tools([lookup])[0], "fs__read": MCPLike()}
    steps = {name: ActionHistory.create_action(ActionRole.TOOL, name, "", {
        "function_name": name, "tool": name, "server": "caller", "arguments": {}, "call_id": "c1"}) for name in tools}
    for step in steps.values():
        _as_in_process(step, tools)
    assert (steps["lookup"].input["server"], steps["lookup"].input["tool"]) == (None, "lookup")
    assert (steps["fs__read"].input["server"], steps["fs__read"].input["tool"]) == ("fs", "read")
    fleet = ActionHistory.create_action(ActionRole.TOOL, "list_tables", "", {"server": "shop", "tool": "list_tables"})
    _as_in_process(fleet, tools)
    assert fleet.input["server"] == "shop"
