"""DeepSeek: ``DEEPSEEK_API_KEY``; ``reasoning_content`` comes back as reasoning and is
replayed on assistant messages, as DeepSeek's thinking-with-tools mode requires."""

from __future__ import annotations

from datus.models.openai_compatible import OpenAICompatibleModel

__all__ = ["DeepSeekModel"]


class DeepSeekModel(OpenAICompatibleModel):
    API_KEY_ENVS = ("DEEPSEEK_API_KEY",)
    DEFAULT_BASE_URL = "https://api.deepseek.com"
