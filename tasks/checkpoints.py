"""A tool-run job's journal (`datus.models.run_journal.RunJournal`) on the job store and its
event stream: what lets any new delivery of the job resume where the last one stopped.

- ``record(step)``: one row of ``job_checkpoints`` per completed step (a model turn, a tool
  result), written with the worker's other writes of that loop turn (group commit) and
  awaited before the run takes its next step.
- ``load()``: on the first start of a job, nothing (no query). On any later delivery — a
  redelivery after a crash, a SIGTERM requeue, a retry — the checkpoints in order, and from
  the job's event stream the steps already published: the runner does not publish them again
  (action ids are stable across deliveries), and a tool step published as PROCESSING but never
  checkpointed was started by an earlier delivery, so the call made again says
  ``resumed: true``.
- ``starting(id)``: nothing to write. The tool's PROCESSING step is published (and awaited)
  before the tool is called, so the event stream already records that the call began.

Two deliveries of one job running at once (a redelivery while the first still runs) cannot
both record a step: the second insert of a position fails, and that delivery stops
(`RunSuperseded`), leaving the job to the one that got there first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from datus.models.run_journal import ResumeState, RunStep
from datus_queue.tasks.events import aread_events

if TYPE_CHECKING:
    from datus_queue.tasks.context import JobContext

__all__ = ["RunSuperseded", "StoreJournal"]


class RunSuperseded(Exception):
    """Another delivery of the job recorded this step first: it owns the run."""


class StoreJournal:
    def __init__(self, ctx: JobContext, job_id: str, attempt: int, resuming: bool) -> None:
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.run_id = job_id
        self.resuming = resuming
        self.published: set[tuple[str, str]] = set()  # (action id, status) already in the event stream
        self.replayed_steps = 0
        self._position = 0

    async def load(self) -> ResumeState:
        if not self.resuming:
            return ResumeState()
        steps = [RunStep.model_validate(row) for row in await self.ctx.store.acheckpoints(self.job_id)]
        started: set[str] = set()
        for event in await aread_events(self.ctx.aredis, self.job_id):
            step = event.step
            if event.terminal or step.get("action_type") == "assistant_delta" or "action_id" not in step:
                continue
            self.published.add((step["action_id"], step.get("status", "")))
            if step.get("role") == "tool" and step.get("status") == "processing":
                started.add(step["action_id"])
        self._position = self.replayed_steps = len(steps)
        return ResumeState(steps, frozenset(started))

    async def record(self, step: RunStep) -> None:
        try:
            await self.ctx.store.acheckpoint(self.job_id, self.attempt, self._position, step.kind,
                                             step.model_dump(mode="json", exclude_defaults=True))
        except IntegrityError as exc:
            raise RunSuperseded(f"job {self.job_id}: step {self._position} was recorded by another delivery") from exc
        self._position += 1

    async def starting(self, action_id: str) -> None:
        return None

    def seen(self, step: Any) -> bool:
        """Was this step published by an earlier delivery?"""
        return (step.action_id, step.status) in self.published
