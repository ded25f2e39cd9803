"""Every payload that crosses Redis or lands in the job store, as pydantic models with a
``schema_version``.

A `JobRequest` names a model, a prompt and MCP servers by name; it never carries an API key
or a command line (unknown fields are rejected, metadata keys that look like secrets too).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datus.models.generation import CallOptions

__all__ = [
    "DATABASE_SERVER",
    "FINAL_STATUSES",
    "SCHEMA_VERSION",
    "JobError",
    "JobEvent",
    "JobKind",
    "JobOptions",
    "JobRequest",
    "JobResult",
    "JobStatus",
    "TaskPayload",
]

SCHEMA_VERSION = 1
DATABASE_SERVER = "sql"  # the name a tool run sees for the shipped SQL server opened on `JobRequest.database`
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SECRETISH = re.compile(r"(api[_-]?key|secret|token|password|passwd|authorization|credential)", re.IGNORECASE)


class JobKind(str, Enum):
    GENERATE = "generate"
    JSON = "json"
    TOOL_RUN = "tool_run"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"  # delivered too often: moved to the dead-letter list


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DEAD})


class JobOptions(CallOptions):
    """Generation settings of a job: the model layer's per-call options, minus the escape
    hatch (``extra_body`` could smuggle anything into a provider request)."""

    extra_body: None = Field(default=None, exclude=True)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)  # errors never echo a prompt or a URL

    schema_version: int = SCHEMA_VERSION
    kind: JobKind = JobKind.GENERATE
    model: str = Field(min_length=1, description="a model name from agent.yml, or provider:model")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    instruction: str = ""
    options: JobOptions = Field(default_factory=JobOptions)
    mcp_servers: list[str] = Field(default_factory=list, description="names from agent.mcp_servers")
    database: str | None = Field(
        default=None, max_length=2000,
        description="tool runs: a SQLAlchemy URL the worker opens with the shipped read-only SQL tools "
                    "(server 'sql'); no password in it — configure a server in agent.yml for that")
    output_schema: dict[str, Any] | None = Field(default=None, description="JSON schema of the answer")
    max_turns: int = Field(default=10, ge=1, le=100)
    session_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]{1,200}$",
        description="a session's id: letters, digits, _ . - (datus.models.session_store.SESSION_ID_PATTERN)")
    stream: bool = Field(default=True, description="publish text deltas as events, not only whole steps")
    idempotency_key: str | None = Field(default=None, max_length=200)
    batch_id: str | None = None
    item_id: str | None = None
    deadline: datetime | None = Field(
        default=None, description="timezone-aware: rate-limit waits end here instead of after the workers' "
                                  "DQ_RATE_LIMIT_MAX_WAIT_S, and the job fails rather than start a request after it")
    db_type: str = Field(default="datus_sql", description="which SQL tool table to extract SQL contexts with")
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("mcp_servers")
    @classmethod
    def _server_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _NAME.match(name):
                raise ValueError(f"mcp_servers holds names from agent.mcp_servers, not commands: {name!r}")
        return names

    @field_validator("database")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError(f"database is not a SQLAlchemy URL: {url[:80]!r}") from None
        if parsed.password:
            raise ValueError("database URL carries a password, which would travel in every task message: "
                             "configure an MCP server for it in agent.mcp_servers (password as ${VAR}) and "
                             "name it in mcp_servers / --tools, or let the workers' libpq find it (PGPASSWORD, "
                             "~/.pgpass)")
        return url

    @field_validator("deadline")
    @classmethod
    def _aware(cls, deadline: datetime | None) -> datetime | None:
        if deadline is not None and deadline.tzinfo is None:
            raise ValueError("deadline needs a timezone (e.g. 2026-01-31T18:00:00Z)")
        return deadline

    @field_validator("metadata")
    @classmethod
    def _no_secrets(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in metadata if _SECRETISH.search(key)]
        if bad:
            raise ValueError(f"metadata must not carry secrets; remove {', '.join(bad)}")
        return metadata

    @model_validator(mode="after")
    def _shape(self) -> JobRequest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported (this is {SCHEMA_VERSION})")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        if (self.mcp_servers or self.database) and self.kind is not JobKind.TOOL_RUN:
            raise ValueError("mcp_servers and database only apply to kind 'tool_run'")
        if self.database and DATABASE_SERVER in self.mcp_servers:
            raise ValueError(f"mcp_servers names {DATABASE_SERVER!r}, the name of the server for 'database'; "
                             "give one or the other")
        if self.output_schema is not None and self.kind is JobKind.GENERATE:
            raise ValueError("output_schema applies to kind 'json' or 'tool_run'")
        return self


class JobError(BaseModel):
    code: str
    type: str
    message: str
    provider: str | None = None
    status_code: int | None = None
    retryable: bool = False


class JobResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    job_id: str
    status: JobStatus
    kind: JobKind | None = None
    model: str | None = None
    provider: str | None = None
    output: Any = None
    sql_contexts: list[dict[str, Any]] = Field(default_factory=list)
    usage: dict[str, Any] | None = None
    cost_usd: float = 0.0
    error: JobError | None = None
    attempts: int = 0
    batch_id: str | None = None
    item_id: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def queue_ms(self) -> float | None:
        if self.created_at and self.started_at:
            return (self.started_at - self.created_at).total_seconds() * 1000.0
        return None

    @property
    def run_ms(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds() * 1000.0
        return None


class JobEvent(BaseModel):
    """One ActionHistory step of a job, numbered. ``terminal`` marks the job's last event."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    seq: int = Field(ge=1)
    step: dict[str, Any]
    terminal: bool = False
    status: JobStatus | None = None  # set on the terminal event


class TaskPayload(BaseModel):
    """The one argument (besides the job id) of ``dq.generate`` and ``dq.tool_run``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)  # errors never echo a prompt or a URL

    schema_version: int = SCHEMA_VERSION
    provider: str
    request: JobRequest
