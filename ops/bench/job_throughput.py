"""Job-system throughput against direct asyncio calls, in the same run.

    python ops/bench/job_throughput.py [--jobs 2000] [--latency-ms 100] [--concurrency 100] [--rounds 3]
                                       [--submit many,one] [--processes 1,2] [--no-stages]
    python ops/bench/job_throughput.py --in-flight 500 --latency-ms 5000     # the in-flight test

Part 1: N generate jobs through Redis, the worker and the job store, against the same N calls
made directly with the OpenAI SDK on asyncio at the same concurrency (target: at most 1.5x the
direct wall time on the same HTTP stack). Rounds alternate the runs and the medians are compared
(this machine's timings vary by 10-20% from run to run). Two direct baselines are timed:

- the SDK on the HTTP stack the model layer uses (aiohttp): the same client as the worker's, so
  that ratio is the job system's own cost — the target's baseline;
- the SDK as shipped (its default httpx stack): what a script calling the SDK directly does.

The worker runs with the fleet features at their defaults: the limiter on, with a limit on the
bench model high enough never to bind (1,000,000 requests/minute: every request still takes
and gives back its slot in Redis), leases, and /metrics served (``--metrics-port``). Two ways
to submit, each timed from the first submission to the last job final:

- ``many``: one ``submit_many`` per 100 jobs (the first jobs run while the rest are queued);
- ``one``: one ``client.submit`` per job, from one thread.

``--processes 1,2`` (the default) runs the jobs with ``dq worker --processes N`` for each N (one event loop
per process, concurrency per process).

Worker CPU per job: the CPU seconds (user + system, from /proc, the worker and its children)
used between the first submission and the last job final, divided by the jobs.

Per-stage CPU (one more run, ``many``, one process, after the rounds; needs py-spy in the
environment, ``pip install py-spy``): the worker is sampled by ``py-spy record --nonblocking
--gil`` over the same window (250 samples/s of the thread holding the GIL: a thread waiting for
the GIL would otherwise count as busy in the frame it waits in; work done with the GIL released,
such as the bytes of a socket send, is left out). A sample's stage is named by the innermost
frame on its stack that names one:

- claim: the message received and accepted (Celery, kombu: BRPOP, the unacked hash), parsed,
  the payload checked, the cancel flag read — tasks/jobs up to the store's code;
- limiter: tasks/ratelimit*, tasks/redis_batch;
- call: tasks/runner, the model layer, the SDK, aiohttp;
- events: tasks/events, and tasks/jobs' terminal event;
- store: tasks/store, SQLAlchemy, sqlite (the claim and result writes, the group-commit thread
  included), and tasks/jobs preparing the result;
- leases: tasks/leases;
- ack: Celery's and kombu's code once the job reported (the acknowledgement);
- metrics: tasks/observability/metrics, prometheus_client (the /metrics server included);
- redis, caller unseen: redis-py frames whose caller py-spy did not see (the limiter's, events'
  or leases' commands); event loop: asyncio's own frames with no job code above; other.

A stage's CPU per job is its share of the samples times the worker's CPU in that run, divided by
the jobs. Sampling costs the worker some CPU, so these add up to a little more than the unsampled
runs' figure. ``submit`` is the submitting process's CPU (``time.process_time`` around the
submit calls), per job.

Part 2: one worker process with M calls in flight at once (target: all done in under 10 s at
5 s latency) and its peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    KEY,
    cpu_seconds,
    fake_server_process,
    job_system,
    peak_rss_mb,
    process_tree,
    wait_until_final,
)

from datus_queue.tasks.cli.services import free_port, worker_process

RATE_LIMITS = "{requests_per_minute: 1000000}"  # the limiter is on and never binds
STAGES = ("submit", "claim", "limiter", "call", "events", "store", "leases", "ack", "metrics", "redis, caller unseen",
          "event loop", "other")


def fake_server_pid() -> int | None:
    """The fake provider process this one started (for its CPU)."""
    for pid in process_tree(os.getpid())[1:]:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"datus.testing.fake_server" in handle.read():
                return pid
    return None


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


class JobsRun:
    """One timed run of the jobs: wall time, submission, CPU."""

    def __init__(self, elapsed: float, submitted: float, submit_cpu: float, worker_cpu: float, rss: float,
                 stages: dict[str, float] | None = None) -> None:
        self.elapsed, self.submitted, self.submit_cpu, self.worker_cpu = elapsed, submitted, submit_cpu, worker_cpu
        self.rss, self.stages = rss, stages


def through_jobs(url: str, redis_url: str, total: int, concurrency: int, log: Path, submit: str = "many",
                 processes: int = 1, rate_limits: str | None = RATE_LIMITS, profile: bool = False) -> JobsRun:
    with job_system(url, redis_url, os.environ.get("DQ_BENCH_DATABASE_URL"), rate_limits) as (client, env):
        metrics_port = free_port()
        with worker_process(env, ["openai"], concurrency, log, processes=processes, metrics_port=metrics_port) as proc:
            if processes > 1:  # every child up: the parent's /metrics counts the children that answer
                _wait_for_processes(metrics_port, processes)
            # warm-up: the worker is ready when its jobs complete
            warm = [client.submit({"model": "bench", "prompt": f"warm up {i}", "stream": False})
                    for i in range(processes * 4)]
            for job_id in warm:
                client.result(job_id, timeout=60)
            client.store.count_by_status()
            sampler = _sampler(proc.pid) if profile else contextlib.nullcontext()
            with sampler as samples:
                cpu0, start, submit_cpu0 = cpu_seconds(proc.pid), time.perf_counter(), time.process_time()
                if submit == "many":
                    for start_at in range(0, total, 100):
                        client.submit_many([{"model": "bench", "prompt": f"q{i}", "stream": False}
                                            for i in range(start_at, min(total, start_at + 100))])
                else:
                    for i in range(total):
                        client.submit({"model": "bench", "prompt": f"q{i}", "stream": False})
                submit_cpu = time.process_time() - submit_cpu0
                submitted = time.perf_counter() - start
                wait_until_final(client, total + len(warm), timeout_s=600)
                elapsed = time.perf_counter() - start
                worker_cpu = cpu_seconds(proc.pid) - cpu0
            failed = client.store.count_by_status()["failed"]
            if failed:
                print(f"  warning: {failed} jobs failed (see {log})")
            scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            if scrape.status_code != 200 or "dq_jobs_total" not in scrape.text:
                print(f"  warning: /metrics answered {scrape.status_code} without the jobs' counters")
            rss = peak_rss_mb(proc.pid)
    stages = None
    if profile and samples:
        stages = {stage: share * worker_cpu / total for stage, share in samples.items()}
        stages["submit"] = submit_cpu / total
    return JobsRun(elapsed, submitted, submit_cpu, worker_cpu, rss, stages)


def _wait_for_processes(port: int, processes: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if f"dq_worker_processes {processes}.0" in text:
                return
        time.sleep(0.2)
    raise TimeoutError(f"dq worker --processes {processes}: not all up after {timeout_s}s")


@contextlib.contextmanager
def _sampler(pid: int):
    """py-spy over ``pid`` while the block runs; yields a dict filled at the end: stage -> share
    of the samples."""
    shares: dict[str, float] = {}
    out = Path(tempfile.mkdtemp(prefix="dq-bench-spy-")) / "stacks.txt"
    spy = subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--gil", "--format", "raw",
                            "--full-filenames", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield shares
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
        counts: collections.Counter[str] = collections.Counter()
        if out.exists():
            for line in out.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                counts[stage_of(stack.split(";"))] += int(n)
        total = sum(counts.values())
        shares.update({stage: n / total for stage, n in counts.items()} if total else {})


def _py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def stage_of(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first): its innermost frame that names one."""
    for frame in reversed(frames):
        stage = _frame_stage(frame, frames)
        if stage:
            return stage
    if any("/redis/" in frame for frame in frames):
        return "redis, caller unseen"  # redis-py sending or reading with no job frame on the sampled stack
    if any("/asyncio/" in frame or "selectors.py" in frame for frame in frames):
        return "event loop"
    return "other"


_ACK = ("Message.ack", "Message.ack_log_error", "QoS.ack", "Channel.basic_ack", "Request.acknowledge",
        "Request.on_success")


_JOBS = {"_run": "store", "_finish_failed": "store", "_failed": "store", "_deferred": "store", "_terminal": "events"}


def _frame_stage(frame: str, frames: list[str]) -> str | None:
    path = frame[frame.rfind("(") + 1:]
    function = frame[:frame.rfind("(")].strip()
    if "tasks/ratelimit" in path or "tasks/redis_batch" in path:
        return "limiter"
    if "tasks/events" in path:
        return "events"
    if "tasks/store/" in path or "/sqlalchemy/" in path or "sqlite3" in path:
        return "store"
    if "tasks/leases" in path:
        return "leases"
    if "tasks/observability/metrics" in path or "/prometheus_client/" in path:
        return "metrics"
    if "tasks/runner" in path or "datus/models/" in path or "/openai/" in path or "/aiohttp/" in path \
            or "/httpx" in path or "/httpcore" in path:
        return "call"
    if "workers/pool" in path and function == "_run":
        return "claim"  # the job's coroutine outside any stage above (parse, validate, claim's own code)
    if "/celery/" in path or "/kombu/" in path:
        if function in _ACK:  # Celery acknowledges in its consumer's thread, after the job's callback
            return "ack"
        on_loop = any("workers/pool" in f and "_run " in f for f in frames)
        if on_loop:  # the callback at the job's end (the ack), or Celery's accept callback
            return "claim" if function.endswith(("on_accepted", "send_event", "task_accepted")) else "ack"
        return "claim"  # the consumer: messages received (BRPOP, the unacked hash), handed to the pool
    if "tasks/jobs" in path:  # the job's own code between the stages: the result's preparation is the store's
        return _JOBS.get(function.rpartition(".")[2], "claim")
    if "tasks/messages" in path or "workers/runtime" in path:
        return "claim"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=100, help="per worker process, and of the direct calls")
    parser.add_argument("--in-flight", type=int, default=0, help="run the in-flight test with this many jobs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    parser.add_argument("--submit", default="many,one", help="many (submit_many per 100), one (submit per job), or both")
    parser.add_argument("--processes", default="1,2", help="worker processes, each count in turn (dq worker --processes N)")
    parser.add_argument("--no-stages", action="store_true", help="skip the py-spy run of the per-stage CPU")
    parser.add_argument("--redis-url", default=os.environ.get("DQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp(prefix="dq-bench-")) / "worker.log"
    submits = [s.strip() for s in args.submit.split(",") if s.strip()]
    processes = [int(p) for p in args.processes.split(",")]

    with fake_server_process(args.latency_ms) as url:
        if args.in_flight:
            n = args.in_flight
            run = through_jobs(url, args.redis_url, n, n, log)
            verdict = "PASS" if run.elapsed < 10 else "FAIL"
            print(f"in flight: {n} jobs at {args.latency_ms:.0f} ms latency, one worker process (-c {n})")
            print(f"  all done in {run.elapsed:.2f} s (submitted in {run.submitted:.2f} s)   target < 10 s: {verdict}")
            print(f"  worker peak RSS {run.rss:.0f} MB")
            return 0
        print(f"{args.jobs} generate calls, fake latency {args.latency_ms:.0f} ms, concurrency {args.concurrency}, "
              f"{args.rounds} rounds; worker: limiter on ({RATE_LIMITS}), leases, /metrics served")
        runs: dict[str, list[float]] = collections.defaultdict(list)
        jobs_runs: dict[tuple[str, int], list[JobsRun]] = collections.defaultdict(list)
        fake = fake_server_pid()
        for round_no in range(1, args.rounds + 1):
            cpu0, fake0 = time.process_time(), cpu_seconds(fake) if fake else 0.0
            runs["same"].append(asyncio.run(direct(url, args.jobs, args.concurrency, "aiohttp")))
            runs["same_cpu"].append((time.process_time() - cpu0) / args.jobs)
            runs["fake_cpu"].append(((cpu_seconds(fake) if fake else 0.0) - fake0) / args.jobs)
            runs["sdk"].append(asyncio.run(direct(url, args.jobs, args.concurrency, "httpx")))
            line = f"  round {round_no}: direct aiohttp {runs['same'][-1]:5.2f} s  httpx {runs['sdk'][-1]:5.2f} s"
            for n in processes:
                for submit in submits:
                    run = through_jobs(url, args.redis_url, args.jobs, args.concurrency, log, submit, n)
                    jobs_runs[(submit, n)].append(run)
                    line += f" | {submit}x{n}p {run.elapsed:5.2f} s"
            print(line, flush=True)
        stages = None
        if not args.no_stages and Path(_py_spy()).exists():
            stages = through_jobs(url, args.redis_url, args.jobs, args.concurrency, log, "many", 1, profile=True).stages
    same, sdk = statistics.median(runs["same"]), statistics.median(runs["sdk"])
    print(f"medians of {args.rounds} rounds ({args.jobs} jobs; CPU per job: the worker's, all its processes):")
    print(f"  direct asyncio, OpenAI SDK on aiohttp (the worker's stack): {same:6.2f} s  {args.jobs / same:6.0f} calls/s")
    print(f"      client CPU {statistics.median(runs['same_cpu']) * 1000:4.2f} ms/call   fake server CPU "
          f"{statistics.median(runs['fake_cpu']) * 1000:4.2f} ms/call")
    print(f"  direct asyncio, OpenAI SDK as shipped (httpx):             {sdk:6.2f} s  {args.jobs / sdk:6.0f} calls/s")
    for (submit, n), each in jobs_runs.items():
        elapsed = statistics.median(r.elapsed for r in each)
        cpu = statistics.median(r.worker_cpu for r in each) / args.jobs * 1000
        submit_cpu = statistics.median(r.submit_cpu for r in each) / args.jobs * 1000
        submitted = statistics.median(r.submitted for r in each)
        ratio = elapsed / same
        what = "submit_many/100" if submit == "many" else "submit per job "
        print(f"  jobs, {what}, {n} process{'es' if n > 1 else '  '}: {elapsed:6.2f} s  {args.jobs / elapsed:4.0f} jobs/s  "
              f"{ratio:4.2f}x aiohttp ({elapsed / sdk:4.2f}x httpx)  target <= 1.5x: {'PASS' if ratio <= 1.5 else 'FAIL'}")
        print(f"      submitted in {submitted:5.2f} s (client CPU {submit_cpu:4.2f} ms/job)   worker CPU {cpu:4.2f} ms/job")
    if stages:
        total = sum(v for k, v in stages.items() if k != "submit")
        print(f"per-job CPU by stage (ms; one py-spy-sampled run, submit_many, 1 process; worker total {total * 1000:.2f}):")
        print("  " + "  ".join(f"{stage} {stages.get(stage, 0.0) * 1000:.2f}" for stage in STAGES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
