"""OpenAI: ``OPENAI_API_KEY``; reasoning models (o-series, gpt-5) take
``max_completion_tokens`` and no temperature — see their profile."""

from __future__ import annotations

from datus.models.openai_compatible import OpenAICompatibleModel

__all__ = ["OpenAIModel"]


class OpenAIModel(OpenAICompatibleModel):
    API_KEY_ENVS = ("OPENAI_API_KEY",)
    DEFAULT_BASE_URL = None  # the SDK's own default
