"""Stand-in for Datus-agent's ``datus.configuration.agent_config_loader`` (standalone mode of
ops/datus_compat): ``load_agent_config(config=..., namespace=..., home=..., reload=...)``
reads the models with the model layer's own reader (`datus.models.config.AgentConfig`, what
``datus.configuration.agent_config`` is without Datus-agent) and remembers the namespace, which
the stand-in ``db_function_tools`` reads. Datus's path priority, storage and node sections are
not reproduced: the model tests only use ``models``, ``namespace`` and ``home``.

Harness files are copied into a temporary tree (no ``__init__.py`` here: ``datus.configuration``
stays a namespace shared with the installed ``agent_config`` module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datus.models.config import AgentConfig

__all__ = ["StandInAgentConfig", "load_agent_config"]


class StandInAgentConfig(AgentConfig):
    """The model layer's AgentConfig plus what Datus's tests read beside the models."""

    current_namespace: str = ""
    home: str = ""

    def namespace_config(self, name: str | None = None) -> dict[str, Any]:
        namespaces = self.sections.get("namespace") or {}
        wanted = name or self.current_namespace
        if wanted not in namespaces:
            raise KeyError(f"namespace {wanted!r} is not in agent.namespace ({', '.join(namespaces) or 'none'})")
        return dict(namespaces[wanted])


def load_agent_config(reload: bool = False, **kwargs: Any) -> StandInAgentConfig:
    path = Path(kwargs.get("config") or "conf/agent.yml")
    config = StandInAgentConfig.from_file(path)
    config.current_namespace = str(kwargs.get("namespace") or "")
    config.home = str(kwargs.get("home") or config.sections.get("home") or "")
    return config
