"""The ``dq`` command through its real entry point, as a user runs it.

One stack for the module: a private ``redis-server``, the fake OpenAI-compatible provider in
this process (answering the bundled sample questions with `SampleModel`, as ``dq demo`` does),
one ``dq worker`` subprocess, a SQLite job store and the sample shop database. Every
``dq`` call is a fresh process that finds them through ``DQ_CONFIG`` / ``DQ_REDIS_URL`` /
``DQ_DATABASE_URL``. Tests keep out of each other's way by tagging their questions (the batch
id comes from the input file, and the fake's requests can be counted per tag).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from datus.models.scripted import Reply, ScriptedRequest
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.batch.sample import build_sample_db, sample_questions_path
from datus_queue.tasks.cli.demo import SampleModel
from datus_queue.tasks.cli.services import dq_command, local_redis
from datus_queue.tasks.store import JobStore
from tests.tasks.conftest import Worker, wait_for

KEY = "sk-dq-batch-cli-not-a-real-key"
MODEL = "demo"
DQ = dq_command()

# what the sample's scripted answers are (tasks/batch/sample/__init__.py): q09 does not parse, q11,
# q16 and q17 run but answer something else; the other sixteen are right
SAMPLE_WRONG = {"q11", "q16", "q17"}
SAMPLE_UNPARSEABLE = {"q09"}
RESULT_FIELDS = {"id", "question", "sql", "valid", "executed", "match", "error", "rows_returned", "usage",
                 "cost_usd", "latency_ms", "attempts", "job_id"}

_SLOW = re.compile(r"slow=(\d+(?:\.\d+)?)s")
_SAY = re.compile(r"SAY<<(.*?)>>")
_HEADER = re.compile(r"batch b-[0-9a-f]{16}: \d+ items")


class ShopModel:
    """The demo's `SampleModel`, plus two directives a test writes into its prompt:
    ``slow=0.5s`` delays the answer, ``SAY<<text>>`` answers ``text`` verbatim."""

    def __init__(self) -> None:
        self.sample = SampleModel()

    def __call__(self, request: ScriptedRequest) -> Reply:
        text = "\n".join(m["content"] for m in request.messages if isinstance(m.get("content"), str))
        said = _SAY.search(text)
        reply = Reply(text=said.group(1)) if said else self.sample(request)
        slow = _SLOW.search(text)
        return dataclasses.replace(reply, latency_s=float(slow.group(1))) if slow else reply


@dataclass
class Stack:
    dir: Path
    env: dict[str, str]
    fake: FakeProviderServer
    shop_url: str
    store: JobStore
    worker: Worker

    def requests_for(self, marker: str) -> int:
        """How many generation requests the fake received whose body mentions ``marker``."""
        return sum(1 for r in self.fake.requests if not r.path.startswith("/_fake") and marker in json.dumps(r.body))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("batch-cli")
    shop_url = build_sample_db(workdir / "shop.db")
    with contextlib.ExitStack() as exits:
        redis_url = exits.enter_context(local_redis(workdir))
        fake = exits.enter_context(FakeProviderServer(api_key=KEY))
        fake.script.reset(fallback=ShopModel())
        agent = {"agent": {
            "target": MODEL,
            "models": {MODEL: {"type": "openai", "model": "gpt-4o-mini", "api_key": KEY,
                               "base_url": fake.openai_base_url, "timeout_s": 30, "max_retries": 1}},
            "allowed_models": [MODEL, "deepseek:*"],  # a provider:model only where the operator lists it
        }}  # no mcp_servers: tool-run batches open --db with the shipped SQL server
        config = workdir / "agent.yml"
        config.write_text(yaml.safe_dump(agent, sort_keys=False), encoding="utf-8")
        store_url = f"sqlite:///{workdir / 'jobs.db'}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
        # COLUMNS: rich wraps at 80 columns when not on a terminal; the one test about
        # wrapping sets its own width
        env.update(DQ_CONFIG=str(config), DQ_REDIS_URL=redis_url, DQ_DATABASE_URL=store_url,
                   PYTHONUNBUFFERED="1", COLUMNS="250")
        log = workdir / "worker.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen([*DQ, "worker", "--provider", "openai", "-c", "20", "-l", "INFO"],
                                    env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=workdir, start_new_session=True)
        worker = Worker(proc, log, ("openai",))
        exits.callback(worker.stop)
        worker.wait_ready()
        store = JobStore(store_url)
        exits.callback(store.close)
        yield Stack(workdir, env, fake, shop_url, store, worker)


def dq(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``dq *args`` in a fresh process on the module's stack."""
    return subprocess.run([*DQ, *args], env=stack.env, cwd=stack.dir, capture_output=True, text=True,
                          timeout=timeout, check=False)


def write_questions(path: Path, tag: str, ids: list[str] | None = None) -> dict[str, str]:
    """A JSONL input of the sample questions ``ids`` (default: all), each question text
    prefixed with ``(tag-ID)`` so that this test's requests can be told apart; the tagged
    question of each id."""
    written: dict[str, str] = {}
    with path.open("w", encoding="utf-8") as out:
        for line in sample_questions_path().read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if ids is not None and row["id"] not in ids:
                continue
            row["question"] = f"({tag}-{row['id']}) {row['question']}"
            written[row["id"]] = row["question"]
            out.write(json.dumps(row) + "\n")
    return written


def results(path: Path) -> dict[str, dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_id = {record["id"]: record for record in records}
    assert len(by_id) == len(records), f"an item written twice: {Counter(r['id'] for r in records)}"
    return by_id


def summary(stdout: str) -> dict[str, str]:
    """The summary table's rows, label -> value."""
    rows: dict[str, str] = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def batch_id_of(stdout: str) -> str:
    found = re.search(r"batch (b-[0-9a-f]{16}): (\w+)", stdout)
    assert found, f"no batch id in the summary:\n{stdout}"
    return found.group(1)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A failure a person can read: non-zero exit, no traceback, one line naming the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    # (a batch that got as far as reading its input has said which batch it is)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not _HEADER.fullmatch(line)]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- generate mode over the sample --------------------------------------------------------


@pytest.fixture(scope="module")
def sample_batch(stack: Stack) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = stack.dir / "sample-results.jsonl"
    proc = dq(stack, "batch", str(sample_questions_path()), "--model", MODEL, "--db", stack.shop_url,
              "--out", str(out))
    return proc, out


def test_generate_batch_prints_a_summary_and_writes_one_result_per_item(
        stack: Stack, sample_batch: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = sample_batch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary(proc.stdout)
    assert rows["items run"] == "20"
    assert rows["bad input rows"] == "0" and rows["jobs failed"] == "0"
    assert rows["valid SQL"] == "19  (95%)" and rows["executed"] == "19  (95%)"
    assert rows["execution accuracy"] == "80.0%  (16/20)"  # an answer that does not parse is a miss
    assert rows["errors by code"] in ("mismatch 3, invalid_sql 1", "invalid_sql 1, mismatch 3")
    tokens_in, tokens_out = (int(n.replace(",", "")) for n in rows["tokens in / out"].split(" / "))
    assert tokens_in > 20 * 100 and tokens_out > 0  # the schema is in every prompt
    assert float(rows["cost"].lstrip("$")) > 0
    assert re.fullmatch(r"\d+\.\d\d s / \d+\.\d\d s", rows["latency p50 / p95"])
    assert f"results: {out}" in proc.stdout

    items = results(out)
    assert set(items) == {f"q{n:02d}" for n in range(1, 21)}
    for item_id, item in items.items():
        assert RESULT_FIELDS <= set(item), RESULT_FIELDS - set(item)
        assert item["attempts"] == 1 and re.fullmatch(r"[0-9a-f]{32}", item["job_id"])
        assert item["usage"]["input_tokens"] > 0 and item["cost_usd"] > 0 and item["latency_ms"] > 0
        if item_id in SAMPLE_UNPARSEABLE:
            assert (item["valid"], item["executed"], item["match"], item["error_code"]) == (False, False, False,
                                                                                             "invalid_sql")
            assert item["error"]
        elif item_id in SAMPLE_WRONG:
            assert (item["valid"], item["executed"], item["match"], item["error_code"]) == (True, True, False,
                                                                                             "mismatch")
        else:
            assert (item["valid"], item["executed"], item["match"], item["error"]) == (True, True, True, None)
            assert item["rows_returned"] >= 1
    assert items["q01"]["sql"] == "SELECT count(id) FROM customers"
    assert items["q01"]["question"] == "How many customers does the shop have?"

    # the batch lives in the job store: a fresh process reports it
    batch_id = batch_id_of(proc.stdout)
    status = dq(stack, "status", batch_id)
    assert status.returncode == 0, status.stderr
    assert f"batch {batch_id} [completed] model={MODEL}: 20/20 done (succeeded 20), cost $" in status.stdout
    assert stack.store.count_by_status(batch_id)["succeeded"] == 20


def test_a_finished_batch_runs_again_only_with_resume(stack: Stack) -> None:
    source = stack.dir / "again.jsonl"
    write_questions(source, "again", ["q01", "q05"])
    first = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url)
    assert first.returncode == 0, first.stderr
    batch_id = batch_id_of(first.stdout)

    second = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url)
    assert_one_error_line(second, batch_id, "--resume")

    resumed = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert summary(resumed.stdout)["items run"] == "0  (+2 done before)"
    assert stack.requests_for("(again-") == 2  # nothing ran again


# -- tool_run mode --------------------------------------------------------------------------


def test_tool_run_batch_explores_the_database_through_the_sql_mcp_server(stack: Stack) -> None:
    source = stack.dir / "tools.jsonl"
    write_questions(source, "tools", ["q01", "q11"])
    out = stack.dir / "tools-results.jsonl"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--mode", "tool_run",
              "--out", str(out), timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = results(out)
    assert items["q01"]["match"] is True and items["q01"]["sql"] == "SELECT count(id) FROM customers"
    assert items["q11"]["match"] is False and items["q11"]["error_code"] == "mismatch"
    assert summary(proc.stdout)["execution accuracy"] == "50.0%  (1/2)"
    for item_id in ("q01", "q11"):
        # list_tables, then read_query, then the answer: three turns, the last two after tool results
        asked = [r.body for r in stack.fake.requests if f"(tools-{item_id})" in json.dumps(r.body)]
        assert len(asked) == 3, asked
        assert all(body.get("tools") for body in asked)
        assert any(m.get("role") == "tool" and "customers" in json.dumps(m) for m in asked[1]["messages"])


def test_a_tool_run_batch_needs_a_database_without_a_password(stack: Stack) -> None:
    source = write_questions(stack.dir / "tools-nodb.jsonl", "toolsnodb", ["q01"])
    no_db = dq(stack, "batch", str(source), "--model", MODEL, "--mode", "tool_run")
    assert_one_error_line(no_db, "--mode tool_run needs --db", "--tools")
    secret = "hunter2-not-a-real-password"
    with_password = dq(stack, "batch", str(source), "--model", MODEL, "--mode", "tool_run",
                       "--db", f"postgresql://reader:{secret}@127.0.0.1:1/dw")
    assert_one_error_line(with_password, "password", "agent.mcp_servers")
    assert secret not in with_password.stdout + with_password.stderr
    assert stack.requests_for("(toolsnodb-") == 0


def test_a_job_may_not_carry_a_database_password() -> None:
    from datus_queue.tasks.schemas import JobRequest

    with pytest.raises(ValueError, match="password") as raised:
        JobRequest(model=MODEL, kind="tool_run", prompt="hi", database="postgresql://u:s3cret-pw@db/dw")
    assert "s3cret-pw" not in str(raised.value)
    with pytest.raises(ValueError, match="only apply to kind 'tool_run'"):
        JobRequest(model=MODEL, prompt="hi", database="sqlite:///x.db")
    with pytest.raises(ValueError, match="'sql'"):
        JobRequest(model=MODEL, kind="tool_run", prompt="hi", database="sqlite:///x.db", mcp_servers=["sql"])
    assert JobRequest(model=MODEL, kind="tool_run", prompt="hi", database="postgresql://reader@db/dw").database


# -- input the batch cannot use ---------------------------------------------------------------


def test_bad_jsonl_rows_are_reported_by_line_and_the_rest_run(stack: Stack) -> None:
    good = write_questions(stack.dir / "unused.jsonl", "badrows", ["q01", "q05"])
    source = stack.dir / "bad-rows.jsonl"
    source.write_text("\n".join([
        json.dumps({"id": "a", "question": good["q01"], "gold_sql": "SELECT COUNT(*) FROM customers"}),
        json.dumps({"id": "b", "question": 42}),
        "this is not json",
        "",
        json.dumps({"id": "c", "question": good["q05"], "gold_sql": "SELECT COUNT(*) FROM orders WHERE status = 'cancelled'"}),
        json.dumps({"id": "d", "question": "   "}),
        json.dumps({"id": "a", "question": "the same id again"}),
        json.dumps(["an", "array"]),
    ]) + "\n", encoding="utf-8")
    out = stack.dir / "bad-rows-results.jsonl"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = dict(re.findall(r"skipped line (\d+): (.+)", proc.stderr))
    assert set(skipped) == {"2", "3", "6", "7", "8"}, proc.stderr
    assert "'question' must be a string" in skipped["2"]
    assert "not JSON" in skipped["3"]
    assert "empty" in skipped["6"]
    assert "duplicate id 'a'" in skipped["7"] and "line 1" in skipped["7"]
    assert "array" in skipped["8"]
    rows = summary(proc.stdout)
    assert rows["items run"] == "2" and rows["bad input rows"] == "5"
    assert rows["execution accuracy"] == "100.0%  (2/2)"
    assert set(results(out)) == {"a", "c"}


def test_csv_input(stack: Stack) -> None:
    source = stack.dir / "questions.csv"
    questions = write_questions(stack.dir / "unused-csv.jsonl", "csv", ["q02", "q06", "q11"])
    gold = {json.loads(line)["id"]: json.loads(line)["gold_sql"]
            for line in sample_questions_path().read_text(encoding="utf-8").splitlines() if line.strip()}
    lines = ["Question,id,gold_sql"]  # a spreadsheet's capital Q
    for item_id, question in questions.items():
        quoted = '"' + question.replace('"', '""') + '"'
        lines.append(f"{quoted},{item_id},\"{gold[item_id].replace(chr(34), chr(34) * 2)}\"")
    source.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    out = stack.dir / "csv-results.jsonl"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = results(out)
    assert {item_id: item["match"] for item_id, item in items.items()} == {"q02": True, "q06": True, "q11": False}
    assert items["q02"]["question"] == questions["q02"]  # the comma inside the quoted cell kept
    assert summary(proc.stdout)["bad input rows"] == "0"


def test_a_missing_input_file_is_one_readable_error(stack: Stack) -> None:
    proc = dq(stack, "batch", str(stack.dir / "no-such-questions.jsonl"), "--model", MODEL, "--db", stack.shop_url)
    assert_one_error_line(proc, "no-such-questions.jsonl")


def test_an_empty_input_file_is_one_readable_error(stack: Stack) -> None:
    source = stack.dir / "empty.jsonl"
    source.write_text("", encoding="utf-8")
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url)
    assert_one_error_line(proc, "empty.jsonl", "empty")


def test_an_input_file_without_rows_is_one_readable_error(stack: Stack) -> None:
    source = stack.dir / "blank.csv"
    source.write_text("\n\n", encoding="utf-8")
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url)
    assert_one_error_line(proc, "blank.csv", "no rows")


def test_a_database_that_is_not_there_is_one_readable_error(stack: Stack) -> None:
    source = stack.dir / "nodb.jsonl"
    write_questions(source, "nodb", ["q01"])
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", "sqlite:////nonexistent.db")
    assert_one_error_line(proc, "/nonexistent.db")
    assert stack.requests_for("(nodb-") == 0


def _postgres_url() -> str | None:
    url = os.environ.get("DQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import psycopg2

        psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"), connect_timeout=2).close()
    except Exception:  # noqa: BLE001 - no Postgres here: the tests that need one skip
        return None
    return url


def test_a_postgres_database_url_is_accepted(stack: Stack) -> None:
    url = _postgres_url()
    if url is None:
        pytest.skip("no Postgres at DQ_TEST_POSTGRES_URL / 127.0.0.1:5432")
    source = stack.dir / "pg.jsonl"
    source.write_text(json.dumps({"id": "one", "question": "(pg-one) SAY<<```sql\nSELECT 1\n```>>"}) + "\n",
                      encoding="utf-8")
    out = stack.dir / "pg-results.jsonl"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", url, "--dialect", "postgres", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert results(out)["one"]["executed"] is True


def test_a_postgres_database_that_is_not_there_is_one_readable_error(stack: Stack) -> None:
    if _postgres_url() is None:
        pytest.skip("no Postgres at DQ_TEST_POSTGRES_URL / 127.0.0.1:5432")
    source = stack.dir / "nopg.jsonl"
    write_questions(source, "nopg", ["q01"])
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db",
              "postgresql+psycopg2://postgres@127.0.0.1:5432/dq_no_such_database")
    assert_one_error_line(proc, "dq_no_such_database")


def test_a_long_error_stays_one_line_in_a_log(stack: Stack) -> None:
    # stderr is not a terminal here (a log, CI): rich would wrap at 80 columns, and "[draft]"
    # would be taken for markup
    folder = stack.dir / "[draft] questions for the quarterly review of the shop"
    folder.mkdir(exist_ok=True)
    source = folder / "empty.jsonl"
    source.write_text("", encoding="utf-8")
    env = {key: value for key, value in stack.env.items() if key != "COLUMNS"}
    proc = subprocess.run([*DQ, "batch", str(source), "--model", MODEL], env=env, cwd=stack.dir,
                          capture_output=True, text=True, timeout=60, check=False)
    assert_one_error_line(proc, str(source), "empty")


# -- Ctrl-C, resume, budget ---------------------------------------------------------------------


def slow_questions(path: Path, tag: str, ids: list[str], latency_s: Any) -> dict[str, str]:
    """Like `write_questions`, each question asking the fake for ``latency_s(index)`` seconds."""
    tagged = write_questions(path, tag, ids)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    path.write_text("".join(json.dumps({**row, "question": f"{row['question']} slow={latency_s(i):.2f}s"}) + "\n"
                            for i, row in enumerate(rows)), encoding="utf-8")
    return tagged


def interrupt_after(stack: Stack, args: list[str], out: Path, finished: int) -> tuple[int, str, str]:
    """Run ``dq *args``, press Ctrl-C once ``finished`` results are written: (code, stdout, stderr)."""
    proc = subprocess.Popen([*DQ, *args], env=stack.env, cwd=stack.dir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None
                 or (out.exists() and len(out.read_text(encoding="utf-8").splitlines()) >= finished),
                 30, f"{finished} items finished")
        assert proc.poll() is None, f"the batch ended before Ctrl-C: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


def assert_interrupted_then_resumed(stack: Stack, args: list[str], out: Path, ids: list[str],
                                    tagged: dict[str, str]) -> None:
    code, stdout, stderr = interrupt_after(stack, args, out, 3)
    assert code == 130, stdout + stderr
    assert "Traceback" not in stderr
    batch_id = batch_id_of(stdout)
    assert f"batch {batch_id}: interrupted" in stdout  # the summary, printed on the way out
    finished = results(out)
    assert 3 <= int(summary(stdout)["items run"]) == len(finished) < len(ids)  # what finished is recorded
    assert "--resume" in stderr
    assert f"[interrupted] model={MODEL}: {len(finished)}/{len(ids)} done" in dq(stack, "status", batch_id).stdout

    resumed = dq(stack, *args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert summary(resumed.stdout)["items run"] == f"{len(ids) - len(finished)}  (+{len(finished)} done before)"
    items = results(out)  # the first run's lines and the resumed run's, each item once
    assert set(items) == set(ids)
    assert all(item["match"] is True for item in items.values())
    # no item ran twice: one request per question on the provider, one job per item in the store
    assert {item_id: stack.requests_for(question) for item_id, question in tagged.items()} == dict.fromkeys(ids, 1)
    jobs = stack.store.list_jobs(batch_id=batch_id, limit=1000)
    assert sorted(job.item_id for job in jobs) == sorted(ids)
    assert {job.attempts for job in jobs} == {1}
    assert f"[completed] model={MODEL}: {len(ids)}/{len(ids)} done" in dq(stack, "status", batch_id).stdout


CTRL_C_IDS = [f"q{n:02d}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12)]


def test_ctrl_c_with_jobs_in_flight_then_resume_runs_each_item_once(stack: Stack) -> None:
    # all ten submitted at once, finishing 0.3 s apart: Ctrl-C leaves some running in the worker,
    # and --resume collects them (same idempotency key, same job) instead of running them again
    source = stack.dir / "ctrl-c-wide.jsonl"
    tagged = slow_questions(source, "ctrlcwide", CTRL_C_IDS, lambda i: 0.2 + 0.3 * i)
    out = stack.dir / "ctrl-c-wide-results.jsonl"
    args = ["batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out)]
    assert_interrupted_then_resumed(stack, args, out, CTRL_C_IDS, tagged)


def test_ctrl_c_stops_submitting_then_resume_runs_each_item_once(stack: Stack) -> None:
    source = stack.dir / "ctrl-c-narrow.jsonl"
    tagged = slow_questions(source, "ctrlcnarrow", CTRL_C_IDS, lambda i: 0.4)
    out = stack.dir / "ctrl-c-narrow-results.jsonl"
    args = ["batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out),
            "--max-in-flight", "2"]
    assert_interrupted_then_resumed(stack, args, out, CTRL_C_IDS, tagged)


def test_a_batch_larger_than_max_in_flight_runs_every_item(stack: Stack) -> None:
    # both jobs in flight finish between two polls: the batch must go on submitting
    ids = ["q01", "q02", "q03", "q04", "q05", "q06"]
    source = stack.dir / "narrow.jsonl"
    write_questions(source, "narrow", ids)
    out = stack.dir / "narrow-results.jsonl"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out),
              "--max-in-flight", "2")
    assert proc.returncode == 0, proc.stderr
    assert set(results(out)) == set(ids)
    assert summary(proc.stdout)["items run"] == "6"


def test_budget_stops_submitting_once_spent(stack: Stack) -> None:
    ids = [f"q{n:02d}" for n in range(1, 11)]
    source = stack.dir / "budget.jsonl"
    write_questions(source, "budget", ids)
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--budget-usd", "0.0001",
              "--max-in-flight", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    batch_id = batch_id_of(proc.stdout)
    assert "budget $0.0001 spent" in proc.stderr
    assert f"batch {batch_id}: budget_exceeded" in proc.stdout
    ran = int(summary(proc.stdout)["items run"])
    assert 1 <= ran < len(ids)
    assert float(summary(proc.stdout)["cost"].lstrip("$")) >= 0.0001
    assert stack.requests_for("(budget-") == ran
    assert f"[budget_exceeded] model={MODEL}: {ran}/{len(ids)} done" in dq(stack, "status", batch_id).stdout


# -- submit, result, stream, status, cancel -----------------------------------------------------


def test_submit_result_stream_and_status_of_a_job(stack: Stack) -> None:
    question = "(submit-1) How many customers does the shop have?"
    submitted = dq(stack, "submit", question, "--model", MODEL)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), submitted.stdout

    result = dq(stack, "result", job_id, "--timeout", "30")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "succeeded" and body["job_id"] == job_id
    assert "SELECT count(id) FROM customers" in body["output"]
    assert body["usage"]["input_tokens"] > 0

    status = dq(stack, "status", job_id)
    assert re.search(rf"^{job_id}\s+succeeded\s+attempts=1\s+cost=\$0\.\d{{6}}$", status.stdout.strip()), status.stdout

    streamed = dq(stack, "stream", job_id)  # a finished job: its steps from the start
    assert streamed.returncode == 0, streamed.stderr
    assert "user user_input [success] (submit-1) How many customers" in streamed.stdout
    assert "assistant final_response [success]" in streamed.stdout
    assert "SELECT count(id) FROM customers" in streamed.stdout

    overall = dq(stack, "status")
    assert overall.returncode == 0 and re.search(r"jobs: .*succeeded \d+", overall.stdout), overall.stdout


def test_submit_stream_prints_the_steps_as_they_happen(stack: Stack) -> None:
    proc = dq(stack, "submit", "(submit-2) slow=0.3s How many orders were cancelled?", "--model", MODEL, "--stream")
    assert proc.returncode == 0, proc.stderr
    job_id, rest = proc.stdout.split("\n", 1)
    assert re.fullmatch(r"[0-9a-f]{32}", job_id.strip())
    assert rest.index("user_input") < rest.index("final_response")
    assert "SELECT COUNT(*) AS cancelled_orders FROM orders WHERE status = 'cancelled'" in rest


def test_json_submission(stack: Stack) -> None:
    answer = '{"sql": "SELECT 1", "explanation": "one"}'
    proc = dq(stack, "submit", f"(submit-3) SAY<<{answer}>>", "--model", MODEL, "--json")
    assert proc.returncode == 0, proc.stderr
    result = dq(stack, "result", proc.stdout.strip(), "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["output"] == {"sql": "SELECT 1", "explanation": "one"}


def test_stream_prints_the_answer_verbatim(stack: Stack) -> None:
    # brackets are SQL Server quoting and subscripts, not rich markup
    answer = "SELECT [name] FROM [users] WHERE tags[i] = 1"
    proc = dq(stack, "submit", f"(submit-4) SAY<<{answer}>>", "--model", MODEL, "--stream")
    assert proc.returncode == 0, proc.stderr
    assert answer in proc.stdout


def test_cancel_a_queued_and_a_running_job(stack: Stack) -> None:
    # no worker serves deepseek here: the job waits in its queue
    queued = dq(stack, "submit", "(cancel-1) never runs", "--model", "deepseek:deepseek-chat").stdout.strip()
    assert dq(stack, "status", queued).stdout.split()[1] == "queued"
    cancelled = dq(stack, "cancel", queued)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == "cancelled", cancelled.stderr
    result = dq(stack, "result", queued, "--timeout", "5")
    assert result.returncode == 1 and json.loads(result.stdout)["status"] == "cancelled"

    # the fake holds the running job's model call until the cancel has been given (no race with
    # how long a fresh dq process takes to start): the job is running, and in its call, when cancelled
    stack.fake.hold()
    try:
        running = dq(stack, "submit", "(cancel-2) How many customers does the shop have?",
                     "--model", MODEL).stdout.strip()
        wait_for(lambda: stack.store.get(running).status.value == "running" and stack.fake.in_flight >= 1, 15,
                 "the job to start and call the model")
        signalled = dq(stack, "cancel", running)
    finally:
        stack.fake.release()
    assert signalled.returncode == 0 and signalled.stdout.strip() == "running", signalled.stderr
    result = dq(stack, "result", running, "--timeout", "20")
    assert result.returncode == 1 and json.loads(result.stdout)["status"] == "cancelled", result.stdout

    done = dq(stack, "cancel", queued)  # already final: says so, changes nothing
    assert done.stdout.strip() == "cancelled"


def test_errors_are_one_readable_line(stack: Stack) -> None:
    unknown_model = dq(stack, "submit", "hello", "--model", "no-such-model")
    assert_one_error_line(unknown_model, "unknown model 'no-such-model'", MODEL)

    source = stack.dir / "unknown-model.jsonl"
    write_questions(source, "unknownmodel", ["q01"])
    batch = dq(stack, "batch", str(source), "--model", "no-such-model", "--db", stack.shop_url)
    assert_one_error_line(batch, "unknown model 'no-such-model'")

    assert_one_error_line(dq(stack, "submit", "hello", "--model", MODEL, "--tools", "nope"), "nope", "(none)")
    assert_one_error_line(dq(stack, "result", "f" * 32), "f" * 32)
    assert_one_error_line(dq(stack, "cancel", "f" * 32), "f" * 32)
    assert_one_error_line(dq(stack, "status", "f" * 32), "f" * 32)
    no_prompt = dq(stack, "submit", "--model", MODEL)
    assert no_prompt.returncode == 2 and "give a prompt or --messages" in no_prompt.stderr
    assert stack.requests_for("no-such-model") == 0 and stack.requests_for("(unknownmodel-") == 0
