"""OpenAI: ``OPENAI_API_KEY``; reasoning models (o-series, gpt-5) take
``max_completion_tokens`` and no temperature — see their profile.

Chat Completions by default; the Responses API (`datus.models.openai_responses`) when the
model's config says ``api: responses``, or — ``api`` unset — for the models that answer only
there (``o1-pro``, ``o3-pro``, ``gpt-5-pro``, ``codex`` models)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.openai_compatible import OpenAICompatibleModel
from datus.models.openai_responses import ResponsesAPI, api_of

__all__ = ["OpenAIModel"]


class OpenAIModel(OpenAICompatibleModel):
    API_KEY_ENVS = ("OPENAI_API_KEY",)
    DEFAULT_BASE_URL = None  # the SDK's own default

    def __init__(self, model_config: Any, **kwargs: Any) -> None:
        super().__init__(model_config, **kwargs)
        #: "chat_completions" or "responses": the API this model's requests go to
        self.api = api_of(self.model_config.api, self.model_name)
        self._responses = ResponsesAPI(self) if self.api == "responses" else None
        responses_only = [key for key in ("hosted_tools", "store") if getattr(self.model_config, key)]
        if self._responses is None and responses_only:
            from datus.models.errors import ModelConfigError

            raise ModelConfigError(f"model {self.model_name!r}: {' and '.join(responses_only)} need the Responses "
                                   "API; set api: responses", provider=self.provider, model=self.model_name)

    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        if self._responses is not None:
            return await self._responses.complete(client, request)
        return await super()._complete(client, request)

    async def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        source = self._responses.stream(client, request) if self._responses is not None \
            else super()._stream(client, request)
        async with contextlib.aclosing(source) as items:
            async for item in items:
                yield item

    def _count_input_tokens(self, request: ModelRequest) -> int:
        count = super()._count_input_tokens(request)
        if self._responses is not None:
            count += self._responses.count_extra_tokens(request)
        return count
