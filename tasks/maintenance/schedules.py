"""Scheduled batches: ``schedules:`` in agent.yml, run by `dq beat` on their cron expression::

    agent:
      schedules:
        nightly-sql:
          cron: "0 2 * * *"             # minute hour day-of-month month day-of-week, in UTC
          input: questions.jsonl        # paths relative to the worker's working directory
          model: deepseek
          db: sqlite:///warehouse.db
          mode: generate                # or tool_run
          # tools: [warehouse]  dialect: sqlite  budget_usd: 5  max_in_flight: 200  prompt_template: file

At each slot the active beat sends ``dq.run_schedule(name, slot)``; a worker claims the slot in
the job store (one row per schedule and slot, `tasks.store.schedule_runs`) and, if the claim is
its, runs ``dq batch`` as a subprocess with ``--run-id <name>@<slot>`` — a batch of its own per
slot, resumable, and nothing runs twice even if the batch is started again. Results and the
batch's output go to ``DQ_SCHEDULE_DIR/<name>/<slot>.jsonl`` and ``.log``. The subprocess keeps
the batch off the worker's event loop and out of its memory; the maintenance task waits for it
in one of the worker's threads.

Nothing in a schedule or a message can reach outside: a schedule's name is a slug
(`SCHEDULE_NAME`, checked at config load and again at use), so its directory stays under
``DQ_SCHEDULE_DIR``; its input and other values cannot become options of ``dq batch`` (the input
goes as an absolute path, the values as ``--option=value``); and a ``dq.run_schedule`` message
runs only a slot that is due (`check_slot`: a real slot of the cron, not in the future, not
superseded by a later slot due more than `SLOT_GRACE_S` ago) — one forged with any other slot
is refused with a log line and an error result.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from datus.models.config import AgentConfig, ConfigError, substitute_env
from datus_queue.tasks.store import ScheduleRun

__all__ = ["SCHEDULE_NAME", "BatchSchedule", "SlotRefused", "check_slot", "latest_slot", "load_schedules",
           "run_schedule", "slot_label"]

logger = logging.getLogger("datus_queue.tasks.maintenance.schedules")
_SEARCH_DAYS = 366 * 8 + 1  # a cron expression that fires at all fires within 8 years (29 Feb on a Monday…)
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a directory name under DQ_SCHEDULE_DIR, never ..
SLOT_GRACE_S = 600.0  # a slot's message may arrive this long after the next slot fell due (queued behind a busy worker)
SLOT_CLOCK_SKEW_S = 60.0  # a slot this far ahead of this worker's clock is the beat's clock, not a forgery


class SlotRefused(ValueError):
    """A ``dq.run_schedule`` for a slot that is not due: not run."""


def _name_ok(name: str) -> bool:
    return isinstance(name, str) and SCHEDULE_NAME.match(name) is not None


class BatchSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    cron: str = Field(description="minute hour day-of-month month day-of-week, in UTC")
    input: str = Field(description="the questions (JSONL or CSV), as for dq batch")
    model: str
    db: str | None = None
    mode: Literal["generate", "tool_run"] = "generate"
    tools: list[str] | None = None
    dialect: str = "sqlite"
    budget_usd: float | None = Field(default=None, gt=0)
    max_in_flight: int = Field(default=200, ge=1)
    prompt_template: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _name_ok(value):
            raise ValueError("a schedule's name is letters, digits, _ . - (starting with a letter or digit, at most "
                             "64): it names a directory under DQ_SCHEDULE_DIR")
        return value

    @field_validator("input", "model", "db", "dialect", "prompt_template")
    @classmethod
    def _not_an_option(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("-"):
            raise ValueError("must not start with '-' (it would be read as an option of dq batch)")
        return value

    @field_validator("tools")
    @classmethod
    def _tools_not_options(cls, value: list[str] | None) -> list[str] | None:
        if value and any(tool.startswith("-") for tool in value):
            raise ValueError("must not start with '-' (it would be read as an option of dq batch)")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        try:
            parse_cron(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{value!r} is not a cron expression (minute hour day-of-month month day-of-week): "
                             f"{exc}") from None
        return value

    def crontab(self) -> crontab:
        return parse_cron(self.cron)

    def command(self, run_id: str, results: Path) -> list[str]:
        """``dq batch`` for one slot. Every value goes as ``--option=value`` and the input as an
        absolute path, so none of them can be read as an option. The database URL (a password,
        as a rule) is not among them: anyone who runs ``ps`` sees a command line; it goes in
        the child's environment (`environment`: ``DQ_BATCH_DB``, ``--db``'s default)."""
        args = [sys.executable, "-m", "datus_queue.tasks.cli", "batch", str(Path(self.input).absolute()),
                f"--model={self.model}", f"--mode={self.mode}", f"--dialect={self.dialect}",
                f"--max-in-flight={self.max_in_flight}", f"--run-id={run_id}", "--resume", f"--out={results}"]
        for tool in self.tools or []:
            args.append(f"--tools={tool}")
        if self.budget_usd is not None:
            args.append(f"--budget-usd={self.budget_usd}")
        if self.prompt_template:
            args.append(f"--prompt-template={self.prompt_template}")
        return args


    def environment(self) -> dict[str, str]:
        """What the slot's ``dq batch`` gets in its environment rather than on its command line."""
        return {"DQ_BATCH_DB": self.db} if self.db else {}


def parse_cron(expression: str) -> crontab:
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"five fields, not {len(fields)}")
    schedule = crontab.from_string(" ".join(fields))
    latest_slot(schedule, datetime.now(UTC))  # one that never fires (31 February) is an error too
    return schedule


def load_schedules(agent_config: AgentConfig) -> dict[str, BatchSchedule]:
    """``agent.schedules``, checked: an error names the schedule and what to fix."""
    raw = agent_config.sections.get("schedules") or {}
    if not isinstance(raw, dict):
        raise ConfigError("agent.schedules must be a mapping of schedule names to their settings")
    schedules: dict[str, BatchSchedule] = {}
    for name, entry in raw.items():
        if not _name_ok(name):
            raise ConfigError(f"agent.schedules: a schedule's name is letters, digits, _ . - (starting with a letter "
                              f"or digit, at most 64), not {str(name)[:80]!r}: it names a directory under "
                              "DQ_SCHEDULE_DIR")
        if not isinstance(entry, dict):
            raise ConfigError(f"agent.schedules.{name}: expected a mapping (cron, input, model, ...)")
        missing: list[str] = []
        values = {key: _substitute(value, missing) for key, value in entry.items()}
        if missing:
            raise ConfigError(f"agent.schedules.{name} needs environment variable(s) {', '.join(dict.fromkeys(missing))}")
        try:
            schedules[str(name)] = BatchSchedule.model_validate({**values, "name": str(name)})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
            raise ConfigError(f"agent.schedules.{name}: {problems}") from None
    return schedules


def _substitute(value: Any, missing: list[str]) -> Any:
    if isinstance(value, str):
        return substitute_env(value, missing)
    if isinstance(value, list):
        return [_substitute(item, missing) for item in value]
    return value


def latest_slot(schedule: crontab, at: datetime) -> datetime:
    """The last minute at or before ``at`` (UTC) that ``schedule`` fires on. Fields match as
    celery's crontab matches them (all five), so this is the slot beat fired for."""
    at = at.astimezone(UTC).replace(second=0, microsecond=0)
    day = at.date()
    for _ in range(_SEARCH_DAYS):
        if (day.month in schedule.month_of_year and day.day in schedule.day_of_month
                and day.isoweekday() % 7 in schedule.day_of_week):  # celery: 0 is Sunday
            for hour in sorted(schedule.hour, reverse=True):
                if day == at.date() and hour > at.hour:
                    continue
                minutes = [m for m in schedule.minute if day != at.date() or hour != at.hour or m <= at.minute]
                if minutes:
                    return datetime(day.year, day.month, day.day, hour, max(minutes), tzinfo=UTC)
        day -= timedelta(days=1)
    raise ValueError("it never fires")


def check_slot(schedule: BatchSchedule, slot: datetime, now: datetime | None = None) -> None:
    """SlotRefused unless ``slot`` is due for ``schedule`` at ``now``: a minute its cron fires
    on, not in the future (beyond `SLOT_CLOCK_SKEW_S`), and not older than the catch-up the beat
    makes — the latest slot, or the one before it while the latest has been due less than
    `SLOT_GRACE_S` (its message may still be queued)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if slot.tzinfo is None:
        raise SlotRefused(f"schedule {schedule.name}: slot has no timezone")
    slot = slot.astimezone(UTC)
    cron = schedule.crontab()
    if slot.second or slot.microsecond or latest_slot(cron, slot) != slot:
        raise SlotRefused(f"schedule {schedule.name}: {slot:%Y-%m-%dT%H:%M:%SZ} is not a slot of {schedule.cron!r}")
    if (slot - now).total_seconds() > SLOT_CLOCK_SKEW_S:
        raise SlotRefused(f"schedule {schedule.name}: slot {slot:%Y-%m-%dT%H:%MZ} is in the future")
    if latest_slot(cron, now - timedelta(seconds=SLOT_GRACE_S)) > slot:
        raise SlotRefused(f"schedule {schedule.name}: slot {slot:%Y-%m-%dT%H:%MZ} is not due: a later slot is "
                          f"(a missed slot runs only as the latest one, within {SLOT_GRACE_S:.0f} s)")


def slot_label(name: str, slot: datetime) -> str:
    return f"{name}@{slot.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def run_schedule(store: Any, settings: Any, agent_config: AgentConfig, name: str,
                 slot: datetime | None = None, *, now: datetime | None = None) -> ScheduleRun | None:
    """Run ``name``'s batch for ``slot`` (default: its latest slot) unless that slot has run or
    is running; the finished run, or None when it was not this call's to run. A slot that is not
    due at ``now`` (`check_slot`) raises SlotRefused, and nothing runs."""
    from datus_queue.tasks.batch.runner import BatchOptions, batch_id_for

    schedule = load_schedules(agent_config).get(name) if _name_ok(name) else None
    if schedule is None:
        logger.error("no schedule %r in this worker's agent.yml (agent.schedules); nothing run", str(name)[:80])
        return None
    now = now or datetime.now(UTC)
    if slot is None:
        slot = latest_slot(schedule.crontab(), now)
    check_slot(schedule, slot, now)
    slot = slot.astimezone(UTC)
    label = slot_label(name, slot)
    root = Path(settings.schedule_dir).expanduser().resolve()
    directory = root / name
    if directory.resolve().parent != root:  # the name is a slug; a symlink in its place is not followed out either
        raise SlotRefused(f"schedule {name}: its directory {directory} is not under DQ_SCHEDULE_DIR {root}")
    directory.mkdir(parents=True, exist_ok=True)
    stamp = f"{slot:%Y-%m-%dT%H%MZ}"
    results, log = directory / f"{stamp}.jsonl", directory / f"{stamp}.log"
    try:
        batch_id = batch_id_for(BatchOptions(model=schedule.model, db_url=schedule.db, dialect=schedule.dialect,
                                             mode=schedule.mode, tools=schedule.tools, run_id=label,
                                             prompt_template=_template(schedule)), Path(schedule.input))
    except OSError:
        batch_id = None  # the input is missing: dq batch says so in the log
    run = ScheduleRun(schedule=name, slot=slot, batch_id=batch_id, status="running", results=str(results),
                      log=str(log), started_at=datetime.now(UTC))
    if not store.claim_schedule_run(run):
        logger.info("schedule %s: slot %s has run already (or is running); not run again", name, label)
        return None
    logger.info("schedule %s: running batch %s for slot %s; log %s", name, batch_id, label, log)
    # the batch uses this worker's Redis, store and agent.yml, whatever the environment says
    # its database goes in DQ_BATCH_DB, not on the command line, which ps shows (never one inherited)
    inherited = {key: value for key, value in os.environ.items() if key != "DQ_BATCH_DB"}
    env = {**inherited, "DQ_REDIS_URL": settings.redis_url, "DQ_DATABASE_URL": settings.database_url,
           **({"DQ_CONFIG": settings.config} if settings.config else {}), "COLUMNS": "160",  # a log, not a tty
           **schedule.environment()}
    with log.open("ab") as out:
        code = subprocess.call(schedule.command(label, results), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env)
    status = "completed" if code == 0 else "interrupted" if code == 130 else "failed"
    store.finish_schedule_run(name, slot, status, code)
    (logger.info if code == 0 else logger.error)("schedule %s: slot %s %s (exit %d); results %s", name, label,
                                                 status, code, results)
    return run.model_copy(update={"status": status, "exit_code": code})


def _template(schedule: BatchSchedule) -> str | None:
    if not schedule.prompt_template:
        return None
    try:
        return Path(schedule.prompt_template).read_text(encoding="utf-8")
    except OSError:
        return None
