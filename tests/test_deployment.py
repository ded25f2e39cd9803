"""The deployment files, checked by the tools that read them: docker-compose.yml by a real
compose implementation (Debian's ``docker-compose``, which parses and validates a file without
a Docker engine; CI installs it), with the variables an operator must set."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REQUIRED = {"DQ_REDIS_PASSWORD": "redis-pass", "DQ_POSTGRES_PASSWORD": "pg-pass", "DQ_FLOWER_AUTH": "ops:pass"}


def _compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed: .ci/run installs Debian's docker-compose package")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return found


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    return subprocess.run([_compose(), "-f", str(COMPOSE), "config"], cwd=ROOT, env=clean | env,
                          capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid_and_resolves() -> None:
    done = _config(REQUIRED)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    services = resolved["services"]
    assert {"redis", "postgres", "flower"} <= set(services)
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert workers, "workers per provider"
    for name, service in workers.items():
        command = service["command"]
        assert command[:2] == ["dq", "worker"] and "--provider" in command, (name, command)
        env = service["environment"]
        assert env["DQ_REDIS_URL"].startswith("redis://:redis-pass@redis:6379/")
        assert "pg-pass" in env["DQ_DATABASE_URL"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--requirepass redis-pass" in redis_command


def test_compose_names_the_variable_an_operator_forgot() -> None:
    missing = dict(REQUIRED)
    missing.pop("DQ_REDIS_PASSWORD")
    done = _config(missing)
    assert done.returncode != 0 and "DQ_REDIS_PASSWORD" in done.stderr
