"""A tool-run job's journal (`datus.models.run_journal.RunJournal`) in the job store: what lets
any new delivery of the job resume where the last one stopped. Resuming reads only the store,
never the job's event stream (capped, expiring, every text delta an entry of it).

The rows of ``job_checkpoints``, in order, one position each, written with the worker's other
writes of that loop turn (group commit) and awaited before the run goes on:

- a **step** (``kind`` turn | tool: `RunStep`): a model turn's answer, a tool's result;
- a **start** (``kind`` start: `StartRow`), written just before a model request or a tool
  call. It names the turn or the call (a call started and never recorded is made again, and
  says ``resumed: true``), and lists the steps the runner had published since the row
  before: the run waits at each ``yield`` until the runner has published that step, so by
  the time it announces a start, every step it yielded before is in the event stream.

A step is recorded *before* the runner publishes it, so whatever is published under a step's
id is what the store holds (an answer cut off by a crash is never published under a lasting
id), and the start row that follows says it went out. Hence a delivery that stops while a
model or a tool is working — where a run spends its time — is resumed by the next publishing
no step twice. One that stops in the few milliseconds between recording a step and the next
start (while publishing the steps in between) leaves them unconfirmed: the next delivery
publishes them again, the same steps with the same ids and outputs.

``load()``: on the first start of a job, nothing (no query); on any later delivery — a
redelivery after a crash, a SIGTERM requeue, a retry — the rows in order. ``seen(step)``: was
this step published by an earlier delivery? When not, the runner is about to publish it, and
the next start row records that.

Every row is bounded (``DQ_MAX_CHECKPOINT_BYTES``, 1 MiB by default, not counting the
conversation the run began with, which the first turn's row carries whole and submit bounds
by ``DQ_MAX_PROMPT_BYTES``): the journal lowers the run's tool result cap to a sixteenth of it
(``max_tool_result_chars``, also ``DQ_MAX_TOOL_RESULT_CHARS``), so the result the model read
always fits in its row whole, and a resumed run replays exactly the truncated text the model
got. What else a row holds — the tool step's display copy, a long answer — is cut to fit
(`datus.models.output_bounds`), each cut marked.

Two deliveries of one job running at once (a redelivery while the first still runs) cannot
both write a position: the second insert fails, and that delivery stops (`RunSuperseded`),
leaving the job to the one that got there first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy.exc import IntegrityError

from datus.models.output_bounds import cap_text, json_bytes, shrink_json
from datus.models.run_journal import ResumeState, RunStep
from datus_queue.tasks.settings import get_settings

if TYPE_CHECKING:
    from datus_queue.tasks.context import JobContext

__all__ = ["RunSuperseded", "StartRow", "StoreJournal"]

Published = tuple[str, str]  # (action id, status) of a step in the job's event stream


class RunSuperseded(Exception):
    """Another delivery of the job wrote this position first: it owns the run."""


class StartRow(BaseModel):
    """A model request or a tool call ``action_id`` was about to be made, and ``published``
    had gone out since the row before."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["start"] = "start"
    action_id: str
    published: list[Published] = Field(default_factory=list)


_ROW: TypeAdapter[RunStep | StartRow] = TypeAdapter(Annotated[RunStep | StartRow, Field(discriminator="kind")])


class StoreJournal:
    def __init__(self, ctx: JobContext, job_id: str, run: int, resuming: bool) -> None:
        self.ctx, self.job_id, self.run = ctx, job_id, run  # run: the store's run number, written with each row
        self.run_id = job_id
        self.resuming = resuming
        self.published: set[Published] = set()  # by earlier deliveries, as their start rows say
        self.replayed_steps = 0
        self._position = 0
        self._unconfirmed: list[Published] = []  # published by this delivery since its last start row
        settings = getattr(ctx, "settings", None) or get_settings()
        self.max_bytes = settings.max_checkpoint_bytes
        # the tool loop cuts a tool's answer to this before the model reads it (tool_loop: the cap)
        caps = [self.max_bytes // 16, settings.max_tool_result_chars]
        self.max_tool_result_chars = min(cap for cap in caps if cap is not None)

    async def load(self) -> ResumeState:
        if not self.resuming:
            return ResumeState()
        rows = [_ROW.validate_python(row) for row in await self.ctx.store.acheckpoints(self.job_id)]
        steps = [row for row in rows if isinstance(row, RunStep)]
        started: set[str] = set()
        for row in rows:
            if isinstance(row, StartRow):
                started.add(row.action_id)
                self.published.update(row.published)
        self._position, self.replayed_steps = len(rows), len(steps)
        return ResumeState(steps, frozenset(started))

    async def record(self, step: RunStep) -> None:
        await self._write(step.kind, bounded_row(step.model_dump(mode="json", exclude_defaults=True), self.max_bytes))

    async def starting(self, action_id: str) -> None:
        row = StartRow(action_id=action_id, published=self._unconfirmed)
        await self._write(row.kind, row.model_dump(mode="json"))
        self._unconfirmed = []

    def seen(self, step: Any) -> bool:
        """Was this step published by an earlier delivery? If not, the caller publishes it
        now, before the run goes on, and the next start row says so."""
        key = (step.action_id, _value(step.status))
        if key in self.published:
            return True
        if step.action_type != "assistant_delta":  # a delta's id is new each time: never seen again
            self._unconfirmed.append(key)
        return False

    async def _write(self, kind: str, row: dict[str, Any]) -> None:
        try:
            await self.ctx.store.acheckpoint(self.job_id, self.run, self._position, kind, row)
        except IntegrityError as exc:
            raise RunSuperseded(f"job {self.job_id}: position {self._position} of its run was written by another "
                                "delivery") from exc
        self._position += 1


def bounded_row(row: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """A step's row within ``max_bytes`` of JSON besides its ``start``: the tool step's display
    copy (``action``) is cut first, marked ``truncated`` in its output; the message only when
    it alone is over the cap (never a tool result the tool loop capped to the journal's
    ``max_tool_result_chars``)."""
    start = row.get("start")
    rest = {key: value for key, value in row.items() if key != "start"}
    if json_bytes(rest) <= max_bytes:
        return row
    action = rest.get("action")
    if isinstance(action, dict):
        others = json_bytes({key: value for key, value in rest.items() if key != "action"})
        room = max(max_bytes - others - 1024, 2048)
        action = dict(action)
        for key, share in (("messages", 8), ("input", 4), ("output", 2)):  # the output gets what is left
            if key in action:
                left = room - json_bytes({k: v for k, v in action.items() if k != key})
                action[key], _ = shrink_json(action[key], max(min(room // share, left), 512))
        if isinstance(action.get("output"), dict):
            action["output"] = {**action["output"], "truncated": True}
        rest["action"] = action
    message = rest.get("message")
    if json_bytes(rest) > max_bytes and isinstance(message, dict) and isinstance(message.get("content"), str):
        over = json_bytes(rest) - max_bytes
        content = message["content"]
        keep = max(0, len(content) - over - 256)
        while True:  # characters, not bytes: cut until the row fits
            cut, _ = cap_text(content, keep)
            rest["message"] = {**message, "content": cut}
            if json_bytes(rest) <= max_bytes or keep == 0:
                break
            keep //= 2
    return rest if start is None else {**rest, "start": start}


def _value(status: Any) -> str:
    """An `ActionStatus` or its value (ActionHistory keeps what it was given)."""
    return str(getattr(status, "value", status))
