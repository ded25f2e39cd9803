"""``save_llm_trace``: one JSON file per call, never overwriting another call's file."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["default_trace_dir", "write_trace"]

logger = logging.getLogger(__name__)


def default_trace_dir() -> Path:
    return Path.home() / ".datus" / "traces"


def write_trace(directory: str | None, provider: str, record: dict[str, Any]) -> Path | None:
    """Write ``record`` (which must hold no secret) under ``directory/provider/``; the name is
    a UTC timestamp plus a random suffix and the file is opened with ``x``, so concurrent
    calls never share a file. Failing to write a trace never fails the call."""
    base = Path(directory).expanduser() if directory else default_trace_dir()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = base / provider / f"{stamp}-{uuid.uuid4().hex[:12]}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as handle:
            json.dump(record, handle, ensure_ascii=False, indent=2, default=str)
    except OSError as exc:
        logger.warning("could not write LLM trace to %s: %s", path, exc)
        return None
    return path
