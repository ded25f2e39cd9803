"""Datus-agent as the judge: each test here mirrors one way Datus-agent 0.2.2 (commit 2c20d99)
calls the model layer, and names the Datus file:line it mirrors. Nothing of Datus's code is
here: the tests hold what Datus passes and what it reads.

The config objects Datus passes are built two ways: `DatusModelConfig`/`DatusAgentConfig` below
have the shape of Datus-agent's own (``datus/configuration/agent_config.py:81-91``: a dataclass
of six fields; ``:177-569``: ``models``, ``target``, ``active_model()``, ``model_config(name)``,
``__getitem__``) and run everywhere; where Datus-agent itself is installed (CI's Python 3.12
leg), `datus_agent_config` builds Datus's real objects from the same YAML.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datus.testing.fake_server import FakeProviderServer

KEY = "sk-datus-compat-test"


def datus_installed() -> bool:
    """Datus-agent itself (not only this project's stand-ins of its shared modules)."""
    return importlib.util.find_spec("datus.agent") is not None


@dataclasses.dataclass
class DatusModelConfig:
    """Datus-agent's ``ModelConfig`` (agent_config.py:81-91), field for field."""

    type: str
    base_url: str
    api_key: str
    model: str
    save_llm_trace: bool = False
    enable_thinking: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DatusAgentConfig:
    """What Datus-agent's ``AgentConfig`` offers for models (agent_config.py:196-198, 386-389,
    561-569)."""

    def __init__(self, models: dict[str, DatusModelConfig], target: str) -> None:
        self.models = models
        self.target = target

    def active_model(self) -> DatusModelConfig:
        return self.models[self.target]

    def model_config(self, name: str = "") -> DatusModelConfig:
        name = name or self.target
        if name not in self.models:
            raise ValueError(f"Model {name} not found")
        return self.models[name]

    def __getitem__(self, key: str) -> DatusModelConfig:
        if key not in self.models:
            raise KeyError(f"Model '{key}' not found.")
        return self.models[key]


def agent_yml(server: FakeProviderServer) -> str:
    """A model section as Datus users write it (tests/conf/agent.yml, conf/agent.yml.example):
    ``vendor`` on every entry, ``${VAR}`` keys, Gemini's base URL with its ``/v1beta``."""
    return f"""\
agent:
  target: deepseek
  models:
    deepseek:
      type: deepseek
      vendor: deepseek
      base_url: {server.openai_base_url}
      api_key: ${{DATUS_COMPAT_KEY}}
      model: deepseek-chat
    deepseek-r1:
      type: deepseek
      vendor: deepseek
      base_url: {server.openai_base_url}
      api_key: ${{DATUS_COMPAT_KEY}}
      model: deepseek-reasoner
      enable_thinking: true
    qwen:
      type: qwen
      base_url: {server.openai_base_url}
      api_key: ${{DATUS_COMPAT_KEY}}
      model: qwen3-coder-plus
    anthropic:
      type: claude
      vendor: anthropic
      base_url: {server.url}
      api_key: ${{DATUS_COMPAT_KEY}}
      model: claude-haiku-4-5
    kimi-k2:
      type: openai
      vendor: openai
      base_url: {server.openai_base_url}
      api_key: ${{DATUS_COMPAT_KIMI_KEY}}
      model: kimi-k2-0711-preview
    openai-4o-mini:
      type: openai
      vendor: openai
      base_url: {server.openai_base_url}
      api_key: ${{DATUS_COMPAT_KEY}}
      model: gpt-4o-mini
    gemini-2.5:
      type: gemini
      vendor: google
      base_url: {server.url}/v1beta
      api_key: ${{DATUS_COMPAT_KEY}}
      model: gemini-2.5-flash-lite
      enable_thinking: true
  nodes:
    generate_sql:
      model: deepseek
      prompt_version: "1.0"
  agentic_nodes:
    chatbot:
      model: deepseek
      system_prompt: gen_sql
  namespace:
    ssb_sqlite:
      type: sqlite
      name: SSB
      uri: tests/data/SSB.db
"""


@pytest.fixture(autouse=True)
def sessions_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Sessions in this test's own ~/.datus/sessions, not in a shared store. Where Datus-agent
    is installed its path manager (a process-wide singleton) says where sessions live: it is
    pointed at this test's home for the test, and back after."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DQ_SESSION_URL", raising=False)
    if not datus_installed():
        yield tmp_path
        return
    from datus.utils.path_manager import get_path_manager

    manager = get_path_manager()
    before = manager.datus_home
    manager.update_home(str(tmp_path / ".datus"))
    try:
        yield tmp_path
    finally:
        manager.update_home(str(before))


@pytest.fixture
def db_tools(tmp_path: Path) -> Any:
    """Datus's database function tools over a small sales database (`datus_tools`)."""
    from tests.datus_compat.datus_tools import DatusDBTools, make_sales_db

    return DatusDBTools(make_sales_db(tmp_path / "sales.db"))


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        fake.reset()
        yield fake


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATUS_COMPAT_KEY", KEY)
    monkeypatch.delenv("DATUS_COMPAT_KIMI_KEY", raising=False)


def datus_shaped(server: FakeProviderServer) -> DatusAgentConfig:
    """The Datus-shaped config of `agent_yml`, as Datus's loader leaves it: unset variables
    become ``<MISSING:VAR>`` (agent_config.py:616-628), unknown keys are dropped."""
    models = {
        "deepseek": DatusModelConfig("deepseek", server.openai_base_url, KEY, "deepseek-chat"),
        "deepseek-r1": DatusModelConfig("deepseek", server.openai_base_url, KEY, "deepseek-reasoner",
                                        enable_thinking=True),
        "qwen": DatusModelConfig("qwen", server.openai_base_url, KEY, "qwen3-coder-plus"),
        "anthropic": DatusModelConfig("claude", server.url, KEY, "claude-haiku-4-5"),
        "kimi-k2": DatusModelConfig("openai", server.openai_base_url, "<MISSING:DATUS_COMPAT_KIMI_KEY>",
                                    "kimi-k2-0711-preview"),
        "openai-4o-mini": DatusModelConfig("openai", server.openai_base_url, KEY, "gpt-4o-mini"),
        "gemini-2.5": DatusModelConfig("gemini", server.url + "/v1beta", KEY, "gemini-2.5-flash-lite",
                                       enable_thinking=True),
    }
    return DatusAgentConfig(models, "deepseek")


def real_datus_config(server: FakeProviderServer, tmp_path: Path) -> Any:
    """Datus-agent's own AgentConfig from `agent_yml`, through its own loader (only where
    Datus-agent is installed)."""
    from datus.configuration.agent_config_loader import load_agent_config

    path = tmp_path / "agent.yml"
    path.write_text(agent_yml(server).replace("agent:\n", f"agent:\n  home: {tmp_path}\n", 1))
    return load_agent_config(config=str(path), reload=True)


@pytest.fixture(params=["datus-shaped", "datus-agent"])
def datus_config(request: pytest.FixtureRequest, server: FakeProviderServer, env: None, tmp_path: Path) -> Any:
    """The config object Datus hands the model layer: Datus-shaped everywhere, Datus-agent's own
    where it is installed."""
    if request.param == "datus-agent":
        if not datus_installed():
            pytest.skip("Datus-agent is not installed here (CI's Python 3.12 leg installs it)")
        return real_datus_config(server, tmp_path)
    return datus_shaped(server)
