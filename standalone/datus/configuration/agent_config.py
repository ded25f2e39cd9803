"""``datus.configuration.agent_config`` for installations without Datus-agent
(``datus-queue-standalone``): the model layer's reading of agent.yml
(`datus.models.config`). Where Datus-agent is installed, this path is Datus's own
``AgentConfig``/``ModelConfig``, which the model layer accepts as well."""

from __future__ import annotations

from datus.models.config import AgentConfig, ModelConfig

__all__ = ["AgentConfig", "ModelConfig"]
