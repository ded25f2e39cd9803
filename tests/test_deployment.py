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
REQUIRED = {"DQ_REDIS_PASSWORD": "redis-pass", "DQ_POSTGRES_PASSWORD": "pg-pass", "DQ_FLOWER_AUTH": "ops:pass",
            "DQ_GRAFANA_PASSWORD": "grafana-pass"}
OPS = ROOT / "ops"


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
    for name, service in workers.items():  # each replica: its own node name, /metrics, a health check
        command = service["command"]
        assert command[command.index("--metrics-port") + 1] == "9100", name
        node = command[command.index("--hostname") + 1]
        assert node == f"{service['environment']['DQ_NODE']}@%h", name
        assert "celery -A datus_queue inspect ping" in " ".join(service["healthcheck"]["test"]), name
    assert services["beat"]["command"] == ["dq", "beat"] and services["beat"]["deploy"]["replicas"] == 2
    assert services["metrics"]["command"][:2] == ["dq", "metrics"]
    mounts = " ".join(str(v) for v in services["prometheus"]["volumes"])
    assert "ops/prometheus.yml" in mounts and (OPS / "prometheus.yml").is_file()


def test_prometheus_scrapes_every_worker_service_and_the_exporter() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    config = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    named = set(jobs["dq-workers"]["dns_sd_configs"][0]["names"])
    assert named == {name for name in compose["services"] if name.startswith("worker-")}
    assert jobs["dq-workers"]["dns_sd_configs"][0]["port"] == 9100
    assert jobs["dq-fleet"]["static_configs"][0]["targets"] == ["metrics:9110"]


def test_the_dashboard_asks_only_for_metrics_the_code_exports() -> None:
    import json
    import re

    from prometheus_client import REGISTRY

    import datus_queue.tasks.observability.metrics  # noqa: F401 - registers the worker's metrics
    from datus_queue.tasks.observability.exporter import FleetCollector

    exported = set(FleetCollector.NAMES)
    for family in REGISTRY.collect():
        exported.add(family.name)
        if family.type == "counter":  # exposed as <name>_total
            exported.add(f"{family.name}_total")
        exported.update(sample.name for sample in family.samples)
    exported.update({"dq_mcp_sessions", "dq_mcp_server_starts_total", "dq_mcp_server_losses_total"})  # at scrape
    exported.update(f"{name}_bucket" for name in list(exported))
    dashboard = json.loads((OPS / "grafana" / "dashboards" / "datus-queue.json").read_text(encoding="utf-8"))
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\bdq_[a-z_]+", target["expr"])}
    assert asked and asked <= exported, sorted(asked - exported)


def test_compose_names_the_variable_an_operator_forgot() -> None:
    missing = dict(REQUIRED)
    missing.pop("DQ_REDIS_PASSWORD")
    done = _config(missing)
    assert done.returncode != 0 and "DQ_REDIS_PASSWORD" in done.stderr
