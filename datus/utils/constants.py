"""Constants shared by the whole model layer."""

from __future__ import annotations

from enum import Enum

__all__ = ["LLMProvider"]


class LLMProvider(str, Enum):
    """Every provider the model layer knows; the values are the `type:` of a model config
    and the `provider` of a `provider:model` string."""

    OPENAI = "openai"
    CLAUDE = "claude"
    DEEPSEEK = "deepseek"
    QWEN = "qwen"
    GEMINI = "gemini"
    FAKE = "fake"

    def __str__(self) -> str:  # so f"{provider}" and queue names read "openai", not the enum
        return self.value
