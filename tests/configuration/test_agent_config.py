from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig, ConfigError, ModelConfig
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


def test_rate_limits_are_typed_and_a_models_own_win_field_by_field(tmp_path) -> None:
    config = AgentConfig.from_file(write(tmp_path, """
        agent:
          models:
            fast: {type: openai, model: gpt-4o-mini, api_key: x,
                   rate_limits: {requests_per_minute: 600, max_concurrency: 5}}
            plain: {type: openai, model: gpt-4o, api_key: x}
            other: {type: gemini, model: gemini-2.5-flash, api_key: x}
          rate_limits:
            openai: {requests_per_minute: 60, input_tokens_per_minute: 200000}
    """))
    fast = config.rate_limits_for(config.models["fast"])
    assert (fast.requests_per_minute, fast.input_tokens_per_minute, fast.max_concurrency) == (600, 200000, 5)
    assert config.rate_limits_for(config.models["plain"]).requests_per_minute == 60
    assert config.rate_limits_for(config.models["other"]) is None
    with pytest.raises(ConfigError, match="requests_per_minte"):
        AgentConfig.from_file(write(tmp_path, """
            agent: {models: {m: {type: openai, model: x, rate_limits: {requests_per_minte: 5}}}}"""))
    with pytest.raises(ConfigError, match="requests_per_minute"):
        AgentConfig.from_file(write(tmp_path, """
            agent: {models: {m: {type: openai, model: x, rate_limits: {requests_per_minute: -1}}}}"""))
    with pytest.raises(ConfigError, match="keyed by provider type; unknown: opnai"):
        AgentConfig.from_file(write(tmp_path, "agent: {rate_limits: {opnai: {requests_per_minute: 5}}}"))


def test_allowed_models_default_to_the_configured_names_and_patterns_are_listed(tmp_path) -> None:
    models = "models: {a: {type: openai, model: gpt-4o, api_key: x}, b: {type: claude, model: c, api_key: x}}"
    default = AgentConfig.from_file(write(tmp_path, f"agent: {{target: a, {models}}}"))
    assert default.is_model_allowed("a") and default.is_model_allowed("default")
    assert not default.is_model_allowed("openai:gpt-4o")  # provider:model only where listed
    listed = AgentConfig.from_file(write(tmp_path, f'agent: {{{models}, allowed_models: [a, "openai:gpt-4o*"]}}'))
    assert listed.is_model_allowed("openai:gpt-4o-mini") and not listed.is_model_allowed("b")
    assert not listed.is_model_allowed("openai:o3")
    with pytest.raises(ConfigError, match="'c' is neither a model"):
        AgentConfig.from_file(write(tmp_path, f"agent: {{{models}, allowed_models: [c]}}"))
    with pytest.raises(ConfigError, match="unknown provider 'acme'"):
        AgentConfig.from_file(write(tmp_path, f'agent: {{{models}, allowed_models: ["acme:large"]}}'))
