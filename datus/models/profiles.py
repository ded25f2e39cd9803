"""What a model family can do, as data: adapters read a profile instead of branching on
provider or model names."""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["PROFILES", "ModelProfile", "find_profile"]


@dataclass(frozen=True)
class ModelProfile:
    context_length: int | None = None
    json_schema: bool = True  # native JSON-schema output; else JSON mode plus the schema in the prompt
    temperature: bool = True  # reasoning models reject temperature/top_p
    max_tokens_param: str = "max_tokens"  # OpenAI reasoning models: max_completion_tokens
    reasoning_field: str | None = None  # where streamed/returned reasoning text arrives
    replay_reasoning: bool = False  # send reasoning back on assistant messages
    thinking_param: str | None = None  # body field that switches thinking on (Qwen: enable_thinking)
    always_reasons: bool = False  # reasoning models think whatever enable_thinking says


_OPENAI_REASONING = ModelProfile(
    context_length=200_000, temperature=False, max_tokens_param="max_completion_tokens", always_reasons=True
)

# provider -> model-name prefix -> profile; the longest matching prefix wins, "" is the default.
PROFILES: dict[str, dict[str, ModelProfile]] = {
    "openai": {
        "": ModelProfile(context_length=128_000),
        "gpt-4o": ModelProfile(context_length=128_000),
        "gpt-4.1": ModelProfile(context_length=1_047_576),
        "gpt-4-turbo": ModelProfile(context_length=128_000),
        "gpt-4": ModelProfile(context_length=8_192, json_schema=False),
        "gpt-3.5-turbo": ModelProfile(context_length=16_385, json_schema=False),
        "gpt-5": replace(_OPENAI_REASONING, context_length=400_000),
        "gpt-5-chat": ModelProfile(context_length=128_000),
        "o1": _OPENAI_REASONING,
        "o3": _OPENAI_REASONING,
        "o4": _OPENAI_REASONING,
        "codex-mini": _OPENAI_REASONING,  # Responses API only (datus.models.openai_responses)
    },
    "deepseek": {
        "": ModelProfile(context_length=128_000, json_schema=False, reasoning_field="reasoning_content",
                         replay_reasoning=True),
        "deepseek-reasoner": ModelProfile(context_length=128_000, json_schema=False, temperature=False,
                                          reasoning_field="reasoning_content", replay_reasoning=True,
                                          always_reasons=True),
    },
    "qwen": {
        "": ModelProfile(context_length=131_072, json_schema=False, reasoning_field="reasoning_content",
                         thinking_param="enable_thinking"),
        "qwen-max": ModelProfile(context_length=32_768, json_schema=False, reasoning_field="reasoning_content"),
        "qwen-turbo": ModelProfile(context_length=1_000_000, json_schema=False,
                                   reasoning_field="reasoning_content", thinking_param="enable_thinking"),
        "qwen3-max": ModelProfile(context_length=262_144, json_schema=False, reasoning_field="reasoning_content"),
        "qwq": ModelProfile(context_length=131_072, json_schema=False, reasoning_field="reasoning_content",
                            always_reasons=True),
    },
    "claude": {
        "": ModelProfile(context_length=200_000),
    },
    "gemini": {
        "": ModelProfile(context_length=1_048_576),
        "gemini-2.5-pro": ModelProfile(context_length=1_048_576, always_reasons=True),
    },
    "fake": {"": ModelProfile(context_length=32_768)},
}


def find_profile(provider: str, model: str) -> ModelProfile:
    table = PROFILES.get(provider, {"": ModelProfile()})
    name = model.split("/")[-1]
    best = max((prefix for prefix in table if name.startswith(prefix)), key=len, default="")
    return table.get(best, ModelProfile())
