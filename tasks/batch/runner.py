"""``dq batch``: a file of questions turned into SQL by jobs, checked, scored, recorded.

The client keeps at most ``max_in_flight`` jobs outstanding, polls the job store for the ones
that finished, scores each (extract the SQL, parse it for the dialect, run it read-only, compare
with the gold result set) and writes one JSON line per item. Items and their results live in
the job store, so ``dq status BATCH_ID`` works from any machine.

Every job's idempotency key is ``<batch>:<item>`` (``<batch>:#<sha256 of item>`` for an id too
long for a key, `item_key`): ``--resume`` (or a second run after Ctrl-C) submits again and gets
the same job back, so no item ever runs twice; items already scored are skipped. An item whose
request is refused (`InvalidJob`: over a bound of `tasks.schemas.Bounds`) fails on its own, with
that error in its record; the batch goes on. ``--out`` never appends by surprise: a file that
is there and not empty is an error unless ``--resume`` (append to it) or ``--force`` (replace it). The batch id is derived from the input, the model and the prompt, so the same
command finds the same batch.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from datus_queue.tasks.batch.input import Question, iter_questions
from datus_queue.tasks.batch.provider_batches import ProviderBatchOptions
from datus_queue.tasks.batch.report import BatchStats, ProgressView
from datus_queue.tasks.batch.scoring import schema_text, score_item
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.schemas import Bounds, JobStatus
from datus_queue.tasks.store import BatchStatus, StoredJob

__all__ = ["DEFAULT_TEMPLATE", "BatchOptions", "BatchRunner", "batch_id_for", "item_key"]

SUBMIT_CHUNK = 100  # questions submitted together (one transaction, one producer)

DEFAULT_TEMPLATE = """You are an expert {dialect} SQL writer.
Write one SQL query that answers the question, for this database:

{schema}

Question: {question}
{evidence}
Reply with the SQL in a ```sql block."""

TOOL_TEMPLATE = """Answer the question with one {dialect} SQL query. Explore the database with the tools
(list_tables, describe_table, read_query) first, then reply with the final SQL in a ```sql block.

Question: {question}
{evidence}"""


@dataclass
class BatchOptions:
    model: str
    db_url: str | None = None
    dialect: str = "sqlite"
    mode: str = "generate"  # generate | tool_run
    tools: list[str] | None = None  # tool_run: MCP servers from agent.yml; None: the SQL tools on db_url
    out: Path | None = None
    resume: bool = False
    force: bool = False  # replace an --out file that is there (without --resume: an error)
    budget_usd: float | None = None
    prompt_template: str | None = None
    max_in_flight: int = 200
    timeout_s: float = 10.0
    poll_s: float = 0.2
    name: str | None = None
    run_id: str | None = None  # makes this run a batch of its own (a scheduled slot); the same id resumes it
    via: str = "online"  # online (a job per item) | batch-api (the provider's batch API: tasks/batch/provider_batches.py)
    api: ProviderBatchOptions = field(default_factory=lambda: ProviderBatchOptions())


def template_for(options: BatchOptions) -> str:
    return options.prompt_template or (TOOL_TEMPLATE if options.mode == "tool_run" else DEFAULT_TEMPLATE)


def prompt_hash(options: BatchOptions) -> str:
    material = json.dumps([options.model, options.mode, template_for(options), options.dialect,
                           (options.tools or ["--db"]) if options.mode == "tool_run" else []])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def batch_id_for(options: BatchOptions, input_path: Path) -> str:
    """The batch of this input, model and prompt (and run id): the same command finds it again."""
    digest = hashlib.sha256()
    with Path(input_path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(prompt_hash(options).encode())
    if options.run_id:
        digest.update(b"\0run:" + options.run_id.encode())
    return f"b-{digest.hexdigest()[:16]}"


def item_key(batch_id: str, item_id: str) -> str:
    """The idempotency key of an item's job: ``<batch>:<item>``, or ``<batch>:#<sha256 of the
    item id>`` when that is longer than a key may be — the same for the same id, so ``--resume``
    finds the job again."""
    key = f"{batch_id}:{item_id}"
    if len(key) <= Bounds.IDEMPOTENCY_KEY_CHARS:
        return key
    return f"{batch_id}:#{hashlib.sha256(item_id.encode('utf-8', 'surrogatepass')).hexdigest()}"


class BatchRunner:
    def __init__(self, client: JobClient, options: BatchOptions, view: ProgressView | None = None) -> None:
        if options.mode not in ("generate", "tool_run"):
            raise ValueError(f"--mode must be generate or tool_run, not {options.mode!r}")
        if options.via not in ("online", "batch-api"):
            raise ValueError(f"--via must be online or batch-api, not {options.via!r}")
        if options.via == "batch-api" and options.mode != "generate":
            raise InvalidJob("--via batch-api runs --mode generate only (a tool run is many turns, each waiting "
                             "on the last: not one batch request)")
        if options.via == "batch-api" and options.budget_usd is not None:
            raise InvalidJob("--budget-usd is not enforced with --via batch-api yet (a provider batch is paid "
                             "as a whole): leave one of them out")
        if options.mode == "tool_run" and not options.tools and not options.db_url:
            raise InvalidJob("--mode tool_run needs --db (the workers open it with the shipped read-only SQL "
                             "tools) or --tools NAME (an MCP server from agent.mcp_servers)")
        self.client, self.options = client, options
        self.view = view or ProgressView()
        self.template = template_for(options)
        self.schema = ""
        self.stats = BatchStats()
        self.interrupted = False
        self.budget_hit = False
        # --force replaces the --out file (once, at the first open); otherwise results are appended
        self._out_mode = "w" if options.force and not options.resume else "a"

    # ---- identity ------------------------------------------------------------------------

    def prompt_hash(self) -> str:
        return prompt_hash(self.options)

    def batch_id(self, input_path: Path) -> str:
        return batch_id_for(self.options, input_path)

    # ---- the run -------------------------------------------------------------------------

    def check(self) -> None:
        """What would fail every item fails now, before any row: an unknown model, an unknown
        --tools name, a --db that may not travel in a job (a password in it)."""
        from datus_queue.tasks.client import resolve_provider

        resolve_provider(self.options.model, self.client.agent_config)
        if self.options.via == "batch-api":  # a provider with no batch API here: said now
            from datus.models.base import LLMBaseModel
            from datus.models.batch_apis import batch_api

            batch_api(LLMBaseModel.create_model(self.client.agent_config, self.options.model)).close()
        if self._sends_database():  # the CLI is the operator: its --db is allowed for its own batch
            self.client.allow_database(self.options.db_url)
        self.client.validate(self._request("(check)", None, "(check)"))

    def _sends_database(self) -> bool:
        return self.options.mode == "tool_run" and not self.options.tools and bool(self.options.db_url)

    def check_out(self) -> None:
        """``--out`` that is there and not empty: FileExistsError unless --resume or --force."""
        out = self.options.out
        if self.options.resume and self.options.force:
            raise ValueError("--resume appends to --out and --force replaces it: give one of them")
        if out is None or self.options.resume or self.options.force:
            return
        if out.is_dir():
            raise FileExistsError(f"--out {out} is a directory")
        if out.exists() and out.stat().st_size > 0:
            raise FileExistsError(f"--out {out} exists and is not empty: pass --resume to continue that batch "
                                  "(results are appended), --force to replace the file, or another --out")

    def run(self, input_path: Path) -> tuple[str, BatchStats]:
        input_path = Path(input_path)
        self.check_out()
        self.check()
        next(iter_questions(input_path), None)  # so does a missing or empty input file
        batch_id = self.batch_id(input_path)
        if self._sends_database():  # ... and on the workers, for this batch's jobs (tasks/databases.py)
            self.client.allow_database(self.options.db_url, batch_id=batch_id)
        store = self.client.store
        batch, created = store.create_batch(batch_id, model=self.options.model, prompt_hash=self.prompt_hash(),
                                            mode=self.options.mode,
                                            name=self.options.name or self.options.run_id or input_path.name,
                                            metadata={"input": str(input_path), "dialect": self.options.dialect})
        if not created:
            if not self.options.resume and store.final_item_ids(batch_id):
                raise ValueError(f"batch {batch_id} already ran for this input, model and prompt; "
                                 "pass --resume to continue it (finished items are skipped)")
            from datus_queue.tasks.batch.provider_batches import open_provider_batches

            if self.options.via == "online" and open_provider_batches(store, batch_id):
                raise InvalidJob(f"batch {batch_id} has provider batches in flight: continue it with --via batch-api; "
                                 "online jobs would run their items a second time")
            store.resume_batch(batch_id)
        if self.options.mode == "generate" and self.options.db_url:
            self.schema = schema_text(self.options.db_url, max_tokens=self._schema_budget())
        total = self._register(batch_id, input_path)
        done_before = store.final_item_ids(batch_id)
        self.stats.skipped = len(done_before)
        self.view.start(batch_id, total, len(done_before))
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            if self.options.via == "batch-api":
                from datus_queue.tasks.batch.provider_batches import ProviderBatchRun

                online = ProviderBatchRun(self, batch_id).run(input_path)
                if online and not self.interrupted:  # what the batch API could not do in its rounds
                    self.view.note(f"{len(online)} item(s) left after the batch API's rounds: running them online")
                    every = {q.id for q in iter_questions(input_path) if isinstance(q, Question)}
                    self._loop(batch_id, input_path, every - online)
            else:
                self._loop(batch_id, input_path, done_before)
        finally:
            signal.signal(signal.SIGINT, previous)
            self.view.stop()
        status = (BatchStatus.INTERRUPTED if self.interrupted else
                  BatchStatus.BUDGET_EXCEEDED if self.budget_hit else BatchStatus.COMPLETED)
        store.finish_batch(batch_id, status)
        self.stats.status = status.value
        return batch_id, self.stats

    def _schema_budget(self) -> int | None:
        from datus.models.base import LLMBaseModel

        try:
            model = LLMBaseModel.create_model(self.client.agent_config, self.options.model)
        except Exception:  # no keys here (the workers have them): keep the schema whole
            return None
        window = model.context_length()
        return int(window * 0.6) if window else None

    def _register(self, batch_id: str, input_path: Path) -> int:
        """Record every good question as a batch item (in chunks) and report the bad rows."""
        def items() -> Iterator[dict[str, Any]]:
            for entry in iter_questions(input_path):
                if isinstance(entry, Question):
                    yield {"item_id": entry.id, "question": entry.question}
                else:
                    self.stats.bad_rows.append(entry)
                    self.view.bad_row(entry)
        self.client.store.add_batch_items(batch_id, items())
        info = self.client.store.get_batch(batch_id)
        return info.total if info is not None else 0

    def _loop(self, batch_id: str, input_path: Path, done_before: set[str]) -> None:
        in_flight: dict[str, Question] = {}
        questions = (q for q in iter_questions(input_path) if isinstance(q, Question) and q.id not in done_before)
        exhausted = False
        out = self.open_out()
        try:
            while True:
                if self.options.budget_usd is not None and self.stats.cost_usd >= self.options.budget_usd:
                    if not self.budget_hit:
                        self.view.note(f"budget ${self.options.budget_usd:.4f} spent: no more submissions")
                    self.budget_hit = True
                while (not exhausted and not self.interrupted and not self.budget_hit
                       and len(in_flight) < self.options.max_in_flight):
                    room = min(SUBMIT_CHUNK, self.options.max_in_flight - len(in_flight))
                    chunk = list(islice(questions, room))
                    exhausted = len(chunk) < room
                    if chunk:
                        in_flight.update(zip(*self._submit(batch_id, chunk, out)))
                finished = self.client.store.final_jobs(in_flight)
                for job in finished:
                    question = in_flight.pop(job.job_id)
                    self._record(batch_id, question, job, out)
                if self.interrupted:
                    if in_flight or not exhausted:
                        self.view.note(f"interrupted: {len(in_flight)} job(s) left running and "
                                       f"{'more' if not exhausted else 'no more'} questions to submit; run again "
                                       "with --resume to finish (nothing runs twice)")
                    return
                if not in_flight and (exhausted or self.budget_hit):
                    return
                if in_flight and not finished:
                    time.sleep(self.options.poll_s)
                    self.view.idle(self.stats)
        finally:
            if out is not None:
                out.close()

    def open_out(self) -> Any:
        """The --out file for writing, or None: replaced at the first open under --force, else appended to."""
        if self.options.out is None:
            return None
        handle = self.options.out.open(self._out_mode, encoding="utf-8")
        self._out_mode = "a"
        return handle

    def prompt(self, question: Question) -> str:
        """An item's prompt: the same whether it goes as a job or in a provider batch."""
        return self.template.format(dialect=self.options.dialect, schema=self.schema, question=question.question,
                                    evidence=f"Hint: {question.evidence}" if question.evidence else "")

    def shared_prefix(self, prompt: str) -> str:
        """The start of ``prompt`` that every item's prompt shares: the template rendered up to
        its first per-item field ({question} or {evidence}); with the default template, the
        instructions and the schema. A provider batch marks it for the prompt cache."""
        import string

        head = []
        for literal, name, spec, conversion in string.Formatter().parse(self.template):
            head.append(literal)
            if name is None:
                break
            if name not in ("dialect", "schema"):
                break
            value = {"dialect": self.options.dialect, "schema": self.schema}[name]
            head.append(format(value if conversion is None else repr(value) if conversion == "r" else str(value),
                               spec or ""))
        prefix = "".join(head)
        return prefix if prompt.startswith(prefix) else ""

    def _submit(self, batch_id: str, questions: list[Question], out: Any = None
                ) -> tuple[list[str], list[Question]]:
        """Submit a chunk of questions (one transaction, one producer); their job ids and the
        questions submitted. A question whose request is refused fails on its own (recorded
        now, ``invalid_request``); the others go."""
        requests: list[dict[str, Any]] = []
        accepted: list[Question] = []
        for question in questions:
            request = self._request(self.prompt(question), batch_id, question.id)
            try:
                self.client.validate(request)
            except InvalidJob as exc:
                self._refuse(batch_id, question, str(exc), out)
                continue
            requests.append(request)
            accepted.append(question)
        job_ids = self.client.submit_many(requests) if requests else []
        self.client.store.mark_items_submitted(batch_id, [(q.id, job_id) for q, job_id in zip(accepted, job_ids)])
        return job_ids, accepted

    def _refuse(self, batch_id: str, question: Question, reason: str, out: Any) -> None:
        """An item whose job could not be made: failed, with the reason, no job."""
        record: dict[str, Any] = {
            "id": question.id, "question": question.question, "sql": None, "valid": False, "executed": False,
            "match": False if question.gold_sql else None, "error": reason, "error_code": "invalid_request",
            "rows_returned": None, "usage": {}, "cost_usd": 0.0, "latency_ms": None, "attempts": 0, "job_id": None,
            "status": JobStatus.FAILED.value}
        self.client.store.set_item_result(batch_id, question.id, JobStatus.FAILED, record, 0.0)
        self._write(record, out)

    def _request(self, prompt: str, batch_id: str | None, item_id: str) -> dict[str, Any]:
        request: dict[str, Any] = {"model": self.options.model, "prompt": prompt, "stream": False}
        if batch_id is not None:
            request.update(batch_id=batch_id, item_id=item_id, idempotency_key=item_key(batch_id, item_id))
        if self.options.mode == "tool_run" and self.options.tools:
            request.update(kind="tool_run", mcp_servers=self.options.tools)
        elif self.options.mode == "tool_run":
            request.update(kind="tool_run", database=self.options.db_url)
        return request

    def _record(self, batch_id: str, question: Question, job: StoredJob, out: Any) -> None:
        answer = job.output if isinstance(job.output, str) else json.dumps(job.output or "")
        latency_ms = ((job.finished_at - job.created_at).total_seconds() * 1000.0
                      if job.finished_at and job.created_at else None)
        error = job.error
        self.record_result(batch_id, question, job.status, out, answer=answer,
                           error=(error.message if error else job.status.value),
                           error_code=(error.code if error else job.status.value), usage=job.usage or {},
                           cost_usd=job.cost_usd, latency_ms=latency_ms, attempts=job.attempts, job_id=job.job_id)

    def record_result(self, batch_id: str, question: Question, status: JobStatus, out: Any, *, answer: str | None,
                      error: str | None, error_code: str | None, usage: dict[str, Any], cost_usd: float,
                      latency_ms: float | None, attempts: int, job_id: str | None,
                      extra: dict[str, Any] | None = None, once: bool = False) -> bool:
        """Score one item's answer and record it (store, --out, stats): the one way an item ends,
        whether its answer came from a job or from a provider batch. ``once``: write nothing and
        return False when the item was final already (a provider batch's answer seen again)."""
        record: dict[str, Any] = {"id": question.id, "question": question.question}
        if status is JobStatus.SUCCEEDED:
            score = score_item(answer, question.gold_sql, self.options.db_url, self.options.dialect,
                               self.options.timeout_s) if self.options.db_url else None
            match = score.match if score else None
            if match is None and score is not None and question.gold_sql and score.error_code != "gold_error":
                match = False  # no SQL, invalid SQL or an error is a miss, not a question without gold
            record.update(
                sql=score.sql if score else answer, valid=score.valid if score else None,
                executed=score.executed if score else None, match=match,
                error=score.error if score else None, error_code=score.error_code if score else None,
                rows_returned=score.rows_returned if score else None)
        else:
            record.update(sql=None, valid=False, executed=False, match=False if question.gold_sql else None,
                          error=error, error_code=error_code, rows_returned=None)
        record.update(usage=usage, cost_usd=cost_usd, latency_ms=latency_ms, attempts=attempts,
                      job_id=job_id, status=status.value, **(extra or {}))
        if not self.client.store.set_item_result(batch_id, question.id, status, record, cost_usd) and once:
            return False
        self._write(record, out)
        return True

    def _write(self, record: dict[str, Any], out: Any) -> None:
        if out is not None:
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            out.flush()
        self.stats.add(record)
        self.view.advance(self.stats)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
