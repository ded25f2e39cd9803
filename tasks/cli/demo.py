"""``dq demo``: the whole product on one machine, with nothing set up.

It starts what it needs — a private Redis (unless ``DQ_REDIS_URL`` is set), the wire-level
fake provider server with scripted answers, a worker process — then runs the bundled sample
batch (a small shop database and twenty questions with gold SQL) in both modes, streams the
steps of one tool-run job, prints the summaries and stops everything it started.

With ``--model NAME`` and a real ``DQ_CONFIG`` (keys in the environment) the same flow runs
against that provider instead of the fake one. ``dq demo --quick`` is the in-process tour of
the model layer alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from datus.models.scripted import Reply, ScriptedRequest, ScriptedToolCall
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.batch.sample import build_sample_db, sample_answers, sample_questions_path
from datus_queue.tasks.cli.services import local_redis, worker_process

__all__ = ["SampleModel", "run_demo"]

DEMO_KEY = "sk-demo-not-a-real-key"


class SampleModel:
    """The fake provider's answers for the sample batch: the scripted SQL of the question in
    the prompt, written as a model would; in tool runs it first looks at the tables, then
    runs its query, then answers."""

    def __init__(self) -> None:
        answers = sample_answers()
        questions = [json.loads(line) for line in sample_questions_path().read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        self.sql_by_question = {q["question"]: answers.get(q["id"], {}).get("sql", "") for q in questions}

    def _sql_for(self, request: ScriptedRequest) -> str:
        text = json.dumps(request.messages, ensure_ascii=False)
        for question, sql in self.sql_by_question.items():
            if json.dumps(question, ensure_ascii=False)[1:-1] in text:
                return sql
        return "SELECT 1"

    def __call__(self, request: ScriptedRequest) -> Reply:
        sql = self._sql_for(request)
        answer = f"Here is the query:\n```sql\n{sql}\n```"
        if not request.tools:
            return Reply(text=answer)
        tool_results = sum(1 for m in request.messages if m.get("role") == "tool" or _is_tool_result(m))
        if tool_results == 0:
            return Reply(reasoning="First, which tables are there?", tool_calls=(ScriptedToolCall("list_tables", {}),))
        if tool_results == 1:
            return Reply(text="Let me run the query.", tool_calls=(ScriptedToolCall("read_query", {"query": sql}),))
        return Reply(text=answer)


def _is_tool_result(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "tool_result" for p in content)


@contextlib.contextmanager
def _redis(workdir: Path, console: Console) -> Iterator[str]:
    if os.environ.get("DQ_REDIS_URL"):
        yield os.environ["DQ_REDIS_URL"]
        return
    with local_redis(workdir) as url:
        console.print(f"[dim]started redis-server at {url}[/dim]")
        yield url


def _config(workdir: Path, fake_url: str | None, model: str | None) -> tuple[Path, str]:
    """The demo's agent.yml: the fake-backed model, or the user's own config (DQ_CONFIG) for
    a real provider. Tool runs open the sample database with the shipped SQL tools."""
    if fake_url is not None:
        agent: dict[str, Any] = {"target": "demo", "models": {"demo": {
            "type": "openai", "model": "gpt-4o-mini", "api_key": DEMO_KEY, "base_url": f"{fake_url}/v1"}}}
        model = "demo"
    else:
        source = os.environ.get("DQ_CONFIG") or "conf/agent.yml"
        loaded = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
        agent = dict(loaded.get("agent", loaded))
    path = workdir / "agent.yml"
    path.write_text(yaml.safe_dump({"agent": agent}, sort_keys=False), encoding="utf-8")
    assert model is not None
    return path, model


def run_demo(console: Console | None = None, model: str | None = None, quick: bool = False) -> int:
    console = console or Console()
    if quick:
        from datus_queue.tasks.cli.demo_tour import run_tour

        return run_tour(console)
    workdir = Path(tempfile.mkdtemp(prefix="dq-demo-"))
    db_url = build_sample_db(workdir / "shop.db")
    with contextlib.ExitStack() as stack:
        fake_url = None
        if model is None:
            server = stack.enter_context(FakeProviderServer(latency_s=0.05))
            server.script.reset(fallback=SampleModel())
            fake_url = server.url
            console.print(f"[dim]fake OpenAI-compatible provider at {fake_url} (scripted answers; "
                          "the worker talks to it through the official SDK)[/dim]")
        config_path, model_name = _config(workdir, fake_url, model)
        redis_url = stack.enter_context(_redis(workdir, console))
        env = {"DQ_CONFIG": str(config_path), "DQ_REDIS_URL": redis_url,
               "DQ_DATABASE_URL": f"sqlite:///{workdir / 'jobs.db'}",
               # the databases tool runs may open, by name (tasks/databases.py)
               "DQ_DATABASES": json.dumps({"sample": db_url})}
        os.environ.update(env)
        from datus_queue.tasks.settings import get_settings

        get_settings.cache_clear()
        client = _client(env, config_path)
        provider = _provider(client, model_name)
        stack.enter_context(worker_process(env, [provider], 50, workdir / "worker.log"))
        console.print(f"[dim]worker for llm.{provider} started (log: {workdir / 'worker.log'})[/dim]\n")
        _run_batches(console, client, model_name, db_url, workdir)
        _stream_one(console, client, model_name, db_url)
        client.close()
    console.print(f"\n[dim]stopped everything; files are in {workdir}[/dim]")
    return 0


def _client(env: dict[str, str], config_path: Path) -> Any:
    from datus.models.config import AgentConfig
    from datus_queue.tasks.app import create_app
    from datus_queue.tasks.client import JobClient
    from datus_queue.tasks.settings import Settings

    settings = Settings(redis_url=env["DQ_REDIS_URL"], database_url=env["DQ_DATABASE_URL"], config=str(config_path))
    return JobClient(settings=settings, agent_config=AgentConfig.from_file(config_path), app=create_app(settings))


def _provider(client: Any, model: str) -> str:
    from datus_queue.tasks.client import resolve_provider

    return resolve_provider(model, client.agent_config)


def _run_batches(console: Console, client: Any, model: str, db_url: str, workdir: Path) -> None:
    from datus_queue.tasks.batch.report import ProgressView
    from datus_queue.tasks.batch.runner import BatchOptions, BatchRunner

    for mode in ("generate", "tool_run"):
        console.rule(f"sample batch, mode {mode}")
        options = BatchOptions(model=model, db_url=db_url, dialect="sqlite", mode=mode,
                               out=workdir / f"results-{mode}.jsonl", max_in_flight=50)
        batch_id, stats = BatchRunner(client, options, ProgressView(console)).run(sample_questions_path())
        console.print(stats.summary_table(batch_id))
        console.print(f"[dim]results: {options.out}[/dim]\n")


def _stream_one(console: Console, client: Any, model: str, db_url: str) -> None:
    console.rule("one tool-run job, step by step")
    questions = [json.loads(line) for line in sample_questions_path().read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    question = next((q["question"] for q in questions if "JOIN" in q.get("gold_sql", "").upper()),
                    questions[0]["question"])
    job_id = client.submit({"model": model, "kind": "tool_run", "database": "sample", "prompt": question,
                            "instruction": "Answer with SQL; use the tools to look at the data first."})
    console.print(f"job {job_id}: {question}")
    for step in client.stream(job_id, timeout=60):
        if step.action_type == "assistant_delta":
            continue
        detail = ""
        if isinstance(step.input, dict) and step.role == "tool" and step.status == "processing":
            detail = json.dumps(step.input.get("arguments"), ensure_ascii=False)
        elif isinstance(step.output, dict) and step.role == "tool":
            detail = re.sub(r"\s+", " ", str(step.output.get("raw_output", "")))[:90]
        reasoning = step.output.get("reasoning") if isinstance(step.output, dict) else None
        text = re.sub(r"\s+", " ", step.messages or reasoning or "")[:90]
        console.print(f"  [bold]{step.role:<9}[/bold] {step.action_type:<15} {step.status:<10} {text} [dim]{detail}[/dim]")
    result = client.result(job_id, timeout=30)
    console.print(f"  status {result.status.value}, {len(result.sql_contexts)} SQL context(s), "
                  f"cost ${result.cost_usd:.6f}")
