"""Redis Sentinel (``sentinel://h1:p1;sentinel://h2:p2/db?master_name=NAME``, `tasks.redis_connect`)
for the broker, results, events, the limiter, the sweep and the client, against real processes: a
master ``redis-server``, a replica (``--replicaof``) and three sentinels (quorum 2) on free ports.

The failover test submits jobs through a real ``dq worker`` (every recovery setting at its default),
makes the sentinels fail over mid-run — ``SENTINEL FAILOVER`` (the replica becomes the master, the old
master its replica, every client connection to it closed), or the master SIGKILLed (the sentinels
find it down after 1 s and elect the replica) — and asserts every job ends SUCCEEDED with
its output, none stuck, each answered by the provider at most twice (a call cut off by the failover
may be made again), and that the worker lived on and followed the new master.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from datus.models.config import AgentConfig
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.app import create_app
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.redis_connect import UnsupportedRedisURL, celery_config, connect, parse
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, generations, wait_for
from tests.tasks.redis_servers import SentinelSet

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    made = SentinelSet(tmp_path / "sentinel")
    yield made
    made.close()


@pytest.fixture
def sentinel_client(job_env: JobEnv) -> Iterator[Any]:
    made: list[tuple[JobClient, Any]] = []

    def make(redis_url: str, **overrides: Any) -> JobClient:
        settings = job_env.settings(redis_url=redis_url, **overrides)
        app = create_app(settings)
        job_client = JobClient(settings=settings, agent_config=AgentConfig.from_file(job_env.agent_yml), app=app)
        made.append((job_client, app))
        return job_client

    yield make
    for job_client, app in made:
        job_client.close()
        job_client.store.close()
        app.close()


def test_the_sentinel_url_form() -> None:
    target = parse("sentinel://:p%40ss@h1:26379;sentinel://h2:26380;sentinel://h3/4?master_name=main")
    assert target.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (target.master_name, target.db, target.password, target.tls) == ("main", 4, "p@ss", None)
    config = celery_config(target)
    assert config["broker_url"] == "sentinel://:p%40ss@h1:26379/4;sentinel://:p%40ss@h2:26380/4;sentinel://:p%40ss@h3:26379/4"
    assert config["result_backend"] == config["broker_url"]
    assert config["broker_transport"] == "datus_queue.tasks.transport:SentinelTransport"
    assert config["transport_options"] == {"master_name": "main"}
    secured = celery_config(parse("sentinel://:pw@h1:26379/0?master_name=m&sentinel_password=spw"))
    assert secured["transport_options"] == {"master_name": "m", "sentinel_kwargs": {"password": "spw"}}
    with pytest.raises(UnsupportedRedisURL, match="master_name"):
        parse("sentinel://h1:26379/0")
    with pytest.raises(UnsupportedRedisURL, match="sentinel://"):
        parse("sentinel://h1:26379;redis://h2/0?master_name=m")


def test_the_sentinel_transport_carries_our_channel_fixes() -> None:
    from kombu.transport import redis as kombu_redis

    from datus_queue.tasks.transport import GuardedChannel, SentinelTransport

    channel = SentinelTransport.Channel
    assert issubclass(channel, GuardedChannel) and issubclass(channel, kombu_redis.SentinelChannel)
    for name in ("conn_or_acquire", "_brpop_read", "_get", "_dead_letter"):  # ours, above kombu's
        assert getattr(channel, name) is getattr(GuardedChannel, name), name
    assert channel._get_pool is kombu_redis.SentinelChannel._get_pool  # the master found through the sentinels


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sentinel failover", "master killed"])
def test_jobs_through_sentinel_survive_a_failover_mid_run(
        how: str, sentinels: SentinelSet, worker: StartWorker, sentinel_client: Any, fake: FakeProviderServer) -> None:
    url = sentinels.url(db=0)
    fake.latency_s = 0.3
    running = worker("openai", concurrency=8, env={"DQ_REDIS_URL": url})
    client = sentinel_client(url)
    jobs = client.submit_many([{"model": "openai", "prompt": f"failover-{i}.", "stream": i % 2 == 0}
                               for i in range(40)])
    wait_for(lambda: len(generations(fake, "failover-")) >= 8, 30, "the run to be under way")
    old_master = sentinels.master_port_now()
    # mid-run: calls in flight, messages queued, acknowledgements due
    new_master = sentinels.failover() if how == "sentinel failover" else sentinels.kill_master()
    assert new_master != old_master

    started = time.monotonic()
    results = {job_id: client.result(job_id, timeout=60) for job_id in jobs}

    assert {r.status for r in results.values()} == {JobStatus.SUCCEEDED}, (
        [(job_id, r.status, r.error) for job_id, r in results.items() if r.status is not JobStatus.SUCCEEDED],
        running.log()[-3000:])
    assert [results[job_id].output for job_id in jobs] == [f"echo: failover-{i}." for i in range(40)]
    assert all(1 <= len(generations(fake, f"failover-{i}.")) <= 2 for i in range(40))
    assert running.alive(), running.log()[-3000:]
    assert "Unrecoverable error" not in running.log()
    # the new master holds the queues. Replication is asynchronous: an acknowledgement the old master
    # took in the failover's last moments is not on the new one, so its message may stay in kombu's
    # unacked hash; after the visibility timeout kombu hands it out again and the worker drops it —
    # its job is final (tasks/jobs.py; test_recovery.py's message that turns up after its resend).
    # Anything left there must be of a finished job, and no queue may still hold one.
    with redis.Redis(port=new_master) as master:
        assert master.info("replication")["role"] == "master"
        left = [json.loads(raw)[0]["headers"]["id"] for raw in master.hvals("unacked")]
        assert set(left) <= set(jobs)
        # a message the worker held when the connection dropped went back to its queue (kombu restores
        # a closed channel's unacknowledged messages); its job is final: the worker takes and drops it
        wait_for(lambda: not [key for key in master.scan_iter("llm.*")
                              if master.type(key) == b"list" and master.llen(key)], 30, "the queues to be empty")
    # and a job submitted after the failover runs at once
    after = client.submit({"model": "openai", "prompt": "after-failover.", "stream": False})
    assert client.result(after, timeout=30).output == "echo: after-failover."
    print(f"all {len(jobs)} jobs done {time.monotonic() - started:.1f}s after the failover; "
          f"{len(left)} stale unacked entries")


@pytest.mark.slow
def test_every_client_follows_the_sentinels_to_the_master(sentinels: SentinelSet, job_env: JobEnv) -> None:
    """The sync and async clients, the result backend and redbeat's client reach the master the
    sentinels name (db from the URL), before and after a failover."""
    import asyncio

    from datus_queue.tasks.redis_connect import async_client, beat_client

    settings = job_env.settings(redis_url=sentinels.url(db=5))
    sync = connect(settings)
    sync.set("dq:test:where", "1")
    with redis.Redis(port=sentinels.master_port, db=5) as direct:
        assert direct.get("dq:test:where") == b"1"
    app = create_app(settings)
    try:
        assert app.backend.client.ping()
    finally:
        app.close()
    beat = beat_client(settings)
    assert beat.get("dq:test:where") == "1"

    new_master = sentinels.failover()
    sentinels.wait_failover_done(new_master)
    wait_for(lambda: _sets(sync), 20, "the sync client to write to the new master")
    wait_for(lambda: _sets(beat), 20, "redbeat's client to write to the new master")

    async def through_async() -> bytes | None:
        client = async_client(settings, max_connections=4)
        try:
            await client.set("dq:test:async", "2")
            return await client.get("dq:test:async")
        finally:
            await client.aclose()

    assert asyncio.run(through_async()) == b"2"
    with redis.Redis(port=new_master, db=5) as direct:
        assert direct.get("dq:test:async") == b"2"
    sync.close()
    beat.close()


def _sets(client: Any) -> bool:
    try:
        return bool(client.set("dq:test:after", "1"))
    except redis.exceptions.RedisError:
        return False


@pytest.mark.slow
def test_sentinel_over_tls_runs_jobs_and_refuses_a_certificate_it_cannot_verify(
        tmp_path: Path, worker: StartWorker, sentinel_client: Any, fake: FakeProviderServer, job_env: JobEnv) -> None:
    """``?ssl=true``: the master, the replica and the sentinel speak TLS only; the worker and the client
    verify them against ``DQ_REDIS_CA_CERTS``, and a CA that did not sign them is refused."""
    from tests.tasks.redis_servers import make_ca

    ca, cert, key = make_ca(tmp_path / "certs", "trusted")
    rogue_ca, _, _ = make_ca(tmp_path / "certs", "rogue")
    servers = SentinelSet(tmp_path / "tls-sentinel", sentinels=1, quorum=1, tls=(ca, cert, key))
    try:
        url = servers.url(db=0)
        assert url.endswith("&ssl=true")
        running = worker("openai", concurrency=4, env={"DQ_REDIS_URL": url, "DQ_REDIS_CA_CERTS": str(ca)})
        client = sentinel_client(url, redis_ca_certs=str(ca))
        jobs = client.submit_many([{"model": "openai", "prompt": f"tls-sentinel-{i}.", "stream": False}
                                   for i in range(4)])
        results = [client.result(job_id, timeout=60) for job_id in jobs]
        assert [r.output for r in results] == [f"echo: tls-sentinel-{i}." for i in range(4)], running.log()[-3000:]

        refused = connect(job_env.settings(redis_url=url, redis_ca_certs=str(rogue_ca)), socket_connect_timeout=5)
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            refused.ping()
        refused.close()
    finally:
        servers.close()
