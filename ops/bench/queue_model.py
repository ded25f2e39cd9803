"""The queue model's overhead: ``generate`` on a ``type: queue`` model (a job: submit, a
``dq worker`` runs it, the caller follows its events) against the in-process model on the same
fake provider, one call at a time, in one run: latency p50/p99 of each and the milliseconds the
fleet adds.

The two are measured in alternating blocks (so a slow spell of the machine hits both), after a
warm-up of each; the fake answers after ``--latency-ms``.

    python ops/bench/queue_model.py --redis-url redis://127.0.0.1:6379/2 [--calls 200] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fake_server_process, job_system

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus_queue.tasks.cli.services import worker_process

BLOCK = 10  # calls of one kind before switching to the other


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def timed(model: LLMBaseModel, prompt: str) -> float:
    began = time.perf_counter()
    model.generate(prompt)
    return (time.perf_counter() - began) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True, help="a Redis database this run may flush")
    parser.add_argument("--calls", type=int, default=200, help="measured calls of each kind")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the fake provider's latency")
    args = parser.parse_args()

    with fake_server_process(args.latency_ms) as fake_url, job_system(fake_url, args.redis_url) as (client, env):
        log = Path(tempfile.mkdtemp(prefix="dq-bench-queue-")) / "worker.log"
        with worker_process(env, ["openai"], concurrency=8, log_path=log):
            first = client.submit({"model": "bench", "prompt": "warm up the worker"})
            client.result(first, timeout=60)
            for name in ("DQ_CONFIG", "DQ_REDIS_URL", "DQ_DATABASE_URL"):  # the caller's usual DQ_ settings
                os.environ[name] = env[name]
            inproc = LLMBaseModel.create_model(AgentConfig.from_file(env["DQ_CONFIG"]), "bench")
            queued = LLMBaseModel.create_model(
                AgentConfig.from_dict({"agent": {"models": {"fleet": {"type": "queue", "model": "bench"}}}}), "fleet")
            for i in range(args.warmup):
                timed(inproc, f"warm-up {i}")
                timed(queued, f"warm-up {i}")
            times: dict[str, list[float]] = {"in-process": [], "queue": []}
            i = 0
            while len(times["queue"]) < args.calls:
                for label, model in (("in-process", inproc), ("queue", queued)):
                    for _ in range(min(BLOCK, args.calls - len(times[label]))):
                        i += 1
                        times[label].append(timed(model, f"question {i}: how many orders?"))

    print(f"generate, one call at a time, fake latency {args.latency_ms:g} ms, {args.calls} calls each "
          f"(after {args.warmup} warm-up calls each)")
    print(f"{'':12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for label, values in times.items():
        print(f"{label:12} {percentile(values, 50):8.2f} {percentile(values, 99):8.2f} {statistics.fmean(values):8.2f}")
    local, fleet = times["in-process"], times["queue"]
    print(f"{'added':12} {percentile(fleet, 50) - percentile(local, 50):8.2f} "
          f"{percentile(fleet, 99) - percentile(local, 99):8.2f} {statistics.fmean(fleet) - statistics.fmean(local):8.2f}")


if __name__ == "__main__":
    main()
