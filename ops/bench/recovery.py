"""Recovery with the default settings: from a worker's SIGKILL until every job it held runs again
on another worker, and until all of them are done.

Each round starts worker A (`dq worker`, every setting at its default, no `dq beat`), submits the
jobs, and waits until every job's call is at the fake provider, which holds it; then worker B
starts, and A is SIGKILLed — at a random moment of its lease renewals, or right after one (the
worst case: a whole lease to wait out). Measured from the kill:

- *running again*: until the fake has received every job's second call (B runs them all);
- *done*: until every job has succeeded in the store.

Printed against the bound the settings give (``DQ_LEASE_S + 1.25 × DQ_SWEEP_INTERVAL_S``) and
against the same jobs run on one worker without a kill (submit to done), measured in the same run.

    python ops/bench/recovery.py [--jobs 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import text

from datus.models.config import AgentConfig
from datus.models.scripted import Reply
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.app import create_app
from datus_queue.tasks.cli.services import dq_command, local_redis
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.settings import Settings

KEY = "sk-bench-not-a-real-key"
DEFAULTS = Settings()


class Round:
    """A private job store and agent.yml on the shared Redis and fake; workers started and killed."""

    def __init__(self, redis_url: str, fake: FakeProviderServer, directory: Path) -> None:
        self.fake, self.directory = fake, directory
        config = directory / "agent.yml"
        config.write_text("agent:\n  target: bench\n  models:\n"
                          f"    bench: {{type: openai, model: gpt-4o-mini, api_key: {KEY}, "
                          f"base_url: '{fake.openai_base_url}', timeout_s: 600}}\n")
        self.database_url = f"sqlite:///{directory / 'jobs.db'}"
        # the defaults: no DQ_ setting but where Redis, the store and agent.yml are
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")} | {
            "DQ_CONFIG": str(config), "DQ_REDIS_URL": redis_url, "DQ_DATABASE_URL": self.database_url,
            "PYTHONUNBUFFERED": "1"}
        settings = Settings(redis_url=redis_url, database_url=self.database_url, config=str(config))
        self.app = create_app(settings)
        self.client = JobClient(settings=settings, agent_config=AgentConfig.from_file(config), app=self.app)
        self.client.redis.flushdb()
        self.workers: list[subprocess.Popen[bytes]] = []

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}.log"
        proc = subprocess.Popen([*dq_command(), "worker", "--provider", "openai", "-l", "INFO", "-n", f"{name}@bench"],
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=self.env,  # noqa: SIM115
                                start_new_session=True)
        self.workers.append(proc)
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return proc

    def calls(self, prefix: str) -> int:
        return sum(1 for request in self.fake.requests if prefix in str(request.body))

    def done(self) -> int:
        return self.client.store.count_by_status()["succeeded"]

    def lease_until(self, job_id: str) -> str | None:
        with self.client.store._engine.connect() as conn:  # a plain read, beside the workers' writes
            return conn.execute(text("SELECT lease_until FROM jobs WHERE job_id = :id"), {"id": job_id}).scalar()

    def close(self) -> None:
        for proc in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.client.redis.flushdb()
        self.client.close()
        self.client.store.close()
        self.app.close()


def wait(predicate: object, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` is true."""
    start = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not after {timeout_s}s")
        time.sleep(0.02)
    return time.monotonic() - start


def killed_round(redis_url: str, fake: FakeProviderServer, jobs: int, when: str) -> tuple[float, float]:
    fake.reset()
    tag = f"r{random.getrandbits(32):x}-"
    prompts = [f"{tag}{i}." for i in range(jobs)]
    for prompt in prompts:  # the first call of each hangs (A holds it when it dies); the next is answered
        fake.script.add(Reply(text="never seen", latency_s=600), match=prompt)
    with tempfile.TemporaryDirectory(prefix="dq-bench-recovery-") as tmp:
        run = Round(redis_url, fake, Path(tmp))
        try:
            first = run.worker("a")
            ids = [run.client.submit({"model": "bench", "prompt": prompt, "stream": False}) for prompt in prompts]
            wait(lambda: run.calls(tag) >= jobs, 60, "every call at the provider")
            run.worker("b")
            # a random moment of B's sweeps (they start when B does)…
            time.sleep(random.uniform(0, DEFAULTS.sweep_interval_s))
            if when == "after renewal":  # …right after A renewed its leases: all of a lease to wait out
                renewed = run.lease_until(ids[0])
                wait(lambda: run.lease_until(ids[0]) != renewed, DEFAULTS.lease_s, "a renewal")
            else:  # …and of A's renewals
                time.sleep(random.uniform(0, DEFAULTS.lease_s / 3))
            os.killpg(first.pid, signal.SIGKILL)
            killed = time.monotonic()
            wait(lambda: run.calls(tag) >= 2 * jobs, 300, "every job running again")
            running_again = time.monotonic() - killed
            wait(lambda: run.done() >= jobs, 300, "every job done")
            return running_again, time.monotonic() - killed
        finally:
            run.close()


def unkilled_round(redis_url: str, fake: FakeProviderServer, jobs: int) -> float:
    """The same jobs on one worker, nothing killed: submit to done."""
    fake.reset()
    with tempfile.TemporaryDirectory(prefix="dq-bench-recovery-") as tmp:
        run = Round(redis_url, fake, Path(tmp))
        try:
            run.worker("a")
            start = time.monotonic()
            for i in range(jobs):
                run.client.submit({"model": "bench", "prompt": f"baseline-{i}.", "stream": False})
            wait(lambda: run.done() >= jobs, 300, "every job done")
            return time.monotonic() - start
        finally:
            run.close()


@contextlib.contextmanager
def services() -> Iterator[tuple[str, FakeProviderServer]]:
    with tempfile.TemporaryDirectory() as tmp, local_redis(Path(tmp)) as redis_url, \
            FakeProviderServer(api_key=KEY) as fake:
        yield redis_url, fake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bound = DEFAULTS.lease_s + 1.25 * DEFAULTS.sweep_interval_s
    print(f"recovery of {args.jobs} generate jobs after a SIGKILL, default settings (lease {DEFAULTS.lease_s:g} s, "
          f"sweep every {DEFAULTS.sweep_interval_s:g} s, no dq beat); bound {bound:.1f} s; {args.rounds} rounds each")
    with services() as (redis_url, fake):
        baseline = statistics.median(unkilled_round(redis_url, fake, args.jobs) for _ in range(args.rounds))
        print(f"  baseline: the same jobs on one worker, no kill: submit to done {baseline:.1f} s (median)")
        for when in ("random", "after renewal"):
            rounds = [killed_round(redis_url, fake, args.jobs, when) for _ in range(args.rounds)]
            running, done = [r for r, _ in rounds], [d for _, d in rounds]
            label = "at a random moment" if when == "random" else "right after a lease renewal"
            print(f"  killed {label:28s} running again: median {statistics.median(running):5.1f} s, "
                  f"max {max(running):5.1f} s ({max(running) / bound:.2f} of the bound); all done: median "
                  f"{statistics.median(done):5.1f} s, max {max(done):5.1f} s "
                  f"(each round: {', '.join(f'{r:.1f}' for r in running)})")


if __name__ == "__main__":
    main()
