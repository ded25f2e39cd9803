"""``dq demo --quick``: the model layer alone, in-process, with no API keys.

It starts the wire-level fake provider server, points a real provider adapter (the official
OpenAI SDK over HTTP) at it, and runs a plain generation, JSON output, a streamed answer and a
tool run with a Python function tool, printing each answer with its usage and cost.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from datus.models.base import LLMBaseModel
from datus.models.config import ModelConfig
from datus.models.scripted import Reply, ScriptedRequest, ScriptedToolCall
from datus.models.usage import Usage, track_usage
from datus.testing.fake_server import FakeProviderServer

__all__ = ["run_tour"]

_ROWS = {"customers": 42, "orders": 1337}


class SQLAnswer(BaseModel):
    sql: str
    explanation: str


def count_rows(table: str) -> int:
    """Count the rows of a table in the demo warehouse."""
    if table not in _ROWS:
        raise ValueError(f"no table {table!r}; tables: {', '.join(_ROWS)}")
    return _ROWS[table]


def _scripted(request: ScriptedRequest) -> Reply:
    """The fake model's answers: deterministic, shaped like what a real model would say."""
    text = request.last_user_text
    if any(m.get("role") == "tool" for m in request.messages):
        return Reply(text="The orders table holds 1337 rows.", input_tokens=180, output_tokens=12)
    if request.tools:
        return Reply(reasoning="I should count the rows of orders.",
                     tool_calls=(ScriptedToolCall("count_rows", {"table": "orders"}),),
                     input_tokens=150, output_tokens=20)
    if "JSON" in json.dumps(request.body) or "json" in text.lower():
        return Reply(text=json.dumps({"sql": "SELECT COUNT(*) FROM orders",
                                      "explanation": "counts every order"}), input_tokens=90, output_tokens=25)
    return Reply(text="Datus turns questions into SQL. Ask it how many orders there are.",
                 input_tokens=40, output_tokens=14)


async def _run(console: Console, model: LLMBaseModel) -> list[tuple[str, Usage]]:
    rows: list[tuple[str, Usage]] = []

    with track_usage() as calls:
        text = await model.agenerate("What does Datus do?", max_tokens=200)
    console.print(f"[bold]generate[/bold]  {text}")
    rows.append(("generate", calls[0]))

    with track_usage() as calls:
        answer = await model.agenerate_with_json_output("Give me SQL as JSON: how many orders?",
                                                        response_format=SQLAnswer)
    console.print(f"[bold]json[/bold]      {answer}")
    rows.append(("json", calls[0]))

    console.print("[bold]stream[/bold]    ", end="")
    with track_usage() as calls:
        async for delta in model.agenerate_stream("What does Datus do?"):
            console.print(delta, end="", style="cyan")
    console.print()
    rows.append(("stream", calls[0]))

    console.print("[bold]tool run[/bold]")
    with track_usage() as calls:
        async for step in model.generate_with_tools_stream(
            "How many orders are there?", tools=[count_rows], instruction="Answer with the tools."
        ):
            if step.action_type == "assistant_delta":
                continue
            detail = step.output.get("raw_output") if isinstance(step.output, dict) and step.role == "tool" else ""
            console.print(f"  {step.role:<9} {step.action_type:<16} {step.status:<10} "
                          f"{_summary(step)[:50]} {detail or ''}")
    rows.append(("tool run", sum(calls, Usage())))
    return rows


def _summary(step: Any) -> str:
    reasoning = step.output.get("reasoning") if isinstance(step.output, dict) else None
    return step.messages or reasoning or ""


def run_tour(console: Console | None = None) -> int:
    console = console or Console()
    with FakeProviderServer(latency_s=0.02) as server:
        server.script.reset(fallback=_scripted)
        config = ModelConfig(type="openai", model="gpt-4o-mini", api_key="sk-demo-not-a-real-key",
                             base_url=server.openai_base_url)
        model = LLMBaseModel.model_class("openai")(model_config=config)
        console.print(f"[dim]fake OpenAI-compatible provider at {server.url}; "
                      f"model {model.provider}:{model.model_name} through the official SDK[/dim]\n")
        rows = asyncio.run(_run(console, model))
    table = Table(title="usage", title_justify="left")
    for column in ("call", "requests", "input", "cached", "output", "cost (USD)", "latency"):
        table.add_column(column, justify="right" if column != "call" else "left")
    total = Usage()
    for name, usage in rows:
        total = total + usage
        table.add_row(name, str(usage.requests), str(usage.input_tokens), str(usage.cached_tokens),
                      str(usage.output_tokens), f"{usage.cost_usd:.6f}", f"{usage.latency_ms:.0f} ms")
    table.add_row("total", str(total.requests), str(total.input_tokens), str(total.cached_tokens),
                  str(total.output_tokens), f"{total.cost_usd:.6f}", f"{total.latency_ms:.0f} ms", style="bold")
    console.print()
    console.print(table)
    return 0
