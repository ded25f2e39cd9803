"""`agent.yml`, in the format Datus users already have::

    agent:
      target: deepseek                # the model used when none is named
      models:
        deepseek:
          type: deepseek              # a provider (datus.utils.constants.LLMProvider)
          model: deepseek-chat
          api_key: ${DEEPSEEK_API_KEY}

``${VAR}`` is replaced from the environment. A variable that is not set is remembered, not
turned into a placeholder: creating that model raises an error naming the variable, while
models that do not need it load and run. Unknown keys are rejected with their names.

Two sections govern what the job system may spend (the model layer only carries them):
``rate_limits`` (per model, and per provider type under ``agent.rate_limits``; the model's
own values win field by field) and ``agent.allowed_models`` (the model names and
``provider:model`` patterns clients may submit jobs for; default: the names under
``agent.models``).

Datus-agent's own config objects work too: wherever the model layer takes a model config it
accepts Datus's ``ModelConfig`` dataclass (``ModelConfig.coerce``: fields Datus's lacks take
their defaults, and Datus's ``<MISSING:VAR>`` placeholder counts as an unset variable), and
``create_model`` takes Datus's ``AgentConfig`` (its ``models`` and ``target``). Keys Datus users
have in their files (``vendor``) are known, not typos.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datus.models.errors import ModelConfigError
from datus.models.pricing import Pricing

__all__ = ["AgentConfig", "ConfigError", "ModelConfig", "RateLimits", "substitute_env"]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# what Datus-agent's loader leaves where ${VAR} was not set
_DATUS_MISSING = re.compile(r"<MISSING:([^>]+)>")
_MISSING_FIELDS = ("missing_env", "missing_env_keys")  # what a config records about itself, not agent.yml keys


class ConfigError(ModelConfigError):
    """An agent.yml that cannot be used: not found, not YAML, a section of the wrong shape."""


def substitute_env(value: str, missing: list[str]) -> str | None:
    """Replace ``${VAR}`` / ``${VAR:-default}``; unset names are appended to ``missing``.
    A value that is only an unset variable becomes None (so the field's default applies)."""

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    whole = _ENV.fullmatch(value)
    result = _ENV.sub(repl, value)
    if whole and whole.group(1) in missing:
        return None
    return result


class RateLimits(BaseModel):
    """A provider's budget for one API key and model, shared by every worker using that key
    (the job system enforces it in Redis). A field left out is not limited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: float | None = Field(default=None, gt=0)
    input_tokens_per_minute: float | None = Field(default=None, gt=0)
    output_tokens_per_minute: float | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0, description="requests in flight at once")

    def over(self, defaults: RateLimits | None) -> RateLimits:
        """These limits, with ``defaults`` filling the fields left out."""
        if defaults is None:
            return self
        return RateLimits(**{name: getattr(self, name) if getattr(self, name) is not None else getattr(defaults, name)
                             for name in RateLimits.model_fields})

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in RateLimits.model_fields)


#: OpenAI's hosted tools a model config may name (Responses API)
_HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                 "file_search", "code_interpreter")


class ModelConfig(BaseModel):
    """One model: provider, model name, credentials and generation settings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    type: str = Field(description="provider: openai, claude, deepseek, qwen, gemini or fake")
    model: str = Field(description="the provider's model name, e.g. gpt-4o")
    vendor: str | None = Field(default=None, description="who serves it (Datus's informational key), e.g. ark")
    api_key: str | None = Field(default=None, repr=False, description="default: the provider's env var")
    base_url: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    enable_thinking: bool = False
    thinking_budget: int | None = Field(default=None, gt=0, description="reasoning token budget")
    timeout_s: float = Field(default=120.0, gt=0, description="per request")
    max_retries: int = Field(default=6, ge=0, description="retries of one request after the first try")
    retry_base_delay_s: float = Field(default=0.5, ge=0)
    retry_max_delay_s: float = Field(default=30.0, ge=0)
    retry_max_wait_s: float = Field(default=120.0, ge=0, description="total backoff of one request")
    json_repair_attempts: int = Field(default=2, ge=0, description="re-asks when JSON output is broken")
    save_llm_trace: bool = False
    trace_dir: str | None = Field(default=None, description="default ~/.datus/traces")
    context_length: int | None = Field(default=None, gt=0, description="override the known window")
    max_tool_result_chars: int = Field(
        default=65_536, gt=0, description="a tool's answer longer than this (characters) reaches the model cut "
                                          "to this length, marked '[truncated: N of M characters; narrow the "
                                          "query]'; its step says output['truncated']")
    prompt_cache: Literal["auto", "off"] = "auto"
    http_client: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp", description="the async SDK client's HTTP stack (OpenAI-compatible and Claude)")
    api: Literal["chat_completions", "responses"] | None = Field(
        default=None, description="type: openai only: the API spoken; unset: responses for the models that "
                                  "answer only there (o1-pro, o3-pro, gpt-5-pro, codex), else chat_completions")
    store: bool = Field(
        default=False, description="type: openai, api: responses only: OpenAI keeps the responses (30 days; not "
                                   "for zero-data-retention projects) and later turns send previous_response_id "
                                   "and only their new items instead of the whole conversation")
    hosted_tools: list[dict[str, Any]] | None = Field(
        default=None, description="type: openai, api: responses only: OpenAI's own tools, run by OpenAI inside "
                                  "the response and sent as written beside the function tools, e.g. "
                                  "[{type: web_search}, {type: file_search, vector_store_ids: [vs_1]}, "
                                  "{type: code_interpreter, container: {type: auto}}]")
    pricing: Pricing | None = None
    rate_limits: RateLimits | None = Field(default=None, description="this model's budget on its API key")
    missing_env: tuple[str, ...] = Field(default=(), exclude=True, repr=False)
    # the keys whose values named them (a queue model needs no api_key or base_url of its own)
    missing_env_keys: tuple[str, ...] = Field(default=(), exclude=True, repr=False)

    @classmethod
    def coerce(cls, config: Any) -> "ModelConfig":
        """This model layer's `ModelConfig` for ``config``: one already, a mapping of agent.yml
        keys, or any object with a model config's attributes (Datus-agent's ``ModelConfig``
        dataclass). Attributes this class does not know are ignored; the ones it knows and the
        object lacks take their defaults."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.model_validate(config)
        values = {name: getattr(config, name) for name in cls.model_fields
                  if name not in _MISSING_FIELDS and getattr(config, name, None) is not None}
        missing = [match.group(1) for value in values.values() if isinstance(value, str)
                   for match in _DATUS_MISSING.finditer(value)]
        keys = [name for name, value in values.items() if isinstance(value, str) and _DATUS_MISSING.search(value)]
        values = {name: value for name, value in values.items()
                  if not (isinstance(value, str) and _DATUS_MISSING.fullmatch(value))}
        if "type" in values:
            values["type"] = getattr(values["type"], "value", values["type"])  # Datus's LLMProvider enum
        return cls.model_validate({**values, "missing_env": tuple(missing), "missing_env_keys": tuple(keys)})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(_MISSING_FIELDS))

    @field_validator("hosted_tools")
    @classmethod
    def _known_hosted_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for tool in tools or ():
            if tool.get("type") not in _HOSTED_TOOLS:
                raise ValueError(f"hosted_tools: unknown type {tool.get('type')!r}; known: {', '.join(_HOSTED_TOOLS)}")
        return tools

    @model_validator(mode="before")
    @classmethod
    def _substitute(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, cls.model_fields, 1))
                else repr(key)
                for key in unknown
            ]
            raise ValueError(f"unknown model config key(s): {', '.join(hints)}; known keys: "
                             f"{', '.join(sorted(k for k in cls.model_fields if k not in _MISSING_FIELDS))}")
        missing: list[str] = list(data.get("missing_env", ()))
        keys: list[str] = list(data.get("missing_env_keys", ()))
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, str):
                before = len(missing)
                value = substitute_env(value, missing)
                if len(missing) > before:
                    keys.append(key)
                if value is None:
                    continue
            out[key] = value
        out["missing_env"] = tuple(dict.fromkeys(missing))
        out["missing_env_keys"] = tuple(dict.fromkeys(keys))
        return out

    def require_env(self, where: str = "") -> None:
        """Raise the error that names every unset variable this model needs."""
        if self.missing_env:
            from datus.models.errors import ModelConfigError

            names = ", ".join(self.missing_env)
            raise ModelConfigError(
                f"model {where or self.model!r} needs environment variable(s) {names}: "
                f"set them, or change the model's entry in agent.yml",
                provider=self.type, model=self.model,
            )


class _AgentSection(BaseModel):
    """How the ``agent:`` section is validated; `AgentConfig` is what callers hold."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    target: str | None = None
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    mcp_servers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rate_limits: dict[str, RateLimits] = Field(
        default_factory=dict, description="per provider type: defaults for every model of that provider")
    allowed_models: list[str] | None = Field(
        default=None, description="model names and provider:model patterns (fnmatch) clients may submit jobs "
                                  "for; default: the names under agent.models")


class AgentConfig:
    """The ``agent:`` section: the target model, the models, the MCP servers, the job system's
    limits, and every other section as read (``sections``: Datus's ``nodes``, ``namespace``,
    this project's ``schedules``...). Datus-agent's ``AgentConfig`` methods for models are
    here with their meaning: ``active_model()``, ``model_config(name)``, ``config[name]``."""

    def __init__(self, section: _AgentSection | None = None) -> None:
        """An empty config without ``section``; `from_file`/`from_dict` read one."""
        section = section if section is not None else _AgentSection()
        self.target: str | None = section.target
        self.models: dict[str, ModelConfig] = dict(section.models)
        self.mcp_servers: dict[str, dict[str, Any]] = dict(section.mcp_servers)
        self.rate_limits: dict[str, RateLimits] = dict(section.rate_limits)
        self.allowed_models: list[str] | None = section.allowed_models
        self.sections: dict[str, Any] = dict(section.model_extra or {})

    def __repr__(self) -> str:
        return f"AgentConfig(target={self.target!r}, models={sorted(self.models)})"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AgentConfig:
        file = Path(path).expanduser()
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(file)!r} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML: {exc}") from None
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> AgentConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with an 'agent:' section")
        section = raw.get("agent", raw)
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: 'agent:' must be a mapping")
        try:
            config = cls(_AgentSection.model_validate(section))
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_describe(exc)}") from None
        if config.target is not None and config.target not in config.models:
            raise ConfigError(
                f"{source}: agent.target {config.target!r} is not one of agent.models: "
                f"{', '.join(config.models) or '(none)'}"
            )
        config._check_limits_sections(source)
        return config

    def _check_limits_sections(self, source: str) -> None:
        from datus.models.base import PROVIDERS as providers

        unknown = sorted(set(self.rate_limits) - set(providers))
        if unknown:
            raise ConfigError(f"{source}: agent.rate_limits is keyed by provider type; unknown: "
                              f"{', '.join(unknown)} (known: {', '.join(providers)})")
        for entry in self.allowed_models or []:
            provider, sep, _ = entry.partition(":")
            if entry in self.models or _is_pattern(entry):
                continue
            if not sep:
                raise ConfigError(
                    f"{source}: agent.allowed_models entry {entry!r} is neither a model under agent.models "
                    f"({', '.join(sorted(self.models)) or 'none'}) nor a provider:model pattern")
            if provider not in providers:
                raise ConfigError(f"{source}: agent.allowed_models entry {entry!r} names an unknown provider "
                                  f"{provider!r} (known: {', '.join(providers)})")

    def rate_limits_for(self, model: ModelConfig) -> RateLimits | None:
        """The model's limits, field by field over its provider's defaults; None if neither
        sets any."""
        defaults = self.rate_limits.get(str(model.type))
        merged = model.rate_limits.over(defaults) if model.rate_limits is not None else defaults
        return None if merged is None or merged.empty else merged

    def allowed_model_patterns(self) -> list[str]:
        """What ``allowed_models`` allows (default: the configured names)."""
        return list(self.allowed_models) if self.allowed_models is not None else sorted(self.models)

    def is_model_allowed(self, name: str) -> bool:
        """Whether jobs may name ``name`` (``default`` stands for ``agent.target``)."""
        if name == "default" and self.target is not None:
            name = self.target
        return any(name == entry or (_is_pattern(entry) and fnmatch.fnmatchcase(name, entry))
                   for entry in self.allowed_model_patterns())

    def active_model(self) -> ModelConfig:
        """The target model (the only one, when there is one and no target)."""
        return self.model_config()

    def model_config(self, name: str | None = "") -> ModelConfig:
        """A model by its name under ``agent.models``; ``""``, ``None`` or ``"default"`` is the
        target. An unknown name is a `ModelConfigError` naming the configured ones."""
        from datus.models.errors import ModelConfigError

        if name in (None, "", "default"):
            if self.target is None:
                if len(self.models) == 1:
                    return next(iter(self.models.values()))
                raise ModelConfigError("no model named and agent.target is not set in the config")
            name = self.target
        assert name is not None
        if name not in self.models:
            raise ModelConfigError(
                f"unknown model {name!r}; configured models: {', '.join(sorted(self.models)) or '(none)'}"
                " (or pass 'provider:model', e.g. 'openai:gpt-4o-mini')"
            )
        return self.models[name]

    def __getitem__(self, name: str) -> ModelConfig:
        if name not in self.models:
            raise KeyError(f"Model '{name}' not found.")
        return self.models[name]


def _is_pattern(entry: str) -> bool:
    return any(char in entry for char in "*?[")


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
