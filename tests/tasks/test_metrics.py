"""Prometheus metrics, scraped from real processes: a worker's /metrics after a run counts
exactly the jobs it ran (by status and error code), their tokens and cost; ``dq metrics``
reports the queues and the dead letters as Redis and the store have them."""

from __future__ import annotations

import subprocess
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import JobEnv, StartWorker, _environment, free_port, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_workers_metrics_count_the_jobs_it_ran(job_env: JobEnv, worker: StartWorker, client: Any) -> None:
    port = free_port()
    worker("openai", env={"DQ_METRICS_PORT": str(port)})
    good = [client.submit({"model": "openai", "prompt": f"metrics job {n}", "stream": False}) for n in range(5)]
    bad = client.submit({"model": "openai-badkey", "prompt": "metrics job with a rejected key", "stream": False})
    results = [client.result(job_id, timeout=60) for job_id in [*good, bad]]
    assert [r.status for r in results] == [JobStatus.SUCCEEDED] * 5 + [JobStatus.FAILED]

    def counted() -> dict[Any, float] | None:  # the worker counts a job just after its result is stored
        samples = scrape(port)
        done = sum(value(samples, "dq_jobs_total", provider="openai", kind="generate", status=status)
                   for status in ("succeeded", "failed"))
        return samples if done == 6 else None

    samples = wait_for(counted, 30, "the worker to count every job")
    assert value(samples, "dq_jobs_total", provider="openai", kind="generate", status="succeeded") == 5
    assert value(samples, "dq_job_failures_total", provider="openai", code=results[-1].error.code) == 1
    assert value(samples, "dq_jobs_in_flight", provider="openai") == 0
    assert value(samples, "dq_queue_wait_seconds_count", provider="openai", kind="generate") == 6
    usage = [r.usage for r in results[:5]]
    model = usage[0]["model"]
    assert value(samples, "dq_tokens_total", provider="openai", model=model, type="input") == sum(
        u["input_tokens"] for u in usage)
    assert value(samples, "dq_tokens_total", provider="openai", model=model, type="output") == sum(
        u["output_tokens"] for u in usage)
    assert value(samples, "dq_cost_usd_total", provider="openai", model=model) == pytest.approx(
        sum(r.cost_usd for r in results[:5]))
    assert value(samples, "dq_model_call_seconds_count", provider="openai", model=model) == 5
    labels = {dict(key[1]).get("job_id") for key in samples} | {dict(key[1]).get("prompt") for key in samples}
    assert labels == {None}, "no job ids or prompts in labels"


def test_dq_metrics_reports_queues_and_dead_letters(job_env: JobEnv, client: Any) -> None:
    for n in range(3):  # no worker serves gemini here: they wait in llm.gemini
        client.submit({"model": "gemini", "prompt": f"waiting {n}"})
    client.store.record_dead_letter("m-test", "undecodable message")
    port = free_port()
    proc = subprocess.Popen([*dq_command(), "metrics", "--port", str(port), "--addr", "127.0.0.1"],
                            env=_environment(job_env, {}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        samples = wait_for(lambda: _try_scrape(port), 30, "dq metrics to serve")
        assert value(samples, "dq_queue_messages", queue="llm.gemini") == 3
        assert value(samples, "dq_queue_messages", queue="llm.openai") == 0
        assert value(samples, "dq_dead_letters") == 1
        assert value(samples, "dq_store_jobs", status="queued") == 3
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def _try_scrape(port: int) -> dict[Any, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None
