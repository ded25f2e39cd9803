"""Provider batch jobs on the fake server: what OpenAI's Batch API and Anthropic's Message
Batches have in common (`openai_batches`, `anthropic_batches` spell them on the wire).

Each item of a batch is answered by the same code that answers an online request: the
protocol's `parse`, the server's `Script` (so a scripted reply, a fault or the fallback) and the
protocol's `render_json` / `render_fault`. A fault that is an HTTP error becomes a failed item;
a fault that only breaks a connection (hang, malformed JSON, a cut stream) has no meaning
inside a batch and is answered by the fallback.

A batch's life runs on a short simulated clock, `BatchSettings`, read whenever the batch is
looked at (no background task):

    validating   for validate_s
    in_progress  for run_s: the items are answered as that time passes, in a shuffled order
                 (results come back out of order; match them by custom_id)
    finalizing   for finalize_s
    ended        completed (OpenAI) / ended (Anthropic); or expired: a batch created while
                 ``expire_after`` is n answers its first n items only, the others expire

Prompt caching, as the providers report it: an Anthropic request whose blocks carry
``cache_control`` writes its prefix up to the last such block the first time that prefix is seen
(``cache_creation_input_tokens``) and reads it after (``cache_read_input_tokens``); an OpenAI
chat request reads, automatically, the longest prefix of its messages' text already seen, from
1,024 tokens up in 128-token steps (``prompt_tokens_details.cached_tokens``). Prefixes under
the model's minimum are not cached, as documented: 1,024 tokens for OpenAI's models and most
Claude models, 2,048 for Claude Haiku 3 and 3.5, 4,096 for Claude Haiku 4.5 and Opus 4.5
(`cache_min_tokens` overrides it for every model). The cache lives as long as the engine (no 5-minute expiry: the fake's batches
take seconds). A reply that sets its own cache counts keeps them.

A cancel moves a batch to cancelling/canceling for finalize_s; the items not answered by then
are cancelled. ``hold("create")`` keeps create requests waiting (a client killed meanwhile is
gone: its batch is never made); ``hold("created")`` makes the batch, then keeps the answer
(a client killed meanwhile never learns the id); ``hold("results")`` keeps result downloads
waiting. `release()` lets them go. Tests use these to kill a client at a chosen step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import random
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

from starlette.requests import Request

from datus.models.scripted import Fault, Reply, echo_handler
from datus.testing.protocols import ProtocolError, WireProtocol, _text_chars, _tokens

__all__ = ["Answered", "BatchEngine", "BatchItem", "BatchJob", "BatchSettings", "StoredFile"]

HoldPoint = Literal["create", "created", "results"]
Outcome = Literal["pending", "succeeded", "errored", "expired", "canceled"]
_CONNECTION_FAULTS = ("hang", "malformed_json", "cut_stream")


@dataclasses.dataclass
class BatchSettings:
    """The fake's batch clock and limits. Seconds, not the providers' hours, so tests are fast;
    the limits are the providers' documented ones unless a test lowers them."""

    validate_s: float = 0.05
    run_s: float = 0.3
    finalize_s: float = 0.05
    expire_after: int | None = None  # batches created while set answer this many items, the rest expire
    openai_max_requests: int = 50_000  # per input file
    openai_max_file_bytes: int = 200 * 1024 * 1024
    anthropic_max_requests: int = 100_000  # per batch
    anthropic_max_bytes: int = 256 * 1024 * 1024
    gemini_max_bytes: int = 20 * 1024 * 1024  # inline requests, all of them together
    seed: int | None = None  # the order items are answered in (None: random)
    cache_min_tokens: int | None = None  # the shortest prefix cached; None: the model's (module docstring)

    @classmethod
    def from_json(cls, payload: dict[str, Any], base: BatchSettings | None = None) -> BatchSettings:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"unknown batch setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(base or cls(), **payload)


@dataclasses.dataclass
class BatchItem:
    custom_id: str
    body: dict[str, Any]
    status: int | None = None  # the HTTP status of its answer, once answered
    answer: dict[str, Any] | None = None  # the answer's JSON body
    outcome: Outcome = "pending"


@dataclasses.dataclass(frozen=True)
class Answered:
    """One item the fake answered (tests check that no item is answered twice)."""

    batch_id: str
    custom_id: str
    outcome: Outcome


@dataclasses.dataclass
class StoredFile:
    file_id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int


@dataclasses.dataclass
class BatchJob:
    batch_id: str
    protocol: WireProtocol
    headers: dict[str, str]  # the create request's, for the per-item parse (Anthropic's version header)
    items: list[BatchItem]
    settings: BatchSettings
    created_at: float
    order: list[int]  # the answering order: a shuffle of the item indexes
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the wire module's own fields
    cancelled_at: float | None = None
    failed: list[dict[str, Any]] | None = None  # OpenAI's validation errors: the batch failed
    answered_count: int = 0

    def phase(self, now: float) -> Literal["validating", "in_progress", "finalizing", "cancelling", "ended"]:
        s = self.settings
        if self.failed is not None:
            return "ended"
        if self.cancelled_at is not None:
            return "cancelling" if now < self.cancelled_at + s.finalize_s else "ended"
        elapsed = now - self.created_at
        if elapsed < s.validate_s:
            return "validating"
        if elapsed < s.validate_s + s.run_s:
            return "in_progress"
        if elapsed < s.validate_s + s.run_s + s.finalize_s:
            return "finalizing"
        return "ended"

    def ended_at(self) -> float:
        s = self.settings
        if self.cancelled_at is not None:
            return self.cancelled_at + s.finalize_s
        return self.created_at + s.validate_s + s.run_s + s.finalize_s

    @property
    def expired(self) -> bool:
        return any(item.outcome == "expired" for item in self.items)

    def count(self, *outcomes: Outcome) -> int:
        return sum(item.outcome in outcomes for item in self.items)


class BatchEngine:
    """The batches and files of one fake server; its state is guarded by one lock (handlers
    run on the server's loop, tests read from their own thread)."""

    def __init__(self, server: Any) -> None:
        self.server = server  # the FakeProviderServer: its script, fallback and recorded requests
        self.settings = BatchSettings()
        self.jobs: dict[str, BatchJob] = {}
        self.files: dict[str, StoredFile] = {}
        self.answered: list[Answered] = []
        self._lock = threading.RLock()
        self._holds: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}  # requests held now, by hold point
        self._cached: set[str] = set()  # the prompt cache: digests of the prefixes seen

    # -- test controls -------------------------------------------------------------------

    def configure(self, **changes: Any) -> BatchSettings:
        """Change the settings for batches created from now on."""
        with self._lock:
            self.settings = BatchSettings.from_json(changes, self.settings)
            return self.settings

    def reset(self) -> None:
        self.release()
        with self._lock:
            self.settings = BatchSettings()
            self.jobs.clear()
            self.files.clear()
            self.answered.clear()
            self._cached.clear()

    def hold(self, *points: HoldPoint) -> None:
        with self._lock:
            for point in points:
                self._holds.setdefault(point, asyncio.Event())

    def release(self) -> None:
        with self._lock:
            holds, self._holds = self._holds, {}
        loop = getattr(self.server, "_loop", None)
        for event in holds.values():
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def gate(self, point: HoldPoint, request: Request) -> bool:
        """Wait while ``point`` is held; False when the client went away meanwhile (then the
        request is dropped, as if it never arrived)."""
        with self._lock:
            event = self._holds.get(point)
            if event is None:
                return True
            self.waiting[point] = self.waiting.get(point, 0) + 1
        try:
            await event.wait()
        finally:
            with self._lock:
                self.waiting[point] -= 1
        return not await request.is_disconnected()

    def answered_by_item(self) -> dict[str, list[Outcome]]:
        with self._lock:
            out: dict[str, list[Outcome]] = {}
            for record in self.answered:
                out.setdefault(record.custom_id, []).append(record.outcome)
            return out

    # -- files -----------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, content: bytes, prefix: str = "file-") -> StoredFile:
        stored = StoredFile(prefix + secrets.token_hex(12), filename, purpose, content, int(time.time()))
        with self._lock:
            self.files[stored.file_id] = stored
        return stored

    def file(self, file_id: str) -> StoredFile | None:
        with self._lock:
            return self.files.get(file_id)

    # -- batches ---------------------------------------------------------------------------

    def create(self, prefix: str, protocol: WireProtocol, request: Request, items: Iterable[BatchItem],
               **extra: Any) -> BatchJob:
        with self._lock:
            settings = dataclasses.replace(self.settings)
            items = list(items)
            order = list(range(len(items)))
            random.Random(settings.seed).shuffle(order)
            job = BatchJob(prefix + secrets.token_hex(12), protocol, dict(request.headers), items, settings,
                           time.time(), order, extra=dict(extra))
            self.jobs[job.batch_id] = job
            return job

    def get(self, batch_id: str) -> BatchJob | None:
        with self._lock:
            job = self.jobs.get(batch_id)
        if job is not None:
            self.advance(job)
        return job

    def listed(self, prefix: str) -> list[BatchJob]:
        """The batches of one wire format (by id prefix), newest first, brought up to date."""
        with self._lock:
            jobs = [job for job in self.jobs.values() if job.batch_id.startswith(prefix)]
        for job in jobs:
            self.advance(job)
        return sorted(jobs, key=lambda job: job.created_at, reverse=True)

    def cancel(self, job: BatchJob) -> None:
        self.advance(job)
        with self._lock:
            if job.cancelled_at is None and job.phase(time.time()) != "ended":
                job.cancelled_at = time.time()

    def advance(self, job: BatchJob, now: float | None = None) -> float:
        """Answer the items due by ``now``; settle the rest once the batch has ended. Returns
        ``now``: a caller judges the batch's phase at the same moment (a later clock read could
        say "ended" with items not answered yet, and a results file would miss them)."""
        now = time.time() if now is None else now
        with self._lock:
            phase = job.phase(now)
            if job.failed is not None:
                return
            s = job.settings
            if job.cancelled_at is not None:
                run_until = min(now, job.cancelled_at)
            else:
                run_until = now
            fraction = (run_until - job.created_at - s.validate_s) / s.run_s if s.run_s > 0 else 1.0
            due = math.ceil(len(job.items) * min(1.0, max(0.0, fraction)))
            if s.expire_after is not None:
                due = min(due, s.expire_after)
            while job.answered_count < due:
                item = job.items[job.order[job.answered_count]]
                job.answered_count += 1
                self._answer(job, item)
            if phase == "ended":
                rest: Outcome = "canceled" if job.cancelled_at is not None else "expired"
                for item in job.items:
                    if item.outcome == "pending":
                        item.outcome = rest
                        self.answered.append(Answered(job.batch_id, item.custom_id, rest))
        return now

    def _answer(self, job: BatchJob, item: BatchItem) -> None:
        """The online answer to one item: parse, script, render."""
        status, body = self.answer_body(job.protocol, job.headers, item.body, job.extra.get("path_params"),
                                        job.settings)
        item.status, item.answer = status, body
        item.outcome = "succeeded" if status == 200 else "errored"
        self.answered.append(Answered(job.batch_id, item.custom_id, item.outcome))

    def answer_body(self, protocol: WireProtocol, headers: dict[str, str], body: Any,
                    path_params: dict[str, str] | None = None,
                    settings: BatchSettings | None = None) -> tuple[int, dict[str, Any]]:
        """An online request's answer (status, JSON body), as if ``body`` came on the protocol's
        first path (``path_params`` fill it in: Gemini's model)."""
        path = protocol.paths[0].format(**(path_params or {})) if path_params else protocol.paths[0]
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "path_params": path_params or {},
                 "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
        request = Request(scope)
        try:
            scripted = protocol.parse(request, body)
        except ProtocolError as exc:
            return exc.response.status_code, json.loads(bytes(exc.response.body))
        answer = self.server.script.next_answer(scripted)
        if isinstance(answer, Fault) and answer.kind not in _CONNECTION_FAULTS:
            response = protocol.render_fault(answer, scripted)
        else:
            reply = answer if isinstance(answer, Reply) else self.server.script.fallback(scripted)
            if not isinstance(reply, Reply):
                reply = echo_handler(scripted)
            if not reply.cached_tokens and not reply.cache_write_tokens:
                read, write = self._prompt_cache(protocol.name, body, settings or self.settings)
                reply = dataclasses.replace(reply, cached_tokens=read, cache_write_tokens=write)
            response = protocol.render_json(reply, scripted)
        return response.status_code, json.loads(bytes(response.body))

    def _prompt_cache(self, protocol: str, body: Any, settings: BatchSettings) -> tuple[int, int]:
        """(tokens read from the cache, tokens written to it) for one request (module docstring)."""
        if not isinstance(body, dict):
            return 0, 0
        model = str(body.get("model"))
        if protocol == "anthropic":
            pieces: list[Any] = list(body.get("tools") or [])
            system = body.get("system")
            pieces += [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
            for message in body.get("messages") or []:
                content = message.get("content")
                blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
                pieces += [{"role": message.get("role"), **block} for block in blocks]
            marked = [i for i, piece in enumerate(pieces) if isinstance(piece, dict) and "cache_control" in piece]
            if not marked:
                return 0, 0
            prefix = pieces[: marked[-1] + 1]
            tokens = _tokens(_text_chars(prefix))
            if tokens < _cache_minimum(model, settings):
                return 0, 0
            key = hashlib.sha256(json.dumps([model, prefix], sort_keys=True).encode()).hexdigest()
            with self._lock:
                if key in self._cached:
                    return tokens, 0
                self._cached.add(key)
                return 0, tokens
        if protocol == "openai":
            text = "".join(_message_text(message) for message in body.get("messages") or [])
            first, step = _cache_minimum(model, settings) * 4, 128 * 4  # in characters, four to a token
            cached, hit = 0, True
            with self._lock:
                for end in range(first, len(text) + 1, step):  # a prefix is cached only if its shorter ones are
                    key = hashlib.sha256(f"{model}\0{text[:end]}".encode()).hexdigest()
                    hit = hit and key in self._cached
                    cached = end if hit else cached
                    self._cached.add(key)
            return (_tokens(cached) if cached else 0), 0
        return 0, 0


# Anthropic's minimum cacheable prompt lengths (docs: prompt caching, "cache limitations"); the
# longest matching model-name prefix wins; every other model 1,024 (OpenAI's too)
_CACHE_MINIMUMS = {"claude-haiku-4-5": 4096, "claude-opus-4-5": 4096, "claude-3-5-haiku": 2048,
                   "claude-3-haiku": 2048}


def _cache_minimum(model: str, settings: BatchSettings) -> int:
    if settings.cache_min_tokens is not None:
        return settings.cache_min_tokens
    name = model.split("/")[-1]
    best = max((prefix for prefix in _CACHE_MINIMUMS if name.startswith(prefix)), key=len, default=None)
    return 1024 if best is None else _CACHE_MINIMUMS[best]


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if isinstance(part, dict))
