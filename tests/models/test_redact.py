"""`datus.models.redact`: the one masking function, and the places it guards at their source
(model errors, job errors, MCP start failures, log records)."""

from __future__ import annotations

import logging

import pytest

from datus.models.errors import AuthenticationError, ModelError
from datus.models.mcp.connection import safe_url
from datus.models.redact import install_log_redaction, redact, remember_secret


@pytest.mark.parametrize(("text", "expected"), [
    # userinfo, and every query and fragment value (the names stay)
    ("https://u:p@h.example/mcp?api_key=abc123&sslmode=require#access_token=zz",
     "https://***@h.example/mcp?api_key=***&sslmode=***#access_token=***"),
    ("postgresql://reader@db/x", "postgresql://***@db/x"),
    ("connection to http://127.0.0.1:9/mcp?k=opaque-token refused", "connection to http://127.0.0.1:9/mcp?k=*** refused"),
    ("Client error '401 Unauthorized' for url 'http://h/mcp?X-Amz-Signature=f00d'",
     "Client error '401 Unauthorized' for url 'http://h/mcp?X-Amz-Signature=***'"),
    ('{"url": "https://h/p?code=42"}', '{"url": "https://h/p?code=***"}'),
    # secret-looking names outside a URL
    ("api_key=xyz; retry", "api_key=***; retry"),
    ('{"api_key": "xyz", "model": "gpt"}', '{"api_key": "***", "model": "gpt"}'),
    ("password: hunter2 and access-token=t0k", "password: *** and access-token=***"),
    # key shapes
    ("Incorrect API key provided: sk-proj-AbCdEf0123456789.", "Incorrect API key provided: ***."),
    ("Authorization: Bearer eyJhbGciOi.payload.sig", "Authorization: Bearer ***"),
    ("key=AIzaSyA1234567890123456789012345 here", "key=*** here"),
    ("aws AKIAABCDEFGHIJKLMNOP x", "aws *** x"),
    # what is not secret stays readable
    ("max_tokens: Input should be less than 100", "max_tokens: Input should be less than 100"),
    ("input tokens: 5000 of 4000 (author: bob)", "input tokens: 5000 of 4000 (author: bob)"),
    ("the SQL server on sqlite:///shop.db failed", "the SQL server on sqlite:///shop.db failed"),
    ("task-abcdefghijkl is queued", "task-abcdefghijkl is queued"),
])
def test_redact_masks_tokens_in_urls_secret_names_and_key_shapes(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: masking twice changes nothing


def test_remembered_secrets_are_masked_whatever_their_shape() -> None:
    remember_secret("plain-configured-value-42")
    remember_secret("short")  # too short to remember: it would mask ordinary words
    assert redact("the server said plain-configured-value-42!") == "the server said ***!"
    assert redact("a short answer") == "a short answer"
    assert redact(None) is None and redact(5) == 5


def test_safe_url_is_redact() -> None:
    assert safe_url("https://u:p@h/mcp?api_key=abc") == "https://***@h/mcp?api_key=***"


def test_a_provider_error_echoing_a_key_is_masked_at_its_source() -> None:
    error = AuthenticationError("Incorrect API key provided: sk-dq-test-REJECTED-9876543210. See https://x/y?key=k",
                                provider="openai", status_code=401)
    assert "REJECTED" not in str(error) and "REJECTED" not in repr(error) and "REJECTED" not in error.to_dict()["message"]
    assert ModelError("").reason  # an empty message still says what went wrong


def test_a_job_error_message_is_masked_wherever_it_is_made_or_read() -> None:
    from datus_queue.tasks.schemas import JobError

    made = JobError(code="internal_error", type="X", message="GET https://h/mcp?api_key=SEKRIT failed")
    assert made.message == "GET https://h/mcp?api_key=*** failed"
    read = JobError.model_validate({"code": "c", "type": "t", "message": "Bearer SEKRIT-TOKEN-1"})  # an old row
    assert "SEKRIT" not in read.message


def test_log_records_are_redacted_message_arguments_and_traceback(caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from datus.models import redact as module

    monkeypatch.setattr(module, "_installed", False)  # the process's logging as it was, after the test
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())
    install_log_redaction()
    install_log_redaction()  # idempotent
    logger = logging.getLogger("dq-test-redact")
    with caplog.at_level(logging.INFO, logger="dq-test-redact"):
        logger.info("calling %s with %r", "https://h/mcp?api_key=SEKRIT-1", {"api_key": "SEKRIT-2"})
        try:
            raise RuntimeError("token=SEKRIT-3 rejected")
        except RuntimeError:
            logger.exception("failed")
    text = caplog.text + "".join(record.exc_text or "" for record in caplog.records)
    assert "SEKRIT" not in text and "api_key=***" in text


def test_an_mcp_servers_env_values_and_credential_headers_are_remembered() -> None:
    from datus.models.mcp.servers import mcp_server_from_config

    mcp_server_from_config("vault", {"command": "srv", "env": {"VAULT_PASS": "vault-pass-0042"}})
    mcp_server_from_config("remote", {"url": "http://h/mcp", "headers": {
        "X-Api-Key": "header-key-0042", "Accept": "application/x-dq-test-0042"}})
    assert redact("vault-pass-0042 header-key-0042 application/x-dq-test-0042") == \
        "*** *** application/x-dq-test-0042"  # a header that carries no credential stays readable


def test_a_word_saying_what_state_a_secret_is_in_is_not_masked() -> None:
    """``NAME: value`` masks the value when NAME looks secret; the error create_model raises for
    an unset variable reads ``OPENAI_API_KEY: set them, ...`` and must stay readable — so must
    ``api_key: missing``. Only the whole value being such a word is spared."""
    from datus.models.config import ModelConfig
    from datus.models.errors import ModelConfigError

    config = ModelConfig.model_validate({"type": "openai", "model": "gpt-4o-mini", "api_key": "${DQ_TEST_UNSET_API_KEY}"})
    with pytest.raises(ModelConfigError) as caught:
        config.require_env("sql-writer")
    assert "DQ_TEST_UNSET_API_KEY: set them, or change" in str(caught.value)
    assert redact("api_key: missing, token=none; password: required") == "api_key: missing, token=none; password: required"
    assert redact("api_key: settled-value password: set-me") == "api_key: *** password: ***"
