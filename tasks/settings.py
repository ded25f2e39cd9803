"""Infrastructure settings, from the environment (prefix ``DQ_``). Models live in agent.yml."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


def _default_database_url() -> str:
    return f"sqlite:///{Path.home() / '.datus' / 'jobs.db'}"


def _default_schedule_dir() -> str:
    return str(Path.home() / ".datus" / "schedules")


class Settings(BaseSettings):
    # the namespaces newer pydantic-settings protect; 2.6's default ("model_") warns on every `dq` about model_cache_size
    model_config = SettingsConfigDict(env_prefix="DQ_", extra="ignore",
                                      protected_namespaces=("model_validate", "model_dump", "settings_customise_sources"))

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="broker, results and events: redis://, "
                           "rediss:// (TLS, certificate verified) or sentinel://h:26379;sentinel://h2:26379/0"
                           "?master_name=NAME (tasks/redis_connect.py); Redis Cluster is not supported")
    # TLS of rediss:// (and sentinel://...?ssl=true); the URL's ssl_* query options win over these
    redis_ca_certs: str | None = Field(default=None, description="CA file (PEM) that signs the Redis server's "
                                                                 "certificate (default: the system CA bundle)")
    redis_certfile: str | None = Field(default=None, description="client certificate (PEM) for Redis TLS")
    redis_keyfile: str | None = Field(default=None, description="the client certificate's key (PEM)")
    database_url: str = Field(default_factory=_default_database_url, description="the job store; Postgres in production")
    config: str | None = Field(default=None, description="path of agent.yml (default conf/agent.yml if present)")
    databases: dict[str, str] = Field(
        default_factory=dict, description="databases tool runs may open, as JSON {name: SQLAlchemy URL} (values may "
                                          "hold ${VAR}); besides agent.namespace in agent.yml (tasks/databases.py)")
    visibility_timeout_s: int = Field(default=3600, gt=0,
                                      description="longer than the longest call plus the longest retry countdown")
    event_ttl_s: int = Field(default=86_400, gt=0, description="how long a job's event stream is kept")
    event_maxlen: int = Field(default=10_000, gt=0, description="cap of a job's event stream")
    # output bounds (issue 19): what a run hands on is capped, and the cut is marked
    max_event_bytes: int = Field(
        default=262_144, ge=4096, description="the largest event (UTF-8 JSON) published to a job's stream and "
                                              "channel; a bigger one goes out with its long fields cut and "
                                              "'truncated': true (in the step and its output)")
    max_checkpoint_bytes: int = Field(
        default=1_048_576, ge=4096, description="the largest checkpoint row (UTF-8 JSON, besides the conversation "
                                                "the run began with, bounded by max_prompt_bytes); a bigger one is "
                                                "stored with its long fields cut, the tool result the model read "
                                                "kept whole")
    max_tool_result_chars: int | None = Field(
        default=None, gt=0, description="caps a tool's answer (characters) on its way into the model's context "
                                        "for every job, below the model config's max_tool_result_chars "
                                        "(default 65,536); unset: the model config's")
    # the caller's own tools (tasks/caller_tools.py): a live caller's tool may take this long; a
    # dead caller is noticed within about the liveness window
    caller_tool_timeout_s: float = Field(
        default=300.0, gt=0, description="how long a call of one of the caller's own tools (caller_tools) may take, "
                                         "from the request to the answer, while the caller is alive; then the job "
                                         "fails with 'caller_tool_timeout' (tasks/caller_tools.py)")
    caller_liveness_s: float = Field(
        default=30.0, gt=0, description="a caller that follows a job with caller_tools beats a heartbeat every sixth "
                                        "of this; a waiting job whose caller has not beaten for this long fails "
                                        "with 'caller_gone' (the caller died or lost Redis). Workers and callers "
                                        "should share it")
    dead_letter_threshold: int = Field(default=5, gt=0, description="deliveries (not retries) before dead-lettering")
    result_expires_s: int = Field(default=86_400, gt=0)
    worker_concurrency: int = Field(default=200, gt=0, description="jobs in flight per worker process")
    task_events: bool = Field(default=False, description="send Celery task events (for Flower)")
    redis_max_connections: int = Field(default=64, gt=0, description="async Redis connections per worker process")
    max_retry_countdown_s: float = Field(
        default=600.0, gt=0, description="longest retry countdown of a job (also capped to half the visibility "
                                         "timeout); a longer wait is split into several retries")
    model_cache_size: int = Field(default=32, gt=0, description="model objects a worker process keeps (LRU)")
    # provider limits shared by the fleet (tasks/ratelimit.py)
    rate_limiter: bool = Field(default=True, description="share provider limits and 429 cooldowns across workers "
                                                          "in Redis (off: every request goes straight out)")
    rate_limit_max_wait_s: float = Field(
        default=1800.0, gt=0, description="how long a job keeps retrying rate-limit and overload answers (and "
                                          "their cooldowns), from the first one; not counted against max_retries")
    rate_limit_short_wait_s: float = Field(
        default=1.0, ge=0, description="a limiter wait up to this long is awaited in the worker; a longer one "
                                       "sends the job back to the queue with a countdown")
    rate_limit_burst_s: float = Field(
        default=0.0, ge=0, description="how much of a per-minute limit may go out at once, in seconds of it; 0: one "
                                       "request at a time, evenly spaced (a burst is taken from the slack that keeps "
                                       "the fleet inside providers' 1 s windows: tasks/ratelimit_lua.py)")
    rate_limit_share: float = Field(
        default=0.985, gt=0, le=1, description="the share of each configured limit the fleet paces to; the rest "
                                               "absorbs the spread of the requests' delays on the way to the "
                                               "provider, which counts their arrivals over windows as short as 1 s")
    rate_limit_slot_lease_s: float = Field(
        default=30.0, gt=0, description="a max_concurrency slot of a worker that died frees itself after this")
    batch_priority: int = Field(
        default=6, ge=0, le=9, description="broker priority of batch jobs (0 is the highest, interactive jobs' "
                                           "own); 0 puts batches in the interactive queue and waiting line")
    # recovery (tasks/leases.py, tasks/maintenance/sweep_loop.py): a dead worker's jobs run again within
    # lease_s + 1.25 * sweep_interval_s (about 28 s by default), with or without dq beat
    lease_s: float = Field(
        default=15.0, gt=0, validation_alias=AliasChoices("DQ_LEASE_S", "DQ_QUEUED_LEASE_S", "lease_s"),
        description="a running job's lease: its worker renews it every third of this; a job whose worker has not "
                    "renewed it for this long (the worker died or stalled) is sent again by the next sweep "
                    "(DQ_QUEUED_LEASE_S, its old name, is read when DQ_LEASE_S is not set)")
    resend_after_s: float = Field(
        default=10.0, gt=0,
        description="a queued job this long after it was sent, or a retrying one this long past due, whose "
                    "message is in no queue and in no live worker's hands is sent again by the next sweep")
    sweep_interval_s: float = Field(
        default=10.0, gt=0, description="how often the fleet sweeps for jobs to send again: every worker offers, "
                                        "one sweeps per interval")
    job_retention_days: float = Field(default=30.0, gt=0, description="finished job rows older than this are pruned")
    prune_interval_s: float = Field(default=3600.0, gt=0, description="how often old rows and keys are pruned")
    beat_lock_timeout_s: float = Field(
        default=30.0, ge=1, description="a dq beat that stops renewing its lock hands over after this long")
    metrics_port: int | None = Field(default=None, ge=1, le=65535,
                                     description="a worker serves Prometheus /metrics on this port (dq worker --metrics-port)")
    metrics_addr: str = Field(default="0.0.0.0", description="the address a worker's /metrics listens on")
    otel_tracing: bool = Field(
        default=False, description="OpenTelemetry spans of jobs over OTLP/HTTP (OTEL_EXPORTER_OTLP_* variables); "
                                   "a client with it on puts its span's traceparent in each job message")
    schedule_dir: str = Field(default_factory=_default_schedule_dir,
                              description="where scheduled batches write their results and logs")
    max_prompt_bytes: int = Field(
        default=4_000_000, gt=0, le=4_000_000,
        description="the largest prompt, instruction or messages (UTF-8 bytes) a submit accepts; at most "
                    "tasks.schemas.Bounds.PROMPT_BYTES, which every worker accepts")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
