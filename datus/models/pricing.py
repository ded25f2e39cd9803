"""Prices in USD per million tokens, and the cost of a usage record.

The table holds list prices (standard tier, short context) as published by each provider in
2025; a model config's ``pricing:`` overrides it for one model, which is how negotiated
rates, new models and regional prices are set without a code change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BATCH_DISCOUNTS", "PRICES", "Pricing", "batch_pricing", "cost_usd", "find_pricing"]


class Pricing(BaseModel):
    """Per-million-token prices. Cache rates default to the input rate when not known."""

    model_config = ConfigDict(extra="forbid")

    input_per_mtok: float = Field(ge=0, description="uncached prompt tokens")
    output_per_mtok: float = Field(ge=0, description="answer tokens, reasoning included")
    cached_input_per_mtok: float | None = Field(default=None, ge=0, description="cache reads")
    cache_write_per_mtok: float | None = Field(default=None, ge=0, description="cache writes")


def _p(inp: float, out: float, cached: float | None = None, write: float | None = None) -> Pricing:
    return Pricing(input_per_mtok=inp, output_per_mtok=out, cached_input_per_mtok=cached,
                   cache_write_per_mtok=write)


# provider -> model-name prefix -> price; the longest matching prefix wins.
PRICES: dict[str, dict[str, Pricing]] = {
    "openai": {
        "gpt-4o": _p(2.50, 10.00, 1.25),
        "gpt-4o-mini": _p(0.15, 0.60, 0.075),
        "gpt-4.1": _p(2.00, 8.00, 0.50),
        "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
        "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
        "gpt-5": _p(1.25, 10.00, 0.125),
        "gpt-5-mini": _p(0.25, 2.00, 0.025),
        "gpt-5-nano": _p(0.05, 0.40, 0.005),
        "o1": _p(15.00, 60.00, 7.50),
        "o3": _p(2.00, 8.00, 0.50),
        "o3-mini": _p(1.10, 4.40, 0.55),
        "o4-mini": _p(1.10, 4.40, 0.275),
        # the Responses-API-only models (datus.models.openai_responses); gpt-5-codex is gpt-5's price
        "o1-pro": _p(150.00, 600.00),
        "o3-pro": _p(20.00, 80.00),
        "gpt-5-pro": _p(15.00, 120.00),
        "codex-mini": _p(1.50, 6.00, 0.375),
    },
    "deepseek": {
        "deepseek-chat": _p(0.28, 0.42, 0.028),
        "deepseek-reasoner": _p(0.28, 0.42, 0.028),
    },
    "qwen": {
        "qwen-max": _p(1.60, 6.40, 0.32),
        "qwen3-max": _p(1.20, 6.00, 0.24),
        "qwen-plus": _p(0.40, 1.20, 0.08),
        "qwen-turbo": _p(0.05, 0.20, 0.01),
        "qwen-flash": _p(0.05, 0.40, 0.01),
        "qwen3-coder-plus": _p(1.00, 5.00, 0.20),
    },
    "claude": {
        "claude-opus-4": _p(15.00, 75.00, 1.50, 18.75),
        "claude-opus-4-5": _p(5.00, 25.00, 0.50, 6.25),
        "claude-sonnet-4": _p(3.00, 15.00, 0.30, 3.75),
        "claude-3-7-sonnet": _p(3.00, 15.00, 0.30, 3.75),
        "claude-3-5-sonnet": _p(3.00, 15.00, 0.30, 3.75),
        "claude-haiku-4-5": _p(1.00, 5.00, 0.10, 1.25),
        "claude-3-5-haiku": _p(0.80, 4.00, 0.08, 1.00),
    },
    "gemini": {
        "gemini-2.5-pro": _p(1.25, 10.00, 0.31),
        "gemini-2.5-flash": _p(0.30, 2.50, 0.075),
        "gemini-2.5-flash-lite": _p(0.10, 0.40, 0.025),
        "gemini-2.0-flash": _p(0.10, 0.40, 0.025),
        "gemini-3-pro": _p(2.00, 12.00, 0.20),
    },
    "fake": {"": _p(1.00, 2.00, 0.10, 1.25)},  # so the demo and tests show real arithmetic
}


# provider -> the share of the online price its batch API charges, every token kind alike (cache
# reads and writes included), as each provider documents it: OpenAI's Batch API ("50% discount"),
# Anthropic's Message Batches ("50% of standard API prices", stacking with prompt caching), Gemini's
# batch mode (50 %), DashScope's batch inference for Qwen (50 % of real-time). DeepSeek has no batch API.
BATCH_DISCOUNTS: dict[str, float] = {"openai": 0.5, "claude": 0.5, "gemini": 0.5, "qwen": 0.5}


def batch_pricing(provider: str, pricing: Pricing | None) -> Pricing | None:
    """``pricing`` at ``provider``'s batch rates; None when either is unknown."""
    share = BATCH_DISCOUNTS.get(provider)
    if pricing is None or share is None:
        return None
    return Pricing(**{name: None if rate is None else rate * share for name, rate in pricing.model_dump().items()})


def find_pricing(provider: str, model: str) -> Pricing | None:
    table = PRICES.get(provider, {})
    name = model.split("/")[-1]
    best = max((prefix for prefix in table if name.startswith(prefix)), key=len, default=None)
    return None if best is None else table[best]


def cost_usd(
    pricing: Pricing,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> float:
    cached_rate = pricing.input_per_mtok if pricing.cached_input_per_mtok is None else pricing.cached_input_per_mtok
    write_rate = pricing.input_per_mtok if pricing.cache_write_per_mtok is None else pricing.cache_write_per_mtok
    uncached = max(0, input_tokens - cached_tokens - cache_write_tokens)
    total = (
        uncached * pricing.input_per_mtok
        + cached_tokens * cached_rate
        + cache_write_tokens * write_rate
        + output_tokens * pricing.output_per_mtok
    )
    return total / 1_000_000
