from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from datus.configuration.agent_config import AgentConfig, ConfigError, ModelConfig
from datus.models.base import LLMBaseModel
from datus.models.errors import ModelConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_example_loads_all_five_providers() -> None:
    config = AgentConfig.from_file(Path(__file__).parents[2] / "conf" / "agent.yml")
    types = {model.type for model in config.models.values()}
    assert {"openai", "claude", "deepseek", "qwen", "gemini"} <= types
    assert config.target in config.models


def test_env_substitution_and_missing_variable_named_at_creation(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DQ_TEST_KEY", "sk-test")
    monkeypatch.delenv("DQ_UNSET_KEY", raising=False)
    path = write(tmp_path, """
        agent:
          target: good
          models:
            good: {type: openai, model: gpt-4o-mini, api_key: "${DQ_TEST_KEY}"}
            bad: {type: deepseek, model: deepseek-chat, api_key: "${DQ_UNSET_KEY}"}
            defaulted: {type: openai, model: "${DQ_UNSET_MODEL:-gpt-4.1}", api_key: x}
    """)
    config = AgentConfig.from_file(path)
    assert config.models["good"].api_key == "sk-test"
    assert config.models["defaulted"].model == "gpt-4.1"
    assert config.models["bad"].api_key is None  # never a placeholder string
    assert LLMBaseModel.create_model(config).model_name == "gpt-4o-mini"
    with pytest.raises(ModelConfigError, match="DQ_UNSET_KEY"):
        LLMBaseModel.create_model(config, "bad")


def test_unknown_model_keys_are_named_with_a_suggestion(tmp_path) -> None:
    path = write(tmp_path, """
        agent:
          models:
            m: {type: openai, model: gpt-4o, temprature: 0.2}
    """)
    with pytest.raises(ConfigError, match="temprature.*did you mean 'temperature'"):
        AgentConfig.from_file(path)


def test_bad_values_and_files_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        AgentConfig.from_file(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="temperature"):
        AgentConfig.from_file(write(tmp_path, "agent: {models: {m: {type: openai, model: x, temperature: 9}}}"))
    with pytest.raises(ConfigError, match="agent.target 'nope'"):
        AgentConfig.from_file(write(tmp_path, "agent: {target: nope, models: {m: {type: openai, model: x}}}"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        AgentConfig.from_file(write(tmp_path, "agent: [unclosed"))


def test_model_config_by_keywords_hides_the_key() -> None:
    config = ModelConfig(type="openai", model="gpt-4o", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(config)
    assert config.api_key == "sk-secret-123"


def test_factory_errors_list_what_is_known(tmp_path) -> None:
    config = AgentConfig.from_dict({"agent": {"target": "a", "models": {"a": {"type": "fake", "model": "s"}}}})
    with pytest.raises(ModelConfigError, match="unknown model 'zzz'.*configured models: a"):
        LLMBaseModel.create_model(config, "zzz")
    with pytest.raises(ModelConfigError, match="unknown model type 'nosuch'.*openai"):
        LLMBaseModel.create_model(config, "nosuch:model")
    assert LLMBaseModel.create_model(config, "default").provider == "fake"
    assert LLMBaseModel.create_model(config, None).model_name == "s"


def test_provider_model_string_takes_key_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    model = LLMBaseModel.create_model(None, "openai:gpt-4o-mini")
    assert (model.provider, model.model_name) == ("openai", "gpt-4o-mini")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ModelConfigError, match="OPENAI_API_KEY"):
        LLMBaseModel.create_model(None, "openai:gpt-4o-mini")
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-dash")
    assert LLMBaseModel.create_model(None, "qwen:qwen-plus")._get_api_key() == "sk-dash"
