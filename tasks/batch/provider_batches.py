"""``dq batch --via batch-api``: a batch's items as provider batches, at the providers' batch prices.

The items of the run (one model, so one provider) are built into the very requests their online
jobs would send (`BatchRunner.prompt`, then the adapter's request building:
`datus.models.batch_apis`), split into parts that fit the provider's limits (or lower ones given
in `ProviderBatchOptions`), and each part becomes one provider batch. Every step is recorded in
the job store before the next (`tasks.store.provider_batches`: the part and its custom_ids
before the upload, the file id, the create, the provider's batch id, the end), so a client that
exits at any point loses nothing: ``--resume`` goes on from the last recorded step, and a create
whose answer never arrived is found again (OpenAI: by the part id in the batch's metadata;
Anthropic, whose batches carry none: by time and size, `AnthropicBatchAPI.find`).

The parts are polled with back-off (``poll_s`` growing by half each time to ``poll_max_s``);
the provider's counts drive the progress bar. A part that ended is collected: each answer,
matched to its item by custom_id (results come in any order), is scored and recorded exactly as
an online job's answer (`BatchRunner.record_result`), once — an item final already is never
recorded again. Items the provider failed, expired or cancelled go out again in a new part
(a new custom_id each time) for up to ``rounds`` submissions; what is left after that runs
online, as jobs. The cost recorded is at batch prices, with the online
price of the same tokens beside it (``online_cost_usd``).

``--by`` (``deadline``) bounds the wait: at it the open provider batches are cancelled, what
they answered is collected, nothing new is sent, and the rest runs online. Given without
``--via``, it chooses (`choose_via`): the batch API when the provider's batch window fits before it.

Not done yet: Gemini's file input (inline requests only: 20 MB a batch).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datus_queue.tasks.batch.input import Question, iter_questions
from datus_queue.tasks.schemas import JobStatus
from datus_queue.tasks.store import BatchStatus
from datus_queue.tasks.store.provider_batches import OPEN_STATES, PartRow, PartState, ProviderBatchStore

if TYPE_CHECKING:
    from datus.models.batch_apis import BatchAPI, BatchLimits, Progress
    from datus_queue.tasks.batch.runner import BatchRunner

__all__ = ["ProviderBatchOptions", "ProviderBatchRun", "ViaChoice", "cancel_provider_batches", "choose_via",
           "custom_id_for", "deadline_from", "plan_parts"]


@dataclass
class ProviderBatchOptions:
    max_requests: int | None = None  # per provider batch; None: the provider's limit (never above it)
    max_bytes: int | None = None
    poll_s: float = 5.0  # the first wait between polls of a provider batch
    poll_max_s: float = 60.0
    rounds: int = 3  # provider submissions of one item before it runs online instead
    # --by: at it the open provider batches are cancelled (what they answered is kept), no new one
    # is made, and what is left runs online
    deadline: datetime | None = None


def deadline_from(text: str, now: datetime | None = None) -> datetime:
    """``--by``: a duration from now (``90s``, ``30m``, ``6h``, ``2d``) or an ISO 8601 time (UTC
    unless it says otherwise)."""
    from datus_queue.tasks.maintenance.dead_letters import parse_age

    now = now or datetime.now(UTC)
    try:
        return now + parse_age(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--by {text!r}: give a duration (90s, 30m, 6h, 2d) or a time (2026-12-08T06:00)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ViaChoice:
    via: str  # online | batch-api
    reason: str


def choose_via(provider: str, deadline: datetime, now: datetime | None = None, in_flight: bool = False) -> ViaChoice:
    """``dq batch --by WHEN`` without ``--via``: the batch API when the provider's whole batch
    window (`datus.models.batch_apis.batch_window`, 24 h for all four) fits before WHEN, so the
    provider may take all the time it is allowed and still answer by then; else online, since a
    batch cancelled at WHEN pays for nothing it saves and the rest runs online anyway. A batch
    whose provider batches are in flight goes on with them (online would run their items twice)."""
    from datus.models.batch_apis import batch_window

    window = batch_window(provider)
    if window is None:
        return ViaChoice("online", f"{provider} has no batch API here")
    if in_flight:
        return ViaChoice("batch-api", "this batch has provider batches in flight")
    left = deadline - (now or datetime.now(UTC))
    hours = window.total_seconds() / 3600
    if left >= window:
        return ViaChoice("batch-api", f"--by is {_span(left)} away, at least {provider}'s {hours:g} h batch window: "
                                      "half price")
    return ViaChoice("online", f"--by is {_span(left)} away, less than {provider}'s {hours:g} h batch window")


def _span(delta: Any) -> str:
    seconds = max(0.0, delta.total_seconds())
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def custom_id_for(item_id: str, attempt: int) -> str:
    """A custom_id both providers accept (``^[a-zA-Z0-9_-]{1,64}$``), new for each submission
    of the item, the same for the same one."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"i{digest}-{attempt}"


def plan_parts(sizes: list[int], limits: BatchLimits, overhead: int) -> list[range]:
    """The items' split into provider batches (`datus.models.batch_apis.split`)."""
    from datus.models.batch_apis import split

    return split(sizes, limits, overhead)


class ProviderBatchRun:
    def __init__(self, runner: BatchRunner, batch_id: str) -> None:
        from datus.models.base import LLMBaseModel
        from datus.models.batch_apis import BatchLimits, batch_api

        self.runner, self.batch_id = runner, batch_id
        self.options = runner.options.api
        self.parts_store = ProviderBatchStore(runner.client.store)
        self.api: BatchAPI = batch_api(LLMBaseModel.create_model(runner.client.agent_config, runner.options.model))
        limits = self.api.default_limits
        for name in ("max_requests", "max_bytes"):
            if (getattr(self.options, name) or 1) <= 0:
                raise ValueError(f"--api-{name.replace('_', '-').replace('bytes', 'mb')} must be positive")
        self.limits = BatchLimits(min(self.options.max_requests or limits.max_requests, limits.max_requests),
                                  min(self.options.max_bytes or limits.max_bytes, limits.max_bytes))
        self._bodies: dict[str, bytes] = {}  # custom_id -> line, for the parts made in this process

    # ---- the run ---------------------------------------------------------------------------

    def run(self, input_path: Path) -> set[str]:
        """Run the batch's open items through provider batches; the ids of the items left to
        run online (none when interrupted: --resume goes on)."""
        questions = {q.id: q for q in iter_questions(input_path) if isinstance(q, Question)}
        store = self.runner.client.store
        out = self.runner.open_out()
        try:
            while not self._stopped():
                final = store.final_item_ids(self.batch_id)
                waiting = self.parts_store.items_in_open_parts(self.batch_id)
                sent = self.parts_store.rounds_by_item(self.batch_id)
                todo = [q for item_id, q in questions.items() if item_id not in final and item_id not in waiting]
                late = self._late()
                online = {q.id for q in todo if late or sent.get(q.id, 0) >= self.options.rounds}
                self._make_parts([q for q in todo if q.id not in online], sent)
                open_parts = self.parts_store.parts(self.batch_id, OPEN_STATES)
                if not open_parts:
                    return online
                self._send(open_parts, questions)
                self._follow(questions, out)
            return set()
        finally:
            if out is not None:
                out.close()
            self.api.close()

    def _late(self) -> bool:
        return self.options.deadline is not None and datetime.now(UTC) >= self.options.deadline

    def _make_parts(self, questions: list[Question], sent: dict[str, int]) -> None:
        if not questions:
            return
        ids = [custom_id_for(q.id, sent.get(q.id, 0) + 1) for q in questions]
        lines = [self.api.line(custom_id, self._body(q)) for custom_id, q in zip(ids, questions)]
        for span in plan_parts([len(line) for line in lines], self.limits, self.api.item_overhead):
            round_ = 1 + max(sent.get(questions[i].id, 0) for i in span)
            part_id = f"{self.batch_id}-r{round_}-{uuid.uuid4().hex[:12]}"
            size = sum(len(lines[i]) + self.api.item_overhead for i in span)
            self.parts_store.add_part(part_id, self.batch_id, self.api.model.provider, round_,
                                      ((ids[i], questions[i].id) for i in span), size)
            self._bodies.update((ids[i], lines[i]) for i in span)

    def _body(self, question: Question) -> dict[str, Any]:
        prompt = self.runner.prompt(question)
        body, _forced = self.api.body(prompt)  # dq batch asks for text: nothing forced
        return self.api.cache_prefix(body, self.runner.shared_prefix(prompt))

    def _lines(self, part: PartRow, questions: dict[str, Question]) -> list[bytes]:
        """The part's request lines: made in this process, or built again from the stored
        custom_ids (the same prompt and options give the same request)."""
        lines = []
        for custom_id, item_id in sorted(self.parts_store.part_items(part.part_id).items()):
            line = self._bodies.get(custom_id)
            lines.append(line if line is not None else self.api.line(custom_id, self._body(questions[item_id])))
        return lines

    # ---- sending ---------------------------------------------------------------------------

    def _send(self, parts: list[PartRow], questions: dict[str, Question]) -> None:
        from datus.models.errors import ModelError

        for part in parts:
            if part.state is PartState.SUBMITTED or self.runner.interrupted:
                continue
            if self._late():  # past --by: not sent (a create that may have reached the provider is looked for)
                found = self.api.find(part.part_id, part.items, part.updated_at) \
                    if part.state is PartState.CREATING else None
                if found is None:
                    self.parts_store.update_part(part.part_id, state=PartState.CANCELLED, error="past --by")
                    continue
                self.parts_store.update_part(part.part_id, state=PartState.SUBMITTED, provider_batch_id=found)
                continue
            try:
                self._send_part(part, questions)
            except ModelError as exc:
                if exc.retryable:  # the provider is away: the next pass tries again
                    self.runner.view.note(f"provider batch {part.part_id}: {exc.reason} (will retry)")
                    time.sleep(self.options.poll_s)
                    continue
                # refused (too large, invalid): its items count this round and go again, or online
                self.parts_store.update_part(part.part_id, state=PartState.REFUSED, error=exc.reason[:2000])
                self.parts_store.set_items_state(self.batch_id, list(self.parts_store.part_items(part.part_id)),
                                                 "failed")
                self.runner.view.note(f"provider batch {part.part_id} refused: {exc.reason}")

    def _send_part(self, part: PartRow, questions: dict[str, Question]) -> None:
        api, store = self.api, self.parts_store
        lines: list[bytes] | None = None
        file_id = part.input_file_id
        provider_id: str | None = None
        if part.state is PartState.CREATING:  # sent before an exit: did the provider make it?
            provider_id = api.find(part.part_id, part.items, part.updated_at)
        if provider_id is None:
            lines = self._lines(part, questions)
            if part.state is PartState.PREPARING:
                file_id = api.upload(lines, part.part_id)
                if file_id is not None:
                    store.update_part(part.part_id, state=PartState.UPLOADED, input_file_id=file_id)
            store.update_part(part.part_id, state=PartState.CREATING)
            provider_id = api.create(part.part_id, lines, file_id)
        store.update_part(part.part_id, state=PartState.SUBMITTED, provider_batch_id=provider_id)

    # ---- following -------------------------------------------------------------------------

    def _follow(self, questions: dict[str, Question], out: Any) -> None:
        """Poll the submitted parts with back-off until each has ended and been collected."""
        from datus.models.errors import ModelError

        delay = self.options.poll_s
        while not self._stopped():
            parts = self.parts_store.parts(self.batch_id, [PartState.SUBMITTED])
            if not parts:
                return
            if self._late():
                self._cancel_at_deadline(parts)
            done = total = 0
            reported = True
            for part in parts:
                try:
                    progress = self.api.retrieve(part.provider_batch_id or "")
                    self.parts_store.update_part(part.part_id, provider_status=progress.status,
                                                 request_counts=progress.counts)
                    if progress.ended:
                        self._collect(part, progress, questions, out)
                        delay = self.options.poll_s
                except ModelError as exc:
                    if not exc.retryable:
                        raise
                    self.runner.view.note(f"provider batch {part.provider_batch_id}: {exc.reason} (polling on)")
                    continue
                done, total = done + progress.done, total + progress.total
                reported = reported and progress.reported
            self.runner.view.provider_progress(done if reported else None, total, len(parts))
            if self.parts_store.parts(self.batch_id, [PartState.SUBMITTED]):
                self._sleep(delay)
                delay = min(delay * 1.5, self.options.poll_max_s)

    def _cancel_at_deadline(self, parts: list[PartRow]) -> None:
        """--by has come: cancel the open provider batches once each; they are collected as they
        end (what they answered is kept) and the rest runs online."""
        from datus.models.errors import ModelError

        for part in parts:
            if part.provider_status in ("cancelling", "canceling") or part.error == "cancelled at --by":
                continue
            try:
                self.api.cancel(part.provider_batch_id or "")
            except ModelError as exc:  # it ended meanwhile (nothing to cancel), or the provider is away
                self.runner.view.note(f"provider batch {part.provider_batch_id}: cancel at --by: {exc.reason}")
            self.parts_store.update_part(part.part_id, error="cancelled at --by")
            self.runner.view.note(f"--by reached: provider batch {part.provider_batch_id} cancelled; what it "
                                  "answered is kept, the rest runs online")

    def _stopped(self) -> bool:
        """Ctrl-C, or ``dq cancel`` from anywhere (it closes the batch as interrupted)."""
        if not self.runner.interrupted:
            info = self.runner.client.store.get_batch(self.batch_id)
            if info is not None and info.status is not BatchStatus.RUNNING:
                self.runner.view.note(f"batch {self.batch_id} was {info.status.value} (dq cancel): stopping; "
                                      "--resume collects what the provider answered and sends the rest again")
                self.runner.interrupted = True
        return self.runner.interrupted

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self.runner.interrupted and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))

    def _collect(self, part: PartRow, progress: Progress, questions: dict[str, Question], out: Any) -> None:
        """Copy a part's results into its items (each answer once), then mark it collected."""
        mapping = self.parts_store.part_items(part.part_id)
        succeeded: list[str] = []
        failed: list[str] = []
        latency_ms = (datetime.now(UTC) - _aware(part.created_at)).total_seconds() * 1000.0
        for result in self.api.results(progress):
            item_id = mapping.get(result.custom_id)
            if item_id is None or item_id not in questions:
                continue  # not ours (or no longer in the input)
            if result.generation is None:
                failed.append(result.custom_id)
                continue
            usage = result.generation.usage
            extra = {"via": "batch-api", "provider_batch_id": progress.provider_batch_id,
                     "custom_id": result.custom_id, "online_cost_usd": result.online_cost_usd,
                     "cache_savings_usd": result.cache_savings_usd}
            self.runner.record_result(
                self.batch_id, questions[item_id], JobStatus.SUCCEEDED, out, answer=result.generation.text,
                error=None, error_code=None, usage=usage.model_dump(exclude_none=True), cost_usd=usage.cost_usd or 0.0,
                latency_ms=latency_ms, attempts=part.round, job_id=None, extra=extra, once=True)
            succeeded.append(result.custom_id)
        unanswered = set(mapping) - set(succeeded) - set(failed)  # a failed batch has no lines at all
        self.parts_store.set_items_state(self.batch_id, succeeded, "succeeded")
        self.parts_store.set_items_state(self.batch_id, failed + sorted(unanswered), "failed")
        self.parts_store.update_part(part.part_id, state=PartState.COLLECTED, output_file_id=progress.output_file_id,
                                     error_file_id=progress.error_file_id, provider_status=progress.status,
                                     request_counts=progress.counts)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite hands it back naive


def open_provider_batches(store: Any, batch_id: str) -> int:
    """How many provider batches of the batch are not finished (an online run must not start
    items that are in one)."""
    return len(ProviderBatchStore(store).parts(batch_id, OPEN_STATES))


def cancel_provider_batches(client: Any, batch_id: str) -> list[str]:
    """Cancel the batch's provider batches (``dq cancel BATCH_ID``); the lines to show. The
    batch is closed as interrupted, which stops a ``dq batch`` following it. Parts not sent yet
    are cancelled here, sent ones at the provider; ``--resume`` later collects what the provider
    answered before the cancel and sends the rest again."""
    from datus.models.base import LLMBaseModel
    from datus.models.batch_apis import batch_api

    info = client.store.get_batch(batch_id)
    parts_store = ProviderBatchStore(client.store)
    parts = parts_store.parts(batch_id, OPEN_STATES)
    if info is None or not parts:
        return []
    client.store.finish_batch(batch_id, BatchStatus.INTERRUPTED)
    shown = []
    api = None
    try:
        for part in parts:
            if part.state is PartState.SUBMITTED and part.provider_batch_id:
                api = api or batch_api(LLMBaseModel.create_model(client.agent_config, info.model))
                api.cancel(part.provider_batch_id)
                parts_store.update_part(part.part_id, provider_status="cancelling")
                shown.append(f"{part.provider_batch_id}: cancelling")
            elif part.state is not PartState.CREATING:  # a create in flight may have made it: --resume finds it
                parts_store.update_part(part.part_id, state=PartState.CANCELLED)
                shown.append(f"{part.part_id}: cancelled before it was sent")
    finally:
        if api is not None:
            api.close()
    return shown
