"""Qwen on DashScope's OpenAI-compatible mode: ``QWEN_API_KEY`` (or ``DASHSCOPE_API_KEY``);
``enable_thinking`` is passed through in the request body."""

from __future__ import annotations

from datus.models.openai_compatible import OpenAICompatibleModel

__all__ = ["QwenModel"]


class QwenModel(OpenAICompatibleModel):
    API_KEY_ENVS = ("QWEN_API_KEY", "DASHSCOPE_API_KEY")
    DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
