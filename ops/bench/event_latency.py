"""Event latency: from `EventPublisher.publish` to a client following the job with `follow`,
against a raw redis-py PUBLISH -> SUBSCRIBE baseline measured in the same run.

Publisher and subscriber are separate processes (no shared GIL); the send time travels in the
payload as CLOCK_MONOTONIC nanoseconds, which is one clock for every process on the host.
Also prints what one publish costs: the Lua script (one round trip) against the pipeline it
would otherwise be (INCR for the seq, then MULTI XADD/EXPIRE/EXPIRE/PUBLISH: two round trips).

    python ops/bench/event_latency.py [--url redis://127.0.0.1:6379/0] [--events 5000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import uuid
from typing import Any

import redis

from datus_queue.tasks import keys
from datus_queue.tasks.events import EventPublisher, follow
from datus_queue.tasks.settings import get_settings

TARGET_P50_MS, TARGET_P99_MS = 2.0, 10.0
WARMUP = 100  # first events of each run not counted: connection setup, script load
PAD = "x" * 200  # a step of a few hundred bytes, like a short ActionHistory


def _raw_subscriber(url: str, channel: str, n: int, out: Any) -> None:
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while len(latencies) < n and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=1)  # None also for the swallowed subscribe confirmation
        if msg is not None:
            latencies.append((time.monotonic_ns() - json.loads(msg["data"])["t_ns"]) / 1e6)
    out.send(latencies)


def _event_subscriber(url: str, job_id: str, n: int, out: Any) -> None:
    client = redis.Redis.from_url(url)
    latencies = [(time.monotonic_ns() - event.step["t_ns"]) / 1e6 for event in follow(client, job_id, timeout_s=120)]
    out.send(latencies)


def _wait_subscribed(client: redis.Redis, channel: str) -> None:
    deadline = time.monotonic() + 10
    while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no subscriber on {channel}")
        time.sleep(0.01)


def _paced(n: int, rate: float):
    start, interval = time.monotonic(), 1.0 / rate
    for i in range(n):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


def _run(url: str, target: Any, name: str, n: int, rate: float, publish: Any) -> list[float]:
    ctx = mp.get_context("spawn")  # a clean process, whatever the platform default
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(url, name, n, send))
    proc.start()
    _wait_subscribed(redis.Redis.from_url(url), keys.job_channel(name) if target is _event_subscriber else name)
    for i in _paced(n, rate):
        publish(i, i == n - 1)
    latencies = receive.recv()
    proc.join(10)
    if len(latencies) != n:
        raise RuntimeError(f"{name}: received {len(latencies)} of {n}")
    return latencies[WARMUP:]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _publish_cost(client: redis.Redis, n: int) -> dict[str, float]:
    """Median microseconds of one sequential publish, three ways."""
    job_lua, job_pipe, channel = f"bench-{uuid.uuid4().hex}", f"bench-{uuid.uuid4().hex}", f"bench-{uuid.uuid4().hex}"
    publisher = EventPublisher(client, ttl_s=120, maxlen=10_000)
    body = json.dumps({"step": {"t_ns": 0, "pad": PAD}})

    def lua() -> None:
        publisher.publish(job_lua, {"t_ns": time.monotonic_ns(), "pad": PAD})

    def pipeline() -> None:
        seq = client.incr(keys.job_event_seq(job_pipe))
        event = json.dumps({"seq": seq, "job_id": job_pipe, "step": {"t_ns": time.monotonic_ns(), "pad": PAD}})
        pipe = client.pipeline(transaction=True)
        pipe.xadd(keys.job_events(job_pipe), {"event": event}, id=f"{seq}-0", maxlen=10_000, approximate=True)
        pipe.expire(keys.job_events(job_pipe), 120)
        pipe.expire(keys.job_event_seq(job_pipe), 120)
        pipe.publish(keys.job_channel(job_pipe), event)
        pipe.execute()

    def raw() -> None:
        client.publish(channel, body)

    costs = {}
    for label, fn in (("lua script (1 round trip)", lua), ("pipeline (2 round trips)", pipeline),
                      ("raw PUBLISH only", raw)):
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e3)
        costs[label] = statistics.median(samples[WARMUP:])
    client.delete(*(key for job in (job_lua, job_pipe) for key in (keys.job_events(job), keys.job_event_seq(job))))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=get_settings().redis_url)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    args = parser.parse_args()
    n, client = args.events + WARMUP, redis.Redis.from_url(args.url)

    channel = f"bench-raw-{uuid.uuid4().hex}"
    raw_client = redis.Redis.from_url(args.url)
    raw = _run(args.url, _raw_subscriber, channel, n, args.rate,
               lambda i, last: raw_client.publish(channel, json.dumps({"t_ns": time.monotonic_ns(), "pad": PAD})))

    job_id = f"bench-{uuid.uuid4().hex}"
    publisher = EventPublisher(client, ttl_s=120, maxlen=10_000)
    ours = _run(args.url, _event_subscriber, job_id, n, args.rate,
                lambda i, last: publisher.publish(job_id, {"t_ns": time.monotonic_ns(), "pad": PAD}, terminal=last))
    client.delete(keys.job_events(job_id), keys.job_event_seq(job_id))

    print(f"event latency, publish -> subscribed client: {args.events} events at {args.rate:g}/s "
          f"(+{WARMUP} warm-up), subscriber in its own process")
    print(f"{'':34}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    rows = {"raw redis-py PUBLISH -> SUBSCRIBE": raw, "EventPublisher.publish -> follow": ours}
    for label, values in rows.items():
        print(f"{label:34}{_pct(values, 0.50):9.3f}{_pct(values, 0.99):9.3f}{max(values):9.3f}")
    p50, p99 = _pct(ours, 0.50), _pct(ours, 0.99)
    print(f"{'ratio to the baseline':34}{p50 / _pct(raw, 0.50):8.2f}x{p99 / _pct(raw, 0.99):8.2f}x"
          f"{max(ours) / max(raw):8.2f}x")
    verdict = "met" if p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS else "MISSED"
    print(f"{'targets':34}{TARGET_P50_MS:9.3f}{TARGET_P99_MS:9.3f}{'':9}  {verdict}")

    print("\none publish, sequential, median of "
          f"{args.events} calls (publisher side, includes serialisation):")
    for label, micros in _publish_cost(client, n).items():
        print(f"  {label:30}{micros:8.1f} us")


if __name__ == "__main__":
    main()
