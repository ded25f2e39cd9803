"""The harness's conftest for Datus-agent's model tests, used when the Datus source has none
(the PyPI sdist ships without tests/conftest.py): the one helper the model tests import."""

from __future__ import annotations

from typing import Any

from datus.configuration.agent_config_loader import load_agent_config


def load_acceptance_config(namespace: str = "snowflake", home: str = "") -> Any:
    return load_agent_config(config="tests/conf/agent.yml", namespace=namespace, home=home, reload=True)
