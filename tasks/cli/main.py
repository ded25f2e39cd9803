"""The ``dq`` command. Errors are one readable line, not a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from rich.console import Console

__all__ = ["main"]

console = Console()
err = Console(stderr=True)


def _client() -> Any:
    from datus_queue.tasks.client import JobClient

    return JobClient()


def cmd_demo(args: argparse.Namespace) -> int:
    from datus_queue.tasks.cli.demo import run_demo

    return run_demo(console, model=args.model, quick=args.quick)


def run_worker(argv: list[str]) -> NoReturn:
    """``dq worker ARGS``: this process becomes ``python -m datus_queue.workers ARGS`` (same pid, so
    supervisors' signals reach the worker itself). ``tasks`` never imports ``workers``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "datus_queue.workers", *argv])


def run_beat(argv: list[str]) -> NoReturn:
    """``dq beat ARGS``: this process becomes ``python -m datus_queue.scheduler ARGS``, as `run_worker`
    does (``tasks`` never imports ``scheduler``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "datus_queue.scheduler", *argv])


def cmd_submit(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"model": args.model, "instruction": args.instruction or ""}
    if args.messages:
        with open(args.messages, encoding="utf-8") as handle:
            request["messages"] = json.load(handle)
    else:
        request["prompt"] = args.prompt
    if args.tools:
        request.update(kind="tool_run", mcp_servers=args.tools)
    elif args.json:
        request["kind"] = "json"
    client = _client()
    job_id = client.submit(request)
    console.print(job_id)
    if args.stream:
        return _print_stream(client, job_id)
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    result = _client().result(args.job_id, timeout=args.timeout)
    console.print_json(result.model_dump_json())
    return 0 if result.status.value == "succeeded" else 1


def cmd_stream(args: argparse.Namespace) -> int:
    return _print_stream(_client(), args.job_id, args.after)


def cmd_status(args: argparse.Namespace) -> int:
    client = _client()
    if args.id is None:
        counts = {k: v for k, v in client.store.count_by_status().items() if v}
        console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
        console.print(_sweeper_line(client), markup=False, highlight=False, soft_wrap=True)
        dead = len(client.store.dead_letters())
        if dead:
            console.print(f"dead letters: {dead} (dq dead list)", markup=False, highlight=False)
        from datus_queue.tasks.store.provider_batches import METRIC_STATES, ProviderBatchStore

        parts: dict[str, int] = {}
        for (_provider, state), n in ProviderBatchStore(client.store).count_by_state().items():
            parts[state] = parts.get(state, 0) + n
        if parts:
            console.print("provider batches: " + ", ".join(f"{state} {parts[state]}" for state in METRIC_STATES
                                                           if parts.get(state)), markup=False, highlight=False)
        return 0
    batch = client.store.batch_summary(args.id)
    if batch is not None:
        info = client.store.get_batch(args.id)
        counts = ", ".join(f"{k} {v}" for k, v in batch.counts.items() if v)
        console.print(f"batch {args.id} [{info.status.value if info else '?'}] model={info.model if info else '?'}: "
                      f"{batch.done}/{batch.total} done ({counts}), cost ${batch.cost_usd:.4f}", markup=False)
        from datus_queue.tasks.store.provider_batches import ProviderBatchStore

        for part in ProviderBatchStore(client.store).parts(args.id):
            counts = ", ".join(f"{k} {v}" for k, v in (part.request_counts or {}).items() if k != "error")
            console.print(f"  provider batch {part.provider_batch_id or '(not created)'}  {part.state.value}"
                          f"  {part.provider_status or '-'}  {part.items} items  round {part.round}"
                          + (f"  ({counts})" if counts else "") + (f"  error: {part.error}" if part.error else ""),
                          markup=False, highlight=False)
        return 0
    from datus_queue.tasks.client import JobNotFound

    try:
        result = client.get(args.id)
    except JobNotFound:
        raise JobNotFound(args.id, "job or batch") from None
    error = f"  {result.error.code}: {result.error.message}" if result.error else ""
    extra = "".join(f"  {name}={value}" for name, value in (("resends", getattr(result, "resends", 0)),
                                                              ("replays", getattr(result, "replays", 0)),
                                                              ("caller_waits", getattr(result, "caller_waits", 0)))
                    if value)
    console.print(f"{result.job_id}  {result.status.value}  attempts={result.attempts}  "
                  f"cost=${result.cost_usd:.6f}{extra}{error}", markup=False, highlight=False)
    return 0


def _sweeper_line(client: Any) -> str:
    """When the sweeper last ran and what it did (its runs are counted in Redis)."""
    from datetime import UTC, datetime

    from datus_queue.tasks import keys

    record = {k.decode(): v.decode() for k, v in client.redis.hgetall(keys.maintenance("sweep")).items()}
    if not record:
        return "sweeper: has not run (is dq beat running? it sends the sweeps; the workers run them)"
    ago = (datetime.now(UTC) - datetime.fromisoformat(record["last_at"])).total_seconds()
    last = json.loads(record.get("last") or "{}")
    return (f"sweeper: last ran {ago:.0f}s ago ({len(last.get('resent', []))} re-sent, "
            f"{len(last.get('dead', []))} dead of {last.get('overdue', 0)} overdue); {record.get('runs', 0)} runs")


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from datus_queue.tasks.batch.provider_batches import ProviderBatchOptions, deadline_from
    from datus_queue.tasks.batch.report import ProgressView
    from datus_queue.tasks.batch.runner import BatchOptions, BatchRunner

    template = Path(args.prompt_template).read_text(encoding="utf-8") if args.prompt_template else None
    options = BatchOptions(
        model=args.model, db_url=args.db, dialect=args.dialect, mode=args.mode, tools=args.tools,
        out=Path(args.out) if args.out else None, resume=args.resume, force=args.force, budget_usd=args.budget_usd,
        prompt_template=template, max_in_flight=args.max_in_flight, run_id=args.run_id, via=args.via,
        api=ProviderBatchOptions(max_requests=args.api_max_requests,
                                 max_bytes=int(args.api_max_mb * 1024 * 1024) if args.api_max_mb else None,
                                 poll_s=args.api_poll_s, rounds=args.api_rounds,
                                 deadline=deadline_from(args.by) if args.by else None))
    client = _client()
    if args.via is None:  # --by lets the tool choose; without it, online
        options.via = "online"
        if options.api.deadline is not None:
            options.via = _choose_via(client, options, Path(args.input))
    elif args.by and args.via != "batch-api":
        raise ValueError("--by goes with --via batch-api (an online batch has no provider batches to cancel)")
    runner = BatchRunner(client, options, ProgressView())
    runner.check_out()
    runner.check()
    if args.db:
        _check_db(args.db)
    batch_id, stats = runner.run(Path(args.input))
    console.print(stats.summary_table(batch_id))
    if args.out:
        console.print(f"results: {args.out}")
    return 130 if stats.status == "interrupted" else 0


def _choose_via(client: Any, options: Any, input_path: Any) -> str:
    """--by without --via: the batch API when the provider's batch window fits before it; says which and why."""
    from datus_queue.tasks.batch.provider_batches import choose_via, open_provider_batches
    from datus_queue.tasks.batch.runner import batch_id_for
    from datus_queue.tasks.client import resolve_provider

    provider = resolve_provider(options.model, client.agent_config)
    in_flight = bool(options.resume and input_path.exists()
                     and open_provider_batches(client.store, batch_id_for(options, input_path)))
    choice = choose_via(provider, options.api.deadline, in_flight=in_flight)
    console.print(f"via {choice.via}: {choice.reason}", markup=False)
    return choice.via


def _check_db(url: str) -> None:
    """A database that is not there is an error now, not 10,000 failed items later."""
    from datus_queue.tasks.batch.scoring import DatabaseUnavailable, execute_sql

    try:
        result = execute_sql(url, "SELECT 1", timeout_s=10)
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(f"--db: {exc}") from None
    if result.error:
        raise DatabaseUnavailable(f"--db: {result.error.splitlines()[0]}")


def cmd_metrics(args: argparse.Namespace) -> int:
    from datus_queue.tasks.observability.exporter import serve_fleet_metrics

    serve_fleet_metrics(args.port, args.addr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from datus_queue.tasks.batch.sample import write_sample

    for path in write_sample(args.directory, overwrite=args.force):
        console.print(str(path), markup=False, highlight=False)
    return 0


def cmd_dead_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    letters = _client().store.dead_letters(limit=args.limit)
    if not letters:
        console.print("no dead letters")
        return 0
    table = Table("id", "reason", "when", "kind", "model", "status", box=None, pad_edge=False)
    for letter in letters:
        times = f" (×{letter.times})" if letter.times > 1 else ""
        table.add_row(letter.dead_id, letter.reason + times, f"{letter.at:%Y-%m-%d %H:%M:%S}Z",
                      letter.kind or "message", letter.model or "-", letter.status.value if letter.status else "-")
    console.print(table)
    return 0


def cmd_dead_show(args: argparse.Namespace) -> int:
    from datus_queue.tasks.client import JobNotFound

    client = _client()
    letter = client.store.dead_letter(args.id)
    if letter is None:
        raise JobNotFound(args.id, "dead letter")
    shown: dict[str, Any] = {"dead_letter": letter.model_dump(mode="json")}
    if letter.job_id is not None and (job := client.store.get(letter.job_id)) is not None:
        shown["job"] = job.model_dump(mode="json")
        request = client.store.get_request(letter.job_id)
        shown["request"] = request.model_dump(mode="json", exclude_defaults=True) if request else None
    console.print_json(json.dumps(shown))
    return 0


def cmd_dead_replay(args: argparse.Namespace) -> int:
    from datus_queue.tasks.maintenance.dead_letters import replay, replay_all

    client = _client()
    if args.all:
        replayed, skipped = replay_all(client)
        for job_id in replayed:
            console.print(f"replayed {job_id}", markup=False)
        for dead_id, why in skipped:
            console.print(f"skipped {dead_id}: {why}", markup=False, highlight=False)
        console.print(f"{len(replayed)} replayed, {len(skipped)} skipped")
        return 0
    console.print(f"replayed {replay(client, args.id)}", markup=False)
    return 0


def cmd_dead_purge(args: argparse.Namespace) -> int:
    from datus_queue.tasks.maintenance.dead_letters import purge

    removed = purge(_client().store, args.older_than, args.ids)
    console.print(f"purged {removed} dead letter(s)")
    return 0


def _age(text: str) -> Any:
    from datus_queue.tasks.maintenance.dead_letters import parse_age

    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--older-than {text!r}: ")) from None


def cmd_cancel(args: argparse.Namespace) -> int:
    from datus_queue.tasks.client import JobNotFound

    client = _client()
    try:  # a job first: cancelling a running job is a race against its end
        console.print(client.cancel(args.job_id).value)
        return 0
    except JobNotFound:
        if client.store.get_batch(args.job_id) is None:
            raise JobNotFound(args.job_id, "job or batch") from None
    from datus_queue.tasks.batch.provider_batches import cancel_provider_batches

    lines = cancel_provider_batches(client, args.job_id)  # a batch: its provider batches (--via batch-api)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    console.print(f"{len(lines)} provider batch(es) cancelled" if lines else "no provider batches open")
    return 0


def _print_stream(client: Any, job_id: str, after: int = 0) -> int:
    for step in client.stream(job_id, after_seq=after):
        if step.action_type == "assistant_delta":
            console.print(step.messages, end="", style="cyan", markup=False, highlight=False)
            continue
        console.print(f"\n{step.role} {step.action_type} [{step.status}] {(step.messages or '')[:200]}",
                      markup=False, highlight=False)
    console.print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dq", description="datus-queue: LLM jobs on Celery and Redis")
    parser.add_argument("--version", action="version", version=f"dq (datus-queue) {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the sample batch end to end on this machine, no API keys needed")
    demo.add_argument("--model", default=None, help="a real model from DQ_CONFIG instead of the scripted fake")
    demo.add_argument("--quick", action="store_true", help="only the in-process tour of the model layer")
    demo.set_defaults(func=cmd_demo)
    # listed for `dq --help`; `main` hands `dq worker ...` to the worker before parsing
    sub.add_parser("worker", help="start a worker pinned to providers' queues (dq worker --help lists its options)",
                   add_help=False)
    sub.add_parser("beat", help="start the scheduler: the sweeper, pruning and agent.yml's scheduled batches "
                                "(a second one is a hot standby)", add_help=False)
    submit = sub.add_parser("submit", help="submit a job")
    submit.add_argument("prompt", nargs="?", default=None)
    submit.add_argument("--messages", help="a JSON file with a list of chat messages")
    submit.add_argument("--model", default="default")
    submit.add_argument("--instruction")
    submit.add_argument("--json", action="store_true", help="ask for JSON output")
    submit.add_argument("--tools", action="append", help="an MCP server name from agent.yml (repeatable)")
    submit.add_argument("--stream", action="store_true", help="print the steps as they happen")
    submit.set_defaults(func=cmd_submit)
    result = sub.add_parser("result", help="wait for a job's result")
    result.add_argument("job_id")
    result.add_argument("--timeout", type=float, default=None)
    result.set_defaults(func=cmd_result)
    stream = sub.add_parser("stream", help="print a job's steps as they happen")
    stream.add_argument("job_id")
    stream.add_argument("--after", type=int, default=0, help="resume after this event number")
    stream.set_defaults(func=cmd_stream)
    status = sub.add_parser("status", help="a job's or a batch's status (no id: counts of all jobs)")
    status.add_argument("id", nargs="?", default=None)
    status.set_defaults(func=cmd_status)
    cancel = sub.add_parser("cancel", help="cancel a job, or a batch's provider batches")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(func=cmd_cancel)
    batch = sub.add_parser("batch", help="turn a file of questions into SQL, checked and scored")
    batch.add_argument("input", help="JSONL or CSV with question, and optional id, evidence, gold_sql")
    batch.add_argument("--model", required=True, help="a model name from agent.yml, or provider:model")
    batch.add_argument("--db", default=os.environ.get("DQ_BATCH_DB") or None,
                       help="SQLAlchemy URL of the database (schema, execution, scoring); default $DQ_BATCH_DB "
                            "(an environment variable: a URL with a password on the command line is seen by ps)")
    batch.add_argument("--dialect", default="sqlite")
    batch.add_argument("--mode", choices=["generate", "tool_run"], default="generate")
    batch.add_argument("--tools", action="append", help="MCP server name(s) from agent.yml for tool_run mode (default: the shipped read-only "
                            "SQL tools on --db)")
    batch.add_argument("--out", help="write one JSON line per item here (a file that is there and not empty: "
                                     "give --resume to append to it or --force to replace it)")
    resume_or_force = batch.add_mutually_exclusive_group()
    resume_or_force.add_argument("--resume", action="store_true",
                                 help="continue this batch; finished items are skipped, --out is appended to")
    resume_or_force.add_argument("--force", action="store_true", help="replace the --out file if it is there")
    batch.add_argument("--budget-usd", type=float, default=None, help="stop submitting once this much is spent")
    batch.add_argument("--prompt-template", help="a file with {question} {schema} {evidence} {dialect}")
    batch.add_argument("--max-in-flight", type=int, default=200)
    batch.add_argument("--run-id", help="make this run a batch of its own (e.g. a nightly slot); the same id "
                                        "continues it")
    batch.add_argument("--via", choices=["online", "batch-api"], default=None,
                       help="online: a job per item (default; with --by: chosen, see --by); batch-api: the provider's "
                            "batch API at batch prices "
                            "(OpenAI, Claude; answers may take up to 24 h; this command waits, --resume picks up)")
    batch.add_argument("--api-max-requests", type=int, default=None, metavar="N",
                       help="batch-api: at most N requests per provider batch (default and ceiling: the provider's)")
    batch.add_argument("--api-max-mb", type=float, default=None, metavar="MB",
                       help="batch-api: at most MB megabytes per provider batch (default and ceiling: the provider's)")
    batch.add_argument("--api-poll-s", type=float, default=5.0, metavar="S",
                       help="batch-api: the first wait between polls; it grows by half each time, to 60 s")
    batch.add_argument("--by", metavar="WHEN", default=None,
                       help="batch-api: finish by WHEN (90s, 30m, 6h, 2d, or an ISO time): then the open provider "
                            "batches are cancelled, what they answered is kept, and the rest runs online (workers); "
                            "without --via: batch-api when WHEN is at least the provider's batch window (24 h) away, "
                            "else online")
    batch.add_argument("--api-rounds", type=int, default=3, metavar="N",
                       help="batch-api: submissions of a failed or expired item before it runs online instead")
    batch.set_defaults(func=cmd_batch)
    dead = sub.add_parser("dead", help="dead letters: jobs and messages that could not run")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True)
    dead_list = dead_sub.add_parser("list", help="every dead letter: id, reason, when, kind, model")
    dead_list.add_argument("--limit", type=int, default=None, help="show only the newest N")
    dead_list.set_defaults(func=cmd_dead_list)
    dead_show = dead_sub.add_parser("show", help="one dead letter, with its job row and request")
    dead_show.add_argument("id")
    dead_show.set_defaults(func=cmd_dead_show)
    dead_replay = dead_sub.add_parser("replay", help="run a dead job again from its stored request, as new")
    which = dead_replay.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", default=None, help="a dead letter's id (dq dead list)")
    which.add_argument("--all", action="store_true", help="every dead letter that is a job")
    dead_replay.set_defaults(func=cmd_dead_replay)
    dead_purge = dead_sub.add_parser("purge", help="delete dead-letter records (the job rows stay)")
    dead_purge.add_argument("ids", nargs="*", metavar="ID", help="these records")
    dead_purge.add_argument("--older-than", type=_age, default=None, metavar="AGE",
                            help="records last seen longer ago than AGE: 30m, 12h, 7d, 2w")
    dead_purge.set_defaults(func=cmd_dead_purge)
    metrics = sub.add_parser("metrics", help="serve the fleet's gauges for Prometheus: queue depths, dead letters, "
                                             "jobs by status (each worker serves its own on --metrics-port)")
    metrics.add_argument("--port", type=int, default=9110)
    metrics.add_argument("--addr", default="0.0.0.0", help="the address to listen on")
    metrics.set_defaults(func=cmd_metrics)
    sample = sub.add_parser("sample", help="write the bundled sample here: warehouse.db, questions.jsonl, "
                                           "questions.csv")
    sample.add_argument("directory", nargs="?", default=".")
    sample.add_argument("--force", action="store_true", help="replace files of those names")
    sample.set_defaults(func=cmd_sample)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("datus-queue")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _unsupported_redis_url() -> str | None:
    """Why ``DQ_REDIS_URL`` cannot be used (`tasks.redis_connect`), or None."""
    from datus_queue.tasks.redis_connect import UnsupportedRedisURL, parse
    from datus_queue.tasks.settings import Settings

    try:
        settings = Settings()  # not get_settings(): nothing cached before the command runs
    except Exception:  # noqa: BLE001 - reported where the settings are used
        return None
    try:
        parse(settings.redis_url, settings)
    except UnsupportedRedisURL as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from datus.models.redact import install_log_redaction, redact

    install_log_redaction()  # every dq command (beat, batch, …): no token, key or secret URL in a log line
    # `dq demo` starts a Redis of its own
    refused = _unsupported_redis_url() if argv[:1] not in ([], ["-h"], ["--help"], ["demo"]) else None
    if refused:  # e.g. Redis Cluster: said at start, by every command, before anything connects
        err.print(f"dq: {refused}", markup=False)
        return 2
    if argv[:1] == ["worker"]:
        run_worker(argv[1:])
    if argv[:1] == ["beat"]:
        run_beat(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "submit" and args.prompt is None and not args.messages:
        err.print("dq submit: give a prompt or --messages FILE")
        return 2
    if args.command == "dead" and args.dead_command == "purge" and not args.ids and args.older_than is None:
        err.print("dq dead purge: give --older-than AGE (e.g. 7d) or the ids to delete")
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # one readable line; DQ_DEBUG=1 shows the traceback
        if os.environ.get("DQ_DEBUG"):
            raise
        from rich.markup import escape

        said = getattr(exc, "reason", None) or str(exc)  # a model-layer error's words, without Datus's code prefix
        text = said if isinstance(exc, _user_errors()) else f"{type(exc).__name__}: {said}"
        # one line, whatever it says, and no secret in it
        err.print("[red]error:[/red]", escape(" ".join(redact(text).split())), soft_wrap=True)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message alone says what to fix: shown without their class name."""
    from datus.models.errors import ModelConfigError
    from datus_queue.tasks.batch.input import BatchInputError
    from datus_queue.tasks.batch.scoring import DatabaseUnavailable
    from datus_queue.tasks.client import InvalidJob, JobNotFound
    from datus_queue.tasks.maintenance.dead_letters import NotReplayable
    from datus_queue.tasks.store import StoreError

    return (ModelConfigError, BatchInputError, DatabaseUnavailable, InvalidJob, JobNotFound, NotReplayable, StoreError,
            TimeoutError, FileNotFoundError, FileExistsError)


if __name__ == "__main__":
    sys.exit(main())
