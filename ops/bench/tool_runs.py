"""Tool-run batches against generate batches, in the same run: what a tool run costs beyond
its model calls, now that MCP servers are pooled and every step is checkpointed.

    python ops/bench/tool_runs.py [--questions 60] [--latency-ms 50] [--concurrency 200] [--rounds 2]

The bundled sample's questions (repeated to ``--questions``, each made unique) go through
``dq batch`` — as a user runs it, in a subprocess — against ONE worker process and the fake
provider (its own process, answering as in ``dq demo``: in a tool run it first lists the tables,
then runs its query, then answers; three model calls and two MCP tool calls per question, on
the shipped SQL server). Each round runs a generate batch and a tool_run batch of the same
questions; the medians over the rounds are compared.

Printed: items/s of both modes, the tool_run / generate wall-time ratio (target: at most 2x),
and from the job store the per-job overhead over the model calls: each job's run time (start
to finish, in the store) minus its model requests times the fake's latency, median and p90.
The first tool_run round includes starting the pooled SQL server (every job of the batch waits
for it); later rounds find it running, as a long-lived worker does.

Before the pool, each tool run started its own SQL server process: 1.7 items/s against 34
for generate (issue 13).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import job_system

from datus_queue.tasks.cli.services import free_port, worker_process

TARGET_RATIO = 2.0
_FAKE_CODE = """
import signal, sys, threading
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.cli.demo import SampleModel
server = FakeProviderServer(port=int(sys.argv[1]), latency_s=float(sys.argv[2]))
server.script.fallback = SampleModel()
server.start()
print("ready", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
"""


@contextlib.contextmanager
def sample_fake(latency_ms: float) -> Iterator[str]:
    """The fake provider in a process of its own, answering the sample's questions."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FAKE_CODE, str(port), str(latency_ms / 1000)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "the fake did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def redis_database(workdir: Path) -> Iterator[str]:
    if url := os.environ.get("DQ_BENCH_REDIS_URL"):
        yield url
        return
    from datus_queue.tasks.cli.services import local_redis

    with local_redis(workdir) as url:
        yield url


def write_questions(path: Path, count: int, tag: str) -> None:
    from datus_queue.tasks.batch.sample import sample_questions_path

    rows = [json.loads(line) for line in sample_questions_path().read_text(encoding="utf-8").splitlines()
            if line.strip()]
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            row = rows[n % len(rows)]
            # the question text stays the sample's (the fake finds its SQL by it); the id is unique
            out.write(json.dumps({"id": f"{tag}-{n:04d}", "question": f"{row['question']}",
                                  "gold_sql": row["gold_sql"]}) + "\n")


def run_batch(env: dict[str, str], source: Path, db_url: str, mode: str, out: Path, in_flight: int) -> float:
    command = [sys.executable, "-m", "datus_queue.tasks.cli", "batch", str(source), "--model", "bench", "--db", db_url,
               "--mode", mode, "--out", str(out), "--max-in-flight", str(in_flight)]
    start = time.perf_counter()
    done = subprocess.run(command, env={**env, "COLUMNS": "120"}, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"dq batch --mode {mode} exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    failed = re.search(r"jobs failed\s*│\s*(\d+)", done.stdout)
    if failed and int(failed.group(1)):
        print(f"  warning: {failed.group(1)} {mode} jobs failed")
    return elapsed


def overheads(client: Any, batch_name: str, latency_s: float) -> list[float]:  # items are named <batch>-NNNN
    """Per job of the batch: run time in the store minus its model requests x the latency (ms)."""
    found = []
    for job in client.store.list_jobs(limit=100_000):
        if not (job.item_id or "").startswith(f"{batch_name}-"):
            continue
        requests = int((job.usage or {}).get("requests", 1))
        if job.run_ms is not None:
            found.append(job.run_ms - requests * latency_s * 1000)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=200, help="the worker's jobs in flight")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from datus_queue.tasks.batch.sample import build_sample_db

    workdir = Path(tempfile.mkdtemp(prefix="dq-bench-tool-runs-"))
    db_url = build_sample_db(workdir / "shop.db")
    walls: dict[str, list[float]] = {"generate": [], "tool_run": []}
    costs: dict[str, list[float]] = {"generate": [], "tool_run": []}
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_database(workdir))
        fake_url = stack.enter_context(sample_fake(args.latency_ms))
        client, env = stack.enter_context(job_system(fake_url, redis_url, os.environ.get("DQ_BENCH_DATABASE_URL")))
        stack.enter_context(worker_process(env, ["openai"], args.concurrency, workdir / "worker.log"))
        while not client.app.control.ping(timeout=0.5):
            pass
        httpx.get(f"{fake_url}/_fake/health").raise_for_status()
        print(f"{args.questions} questions, one worker (-c {args.concurrency}), fake latency {args.latency_ms:g} ms, "
              f"job store {client.store.url.split('://')[0]}, files in {workdir}", flush=True)
        for round_ in range(1, args.rounds + 1):
            for mode in ("generate", "tool_run"):
                name = f"{mode}-{round_}"
                source = workdir / f"{name}.jsonl"
                write_questions(source, args.questions, name)
                elapsed = run_batch(env, source, db_url, mode, workdir / f"{name}-results.jsonl", args.questions)
                walls[mode].append(elapsed)
                spent = overheads(client, name, args.latency_ms / 1000)
                costs[mode] += spent
                print(f"  round {round_} {mode:9} {elapsed:6.2f} s  {args.questions / elapsed:6.1f} items/s  per-job "
                      f"overhead median {statistics.median(spent):6.1f} ms", flush=True)
    generate, tool_run = statistics.median(walls["generate"]), statistics.median(walls["tool_run"])
    ratio = tool_run / generate
    for mode, wall in (("generate", generate), ("tool_run", tool_run)):
        spent = sorted(costs[mode])
        p90 = spent[int(0.9 * (len(spent) - 1))]
        print(f"{mode:9} median {wall:6.2f} s  {args.questions / wall:6.1f} items/s   per-job overhead over the "
              f"model calls: median {statistics.median(spent):6.1f} ms, p90 {p90:6.1f} ms")
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"tool_run / generate wall time: {ratio:.2f}x   target <= {TARGET_RATIO}x: {verdict}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
