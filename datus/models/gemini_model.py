"""Google Gemini on its own SDK, google-genai (provider ``gemini``).

Native schema output (``response_mime_type`` + ``response_json_schema``), function calling,
thinking with thought summaries, countTokens. Conversions live in ``gemini_contents``; this
module owns the key, the client, the calls and the one error boundary.

The SDK's own retries are off (``HttpRetryOptions(attempts=1)``): the base class and the job
system own retries, so they never multiply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from datus.models._portal import run_sync
from datus.models.base import LLMBaseModel
from datus.models.errors import (
    AuthenticationError,
    InvalidResponseError,
    ModelConfigError,
    ModelConnectionError,
    ModelError,
    ModelTimeoutError,
    error_from_status,
)
from datus.models.gemini_contents import ResponseFolder, build_config, to_contents
from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.tokens import TokenCount, estimate_tokens

__all__ = ["GeminiModel"]

logger = logging.getLogger(__name__)

# google.rpc detail types in Google's error bodies.
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_BAD_KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")
# Gemini gives no structured code for an over-long prompt, only this fixed sentence.
_CONTEXT_MESSAGE = re.compile(r"input token count.*exceeds the maximum number of tokens", re.IGNORECASE)
_COUNT_TIMEOUT_S = 15.0  # a token count is a budget guard: do not wait a whole call's timeout


class GeminiModel(LLMBaseModel):
    API_KEY_ENVS: ClassVar[tuple[str, ...]] = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    # v1beta carries every feature used here (thinking, responseJsonSchema); the SDK's default
    # is v1.
    API_VERSION: ClassVar[str] = "v1beta"

    # ---- client --------------------------------------------------------------------------

    def _create_client(self) -> Any:
        # The Client itself is cached, not `client.aio`: the async client dies with it.
        from google import genai
        from google.genai import types

        from datus.models.http_clients import gemini_async_client_args

        base_url, api_version = split_api_version(self.model_config.base_url, self.API_VERSION)
        http_options = types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=int(self.model_config.timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),
            async_client_args=gemini_async_client_args(self.model_config.http_client),
        )
        return genai.Client(vertexai=False, api_key=self._get_api_key(), http_options=http_options)

    @staticmethod
    async def _close_client(client: Any) -> None:
        # Client.close() closes only the sync transport; the async one has its own aclose.
        await client.aio.aclose()
        client.close()

    # ---- calls ---------------------------------------------------------------------------

    def _arguments(self, request: ModelRequest) -> dict[str, Any]:
        system, contents = to_contents(request.messages)
        if not contents:
            raise ValueError("Gemini needs at least one user or assistant message besides the system prompt")
        return {"model": self.model_name, "contents": contents,
                "config": build_config(request, self.profile, system)}

    async def _complete(self, client: Any, request: ModelRequest) -> Generation:
        response = await client.aio.models.generate_content(**self._arguments(request))
        folder = ResponseFolder(self.provider, self.model_name)
        folder.add(response)
        return folder.result()

    async def _stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        folder = ResponseFolder(self.provider, self.model_name)
        stream = await client.aio.models.generate_content_stream(**self._arguments(request))
        try:
            async for chunk in stream:
                delta = folder.add(chunk)
                if delta is not None:
                    yield delta
        finally:
            await stream.aclose()
        yield folder.result()

    # ---- token counting ------------------------------------------------------------------

    def token_count(self, prompt: str) -> TokenCount:
        """Exact, from the countTokens endpoint; when it cannot be reached, an offline
        estimate flagged ``estimated=True`` (and a warning saying so)."""
        return run_sync(self.atoken_count(prompt))

    async def atoken_count(self, prompt: str) -> TokenCount:
        try:
            try:
                async with asyncio.timeout(min(self.model_config.timeout_s, _COUNT_TIMEOUT_S)):
                    response = await self._client().aio.models.count_tokens(model=self.model_name, contents=prompt)
            except TimeoutError as exc:
                raise ModelTimeoutError("countTokens did not answer", provider=self.provider,
                                        model=self.model_name) from exc
            except ModelError:
                raise
            except Exception as exc:  # the adapter's boundary
                raise self._map_error(exc) from exc
        except ModelConfigError:
            raise
        except ModelError as exc:
            estimate = estimate_tokens(prompt)
            logger.warning("%s/%s: countTokens failed (%s: %s); using an offline estimate of %d tokens, "
                           "not Gemini's count", self.provider, self.model_name, type(exc).__name__,
                           exc.message, estimate)
            return estimate
        return TokenCount(response.total_tokens or 0, "gemini:countTokens")

    # ---- errors --------------------------------------------------------------------------

    def _map_error(self, exc: Exception) -> ModelError:
        from google.genai import errors

        where = {"provider": self.provider, "model": self.model_name}
        if isinstance(exc, errors.APIError):
            return self._api_error(exc)
        # The SDK sends through httpx2 when installed, else httpx (or aiohttp, if installed).
        for module in _http_modules():
            if isinstance(exc, module.TimeoutException):
                return ModelTimeoutError(f"request timed out ({type(exc).__name__})", **where)
            if isinstance(exc, (module.TransportError, module.StreamError)):
                return ModelConnectionError(f"the connection broke: {exc!r}", **where)
        aiohttp = sys.modules.get("aiohttp")
        if aiohttp is not None:
            if isinstance(exc, aiohttp.ServerTimeoutError):
                return ModelTimeoutError(f"request timed out ({type(exc).__name__})", **where)
            if isinstance(exc, aiohttp.ClientError):
                return ModelConnectionError(f"the connection broke: {exc!r}", **where)
        if isinstance(exc, TimeoutError):
            return ModelTimeoutError(f"request timed out ({type(exc).__name__})", **where)
        if isinstance(exc, (errors.UnknownApiResponseError, json.JSONDecodeError)):
            return InvalidResponseError(f"Gemini's answer is not valid: {exc}", **where)
        return ModelError(f"{type(exc).__name__}: {exc}", **where)

    def _api_error(self, exc: Any) -> ModelError:
        where = {"provider": self.provider, "model": self.model_name}
        body = exc.details if isinstance(exc.details, dict) else {}
        error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        details = [item for item in error.get("details") or [] if isinstance(item, dict)]
        message = str(exc.message or error.get("message") or exc)
        status = exc.status or error.get("status")
        reasons = {item.get("reason") for item in details if item.get("@type") == _ERROR_INFO}
        if reasons & _BAD_KEY_REASONS:  # Google answers a bad key with 400 INVALID_ARGUMENT
            return AuthenticationError(message, status_code=exc.code, **where)
        codes: list[str | None] = [status, *reasons]
        if _daily_quota_only(details):
            codes.append("quota_exceeded")  # a per-day quota does not clear within a retry's wait
        if status == "INVALID_ARGUMENT" and _CONTEXT_MESSAGE.search(message):
            codes.append("context_length_exceeded")
        headers = getattr(exc.response, "headers", None)
        mapped = error_from_status(int(exc.code or 500), message, codes=tuple(codes),
                                   headers=dict(headers) if headers is not None else None, **where)
        if mapped.retryable and mapped.retry_after is None:
            mapped.retry_after = _retry_delay(details)
        return mapped


def _http_modules() -> list[Any]:
    return [module for name in ("httpx2", "httpx") if (module := sys.modules.get(name)) is not None]


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a google.rpc.RetryInfo ``retryDelay`` ("2s", "0.5s")."""
    for item in details:
        if item.get("@type") == _RETRY_INFO:
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _daily_quota_only(details: list[dict[str, Any]]) -> bool:
    ids = [str(violation.get("quotaId", "")) for item in details if item.get("@type") == _QUOTA_FAILURE
           for violation in item.get("violations") or [] if isinstance(violation, dict)]
    return bool(ids) and all("PerDay" in quota_id for quota_id in ids)


def split_api_version(base_url: str | None, default: str) -> tuple[str | None, str]:
    """Datus's configs write Gemini's base URL with its API version
    (``https://generativelanguage.googleapis.com/v1beta``); the SDK adds the version itself, so
    a trailing ``/v1beta`` or ``/v1`` becomes the API version instead of doubling in the path."""
    if not base_url:
        return base_url, default
    head, _, last = base_url.rstrip("/").rpartition("/")
    if head and last in ("v1", "v1beta", "v1alpha"):
        return head, last
    return base_url, default
