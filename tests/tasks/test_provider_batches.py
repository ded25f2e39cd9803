"""``dq batch --via batch-api``: a batch's items as provider batches, through the official SDKs
against the fake provider server over HTTP.

The sample batch (20 questions, the bundled shop database, the demo's `SampleModel` answers)
runs as OpenAI batches and as Anthropic message batches; clients are killed (SIGKILL) at chosen
steps with the fake's hold points and ``--resume`` finishes the run. "No item ran twice" is the
fake's own record: every item it answered, by custom_id (the fake answers each batch item with
the online logic, so a second run of an item would be a second answer).

Two settings are lowered in every run, and why: ``--api-poll-s 0.05`` (the default first wait
of 5 s is for hours-long real batches; the fake's batches end in well under a second) and the
fake's own clock (`BatchSettings`: validate 0.05 s, run 0.3 s, finalize 0.05 s — its default).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from datus.models.batch_apis import AnthropicBatchAPI, BatchLimits, OpenAIBatchAPI, split
from datus.models.scripted import Fault
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.batch.provider_batches import choose_via, deadline_from
from datus_queue.tasks.batch.report import ProgressView
from datus_queue.tasks.batch.sample import build_sample_db, sample_questions_path
from datus_queue.tasks.cli.demo import SampleModel
from datus_queue.tasks.cli.main import main
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.settings import get_settings
from datus_queue.tasks.store import JobStore
from datus_queue.tasks.store.provider_batches import PartState, ProviderBatchStore
from tests.tasks.conftest import Worker, free_port
from tests.tasks.test_store import PG_URL, _pg_schema

KEY = "sk-dq-provider-batches-not-real"
DQ = dq_command()
SAMPLE_MATCHED = 16  # the sample's scripted answers: q09 does not parse, q11, q16, q17 answer something else
REDIS_URL = os.environ.get("DQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/10")
FAST = ["--api-poll-s", "0.05"]  # see the module docstring


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Env:
    dir: Path
    env: dict[str, str]
    fake: FakeProviderServer
    shop_url: str
    store_url: str
    capsys: pytest.CaptureFixture[str]

    def dq(self, *args: str) -> Run:
        """``dq *args`` in this process (its entry point, the settings from the environment): a
        fresh interpreter per call would spend seconds importing the SDKs on a loaded machine."""
        get_settings.cache_clear()
        self.capsys.readouterr()
        try:
            code = main(list(args))
        finally:
            get_settings.cache_clear()
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*DQ, *args], env=self.env, cwd=self.dir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def batch(self, model: str, *extra: str, out: str = "out.jsonl") -> list[str]:
        return ["batch", str(sample_questions_path()), "--model", model, "--db", self.shop_url, "--out",
                str(self.dir / out), "--via", "batch-api", *FAST, *extra]

    def results(self, out: str = "out.jsonl") -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.dir / out).read_text(encoding="utf-8").splitlines() if line]

    def answered_ok(self) -> Counter[str]:
        """Successful answers the fake gave, per item (custom_id without its attempt suffix)."""
        return Counter(record.custom_id.rsplit("-", 1)[0] for record in self.fake.batches.answered
                       if record.outcome == "succeeded")


_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(
    not PG_URL, reason="set DQ_TEST_POSTGRES_URL to run on Postgres"))]


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The job store: SQLite, or a Postgres schema of its own for tests that ask (``indirect``)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        with _pg_schema("dq_provider_batches") as url:
            yield url


@pytest.fixture
def env(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        store_url: str) -> Iterator[Env]:
    shop_url = build_sample_db(tmp_path / "shop.db")
    with FakeProviderServer(api_key=KEY) as fake:
        fake.script.reset(fallback=SampleModel())
        agent = {"agent": {"target": "gpt", "models": {
            "gpt": {"type": "openai", "model": "gpt-4o-mini", "api_key": KEY, "base_url": fake.openai_base_url},
            "gpt-responses": {"type": "openai", "model": "gpt-4o-mini", "api": "responses", "api_key": KEY,
                              "base_url": fake.openai_base_url},
            "claude": {"type": "claude", "model": "claude-haiku-4-5", "api_key": KEY, "base_url": fake.url},
            "ds": {"type": "deepseek", "model": "deepseek-chat", "api_key": KEY, "base_url": fake.openai_base_url},
            "qwen": {"type": "qwen", "model": "qwen-plus", "api_key": KEY, "base_url": fake.openai_base_url},
            "gemini": {"type": "gemini", "model": "gemini-2.5-flash", "api_key": KEY, "base_url": fake.url},
        }}}
        config = tmp_path / "agent.yml"
        config.write_text(yaml.safe_dump(agent), encoding="utf-8")
        env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
        env.update(DQ_CONFIG=str(config), DQ_REDIS_URL=REDIS_URL, DQ_DATABASE_URL=store_url, PYTHONUNBUFFERED="1",
                   COLUMNS="250")
        for key, value in env.items():
            if key.startswith("DQ_") or key == "COLUMNS":
                monkeypatch.setenv(key, value)
        yield Env(tmp_path, env, fake, shop_url, store_url, capsys)


def batch_id_of(text: str) -> str:
    return next(word for word in text.replace(":", " ").split() if word.startswith("b-"))


def parts(env: Env, batch_id: str) -> list[Any]:
    store = JobStore(env.store_url)
    try:
        return ProviderBatchStore(store).parts(batch_id)
    finally:
        store.close()


def assert_the_sample_at_half_price(env: Env, run: Run) -> None:
    """The bundled sample answered by the batch API: scored as online, half the online price,
    each item answered once."""
    assert run.returncode == 0, run.stdout + run.stderr
    records = env.results()
    assert len(records) == 20 and sum(bool(r["match"]) for r in records) == SAMPLE_MATCHED
    assert all(r["cost_usd"] == pytest.approx(r["online_cost_usd"] / 2) and r["usage"]["input_tokens"] > 0
               for r in records)
    assert set(env.answered_ok().values()) == {1} and len(env.answered_ok()) == 20


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


# ---- whole runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt"])  # Claude's, Gemini's and Qwen's runs: the tests below
def test_the_sample_batch_scores_as_online_at_half_the_price(env: Env, model: str) -> None:
    env.fake.batches.configure(seed=5)  # a fixed answering order: the results do come back shuffled
    run = env.dq(*env.batch(model))
    assert run.returncode == 0, run.stdout + run.stderr
    records = env.results()
    assert sorted(r["id"] for r in records) == sorted(f"q{i:02d}" for i in range(1, 21))
    assert [r["id"] for r in records] != sorted(r["id"] for r in records)  # written as they came
    assert sum(bool(r["match"]) for r in records) == SAMPLE_MATCHED
    assert all(r["via"] == "batch-api" and r["status"] == "succeeded" and r["job_id"] is None for r in records)
    for record in records:  # batch price: half the online price of the same tokens
        assert record["cost_usd"] == pytest.approx(record["online_cost_usd"] / 2)
        assert record["usage"]["input_tokens"] > 0
    assert "cost online (same tokens)" in run.stdout and "by batch API" in run.stdout
    assert set(env.answered_ok().values()) == {1} and len(env.answered_ok()) == 20
    store = JobStore(env.store_url)
    try:
        assert not any(store.count_by_status().values())  # no job: nothing went through the workers
    finally:
        store.close()
    batch_id = batch_id_of(run.stdout)
    [part] = parts(env, batch_id)
    assert part.state is PartState.COLLECTED and part.items == 20 and part.provider_batch_id
    status = env.dq("status", batch_id)
    assert part.provider_batch_id in status.stdout and "collected" in status.stdout


@pytest.mark.parametrize("store_url", _BACKENDS, indirect=True)
def test_a_batch_split_across_a_size_limit(env: Env) -> None:
    # a lowered limit, so 20 requests make three batches (the real ones are 50,000 requests / 200 MB per
    # file); the fake enforces the same lowered limit, so a part over it would fail there
    env.fake.batches.configure(openai_max_requests=8)
    run = env.dq(*env.batch("gpt", "--api-max-requests", "8"))
    assert run.returncode == 0, run.stdout + run.stderr
    sizes = sorted(part.items for part in parts(env, batch_id_of(run.stdout)))
    assert sizes == [4, 8, 8]
    assert len(env.results()) == 20 and set(env.answered_ok().values()) == {1}
    assert len(env.fake.batches.jobs) == 3


def test_the_split_at_the_providers_real_limits() -> None:
    # the arithmetic only: uploading 50,000 lines per test would take minutes
    assert OpenAIBatchAPI.default_limits == BatchLimits(50_000, 200 * 1024 * 1024)
    assert AnthropicBatchAPI.default_limits == BatchLimits(100_000, 256 * 1024 * 1024)
    small = split([600] * 120_000, OpenAIBatchAPI.default_limits, overhead=1)
    assert [len(part) for part in small] == [50_000, 50_000, 20_000]
    assert [len(part) for part in split([600] * 120_000, AnthropicBatchAPI.default_limits, 1)] == [100_000, 20_000]
    big = split([1_000_000] * 450, OpenAIBatchAPI.default_limits, overhead=1)  # 1 MB requests: bytes decide
    assert [len(part) for part in big] == [209, 209, 32]
    assert all(sum(1_000_001 for _ in part) <= 200 * 1024 * 1024 for part in big)
    assert [len(part) for part in split([300 * 1024 * 1024, 10], AnthropicBatchAPI.default_limits)] == [1, 1]
    assert sum(len(part) for part in big) == 450 and big[1].start == big[0].stop


def test_the_progress_bar_shows_the_providers_count() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    view = ProgressView(console)
    view.start("b-1", 20, 0)
    view.provider_progress(7, 20, 1)
    view.progress.refresh()
    assert "provider: 7/20 in 1 batch(es)" in console.file.getvalue()
    view.provider_progress(None, 20, 1)  # Gemini's SDK does not say
    view.progress.refresh()
    assert "provider: not reported by the provider" in console.file.getvalue()
    view.stop()


def test_by_reads_a_duration_or_a_time() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert deadline_from("90s", now) == now + timedelta(seconds=90)
    assert deadline_from("6h", now) == now + timedelta(hours=6)
    assert deadline_from("2026-12-08T06:00", now) == datetime(2026, 12, 8, 6, 0, tzinfo=UTC)
    assert deadline_from("2026-12-08T06:00+08:00", now) == datetime(2026, 12, 7, 22, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="--by 'soon'"):
        deadline_from("soon", now)


def test_by_without_via_picks_the_batch_api_when_its_window_fits() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    for provider in ("openai", "claude", "gemini", "qwen"):  # each one's batch window: 24 h
        assert choose_via(provider, now + timedelta(hours=24), now).via == "batch-api"
        late = choose_via(provider, now + timedelta(hours=23, minutes=59), now)
        assert late.via == "online" and "less than" in late.reason and "24 h batch window" in late.reason
    assert choose_via("deepseek", now + timedelta(days=3), now) == choose_via("deepseek", now, now)
    assert "no batch API" in choose_via("deepseek", now, now).reason
    # a resumed batch with provider batches in flight stays on them whatever --by says (online would
    # run their items twice)
    assert choose_via("openai", now + timedelta(hours=1), now, in_flight=True).via == "batch-api"


def test_by_without_via_runs_on_the_batch_api_and_says_why(env: Env) -> None:
    args = [arg for arg in env.batch("gpt", "--by", "2d") if arg not in ("--via", "batch-api")]
    run = env.dq(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    said = " ".join(run.stdout.split())
    assert "via batch-api: --by is 48.0 h away, at least openai's 24 h batch window" in said, said
    assert len(env.results()) == 20 and all(r["via"] == "batch-api" for r in env.results())


def wide_shop(env: Env) -> str:
    """The sample shop plus 130 unused tables: a schema of some 5,000 tokens, over the 4,096 that
    claude-haiku-4-5's prompt cache keeps at least (1,024 for gpt-4o-mini; the shop's own schema,
    about 250 tokens, is under both: nothing would be cached)."""
    import sqlite3

    path = env.dir / "wide-shop.db"
    build_sample_db(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for n in range(130):
            conn.execute(f"CREATE TABLE archive_{n:03d} (id INTEGER PRIMARY KEY, region TEXT NOT NULL, "
                         "amount_cents INTEGER, noted_at TEXT, customer_ref TEXT)")
        conn.commit()
    return f"sqlite:///{path}"


def test_prompt_caching_of_the_shared_schema_prefix(env: Env) -> None:
    env.shop_url = wide_shop(env)
    env.fake.batches.configure(seed=3)
    claude = env.dq(*env.batch("claude", out="claude.jsonl"))
    assert claude.returncode == 0, claude.stdout + claude.stderr
    gpt = env.dq(*env.batch("gpt", out="gpt.jsonl"))
    assert gpt.returncode == 0, gpt.stdout + gpt.stderr
    claude_job, gpt_job = sorted(env.fake.batches.jobs.values(), key=lambda job: job.created_at)

    # the same prompt both ways: Claude's in two blocks of one user turn (the shared prefix marked for
    # the cache), OpenAI's as the online request sends it (its cache needs no mark)
    online_text = {item.custom_id: item.body["messages"][0]["content"] for item in gpt_job.items}
    for item in claude_job.items:
        [turn] = item.body["messages"]
        prefix, rest = turn["content"]
        assert prefix["cache_control"] == {"type": "ephemeral"} and "cache_control" not in rest
        assert prefix["text"].startswith("You are an expert sqlite SQL writer") and "archive_129" in prefix["text"]
        assert prefix["text"] + rest["text"] == online_text[item.custom_id]
        assert prefix["text"] == claude_job.items[0].body["messages"][0]["content"][0]["text"]

    for name, run in (("claude", claude), ("gpt", gpt)):
        records = env.results(f"{name}.jsonl")
        assert len(records) == 20 and sum(bool(r["match"]) for r in records) == SAMPLE_MATCHED  # scored as online
        usage = [r["usage"] for r in records]
        # the first request answered writes the prefix (Claude) or just sees it (OpenAI); the other 19 read it
        assert sum(1 for u in usage if u.get("cached_tokens")) == 19
        assert sum(1 for u in usage if u.get("cache_write_tokens")) == (1 if name == "claude" else 0)
        assert all(u.get("cached_tokens", 0) > 4096 for u in usage if u.get("cached_tokens"))
        for record in records:
            assert record["cost_usd"] == pytest.approx(record["online_cost_usd"] / 2)
        savings = sum(r["cache_savings_usd"] for r in records)
        assert savings > 0
        said = " ".join(run.stdout.split())
        read = sum(u.get("cached_tokens", 0) for u in usage)
        assert f"cache savings │ ${savings:.4f} ({read:,} input tokens read from the prompt cache)" in said, said


@pytest.mark.parametrize("prompt_cache", ["auto", "off"])
def test_anthropic_cache_marks_only_a_shared_prefix(prompt_cache: str) -> None:
    from datus.models.base import LLMBaseModel
    from datus.models.config import AgentConfig

    config = AgentConfig.from_dict({"models": {"c": {"type": "claude", "model": "claude-haiku-4-5", "api_key": "k",
                                                     "base_url": "http://127.0.0.1:9", "prompt_cache": prompt_cache}}})
    api = AnthropicBatchAPI(LLMBaseModel.create_model(config, "c"))
    body, _ = api.body("SCHEMA...\nQuestion: how many?")
    shared = api.cache_prefix(body, "SCHEMA...\n")["messages"][0]["content"]
    alone = api.cache_prefix(body, "")["messages"][0]["content"]  # a template whose first field is {question}
    if prompt_cache == "off":  # the model's setting holds: nothing marked either way
        assert "cache_control" not in json.dumps([body, shared, alone])
        return
    assert shared == [{"type": "text", "text": "SCHEMA...\n", "cache_control": {"type": "ephemeral"}},
                      {"type": "text", "text": "Question: how many?"}]
    # no shared prefix: no breakpoint (the adapter's on the whole turn would pay the cache-write premium
    # for a prompt no other item repeats)
    assert alone == [{"type": "text", "text": "SCHEMA...\nQuestion: how many?"}]


def test_expired_items_go_again_and_never_run_twice(env: Env) -> None:
    env.fake.batches.configure(expire_after=7)  # every batch answers 7 items, the rest expire
    run = env.dq(*env.batch("claude"))
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = sorted((part.round, part.items, (part.request_counts or {}).get("expired"))
                    for part in parts(env, batch_id_of(run.stdout)))
    assert rounds == [(1, 20, 13), (2, 13, 6), (3, 6, 0)]
    assert len(env.results()) == 20 and set(env.answered_ok().values()) == {1}
    assert Counter(r["attempts"] for r in env.results()) == {1: 7, 2: 7, 3: 6}
    assert sum(bool(r["match"]) for r in env.results()) == SAMPLE_MATCHED
    assert all(r["cost_usd"] == pytest.approx(r["online_cost_usd"] / 2) for r in env.results())


def test_failed_items_are_retried_by_the_batch_api(env: Env) -> None:
    env.fake.script.add(Fault("status", status=500), match="How many customers", times=1)
    run = env.dq(*env.batch("gpt"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(env.results()) == 20 and set(env.answered_ok().values()) == {1}
    assert [part.round for part in parts(env, batch_id_of(run.stdout))] == [1, 2]


def test_what_the_batch_api_could_not_do_runs_online(env: Env) -> None:
    """Two runs on one worker: items left after --api-rounds, then items left at --by."""
    # --api-rounds 1: an item the provider batch failed goes online at once (default: after 3 submissions)
    env.fake.script.add(Fault("status", status=500), match="How many customers", times=1)
    log = env.dir / "worker.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen([*DQ, "worker", "--provider", "openai", "-c", "2"], env=env.env, cwd=env.dir,
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    worker = Worker(proc, log, ("openai",))
    try:
        worker.wait_ready()
        run = env.dq(*env.batch("gpt", "--api-rounds", "1"))
        assert run.returncode == 0, run.stdout + run.stderr
        records = {r["id"]: r for r in env.results()}
        assert len(records) == 20 and sum(bool(r["match"]) for r in records.values()) == SAMPLE_MATCHED
        online = [r for r in records.values() if r.get("via") != "batch-api"]
        assert len(online) == 1 and online[0]["job_id"] and online[0]["status"] == "succeeded"
        assert "running them online" in run.stderr
        assert set(env.answered_ok().values()) == {1} and len(env.answered_ok()) == 19  # the 20th: online
        assert sum(1 for r in env.fake.requests if r.path == "/v1/chat/completions") == 1
        by_deadline(env)
    finally:
        worker.stop()


def by_deadline(env: Env) -> None:
    """--by 3s while the provider batch takes a minute: at 3 s it is cancelled, what it answered is
    kept, the rest runs online, and every item is answered once."""
    env.fake.batches.answered.clear()
    env.fake.clear_requests()
    env.fake.batches.configure(run_s=60)  # a minute: the deadline comes first
    run = env.dq(*env.batch("gpt", "--by", "3s", "--run-id", "by", out="by.jsonl"))
    assert run.returncode == 0, run.stdout + run.stderr
    records = env.results("by.jsonl")
    assert len(records) == 20 and all(r["status"] == "succeeded" for r in records)
    by_batch = [r for r in records if r.get("via") == "batch-api"]
    online_calls = sum(1 for r in env.fake.requests if r.path == "/v1/chat/completions")
    assert len(by_batch) == sum(env.answered_ok().values()) and set(env.answered_ok().values()) <= {1}
    assert len(by_batch) + online_calls == 20  # each item answered once, by one path or the other
    assert "--by reached" in run.stderr
    [job] = [job for job in env.fake.batches.jobs.values() if job.cancelled_at is not None]
    [part] = parts(env, batch_id_of(run.stdout))
    assert part.state is PartState.COLLECTED and part.error == "cancelled at --by"
    assert part.provider_batch_id == job.batch_id


def test_gemini_batch_mode(env: Env) -> None:
    run = env.dq(*env.batch("gemini"))
    assert_the_sample_at_half_price(env, run)
    [job] = env.fake.batches.jobs.values()
    assert "systemInstruction" not in job.items[0].body  # the prompt is one user message, as online
    [part] = parts(env, batch_id_of(run.stdout))
    assert part.state is PartState.COLLECTED and part.provider_batch_id.startswith("batches/")


def test_a_responses_api_model_batches_over_v1_responses(env: Env) -> None:
    # OpenAI's Batch API takes /v1/responses as its endpoint: a model with api: responses sends
    # its online request body (input items, not messages) there, and reads Response objects back
    run = env.dq(*env.batch("gpt-responses"))
    assert_the_sample_at_half_price(env, run)
    [job] = env.fake.batches.jobs.values()
    assert job.extra["endpoint"] == "/v1/responses" and job.protocol.name == "openai_responses"
    body = job.items[0].body
    assert "input" in body and "messages" not in body and "previous_response_id" not in body


def test_qwen_on_dashscopes_openai_compatible_batch_api(env: Env) -> None:
    # DashScope's Batch API is OpenAI's, at the model's base_url; the fake speaks it at its OpenAI paths
    run = env.dq(*env.batch("qwen"))
    assert run.returncode == 0, run.stdout + run.stderr
    records = env.results()
    assert len(records) == 20 and sum(bool(r["match"]) for r in records) == SAMPLE_MATCHED
    assert all(r["cost_usd"] == pytest.approx(r["online_cost_usd"] / 2) for r in records)
    [job] = env.fake.batches.jobs.values()
    assert job.items[0].body["model"] == "qwen-plus"


@pytest.mark.parametrize("store_url", _BACKENDS, indirect=True)
def test_the_parts_in_the_store(store_url: str) -> None:
    store = JobStore(store_url)
    try:
        store.create_batch("b-1", model="gpt", prompt_hash="h", mode="generate")
        parts_store = ProviderBatchStore(store)
        parts_store.add_part("b-1-r1-a", "b-1", "openai", 1, [("c1", "q1"), ("c2", "q2")], 300)
        parts_store.add_part("b-1-r1-b", "b-1", "openai", 1, [("c3", "q3")], 100)
        parts_store.update_part("b-1-r1-a", state=PartState.SUBMITTED, provider_batch_id="batch_x",
                                request_counts={"completed": 1, "failed": 0, "total": 2})
        parts_store.update_part("b-1-r1-b", state=PartState.COLLECTED)
        first, second = parts_store.parts("b-1")
        assert (first.state, first.provider_batch_id, first.items, first.request_counts["total"]) == (
            PartState.SUBMITTED, "batch_x", 2, 2)
        assert second.state is PartState.COLLECTED and not second.open
        assert parts_store.part_items("b-1-r1-a") == {"c1": "q1", "c2": "q2"}
        assert parts_store.items_in_open_parts("b-1") == {"q1", "q2"}
        parts_store.add_part("b-1-r2-c", "b-1", "openai", 2, [("c1-2", "q1")], 150)
        assert parts_store.rounds_by_item("b-1") == {"q1": 2, "q2": 1, "q3": 1}
        with pytest.raises(Exception):  # noqa: B017 - the same custom_id twice in a batch: the key refuses it
            parts_store.add_part("b-1-r2-d", "b-1", "openai", 2, [("c3", "q3")], 100)
        assert [part.part_id for part in parts_store.parts("b-1", [PartState.SUBMITTED])] == ["b-1-r1-a"]
    finally:
        store.close()


# ---- clients killed, batches cancelled ------------------------------------------------------------


def kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.parametrize(("model", "point"), [("gpt", "create"), ("gpt", "created"), ("gpt", "results"),
                                              ("claude", "created"), ("gemini", "created")])
def test_a_client_killed_mid_batch_resumes_and_runs_nothing_twice(env: Env, model: str, point: str) -> None:
    # create: killed between upload and create (the create never reached the provider);
    # created: the provider made the batch, the client never learnt its id;
    # results: the batch was recorded and ended, the client died downloading its results
    env.fake.batches.hold(point)
    proc = env.start(*env.batch(model))
    try:
        wait_for(lambda: env.fake.batches.waiting.get(point))
    finally:
        kill(proc)
    env.fake.batches.release()
    run = env.dq(*env.batch(model, "--resume"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(r["id"] for r in env.results()) == sorted(f"q{i:02d}" for i in range(1, 21))
    assert set(env.answered_ok().values()) == {1} and len(env.answered_ok()) == 20
    made = [job for job in env.fake.batches.jobs.values() if job.items]
    assert len(made) == 1  # the create that did reach the provider was found again, not repeated
    [part] = parts(env, batch_id_of(run.stdout))
    # Gemini names a batch batches/<id>
    assert part.state is PartState.COLLECTED and part.provider_batch_id.removeprefix("batches/") == made[0].batch_id


def test_dq_cancel_cancels_the_provider_batches(env: Env) -> None:
    env.fake.batches.configure(run_s=60)  # a long batch, so it is in progress when cancelled
    proc = env.start(*env.batch("gpt"))
    try:
        batch_id = wait_for(lambda: next((p.batch_id for p in _all_parts(env) if p.state is PartState.SUBMITTED),
                                         None))
        # submitted until dq batch's first poll records the provider's in_progress
        gauges = wait_for(lambda: (now := provider_batch_gauges(env))[("openai", "in_progress")] == 1 and now)
        assert sum(n for (provider, _), n in gauges.items() if provider == "openai") == 1
        cancelled = env.dq("cancel", batch_id)
        assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout, cancelled.stdout + cancelled.stderr
        [job] = env.fake.batches.jobs.values()
        assert job.cancelled_at is not None
        output, _ = proc.communicate(timeout=30)  # the running dq batch stops by itself
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "dq cancel" in output, output
    assert len(env.fake.batches.jobs) == 1  # nothing sent again after the cancel
    status = env.dq("status", batch_id)
    assert "[interrupted]" in status.stdout and "cancel" in status.stdout, status.stdout
    online = env.dq(*[arg for arg in env.batch("gpt", "--resume") if arg not in ("--via", "batch-api")])
    assert online.returncode == 1 and "provider batches in flight" in online.stderr  # would run items twice
    # --resume: what was answered before the cancel is kept, the rest goes again
    env.fake.batches.configure(run_s=0.3)
    run = env.dq(*env.batch("gpt", "--resume"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(env.results()) == 20 and set(env.answered_ok().values()) == {1}
    # the fleet's view: dq status and dq metrics (its exporter, scraped over HTTP)
    assert "provider batches: done 1, cancelled 1" in env.dq("status").stdout
    port = free_port()
    exporter = subprocess.Popen([*DQ, "metrics", "--port", str(port), "--addr", "127.0.0.1"], env=env.env,
                                cwd=env.dir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        samples = wait_for(lambda: _try_scrape(port), 30)
    finally:
        exporter.terminate()
        exporter.wait(20)
    gauges = {dict(labels)["state"]: n for (name, labels), n in samples.items()
              if name == "dq_provider_batches" and dict(labels)["provider"] == "openai"}
    assert gauges == {"preparing": 0, "submitted": 0, "in_progress": 0, "done": 1, "failed": 0, "cancelled": 1}
    assert samples[("dq_provider_batches", (("provider", "claude"), ("state", "done")))] == 0


def provider_batch_gauges(env: Env) -> dict[tuple[str, str], float]:
    """``dq_provider_batches`` as the exporter's collector reads it from the store now."""
    from datus_queue.tasks.observability.metrics_provider_batches import ProviderBatchCollector

    store = JobStore(env.store_url)
    try:
        [family] = ProviderBatchCollector(lambda: store).collect()
        return {(s.labels["provider"], s.labels["state"]): s.value for s in family.samples}
    finally:
        store.close()


def _try_scrape(port: int) -> dict[Any, float] | None:
    from tests.tasks.test_metrics import scrape

    try:
        return scrape(port)
    except OSError:
        return None


def _all_parts(env: Env) -> list[Any]:
    store = JobStore(env.store_url)
    try:
        from sqlalchemy import select

        from datus_queue.tasks.store.schema import provider_batches

        with store._begin() as conn:
            ids = set(conn.execute(select(provider_batches.c.batch_id)).scalars())
        return [part for batch_id in ids for part in ProviderBatchStore(store).parts(batch_id)]
    finally:
        store.close()


def test_a_provider_without_a_batch_api_is_refused(env: Env) -> None:
    run = env.dq("batch", str(sample_questions_path()), "--model", "ds", "--db", env.shop_url, "--via", "batch-api")
    assert run.returncode == 1 and "deepseek has no batch API here yet" in " ".join(run.stderr.split()), run.stderr
    assert not _all_parts(env) and not env.fake.batches.jobs


def test_ten_thousand_items_across_both_size_limits(env: Env) -> None:
    # 10,000 questions, with limits lowered so both bind in one run (the real ones, 50,000 requests
    # and 200 MB per file, would need 50,000 lines to bind: test_the_split_at_the_providers_real_limits
    # checks that arithmetic): at most 3,000 requests and 2 MB a batch; the fake enforces the same
    # request limit, so a part over it would fail there
    env.fake.batches.configure(openai_max_requests=3_000)
    questions = env.dir / "ten_thousand.jsonl"
    with questions.open("w", encoding="utf-8") as out:
        for n in range(10_000):
            out.write(json.dumps({"id": f"t{n:05d}", "question": f"How many orders did customer {n} place? "
                                  + "Count them." * (0 if n < 6_000 else 40)}) + "\n")
    run = env.dq("batch", str(questions), "--model", "gpt", "--out", str(env.dir / "out.jsonl"),
                 "--via", "batch-api", "--api-max-requests", "3000", "--api-max-mb", "2", *FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    # round 1's parts: what the split made (an item a provider leaves out of its results goes
    # again in a later round; the fake did, under load, until it judged a batch's phase at the
    # moment it answered its items)
    found = [part for part in parts(env, batch_id_of(run.stdout)) if part.round == 1]
    assert sum(part.items for part in found) == 10_000 and all(part.items <= 3_000 for part in found)
    # the 6,000 short questions: two parts cut by the count; the 4,000 long ones: two cut by the
    # megabytes (by the count alone it would be 3,000 x 3 + 1,000)
    sizes = sorted(part.items for part in found)
    assert len(sizes) == 4 and sizes[2:] == [3_000, 3_000] and sizes[:2] != [1_000, 3_000]
    for job in env.fake.batches.jobs.values():  # each file the client uploaded fits both limits
        assert len(job.items) <= 3_000
        assert sum(len(json.dumps(item.body)) for item in job.items) <= 2 * 1024 * 1024
    records = env.results()
    assert len(records) == 10_000 and {r["id"] for r in records} == {f"t{n:05d}" for n in range(10_000)}
    assert all(r["status"] == "succeeded" for r in records)
    assert len(env.answered_ok()) == 10_000 and set(env.answered_ok().values()) == {1}  # none ran twice
