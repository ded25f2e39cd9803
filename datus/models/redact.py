"""`redact`: the one masking function for anything a person or another process may read —
job errors, the job store, events, logs, ``dq status``, reprs.

It masks, in free text:

- in every URL (``scheme://…``): the userinfo (``//user:pass@`` and ``//token@`` alike become
  ``//***@``) and **every** query and fragment value (``?api_key=***&sslmode=***``). Every
  value, not only those whose names look secret: the name of a token parameter is the server's
  choice (``?k=``, ``?code=``, ``?X-Amz-Signature=``, ``?sig=``) and a list of names always
  misses one, while a reader of an error needs the scheme, host and path — the names stay;
- ``name=value`` / ``name: value`` where the name looks secret (key, token, secret, password,
  sig, auth, credential, api_key, access_token, …), e.g. a query string already cut from its URL;
- known key shapes: ``sk-…`` (OpenAI, Anthropic, DeepSeek, Qwen/DashScope), ``Bearer …``,
  ``AIza…`` (Google), ``AKIA…`` (AWS), ``ghp_…``/``github_pat_…``, ``xox?-…`` (Slack);
- the values registered with `remember_secret`: the configured API keys (`ModelConfig`) and the
  values of MCP servers' ``env`` and ``headers`` — whatever their shape.

`install_log_redaction` makes every log record of the process go through `redact` (message,
arguments and traceback), whichever logger or handler writes it.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

__all__ = ["MASK", "install_log_redaction", "redact", "remember_secret"]

MASK = "***"
_MIN_SECRET = 8  # a remembered value shorter than this would mask ordinary words
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None
_lock = threading.Lock()

# a URL in free text: up to whitespace, a quote, a bracket or a backslash (JSON escapes)
_URL = re.compile(r"""\b[A-Za-z][A-Za-z0-9+.\-]{1,30}://[^\s'"<>`\\]+""")
_USERINFO = re.compile(r"^([^:/?#]+://)[^/?#@]*@")
_PARAM = re.compile(r"([?&#;][^=&#?\s]*=)[^&#\s]*")
# a secret-looking name: one of these words, maybe with prefixes/suffixes joined by _ - .
# (``x_api_key``, ``access-token``, ``db.password``; not ``max_tokens`` or ``author``)
_SECRET_WORD = (r"(?:api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|secret|token|password|passwd|pwd|"
                r"credentials?|signature|sig|auth|authorization|session[_\-]?id|key)")
# a word that says what state a secret is in is no secret: "OPENAI_API_KEY: set them, ...",
# "api_key: missing", "token=none" stay readable (the whole value must be the word)
_STATE_WORD = r"(?:set|unset|missing|required|empty|none|null|not)(?=[\s\"'&,;}\]]|$)"
_NAMED = re.compile(rf"""(?i)(["']?\b(?:[A-Za-z0-9]+[_\-.])*{_SECRET_WORD}(?:[_\-][A-Za-z0-9]*(?:key|token|secret))?"""
                    rf"""["']?\s*[=:]\s*["']?)(?!\*\*\*)(?!Bearer\b|Basic\b|Token\b)(?!{_STATE_WORD})"""
                    rf"""([^\s"'&,;}}\]]+)""")
_SHAPES = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{8,}"
    r"|\bAIza[0-9A-Za-z_\-]{20,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}")
_BEARER = re.compile(r"(?i)\b(Bearer|Basic|Token)\s+(?!\*\*\*)[A-Za-z0-9._~+/=\-]{6,}")


def remember_secret(value: str | None) -> None:
    """Mask ``value`` wherever `redact` finds it from now on (a configured API key, an MCP
    server's env or header value). Values shorter than 8 characters are not remembered."""
    global _secrets_re
    if not isinstance(value, str) or len(value) < _MIN_SECRET or value in _secrets:
        return
    with _lock:
        _secrets.add(value)
        ordered = sorted(_secrets, key=len, reverse=True)  # the longest first: a key inside another
        _secrets_re = re.compile("|".join(re.escape(secret) for secret in ordered))


def _url(match: re.Match[str]) -> str:
    url = _USERINFO.sub(rf"\g<1>{MASK}@", match.group(0))
    return _PARAM.sub(rf"\g<1>{MASK}", url)


def redact(text: Any) -> Any:
    """``text`` with tokens in URLs, secret-looking ``name=value`` pairs, known key shapes and
    remembered secrets masked as ``***``. Anything but a string comes back as it is."""
    if not isinstance(text, str) or not text:
        return text
    pattern = _secrets_re
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if "://" in text:
        text = _URL.sub(_url, text)
    text = _SHAPES.sub(MASK, text)
    text = _BEARER.sub(rf"\g<1> {MASK}", text)
    return _NAMED.sub(rf"\g<1>{MASK}", text)


# ---- logs -------------------------------------------------------------------------------


_installed = False


def _redacted_message(record: logging.LogRecord) -> str:
    return redact(type(record).getMessage(record))


def install_log_redaction() -> None:
    """From now on every log record made in this process is redacted when it is made: its
    message with its arguments, its traceback and stack. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            # the message is redacted when it is formatted: ``msg`` and ``args`` stay as logged, so
            # filters that know a logger's messages by their format string still find them
            # (`workers.signals.OutageLogFilter`), and a record no handler formats costs nothing
            record.getMessage = functools.partial(_redacted_message, record)  # type: ignore[method-assign]
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
