"""The fleet's request limiter: what an acquire costs, how close a fleet gets to a limit, and
what the limiter costs the job system's throughput — each against a baseline in the same run.

    python ops/bench/ratelimit.py [--part acquire|rate|throughput|all] [--redis-url URL]
                                  [--limit 600] [--seconds 30] [--workers 4]
                                  [--jobs 2000] [--latency-ms 100] [--concurrency 200] [--rounds 3]

acquire     one limiter acquire (``ModelLimiter.before``: one Lua call on Redis time, all four
            budgets set far above the load) and its release, sequential: p50/p99, against one
            plain Redis round trip (GET); and the worker CPU per acquire + release with 200 in
            flight (pipelined per loop turn). Target: acquire p50 and p99 < 0.5 ms.
rate        ``--workers`` dq workers share ``requests_per_minute: --limit`` against the fake
            provider enforcing the same limit over a 2 s window (429 beyond): the achieved rate
            over ``--seconds`` of steady state as a share of the limit, and the 429s. Target:
            >= 90 %, no 429.
throughput  job_throughput's run (``--jobs`` generate jobs, one worker) with limits configured far
            above the load, with the limiter on but no limits (cooldown checks only), and with
            the limiter off (``DQ_RATE_LIMITER=0``, the baseline): medians of alternating rounds.
            Target: limits far above within 5 % of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fake_server_process, job_system, wait_until_final
from job_throughput import through_jobs

from datus.models.config import AgentConfig, RateLimits
from datus.models.limiter import PlannedRequest, RequestOutcome
from datus.models.usage import Usage
from datus_queue.tasks.cli.services import local_redis, worker_process
from datus_queue.tasks.context import JobContext
from datus_queue.tasks.settings import Settings

FAR_ABOVE = RateLimits(requests_per_minute=1e7, input_tokens_per_minute=1e10, output_tokens_per_minute=1e10,
                       max_concurrency=100_000)
FAR_ABOVE_YAML = ("{requests_per_minute: 10000000, input_tokens_per_minute: 10000000000, "
                  "output_tokens_per_minute: 10000000000, max_concurrency: 100000}")


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with local_redis(Path(tempfile.mkdtemp(prefix="dq-bench-redis-"))) as url:
        yield url


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- acquire cost -----------------------------------------------------------------------------------


async def acquire_cost(url: str, n: int = 5000) -> None:
    ctx = JobContext(Settings(redis_url=url), AgentConfig())
    model = SimpleNamespace(provider="openai", key_fingerprint="bench0000000000", model_name="gpt-4o-mini")
    limiter = ctx.limiter.for_model(model, FAR_ABOVE)
    planned = PlannedRequest("openai", "gpt-4o-mini", 256, lambda: 120)
    answered = RequestOutcome(usage=Usage(input_tokens=100, output_tokens=200))
    redis = ctx.aredis
    await redis.flushdb()
    for _ in range(200):  # warm-up: connections, script load
        await limiter.after(await limiter.before(planned), answered)
        await redis.get("bench")
    acquire, release, plain = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        permit = await limiter.before(planned)
        t1 = time.perf_counter()
        await limiter.after(permit, answered)
        t2 = time.perf_counter()
        await redis.get("bench")
        t3 = time.perf_counter()
        acquire.append((t1 - t0) * 1000)
        release.append((t2 - t1) * 1000)
        plain.append((t3 - t2) * 1000)

    async def one() -> None:
        await limiter.after(await limiter.before(planned), answered)

    rounds = max(1, n // 200)
    cpu0 = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(200)))
    cpu_us = (time.process_time() - cpu0) / (rounds * 200) * 1e6
    await ctx.aclose()
    p50, p99 = pct(acquire, 0.5), pct(acquire, 0.99)
    verdict = "PASS" if p50 < 0.5 and p99 < 0.5 else "FAIL"
    print(f"acquire cost ({n} sequential, all four budgets set, Redis on this host)")
    print(f"  acquire  p50 {p50:.3f} ms  p99 {p99:.3f} ms   target < 0.5 ms: {verdict}")
    print(f"  release  p50 {pct(release, 0.5):.3f} ms  p99 {pct(release, 0.99):.3f} ms")
    print(f"  baseline: one GET round trip p50 {pct(plain, 0.5):.3f} ms  p99 {pct(plain, 0.99):.3f} ms   "
          f"acquire / GET at p50: {p50 / pct(plain, 0.5):.2f}x")
    print(f"  200 in flight: {cpu_us:.1f} us of worker CPU per acquire + release (pipelined per loop turn)")


# -- achieved rate ------------------------------------------------------------------------------------


def achieved_rate(url: str, limit: float, seconds: float, workers: int, latency_ms: float) -> None:
    per_s = limit / 60
    total = int(per_s * (seconds + 8))
    with fake_server_process(latency_ms, "--requests-per-minute", str(limit), "--window-s", "2") as fake_url:
        with job_system(fake_url, url, rate_limits=f"{{requests_per_minute: {limit:g}}}") as (client, env):
            logs = Path(tempfile.mkdtemp(prefix="dq-bench-rate-"))
            with contextlib.ExitStack() as stack:
                for i in range(workers):
                    stack.enter_context(worker_process(env, ["openai"], 50, logs / f"worker-{i}.log"))
                client.result(client.submit({"model": "bench", "prompt": "warm up", "stream": False}), timeout=60)
                time.sleep(3)  # every worker up (and its SDK imported) before the run
                httpx.post(f"{fake_url}/_fake/reset", timeout=10)
                httpx.post(f"{fake_url}/_fake/limits", json={"requests_per_minute": limit, "window_s": 2}, timeout=10)
                client.submit_many([{"model": "bench", "prompt": f"r{i}", "stream": False} for i in range(total)])
                wait_until_final(client, total + 1, timeout_s=seconds * 4 + 120)
                arrivals = sorted(r["at"] for r in httpx.get(f"{fake_url}/_fake/requests", timeout=30).json()["requests"]
                                  if not r["path"].startswith("/_fake"))
                limited = httpx.get(f"{fake_url}/_fake/limits", timeout=10).json()["limited"]
                failed = client.store.count_by_status()["failed"]
    start = arrivals[0] + 2.0  # past the first burst: the steady state
    window = [at for at in arrivals if start <= at < start + seconds]
    rate = len(window) / seconds
    share = rate / per_s
    print(f"achieved rate: {workers} workers, requests_per_minute {limit:g}, the fake enforcing it over 2 s windows")
    print(f"  {len(window)} requests in {seconds:g} s of steady state = {rate * 60:.0f}/min, {share:.1%} of the limit "
          f"  target >= 90%: {'PASS' if share >= 0.9 else 'FAIL'}")
    print(f"  provider 429s: {limited}   jobs failed: {failed}   (of {total})")


# -- throughput ---------------------------------------------------------------------------------------


def throughput(url: str, jobs: int, latency_ms: float, concurrency: int, rounds: int) -> None:
    log = Path(tempfile.mkdtemp(prefix="dq-bench-")) / "worker.log"
    variants = {
        "limiter off (baseline)": (None, {"DQ_RATE_LIMITER": "0"}),
        "limiter on, no limits": (None, {}),
        "limits far above the load": (FAR_ABOVE_YAML, {}),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    print(f"throughput: {jobs} generate jobs, fake latency {latency_ms:.0f} ms, one worker -c {concurrency}, "
          f"{rounds} rounds")
    with fake_server_process(latency_ms) as fake_url:
        for round_no in range(1, rounds + 1):
            line = []
            for name, (limits, env) in variants.items():
                elapsed, _, _ = through_jobs(fake_url, url, jobs, concurrency, log, limits, env)
                runs[name].append(elapsed)
                line.append(f"{name} {jobs / elapsed:6.1f} jobs/s")
            print(f"  round {round_no}: " + "   ".join(line))
    base = jobs / statistics.median(runs["limiter off (baseline)"])
    print("medians:")
    for name, times in runs.items():
        rate = jobs / statistics.median(times)
        print(f"  {name:28s} {rate:7.1f} jobs/s   {rate / base:6.1%} of the baseline")
    far = jobs / statistics.median(runs["limits far above the load"])
    print(f"  limits far above vs off: {far / base - 1:+.1%}   target within 5%: "
          f"{'PASS' if far >= 0.95 * base else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["acquire", "rate", "throughput", "all"])
    parser.add_argument("--redis-url", default=os.environ.get("DQ_BENCH_REDIS_URL"))
    parser.add_argument("--limit", type=float, default=600)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        if args.part in ("acquire", "all"):
            asyncio.run(acquire_cost(url))
        if args.part in ("rate", "all"):
            achieved_rate(url, args.limit, args.seconds, args.workers, args.latency_ms)
        if args.part in ("throughput", "all"):
            throughput(url, args.jobs, args.latency_ms, args.concurrency, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
