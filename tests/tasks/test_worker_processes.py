"""``dq worker --processes N``: real processes on real Redis. Both children take jobs, the one
/metrics adds them up, a child killed is started again, and SIGTERM to the parent stops them all
with exit code 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from datus_queue.tasks.cli.services import dq_command
from datus_queue.tasks.schemas import JobStatus
from datus_queue.workers.processes import merge_metrics
from tests.tasks.conftest import JobEnv, Worker, _environment, free_port, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def children(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found |= {int(child) for child in handle.read().split()}
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_processes_share_the_jobs_and_one_metrics_endpoint(job_env: JobEnv, client: Any) -> None:
    port = free_port()
    log_path = job_env.dir / "worker-processes.log"
    command = [*dq_command(), "worker", "--processes", "2", "-c", "2", "-p", "openai", "--metrics-port", str(port),
               "-l", "INFO"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_environment(job_env, None), cwd=job_env.dir, start_new_session=True)
    worker = Worker(proc, log_path, ("openai",))
    try:
        wait_for(lambda: worker.log().count(" ready.") >= 2 or not worker.alive(), 60, "both processes to be ready")
        assert worker.alive(), worker.log()[-3000:]
        first_children = children(proc.pid)
        assert len(first_children) == 2

        # two jobs in flight per process and calls that take a while: neither process can take them all
        job_env.fake.latency_s = 0.3
        jobs = client.submit_many([{"model": "openai", "prompt": f"processes job {n}", "stream": False}
                                   for n in range(12)])
        assert [client.result(job_id, timeout=60).status for job_id in jobs] == [JobStatus.SUCCEEDED] * 12

        def counted() -> dict[Any, float] | None:  # a job is counted just after its result is stored
            samples = scrape(port)
            done = value(samples, "dq_jobs_total", provider="openai", kind="generate", status="succeeded")
            return samples if done == 12 else None

        samples = wait_for(counted, 30, "the processes to count every job")
        assert value(samples, "dq_worker_processes") == 2
        per_process = [value(samples, "dq_worker_process_jobs_total", process=str(i)) for i in (1, 2)]
        assert sum(per_process) == 12 and all(n > 0 for n in per_process), per_process
        assert value(samples, "dq_jobs_in_flight", provider="openai") == 0
        assert value(samples, "dq_queue_wait_seconds_count", provider="openai", kind="generate") == 12

        # a child that dies is started again
        job_env.fake.latency_s = 0.0
        victim = min(first_children)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(proc.pid) - {victim}) == 2 and worker.log().count(" ready.") >= 3,
                 60, "the killed process to be started again")
        assert "exited with -9; starting it again" in worker.log()
        again = client.submit({"model": "openai", "prompt": "after the restart", "stream": False})
        assert client.result(again, timeout=60).status is JobStatus.SUCCEEDED

        # SIGTERM to the parent stops every child; the parent exits 0
        running = children(proc.pid)
        worker.terminate()
        assert worker.wait_exit(60) == 0, worker.log()[-3000:]
        assert not any(alive(pid) for pid in running)
    finally:
        worker.stop()


def test_the_merged_exposition_sums_series_and_keeps_timestamps() -> None:
    child = ('# HELP dq_jobs_total Jobs\n# TYPE dq_jobs_total counter\n'
             'dq_jobs_total{{provider="openai",kind="generate",status="succeeded"}} {n}\n'
             'dq_jobs_created{{provider="openai",kind="generate",status="succeeded"}} {created}\n'
             '# HELP dq_jobs_in_flight Running\n# TYPE dq_jobs_in_flight gauge\n'
             'dq_jobs_in_flight{{provider="openai"}} {n}\n'
             '# HELP process_start_time_seconds Start\n# TYPE process_start_time_seconds gauge\n'
             'process_start_time_seconds {created}\n')
    merged = merge_metrics([(1, child.format(n=3, created=100.0)), (2, child.format(n=4, created=50.0))])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(merged) for s in family.samples}
    job = (("kind", "generate"), ("provider", "openai"), ("status", "succeeded"))
    assert samples[("dq_jobs_total", job)] == 7
    assert samples[("dq_jobs_created", job)] == 50.0
    assert samples[("dq_jobs_in_flight", (("provider", "openai"),))] == 7
    assert samples[("process_start_time_seconds", ())] == 50.0
    assert samples[("dq_worker_processes", ())] == 2
    assert samples[("dq_worker_process_jobs_total", (("process", "1"),))] == 3
    assert samples[("dq_worker_process_jobs_total", (("process", "2"),))] == 4
