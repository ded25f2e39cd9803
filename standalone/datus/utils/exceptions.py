"""`DatusException` and `ErrorCode`, as Datus-agent defines them (``datus/utils/exceptions.py``).

This file exists for installations without Datus-agent (the ``datus-queue-standalone``
distribution). Where Datus-agent is installed its own module is used instead, so every name,
numeric code and message placeholder here is Datus's: code that catches ``DatusException`` or
compares ``exc.code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED`` works the same on both. Only the
codes the model layer and its callers use are listed; codes Datus-agent does not have live in
the model layer (``datus.models.errors.ModelErrorCode``).

Each member's value is ``(code, desc)``; ``desc`` is a template that ``message_args`` fill.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["DatusException", "ErrorCode"]


class ErrorCode(Enum):
    COMMON_UNKNOWN = ("1000000", "Unknown error occurred")
    COMMON_FIELD_INVALID = (
        "1000001",
        "Unexcepted value of {field_name}, excepted value: {except_values}, your value: {your_value}",
    )
    COMMON_FILE_NOT_FOUND = ("100002", "{config_name} file not found: {file_name}")
    COMMON_FIELD_REQUIRED = ("100003", "Missing required field: {field_name}")
    COMMON_UNSUPPORTED = ("100004", "Unsupported value `{your_value}` for field `{field_name}`")
    COMMON_ENV = ("100005", "The environment variable {env_var} is not set")
    COMMON_CONFIG_ERROR = ("100006", "Configuration error: {config_error}")
    COMMON_VALIDATION_FAILED = ("100008", "Data validation failed")

    NODE_EXECUTION_FAILED = ("200001", "Node execution failed")

    MODEL_REQUEST_FAILED = ("300001", "LLM request failed")
    MODEL_INVALID_RESPONSE = ("300002", "Invalid request format, content, or model response (HTTP 400)")
    MODEL_TIMEOUT = ("300003", "Model request timeout")
    MODEL_AUTHENTICATION_ERROR = ("300011", "Authentication failed - check your API key (HTTP 401)")
    MODEL_PERMISSION_ERROR = ("300012", "API key lacks required permissions (HTTP 403)")
    MODEL_NOT_FOUND = ("300013", "Requested resource not found (HTTP 404)")
    MODEL_REQUEST_TOO_LARGE = ("300014", "Request exceeds size limit (HTTP 413)")
    MODEL_RATE_LIMIT = ("300015", "Rate limit exceeded - please wait before retrying (HTTP 429)")
    MODEL_API_ERROR = ("300016", "Unexpected API internal error (HTTP 500)")
    MODEL_OVERLOADED = ("300017", "API temporarily overloaded - please try again later (HTTP 529)")
    MODEL_CONNECTION_ERROR = ("300018", "Connection error - check your network connection")
    MODEL_QUOTA_EXCEEDED = ("300020", "Usage quota exceeded - please check your billing plan")
    MODEL_TIMEOUT_ERROR = ("300021", "Request timeout - the API took too long to respond")
    MODEL_MAX_TURNS_EXCEEDED = ("300022", "Maximum turns ({max_turns}) exceeded - agent execution stopped")
    MODEL_ILLEGAL_FORMAT_RESPONSE = (
        "300023",
        "Model returned response in illegal format. Response: '{response_preview}' (length: {response_length})",
    )

    TOOL_EXECUTION_FAILED = ("400001", "Tool execution failed")
    TOOL_INVALID_INPUT = ("400002", "Invalid tool input")

    def __init__(self, code: str, desc: str) -> None:
        self.code = code
        self.desc = desc


class DatusException(Exception):
    """An error with an `ErrorCode`; ``message`` wins over the code's template, which
    ``message_args`` fill. ``str()`` is ``error_code=<code>, error_message=<text>``."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        message_args: dict[str, Any] | None = None,
        *args: object,
    ) -> None:
        self.code = code
        self.message_args = message_args or {}
        self.message = self.build_msg(message, message_args)
        super().__init__(self.message, *args)

    def __str__(self) -> str:
        return self.message

    def build_msg(self, message: str | None = None, message_args: dict[str, Any] | None = None) -> str:
        if message:
            text = message
        elif message_args:
            text = self.code.desc.format(**message_args)
        else:
            text = self.code.desc
        return f"error_code={self.code.code}, error_message={text}"
