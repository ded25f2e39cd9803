"""The queue model's overhead, in one run: a queue-backed ``generate`` and a queue-backed tool run
with one caller-side tool, each against the in-process model on the same fake provider, one
call at a time: latency p50/p99 of each and the milliseconds the fleet adds.

- ``generate``: one model call. Queue-backed it is a job: submit, a ``dq worker`` runs it, the
  caller follows its events.
- ``tool run``: ``generate_with_tools`` with one Python function as ``tools=`` (run in the
  caller, in-process and queue-backed alike); the fake asks for it once, then answers: two
  model calls. Queue-backed, the job hands the call back to the caller (``caller_tool_request``),
  the caller runs the function and sends the answer, the job runs again from its checkpoints.

The kinds are measured in alternating blocks (so a slow spell of the machine hits each), after a
warm-up of each; the fake (a process of its own) answers every model call after ``--latency-ms``.

    python ops/bench/queue_model.py --redis-url redis://127.0.0.1:6379/2 [--calls 200] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fake_server_process, job_system

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig
from datus_queue.tasks.cli.services import worker_process

BLOCK = 10  # calls of one kind before switching to the next
ANSWER = "Berlin has 2 orders."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class CallerTool:
    """The caller-side tool: a plain Python function (as Datus's function tools wrap its own
    database connections); counts its calls so the run can check it ran here, once per run."""

    def __init__(self) -> None:
        self.calls = 0

    def tool(self) -> Callable[[str], dict[str, object]]:
        def order_count(city: str) -> dict[str, object]:
            """The number of orders from customers in a city."""
            self.calls += 1
            return {"city": city, "orders": 2}

        return order_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True, help="a Redis database this run may flush")
    parser.add_argument("--calls", type=int, default=200, help="measured calls of each kind and model")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the fake provider's latency per model call")
    args = parser.parse_args()

    with fake_server_process(args.latency_ms) as fake_url, job_system(fake_url, args.redis_url) as (client, env):
        log = Path(tempfile.mkdtemp(prefix="dq-bench-queue-")) / "worker.log"
        with worker_process(env, ["openai"], concurrency=8, log_path=log), httpx.Client(base_url=fake_url) as fake:
            first = client.submit({"model": "bench", "prompt": "warm up the worker"})
            client.result(first, timeout=60)
            for name in ("DQ_CONFIG", "DQ_REDIS_URL", "DQ_DATABASE_URL"):  # the caller's usual DQ_ settings
                os.environ[name] = env[name]
            inproc = LLMBaseModel.create_model(AgentConfig.from_file(env["DQ_CONFIG"]), "bench")
            queued = LLMBaseModel.create_model(
                AgentConfig.from_dict({"agent": {"models": {"fleet": {"type": "queue", "model": "bench"}}}}), "fleet")
            counter = CallerTool()
            order_count = counter.tool()
            loop = asyncio.new_event_loop()  # one loop for every tool run, as a long-lived agent has

            def generate(model: LLMBaseModel, i: int) -> float:
                began = time.perf_counter()
                model.generate(f"question {i}: how many orders?")
                return (time.perf_counter() - began) * 1000.0

            def tool_run(model: LLMBaseModel, i: int) -> float:
                question = f"question {i}: how many orders from Berlin?"
                fake.post("/_fake/script", json=[  # this run's two model calls, scripted before the clock starts
                    {"match": question, "reply": {"tool_calls": [{"name": "order_count", "arguments": {"city": "Berlin"},
                                                                  "id": f"call_{i}"}]}},
                    {"match": question, "reply": {"text": ANSWER}},
                ]).raise_for_status()
                before = counter.calls
                began = time.perf_counter()
                result = loop.run_until_complete(model.generate_with_tools(question, tools=[order_count], max_turns=3))
                elapsed = (time.perf_counter() - began) * 1000.0
                if result["content"] != ANSWER or counter.calls != before + 1:
                    raise SystemExit(f"tool run {i} on {model!r}: content {result['content']!r}, "
                                     f"the caller's tool ran {counter.calls - before} times (expected once)")
                return elapsed

            kinds = {("generate", "in-process"): (generate, inproc), ("generate", "queue"): (generate, queued),
                     ("tool run", "in-process"): (tool_run, inproc), ("tool run", "queue"): (tool_run, queued)}
            i = 0
            for _ in range(args.warmup):
                for call, model in kinds.values():
                    i += 1
                    call(model, i)
            times: dict[tuple[str, str], list[float]] = {kind: [] for kind in kinds}
            while any(len(values) < args.calls for values in times.values()):
                for kind, (call, model) in kinds.items():
                    for _ in range(min(BLOCK, args.calls - len(times[kind]))):
                        i += 1
                        times[kind].append(call(model, i))
            loop.close()
            counts = client.store.count_by_status()
            expected = 1 + 2 * (args.warmup + args.calls)  # the worker's warm-up, then one job per queue-backed call
            if counts["succeeded"] != expected or sum(counts.values()) != expected:
                raise SystemExit(f"the job store holds {dict(counts)}, not {expected} succeeded jobs")

    print(f"queue-backed vs in-process model, one call at a time, fake latency {args.latency_ms:g} ms per model call,"
          f" {args.calls} calls of each (after {args.warmup} warm-up calls of each)")
    print("tool run: generate_with_tools, one caller-side Python tool called once, two model calls")
    print(f"every queue-backed call was one job, run by the dq worker ({expected} jobs succeeded)")
    print(f"{'':10} {'':11} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name in ("generate", "tool run"):
        local, fleet = times[(name, "in-process")], times[(name, "queue")]
        for label, values in (("in-process", local), ("queue", fleet)):
            print(f"{name if label == 'in-process' else '':10} {label:11} {percentile(values, 50):8.1f} "
                  f"{percentile(values, 99):8.1f} {statistics.fmean(values):8.1f}")
        print(f"{'':10} {'added':11} {percentile(fleet, 50) - percentile(local, 50):+8.1f} "
              f"{percentile(fleet, 99) - percentile(local, 99):+8.1f} "
              f"{statistics.fmean(fleet) - statistics.fmean(local):+8.1f}")


if __name__ == "__main__":
    main()
