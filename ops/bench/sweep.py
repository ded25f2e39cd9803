"""What the sweeper and the leases cost, against baselines measured in the same run.

1. Finding live messages (`tasks.maintenance.live_messages`) for 1,000 overdue jobs behind a
   backlog of 10,000 waiting messages (prompts of ~1 KB) and 200 unacknowledged ones, against
   the plain way: LRANGE/HGETALL everything into Python and parse each message. Also how long
   Redis is busy with one call (its SLOWLOG: the longest script call against the longest
   LRANGE of the plain way).
2. Renewing the leases of 200 running jobs: one statement (`tasks.store.writes.lease`, as the
   renewer submits them) against 200 statements in one transaction, and against 200
   transactions (a write per job), on SQLite.

    python ops/bench/sweep.py [--backlog 10000] [--overdue 1000] [--jobs 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import redis

from datus_queue.tasks.app import create_app
from datus_queue.tasks.cli.services import local_redis
from datus_queue.tasks.maintenance.live_messages import scan_messages
from datus_queue.tasks.schemas import JobRequest
from datus_queue.tasks.settings import Settings
from datus_queue.tasks.store import JobStore
from datus_queue.tasks.store import writes as job_writes

RUNS = 5


def _fill(url: str, backlog: int, unacked: int) -> list[str]:
    app = create_app(Settings(redis_url=url))
    prompt = "How many orders were placed last month? " * 25  # ~1 KB
    ids = [uuid.uuid4().hex for _ in range(backlog + unacked)]
    with app.producer_or_acquire() as producer:
        for job_id in ids:
            app.send_task("dq.generate", args=(job_id, {"provider": "openai", "request": {"prompt": prompt}}),
                          task_id=job_id, queue="llm.openai", producer=producer)
    client = redis.Redis.from_url(url)
    now = time.time()
    for _ in range(unacked):  # taken by workers, as kombu records them
        raw = client.rpop("llm.openai")
        message = json.loads(raw)
        tag = message["properties"]["delivery_tag"]
        client.hset("unacked", tag, json.dumps([message, "", "llm.openai"]))
        client.zadd("unacked_index", {tag: now})
    app.close()
    return ids


def _plain_scan(client: redis.Redis, wanted: set[str]) -> set[str]:
    found = {json.loads(raw)["headers"]["id"] for raw in client.lrange("llm.openai", 0, -1)}
    found |= {json.loads(raw)[0]["headers"]["id"] for raw in client.hgetall("unacked").values()}
    return found & wanted


def _longest_call_ms(client: redis.Redis, command: str) -> float:
    """The longest call of ``command`` in Redis's SLOWLOG (server time, microseconds there)."""
    entries = client.slowlog_get(1024)
    durations = [e["duration"] for e in entries if e["command"].split()[0].upper() == command.encode()]
    return max(durations, default=0) / 1000


def bench_scan(url: str, backlog: int, overdue: int) -> None:
    ids = _fill(url, backlog, 200)
    client = redis.Redis.from_url(url)
    wanted = ids[:overdue // 2] + [uuid.uuid4().hex for _ in range(overdue - overdue // 2)]  # half of them lost
    ours, plain = [], []
    for _ in range(RUNS):
        start = time.perf_counter()
        live = scan_messages(client, wanted, ["openai"], datetime.now(UTC), 300).live
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert _plain_scan(client, set(wanted)) == live
        plain.append(time.perf_counter() - start)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    scan_messages(client, wanted, ["openai"], datetime.now(UTC), 300)
    longest_script = _longest_call_ms(client, "EVALSHA")
    client.slowlog_reset()
    _plain_scan(client, set(wanted))
    longest_plain = max(_longest_call_ms(client, "LRANGE"), _longest_call_ms(client, "HGETALL"))
    o, p = statistics.median(ours), statistics.median(plain)
    print(f"live messages: {overdue} overdue jobs, {backlog} waiting + 200 unacked messages")
    print(f"  Lua scan, ids only     {o * 1000:8.1f} ms  (median of {RUNS}); longest call in Redis "
          f"{longest_script:.2f} ms")
    print(f"  baseline: fetch+parse  {p * 1000:8.1f} ms  ratio {o / p:.2f}; longest call in Redis "
          f"{longest_plain:.2f} ms; {sum(len(m) for m in client.lrange('llm.openai', 0, -1)) / 1e6:.1f} MB "
          "to the client (the scan sends ids only)")


def bench_leases(jobs: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="dq-bench-sweep-"))
    store = JobStore(f"sqlite:///{directory / 'jobs.db'}")
    ids = [store.create_job(uuid.uuid4().hex, JobRequest(model="openai:gpt-4o", prompt="x"), "openai")[0]
           for _ in range(jobs)]
    for job_id in ids:
        store.mark_running(job_id, 1)
    timings: dict[str, list[float]] = {"one statement": [], "a statement each": [], "a transaction each": []}
    for _ in range(RUNS):
        start = time.perf_counter()
        store._write([job_writes.lease(job_id, 300) for job_id in ids])  # what one renewal round is
        timings["one statement"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with store._begin(write=True) as conn:
            for job_id in ids:
                job_writes.apply(conn, [job_writes.lease(job_id, 300)])
        timings["a statement each"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for job_id in ids:
            store._write([job_writes.lease(job_id, 300)])
        timings["a transaction each"].append(time.perf_counter() - start)
    base = statistics.median(timings["a transaction each"])
    print(f"lease renewal of {jobs} running jobs (SQLite)")
    for name, values in timings.items():
        value = statistics.median(values)
        print(f"  {name:20s} {value * 1000:8.1f} ms  ratio to a transaction each {value / base:.3f}")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--overdue", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_redis(Path(tmp)) as url:
        bench_scan(url, args.backlog, args.overdue)
    bench_leases(args.jobs)


if __name__ == "__main__":
    main()
