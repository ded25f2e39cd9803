"""Constants of Datus-agent (``datus/utils/constants.py``) that the model layer uses.

For installations without Datus-agent (``datus-queue-standalone``); where Datus-agent is
installed its own module is used. Names and values are Datus's.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["LLMProvider"]


class LLMProvider(str, Enum):
    """The ``type:`` of a model in agent.yml."""

    OPENAI = "openai"
    CLAUDE = "claude"
    DEEPSEEK = "deepseek"
    QWEN = "qwen"
    ANTHROPIC = "anthropic"  # another name for claude
    GEMINI = "gemini"
    LLAMA = "llama"
    GPT = "gpt"  # another name for openai
