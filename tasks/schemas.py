"""Every payload that crosses Redis or lands in the job store, as pydantic models with a
``schema_version``.

A `JobRequest` names a model, a prompt and MCP servers by name; it never carries an API key
or a command line (unknown fields are rejected, metadata keys that look like secrets too).
Every field has a bound (`Bounds`, one place; the README's table lists them): a request over
one is refused when it is made, with an error naming the field and the bound, never the
value, and so is one that does not serialise as strict UTF-8 JSON (a lone surrogate) or nests
deeper than `Bounds.JSON_DEPTH` — never a crash later, in the store or the broker.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datus.models.generation import CallOptions
from datus.models.redact import redact

__all__ = [
    "DATABASE_SERVER",
    "FINAL_STATUSES",
    "SCHEMA_VERSION",
    "Bounds",
    "CallerToolSpec",
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


class Bounds:
    """The bound of every field of a `JobRequest`, in one place (documented in README.md,
    "Bounds of a request"). Sizes of text are UTF-8 bytes; ids are characters (the store's
    columns hold 255). ``DQ_MAX_PROMPT_BYTES`` lowers `PROMPT_BYTES` at submit
    (`JobRequest.check_submit`); this module's value is the ceiling every worker accepts."""

    ID_CHARS = 255            # model, batch_id, item_id, tool_choice (the store's String(255) columns)
    IDEMPOTENCY_KEY_CHARS = 200
    PROMPT_BYTES = 4_000_000  # prompt, instruction, messages (serialised), each; ~1M tokens
    MESSAGES = 10_000         # entries of messages
    JSON_DEPTH = 32           # nesting of messages and output_schema (a message is 2 deep)
    OUTPUT_SCHEMA_BYTES = 100_000
    MCP_SERVERS = 32
    DATABASE_CHARS = 2000
    METADATA_KEYS = 64
    METADATA_KEY_CHARS = 128
    METADATA_VALUE_CHARS = 1000
    INT = 2**63 - 1           # seed and metadata integers: a signed 64-bit integer
    MAX_TOKENS = 10_000_000   # max_tokens and thinking_budget
    STOP = 16                 # stop sequences, each at most STOP_CHARS
    STOP_CHARS = 1000
    TIMEOUT_S = 86_400.0      # timeout_s: finite, a day at most
    DEADLINE_DAYS = 30        # deadline: not in the past, at most this far ahead (at submit)
    MAX_TURNS = 100
    CALLER_TOOLS = 64         # caller_tools: declarations of the caller's own tools (run in the caller)
    CALLER_TOOL_DESCRIPTION_CHARS = 10_000
    CALLER_TOOL_SCHEMA_BYTES = 100_000  # each tool's parameters (a JSON schema), as JSON


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _json_depth(value: Any) -> int:
    """Nesting depth of lists and dicts, without recursion (so a million levels is an answer too)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, (list, tuple)):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > Bounds.JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in items)
    return deepest


def _strict_json_bytes(value: Any) -> int:
    """The size of ``value`` as strict UTF-8 JSON; ValueError if it is not that."""
    try:
        return len(json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("holds text that is not valid Unicode (a lone surrogate); send UTF-8") from None
    except (TypeError, ValueError, RecursionError):
        raise ValueError("is not plain JSON (finite numbers, string keys)") from None


_J = TypeVar("_J")


def _bounded_json(value: _J, max_bytes: int) -> _J:
    """``value`` (None passes) if it nests at most `Bounds.JSON_DEPTH` levels (checked first: a
    deep value would make the size check recurse) and is at most ``max_bytes`` of strict JSON."""
    if value is None:
        return value
    if _json_depth(value) > Bounds.JSON_DEPTH:
        raise ValueError(f"nests deeper than {Bounds.JSON_DEPTH} levels")
    if _strict_json_bytes(value) > max_bytes:
        raise ValueError(f"at most {max_bytes} bytes as JSON")
    return value


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
    # the model layer's fields, bounded (`Bounds`): a request that cannot be a provider's is refused at submit
    max_tokens: int | None = Field(default=None, gt=0, le=Bounds.MAX_TOKENS)
    thinking_budget: int | None = Field(default=None, gt=0, le=Bounds.MAX_TOKENS)
    stop: list[str] | None = Field(default=None, max_length=Bounds.STOP)
    seed: int | None = Field(default=None, ge=-Bounds.INT, le=Bounds.INT)
    timeout_s: float | None = Field(default=None, gt=0, le=Bounds.TIMEOUT_S, allow_inf_nan=False,
                                    description="finite: a job always has a deadline per attempt")
    tool_choice: str | None = Field(default=None, max_length=Bounds.ID_CHARS,
                                    description="auto | none | required | a tool name")

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: list[str] | None) -> list[str] | None:
        if stop and any(len(item) > Bounds.STOP_CHARS for item in stop):
            raise ValueError(f"a stop sequence has at most {Bounds.STOP_CHARS} characters")
        return stop


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what every provider accepts as a function's name


class CallerToolSpec(BaseModel):
    """A tool the caller runs itself (a Python function, an openai-agents ``FunctionTool``),
    declared to the model next to the workers' MCP tools: its name, description and the JSON
    schema of its arguments. The worker hands each call of it back to the caller
    (`tasks.caller_tools`)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(description="letters, digits, _ and -, at most 64 characters")
    description: str = Field(default="", max_length=Bounds.CALLER_TOOL_DESCRIPTION_CHARS)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description="the JSON schema of the tool's arguments (an object)")

    @field_validator("name")
    @classmethod
    def _tool_name(cls, name: str) -> str:
        if not _TOOL_NAME.match(name):
            raise ValueError("a caller tool's name has 1-64 letters, digits, _ or -")
        return name

    @field_validator("parameters")
    @classmethod
    def _schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        _bounded_json(schema, Bounds.CALLER_TOOL_SCHEMA_BYTES)
        if schema.get("type", "object") != "object":
            raise ValueError("a caller tool's parameters are a JSON schema of type 'object'")
        return schema


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)  # errors never echo a prompt or a URL

    schema_version: int = SCHEMA_VERSION
    kind: JobKind = JobKind.GENERATE
    model: str = Field(min_length=1, max_length=Bounds.ID_CHARS,
                       description="a model name from agent.yml, or provider:model")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(default=None, max_length=Bounds.MESSAGES)
    instruction: str = ""
    options: JobOptions = Field(default_factory=JobOptions)
    mcp_servers: list[str] = Field(default_factory=list, max_length=Bounds.MCP_SERVERS,
                                   description="names from agent.mcp_servers")
    database: str | None = Field(
        default=None, max_length=Bounds.DATABASE_CHARS,
        description="tool runs: a database the operator configured (agent.namespace in agent.yml, DQ_DATABASES), "
                    "by name or by its URL, that the worker opens with the shipped read-only SQL tools (server "
                    "'sql'); no password in it (tasks/databases.py)")
    output_schema: dict[str, Any] | None = Field(default=None, description="JSON schema of the answer")
    max_turns: int = Field(default=10, ge=1, le=Bounds.MAX_TURNS)
    session_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]{1,200}$",
        description="a session's id: letters, digits, _ . - (datus.models.session_store.SESSION_ID_PATTERN)")
    stream: bool = Field(default=True, description="publish text deltas as events, not only whole steps")
    idempotency_key: str | None = Field(default=None, max_length=Bounds.IDEMPOTENCY_KEY_CHARS)
    batch_id: str | None = Field(default=None, max_length=Bounds.ID_CHARS)
    item_id: str | None = Field(default=None, max_length=Bounds.ID_CHARS)
    deadline: datetime | None = Field(
        default=None, description="timezone-aware: rate-limit waits end here instead of after the workers' "
                                  "DQ_RATE_LIMIT_MAX_WAIT_S, and the job fails rather than start a request after it")
    db_type: str = Field(default="datus_sql", max_length=64,
                         description="which SQL tool table to extract SQL contexts with")
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=Bounds.METADATA_KEYS)
    caller_tools: list[CallerToolSpec] | None = Field(
        default=None, max_length=Bounds.CALLER_TOOLS, exclude_if=lambda value: value is None,
        description="tool runs: the caller's own tools, declared (name, description, JSON schema); the model may "
                    "call them next to the MCP tools, and each call is handed back to the caller, who runs it and "
                    "sends the result (JobClient.send_tool_result; tasks/caller_tools.py)")

    @model_validator(mode="before")
    @classmethod
    def _not_too_deep(cls, data: Any) -> Any:
        """Depth first, before any field is looked at: validating (or naming in an error) a value
        nested thousands deep recurses until Python gives up."""
        if isinstance(data, dict):
            for key, value in data.items():
                if _json_depth(value) > Bounds.JSON_DEPTH:
                    name = key if isinstance(key, str) and _NAME.match(key) else "a field"
                    raise ValueError(f"{name} nests deeper than {Bounds.JSON_DEPTH} levels")
        return data

    @field_validator("prompt", "instruction")
    @classmethod
    def _text_size(cls, text: str | None, info: Any) -> str | None:
        if text is not None and _utf8_bytes(text) > Bounds.PROMPT_BYTES:
            raise ValueError(f"at most {Bounds.PROMPT_BYTES} bytes (UTF-8)")
        return text

    @field_validator("messages")
    @classmethod
    def _messages_size(cls, messages: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return _bounded_json(messages, Bounds.PROMPT_BYTES)

    @field_validator("output_schema")
    @classmethod
    def _schema_size(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return _bounded_json(schema, Bounds.OUTPUT_SCHEMA_BYTES)

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
        if "://" not in url and _NAME.match(url):
            return url  # a name the operator configured: checked at submit and on the worker (tasks/databases.py)
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError("database is neither a configured database's name nor a SQLAlchemy URL "
                             "(dialect+driver://user@host/db)") from None
        if parsed.password:
            raise ValueError("database URL carries a password, which would travel in every task message: "
                             "name a database the operator configured with its password as ${VAR} (agent.namespace, "
                             "DQ_DATABASES), or configure an MCP server for it in agent.mcp_servers and name it in "
                             "mcp_servers / --tools, or let the workers' libpq find it (PGPASSWORD, ~/.pgpass)")
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
        if any(len(key) > Bounds.METADATA_KEY_CHARS for key in metadata):
            raise ValueError(f"a metadata key has at most {Bounds.METADATA_KEY_CHARS} characters")
        try:  # before a key is named in an error below (pydantic cannot carry a lone surrogate in a message)
            _strict_json_bytes(list(metadata))
        except ValueError as exc:
            raise ValueError(f"a key {exc}") from None
        for value in metadata.values():
            if isinstance(value, str) and len(value) > Bounds.METADATA_VALUE_CHARS:
                raise ValueError(f"a metadata value has at most {Bounds.METADATA_VALUE_CHARS} characters")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > Bounds.INT:
                raise ValueError("a metadata integer fits in 64 bits")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("a metadata number is finite")
        bad = [key for key in metadata if _SECRETISH.search(key)]
        if bad:
            raise ValueError(f"metadata must not carry secrets; remove {', '.join(bad)}")  # keys: bounded, UTF-8
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
        if self.caller_tools is not None:
            if self.kind is not JobKind.TOOL_RUN:
                raise ValueError("caller_tools only apply to kind 'tool_run'")
            names = [tool.name for tool in self.caller_tools]
            if len(names) != len(set(names)):
                raise ValueError("caller_tools: each tool has a name of its own")
        if self.output_schema is not None and self.kind is JobKind.GENERATE:
            raise ValueError("output_schema applies to kind 'json' or 'tool_run'")
        # what the store and the broker will do with it: strict UTF-8 JSON, or a refusal naming the field
        for name in type(self).model_fields:  # the values as given: model_dump(mode="json") would mend a surrogate key
            value = getattr(self, name)
            if name == "caller_tools" and value is not None:
                value = [tool.model_dump() for tool in value]
            try:
                _strict_json_bytes(value.model_dump() if isinstance(value, BaseModel) else
                                   value.isoformat() if isinstance(value, datetime) else value)
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None
        return self

    def check_submit(self, now: datetime | None = None, max_prompt_bytes: int | None = None) -> None:
        """What only holds when a job is made (a queued job keeps its request as it was): a
        ``deadline`` in the future, at most `Bounds.DEADLINE_DAYS` ahead, and the prompt within
        the operator's ``DQ_MAX_PROMPT_BYTES``. ValueError naming the field and the bound."""
        now = now or datetime.now(UTC)
        if self.deadline is not None:
            if self.deadline <= now:
                raise ValueError("deadline: is in the past; give a time after now (timezone-aware)")
            if (self.deadline - now).total_seconds() > Bounds.DEADLINE_DAYS * 86_400:
                raise ValueError(f"deadline: at most {Bounds.DEADLINE_DAYS} days ahead")
        if max_prompt_bytes is not None and max_prompt_bytes < Bounds.PROMPT_BYTES:
            sizes = {"prompt": _utf8_bytes(self.prompt) if self.prompt is not None else 0,
                     "instruction": _utf8_bytes(self.instruction),
                     "messages": _strict_json_bytes(self.messages) if self.messages is not None else 0}
            for name, size in sizes.items():
                if size > max_prompt_bytes:
                    raise ValueError(f"{name}: at most {max_prompt_bytes} bytes (UTF-8; DQ_MAX_PROMPT_BYTES)")


class JobError(BaseModel):
    code: str
    type: str
    message: str  # masked (`datus.models.redact`): it goes to the store, the events, logs and dq status
    provider: str | None = None
    status_code: int | None = None
    retryable: bool = False

    @field_validator("message")
    @classmethod
    def _masked(cls, value: str) -> str:
        return redact(value)


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
    """The one argument (besides the job id) of ``dq.generate`` and ``dq.tool_run``: what
    routing and operators need, nothing private. The request itself is read from the job's
    row (the store is the truth); ``request`` is what messages of the previous format carried —
    accepted, never used."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)  # errors never echo a prompt or a URL

    schema_version: int = SCHEMA_VERSION
    provider: str
    kind: str | None = None
    model: str | None = None
    request: dict[str, Any] | None = None  # the previous format's full request: ignored
