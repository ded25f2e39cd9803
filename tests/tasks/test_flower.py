"""Flower, as an operator runs it (the README's command), watching a real worker.

Flower switches task events on in the workers it sees; our tasks must show with their names
and states, their arguments must not carry the prompt or a key, and the API must refuse
requests without the basic-auth credentials.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tasks.conftest import KNOWN_KEY, JobEnv, StartWorker, free_port, wait_for

AUTH = "ops:flower-test-pass"
PROMPT = "flower-secret-prompt: how many orders are there?"


def _get(url: str, auth: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body[:1] in (b"{", b"[") else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:  # not listening yet
        return 0, None


@pytest.fixture
def flower(job_env: JobEnv) -> Iterator[str]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
    env.update(DQ_CONFIG=str(job_env.agent_yml), DQ_REDIS_URL=job_env.redis_url,
               DQ_DATABASE_URL=job_env.database_url)
    celery = Path(sys.executable).with_name("celery")
    log = job_env.dir / "flower.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen([str(celery), "-A", "datus_queue", "flower", f"--port={port}", "--address=127.0.0.1",
                                 f"--basic-auth={AUTH}"], env=env, cwd=job_env.dir, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _get(f"{url}/healthcheck")[0] == 200, 60, "flower to start")
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_flower_lists_our_tasks_without_their_prompts(job_env: JobEnv, worker: StartWorker, client: Any,
                                                      flower: str) -> None:
    running = worker("openai")
    # Flower turns task events on in the workers it sees (every 5 s), and the worker says so; the
    # worker is then live in Flower's event state (/workers)
    def online() -> bool:
        assert running.alive(), running.log()[-3000:]
        return "Events of group {task} enabled by remote" in running.log() and any(
            w.get("status") for w in (_get(f"{flower}/workers?json=1", AUTH)[1] or {}).get("data", []))

    wait_for(online, 60, "Flower to switch the worker's task events on")
    job_ids = []
    for n in range(3):
        job_ids.append(client.submit({"model": "openai", "prompt": f"{PROMPT} #{n}"}))
    for job_id in job_ids:
        assert client.result(job_id, timeout=60).status.value == "succeeded"

    def seen() -> dict[str, Any]:
        status, tasks = _get(f"{flower}/api/tasks", AUTH)
        assert status == 200
        ours = {task_id: info for task_id, info in (tasks or {}).items() if task_id in job_ids}
        return ours if len(ours) == len(job_ids) and all(i.get("state") == "SUCCESS" for i in ours.values()) else {}

    try:
        tasks = wait_for(seen, 60, "Flower to show the jobs as succeeded")
    except AssertionError:
        raise AssertionError(f"Flower has: {_get(f'{flower}/api/tasks', AUTH)}") from None
    assert {info["name"] for info in tasks.values()} == {"dq.generate"}, tasks
    shown = json.dumps(tasks)
    assert "flower-secret-prompt" not in shown and KNOWN_KEY not in shown
    assert all("<generate request for openai>" in (info.get("args") or "") for info in tasks.values())

    assert _get(f"{flower}/api/tasks")[0] == 401  # no credentials
    assert _get(f"{flower}/api/workers", "ops:wrong-password")[0] == 401
    status, metrics = _get(f"{flower}/metrics")
    assert status == 200 and "flower_events_total" in metrics
