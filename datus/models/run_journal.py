"""What a tool run needs to resume: the steps it completed, kept by someone else.

A tool run given a `RunJournal` records every completed step — a model turn's answer, a
tool's result — with ``await journal.record(step)`` before it starts the next one. A new run
on the same journal (after a crash, a requeue, a retry) first loads the `ResumeState` and
replays it: the recorded turns are not asked again, the recorded tools are not called again;
the run goes on from where the journal ends. The only thing that may happen twice is a tool
call that was under way when the earlier run stopped: before it calls a tool (and before it
asks the model) the run awaits ``journal.starting(action_id)``, so the journal knows which
calls were started (``ResumeState.started``), and the result of such a call made again says
``resumed: true``.

``starting`` is also the moment the run's consumer has handled every step yielded before it
(the run waits on its consumer at each ``yield``): a journal whose keeper publishes the steps
(the job system) may record then which of them are out, so that a resumed run's steps are
published once even when whatever carried them is gone.

The journal also fixes the run's identity: action ids are derived from ``run_id`` and the
step's place in the run, so a resumed run yields the same ids for the same steps and a reader
of its steps can drop the ones it has already seen.

Nothing here knows where a journal keeps its steps: `MemoryJournal` keeps them in a list
(tests, in-process use); the job system keeps them in its job store (``tasks.checkpoints``).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from datus.models.generation import Generation
from datus.models.messages import ChatMessage
from datus.models.usage import Usage

__all__ = ["MemoryJournal", "ResumeState", "RunJournal", "RunStart", "RunStep", "step_id", "turn_id"]

_NAMESPACE = uuid.UUID("6b1f6c52-3c1e-4a36-9d0e-6d1a2f6f5a11")


class RunStart(BaseModel):
    """The conversation a run began with: a resumed run continues this one, not whatever its
    session holds by then (which may already include this run's own messages)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]
    session_messages: int = Field(default=0, ge=0, description="how many of them came from the session")


class RunStep(BaseModel):
    """One completed step. ``turn`` is 1-based; a tool step is call ``call`` (0-based) of that
    turn's answer."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["turn", "tool"]
    turn: int = Field(ge=1)
    call: int | None = Field(default=None, ge=0)
    message: ChatMessage = Field(description="turn: the model's answer (text, reasoning with its signatures, "
                                             "tool calls); tool: the result given back to the model")
    usage: Usage | None = None  # turn
    finish_reason: str | None = None  # turn
    action: dict[str, Any] | None = None  # tool: the finished ActionHistory step, as JSON
    start: RunStart | None = None  # the run's first step carries its conversation

    def generation(self) -> Generation:
        """A recorded turn as the answer the model gave."""
        message = self.message
        return Generation(text=message.content, reasoning=message.reasoning,
                          reasoning_details=message.reasoning_details, tool_calls=list(message.tool_calls),
                          finish_reason=self.finish_reason, usage=self.usage or Usage())


@dataclass(frozen=True)
class ResumeState:
    """What a journal holds: the completed steps in order, and the ids of the steps an earlier
    run started — tool calls and model turns (`turn_id`) — and may or may not have finished."""

    steps: list[RunStep] = field(default_factory=list)
    started: Collection[str] = frozenset()


class RunJournal(Protocol):
    run_id: str

    async def load(self) -> ResumeState: ...

    async def record(self, step: RunStep) -> None:
        """Keep ``step``; the run waits for this before its next step."""

    async def starting(self, action_id: str) -> None:
        """Step ``action_id`` is about to begin: a tool call (its PROCESSING step has been
        yielded) or a model turn (`turn_id`). The run waits for this before it calls the tool
        or asks the model, and every step it yielded before has been handled by its consumer
        by then. A tool call that a journal knows as started and that has no recorded result
        when a run resumes is made again, marked ``resumed: true``."""


def step_id(run_id: str, place: str) -> str:
    """The action id of the step at ``place`` (e.g. ``t2c0``: call 0 of turn 2) of a run."""
    return str(uuid.uuid5(_NAMESPACE, f"{run_id}:{place}"))


def turn_id(run_id: str, turn: int) -> str:
    """The id under which model turn ``turn`` (1-based) of a run is `RunJournal.starting`; no
    step carries it (the turn's steps are its ``message``, its tool calls, its final answer)."""
    return step_id(run_id, f"t{turn}")


class MemoryJournal:
    """A journal in memory: resume a run in the same process (and the model layer's tests)."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex
        self.steps: list[RunStep] = []
        self.started: set[str] = set()

    async def load(self) -> ResumeState:
        return ResumeState(list(self.steps), frozenset(self.started))

    async def record(self, step: RunStep) -> None:
        self.steps.append(step.model_copy(deep=True))

    async def starting(self, action_id: str) -> None:
        self.started.add(action_id)
