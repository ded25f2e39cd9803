"""The Datus model layer. Importing it imports no provider SDK: each SDK is imported when
its provider is first used."""

from __future__ import annotations

from datus.models.base import LLMBaseModel
from datus.models.generation import Generation, StreamDelta
from datus.models.usage import Usage, track_usage

__all__ = ["Generation", "LLMBaseModel", "StreamDelta", "Usage", "track_usage"]
