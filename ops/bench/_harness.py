"""Shared pieces of the job-system benchmarks: a fake provider server process, a private Redis
database and job store, and a client wired to them (the worker process is
`tasks.cli.services.worker_process`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from datus.models.config import AgentConfig
from datus.testing.fake_process import fake_server_process as _fake_server_process
from datus_queue.tasks.app import create_app
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.settings import Settings

KEY = "sk-bench-not-a-real-key"


@contextlib.contextmanager
def fake_server_process(latency_ms: float, *options: str) -> Iterator[str]:
    """The fake provider in a process of its own (`datus.testing.fake_process`); ``options``: more
    of its command line (e.g. ``--requests-per-minute 600 --window-s 2`` to enforce a limit)."""
    with _fake_server_process("--latency-ms", str(latency_ms), *options) as url:
        yield url


@contextlib.contextmanager
def job_system(fake_url: str, redis_url: str, database_url: str | None = None,
               rate_limits: str | None = None) -> Iterator[tuple[JobClient, dict[str, str]]]:
    """A config naming one fake-backed OpenAI model ``bench`` (with ``rate_limits``, a YAML
    flow mapping, when given); yields a client and the env a worker needs. The Redis database
    is flushed before and after."""
    tmp = Path(tempfile.mkdtemp(prefix="dq-bench-"))
    config_path = tmp / "agent.yml"
    limits = f", rate_limits: {rate_limits}" if rate_limits else ""
    config_path.write_text(
        "agent:\n  target: bench\n  models:\n"
        f"    bench: {{type: openai, model: gpt-4o-mini, api_key: {KEY}, base_url: '{fake_url}/v1', timeout_s: 60"
        f"{limits}}}\n"
    )
    with _fresh_database(database_url or f"sqlite:///{tmp / 'jobs.db'}") as url:
        yield from _job_system(tmp, config_path, redis_url, url)


def _job_system(tmp: Path, config_path: Path, redis_url: str,
                database_url: str) -> Iterator[tuple[JobClient, dict[str, str]]]:
    env = {**os.environ, "DQ_CONFIG": str(config_path), "DQ_REDIS_URL": redis_url, "DQ_DATABASE_URL": database_url}
    settings = Settings(redis_url=redis_url, database_url=database_url, config=str(config_path))
    client = JobClient(settings=settings, agent_config=AgentConfig.from_file(config_path), app=create_app(settings))
    client.redis.flushdb()
    try:
        yield client, env
    finally:
        client.redis.flushdb()
        client.close()
        client.store.close()


@contextlib.contextmanager
def _fresh_database(url: str) -> Iterator[str]:
    """SQLite: the new file. Postgres (``DQ_BENCH_DATABASE_URL``): a schema of its own, dropped
    afterwards (the search_path rides in the URL, so the worker lands there too)."""
    if not url.startswith("postgres"):
        yield url
        return
    import uuid

    from sqlalchemy import create_engine, make_url

    base = make_url(url)
    schema = f"dq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def wait_until_final(client: JobClient, total: int, timeout_s: float) -> float:
    """Seconds until ``total`` jobs are final (polling the store's counts)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        counts = client.store.count_by_status()
        done = sum(counts[s] for s in ("succeeded", "failed", "cancelled", "dead"))
        if done >= total:
            return time.perf_counter() - start
        time.sleep(0.02)
    raise TimeoutError(f"only {done}/{total} jobs final after {timeout_s}s: {counts}")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo += [int(child) for child in handle.read().split()]
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its living descendants."""
    total = 0.0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{each}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
