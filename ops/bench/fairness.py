"""Fairness: how long an interactive job takes while a big batch is queued on the same
provider, batch jobs at their own broker priority and waiting line (``DQ_BATCH_PRIORITY=6``,
the default) against one FIFO queue and one line (``DQ_BATCH_PRIORITY=0``, the baseline),
in the same run.

    python ops/bench/fairness.py [--batch 10000] [--interactive 5] [--latency-ms 100]
                                 [--concurrency 50] [--rate-limit 0]

Each run: a worker, ``--batch`` batch jobs (``batch_id`` set) queued through submit_many, then
``--interactive`` jobs submitted half a second apart while the batch runs; each one's latency
(submit to finished, as the store recorded it) is printed, with the batch jobs still queued
when it was submitted. With
``--rate-limit N`` the model has ``requests_per_minute: N``, so the batch also waits at the
limiter (where the lanes matter) rather than only in the queue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fake_server_process, job_system

from datus_queue.tasks.cli.services import local_redis, worker_process


def run(fake_url: str, redis_url: str, args: argparse.Namespace, batch_priority: int) -> list[tuple[float, int]]:
    limits = f"{{requests_per_minute: {args.rate_limit:g}}}" if args.rate_limit else None
    log = Path(tempfile.mkdtemp(prefix="dq-bench-fair-")) / "worker.log"
    env_extra = {"DQ_BATCH_PRIORITY": str(batch_priority)}
    with job_system(fake_url, redis_url, rate_limits=limits) as (client, env):
        client.settings = client.settings.model_copy(update={"batch_priority": batch_priority})
        with worker_process({**env, **env_extra}, ["openai"], args.concurrency, log):
            client.result(client.submit({"model": "bench", "prompt": "warm up", "stream": False}), timeout=60)
            for start in range(0, args.batch, 500):
                client.submit_many([{"model": "bench", "prompt": f"batch {i}", "stream": False, "batch_id": "b-bench",
                                     "item_id": str(i)} for i in range(start, min(args.batch, start + 500))])
            time.sleep(2.0)  # the batch is running
            submitted: list[tuple[str, float, int]] = []
            for i in range(args.interactive):  # spaced out while the batch runs, not waiting for each
                counts = client.store.count_by_status()
                submitted.append((client.submit({"model": "bench", "prompt": f"interactive {i}", "stream": False}),
                                  time.time(), counts["queued"] + counts["retrying"]))
                time.sleep(0.5)
            seen: list[tuple[float, int]] = []
            for job_id, at, queued in submitted:
                result = client.result(job_id, timeout=args.timeout)
                assert result.finished_at is not None, result
                seen.append((result.finished_at.timestamp() - at, queued))
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--interactive", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate-limit", type=float, default=0, help="requests_per_minute of the model (0: none)")
    parser.add_argument("--timeout", type=float, default=600, help="longest an interactive job may take")
    args = parser.parse_args()
    limit = f", requests_per_minute {args.rate_limit:g}" if args.rate_limit else ""
    print(f"fairness: {args.batch} batch jobs queued, then {args.interactive} interactive jobs; one worker "
          f"-c {args.concurrency}, fake latency {args.latency_ms:.0f} ms{limit}")
    medians = {}
    with local_redis(Path(tempfile.mkdtemp(prefix="dq-bench-redis-"))) as redis_url:
        with fake_server_process(args.latency_ms) as fake_url:
            for name, priority in (("batch lane (DQ_BATCH_PRIORITY=6)", 6), ("one FIFO queue (baseline)", 0)):
                seen = run(fake_url, redis_url, args, priority)
                latencies = [s for s, _ in seen]
                medians[name] = statistics.median(latencies)
                shown = "  ".join(f"{s:6.2f}s ({queued} queued)" for s, queued in seen)
                print(f"  {name:34s} {shown}")
    ours, base = medians.values()
    print(f"median interactive latency: batch lane {ours:.2f} s, one FIFO queue {base:.2f} s "
          f"({base / ours:.0f}x longer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
