"""The one error hierarchy of the model layer.

Every adapter maps its SDK's exceptions here at exactly one boundary, to the most specific
class, with ``raise ... from exc``; no SDK exception escapes ``datus.models``. Each class says
whether it is retryable, and errors survive pickling and JSON (they cross Redis)::

    DatusException                          (datus.utils.exceptions)
    └── ModelError
        ├── ModelConfigError                 bad config, missing key/env var, unknown model
        ├── PermanentModelError              never retried
        │   ├── BadRequestError              400 / 422 / other 4xx
        │   ├── AuthenticationError          401
        │   ├── PermissionDeniedError        403
        │   ├── NotFoundError                404
        │   ├── RequestTooLargeError         413
        │   ├── ContextLengthExceededError   the prompt does not fit the model
        │   ├── ContentFilterError           safety / content policy refusal, empty candidates
        │   └── QuotaExceededError           429 that is about billing/quota, not rate
        ├── TransientModelError              retried under the retry policy
        │   ├── RateLimitError               429, carries ``retry_after``
        │   ├── OverloadedError              529 / 503 / overloaded_error
        │   ├── ServerError                  408, 409, 5xx
        │   ├── ModelTimeoutError            no answer within the timeout
        │   ├── ModelConnectionError         could not connect / connection dropped
        │   ├── InvalidResponseError         a body or stream that is not the protocol
        │   └── ToolServerLostError          a durable run's tool server died mid-call (it resumes)
        └── ModelOutputError                 the answer is not what was asked (bad JSON)
            └── MaxTurnsExceededError        a tool run did not finish; carries its steps
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar

from datus.models.redact import redact
from datus.utils.exceptions import DatusException, ErrorCode

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ContentFilterError",
    "ContextLengthExceededError",
    "InvalidResponseError",
    "MaxTurnsExceededError",
    "ModelConfigError",
    "ModelConnectionError",
    "ModelError",
    "ModelErrorCode",
    "ModelOutputError",
    "ModelTimeoutError",
    "NotFoundError",
    "OverloadedError",
    "PermanentModelError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "RequestTooLargeError",
    "ServerError",
    "ToolServerLostError",
    "TransientModelError",
    "error_from_dict",
    "error_from_status",
    "parse_retry_after",
    "transport_error",
]


class ModelErrorCode(Enum):
    """Codes Datus-agent's `ErrorCode` does not have, shaped like it (``(code, desc)``, with
    ``.code`` and ``.desc``) so code that formats any Datus error formats these too."""

    MODEL_CONTEXT_LENGTH_EXCEEDED = ("300101", "The prompt does not fit the model's context window")
    MODEL_CONTENT_FILTERED = ("300102", "The provider's content filter refused the request or the answer")
    MODEL_PROTOCOL_ERROR = ("300103", "The provider's answer is not its protocol (broken body or stream)")
    SESSION_NOT_FOUND = ("300104", "Session not found")

    def __init__(self, code: str, desc: str) -> None:
        self.code = code
        self.desc = desc


class ModelError(DatusException):
    """Base of the model layer's errors.

    Per class: ``error_code`` (Datus's `ErrorCode` where Datus has one with this meaning, else a
    `ModelErrorCode`; also ``.code`` on the instance, as every `DatusException`), ``slug`` (the
    stable lowercase name stored with failed jobs and used in metrics) and ``retryable``.
    ``reason`` (and ``str()``) is what went wrong in words; ``message`` is Datus's
    ``error_code=..., error_message=<reason>``."""

    retryable: ClassVar[bool] = False
    error_code: ClassVar[ErrorCode | ModelErrorCode] = ErrorCode.MODEL_REQUEST_FAILED
    slug: ClassVar[str] = "model_error"
    # the provider's rate-limit headers on this answer (datus.models.rate_limit_headers), set by
    # the adapter for its request limiter; in-process only, not carried across pickling
    rate_limits: Any = None

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        # masked: a provider's message can echo a key (`datus.models.redact`), and it is stored and shown
        self.reason = redact(message) or self.error_code.desc
        super().__init__(self.error_code, self.reason)  # type: ignore[arg-type]
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.retry_after = retry_after
        self.details = details or {}

    def _kwargs(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "status_code": self.status_code,
            "retry_after": self.retry_after,
            "details": self.details,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self).__name__, self.reason, self._kwargs()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form: the class name, the stable slug and what the provider said."""
        return {
            "type": type(self).__name__,
            "code": self.slug,
            "message": self.reason,
            "retryable": self.retryable,
            **self._kwargs(),
        }

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        where = "/".join(part for part in (self.provider, self.model) if part)
        status = f" {self.status_code}" if self.status_code else ""
        return f"{type(self).__name__}({where}{status}: {self.reason!r})"


class ModelConfigError(ModelError):
    error_code = ErrorCode.COMMON_CONFIG_ERROR
    slug = "model_config_error"


class PermanentModelError(ModelError):
    error_code = ErrorCode.MODEL_INVALID_RESPONSE  # Datus's code for a refused (HTTP 400) request
    slug = "model_bad_request"


class BadRequestError(PermanentModelError):
    pass


class AuthenticationError(PermanentModelError):
    error_code = ErrorCode.MODEL_AUTHENTICATION_ERROR
    slug = "model_authentication_error"


class PermissionDeniedError(PermanentModelError):
    error_code = ErrorCode.MODEL_PERMISSION_ERROR
    slug = "model_permission_error"


class NotFoundError(PermanentModelError):
    error_code = ErrorCode.MODEL_NOT_FOUND
    slug = "model_not_found"


class RequestTooLargeError(PermanentModelError):
    error_code = ErrorCode.MODEL_REQUEST_TOO_LARGE
    slug = "model_request_too_large"


class ContextLengthExceededError(PermanentModelError):
    error_code = ModelErrorCode.MODEL_CONTEXT_LENGTH_EXCEEDED
    slug = "model_context_length_exceeded"


class ContentFilterError(PermanentModelError):
    error_code = ModelErrorCode.MODEL_CONTENT_FILTERED
    slug = "model_content_filtered"


class QuotaExceededError(PermanentModelError):
    error_code = ErrorCode.MODEL_QUOTA_EXCEEDED
    slug = "model_quota_exceeded"


class TransientModelError(ModelError):
    retryable = True
    error_code = ErrorCode.MODEL_API_ERROR
    slug = "model_server_error"


class RateLimitError(TransientModelError):
    error_code = ErrorCode.MODEL_RATE_LIMIT
    slug = "model_rate_limit"


class OverloadedError(TransientModelError):
    error_code = ErrorCode.MODEL_OVERLOADED
    slug = "model_overloaded"


class ServerError(TransientModelError):
    pass


class ModelTimeoutError(TransientModelError):
    error_code = ErrorCode.MODEL_TIMEOUT_ERROR
    slug = "model_timeout"


class ModelConnectionError(TransientModelError):
    error_code = ErrorCode.MODEL_CONNECTION_ERROR
    slug = "model_connection_error"


class InvalidResponseError(TransientModelError):
    error_code = ModelErrorCode.MODEL_PROTOCOL_ERROR
    slug = "model_invalid_response"


class ToolServerLostError(TransientModelError):
    """The server of a tool went away during the call (it exited, was killed, dropped the
    connection). Raised only by a tool run with a journal, which resumes: the call in flight is
    made again once the server is back. Without a journal the model gets a failed tool result."""

    error_code = ErrorCode.TOOL_EXECUTION_FAILED
    slug = "model_tool_error"


class ModelOutputError(ModelError):
    error_code = ErrorCode.MODEL_ILLEGAL_FORMAT_RESPONSE
    slug = "model_output_error"


class MaxTurnsExceededError(ModelOutputError):
    """``details["steps"]`` holds the steps taken so far (JSON-safe dicts)."""

    error_code = ErrorCode.MODEL_MAX_TURNS_EXCEEDED
    slug = "model_max_turns_exceeded"


def _all_classes(root: type[ModelError]) -> dict[str, type[ModelError]]:
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        found.update(_all_classes(sub))
    return found


_CLASSES = _all_classes(ModelError)


def _rebuild(name: str, message: str, kwargs: dict[str, Any]) -> ModelError:
    return _CLASSES.get(name, ModelError)(message, **kwargs)


def error_from_dict(data: Mapping[str, Any]) -> ModelError:
    """Inverse of ``ModelError.to_dict`` (unknown type names become ``ModelError``)."""
    kwargs = {key: data.get(key) for key in ("provider", "model", "status_code", "retry_after", "details")}
    return _rebuild(str(data.get("type", "ModelError")), str(data.get("message", "")), kwargs)


# Structured error codes (never message substrings) that refine a status code. Providers put
# them in `error.code` or `error.type` of the body; adapters pass both.
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "quota_exceeded", "Arrearage"})
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length", "context_window_exceeded"})
_FILTER_CODES = frozenset(
    {"content_filter", "content_policy_violation", "data_inspection_failed", "DataInspectionFailed"}
)
_OVERLOADED_CODES = frozenset({"overloaded_error", "overloaded"})

_BY_STATUS: dict[int, type[ModelError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: ServerError,
    409: ServerError,
    413: RequestTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: OverloadedError,  # "overloaded, slow down" at OpenAI, DeepSeek and Gemini (UNAVAILABLE)
    529: OverloadedError,
}


def error_from_status(
    status: int,
    message: str,
    *,
    codes: tuple[str | None, ...] = (),
    headers: Mapping[str, str] | None = None,
    provider: str | None = None,
    model: str | None = None,
) -> ModelError:
    """Map an HTTP error answer to the most specific class.

    ``codes`` are the structured fields of the error body (``error.code``, ``error.type``,
    ``status``); they refine the status (quota 429s are permanent, context length and
    content filter are their own classes)."""
    found = {code for code in codes if code}
    cls: type[ModelError]
    if found & _QUOTA_CODES:
        cls = QuotaExceededError
    elif found & _CONTEXT_CODES:
        cls = ContextLengthExceededError
    elif found & _FILTER_CODES:
        cls = ContentFilterError
    elif found & _OVERLOADED_CODES:
        cls = OverloadedError
    elif status in _BY_STATUS:
        cls = _BY_STATUS[status]
    elif status >= 500:
        cls = ServerError
    else:
        cls = BadRequestError
    retry_after = parse_retry_after(headers) if headers is not None and cls.retryable else None
    return cls(message, provider=provider, model=model, status_code=status, retry_after=retry_after)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or HTTP-date."""
    lowered = {key.lower(): value for key, value in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# httpx and its successor httpx2 (which recent SDKs use) share these exception class names.
_TIMEOUT_TYPES = frozenset({"TimeoutException", "TimeoutError", "ReadTimeout", "ConnectTimeout", "PoolTimeout"})
_TRANSPORT_TYPES = frozenset({"TransportError", "NetworkError", "StreamError", "RemoteProtocolError",
                              "ConnectionError", "IncompleteRead", "ProtocolError"})


def transport_error(exc: BaseException, provider: str | None = None, model: str | None = None) -> ModelError | None:
    """A timeout or broken connection from the HTTP layer, by exception type; else None."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _TIMEOUT_TYPES:
        return ModelTimeoutError(f"request timed out: {exc}", provider=provider, model=model)
    if names & _TRANSPORT_TYPES:
        return ModelConnectionError(f"the connection broke: {exc}", provider=provider, model=model)
    return None
