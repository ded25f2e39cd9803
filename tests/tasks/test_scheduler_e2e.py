"""The scheduler end to end: real `dq beat` and `dq worker` subprocesses on a real Redis, the
job store, the fake provider. What `dq beat` still does: pruning, scheduled batches, one beat
sending and a standby taking over; and the dead letters that a worker's sweeps leave. Short
settings (`SHORT_SCHEDULER`: a 3 s lock, so a handover takes seconds; a sweep every second and a
2 s lease) — recovery with the defaults is in test_recovery.py. The timeouts only guard against
hanging; the assertions are about what happened (calls the fake saw, slots fired and sent)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from datus.models.scripted import Reply
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks import keys
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import SHORT_SCHEDULER, JobEnv, StartBeat, StartWorker, generations, wait_for


def maintenance_runs(client: redis.Redis, task: str) -> int:
    return int(client.hget(keys.maintenance(task), "runs") or 0)


# -- two beats -----------------------------------------------------------------------------------


def _sends(*beats: Any) -> int:
    return sum(beat.log().count("Sending due task prune (dq.prune)") for beat in beats)


def _slots(client: redis.Redis, entry: str) -> int:
    meta = client.hget(keys.beat_entry(entry), "meta")
    return int(json.loads(meta).get("total_run_count", 0)) if meta else 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("settings", ["short", "defaults"])
def test_two_beats_one_sends_and_the_standby_takes_over_each_slot_once(
        settings: str, worker: StartWorker, beat: StartBeat, dq_redis: redis.Redis) -> None:
    from datus_queue.tasks.settings import Settings

    # short: a 3 s lock (`SHORT_SCHEDULER`), so the handover takes seconds; defaults: the 30 s lock a
    # user gets, renewed and retried every fifth of it. Either way DQ_PRUNE_INTERVAL_S is 1 s (not an
    # hour): an entry every second gives slots to count
    short = settings == "short"
    lock_timeout_s = float(SHORT_SCHEDULER["DQ_BEAT_LOCK_TIMEOUT_S"]) if short else \
        Settings.model_construct().beat_lock_timeout_s
    prune_often = {"DQ_PRUNE_INTERVAL_S": "1"}
    worker("openai", env=SHORT_SCHEDULER if short else None)
    first = beat(env=prune_often, short=short)
    second = beat(env=prune_often, wait="standby", short=short)
    wait_for(lambda: maintenance_runs(dq_redis, "prune") >= 3, 60, "three prunes")
    assert "beat: Acquired lock" not in second.log() and _sends(second) == 0  # a hot standby sends nothing
    first.kill()  # SIGKILL: its lock is not released; it expires after the lock timeout
    ttl_ms = dq_redis.pttl(keys.beat_lock())
    assert 0 < ttl_ms <= lock_timeout_s * 1000  # never held for longer than the timeout
    # the standby tries the lock every fifth of the timeout: it holds it within one more try
    wait_for(lambda: "beat: Acquired lock" in second.log(), ttl_ms / 1000 + lock_timeout_s / 5 + 10,
             "the standby to take the lock")
    after = maintenance_runs(dq_redis, "prune")
    wait_for(lambda: maintenance_runs(dq_redis, "prune") >= after + 3, 60, "prunes sent by the new holder")
    second.terminate()
    assert second.wait_exit(20) == 0
    # redbeat records each slot it fires in the entry before sending its message; every send is
    # logged before that. Sends of the same slot by both beats would outnumber the slots; the
    # one extra send allowed is the holder's last, if it was killed between its log line and
    # recording the slot.
    slots, sends = _slots(dq_redis, "prune"), _sends(first, second)
    assert slots <= sends <= slots + 1, (slots, sends)
    assert _sends(second) >= 3


# -- a scheduled batch -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_scheduled_batch_runs_at_its_slot_and_not_twice(job_env: JobEnv, worker: StartWorker, beat: StartBeat,
                                                          client: JobClient, fake: FakeProviderServer) -> None:
    questions = [("q1", "How many customers are there?", "SELECT COUNT(*) FROM customers"),
                 ("q2", "How many orders are there?", "SELECT COUNT(*) FROM orders")]
    input_path = job_env.dir / "nightly.jsonl"
    input_path.write_text("".join(json.dumps({"id": i, "question": q, "gold_sql": g}) + "\n" for i, q, g in questions))
    for _, question, gold in questions:
        fake.script.add(Reply(text=f"```sql\n{gold}\n```"), match=question)
    # one slot a minute or two from now (cron is in UTC): it fires once during this test
    now = datetime.now(UTC)
    minute = (now + timedelta(minutes=1 if now.second < 40 else 2)).minute
    config = yaml.safe_load(job_env.agent_yml.read_text())
    config["agent"]["schedules"] = {"nightly": {"cron": f"{minute} * * * *", "input": str(input_path),
                                                "model": "openai", "db": f"sqlite:///{job_env.shop_db}"}}
    job_env.agent_yml.write_text(yaml.safe_dump(config))
    env = {**SHORT_SCHEDULER, "DQ_SCHEDULE_DIR": str(job_env.dir / "schedules")}
    running = worker("openai", env=env)
    first, second = beat(env=env), beat(env=env, wait="standby")

    wait_for(lambda: [r for r in client.store.schedule_runs("nightly") if r.status != "running"], 200,
             "the scheduled batch to finish")
    [run] = client.store.schedule_runs("nightly")
    assert (run.status, run.exit_code, run.slot.minute, run.slot.second) == ("completed", 0, minute, 0)
    batch = client.store.get_batch(run.batch_id)
    assert batch is not None and batch.name == f"nightly@{run.slot:%Y-%m-%dT%H:%MZ}" and batch.status.value == "completed"
    summary = client.store.batch_summary(run.batch_id)
    assert (summary.total, summary.counts["succeeded"]) == (2, 2)
    results = [json.loads(line) for line in Path(run.results).read_text().splitlines()]
    assert sorted(r["id"] for r in results) == ["q1", "q2"] and all(r["match"] for r in results)
    assert "execution accuracy" in Path(run.log).read_text()  # the batch's summary, in its log
    assert [len(generations(fake, question)) for _, question, _ in questions] == [1, 1]
    assert _sends_of(first, second, entry="batch:nightly") == 1

    # the slot's message delivered again (a redelivery, or a second beat in a handover): nothing runs
    client.app.send_task("dq.run_schedule", args=["nightly"], kwargs={"slot": run.slot.isoformat()},
                         queue="dq.maintenance")
    wait_for(lambda: "has run already" in running.log(), 30, "the second delivery to be turned away")
    assert len(client.store.schedule_runs("nightly")) == 1
    assert [len(generations(fake, question)) for _, question, _ in questions] == [1, 1]


def _sends_of(*beats: Any, entry: str) -> int:
    return sum(beat.log().count(f"Sending due task {entry} ") for beat in beats)


# -- dead letters ------------------------------------------------------------------------------------


def dq(job_env: JobEnv, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
    env.update(DQ_CONFIG=str(job_env.agent_yml), DQ_REDIS_URL=job_env.redis_url, DQ_DATABASE_URL=job_env.database_url,
               COLUMNS="250")
    return subprocess.run([*dq_command(), *args], env=env, cwd=job_env.dir, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.slow
def test_dead_letters_are_listed_shown_replayed_once_fixed_and_purged(
        job_env: JobEnv, worker: StartWorker, beat: StartBeat, client: JobClient, fake: FakeProviderServer) -> None:
    # a 2 s lease and a sweep every second (SHORT_SCHEDULER): the dead worker's job comes back in
    # seconds; recovery with the defaults is test_recovery.py's. Dead at its first redelivery.
    env = {**SHORT_SCHEDULER, "DQ_DEAD_LETTER_THRESHOLD": "1"}
    # poison: the worker running it dies (here: killed while the call hangs) — delivered again, it is dead
    fake.script.add(Reply(text="never seen", latency_s=60), match="poison-job")
    first = worker("openai", env=env)
    poison = client.submit({"model": "openai", "prompt": "poison-job", "stream": False})
    wait_for(lambda: generations(fake, "poison-job"), 30, "the poison job's call")
    first.kill()
    worker("openai", env=env)
    wait_for(lambda: client.status(poison) is JobStatus.DEAD, 60, "the poison job to be dead-lettered")
    # a payload that is not a job's, for a job the client wrote (an old client, a bad producer),
    # smuggling a key; and raw bytes on the queue
    broken = client.store.create_job("job-broken-payload", client.validate(
        {"model": "openai", "prompt": "broken payload"})[0], "openai")[0]
    client.app.send_task("dq.generate", args=(broken, {"provider": "openai", "api_key": "sk-SMUGGLED-1234"}),
                         queue="llm.openai")
    client.redis.lpush("llm.openai", b"\x00not json{")
    wait_for(lambda: len(client.store.dead_letters()) == 3, 30, "three dead letters")

    listed = dq(job_env, "dead", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
    message_id = next(dead_id for dead_id in lines if dead_id.startswith("m-"))
    assert set(lines) == {poison, broken, message_id}
    assert re.search(r"delivered 2 times \(1 redeliveries without a result\).* generate +openai +dead", lines[poison])
    assert re.search(r"invalid payload: .*generate +openai +failed", lines[broken])
    assert re.search(r"undecodable message: .* message +- +-", lines[message_id])
    assert "SMUGGLED" not in listed.stdout and "SMUGGLED" not in dq(job_env, "dead", "show", broken).stdout
    shown = json.loads(dq(job_env, "dead", "show", poison).stdout)
    assert shown["job"]["status"] == "dead" and shown["request"]["prompt"] == "poison-job"

    refused = dq(job_env, "dead", "replay", message_id)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"dead letter {message_id} is a message that was not a job" in refused.stderr

    # "fixed": the workers are healthy now and the stored requests are good
    replayed = dq(job_env, "dead", "replay", poison)
    assert replayed.returncode == 0 and replayed.stdout.strip() == f"replayed {poison}"
    again = dq(job_env, "dead", "replay", "--all")
    assert again.returncode == 0 and f"replayed {broken}" in again.stdout and "1 replayed, 1 skipped" in again.stdout
    for job_id in (poison, broken):
        result = client.result(job_id, timeout=60)
        assert result.status is JobStatus.SUCCEEDED, result.error
        row = client.store.get(job_id)
        assert row.replays == 1 and row.replayed_at is not None and row.attempts == 1
    assert len(generations(fake, "poison-job")) == 2  # the call the dead worker made, and the replay's
    assert "replays=1" in dq(job_env, "status", poison).stdout

    assert dq(job_env, "dead", "purge", "--older-than", "7d").stdout.strip() == "purged 0 dead letter(s)"
    assert dq(job_env, "dead", "purge", message_id).stdout.strip() == "purged 1 dead letter(s)"
    assert dq(job_env, "dead", "list").stdout.strip() == "no dead letters"
