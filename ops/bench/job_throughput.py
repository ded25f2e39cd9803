"""Job-system throughput against direct asyncio calls, in the same run.

    python ops/bench/job_throughput.py [--jobs 2000] [--latency-ms 100] [--concurrency 200]
    python ops/bench/job_throughput.py --in-flight 500 --latency-ms 5000     # the in-flight test

Part 1: N generate jobs through Redis, one worker process and the job store, against the same
N calls made directly with the OpenAI SDK on asyncio at the same concurrency (target: at most
1.5x the direct wall time). Part 2: one worker process with M calls in flight at once (target:
all done in under 10 s at 5 s latency) and its peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import KEY, fake_server_process, job_system, peak_rss_mb, wait_until_final

from tasks.services import worker_process


async def direct(url: str, total: int, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0, timeout=60)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}])

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed


def through_jobs(url: str, redis_url: str, total: int, concurrency: int, log: Path) -> tuple[float, float, float]:
    with job_system(url, redis_url, os.environ.get("DQ_BENCH_DATABASE_URL")) as (client, env):
        with worker_process(env, ["openai"], concurrency, log) as worker:
            # warm-up: the worker is ready when a job completes
            client.result(client.submit({"model": "bench", "prompt": "warm up", "stream": False}), timeout=60)
            client.store.count_by_status()
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:  # submission is part of the measured wall time
                list(pool.map(lambda i: client.submit({"model": "bench", "prompt": f"q{i}", "stream": False}),
                              range(total)))
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
        base = asyncio.run(direct(url, args.jobs, args.concurrency))
        elapsed, submitted, rss = through_jobs(url, args.redis_url, args.jobs, args.concurrency, log)
    ratio = elapsed / base
    print(f"{args.jobs} generate calls, fake latency {args.latency_ms:.0f} ms, concurrency {args.concurrency}")
    print(f"  direct asyncio (OpenAI SDK):  {base:6.2f} s   {args.jobs / base:7.1f} calls/s")
    print(f"  jobs (Redis + 1 worker):      {elapsed:6.2f} s   {args.jobs / elapsed:7.1f} jobs/s   "
          f"(submitted in {submitted:.2f} s)")
    print(f"  ratio {ratio:.2f}x   target <= 1.5x: {'PASS' if ratio <= 1.5 else 'FAIL'}   worker peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
