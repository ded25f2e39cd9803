"""ops/runbook.md, run as an operator runs it: every fenced block in order (see tests/docs_runner.py),
against a private Redis, a SQLite job store and the fake provider, with the repository's
conf/agent.yml. `docker compose` lines need a Docker engine and are not run here (the compose
file is validated by tests/test_deployment.py)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.cli.services import local_redis
from datus_queue.tasks.schemas import JobError, JobRequest, JobStatus
from datus_queue.tasks.store import JobStore
from tests.docs_runner import KEY, NOT_RUN, ROOT, ReadmeModel, Run, readme_blocks, user_env

RUNBOOK = ROOT / "ops" / "runbook.md"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_runbook_command_works(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    shutil.copy(ROOT / "conf" / "agent.yml", tmp_path / "conf" / "agent.yml")
    blocks = readme_blocks(RUNBOOK.read_text(encoding="utf-8"))
    assert len(blocks) >= 6, "the runbook lost its commands"
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with FakeProviderServer(api_key=KEY) as fake, local_redis(tmp_path) as redis_url:
        fake.script.reset(fallback=ReadmeModel())
        # a dead letter to look at and replay: a job on a queue no worker of the runbook serves
        store = JobStore(store_url)
        job_id, _ = store.create_job("runbook-dead-job", JobRequest(model="gemini", prompt="a poison job"), "gemini")
        store.finish(job_id, JobStatus.DEAD, error=JobError(code="dead_letter", type="DeadLetter",
                                                            message="delivered 6 times"), run=1)
        store.record_dead_letter(job_id, "delivered 6 times (5 redeliveries without a result)", job_id=job_id)
        store.close()
        env = user_env(tmp_path / "home", fake) | {"DQ_REDIS_URL": redis_url, "DQ_DATABASE_URL": store_url,
                                                    "DQ_CONFIG": "conf/agent.yml"}
        (tmp_path / "home").mkdir()
        run = Run(tmp_path, env, deployment={}, where="ops/runbook.md",
                  placeholders={"HOST": socket.gethostname(), "DEAD_ID": job_id},
                  not_run={**NOT_RUN, ("docker", "compose"): "needs a Docker engine"})
        run.run_all(blocks)

    assert any("pong" in out for out in run.output_of("celery", "-A", "datus_queue", "inspect", "ping"))
    assert any("llm.openai" in out for out in run.output_of("celery", "-A", "datus_queue", "inspect", "active_queues"))
    scraped = run.output_of("curl")
    assert any("# TYPE dq_jobs_total counter" in out for out in scraped), "a worker's /metrics"
    assert any('dq_queue_messages{queue="llm.openai"}' in out and "dq_dead_letters 1.0" in out for out in scraped)
    assert any(job_id in out for out in run.output_of("dq", "dead", "list"))
    assert any(f"replayed {job_id}" in out for out in run.output_of("dq", "dead", "replay"))
    assert any("no longer consuming" in out for out in run.output_of("celery", "-A", "datus_queue", "control"))
