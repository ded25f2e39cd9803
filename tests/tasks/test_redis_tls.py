"""``rediss://`` verifies the server's certificate for every Redis client of the job system
(`tasks.redis_connect`), against a real ``redis-server`` that speaks TLS only, with a CA and a
server certificate made by the test; and Redis Cluster URLs are refused at start.

- a job submitted through ``rediss://`` (the CA in ``DQ_REDIS_CA_CERTS``) runs on a real
  ``dq worker``: broker, result backend, events, the limiter and the sweep all speak TLS (the server
  has no plaintext port);
- a server whose certificate the trusted CA did not sign — or, with no CA set, that the system
  bundle does not know — is refused by every client with the TLS error, and a ``dq worker`` on it
  never gets ready; ``?ssl_cert_reqs=none`` is the explicit opt-out.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from datus.models.config import AgentConfig
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.app import create_app
from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.client import JobClient
from datus_queue.tasks.redis_connect import (
    UnsupportedRedisURL,
    async_client,
    beat_client,
    celery_config,
    connect,
    parse,
)
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, _environment
from tests.tasks.redis_servers import TlsRedis, make_ca

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server (with TLS) on PATH")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("certs")
    ca, cert, key = make_ca(directory, "trusted")
    rogue_ca, rogue_cert, rogue_key = make_ca(directory, "rogue")
    return {"ca": ca, "cert": cert, "key": key, "rogue_ca": rogue_ca, "rogue_cert": rogue_cert,
            "rogue_key": rogue_key}


@pytest.fixture
def tls_redis(tmp_path: Path, certs: dict[str, Path]) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "tls-redis", certs["ca"], certs["cert"], certs["key"])
    yield server
    server.close()


@pytest.fixture
def rogue_redis(tmp_path: Path, certs: dict[str, Path]) -> Iterator[TlsRedis]:
    """Speaks TLS with a certificate the trusted CA did not sign."""
    server = TlsRedis(tmp_path / "rogue-redis", certs["rogue_ca"], certs["rogue_cert"], certs["rogue_key"])
    yield server
    server.close()


@pytest.fixture
def tls_client(job_env: JobEnv) -> Iterator[Any]:
    made: list[tuple[JobClient, Any]] = []

    def make(**settings: Any) -> JobClient:
        values = job_env.settings(**settings)
        app = create_app(values)
        job_client = JobClient(settings=values, agent_config=AgentConfig.from_file(job_env.agent_yml), app=app)
        made.append((job_client, app))
        return job_client

    yield make
    for job_client, app in made:
        job_client.close()
        job_client.store.close()
        app.close()


def test_a_job_submitted_through_rediss_runs_on_a_real_worker(
        tls_redis: TlsRedis, certs: dict[str, Path], worker: StartWorker, tls_client: Any,
        fake: FakeProviderServer) -> None:
    env = {"DQ_REDIS_URL": tls_redis.url, "DQ_REDIS_CA_CERTS": str(certs["ca"])}
    running = worker("openai", concurrency=4, env=env)
    client = tls_client(redis_url=tls_redis.url, redis_ca_certs=str(certs["ca"]))
    jobs = client.submit_many([{"model": "openai", "prompt": f"tls-{i}.", "stream": i == 0} for i in range(6)])
    streamed = list(client.stream(jobs[0], timeout=60))  # the events went through TLS too
    results = {job_id: client.result(job_id, timeout=60) for job_id in jobs}

    assert {r.status for r in results.values()} == {JobStatus.SUCCEEDED}, running.log()[-3000:]
    assert [results[job_id].output for job_id in jobs] == [f"echo: tls-{i}." for i in range(6)]
    assert streamed
    assert "not verified" not in running.log()  # verified: no opt-out warning
    # the result backend, the events' client and redbeat's connect over TLS as well
    app = create_app(client.settings)
    try:
        assert app.backend.client.ping()
    finally:
        app.close()
    beat = beat_client(client.settings)
    assert beat.ping() and beat.set("dq:test:tls", "x") and beat.get("dq:test:tls") == "x"
    beat.close()


def test_a_server_whose_certificate_the_trusted_ca_did_not_sign_is_refused_by_every_client(
        rogue_redis: TlsRedis, certs: dict[str, Path], job_env: JobEnv, worker: StartWorker) -> None:
    for settings in (job_env.settings(redis_url=rogue_redis.url, redis_ca_certs=str(certs["ca"])),
                     job_env.settings(redis_url=rogue_redis.url)):  # no CA set: the system bundle
        client = connect(settings, socket_connect_timeout=5)
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            client.ping()
        client.close()
        app = create_app(settings)
        try:
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"), app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)  # the broker: refused, not plaintext
                conn.default_channel.client.ping()
            with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                app.backend.client.ping()
        finally:
            app.close()

    import asyncio

    async def aping() -> None:
        client = async_client(job_env.settings(redis_url=rogue_redis.url, redis_ca_certs=str(certs["ca"])),
                              max_connections=4)
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(aping())

    # a worker on it says why and never gets ready
    running = worker("openai", env={"DQ_REDIS_URL": rogue_redis.url, "DQ_REDIS_CA_CERTS": str(certs["ca"])},
                     wait=False)
    from tests.tasks.conftest import wait_for

    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in running.log(), 30, "the worker to report the TLS error")
    assert " ready." not in running.log()

    # the explicit opt-out still connects
    opted_out = connect(job_env.settings(redis_url=f"{rogue_redis.url}?ssl_cert_reqs=none"))
    assert opted_out.ping()
    opted_out.close()


def test_rediss_verifies_by_default_and_options_come_from_the_url_or_the_environment(job_env: JobEnv) -> None:
    target = parse("rediss://:p%40ss@redis.example:6380/2", job_env.settings())
    assert target.tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    assert target.password == "p@ss" and target.db == 2
    target = parse("rediss://h/0?ssl_ca_certs=/url/ca.pem", job_env.settings(redis_ca_certs="/env/ca.pem",
                                                                               redis_certfile="/c.pem",
                                                                               redis_keyfile="/c.key"))
    assert target.tls is not None and target.tls["ssl_ca_certs"] == "/url/ca.pem"
    assert target.tls["ssl_certfile"] == "/c.pem" and target.tls["ssl_keyfile"] == "/c.key"
    assert target.url == "rediss://h/0"  # the options are not left for kombu or Celery to read another way
    assert parse("rediss://h/0?ssl_cert_reqs=none", job_env.settings()).tls == {
        "ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
    config = celery_config(job_env.settings(redis_url="rediss://h:6380/1"))
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED  # the broker: kombu's default is off
    assert config["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert parse("redis://h/0", job_env.settings()).tls is None
    with pytest.raises(UnsupportedRedisURL, match="rediss://"):
        parse("redis://h/0?ssl_cert_reqs=required", job_env.settings())
    with pytest.raises(UnsupportedRedisURL, match="ssl_cert_reqs"):
        parse("rediss://h/0?ssl_cert_reqs=maybe", job_env.settings())


@pytest.mark.parametrize("url", ["redis+cluster://127.0.0.1:7000/0", "rediss-cluster://h:7000",
                                 "redis://127.0.0.1:7000/0?cluster=true"])
def test_a_redis_cluster_url_is_refused_at_start_saying_why(url: str, job_env: JobEnv) -> None:
    with pytest.raises(UnsupportedRedisURL, match="Redis Cluster is not supported.*kombu"):
        create_app(job_env.settings(redis_url=url))
    done = subprocess.run([*dq_command(), "worker"], check=False, env=_environment(job_env, {"DQ_REDIS_URL": url}),
                          capture_output=True, text=True, timeout=60, cwd=job_env.dir)
    assert done.returncode == 2
    said = " ".join((done.stdout + done.stderr).split())
    assert "Redis Cluster is not supported" in said and "Traceback" not in said, said
