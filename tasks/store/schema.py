"""The job store's engine, tables and numbered migrations.

``create_store_engine(url)``: SQLite in WAL mode with a busy timeout (writers take the write
lock up front with ``BEGIN IMMEDIATE``), or Postgres with ``pool_pre_ping`` at READ COMMITTED.

``migrate(engine)`` brings a database to `SCHEMA_VERSION`: it applies, in one transaction,
every migration whose number is not yet in ``schema_version``. Several processes may start at
once against a fresh database: each takes a lock first (Postgres: a transaction-level advisory
lock keyed on the current schema; SQLite: ``BEGIN IMMEDIATE``, the database write lock), so
exactly one of them creates the tables and the others find them made.

The `Table` objects below describe the latest schema and are what the store queries. A
migration that changes a table must therefore not rely on them for older steps: ``_v1`` holds
its own frozen copy of the first schema. A later migration adds to the live tables and
brings an existing database there with ``add_columns`` (or creates a new table, or renames a
column: ``_v5``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    select,
    text,
)

from datus.models.redact import redact
from datus.models.sql_engines import create_store_engine as _create_engine
from datus.models.sql_engines import with_driver

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "WRITE_OPTION",
    "Migration",
    "SchemaTooNewError",
    "StoreError",
    "add_columns",
    "batch_items",
    "batches",
    "create_store_engine",
    "dead_letters",
    "job_checkpoints",
    "jobs",
    "metadata",
    "migrate",
    "provider_batch_items",
    "provider_batches",
    "schedule_runs",
    "schema_version",
]

# execution option: this transaction writes (on SQLite the store then emits BEGIN IMMEDIATE)
WRITE_OPTION = "dq_store_write"

_Json = JSON(none_as_null=True)  # Python None is SQL NULL, not the JSON text 'null'
_Time = DateTime(timezone=True)  # always written as UTC; SQLite hands it back naive

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    Column("job_id", String(255), primary_key=True),
    Column("idempotency_key", String(255), nullable=True, unique=True),  # NULLs never collide
    Column("kind", String(16), nullable=False),
    Column("model", String(255), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("request", _Json, nullable=False),  # the JobRequest, which holds no secret by construction
    Column("output", _Json),
    Column("sql_contexts", _Json),
    Column("usage", _Json),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Column("error", _Json),
    # the current run's number (migration 5 renamed it from attempts): each start of the job from a
    # message is a run, limiter-only waits included; attempts = runs - rate_limit_waits - caller_waits
    Column("runs", Integer, nullable=False, default=0),
    Column("deliveries", Integer, nullable=False, default=0),  # starts of the current run
    Column("retry_at", _Time),  # when the pending retry is due
    Column("batch_id", String(255)),
    Column("item_id", String(255)),
    Column("created_at", _Time, nullable=False),
    Column("started_at", _Time),  # the first start: queue time is honest even after retries
    Column("finished_at", _Time),
    Column("updated_at", _Time, nullable=False),
    # migration 2 (provider limits): retries after rate-limit answers (they spend a time budget,
    # not max_retries), and retries that only waited for the limiter (no request: not attempts)
    Column("rate_limit_retries", Integer, server_default=text("0")),
    Column("rate_limit_waits", Integer, server_default=text("0")),
    Column("rate_limited_since", _Time),  # the first rate-limit answer or cooldown: the wait budget's start
    Column("rate_ticket", BigInteger),  # the job's place in its limiter's line (µs of Redis time)
    # migration 6: runs that only waited for the caller's own tools (no request: not attempts)
    Column("caller_waits", Integer, server_default=text("0")),
    # migration 3: the sweeper's bookkeeping
    Column("lease_until", _Time),  # running: the worker renews it; past it the job counts as abandoned
    Column("resends", Integer, nullable=False, default=0, server_default=text("0")),  # by the sweeper
    Column("replays", Integer, nullable=False, default=0, server_default=text("0")),  # dq dead replay
    Column("replayed_at", _Time),
    Index("ix_jobs_batch_id", "batch_id"),
    Index("ix_jobs_status", "status"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_status_updated_at", "status", "updated_at"),  # the sweeper's scan of open jobs
    Index("ix_jobs_finished_at", "finished_at"),  # pruning
)

batches = Table(
    "batches", metadata,
    Column("batch_id", String(255), primary_key=True),
    Column("name", String(255)),
    Column("model", String(255), nullable=False),
    Column("prompt_hash", String(128), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("total", Integer, nullable=False, default=0),
    Column("created_at", _Time, nullable=False),
    Column("finished_at", _Time),
    Column("metadata", _Json),
)

batch_items = Table(
    "batch_items", metadata,
    # a surrogate key in insertion order: chunked iteration pages on it and keeps input order
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("batch_id", String(255), ForeignKey("batches.batch_id", ondelete="CASCADE"), nullable=False),
    Column("item_id", String(255), nullable=False),
    Column("job_id", String(255)),
    Column("status", String(16), nullable=False),
    Column("question", Text, nullable=False),
    Column("result", _Json),  # the scored result the batch runner writes
    Column("cost_usd", Float, nullable=False, default=0.0),
    UniqueConstraint("batch_id", "item_id", name="uq_batch_items_batch_item"),
    Index("ix_batch_items_batch_seq", "batch_id", "seq"),
)

job_checkpoints = Table(
    # a tool run's journal, in order: its completed steps (datus.models.run_journal.RunStep as
    # JSON) and the starts of its model requests and tool calls (tasks.checkpoints.StartRow):
    # what a new delivery of the job resumes from
    "job_checkpoints", metadata,
    Column("job_id", String(255), nullable=False),
    Column("position", Integer, nullable=False, autoincrement=False),  # 0-based, the row's place in the run
    Column("kind", String(16), nullable=False),  # turn | tool | start
    Column("run", Integer, nullable=False),  # the job's run that recorded it (migration 5: was attempt)
    Column("step", _Json, nullable=False),
    Column("created_at", _Time, nullable=False),
    # two deliveries of one job recording the same step: the second insert fails, not interleaves
    PrimaryKeyConstraint("job_id", "position", name="pk_job_checkpoints"),
)

dead_letters = Table(
    "dead_letters", metadata,
    # the job id for a job (or for a message that named one); "m-..." for a message with no id
    Column("dead_id", String(255), primary_key=True),
    Column("job_id", String(255)),
    Column("reason", Text, nullable=False),
    Column("queue", String(255)),
    Column("times", Integer, nullable=False, default=1),  # how often this id was dead-lettered
    Column("first_at", _Time, nullable=False),
    Column("at", _Time, nullable=False),
    Index("ix_dead_letters_at", "at"),
)

schedule_runs = Table(
    "schedule_runs", metadata,
    # one row per (schedule, slot): the insert is the claim that makes a slot run once
    Column("schedule", String(255), primary_key=True),
    Column("slot", _Time, primary_key=True),
    Column("batch_id", String(255)),
    Column("status", String(16), nullable=False),  # running, completed, failed
    Column("exit_code", Integer),
    Column("results", Text),  # the results file (JSON lines) and the log, on the worker's disk
    Column("log", Text),
    Column("started_at", _Time, nullable=False),
    Column("finished_at", _Time),
)

provider_batches = Table(
    # migration 7: one row per provider batch (OpenAI batch, Anthropic message batch) a `dq batch
    # --via batch-api` run made or is making: what --resume, dq status and dq cancel find again
    "provider_batches", metadata,
    Column("part_id", String(255), primary_key=True),  # <batch>:<round>:<n>, ours, made before any upload
    Column("batch_id", String(255), ForeignKey("batches.batch_id", ondelete="CASCADE"), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("round", Integer, nullable=False),  # 1: the first submission; 2, 3...: retries of failed items
    Column("state", String(16), nullable=False),  # tasks.batch.provider_batches.PartState
    Column("provider_batch_id", String(255)),
    Column("input_file_id", String(255)),
    Column("output_file_id", String(255)),
    Column("error_file_id", String(255)),
    Column("provider_status", String(32)),  # as the provider spells it
    Column("request_counts", _Json),
    Column("items", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("error", Text),
    Column("created_at", _Time, nullable=False),
    Column("updated_at", _Time, nullable=False),
    Index("ix_provider_batches_batch_id", "batch_id"),
)

provider_batch_items = Table(
    # migration 7: which batch item each custom_id of a provider batch stands for
    "provider_batch_items", metadata,
    Column("batch_id", String(255), ForeignKey("batches.batch_id", ondelete="CASCADE"), nullable=False),
    Column("custom_id", String(64), nullable=False),
    Column("item_id", String(255), nullable=False),
    Column("part_id", String(255), nullable=False),
    Column("state", String(16), nullable=False),  # pending | succeeded | failed (then retried in a new row)
    PrimaryKeyConstraint("batch_id", "custom_id", name="pk_provider_batch_items"),
    Index("ix_provider_batch_items_part", "part_id"),
)

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(255), nullable=False),
    Column("applied_at", _Time, nullable=False),
)


class StoreError(RuntimeError):
    """The job store cannot be used (bad URL, missing driver, unreachable database)."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer release than this one."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    """The first schema, frozen: the tables as they were when migration 1 was written (later
    migrations change the live `Table` objects above, never this)."""
    frozen = MetaData()
    Table(
        "jobs", frozen,
        Column("job_id", String(255), primary_key=True),
        Column("idempotency_key", String(255), nullable=True, unique=True),
        Column("kind", String(16), nullable=False),
        Column("model", String(255), nullable=False),
        Column("provider", String(64), nullable=False),
        Column("status", String(16), nullable=False),
        Column("request", _Json, nullable=False),
        Column("output", _Json),
        Column("sql_contexts", _Json),
        Column("usage", _Json),
        Column("cost_usd", Float, nullable=False, default=0.0),
        Column("error", _Json),
        Column("attempts", Integer, nullable=False, default=0),
        Column("deliveries", Integer, nullable=False, default=0),
        Column("retry_at", _Time),
        Column("batch_id", String(255)),
        Column("item_id", String(255)),
        Column("created_at", _Time, nullable=False),
        Column("started_at", _Time),
        Column("finished_at", _Time),
        Column("updated_at", _Time, nullable=False),
        Index("ix_jobs_batch_id", "batch_id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_created_at", "created_at"),
    )
    Table(
        "batches", frozen,
        Column("batch_id", String(255), primary_key=True),
        Column("name", String(255)),
        Column("model", String(255), nullable=False),
        Column("prompt_hash", String(128), nullable=False),
        Column("mode", String(16), nullable=False),
        Column("status", String(32), nullable=False),
        Column("total", Integer, nullable=False, default=0),
        Column("created_at", _Time, nullable=False),
        Column("finished_at", _Time),
        Column("metadata", _Json),
    )
    Table(
        "batch_items", frozen,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("batch_id", String(255), ForeignKey("batches.batch_id", ondelete="CASCADE"), nullable=False),
        Column("item_id", String(255), nullable=False),
        Column("job_id", String(255)),
        Column("status", String(16), nullable=False),
        Column("question", Text, nullable=False),
        Column("result", _Json),
        Column("cost_usd", Float, nullable=False, default=0.0),
        UniqueConstraint("batch_id", "item_id", name="uq_batch_items_batch_item"),
        Index("ix_batch_items_batch_seq", "batch_id", "seq"),
    )
    frozen.create_all(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    """Checkpoints of tool runs (frozen as written, like ``_v1``)."""
    frozen = MetaData()
    Table(
        "job_checkpoints", frozen,
        Column("job_id", String(255), nullable=False),
        Column("position", Integer, nullable=False, autoincrement=False),
        Column("kind", String(16), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("step", _Json, nullable=False),
        Column("created_at", _Time, nullable=False),
        PrimaryKeyConstraint("job_id", "position", name="pk_job_checkpoints"),
    )
    frozen.create_all(conn, checkfirst=True)


def _v5(conn: Connection) -> None:
    """One name per count: the run number is ``runs`` in ``jobs`` and ``run`` in
    ``job_checkpoints`` (both were named after attempts, which exclude the limiter's waits).
    ``RENAME COLUMN``: Postgres, SQLite 3.25 and later."""
    conn.execute(text("ALTER TABLE jobs RENAME COLUMN attempts TO runs"))
    conn.execute(text("ALTER TABLE job_checkpoints RENAME COLUMN attempt TO run"))


def add_columns(conn: Connection, table: Table, *names: str) -> None:
    """``ALTER TABLE … ADD COLUMN`` for columns of the live ``table`` (a migration's step):
    nullable or with a server default, as ADD COLUMN requires on a table with rows."""
    for name in names:
        column = table.c[name]
        ddl = column.type.compile(dialect=conn.dialect)
        default = f" DEFAULT {column.server_default.arg}" if column.server_default is not None else ""
        conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {name} {ddl}{default}'))


def _v2(conn: Connection) -> None:
    add_columns(conn, jobs, "rate_limit_retries", "rate_limit_waits", "rate_limited_since", "rate_ticket")


def _v6(conn: Connection) -> None:
    add_columns(conn, jobs, "caller_waits")


def _v3(conn: Connection) -> None:
    """The scheduler's columns and tables: job leases, re-send and replay counts, dead letters
    in the store, and the claims that run each scheduled batch slot once. New tables are frozen
    here, as in ``_v1``."""
    add_columns(conn, jobs, "lease_until", "resends", "replays", "replayed_at")
    for index in jobs.indexes:
        if index.name in ("ix_jobs_status_updated_at", "ix_jobs_finished_at"):
            index.create(conn, checkfirst=True)
    frozen = MetaData()
    Table(
        "dead_letters", frozen,
        Column("dead_id", String(255), primary_key=True),
        Column("job_id", String(255)),
        Column("reason", Text, nullable=False),
        Column("queue", String(255)),
        Column("times", Integer, nullable=False, default=1),
        Column("first_at", _Time, nullable=False),
        Column("at", _Time, nullable=False),
        Index("ix_dead_letters_at", "at"),
    )
    Table(
        "schedule_runs", frozen,
        Column("schedule", String(255), primary_key=True),
        Column("slot", _Time, primary_key=True),
        Column("batch_id", String(255)),
        Column("status", String(16), nullable=False),
        Column("exit_code", Integer),
        Column("results", Text),
        Column("log", Text),
        Column("started_at", _Time, nullable=False),
        Column("finished_at", _Time),
    )
    frozen.create_all(conn, checkfirst=True)


def _v7(conn: Connection) -> None:
    """Provider batches (``dq batch --via batch-api``) and their items' custom_ids: the live
    tables, as this is the migration that made them (a later change must freeze them here)."""
    provider_batches.create(conn, checkfirst=True)
    provider_batch_items.create(conn, checkfirst=True)


# numbers are the issues' order of work (a database may get 2 after 3 and 4: each only adds)
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs, batches, batch_items", _v1),
    Migration(2, "jobs: rate-limit retries and waits, since when, ticket", _v2),
    Migration(3, "job leases, re-sends and replays; dead_letters; schedule_runs", _v3),
    Migration(4, "job_checkpoints: the steps of tool runs, to resume from", _v4),
    Migration(5, "jobs.attempts -> runs, job_checkpoints.attempt -> run: the run number", _v5),
    Migration(6, "jobs.caller_waits: runs that only waited for the caller's own tools", _v6),
    Migration(7, "provider_batches, provider_batch_items: dq batch --via batch-api", _v7),
)
SCHEMA_VERSION = max(migration.version for migration in MIGRATIONS)


def migrate(engine: Engine) -> int:
    """Apply the missing migrations; returns the database's schema version. Idempotent, and
    safe when several processes call it at once."""
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            # serialises migrators of this schema until commit; before any CREATE, since two
            # concurrent CREATE TABLE IF NOT EXISTS can still collide on pg_type
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('datus-queue store:' || current_schema()))"))
        schema_version.create(conn, checkfirst=True)
        applied = set(conn.execute(select(schema_version.c.version)).scalars())
        newest = max(applied, default=0)
        if newest > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"the job store is at schema version {newest}, newer than this datus-queue knows "
                f"({SCHEMA_VERSION}); upgrade datus-queue")
        for migration in sorted(MIGRATIONS, key=lambda m: m.version):
            if migration.version not in applied:
                migration.apply(conn)
                conn.execute(insert(schema_version).values(
                    version=migration.version, description=migration.description,
                    applied_at=datetime.now(UTC)))
        return conn.execute(select(func.max(schema_version.c.version))).scalar_one()


def create_store_engine(url: str, busy_timeout_s: float = 30.0) -> Engine:
    """An engine for the store at ``url``, configured for many concurrent writers."""
    try:
        if with_driver(url).get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("the job store runs on SQLite or Postgres")  # it relies on ON CONFLICT
        return _create_engine(url, busy_timeout_s=busy_timeout_s, write_option=WRITE_OPTION)
    except Exception as exc:  # ArgumentError, NoSuchModuleError, ImportError, OSError, ValueError
        raise StoreError(f"cannot use job store {redact(url)!r}: {exc} (set DQ_DATABASE_URL)") from exc

