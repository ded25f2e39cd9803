"""What one model request is and what it returns, in provider-neutral terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from datus.models.messages import ChatMessage, ToolCall
from datus.models.rate_limit_headers import ProviderBudget
from datus.models.usage import Usage

__all__ = ["CallOptions", "Generation", "JsonFormat", "ModelRequest", "StreamDelta", "ToolSpec"]


class CallOptions(BaseModel):
    """Per-call settings; the model config supplies the defaults. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    enable_thinking: bool = False
    thinking_budget: int | None = Field(default=None, gt=0)
    stop: list[str] | None = None
    seed: int | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    tool_choice: str | None = Field(default=None, description="auto | none | required | a tool name")
    extra_body: dict[str, Any] | None = Field(default=None, description="sent as-is to the provider")


@dataclass(frozen=True)
class JsonFormat:
    """Normalised ``response_format``: JSON mode (schema None) or a JSON schema."""

    schema: dict[str, Any] | None = None
    name: str = "response"
    strict: bool = False
    pydantic_model: type[BaseModel] | None = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ModelRequest:
    messages: list[ChatMessage]
    options: CallOptions
    json_format: JsonFormat | None = None
    tools: tuple[ToolSpec, ...] = ()


@dataclass
class StreamDelta:
    text: str = ""
    reasoning: str = ""


@dataclass
class Generation:
    """One answer. ``usage`` has token counts from the adapter; the base adds cost,
    latency and attempts."""

    text: str = ""
    reasoning: str | None = None
    reasoning_details: list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    response_id: str | None = None
    rate_limits: ProviderBudget | None = None  # what the provider's headers said is left of its limits

    def message(self) -> ChatMessage:
        """The assistant message to put back into the conversation, reasoning included so
        providers that need it replayed get it back intact."""
        return ChatMessage(
            role="assistant",
            content=self.text,
            reasoning=self.reasoning,
            reasoning_details=self.reasoning_details,
            tool_calls=list(self.tool_calls),
        )
