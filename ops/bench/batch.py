"""``dq batch`` at scale: items per second, and the batch client's peak memory as the batch grows.

    python ops/bench/batch.py [--items 10000] [--small 1000] [--workers 2] [--latency-ms 50]
                              [--concurrency 100] [--max-in-flight 200] [--measure both|rss|tracemalloc]

Synthetic questions (the bundled sample's twenty, repeated with unique ids and texts, gold SQL
kept) go through TWO worker processes (``--workers``) and the fake provider server in a process
of its own, scripted to answer valid SQL forever; a private ``redis-server`` (or
``DQ_BENCH_REDIS_URL``), a temporary SQLite job store (or ``DQ_BENCH_DATABASE_URL``), and the
sample shop database for the schema, the execution and the scoring of every item.

The same job system runs the small batch and the large one, each measured twice:

- ``rss``: ``dq batch`` as a user runs it, in a subprocess: items/s (wall time, process start
  included) and its peak RSS (``ru_maxrss`` from ``wait4``, the kernel's high-water mark);
- ``tracemalloc``: `BatchRunner` in a fresh interpreter with tracemalloc started after the
  imports: the peak of what the run itself allocated (RSS is mostly imported code, which
  would hide growth).

Target: flat, the large batch's peak within ~1.2x of the small one's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fake_server_process, job_system

from datus_queue.tasks.cli.services import worker_process

ANSWER = "```sql\nSELECT COUNT(*) FROM customers\n```"
TARGET_RATIO = 1.2
_CHILD_CODE = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
from datus_queue.tasks.batch.runner import BatchOptions, BatchRunner
from datus_queue.tasks.batch.report import ProgressView
from datus_queue.tasks.client import JobClient
import datus_queue.tasks.batch.scoring, sqlglot, sqlalchemy  # imported before the measurement starts

source, db, out, in_flight = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
client = JobClient()
options = BatchOptions(model="bench", db_url=db, out=out, max_in_flight=in_flight)
runner = BatchRunner(client, options, ProgressView())
tracemalloc.start()
start = time.perf_counter()
batch_id, stats = runner.run(Path(source))
elapsed = time.perf_counter() - start
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(json.dumps({"batch_id": batch_id, "items": stats.items, "failed": stats.failed, "elapsed": elapsed,
                  "peak_bytes": peak, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_questions(path: Path, count: int, tag: str) -> None:
    from datus_queue.tasks.batch.sample import sample_questions_path

    rows = [json.loads(line) for line in sample_questions_path().read_text(encoding="utf-8").splitlines()
            if line.strip()]
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            row = rows[n % len(rows)]
            out.write(json.dumps({"id": f"{tag}-{n:06d}", "question": f"{row['question']} (#{n})",
                                  "gold_sql": row["gold_sql"]}) + "\n")


@contextlib.contextmanager
def redis_database(workdir: Path) -> Iterator[str]:
    if url := os.environ.get("DQ_BENCH_REDIS_URL"):
        yield url
        return
    from datus_queue.tasks.cli.services import local_redis

    with local_redis(workdir) as url:
        yield url


def wait_for_workers(client: Any, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(client.app.control.ping(timeout=0.5) or []) >= count:
            return
    raise TimeoutError(f"fewer than {count} workers answered a ping within {timeout_s:.0f}s")


def wait_child(proc: subprocess.Popen[Any], workers: list[subprocess.Popen[bytes]]) -> Any:
    """Wait for ``proc`` and return its rusage (``wait4``: this child's own peak RSS). If a
    worker dies meanwhile the batch could only wait forever: stop it and say so."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        dead = [worker.pid for worker in workers if worker.poll() is not None]
        if dead:
            proc.kill()
            proc.wait()
            raise SystemExit(f"worker process(es) {dead} exited during the run (see worker-*.log): stopped")
        time.sleep(0.1)


def run_dq(env: dict[str, str], source: Path, db_url: str, out: Path, in_flight: int,
           workers: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """``dq batch`` in a subprocess: wall time and its peak RSS (ru_maxrss, KB)."""
    command = [sys.executable, "-m", "datus_queue.tasks.cli", "batch", str(source), "--model", "bench", "--db", db_url,
               "--out", str(out), "--max-in-flight", str(in_flight)]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(command, env={**env, "COLUMNS": "120"}, stdout=handle, stderr=subprocess.STDOUT)
        usage = wait_child(proc, workers)
    elapsed = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"dq batch exited with {proc.returncode}:\n{text[-2000:]}")
    failed = re.search(r"jobs failed\s*│\s*(\d+)", text)
    return {"elapsed": elapsed, "maxrss_kb": usage.ru_maxrss, "failed": int(failed.group(1)) if failed else -1,
            "lines": sum(1 for _ in out.open())}


def run_inprocess(env: dict[str, str], source: Path, db_url: str, out: Path, in_flight: int,
                  workers: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """`BatchRunner` in a fresh interpreter under tracemalloc."""
    log = out.with_suffix(".log")
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(source), db_url, str(out), str(in_flight)],
                                env=env, stdout=handle, stderr=subprocess.STDOUT)
        wait_child(proc, workers)
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"the in-process batch failed:\n{text[-2000:]}")
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    result["lines"] = sum(1 for _ in out.open())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000, help="the large batch")
    parser.add_argument("--small", type=int, default=1_000, help="the small batch it is compared with")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=100, help="jobs in flight per worker process")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--max-in-flight", type=int, default=200, help="the batch client's --max-in-flight")
    parser.add_argument("--measure", choices=["both", "rss", "tracemalloc"], default="both")
    args = parser.parse_args()

    from datus_queue.tasks.batch.sample import build_sample_db

    workdir = Path(tempfile.mkdtemp(prefix="dq-bench-batch-"))
    db_url = build_sample_db(workdir / "shop.db")
    sizes = [args.small, args.items]
    modes = ["rss", "tracemalloc"] if args.measure == "both" else [args.measure]
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_database(workdir))
        fake_url = stack.enter_context(fake_server_process(args.latency_ms))
        # the standalone fake answers with an echo unless scripted: valid SQL, forever
        httpx.post(f"{fake_url}/_fake/script", json={"reply": {"text": ANSWER}, "times": None}).raise_for_status()
        client, env = stack.enter_context(job_system(fake_url, redis_url, os.environ.get("DQ_BENCH_DATABASE_URL")))
        workers = [stack.enter_context(worker_process(env, ["openai"], args.concurrency,
                                                      workdir / f"worker-{n + 1}.log"))
                   for n in range(args.workers)]
        wait_for_workers(client, args.workers)
        print(f"dq batch: {args.workers} worker processes (-c {args.concurrency}), fake latency "
              f"{args.latency_ms:g} ms, --max-in-flight {args.max_in_flight}, job store "
              f"{client.store.url.split('://')[0]}, files in {workdir}", flush=True)
        for mode in modes:
            for size in sizes:
                tag = f"{mode}-{size}"
                source, out = workdir / f"{tag}.jsonl", workdir / f"{tag}-results.jsonl"
                write_questions(source, size, tag)
                run = run_dq if mode == "rss" else run_inprocess
                result = measured[(mode, size)] = run(env, source, db_url, out, args.max_in_flight, workers)
                if result["lines"] != size or result["failed"]:
                    print(f"  warning: {result['lines']} result lines for {size} items, {result['failed']} failed")
                peak = (f"peak RSS {result['maxrss_kb'] / 1024:7.1f} MB" if mode == "rss"
                        else f"tracemalloc peak {result['peak_bytes'] / 2**20:7.2f} MB "
                             f"(RSS {result['maxrss_kb'] / 1024:.0f} MB)")
                print(f"  {'dq batch' if mode == 'rss' else 'BatchRunner':12} {size:>7,} items  "
                      f"{result['elapsed']:7.1f} s  {size / result['elapsed']:7.1f} items/s  {peak}", flush=True)
    ok = True
    for mode in modes:
        key = "maxrss_kb" if mode == "rss" else "peak_bytes"
        ratio = measured[(mode, args.items)][key] / measured[(mode, args.small)][key]
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        ok &= ratio <= TARGET_RATIO
        what = "peak RSS of dq batch" if mode == "rss" else "tracemalloc peak of BatchRunner"
        print(f"  {what}: {args.items:,} / {args.small:,} items = {ratio:.2f}x   "
              f"target <= {TARGET_RATIO}x: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
