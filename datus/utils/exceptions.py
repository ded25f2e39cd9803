"""`DatusException` and its `ErrorCode`s: the base every error of the model layer derives
from, so code that catches `DatusException` today keeps working."""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["ErrorCode", "DatusException"]


class ErrorCode(str, Enum):
    """Stable error codes: they appear in job results and metrics, so never rename one."""

    COMMON_UNKNOWN = "common_unknown"
    COMMON_CONFIG_ERROR = "config_error"
    COMMON_FIELD_INVALID = "field_invalid"
    MODEL_CONFIG_ERROR = "model_config_error"
    MODEL_BAD_REQUEST = "model_bad_request"
    MODEL_AUTHENTICATION_ERROR = "model_authentication_error"
    MODEL_PERMISSION_ERROR = "model_permission_error"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_REQUEST_TOO_LARGE = "model_request_too_large"
    MODEL_CONTEXT_LENGTH_EXCEEDED = "model_context_length_exceeded"
    MODEL_CONTENT_FILTERED = "model_content_filtered"
    MODEL_QUOTA_EXCEEDED = "model_quota_exceeded"
    MODEL_RATE_LIMIT = "model_rate_limit"
    MODEL_OVERLOADED = "model_overloaded"
    MODEL_SERVER_ERROR = "model_server_error"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_CONNECTION_ERROR = "model_connection_error"
    MODEL_INVALID_RESPONSE = "model_invalid_response"
    MODEL_OUTPUT_ERROR = "model_output_error"
    MODEL_MAX_TURNS_EXCEEDED = "model_max_turns_exceeded"
    MODEL_TOOL_ERROR = "model_tool_error"
    SESSION_NOT_FOUND = "session_not_found"


class DatusException(Exception):
    """Base of every Datus error: a stable `code` and a human message."""

    def __init__(
        self,
        code: ErrorCode = ErrorCode.COMMON_UNKNOWN,
        message: str | None = None,
        message_args: dict[str, Any] | None = None,
    ) -> None:
        self.code = ErrorCode(code)
        text = message if message is not None else self.code.value
        if message_args:
            text = text.format(**message_args)
        self.message = text
        super().__init__(text)

    def __str__(self) -> str:
        return self.message
