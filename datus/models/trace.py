"""``save_llm_trace``: one JSON file per call, never overwriting another call's file."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["default_trace_dir", "write_node_trace", "write_trace"]

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


def write_node_trace(workflow: Any, node: Any, messages: list[dict[str, Any]], output: str,
                     reasoning: Any = None) -> Path | None:
    """Datus-agent's trajectory trace of a workflow node (``set_context`` and
    ``save_llm_trace``): ``{trajectory_dir}/{task id}/{node id}.yml`` with ``system_prompt``,
    ``user_prompt``, ``reason_content`` and ``output_content``, the last call of the node
    winning, as Datus's own model layer writes it."""
    import yaml

    try:
        directory = Path(workflow.global_config.trajectory_dir) / str(workflow.task.id)
        path = directory / f"{node.id}.yml"
    except AttributeError as exc:  # a context without the attributes Datus's workflows have
        logger.debug("no trajectory trace: %s", exc)
        return None
    said = {"system": [], "user": []}
    for message in messages:
        if message.get("role") in said and isinstance(message.get("content"), str):
            said[message["role"]].append(message["content"])
    record = {"system_prompt": "\n".join(said["system"]), "user_prompt": "\n".join(said["user"]),
              "reason_content": reasoning or "", "output_content": output or ""}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            yaml.safe_dump(record, handle, allow_unicode=True, sort_keys=False, default_flow_style=False)
    except OSError as exc:
        logger.warning("could not write LLM trace to %s: %s", path, exc)
        return None
    return path
