"""The ``dq`` command. Errors are one readable line, not a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

__all__ = ["main"]

console = Console()
err = Console(stderr=True)


def _client() -> Any:
    from tasks.client import JobClient

    return JobClient()


def cmd_demo(args: argparse.Namespace) -> int:
    from tasks.demo import run_demo

    return run_demo(console)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.__main__ import main as worker_main

    return worker_main(args.rest)


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
    result = _client().get(args.job_id)
    console.print(f"{result.job_id}  {result.status.value}  attempts={result.attempts}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    console.print(_client().cancel(args.job_id).value)
    return 0


def _print_stream(client: Any, job_id: str, after: int = 0) -> int:
    for step in client.stream(job_id, after_seq=after):
        if step.action_type == "assistant_delta":
            console.print(step.messages, end="", style="cyan")
            continue
        console.print(f"\n[bold]{step.role}[/bold] {step.action_type} [{step.status}] {(step.messages or '')[:200]}")
    console.print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dq", description="datus-queue: LLM jobs on Celery and Redis")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the model layer end to end with no API keys").set_defaults(func=cmd_demo)
    worker = sub.add_parser("worker", help="start a worker pinned to providers (see: dq worker --help)",
                            add_help=False)
    worker.add_argument("rest", nargs=argparse.REMAINDER)
    worker.set_defaults(func=cmd_worker)
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
    for name, func, text in (("status", cmd_status, "a job's status"), ("cancel", cmd_cancel, "cancel a job")):
        command = sub.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "submit" and args.prompt is None and not args.messages:
        err.print("dq submit: give a prompt or --messages FILE")
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # one readable line; DQ_DEBUG=1 shows the traceback
        import os

        if os.environ.get("DQ_DEBUG"):
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
