"""What moving the job store's writes off the event loop costs, against the code before it, in
the same run.

    python ops/bench/group_commit.py [--part store|jobs|all] [--jobs 2000] [--in-flight 200]
                                     [--latency-ms 100] [--concurrency 100] [--rounds 3]
                                     [--baseline REV] [--redis-url URL]

The baseline is this working tree with the store's writing code (``tasks/store/group_commit.py``,
``tasks/store/job_store.py``) as it is at ``--baseline`` (default HEAD): the group commit's
transaction on the loop's own thread. Everything else is the same code, so the difference is
this change alone. It is put first on PYTHONPATH of the processes that measure it.

store  N jobs' store writes on one event loop, ``--in-flight`` at once, each job a start
       (``amark_running``), a short sleep standing for its call, and a finish (``afinish``);
       SQLite, and Postgres when ``DQ_BENCH_POSTGRES_URL`` is set. Each mode in a fresh
       interpreter: CPU per job (the process's, every thread's) and the loop's longest stall
       (the largest gap a 1 ms ticker on the loop saw), once as is and once while another
       connection holds the write lock for a second (BEGIN IMMEDIATE; Postgres: LOCK TABLE).
       Modes: ``loop`` (the baseline), ``thread`` (this tree: the writer thread) and, when
       aiosqlite/asyncpg and greenlet are importable, ``async-driver``: SQLAlchemy's asyncio
       extension, the same per-turn groups committed through ``AsyncConnection.run_sync``.
jobs   generate jobs through Redis and one ``dq worker`` on the fake provider (as
       ``job_throughput.py``), baseline against this tree: jobs/s and the worker's CPU per job
       (user + system time of the process over the measured window).

Rounds alternate the modes, the order flipped every round; medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

CHANGED = ("tasks/store/group_commit.py", "tasks/store/job_store.py")  # what the baseline takes from REV
PACKAGES = ("datus", "datus_queue", "tasks", "workers", "scheduler")


def baseline_tree(revision: str) -> Path:
    """This working tree with `CHANGED` as they are at ``revision``, importable as
    ``datus_queue.*`` from a PYTHONPATH entry (the repository's folders linked under it)."""
    target = Path(tempfile.mkdtemp(prefix="dq-bench-group-commit-"))
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in CHANGED:
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"], check=True,
                             capture_output=True).stdout
        (target / path).write_bytes(old)
    for package in ("tasks", "workers", "scheduler"):  # what setup.py maps under datus_queue
        (target / "datus_queue" / package).symlink_to(target / package, target_is_directory=True)
    return target


def with_path(entry: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if entry is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(entry), env.get("PYTHONPATH")]))
    return env


# ---- store: one interpreter per measurement ------------------------------------------------------


class _LockHolder(threading.Thread):
    """Another connection holding what the store's writers need, for ``seconds`` once started
    (SQLite: BEGIN IMMEDIATE; Postgres: a lock on the jobs table that blocks UPDATE)."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(name="lock-holder")
        self.url, self.seconds = url, seconds
        self.held = threading.Event()  # set once the lock is held (or the holder failed)
        self.failed: Exception | None = None

    def run(self) -> None:
        try:
            self._hold()
        except Exception as exc:  # noqa: BLE001 - raised by the bench once its jobs are done
            self.failed = exc
        finally:
            self.held.set()  # also when it failed: the jobs go on instead of waiting for it

    def _hold(self) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        from datus.models.sql_engines import with_driver

        if self.url.startswith("sqlite"):
            import sqlite3

            conn = sqlite3.connect(make_url(self.url).database, isolation_level=None, timeout=30)
            conn.execute("BEGIN IMMEDIATE")
            self.held.set()
            time.sleep(self.seconds)
            conn.execute("ROLLBACK")
            conn.close()
            return
        engine = create_engine(with_driver(self.url))
        with engine.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
            self.held.set()
            time.sleep(self.seconds)
        engine.dispose()


class _AsyncDriverGroups:
    """The other way to keep the loop free: SQLAlchemy's asyncio extension on an async driver,
    the writes of one loop turn committed in one transaction (the same `writes.apply`)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        from datus_queue.tasks.store import writes

        async_url = url.replace("sqlite://", "sqlite+aiosqlite://", 1) if url.startswith("sqlite") else (
            url.replace("postgresql://", "postgresql+asyncpg://", 1).split("?")[0])
        self.engine = create_async_engine(async_url)
        self.apply = writes.apply
        self.pending: list[tuple[Any, asyncio.Future[Any]]] = []

    async def submit(self, op: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.pending:
            loop.call_soon(lambda: loop.create_task(self._flush()))
        self.pending.append((op, future))
        return await future

    async def _flush(self) -> None:
        group, self.pending = self.pending, []
        async with self.engine.begin() as conn:
            results = await conn.run_sync(lambda sync: self.apply(sync, [op for op, _ in group]))
        for (_, future), result in zip(group, results):
            future.set_result(result)


async def _store_child(url: str, mode: str, jobs: int, in_flight: int, lock_s: float) -> dict[str, float]:
    from datus_queue.tasks.schemas import JobRequest, JobStatus
    from datus_queue.tasks.store import JobStore
    from datus_queue.tasks.store import writes as job_writes

    store = JobStore(url)
    request = JobRequest(model="openai:gpt-4o-mini", prompt="q")
    ids = [job_id for job_id, _ in store.create_jobs([(uuid.uuid4().hex, request, "openai") for _ in range(jobs)])]
    if mode == "async-driver":
        groups = _AsyncDriverGroups(url)
        start_job = lambda job_id: groups.submit(job_writes.running(job_id, 1, 300.0))
        finish_job = lambda job_id: groups.submit(job_writes.finish(job_id, JobStatus.SUCCEEDED, output="a",
                                                                    run=1))
    else:
        start_job = lambda job_id: store.amark_running(job_id, 1, 300.0)
        finish_job = lambda job_id: store.afinish(job_id, JobStatus.SUCCEEDED, output="a", run=1)
    stall = 0.0
    running = True

    async def ticker() -> None:
        nonlocal stall
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stall = max(stall, time.perf_counter() - before)

    gate = asyncio.Semaphore(in_flight)

    holder = _LockHolder(url, lock_s) if lock_s else None
    trigger = len(ids) // 4  # the lock is taken once a quarter of the jobs have started ...
    locked = asyncio.Event()  # ... and the jobs after them start once it is held

    async def job(n: int, job_id: str) -> None:
        async with gate:
            if holder is not None and n > trigger:
                await locked.wait()
            await start_job(job_id)
            if holder is not None and n == trigger:
                holder.start()
                await asyncio.to_thread(holder.held.wait)
                locked.set()
            await asyncio.sleep(0.002)  # the call
            await finish_job(job_id)

    tick = asyncio.create_task(ticker())
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(job(n, job_id) for n, job_id in enumerate(ids)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    running = False
    await tick
    if holder is not None:
        holder.join()
        if holder.failed is not None:
            raise RuntimeError("the lock holder failed") from holder.failed
    assert store.count_by_status()["succeeded"] == jobs
    store.close()
    from datus_queue.tasks.store import group_commit

    return {"cpu_ms_per_job": cpu / jobs * 1000, "wall_s": wall, "max_stall_ms": stall * 1000,
            "code": group_commit.__file__}


def store_once(mode: str, base: Path, backend: str, args: argparse.Namespace, lock_s: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="dq-bench-store-"))
    url = f"sqlite:///{tmp / 'jobs.db'}" if backend == "sqlite" else _pg_schema(create=True)
    command = [sys.executable, __file__, "--child", json.dumps(
        {"url": url, "mode": mode, "jobs": args.jobs, "in_flight": args.in_flight, "lock_s": lock_s})]
    child = subprocess.run(command, check=False, capture_output=True, text=True,
                           env=with_path(base if mode == "loop" else None))
    if child.returncode:
        raise RuntimeError(f"{mode} on {backend} failed:\n{child.stderr[-3000:]}")
    out = child.stdout
    shutil.rmtree(tmp, ignore_errors=True)
    if backend != "sqlite":
        _pg_schema(drop=url)
    result = json.loads(out.strip().splitlines()[-1])
    # the mode measured the code it names: the baseline's store from the baseline tree
    assert result.pop("code").startswith(str(base)) == (mode == "loop"), (mode, result)
    return result


def _pg_schema(create: bool = False, drop: str | None = None) -> str:
    """A fresh schema in ``DQ_BENCH_POSTGRES_URL`` (its URL carries the search_path), or drop one."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    base = make_url(os.environ["DQ_BENCH_POSTGRES_URL"])
    schema = make_url(drop).query["options"].split("=", 1)[1] if drop else f"dq_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE' if drop else f'CREATE SCHEMA "{schema}"')
    admin.dispose()
    return base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def async_driver_available(backend: str) -> bool:
    import importlib.util

    driver = "aiosqlite" if backend == "sqlite" else "asyncpg"
    return all(importlib.util.find_spec(name) is not None for name in (driver, "greenlet"))


def part_store(base: Path, args: argparse.Namespace) -> None:
    backends = ["sqlite"] + (["postgres"] if os.environ.get("DQ_BENCH_POSTGRES_URL") else [])
    for backend in backends:
        # the async driver is measured on SQLite only when aiosqlite is there; its Postgres URL
        # cannot carry the search_path option, so there it is not measured
        modes = ["loop", "thread"] + (["async-driver"] if backend == "sqlite" and async_driver_available(backend)
                                      else [])
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        locked: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for round_no in range(args.rounds):
            for mode in modes if round_no % 2 == 0 else modes[::-1]:
                runs[mode].append(store_once(mode, base, backend, args, 0.0))
                locked[mode].append(store_once(mode, base, backend, args, 1.0))
        print(f"store writes on one event loop, {backend}: {args.jobs} jobs (start + finish), "
              f"{args.in_flight} in flight (medians of {args.rounds} rounds)")
        base_cpu = statistics.median(r["cpu_ms_per_job"] for r in runs["loop"])
        for mode in modes:
            cpu = statistics.median(r["cpu_ms_per_job"] for r in runs[mode])
            wall = statistics.median(r["wall_s"] for r in runs[mode])
            stall = statistics.median(r["max_stall_ms"] for r in runs[mode])
            held = statistics.median(r["max_stall_ms"] for r in locked[mode])
            print(f"  {mode:<13} CPU {cpu:6.3f} ms/job ({cpu / base_cpu:4.2f}x the loop's)   {args.jobs / wall:7.0f} jobs/s"
                  f"   longest loop stall {stall:7.1f} ms, {held:7.1f} ms with the lock held 1 s elsewhere")
        if not async_driver_available(backend):
            print("  async-driver  not measured: pip install aiosqlite greenlet (asyncpg for Postgres)")


# ---- jobs: a real worker ------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, every thread


def jobs_once(url: str, args: argparse.Namespace, base: Path | None, log: Path) -> tuple[float, float]:
    from _harness import job_system, wait_until_final

    from datus_queue.tasks.cli.services import worker_process

    with job_system(url, args.redis_url, os.environ.get("DQ_BENCH_DATABASE_URL")) as (client, env):
        worker_env = {**env, "PYTHONPATH": with_path(base)["PYTHONPATH"]} if base is not None else env
        with worker_process(worker_env, ["openai"], args.concurrency, log) as worker:
            client.result(client.submit({"model": "bench", "prompt": "warm up", "stream": False}), timeout=60)
            cpu, start = _cpu_s(worker.pid), time.perf_counter()
            for start_at in range(0, args.jobs, 100):
                client.submit_many([{"model": "bench", "prompt": f"q{i}", "stream": False}
                                    for i in range(start_at, min(args.jobs, start_at + 100))])
            wait_until_final(client, args.jobs + 1, timeout_s=600)
            elapsed, cpu = time.perf_counter() - start, _cpu_s(worker.pid) - cpu
            failed = client.store.count_by_status()["failed"]
            if failed:
                print(f"  warning: {failed} jobs failed (see {log})")
            return elapsed, cpu / args.jobs * 1000


def store_code(env: dict[str, str]) -> str:
    """Where a process started with ``env`` in the current directory finds the group commit."""
    return subprocess.run([sys.executable, "-c", "import datus_queue.tasks.store.group_commit as g; print(g.__file__)"],
                          env=env, check=True, capture_output=True, text=True).stdout.strip()


def part_jobs(base: Path, args: argparse.Namespace) -> None:
    from _harness import fake_server_process

    log = Path(tempfile.mkdtemp(prefix="dq-bench-")) / "worker.log"
    # dq worker becomes `python -m datus_queue.workers`, which puts its working directory first on
    # sys.path: in the repository that would be this tree's datus_queue, whatever PYTHONPATH says
    os.chdir(log.parent)
    assert store_code(with_path(base)).startswith(str(base)) and store_code(with_path(None)).startswith(str(ROOT))
    modes = ("loop", "thread")
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with fake_server_process(args.latency_ms) as url:
        for round_no in range(args.rounds):
            for mode in modes if round_no % 2 == 0 else modes[::-1]:
                runs[mode].append(jobs_once(url, args, base if mode == "loop" else None, log))
    print(f"generate jobs through Redis and one dq worker -c {args.concurrency}: {args.jobs} jobs, fake latency "
          f"{args.latency_ms:.0f} ms (medians of {args.rounds} rounds)")
    base_wall = statistics.median(wall for wall, _ in runs["loop"])
    base_cpu = statistics.median(cpu for _, cpu in runs["loop"])
    for mode in modes:
        wall = statistics.median(w for w, _ in runs[mode])
        cpu = statistics.median(c for _, c in runs[mode])
        print(f"  {mode:<7} {args.jobs / wall:7.1f} jobs/s ({wall / base_wall:4.2f}x the loop's time)   worker CPU "
              f"{cpu:6.3f} ms/job ({cpu / base_cpu:4.2f}x)   rounds: "
              + ", ".join(f"{args.jobs / w:.0f} jobs/s {c:.2f} ms" for w, c in runs[mode]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["store", "jobs", "all"], default="all")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the store code to compare with")
    parser.add_argument("--redis-url", default=os.environ.get("DQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(asyncio.run(_store_child(spec["url"], spec["mode"], spec["jobs"], spec["in_flight"],
                                                  spec["lock_s"]))))
        return 0
    base = baseline_tree(args.baseline)
    print(f"baseline: the store's writes on the loop ({', '.join(CHANGED)} at {args.baseline}), in {base}")
    try:
        if args.part in ("store", "all"):
            part_store(base, args)
        if args.part in ("jobs", "all"):
            part_jobs(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
