"""Hostile input (issue 19, "Bounded input, clear errors"): every field of a request has a bound
(`tasks.schemas.Bounds`), and what is over one — or not strict UTF-8 JSON, or nested too deep —
is refused at submit with an error naming the field and the bound, never echoing the value and
never a crash later. Long batch item ids never abort a batch; ``--out`` never appends by surprise;
a schedule's name and input cannot escape its directory or become options; a ``dq.run_schedule``
for a slot that is not due is refused.

The fuzz-style corpora are generated from fixed seeds (no hypothesis in the dev dependencies):
the same inputs on every run, thousands of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from pydantic import ValidationError

from datus.models.config import AgentConfig, ConfigError
from datus_queue.tasks.batch.input import BadRow, BatchInputError, Question, iter_questions
from datus_queue.tasks.batch.runner import BatchOptions, BatchRunner, item_key
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.maintenance.schedules import (
    SLOT_GRACE_S,
    BatchSchedule,
    SlotRefused,
    check_slot,
    load_schedules,
    run_schedule,
)
from datus_queue.tasks.schemas import Bounds, JobRequest, TaskPayload
from datus_queue.tasks.settings import Settings
from datus_queue.tasks.store import JobStore
from tests.tasks.test_batch_cli import MODEL, Stack, assert_one_error_line, dq, results, summary, write_questions
from tests.tasks.test_batch_cli import stack as stack  # noqa: F401 - the module's fixture, shared here

MARKER = "S3CR3T-VALUE"  # put in values; an error may name a field, never show this

AGENT = AgentConfig.from_dict({"agent": {
    "target": "openai",
    "models": {"openai": {"type": "openai", "model": "gpt-4o-mini", "api_key": "sk-x"}},
    "mcp_servers": {"warehouse": {"command": "true"}},
}})


def offline_client(**settings: Any) -> JobClient:
    """A client that can validate (no broker, no store is touched)."""
    return JobClient(settings=Settings(redis_url="redis://127.0.0.1:1/0", database_url="sqlite://", **settings),
                     agent_config=AGENT, app=object(), store=object())


def refused(request: dict[str, Any], **settings: Any) -> str:
    with pytest.raises(InvalidJob) as caught:
        offline_client(**settings).validate(request)
    message = str(caught.value)
    assert MARKER not in message
    return message


# -- the corpus: job requests ------------------------------------------------------------------------

_TEXTS = ["", " ", "hi", "How many orders?", "é ü 中文 🙂", "\x00", "a\nb\r\n", "\ud800", "x\udfffy", "\ufeff",
          "../../etc/passwd", "--out=x", "${HOME}", "'; DROP TABLE x; --", MARKER]
_NUMBERS = [0, -1, 1, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, math.inf, -math.inf, math.nan, True, False]


def _text(rng: random.Random, big: bool = False) -> str:
    pick = rng.random() if big else rng.random() * 0.8
    if pick < 0.6:
        return "".join(rng.choice(_TEXTS) for _ in range(rng.randint(1, 4)))
    if pick < 0.8:
        return "".join(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0xd7ff), rng.randint(0xd800, 0xdfff),
                                        rng.randint(0xe000, 0x10ffff)])) for _ in range(rng.randint(0, 40)))
    if pick < 0.79:
        return rng.choice("xé🙂") * rng.choice([199, 200, 201, 255, 256, 1000])
    if pick < 0.98:
        return rng.choice("xé🙂") * 100_000
    return "y" * rng.choice([Bounds.PROMPT_BYTES, Bounds.PROMPT_BYTES + 1])


def _name(rng: random.Random) -> str:
    """A key or a name: an error may say which one (metadata keys, MCP server names), so no MARKER."""
    return _text(rng).replace(MARKER, "k")


def _json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 and pick < 0.02:  # now and then, far too deep
        value: Any = "bottom"
        for _ in range(rng.choice([Bounds.JSON_DEPTH, Bounds.JSON_DEPTH + 1, 500, 5000])):
            value = [value] if rng.random() < 0.5 else {"a": value}
        return value
    if depth > 5 or pick < 0.4:
        return rng.choice([_text(rng), rng.choice(_NUMBERS), None])
    if pick < 0.7:
        return [_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {(_name(rng) if rng.random() < 0.9 else rng.choice([1, None])): _json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def _message(rng: random.Random) -> Any:
    if rng.random() < 0.7:
        return {"role": rng.choice(["user", "system", "assistant", "tool", _text(rng)]),
                "content": rng.choice([_text(rng, big=True), _json(rng, 1)])}
    return _json(rng, 1)


def _value(rng: random.Random, field: str) -> Any:
    generic = rng.random() < 0.15  # any field, any type
    if generic:
        return _json(rng)
    now = datetime.now(UTC)
    return {
        "kind": lambda: rng.choice(["generate", "json", "tool_run", "chat", 1]),
        "model": lambda: rng.choice(["openai", "openai:gpt-4o", "nope", "", "x" * 300, "default", _name(rng)]),
        "prompt": lambda: _text(rng, big=True),
        "messages": lambda: ([_message(rng) for _ in range(rng.choice([0, 1, 2, 3]))] if rng.random() < 0.97
                             else [{"role": "user", "content": "m"}] * rng.choice([Bounds.MESSAGES, Bounds.MESSAGES + 1])),
        "instruction": lambda: _text(rng, big=True),
        "options": lambda: {key: rng.choice([*_NUMBERS, _text(rng), [_text(rng)] * rng.randint(0, 20), None])
                            for key in rng.sample(["temperature", "top_p", "max_tokens", "thinking_budget", "stop",
                                                   "seed", "timeout_s", "tool_choice", "extra_body", "nope"],
                                                  rng.randint(0, 4))},
        "mcp_servers": lambda: [rng.choice(["warehouse", "nope", "rm -rf /", _name(rng)])
                                for _ in range(rng.choice([0, 1, 2, Bounds.MCP_SERVERS + 1]))],
        "database": lambda: rng.choice(["sqlite:///w.db", "postgresql://u:pw@h/d", _text(rng), "x" * 2001]),
        "output_schema": lambda: _json(rng, 1) if rng.random() < 0.5 else {"type": "object"},
        "max_turns": lambda: rng.choice([0, 1, 100, 101, 10**30, "3"]),
        "session_id": lambda: rng.choice(["s_1", "../../etc/passwd", _text(rng)]),
        "stream": lambda: rng.choice([True, False, "yes", None]),
        "idempotency_key": lambda: rng.choice(["k", "k" * 200, "k" * 201, _text(rng)]),
        "batch_id": lambda: rng.choice(["b-1", "b" * 256, _text(rng)]),
        "item_id": lambda: rng.choice(["1", "i" * 255, "i" * 1_000_000, _text(rng)]),
        "deadline": lambda: rng.choice([now + timedelta(hours=1), now - timedelta(hours=1), now + timedelta(days=365),
                                        (now + timedelta(hours=1)).replace(tzinfo=None), "2020-01-01T00:00:00Z",
                                        _text(rng)]),
        "db_type": lambda: rng.choice(["datus_sql", "x" * 65, _text(rng)]),
        "metadata": lambda: {rng.choice([_name(rng), f"k{n}", "api_key"]): rng.choice([*_NUMBERS, _text(rng), None, []])
                             for n in range(rng.choice([0, 1, 3, Bounds.METADATA_KEYS + 1]))},
        "schema_version": lambda: rng.choice([1, 2]),
        "unknown_field": lambda: _text(rng),
    }[field]()


_FIELDS = ["kind", "model", "prompt", "messages", "instruction", "options", "mcp_servers", "database", "output_schema",
           "max_turns", "session_id", "stream", "idempotency_key", "batch_id", "item_id", "deadline", "db_type",
           "metadata", "schema_version", "unknown_field"]


def _request(rng: random.Random) -> dict[str, Any]:
    request: dict[str, Any] = {"model": "openai", "prompt": "How many orders?"}
    for field in rng.sample(_FIELDS, rng.randint(1, 5)):
        request[field] = _value(rng, field)
    if "messages" in request and rng.random() < 0.8:
        request.pop("prompt", None)
    if rng.random() < 0.3:
        request["kind"] = "tool_run"
    return request


def _assert_serialisable(job: JobRequest) -> None:
    """What the store and the broker do with an accepted request never fails."""
    text = job.model_dump_json()
    text.encode("utf-8")  # strict
    assert JobRequest.model_validate_json(text) == job  # a worker reads it back as it was
    payload = TaskPayload(provider="openai", kind=job.kind.value, model=job.model).model_dump(mode="json")
    json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")


def test_fuzz_corpus_of_job_requests_is_accepted_and_serialisable_or_refused_with_invalid_job() -> None:
    client = offline_client()
    rng = random.Random(19)
    accepted = refusals = 0
    for _ in range(5000):
        request = _request(rng)
        try:
            job, _ = client.validate(request)
        except InvalidJob as exc:
            refusals += 1
            message = str(exc)
            assert MARKER not in message, message[:2000]
            assert len(message) < 4000, message[:2000]  # names what is wrong; never carries the input
            continue
        accepted += 1
        _assert_serialisable(job)
    assert accepted > 300 and refusals > 3000, (accepted, refusals)  # the corpus reaches both sides


# -- one test per bound -----------------------------------------------------------------------------


def test_a_prompt_over_the_bound_is_refused_naming_the_field_and_the_bound() -> None:
    message = refused({"model": "openai", "prompt": MARKER + "x" * 50_000_000})
    assert "prompt" in message and str(Bounds.PROMPT_BYTES) in message
    assert offline_client().validate({"model": "openai", "prompt": "x" * Bounds.PROMPT_BYTES})  # the bound itself


def test_an_operator_lowers_the_prompt_bound_with_dq_max_prompt_bytes() -> None:
    message = refused({"model": "openai", "prompt": MARKER * 100}, max_prompt_bytes=1000)
    assert "prompt" in message and "1000" in message and "DQ_MAX_PROMPT_BYTES" in message
    message = refused({"model": "openai", "messages": [{"role": "user", "content": MARKER * 100}]},
                      max_prompt_bytes=1000)
    assert "messages" in message and "1000" in message
    with pytest.raises(ValidationError):  # never above what every worker accepts
        Settings(max_prompt_bytes=Bounds.PROMPT_BYTES + 1)


@pytest.mark.parametrize(("field", "value", "bound"), [
    ("item_id", MARKER * 100_000, str(Bounds.ID_CHARS)),
    ("batch_id", MARKER * 100_000, str(Bounds.ID_CHARS)),
    ("idempotency_key", MARKER * 100_000, str(Bounds.IDEMPOTENCY_KEY_CHARS)),
    ("model", "x" * 1000, str(Bounds.ID_CHARS)),
    ("instruction", MARKER + "x" * (Bounds.PROMPT_BYTES + 1), str(Bounds.PROMPT_BYTES)),
])
def test_long_ids_and_texts_are_refused(field: str, value: str, bound: str) -> None:
    message = refused({"model": "openai", "prompt": "hi", field: value})
    assert field in message and bound in message


def test_metadata_is_bounded() -> None:
    message = refused({"model": "openai", "prompt": "hi", "metadata": {f"k{n}": MARKER for n in range(100_000)}})
    assert "metadata" in message and str(Bounds.METADATA_KEYS) in message
    message = refused({"model": "openai", "prompt": "hi", "metadata": {"note": MARKER * 1000}})
    assert "metadata" in message and str(Bounds.METADATA_VALUE_CHARS) in message
    assert "metadata" in refused({"model": "openai", "prompt": "hi", "metadata": {"n": 10**30}})
    assert "metadata" in refused({"model": "openai", "prompt": "hi", "metadata": {"n": math.nan}})


@pytest.mark.parametrize(("options", "field", "bound"), [
    ({"max_tokens": 10**30}, "max_tokens", str(Bounds.MAX_TOKENS)),
    ({"thinking_budget": 10**30}, "thinking_budget", str(Bounds.MAX_TOKENS)),
    ({"timeout_s": math.inf}, "timeout_s", "finite"),
    ({"timeout_s": math.nan}, "timeout_s", "finite"),
    ({"timeout_s": 10**9}, "timeout_s", "86400"),
    ({"seed": 2**64}, "seed", str(Bounds.INT)),
    ({"stop": ["x"] * 17}, "stop", str(Bounds.STOP)),
    ({"stop": [MARKER * 1000]}, "stop", str(Bounds.STOP_CHARS)),
])
def test_options_are_bounded(options: dict[str, Any], field: str, bound: str) -> None:
    message = refused({"model": "openai", "prompt": "hi", "options": options})
    assert f"options.{field}" in message and bound in message


def test_a_deadline_in_the_past_is_refused_at_submit_but_a_queued_job_keeps_its_request() -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    message = refused({"model": "openai", "prompt": "hi", "deadline": past.isoformat()})
    assert "deadline" in message and "past" in message
    message = refused({"model": "openai", "prompt": "hi", "deadline": datetime.now(UTC) + timedelta(days=400)})
    assert "deadline" in message and str(Bounds.DEADLINE_DAYS) in message
    # a worker reading a queued job whose deadline passed meanwhile reads it (and fails the job), no refusal
    assert JobRequest(model="openai", prompt="hi", deadline=past).deadline == past


@pytest.mark.parametrize("request_", [
    {"model": "openai", "prompt": f"{MARKER}\ud800"},
    {"model": "openai", "prompt": "hi", "instruction": "\udfff"},
    {"model": "openai", "messages": [{"role": "user", "content": f"{MARKER}\ud800"}]},
    {"model": "openai", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
    {"model": "openai", "prompt": "hi", "metadata": {"note": "\ud800"}},
    {"model": "openai", "prompt": "hi", "options": {"stop": ["\ud800"]}},
    {"model": "openai", "kind": "json", "prompt": "hi", "output_schema": {"\ud800": 1}},
], ids=["prompt", "instruction", "messages", "message-part", "metadata", "stop", "output_schema"])
def test_a_lone_surrogate_is_refused_at_submit(request_: dict[str, Any]) -> None:
    message = refused(request_)
    assert "surrogate" in message


def test_messages_nested_deeper_than_the_bound_are_refused() -> None:
    content: Any = "bottom"
    for _ in range(500):
        content = [content]
    message = refused({"model": "openai", "messages": [{"role": "user", "content": content}]})
    assert "messages" in message and str(Bounds.JSON_DEPTH) in message
    schema: Any = {}
    for _ in range(100):
        schema = {"properties": schema}
    message = refused({"model": "openai", "kind": "json", "prompt": "hi", "output_schema": schema})
    assert "output_schema" in message and str(Bounds.JSON_DEPTH) in message
    assert "messages" in refused({"model": "openai", "messages": [{"role": "user", "content": str(n)}
                                                                   for n in range(Bounds.MESSAGES + 1)]})


def test_a_bad_database_url_is_refused_without_echoing_it() -> None:
    message = refused({"model": "openai", "kind": "tool_run", "prompt": "hi", "database": f"::{MARKER}::"})
    assert "database" in message


# -- the corpus: batch rows ---------------------------------------------------------------------------

_ROW_TEXTS = ['"\\ud800"', '"\\udfff x"', '"ok"', '"é🙂"', '""', '"  "', "1", "-5", "1" * 5000, "true", "null",
              "1e999", "NaN", "[]", "{}", '"' + "i" * 300 + '"', '"' + "i" * 255 + '"', '"' + "i" * 1_000_000 + '"']


def _row_line(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.7:
        fields = {}
        for name in rng.sample(["id", "question", "gold_sql", "evidence", "db_id", "schema", "extra"], rng.randint(0, 5)):
            fields[name] = rng.choice(_ROW_TEXTS)
        if rng.random() < 0.8:
            fields.setdefault("question", '"How many orders?"')
        body = ",".join(f'"{k}": {v}' for k, v in fields.items())
        return ("{" + body + "}").encode("utf-8")
    if pick < 0.8:
        depth = rng.choice([10, 100, 1000, 100_000])
        return ('{"question": "q", "x": ' + "[" * depth + "]" * depth + "}").encode()
    if pick < 0.9:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 60)))
    return rng.choice([b"", b"[1, 2]", b"not json", b'{"question": "q"', b"\xef\xbb\xbf{\"question\": \"q\"}", b"\r"])


def _csv_text(rng: random.Random) -> bytes:
    header = rng.choice([b"id,question,gold_sql", b"question", b"Question,ID", b"id,id,question", b"nothing"])
    rows = []
    for _ in range(rng.randint(0, 6)):
        cells = [rng.choice([b"1", b"x", b'"a,b"', b'"unclosed', b"i" * 300, b"\xff\xfe", "é".encode(), b""])
                 for _ in range(rng.randint(1, 4))]
        rows.append(b",".join(cells))
    return b"\r\n".join([header, *rows]) + b"\n"


def _check_items(path: Path, runner: BatchRunner, client: JobClient) -> tuple[int, int]:
    good = bad = 0
    try:
        for entry in iter_questions(path):
            if isinstance(entry, BadRow):
                bad += 1
                assert entry.reason
                continue
            assert isinstance(entry, Question)
            good += 1
            assert 0 < len(entry.id) <= Bounds.ID_CHARS
            json.dumps(entry.model_dump(by_alias=True), ensure_ascii=False).encode("utf-8")  # storable
            key = item_key("b-0123456789abcdef", entry.id)
            assert len(key) <= Bounds.IDEMPOTENCY_KEY_CHARS
            request = runner._request(entry.question, "b-0123456789abcdef", entry.id)
            try:
                client.validate(request)
            except InvalidJob:  # an item's own failure, never the batch's
                pass
    except BatchInputError as exc:
        assert str(path) in str(exc)
    return good, bad


def test_fuzz_corpus_of_batch_rows_is_read_as_questions_or_bad_rows(tmp_path: Path) -> None:
    client = offline_client()
    runner = BatchRunner(client, BatchOptions(model="openai"))
    rng = random.Random(1919)
    good = bad = 0
    for n in range(150):
        path = tmp_path / f"rows-{n}.jsonl"
        path.write_bytes(b"\n".join(_row_line(rng) for _ in range(rng.randint(1, 12))))
        g, b = _check_items(path, runner, client)
        good, bad = good + g, bad + b
        path = tmp_path / f"rows-{n}.csv"
        path.write_bytes(_csv_text(rng))
        g, b = _check_items(path, runner, client)
        good, bad = good + g, bad + b
    assert good > 100 and bad > 100, (good, bad)


def test_item_ids_too_long_for_a_key_are_keyed_by_their_hash_and_over_the_bound_are_bad_rows(tmp_path: Path) -> None:
    batch = "b-0123456789abcdef"
    assert item_key(batch, "q1") == f"{batch}:q1"
    long_id = "i" * Bounds.ID_CHARS
    key = item_key(batch, long_id)
    assert key == item_key(batch, long_id) and key.startswith(f"{batch}:#") and len(key) <= Bounds.IDEMPOTENCY_KEY_CHARS
    assert item_key(batch, long_id[:-1]) != key
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"id": "i" * 1_000_000, "question": "q"}) + "\n"
                    + json.dumps({"id": "ok", "question": "\ud800"}) + "\n"
                    + json.dumps({"id": "fine", "question": "q"}) + "\n")
    items = list(iter_questions(path))
    assert [type(item) for item in items] == [BadRow, BadRow, Question]
    assert str(Bounds.ID_CHARS) in items[0].reason and "surrogate" in items[1].reason


# -- batches end to end ---------------------------------------------------------------------------------


def test_long_item_ids_never_abort_a_batch_and_resume_runs_nothing_twice(stack: Stack) -> None:  # noqa: F811
    source = stack.dir / "long-ids.jsonl"
    written = write_questions(source, "longid", ["q01", "q05", "q07"])
    long_id, too_long = "L" * 240, "T" * (Bounds.ID_CHARS + 1)  # 240: fits a row, not a <batch>:<item> key
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows[0]["id"], rows[1]["id"] = long_id, too_long
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = stack.dir / "long-ids-results.jsonl"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc.stdout)["bad input rows"] == "1"
    assert set(results(out)) == {long_id, "q07"}
    assert all(record["status"] == "succeeded" for record in results(out).values())
    assert stack.requests_for("(longid-") == 2 and len(written) == 3

    resumed = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert summary(resumed.stdout)["items run"] == "0  (+2 done before)"
    assert stack.requests_for("(longid-") == 2  # nothing ran again


def test_an_item_whose_request_is_refused_fails_alone_and_the_batch_goes_on(stack: Stack) -> None:  # noqa: F811
    source = stack.dir / "refused-item.jsonl"
    write_questions(source, "refused", ["q01", "q05"])
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows[0]["question"] += " " + "padding " * 5000  # over the DQ_MAX_PROMPT_BYTES below, within a row's bound
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = stack.dir / "refused-item-results.jsonl"
    env = {**stack.env, "DQ_MAX_PROMPT_BYTES": "20000"}
    proc = dq(Stack(stack.dir, env, stack.fake, stack.shop_url, stack.store, stack.worker),
              "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = results(out)
    assert (items["q01"]["status"], items["q01"]["error_code"], items["q01"]["job_id"]) == ("failed", "invalid_request",
                                                                                             None)
    assert "prompt" in items["q01"]["error"] and "20000" in items["q01"]["error"]
    assert items["q05"]["status"] == "succeeded"
    assert stack.requests_for("(refused-") == 1


def test_out_is_never_appended_to_by_surprise(stack: Stack) -> None:  # noqa: F811
    source = stack.dir / "out-exists.jsonl"
    write_questions(source, "outexists", ["q01"])
    out = stack.dir / "out-exists-results.jsonl"
    out.write_text('{"earlier": "results"}\n')
    refused_run = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out))
    assert_one_error_line(refused_run, str(out), "--resume", "--force")
    assert out.read_text() == '{"earlier": "results"}\n' and stack.requests_for("(outexists-") == 0

    both = dq(stack, "batch", str(source), "--model", MODEL, "--out", str(out), "--resume", "--force")
    assert both.returncode == 2 and "not allowed with" in both.stderr

    forced = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert set(results(out)) == {"q01"}  # replaced: the earlier line is gone

    out.write_text('{"id": "earlier"}\n')
    resumed = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert out.read_text().startswith('{"id": "earlier"}\n')  # --resume appends to what was there


# -- schedules ----------------------------------------------------------------------------------------


def _schedules(entries: dict[str, Any]) -> AgentConfig:
    return AgentConfig.from_dict({"agent": {"schedules": entries}})


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "-rf", "", "x" * 65, "a b"])
def test_a_schedule_name_that_is_not_a_slug_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="name is letters, digits"):
        load_schedules(_schedules({name: {"cron": "0 2 * * *", "input": "q.jsonl", "model": "m"}}))


@pytest.mark.parametrize("field", ["input", "model", "db", "dialect", "prompt_template"])
def test_a_schedule_value_that_would_be_an_option_is_a_config_error(field: str) -> None:
    entry = {"cron": "0 2 * * *", "input": "q.jsonl", "model": "m", field: "--out=/tmp/elsewhere.jsonl"}
    with pytest.raises(ConfigError, match=f"{field}: .*must not start with '-'"):
        load_schedules(_schedules({"nightly": entry}))
    with pytest.raises(ConfigError, match="tools: .*must not start with '-'"):
        load_schedules(_schedules({"nightly": {"cron": "0 2 * * *", "input": "q.jsonl", "model": "m",
                                               "tools": ["ok", "--force"]}}))


def test_a_schedules_command_reads_back_as_exactly_its_values(tmp_path: Path) -> None:
    from datus_queue.tasks.cli.main import build_parser

    schedule = BatchSchedule(name="nightly", cron="0 2 * * *", input="in put.jsonl", model="m",
                             db="sqlite:///w.db", tools=["a", "b"], budget_usd=5, prompt_template="t.txt")
    results_path = tmp_path / "out.jsonl"
    with mock.patch.dict(os.environ, schedule.environment()):  # the database: in dq batch's environment
        args = build_parser().parse_args(schedule.command("nightly@2026-01-02T02:00Z", results_path)[3:])
    assert args.input == str(Path("in put.jsonl").absolute()) and Path(args.input).is_absolute()
    assert (args.model, args.db, args.tools, args.out, args.run_id, args.resume, args.force) == (
        "m", "sqlite:///w.db", ["a", "b"], str(results_path), "nightly@2026-01-02T02:00Z", True, False)
    assert (args.budget_usd, args.prompt_template) == (5.0, "t.txt")


def test_run_schedule_never_writes_outside_the_schedule_dir(tmp_path: Path) -> None:
    store = mock.Mock()
    settings = Settings(schedule_dir=str(tmp_path / "runs"), database_url="sqlite://")
    config = _schedules({"nightly": {"cron": "0 2 * * *", "input": "q.jsonl", "model": "m"}})
    assert run_schedule(store, settings, config, "../../x") is None
    assert not store.claim_schedule_run.called
    assert list(tmp_path.iterdir()) == []


NIGHTLY = BatchSchedule(name="nightly", cron="0 2 * * *", input="q.jsonl", model="m")
HOURLY = BatchSchedule(name="hourly", cron="0 * * * *", input="q.jsonl", model="m")
NOW = datetime(2026, 3, 4, 5, 0, tzinfo=UTC)


@pytest.mark.parametrize(("slot", "why"), [
    (datetime(2026, 3, 4, 2, 1, tzinfo=UTC), "not a slot"),
    (datetime(2026, 3, 4, 2, 0, 30, tzinfo=UTC), "not a slot"),
    (datetime(2026, 3, 5, 2, 0, tzinfo=UTC), "in the future"),
    (datetime(2026, 3, 3, 2, 0, tzinfo=UTC), "not due"),
    (datetime(1999, 1, 1, 2, 0, tzinfo=UTC), "not due"),
    (datetime(2026, 3, 4, 2, 0), "no timezone"),
])
def test_a_slot_that_is_not_due_is_refused(slot: datetime, why: str) -> None:
    with pytest.raises(SlotRefused, match=why):
        check_slot(NIGHTLY, slot, NOW)


def test_the_slots_that_are_due() -> None:
    check_slot(NIGHTLY, datetime(2026, 3, 4, 2, 0, tzinfo=UTC), NOW)  # the latest, three hours late: the catch-up
    check_slot(HOURLY, datetime(2026, 3, 4, 5, 0, tzinfo=UTC), NOW + timedelta(seconds=1))
    check_slot(HOURLY, datetime(2026, 3, 4, 5, 0, tzinfo=UTC), NOW - timedelta(seconds=30))  # the beat's clock ahead
    # the slot before the latest, while the latest has been due less than the grace: its message may be queued
    check_slot(HOURLY, datetime(2026, 3, 4, 4, 0, tzinfo=UTC), NOW + timedelta(seconds=SLOT_GRACE_S - 1))
    with pytest.raises(SlotRefused, match="not due"):
        check_slot(HOURLY, datetime(2026, 3, 4, 4, 0, tzinfo=UTC), NOW + timedelta(seconds=SLOT_GRACE_S + 60))


def test_a_forged_run_schedule_message_runs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from datus_queue.tasks.maintenance import tasks

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        context = mock.Mock(store=store, settings=Settings(schedule_dir=str(tmp_path / "runs"), database_url="sqlite://"),
                            agent_config=_schedules({"nightly": {"cron": "0 2 * * *", "input": "q.jsonl", "model": "m"}}),
                            redis=mock.MagicMock())
        with mock.patch.object(tasks, "get_context", return_value=context), caplog.at_level(logging.ERROR):
            for slot in ["1999-01-01T02:00:00+00:00", "2999-01-01T02:00:00+00:00", "2026-01-01T02:07:00+00:00",
                         "2026-01-01T02:00:00", "not a time"]:
                report = tasks.run_schedule_task("nightly", slot)
                assert report["refused"], report
        assert store.schedule_runs("nightly") == []
        assert not (tmp_path / "runs").exists()
        assert caplog.text.count("dq.run_schedule refused, nothing run") == 5
    finally:
        store.close()
