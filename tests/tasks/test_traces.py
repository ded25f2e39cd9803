"""Traces of jobs, end to end: a real ``dq worker`` on real Redis and the fake provider over
HTTP, exporting to local stand-ins for LangSmith and an OTLP collector (tests/fakes/trace_servers.py).

- LangSmith: the posted run tree of a generate job and of a tool run (parents, names, run
  types, token usage); hidden inputs send no prompt; the API key is in no body and no log.
- OpenTelemetry: the job span, ``chat`` spans with GenAI attributes and usage, tool spans; a
  caller's span around ``JobClient.submit`` is the job span's parent, in the same trace.
- Off by default: nothing reaches either server and the message has no traceparent.
- Bad settings are one warning at start; an unreachable backend does not fail a job.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from datus.models.config import AgentConfig
from datus.models.scripted import Fault, Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.schemas import JobStatus
from tests.fakes.trace_servers import FakeLangSmith, OtlpReceiver
from tests.tasks.conftest import KNOWN_KEY, JobEnv, StartWorker, free_port, tool_run_skip_reason, wait_for

LS_KEY = "lsv2_pt_dq-test-SECRET-7f3a9c0e1b2d"  # the fake LangSmith key: no body or log may hold it
CALLER = "caller-span"
needs_tools = pytest.mark.skipif(tool_run_skip_reason() is not None, reason=str(tool_run_skip_reason()))


@pytest.fixture
def langsmith() -> Iterator[FakeLangSmith]:
    with FakeLangSmith() as server:
        yield server


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


def langsmith_env(server: FakeLangSmith, **extra: str) -> dict[str, str]:
    return {"LANGSMITH_TRACING": "true", "LANGSMITH_API_KEY": LS_KEY, "LANGSMITH_ENDPOINT": server.url,
            "LANGSMITH_PROJECT": "dq-traces-test", **extra}


def otel_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    # the batch processor exports every 100 ms instead of 5 s
    return {"DQ_OTEL_TRACING": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "dq-traces-test-worker", "OTEL_BSP_SCHEDULE_DELAY": "100", **extra}


def make_client(job_env: JobEnv, **settings: Any) -> Any:
    from datus_queue.tasks.app import create_app
    from datus_queue.tasks.client import JobClient

    app = create_app(job_env.settings(**settings))
    client = JobClient(settings=job_env.settings(**settings), agent_config=AgentConfig.from_file(job_env.agent_yml),
                       app=app)
    return client


def close_client(client: Any) -> None:
    client.close()
    client.store.close()
    client.app.close()


def script_tool_run(fake: FakeProviderServer, marker: str) -> None:
    def mine(request: ScriptedRequest) -> bool:
        return marker in json.dumps(request.body)

    fake.script.add(Reply(tool_calls=[ScriptedToolCall("list_tables", {}, id="call-tables")], input_tokens=30,
                          output_tokens=6),
                    Reply(text="There are two tables.", input_tokens=55, output_tokens=7), match=mine)


def ended_tree(server: FakeLangSmith, job_id: str, runs_expected: int) -> dict[str, Any] | None:
    """The job's run tree once every run of it has ended: {"root": run, "children": [...]}."""
    runs = server.runs()
    roots = [run for run in runs.values()
             if not run.get("parent_run_id") and _metadata(run).get("job_id") == job_id]
    if len(roots) != 1 or not roots[0].get("end_time"):
        return None
    root = roots[0]
    tree = [run for run in runs.values() if str(run.get("trace_id")) == str(root["id"])]
    if len(tree) != runs_expected or not all(run.get("end_time") for run in tree):
        return None
    children = sorted((run for run in tree if run is not root), key=lambda run: run["dotted_order"])
    return {"root": root, "children": children}


def _metadata(run: dict[str, Any]) -> dict[str, Any]:
    return (run.get("extra") or {}).get("metadata") or {}


# ---- LangSmith ------------------------------------------------------------------------------------


@needs_tools
def test_langsmith_gets_a_run_tree_per_job(job_env: JobEnv, worker: StartWorker, client: Any,
                                           fake: FakeProviderServer, langsmith: FakeLangSmith) -> None:
    running = worker("openai", env=langsmith_env(langsmith))
    fake.script.add(Reply(text="SELECT 1", input_tokens=12, output_tokens=4), match="trace a generate job")
    script_tool_run(fake, "trace a tool run")
    generate = client.submit({"model": "openai", "prompt": "trace a generate job", "stream": False})
    tool_run = client.submit({"model": "openai", "kind": "tool_run", "mcp_servers": ["shop"],
                              "prompt": "trace a tool run: which tables?"})
    assert client.result(generate, timeout=60).status is JobStatus.SUCCEEDED
    assert client.result(tool_run, timeout=90).status is JobStatus.SUCCEEDED

    tree = wait_for(lambda: ended_tree(langsmith, generate, 2), 30, "the generate job's run tree")
    root, (llm,) = tree["root"], tree["children"]
    assert (root["name"], root["run_type"], root["session_name"]) == ("dq.generate", "chain", "dq-traces-test")
    assert root["inputs"] == {"prompt": "trace a generate job"}
    assert root["outputs"] == {"status": "succeeded", "output": "SELECT 1"}
    assert _metadata(root) | {"job_id": generate, "provider": "openai", "kind": "generate", "run": 1} == \
        _metadata(root)
    assert (llm["name"], llm["run_type"], str(llm["parent_run_id"])) == ("chat gpt-4o-mini", "llm", str(root["id"]))
    assert llm["inputs"]["messages"] == [{"role": "user", "content": "trace a generate job"}]
    assert llm["outputs"]["message"] == {"role": "assistant", "content": "SELECT 1"}
    assert llm["outputs"]["finish_reason"] == "stop"
    usage = _metadata(llm)["usage_metadata"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (12, 4, 16)
    assert _metadata(llm)["ls_provider"] == "openai" and _metadata(llm)["ls_model_name"] == "gpt-4o-mini"

    tree = wait_for(lambda: ended_tree(langsmith, tool_run, 4), 30, "the tool run's run tree")
    root, children = tree["root"], tree["children"]
    assert (root["name"], root["run_type"]) == ("dq.tool_run", "chain")
    assert root["outputs"]["output"] == "There are two tables."
    assert [(run["name"], run["run_type"]) for run in children] == [
        ("chat gpt-4o-mini", "llm"), ("list_tables", "tool"), ("chat gpt-4o-mini", "llm")]
    assert {str(run["parent_run_id"]) for run in children} == {str(root["id"])}
    tool = children[1]
    assert tool["inputs"] == {"arguments": {}} and "customers" in tool["outputs"]["output"]
    assert _metadata(tool)["server"] == "shop" and _metadata(tool)["tool_call_id"] == "call-tables"
    assert [_metadata(run)["usage_metadata"]["output_tokens"] for run in (children[0], children[2])] == [6, 7]
    assert children[0]["outputs"]["message"]["tool_calls"][0]["name"] == "list_tables"

    bodies = langsmith.bodies()
    for secret in (LS_KEY.encode(), KNOWN_KEY.encode()):
        assert not any(secret in body for body in bodies), "an API key in a body sent to LangSmith"
    assert {item.headers.get("x-api-key") for item in langsmith.received if item.method == "POST"} == {LS_KEY}
    assert LS_KEY not in running.log()
    assert "LangSmith tracing on: project dq-traces-test" in running.log()


def test_langsmith_hide_inputs_sends_no_prompt(job_env: JobEnv, worker: StartWorker, client: Any,
                                               fake: FakeProviderServer, langsmith: FakeLangSmith) -> None:
    worker("openai", env=langsmith_env(langsmith, LANGSMITH_HIDE_INPUTS="true"))
    prompt = "a private question about invoice 4471-XQ"
    fake.script.add(Reply(text="noted", input_tokens=9, output_tokens=1), match="invoice 4471-XQ")
    job_id = client.submit({"model": "openai", "prompt": prompt, "instruction": "be brief 9931-ZZ", "stream": False})
    assert client.result(job_id, timeout=60).status is JobStatus.SUCCEEDED
    tree = wait_for(lambda: ended_tree(langsmith, job_id, 2), 30, "the job's run tree")
    assert tree["root"]["inputs"] == {} and tree["children"][0]["inputs"] == {}
    assert tree["children"][0]["outputs"]["message"]["content"] == "noted"  # outputs are not hidden
    assert _metadata(tree["children"][0])["usage_metadata"]["input_tokens"] == 9
    for body in langsmith.bodies():
        assert b"4471-XQ" not in body and b"9931-ZZ" not in body


# ---- OpenTelemetry ----------------------------------------------------------------------------------


@pytest.fixture
def caller_tracer(otlp: OtlpReceiver) -> Iterator[Any]:
    """The submitting process's own tracer, exporting to the same receiver."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "dq-traces-test-caller"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp.url}/v1/traces")))
    yield provider.get_tracer("test")
    provider.shutdown()


@needs_tools
def test_otel_spans_continue_the_callers_trace(job_env: JobEnv, worker: StartWorker, fake: FakeProviderServer,
                                               otlp: OtlpReceiver, caller_tracer: Any) -> None:
    worker("openai", env=otel_env(otlp))
    client = make_client(job_env, otel_tracing=True)
    try:
        fake.script.add(Reply(text="SELECT 2", input_tokens=21, output_tokens=5), match="otel generate")
        fake.script.add(Fault(kind="status", status=500), Reply(text="second time lucky"), match="otel retried")
        script_tool_run(fake, "otel tool run")
        with caller_tracer.start_as_current_span(CALLER) as caller:
            generate = client.submit({"model": "openai", "prompt": "otel generate", "stream": False})
            retried = client.submit({"model": "openai", "prompt": "otel retried", "stream": False})
            tool_run = client.submit({"model": "openai", "kind": "tool_run", "mcp_servers": ["shop"],
                                      "prompt": "otel tool run: which tables?"})
        assert client.result(generate, timeout=60).status is JobStatus.SUCCEEDED
        assert client.result(retried, timeout=60).attempts == 2
        assert client.result(tool_run, timeout=90).status is JobStatus.SUCCEEDED
    finally:
        close_client(client)
    trace_id, caller_id = f"{caller.get_span_context().trace_id:032x}", f"{caller.get_span_context().span_id:016x}"

    def job_spans() -> dict[str, Any] | None:
        spans = otlp.spans()
        runs = [span for span in spans if span["name"].startswith("dq.")]
        jobs = {span["attributes"]["dq.job.id"]: span for span in runs if span["attributes"]["dq.job.id"] != retried}
        retries = sorted((span for span in runs if span["attributes"]["dq.job.id"] == retried),
                         key=lambda span: span["attributes"]["dq.job.run"])
        if set(jobs) != {generate, tool_run} or len(retries) != 2:
            return None
        children = [span for span in spans if span["parent_span_id"] in {job["span_id"] for job in jobs.values()}]
        return {"spans": spans, "jobs": jobs, "children": children, "retries": retries} \
            if len(children) == 4 else None

    found = wait_for(job_spans, 30, "the jobs' spans and their children")
    spans, jobs = found["spans"], found["jobs"]
    assert [span["name"] for span in spans if span["name"] == CALLER] == [CALLER]
    for job_id, task in ((generate, "dq.generate"), (tool_run, "dq.tool_run")):
        job = jobs[job_id]
        assert job["name"] == task
        assert (job["trace_id"], job["parent_span_id"]) == (trace_id, caller_id), "the caller's span is the parent"
        assert job["attributes"]["dq.job.status"] == "succeeded" and job["attributes"]["dq.job.run"] == 1
        assert job["resource"]["service.name"] == "dq-traces-test-worker"
    # the retry message carried the trace context on: both attempts are the caller's children
    first, second = found["retries"]
    assert [(span["trace_id"], span["parent_span_id"]) for span in (first, second)] == [(trace_id, caller_id)] * 2
    assert [span["attributes"]["dq.job.status"] for span in (first, second)] == ["retrying", "succeeded"]
    assert first["attributes"]["error.type"] == "model_server_error" and first["status"] == 2  # STATUS_CODE_ERROR

    def under(job_id: str) -> list[dict[str, Any]]:
        return [span for span in found["children"] if span["parent_span_id"] == jobs[job_id]["span_id"]]

    (chat,) = under(generate)
    assert chat["name"] == "chat gpt-4o-mini" and chat["trace_id"] == trace_id
    attributes = chat["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.system"] == attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (21, 5)
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]

    names = sorted(span["name"] for span in under(tool_run))
    assert names == ["chat gpt-4o-mini", "chat gpt-4o-mini", "execute_tool list_tables"]
    tool = next(span for span in under(tool_run) if span["name"].startswith("execute_tool"))
    assert tool["attributes"]["gen_ai.tool.name"] == "list_tables"
    assert tool["attributes"]["gen_ai.tool.call.id"] == "call-tables"
    chats = [span for span in under(tool_run) if span["name"].startswith("chat")]
    assert sorted(span["attributes"]["gen_ai.usage.output_tokens"] for span in chats) == [6, 7]
    assert sorted(span["attributes"]["gen_ai.response.finish_reasons"][0] for span in chats) == ["stop", "tool_calls"]
    # message content is opt-in (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT): no prompt in any span
    assert not any("otel generate" in json.dumps(span["attributes"]) for span in spans)


# ---- off by default, bad settings -----------------------------------------------------------------


def queued_headers(dq_redis: Any, queue: str = "llm.openai") -> list[dict[str, Any]]:
    """The headers of the messages waiting in a queue (kombu's Redis transport: JSON per message)."""
    return [json.loads(raw)["headers"] for raw in dq_redis.lrange(queue, 0, -1)]


def test_off_by_default_nothing_is_sent_and_no_header_added(job_env: JobEnv, worker: StartWorker, client: Any,
                                                           dq_redis: Any, fake: FakeProviderServer,
                                                           langsmith: FakeLangSmith, otlp: OtlpReceiver,
                                                           caller_tracer: Any) -> None:
    with caller_tracer.start_as_current_span(CALLER):  # a caller with a trace, and a client with tracing off
        job_id = client.submit({"model": "openai", "prompt": "untraced job", "stream": False})
    (headers,) = queued_headers(dq_redis)
    assert headers["id"] == job_id and "traceparent" not in headers and "tracestate" not in headers
    # everything a backend would need but the switches: nothing may be sent
    running = worker("openai", env={"LANGSMITH_API_KEY": LS_KEY, "LANGSMITH_ENDPOINT": langsmith.url,
                                    "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    assert client.result(job_id, timeout=60).status is JobStatus.SUCCEEDED
    wait_for(lambda: [span for span in otlp.spans() if span["name"] == CALLER], 10, "the caller's own span")
    running.stop()  # a worker's shutdown flushes what its exporters hold: nothing
    assert langsmith.received == []
    assert [span["name"] for span in otlp.spans()] == [CALLER]
    assert "tracing on" not in running.log()


def test_a_client_with_otel_on_puts_the_traceparent_in_the_message(job_env: JobEnv, dq_redis: Any,
                                                                   caller_tracer: Any) -> None:
    client = make_client(job_env, otel_tracing=True)
    try:
        with caller_tracer.start_as_current_span(CALLER) as caller:
            client.submit({"model": "openai", "prompt": "traced job, queued", "stream": False})
        client.submit({"model": "openai", "prompt": "no span around this one", "stream": False})
    finally:
        close_client(client)
    traced, untraced = sorted(queued_headers(dq_redis), key=lambda headers: "traceparent" not in headers)
    context = caller.get_span_context()
    assert traced["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    assert "traceparent" not in untraced
    assert all(base64.b64decode(raw).find(b"traceparent") < 0  # the trace context is a header, not in the body
               for raw in (json.loads(item)["body"] for item in dq_redis.lrange("llm.openai", 0, -1)))


def test_bad_trace_settings_are_one_warning_and_jobs_still_run(job_env: JobEnv, worker: StartWorker, client: Any,
                                                               fake: FakeProviderServer) -> None:
    running = worker("openai", env={"LANGSMITH_TRACING": "true", "DQ_OTEL_TRACING": "true",
                                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318/v1/traces"})
    log = running.log()
    assert log.count("LANGSMITH_TRACING=true but LANGSMITH_API_KEY is not set") == 1
    assert log.count("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is not an http(s) URL") == 1
    job_id = client.submit({"model": "openai", "prompt": "runs untraced", "stream": False})
    assert client.result(job_id, timeout=60).status is JobStatus.SUCCEEDED
    assert running.log().count("LANGSMITH_API_KEY is not set") == 1, "one warning, not one per job"


def test_unreachable_trace_backends_do_not_fail_jobs(job_env: JobEnv, worker: StartWorker, client: Any,
                                                     fake: FakeProviderServer) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    worker("openai", env={"LANGSMITH_TRACING": "true", "LANGSMITH_API_KEY": LS_KEY, "LANGSMITH_ENDPOINT": nowhere,
                          "DQ_OTEL_TRACING": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": nowhere})
    jobs = [client.submit({"model": "openai", "prompt": f"backend down {n}", "stream": False}) for n in range(5)]
    assert [client.result(job_id, timeout=60).status for job_id in jobs] == [JobStatus.SUCCEEDED] * 5


# ---- the settings, one function at a time -------------------------------------------------------------


def test_trace_settings_checks(caplog: pytest.LogCaptureFixture) -> None:
    from datus_queue.tasks.observability import traces
    from datus_queue.tasks.settings import Settings

    assert traces._langsmith({}) is None and traces._otel(Settings(), {}) is None  # off unless asked
    assert traces._langsmith({"LANGSMITH_TRACING": "true", "LANGSMITH_API_KEY": LS_KEY,
                              "LANGSMITH_ENDPOINT": "http//oops"}) is None
    assert "LANGSMITH_ENDPOINT is not an http(s) URL" in caplog.text
    assert traces._otel(Settings(otel_tracing=True), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://host:43x8"}) is None
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is a URL whose port is not a number" in caplog.text
    assert LS_KEY not in caplog.text
    assert traces.carried_headers({"traceparent": "00-ab-cd-01", "id": "x", "dq_infra_retries": 1}) == {
        "traceparent": "00-ab-cd-01"}
