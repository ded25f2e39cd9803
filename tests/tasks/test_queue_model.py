"""A model that runs on the fleet (issue 20): an agent.yml entry ``{type: queue, model: NAME}``
makes `create_model` return a `QueueModel` whose every call is a job run by real ``dq worker``
processes against the fake provider server. Each method is compared with the in-process model
of the same name on the same fake: the same return values, the same steps, the same errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus.models.errors import AuthenticationError, BadRequestError, ModelConfigError
from datus.models.generation import Generation, StreamDelta
from datus.models.scripted import Fault, Reply, ScriptedToolCall
from datus.models.usage import track_usage
from datus.schemas.action_history import ActionHistoryManager
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks import keys
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import KNOWN_KEY, JobEnv, StartWorker, generations, tool_run_skip_reason, wait_for

ANSWER_SCHEMA = {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]}


class Answer(BaseModel):
    sql: str


@pytest.fixture
def sessions_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sessions.db'}"


@pytest.fixture
def caller(job_env: JobEnv, sessions_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentConfig]:
    """The caller's side: the usual DQ_ settings (the fleet's Redis, store and agent.yml), the
    shared session store, no provider key, and an agent.yml whose models are queue models."""
    for name, value in {"DQ_REDIS_URL": job_env.redis_url, "DQ_DATABASE_URL": job_env.database_url,
                        "DQ_CONFIG": str(job_env.agent_yml), "DQ_SESSION_URL": sessions_url}.items():
        monkeypatch.setenv(name, value)
    yield AgentConfig.from_dict({"agent": {"target": "fleet", "models": {
        "fleet": {"type": "queue", "model": "openai"},
        "fleet-badkey": {"type": "queue", "model": "openai-badkey"},
        "fleet-gemini": {"type": "queue", "model": "gemini"},
    }}})


@pytest.fixture
def fleet(worker: StartWorker, sessions_url: str) -> None:
    worker("openai", "gemini", env={"DQ_SESSION_URL": sessions_url})


def local(job_env: JobEnv, name: str = "openai") -> LLMBaseModel:
    """The in-process model the fleet serves under ``name``."""
    return LLMBaseModel.create_model(AgentConfig.from_file(job_env.agent_yml), name)


def same_usage(a: dict[str, Any] | Any, b: dict[str, Any] | Any) -> None:
    a = a if isinstance(a, dict) else a.model_dump()
    b = b if isinstance(b, dict) else b.model_dump()
    for key in ("input_tokens", "output_tokens", "total_tokens", "cost_usd", "provider", "model", "requests"):
        if key in a or key in b:
            assert a.get(key) == b.get(key), (key, a, b)


def test_create_model_returns_a_queue_model_without_the_job_system_imported_and_without_a_key(
        caller: AgentConfig) -> None:
    from datus.models.queue_model import QueueModel

    model = LLMBaseModel.create_model(caller, "fleet")
    assert isinstance(model, QueueModel) and model.REQUIRES_API_KEY is False
    # the served model's name, tokenizer and window, read from the fleet's agent.yml
    assert (model.provider, model.model_name) == ("openai", "gpt-4o-mini")
    assert model.token_count("how many orders are there?") == local_token_count(caller)
    assert model.context_length() == 128_000
    assert LLMBaseModel.create_model(caller, "queue:openai").model_name == "gpt-4o-mini"  # provider:model strings too
    with pytest.raises(ModelConfigError, match="no model of that name"):
        asyncio.run(LLMBaseModel.create_model(caller, "queue:nope").agenerate("hi"))

    # datus.models imports, and a queue model is made, without Celery, Redis or the job store
    code = ("import sys; from datus.models.base import LLMBaseModel; "
            "m = LLMBaseModel.create_model(None, 'queue:openai:gpt-4o-mini'); m.token_count('x'); "
            "print(sorted(n for n in ('celery', 'redis', 'datus_queue.tasks.client', 'datus_queue.tasks.store') "
            "if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_queue_models_config_is_the_served_model_the_workers_publish(
        job_env: JobEnv, worker: StartWorker, fake: FakeProviderServer, client: JobClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Datus reads ``model_config.model`` and ``.type`` as the provider's; a caller without the
    fleet's agent.yml learns them from the catalogue the workers publish in Redis."""
    for name, value in {"DQ_REDIS_URL": job_env.redis_url, "DQ_DATABASE_URL": job_env.database_url}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DQ_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no conf/agent.yml here either
    config = AgentConfig.from_dict({"agent": {"models": {"sql": {"type": "queue", "model": "deepseek",
                                                                 "temperature": 0.2}}}})
    unpublished = LLMBaseModel.create_model(config, "sql")
    assert unpublished.model_config.model == "deepseek"  # no worker has published: the fleet's name is all it has

    worker("deepseek")  # publishes every model of the fleet's agent.yml as it starts
    model = LLMBaseModel.create_model(config, "sql")
    assert (model.model_config.type, model.model_config.model) == ("deepseek", "deepseek-chat")
    assert (model.provider, model.model_name) == ("deepseek", "deepseek-chat")
    assert model.model_config.temperature == 0.2 and model.model_config.api_key is None  # its own setting, no key
    assert model.model_config.base_url == fake.openai_base_url
    assert (model.entry.type, model.entry.model) == ("queue", "deepseek")
    catalogue = client.redis.hgetall(keys.model_catalog())
    assert {b"openai", b"deepseek", b"gemini"} <= set(catalogue)
    assert all(b"api_key" not in value and KNOWN_KEY.encode() not in value for value in catalogue.values())
    # the name known from the catalogue alone, its calls run on the fleet
    fake.script.add(Reply(text="catalogued"), match="q-catalogue")
    assert model.generate("q-catalogue: hi") == "catalogued"
    # a Redis that lost the catalogue (restarted without persistence) has it back within an interval
    # (DQ_SWEEP_INTERVAL_S, 10 s by default; the worker runs on the defaults): the wait guards only
    client.redis.delete(keys.model_catalog())
    wait_for(lambda: b"deepseek" in client.redis.hgetall(keys.model_catalog()), 30, "the catalogue to be written again")


def test_the_catalogue_shows_no_credentials() -> None:
    from datus.models.config import ModelConfig
    from datus_queue.tasks.catalog import entry_of

    plain = entry_of(ModelConfig(type="openai", model="gpt-4o", api_key="sk-x", base_url="https://api.example/v1"))
    assert plain.base_url == "https://api.example/v1" and "sk-x" not in plain.model_dump_json()
    for url in ("https://user:pw@api.example/v1", "https://api.example/v1?key=sk-x", "https://tok@api.example/v1"):
        assert entry_of(ModelConfig(type="openai", model="gpt-4o", base_url=url)).base_url is None, url


def local_token_count(caller: AgentConfig) -> int:
    from datus.models.tokens import count_tokens

    return int(count_tokens("how many orders are there?", "openai", "gpt-4o-mini"))


def test_generate_json_and_stream_are_the_in_process_models(job_env: JobEnv, caller: AgentConfig, fleet: None,
                                                            fake: FakeProviderServer) -> None:
    queued, inproc = LLMBaseModel.create_model(caller, "fleet"), local(job_env)
    fake.script.add(Reply(text="SELECT count(*) FROM orders", input_tokens=20, output_tokens=8), match="q-gen",
                    times=2)
    fake.script.add(Reply(text=json.dumps({"sql": "SELECT 1"}), input_tokens=12, output_tokens=5), match="q-json",
                    times=4)
    fake.script.add(Reply(text="streamed answer in a few words", input_tokens=9, output_tokens=6), match="q-stream",
                    times=2)

    answers, usages = [], []
    for model in (inproc, queued):
        with track_usage() as calls:
            answers.append(model.generate("q-gen: how many orders?", temperature=0.1))
        usages.append(calls)
    assert answers[0] == answers[1] == "SELECT count(*) FROM orders"
    assert len(usages[1]) == 1 and usages[1][0].input_tokens == 20 and usages[1][0].output_tokens == 8
    same_usage(usages[0][0], usages[1][0])

    for response_format in (ANSWER_SCHEMA, Answer):
        got = [model.generate_with_json_output("q-json: one query", response_format) for model in (inproc, queued)]
        assert got[0] == got[1] == {"sql": "SELECT 1"}

    async def stream(model: LLMBaseModel) -> list[Any]:
        return [item async for item in model.astream([{"role": "user", "content": "q-stream: say it"}])]

    local_items, queue_items = asyncio.run(stream(inproc)), asyncio.run(stream(queued))
    deltas = [[item.text for item in items if isinstance(item, StreamDelta)] for items in (local_items, queue_items)]
    assert deltas[0] == deltas[1] and len(deltas[1]) >= 2
    assert isinstance(queue_items[-1], Generation) and queue_items[-1].text == local_items[-1].text
    same_usage(local_items[-1].usage, queue_items[-1].usage)
    # every call was one job, and the fake saw each prompt once per model
    assert len(queued.recent_jobs) == 4
    assert len(generations(fake, "q-gen")) == 2 and len(generations(fake, "q-stream")) == 2


def test_other_served_providers_and_options(caller: AgentConfig, fleet: None, fake: FakeProviderServer) -> None:
    fake.script.add(Reply(text="gemini says hi"), match="q-gemini")
    queued = LLMBaseModel.create_model(caller, "fleet-gemini")
    assert queued.generate("q-gemini: hello", max_tokens=50) == "gemini says hi"
    [request] = generations(fake, "q-gemini")
    assert "gemini-2.5-flash" in request.path and "50" in json.dumps(request.body)  # the option reached the wire
    with pytest.raises(TypeError, match="unknown option"):
        queued.generate("hi", temprature=0.1)


@pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))
def test_tool_runs_are_the_in_process_models_with_sessions_in_the_shared_store(
        job_env: JobEnv, caller: AgentConfig, fleet: None, fake: FakeProviderServer) -> None:
    queued, inproc = LLMBaseModel.create_model(caller, "fleet"), local(job_env)
    query = "SELECT count(*) AS n FROM orders"

    def script() -> None:  # one run's three turns, added again before each run
        fake.script.add(Reply(text="Let me look.", tool_calls=[ScriptedToolCall("list_tables", {})],
                              input_tokens=30, output_tokens=4),
                        Reply(tool_calls=[ScriptedToolCall("read_query", {"query": query})], input_tokens=40,
                              output_tokens=6),
                        Reply(text="There are 5 orders.", input_tokens=50, output_tokens=7), match="q-tools")

    async def run(model: LLMBaseModel) -> dict[str, Any]:
        script()
        return await model.generate_with_tools("q-tools: how many orders?", mcp_servers=["shop"],
                                               instruction="You are a SQL assistant.")

    results = [asyncio.run(run(model)) for model in (inproc, queued)]
    for key in ("content", "turns_used", "model"):
        assert results[0][key] == results[1][key], key
    assert results[1]["content"] == "There are 5 orders." and results[1]["turns_used"] == 3
    assert [c.model_dump() for c in results[0]["sql_contexts"]] == [c.model_dump() for c in results[1]["sql_contexts"]]
    assert type(results[1]["sql_contexts"][0]).__name__ == "SQLContext"
    assert set(results[0]["usage"]) == set(results[1]["usage"])
    same_usage(results[0]["usage"], results[1]["usage"])

    servers = AgentConfig.from_file(job_env.agent_yml).mcp_servers  # a dict keyed by name, as Datus passes it

    async def steps(model: LLMBaseModel, **kwargs: Any) -> tuple[list[Any], ActionHistoryManager]:
        manager = ActionHistoryManager()
        script()
        found = [step async for step in model.generate_with_tools_stream(
            "q-tools: how many orders?", mcp_servers={"shop": servers["shop"]}, instruction="You are a SQL assistant.",
            action_history_manager=manager, **kwargs)]
        return found, manager

    (local_steps, local_manager), (queue_steps, queue_manager) = asyncio.run(steps(inproc)), asyncio.run(steps(queued))

    def shape(items: list[Any]) -> list[tuple[Any, ...]]:
        return [(s.role, s.action_type, s.status, s.messages, json.dumps((s.output or {}).get("raw_output"),
                                                                        default=str)) for s in items]

    assert shape(local_steps) == shape(queue_steps)
    assert [s.action_type for s in queue_steps] == ["message", "list_tables", "read_query", "final_response"]
    final = queue_steps[-1].output
    assert set(final) == set(local_steps[-1].output) and final["content"] == "There are 5 orders."
    same_usage(local_steps[-1].output["usage"], final["usage"])
    assert shape(local_manager.get_actions()) == shape(queue_manager.get_actions())

    # live steps: what the job published, the user's step first
    fake.script.add(Reply(text="Five."), match="q-live")
    live = asyncio.run(collect(queued.generate_with_tools_stream("q-live: count", live_steps=True)))
    assert live[0].action_type == "user_input" and live[-1].action_type == "final_response"

    # a session by id: the worker's run lands in the shared store the caller reads
    fake.script.add(Reply(text="first"), Reply(text="second"), match="q-session")
    session = queued.create_session("q-chat")
    asyncio.run(queued.generate_with_tools("q-session: one", session="q-chat"))
    asyncio.run(queued.generate_with_tools("q-session: two", session=session))
    info = queued.get_session_info("q-chat")
    assert info["exists"] and info["item_count"] == 4, info
    second = generations(fake, "q-session: two")[0]
    assert "q-session: one" in json.dumps(second.body) and "first" in json.dumps(second.body)  # history sent

    # the caller's own Python tools are not run on the fleet (issue 20's second part)
    with pytest.raises(ModelConfigError, match="Python tools"):
        asyncio.run(queued.generate_with_tools("q-x", tools=[lambda: 1]))


async def collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


class HookLog:
    """openai-agents-style hooks recording what a tool run calls (on_llm_* left out: a queue
    model does not call them); ``stop_at``: on_tool_start of that tool raises."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.stop_at = stop_at

    async def on_start(self, context: Any, agent: Any) -> None:
        self.calls.append(("start", agent.name))

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        self.calls.append(("tool_start", tool.name, json.loads(context.tool_arguments), bool(context.tool_call_id)))
        if tool.name == self.stop_at:
            raise RuntimeError(f"the hook stops at {tool.name}")

    def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:  # a plain function works too
        self.calls.append(("tool_end", tool.name, json.dumps(result, sort_keys=True, default=str)))

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        self.calls.append(("end", output, context.usage.total_tokens > 0))


@pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))
def test_hooks_are_called_for_the_fleets_tools_and_the_callers_as_in_process(
        job_env: JobEnv, caller: AgentConfig, fleet: None, fake: FakeProviderServer) -> None:
    """hooks=: on_start, on_tool_start/on_tool_end of the fleet's MCP tools (from the job's
    steps, with the step's raw_output) and of the caller's own tool (around its run here),
    on_end with the answer — the same calls, in the same order, as in-process; a hook that
    raises ends the run with that exception and cancels the job."""
    queued, inproc = LLMBaseModel.create_model(caller, "fleet"), local(job_env)

    def shout(text: str) -> str:
        """Upper-case a text."""
        return text.upper()

    async def run(model: LLMBaseModel, hooks: HookLog, tag: str) -> list[Any]:
        fake.script.add(Reply(text="Let me look.", tool_calls=[ScriptedToolCall("list_tables", {})]),
                        Reply(tool_calls=[ScriptedToolCall("shout", {"text": "five"})]),
                        Reply(text="FIVE orders."), match=tag)
        return [step async for step in model.generate_with_tools_stream(
            f"{tag}: how many orders?", tools=[shout], mcp_servers=["shop"], instruction="SQL.", hooks=hooks,
            agent_name="counter")]

    logs = {}
    for place, model in (("in-process", inproc), ("queue", queued)):
        logs[place] = HookLog()
        asyncio.run(run(model, logs[place], f"q-hooks-{place}"))
    assert logs["queue"].calls == logs["in-process"].calls
    assert [call[:2] for call in logs["queue"].calls] == [
        ("start", "counter"), ("tool_start", "list_tables"), ("tool_end", "list_tables"), ("tool_start", "shout"),
        ("tool_end", "shout"), ("end", "FIVE orders.")]

    stopping = HookLog(stop_at="shout")
    with pytest.raises(RuntimeError, match="the hook stops at shout"):
        asyncio.run(run(queued, stopping, "q-hooks-stop"))
    assert stopping.calls[-1][:2] == ("tool_start", "shout")
    assert queued._job_client().get(queued.recent_jobs[-1]).status is JobStatus.CANCELLED


def test_errors_are_the_same_model_error_subclasses_with_the_same_codes(
        job_env: JobEnv, caller: AgentConfig, fleet: None, fake: FakeProviderServer) -> None:
    raised = []
    for model in (local(job_env, "openai-badkey"), LLMBaseModel.create_model(caller, "fleet-badkey")):
        with pytest.raises(AuthenticationError) as caught:
            model.generate("q-401: who am I?")
        raised.append(caught.value)
    in_process, queued = raised
    assert (queued.code, queued.slug, queued.status_code, queued.retryable) == (
        in_process.code, in_process.slug, in_process.status_code, in_process.retryable) == (
        in_process.error_code, "model_authentication_error", 401, False)
    assert queued.details["job_id"] and queued.details["job_error_code"] == "model_authentication_error"

    # a scripted 400 on a tool run, and an unknown MCP server refused before anything is queued
    fake.script.add(Fault(kind="status", status=400, message="bad tool request"), match="q-400", times=2)
    queue_model = LLMBaseModel.create_model(caller, "fleet")
    for model in (local(job_env), queue_model):
        with pytest.raises(BadRequestError) as bad:
            asyncio.run(model.generate_with_tools("q-400: go", mcp_servers=["shop"]))
        assert bad.value.status_code == 400
    with pytest.raises(ModelConfigError, match="unknown MCP server"):
        asyncio.run(queue_model.generate_with_tools("q-x", mcp_servers=["nope"]))


def test_a_stream_closed_or_a_call_cancelled_by_the_caller_cancels_the_job(
        job_env: JobEnv, caller: AgentConfig, fleet: None, fake: FakeProviderServer, client: JobClient) -> None:
    queued = LLMBaseModel.create_model(caller, "fleet")
    fake.latency_s = 1.5
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("list_tables", {})]), Reply(text="never said"),
                    match="q-close")

    async def close_after_first_step() -> str:
        stream = queued.generate_with_tools_stream("q-close: count", mcp_servers=["shop"], live_steps=True)
        async with contextlib.aclosing(stream):
            first = await anext(stream)
            assert first.action_type == "user_input"
        return queued.recent_jobs[-1]

    job_id = asyncio.run(close_after_first_step())
    result = client.result(job_id, timeout=20)
    assert result.status is JobStatus.CANCELLED and result.output is None
    assert len(generations(fake, "q-close")) <= 1  # stopped at its next step: no tool, no second turn

    async def cancel_a_call() -> str:  # a streamed call: a plain generate job has no step left to stop at
        task = asyncio.create_task(collect(queued.astream("q-cancel: slow")))
        while not generations(fake, "q-cancel"):
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return queued.recent_jobs[-1]

    job_id = asyncio.run(cancel_a_call())
    assert client.result(job_id, timeout=20).status is JobStatus.CANCELLED


def test_a_stream_cut_after_its_first_deltas_raises_as_in_process_and_the_job_is_cancelled(
        job_env: JobEnv, caller: AgentConfig, fleet: None, fake: FakeProviderServer, client: JobClient) -> None:
    queued = LLMBaseModel.create_model(caller, "fleet")
    fake.script.add(Fault(kind="cut_stream", after_chunks=3), match="q-cut", times=2)
    raised = []
    for model in (local(job_env), queued):
        seen: list[Any] = []

        async def consume(model: LLMBaseModel = model, seen: list[Any] = seen) -> None:
            async for item in model.astream("q-cut: tell me a long story about orders"):
                seen.append(item)

        with pytest.raises(Exception) as caught:  # which class: compared below
            asyncio.run(consume())
        assert seen and all(isinstance(item, StreamDelta) for item in seen), "deltas came before the error"
        raised.append(caught.value)
    assert type(raised[0]) is type(raised[1]) and raised[1].retryable, raised
    assert raised[0].code == raised[1].code
    # the job would have streamed its next attempt from the start: it is cancelled instead
    assert client.result(queued.recent_jobs[-1], timeout=10).status is JobStatus.CANCELLED


@pytest.mark.parametrize(("code", "expected"), [
    ("rate_limit_wait_exceeded", "RateLimitError"), ("deadline_exceeded", "ModelTimeoutError"),
    ("infrastructure_error", "ModelConnectionError"), ("model_not_allowed", "ModelConfigError"),
    ("internal_error", "ModelError")])
def test_the_job_systems_own_error_codes_map_to_the_nearest_model_error(code: str, expected: str) -> None:
    model = LLMBaseModel.create_model(None, "queue:openai:gpt-4o-mini")
    error = model._error("job-1", JobStatus.FAILED, {"code": code, "type": "NotAModelError", "message": "why"}, None)
    assert type(error).__name__ == expected and error.reason == "why"
    assert error.details == {"job_id": "job-1", "job_error_code": code}
    # a model's own error comes back as its class, status and code
    stored = {"code": "model_rate_limit", "type": "RateLimitError", "message": "slow down", "status_code": 429,
              "provider": "openai", "retryable": True}
    again = model._error("job-2", JobStatus.FAILED, stored, None)
    assert type(again).__name__ == "RateLimitError" and again.status_code == 429 and again.slug == "model_rate_limit"


@pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))
def test_save_llm_trace_writes_the_callers_traces(job_env: JobEnv, caller: AgentConfig, fleet: None,
                                                  fake: FakeProviderServer, tmp_path: Path) -> None:
    """A queue entry with save_llm_trace writes, in the caller, one JSON trace per call under
    trace_dir (as `datus.models.trace` does in-process): a generate's prompt and answer, a tool
    run's conversation as sent and final answer, and the job that answered."""
    from types import SimpleNamespace

    traces = tmp_path / "traces"
    config = AgentConfig.from_dict({"agent": {"models": {"traced": {
        "type": "queue", "model": "openai", "save_llm_trace": True, "trace_dir": str(traces)}}}})
    model = LLMBaseModel.create_model(config, "traced")
    model.set_context(workflow=SimpleNamespace(global_config=SimpleNamespace(trajectory_dir=str(tmp_path / "runs")),
                                               task=SimpleNamespace(id="t1")),
                      current_node=SimpleNamespace(id="n1"))
    fake.script.add(Reply(text="Forty-two."), match="q-trace-one")
    assert model.generate("q-trace-one: the answer?") == "Forty-two."
    fake.script.add(Reply(tool_calls=[ScriptedToolCall("list_tables", {})]), Reply(text="Tables listed."),
                    match="q-trace-two")
    asyncio.run(model.generate_with_tools("q-trace-two: tables?", mcp_servers=["shop"], instruction="SQL."))
    records = sorted((json.loads(path.read_text()) for path in (traces / "openai").glob("*.json")),
                     key=lambda record: record["text"])
    assert [(r["text"], r["messages"][-1]["content"], r["job_id"] in model.recent_jobs) for r in records] == [
        ("Forty-two.", "q-trace-one: the answer?", True), ("Tables listed.", "q-trace-two: tables?", True)]
    assert records[1]["messages"][0] == {"role": "system", "content": "SQL."} and records[1]["tools"] == []
    node = (tmp_path / "runs" / "t1" / "n1.yml").read_text()  # Datus's trajectory trace: the last call wins
    assert "Tables listed." in node and "q-trace-two: tables?" in node
