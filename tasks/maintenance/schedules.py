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
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from datus.models.config import AgentConfig, ConfigError, substitute_env
from datus_queue.tasks.store import ScheduleRun

__all__ = ["BatchSchedule", "latest_slot", "load_schedules", "run_schedule", "slot_label"]

logger = logging.getLogger("datus_queue.tasks.maintenance.schedules")
_SEARCH_DAYS = 366 * 8 + 1  # a cron expression that fires at all fires within 8 years (29 Feb on a Monday…)


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
        """``dq batch`` for one slot."""
        args = [sys.executable, "-m", "datus_queue.tasks.cli", "batch", self.input, "--model", self.model, "--mode", self.mode,
                "--dialect", self.dialect, "--max-in-flight", str(self.max_in_flight), "--run-id", run_id,
                "--resume", "--out", str(results)]
        if self.db:
            args += ["--db", self.db]
        for tool in self.tools or []:
            args += ["--tools", tool]
        if self.budget_usd is not None:
            args += ["--budget-usd", str(self.budget_usd)]
        if self.prompt_template:
            args += ["--prompt-template", self.prompt_template]
        return args


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


def slot_label(name: str, slot: datetime) -> str:
    return f"{name}@{slot.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def run_schedule(store: Any, settings: Any, agent_config: AgentConfig, name: str,
                 slot: datetime | None = None) -> ScheduleRun | None:
    """Run ``name``'s batch for ``slot`` (default: its latest slot) unless that slot has run or
    is running; the finished run, or None when it was not this call's to run."""
    from datus_queue.tasks.batch.runner import BatchOptions, batch_id_for

    schedule = load_schedules(agent_config).get(name)
    if schedule is None:
        logger.error("no schedule %r in this worker's agent.yml (agent.schedules); nothing run", name)
        return None
    slot = latest_slot(schedule.crontab(), datetime.now(UTC)) if slot is None else slot.astimezone(UTC)
    label = slot_label(name, slot)
    directory = Path(settings.schedule_dir).expanduser() / name
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
    env = {**os.environ, "DQ_REDIS_URL": settings.redis_url, "DQ_DATABASE_URL": settings.database_url,
           **({"DQ_CONFIG": settings.config} if settings.config else {}), "COLUMNS": "160"}  # a log, not a tty
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
