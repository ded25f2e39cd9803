"""Job-system throughput against direct asyncio calls, in the same run.

    python ops/bench/job_throughput.py [--jobs 2000] [--latency-ms 100] [--concurrency 200] [--rounds 3]
    python ops/bench/job_throughput.py --in-flight 500 --latency-ms 5000     # the in-flight test

Part 1: N generate jobs through Redis, one worker process and the job store, against the same
N calls made directly with the OpenAI SDK on asyncio at the same concurrency (target: at most
1.5x the direct wall time). Rounds alternate the three runs and the medians are compared (this
machine's timings vary by 10-20% from run to run). Two direct baselines are timed:

- the SDK as shipped (its default httpx stack): what a script calling the SDK directly does,
  and the baseline of the target;
- the SDK on the HTTP stack the model layer uses (aiohttp): the same client as the worker's,
  so that ratio is the job system's own cost.

Part 2: one worker process with M calls in flight at once (target: all done in under 10 s at
5 s latency) and its peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import KEY, fake_server_process, job_system, peak_rss_mb, wait_until_final

from datus_queue.tasks.cli.services import worker_process


async def direct(url: str, total: int, concurrency: int, stack: str = "httpx") -> float:
    import openai

    from datus.models.http_clients import async_http_client

    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0, timeout=60,
                                http_client=async_http_client(openai, stack))
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}])

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed


def through_jobs(url: str, redis_url: str, total: int, concurrency: int, log: Path, rate_limits: str | None = None,
                 worker_env: dict[str, str] | None = None) -> tuple[float, float, float]:
    with job_system(url, redis_url, os.environ.get("DQ_BENCH_DATABASE_URL"), rate_limits) as (client, env):
        with worker_process({**env, **(worker_env or {})}, ["openai"], concurrency, log) as worker:
            # warm-up: the worker is ready when a job completes
            client.result(client.submit({"model": "bench", "prompt": "warm up", "stream": False}), timeout=60)
            client.store.count_by_status()
            start = time.perf_counter()
            # submission is part of the measured wall time: one submit_many per 100 jobs, so the
            # first jobs run while the rest are being queued
            for start_at in range(0, total, 100):
                client.submit_many([{"model": "bench", "prompt": f"q{i}", "stream": False}
                                    for i in range(start_at, min(total, start_at + 100))])
            submitted = time.perf_counter() - start
            wait_until_final(client, total + 1, timeout_s=600)
            elapsed = time.perf_counter() - start
            failed = client.store.count_by_status()["failed"]
            if failed:
                print(f"  warning: {failed} jobs failed (see {log})")
            return elapsed, submitted, peak_rss_mb(worker.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=0, help="run the in-flight test with this many jobs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    parser.add_argument("--redis-url", default=os.environ.get("DQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp(prefix="dq-bench-")) / "worker.log"

    with fake_server_process(args.latency_ms) as url:
        if args.in_flight:
            n = args.in_flight
            elapsed, submitted, rss = through_jobs(url, args.redis_url, n, n, log)
            verdict = "PASS" if elapsed < 10 else "FAIL"
            print(f"in flight: {n} jobs at {args.latency_ms:.0f} ms latency, one worker process (-c {n})")
            print(f"  all done in {elapsed:.2f} s (submitted in {submitted:.2f} s)   target < 10 s: {verdict}")
            print(f"  worker peak RSS {rss:.0f} MB")
            return 0
        print(f"{args.jobs} generate calls, fake latency {args.latency_ms:.0f} ms, concurrency {args.concurrency}, "
              f"{args.rounds} rounds")
        runs: dict[str, list[float]] = {"sdk": [], "same": [], "jobs": []}
        rss = 0.0
        for round_no in range(1, args.rounds + 1):
            runs["sdk"].append(asyncio.run(direct(url, args.jobs, args.concurrency, "httpx")))
            runs["same"].append(asyncio.run(direct(url, args.jobs, args.concurrency, "aiohttp")))
            elapsed, submitted, peak = through_jobs(url, args.redis_url, args.jobs, args.concurrency, log)
            runs["jobs"].append(elapsed)
            rss = max(rss, peak)
            print(f"  round {round_no}: direct (SDK default) {runs['sdk'][-1]:5.2f} s   direct (aiohttp) "
                  f"{runs['same'][-1]:5.2f} s   jobs {elapsed:5.2f} s (submitted in {submitted:.2f} s)")
    sdk, same, jobs = (statistics.median(runs[k]) for k in ("sdk", "same", "jobs"))
    ratio = jobs / sdk
    print("medians:")
    print(f"  direct asyncio, OpenAI SDK as shipped (httpx):  {sdk:6.2f} s   {args.jobs / sdk:7.1f} calls/s")
    print(f"  direct asyncio, OpenAI SDK on aiohttp:          {same:6.2f} s   {args.jobs / same:7.1f} calls/s")
    print(f"  jobs (Redis + 1 worker, model layer on aiohttp): {jobs:6.2f} s   {args.jobs / jobs:7.1f} jobs/s")
    print(f"  ratio to the SDK as shipped {ratio:.2f}x   target <= 1.5x: {'PASS' if ratio <= 1.5 else 'FAIL'}")
    print(f"  ratio to the same HTTP stack {jobs / same:.2f}x (the job system's own cost)   "
          f"worker peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
