"""How Datus builds models: its factory, its direct constructors, its config objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from datus.models.base import LLMBaseModel
from datus.models.claude_model import ClaudeModel
from datus.models.config import AgentConfig
from datus.models.deepseek_model import DeepSeekModel
from datus.models.errors import ModelConfigError
from datus.models.gemini_model import GeminiModel
from datus.models.openai_model import OpenAIModel
from datus.models.qwen_model import QwenModel
from datus.testing.fake_server import FakeProviderServer
from tests.datus_compat.conftest import KEY, DatusAgentConfig, DatusModelConfig, Fleet, agent_yml, datus_installed


@pytest.mark.in_process_only("the model's class is the provider's")
def test_agentic_node_factory_with_a_node_model_or_none(datus_config: Any) -> None:
    """datus/agent/node/agentic_node.py:81-84: create_model(model_name=<node's model or None>,
    agent_config=...), then context_length()."""
    default = LLMBaseModel.create_model(model_name=None, agent_config=datus_config)
    assert isinstance(default, DeepSeekModel) and default.model_config.model == "deepseek-chat"
    named = LLMBaseModel.create_model(model_name="anthropic", agent_config=datus_config)
    assert isinstance(named, ClaudeModel) and named.model_config.type == "claude"
    assert isinstance(default.context_length(), int) and default.context_length() > 0


@pytest.mark.in_process_only("model_config is the provider's entry")
def test_workflow_node_factory_default_and_empty_name(datus_config: Any) -> None:
    """datus/agent/node/node.py:184-187 (model_name "" from a NodeConfig without a model),
    agent.py:167 (model_name="default"); node.py:161 checks isinstance(model, LLMBaseModel);
    node.py:186-187 and :194 read model_config.type/.model/.save_llm_trace."""
    for name in ("", "default"):
        model = LLMBaseModel.create_model(model_name=name, agent_config=datus_config)
        assert isinstance(model, LLMBaseModel)
        assert (model.model_config.type, model.model_config.model) == ("deepseek", "deepseek-chat")
        assert model.model_config.save_llm_trace is False


def test_positional_factory_call(datus_config: Any) -> None:
    """tests/test_tools.py:33 and others: LLMBaseModel.create_model(agent_config)."""
    assert LLMBaseModel.create_model(datus_config).model_name == "deepseek-chat"


def test_unknown_model_name_is_an_error_naming_the_configured_ones(datus_config: Any) -> None:
    with pytest.raises(ModelConfigError, match="unknown model 'nope'.*anthropic"):
        LLMBaseModel.create_model(datus_config, "nope")


@pytest.mark.in_process_only("model classes built directly")
@pytest.mark.parametrize(("name", "cls"), [
    ("deepseek", DeepSeekModel), ("deepseek-r1", DeepSeekModel), ("qwen", QwenModel), ("anthropic", ClaudeModel),
    ("openai-4o-mini", OpenAIModel), ("gemini-2.5", GeminiModel),
])
def test_model_classes_built_directly_from_datus_model_configs(datus_config: Any, name: str, cls: type) -> None:
    """tests/test_deepseek_model.py:30,34 (DeepSeekModel(model_config=...), DeepSeekModel(cfg)),
    test_claude_model.py:26 (ClaudeModel(model_config=config["anthropic"])),
    test_qwen_model.py:27, test_other_models.py:40,207,247; cli/interactive_init.py:413-431
    (__import__(f"datus.models.{type}_model") and Cls(model_config=...))."""
    config = datus_config.models[name]
    model = cls(model_config=config)
    assert model.model_config.model == config.model and model.model_config.type == config.type
    assert cls(config).model_name == config.model  # positional, as test_deepseek_model.py:34
    module = __import__(f"datus.models.{config.type}_model", fromlist=[cls.__name__])
    assert getattr(module, cls.__name__) is cls


@pytest.mark.in_process_only("a model class built directly")
def test_datus_config_subscript_and_base_url(datus_config: Any, server: FakeProviderServer) -> None:
    """tests/test_claude_model.py:25-26 config["anthropic"]; test_other_models.py:41-44,
    :213-216 assert model_config.model/.type/.base_url as configured."""
    model = OpenAIModel(model_config=datus_config["openai-4o-mini"])
    assert model.model_config.model == "gpt-4o-mini" and model.model_config.type == "openai"
    assert model.model_config.base_url == server.openai_base_url


@pytest.mark.in_process_only("a model class built directly")
def test_an_unset_variable_is_an_error_naming_it_when_that_model_is_built(datus_config: Any) -> None:
    """Datus's loader turns an unset ${VAR} into "<MISSING:VAR>" (agent_config.py:616-628);
    the other models still load (test_other_models.py:201-208 skips Kimi when its key is unset)."""
    with pytest.raises(ModelConfigError, match="DATUS_COMPAT_KIMI_KEY"):
        OpenAIModel(model_config=datus_config["kimi-k2"])
    assert LLMBaseModel.create_model(datus_config, "qwen").model_name == "qwen3-coder-plus"


def test_the_init_wizards_four_field_model_config(server: FakeProviderServer) -> None:
    """cli/interactive_init.py:402-407 builds ModelConfig(type, base_url, api_key, model) and
    :434 checks generate("Hi") is a non-empty str."""
    config = DatusModelConfig(type="deepseek", base_url=server.openai_base_url, api_key=KEY, model="deepseek-chat")
    reply = DeepSeekModel(model_config=config).generate("Hi")
    assert isinstance(reply, str) and reply.strip()


def test_datus_agent_yml_loads_as_written(server: FakeProviderServer, env: None, tmp_path: Path) -> None:
    """Datus's agent.yml, as this layer reads it: ``vendor`` is a known key (conf/agent.yml.example
    has it on every model), the sections Datus reads itself (nodes, agentic_nodes, namespace)
    are kept, Datus's AgentConfig methods answer (active_model, model_config, [])."""
    path = tmp_path / "agent.yml"
    path.write_text(agent_yml(server))
    config = AgentConfig.from_file(path)
    assert config["anthropic"].vendor == "anthropic" and config.active_model().model == "deepseek-chat"
    assert config.model_config("qwen").model == "qwen3-coder-plus" and config.model_config().model == "deepseek-chat"
    assert set(config.sections) >= {"nodes", "agentic_nodes", "namespace"}
    with pytest.raises(KeyError):
        config["nope"]
    assert LLMBaseModel.create_model(config, "gemini-2.5").model_name == "gemini-2.5-flash-lite"


def test_model_to_dict(datus_config: Any) -> None:
    """base.py:188 of Datus's layer: to_dict() gives the model name."""
    assert LLMBaseModel.create_model(datus_config).to_dict() == {"model_name": "deepseek-chat"}


@pytest.mark.parametrize("form", ["datus-shaped", "datus-agent", "agent.yml"])
def test_a_queue_entry_keeping_its_key_variable_needs_no_key_on_the_caller(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, form: str) -> None:
    """The one config change as a Datus user makes it: ``type: openai`` becomes ``type: queue``,
    ``model:`` names the fleet's model, the ``base_url`` and ``api_key`` lines stay (Datus-agent's
    loader needs both keys, agent_config.py:631-639) — and the caller has no provider key, so
    Datus's loader leaves ``<MISSING:VAR>`` (agent_config.py:616-628). The queue model needs no key."""
    fleet.caller(monkeypatch)
    fleet.server.reset()
    monkeypatch.delenv("DATUS_COMPAT_UNSET_KEY", raising=False)
    entry = {"type": "queue", "model": "openai-4o-mini", "base_url": "https://api.openai.com/v1",
             "api_key": "${DATUS_COMPAT_UNSET_KEY}"}
    if form == "datus-shaped":
        config: Any = DatusAgentConfig({"sql-writer": DatusModelConfig(
            "queue", entry["base_url"], "<MISSING:DATUS_COMPAT_UNSET_KEY>", entry["model"])}, "sql-writer")
    elif form == "datus-agent":
        if not datus_installed():
            pytest.skip("Datus-agent is not installed here (CI's Python 3.12 leg installs it)")
        from datus.configuration.agent_config_loader import load_agent_config

        path = tmp_path / "agent.yml"
        path.write_text(yaml.safe_dump({"agent": {"home": str(tmp_path), "target": "sql-writer",
                                                  "models": {"sql-writer": entry}}}))
        config = load_agent_config(config=str(path), reload=True)
    else:
        config = AgentConfig.from_dict({"agent": {"models": {"sql-writer": entry}}})
    model = LLMBaseModel.create_model(config, "sql-writer")
    assert "Hello from the caller" in model.generate("Hello from the caller")


def test_a_queue_entry_still_needs_the_variables_of_the_keys_it_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a queue entry's ``api_key`` and ``base_url`` may name an unset variable (the queue
    model uses neither); one in a key it sends with each job (``temperature``) is refused as
    in any entry, the error naming it — readable, not masked."""
    monkeypatch.delenv("DATUS_COMPAT_UNSET_KEY", raising=False)
    monkeypatch.delenv("DATUS_COMPAT_UNSET_TEMPERATURE", raising=False)
    config = AgentConfig.from_dict({"agent": {"models": {"sql-writer": {
        "type": "queue", "model": "openai-4o-mini", "api_key": "${DATUS_COMPAT_UNSET_KEY}",
        "temperature": "${DATUS_COMPAT_UNSET_TEMPERATURE}"}}}})
    with pytest.raises(ModelConfigError) as caught:
        LLMBaseModel.create_model(config, "sql-writer")
    assert "DATUS_COMPAT_UNSET_KEY, DATUS_COMPAT_UNSET_TEMPERATURE: set them" in str(caught.value)
