"""What a batch shows a person: a live progress bar, and a summary at the end."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["BatchStats", "ProgressView"]


@dataclass
class BatchStats:
    items: int = 0
    succeeded: int = 0
    failed: int = 0
    valid: int = 0
    executed: int = 0
    with_gold: int = 0
    matched: int = 0
    skipped: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    online_cost_usd: float = 0.0  # what the same tokens cost online (= cost_usd for online items)
    via_batch_api: int = 0  # items answered by a provider batch
    cache_savings_usd: float = 0.0  # what the prompt cache saved the provider batches (batch prices)
    cached_tokens: int = 0  # input tokens read from the provider's prompt cache (provider batches)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    bad_rows: list[Any] = field(default_factory=list)
    status: str = "running"
    started: float = field(default_factory=time.monotonic)

    def add(self, record: dict[str, Any]) -> None:
        self.items += 1
        if record.get("status") == "succeeded":
            self.succeeded += 1
        else:
            self.failed += 1
        self.valid += bool(record.get("valid"))
        self.executed += bool(record.get("executed"))
        if record.get("match") is not None:
            self.with_gold += 1
            self.matched += bool(record["match"])
        if record.get("error_code"):
            self.errors[str(record["error_code"])] += 1
        usage = record.get("usage") or {}
        self.input_tokens += int(usage.get("input_tokens", 0) or 0)
        self.output_tokens += int(usage.get("output_tokens", 0) or 0)
        self.cost_usd += float(record.get("cost_usd") or 0.0)
        if record.get("via") == "batch-api":
            self.via_batch_api += 1
            self.online_cost_usd += float(record.get("online_cost_usd") or 0.0)
            self.cache_savings_usd += float(record.get("cache_savings_usd") or 0.0)
            self.cached_tokens += int(usage.get("cached_tokens", 0) or 0)
        else:
            self.online_cost_usd += float(record.get("cost_usd") or 0.0)
        if record.get("latency_ms") is not None:
            self.latencies_ms.append(float(record["latency_ms"]))

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def accuracy(self) -> float | None:
        return self.matched / self.with_gold if self.with_gold else None

    def summary_table(self, batch_id: str) -> Table:
        table = Table(title=f"batch {batch_id}: {self.status}", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        pct = (lambda n, d: f"{n}  ({n / d:.0%})" if d else str(n))
        table.add_row("items run", str(self.items) + (f"  (+{self.skipped} done before)" if self.skipped else ""))
        table.add_row("bad input rows", str(len(self.bad_rows)))
        table.add_row("jobs failed", str(self.failed))
        table.add_row("valid SQL", pct(self.valid, self.items))
        table.add_row("executed", pct(self.executed, self.items))
        accuracy = self.accuracy
        table.add_row("execution accuracy",
                      f"{accuracy:.1%}  ({self.matched}/{self.with_gold})" if accuracy is not None else "no gold SQL")
        table.add_row("errors by code", ", ".join(f"{code} {n}" for code, n in self.errors.most_common()) or "none")
        table.add_row("tokens in / out", f"{self.input_tokens:,} / {self.output_tokens:,}")
        table.add_row("cost", f"${self.cost_usd:.4f}")
        if self.via_batch_api:
            saved = self.online_cost_usd - self.cost_usd
            table.add_row("cost online (same tokens)", f"${self.online_cost_usd:.4f}  (saved ${saved:.4f}, "
                          f"{self.via_batch_api} item(s) by batch API)")
            table.add_row("cache savings", f"${self.cache_savings_usd:.4f}  ({self.cached_tokens:,} input tokens "
                          "read from the prompt cache)")
        p50, p95 = self.percentile(0.5), self.percentile(0.95)
        table.add_row("latency p50 / p95", f"{p50 / 1000:.2f} s / {p95 / 1000:.2f} s" if p50 is not None else "-")
        elapsed = time.monotonic() - self.started
        table.add_row("wall time", f"{elapsed:.1f} s  ({self.items / elapsed:.1f} items/s)" if elapsed else "-")
        return table


class ProgressView:
    """A rich progress bar: done and failed, rate, ETA, tokens and cost. Quiet when the
    output is not a terminal (CI logs get the summary only)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, batch_id: str, total: int, done_before: int) -> None:
        self.console.print(f"batch [bold]{batch_id}[/bold]: {total} items"
                           + (f", {done_before} already done (skipped)" if done_before else ""))
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed[/red]"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[tokens]} tok"), TextColumn("${task.fields[cost]}"),
            TextColumn("{task.fields[provider]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("batch", total=total, completed=done_before, failed=0, rate="",
                                           tokens=0, cost="0.0000", provider="")

    def advance(self, stats: BatchStats) -> None:
        if self.progress is None:
            return
        elapsed = max(1e-9, time.monotonic() - stats.started)
        self.progress.update(self.task, advance=1, failed=stats.failed, rate=f"{stats.items / elapsed:.1f}/s",
                             tokens=f"{stats.input_tokens + stats.output_tokens:,}", cost=f"{stats.cost_usd:.4f}")

    def idle(self, stats: BatchStats) -> None:
        if self.progress is not None:
            self.progress.refresh()

    def provider_progress(self, done: int | None, total: int, batches: int) -> None:
        """The provider's own count of answered requests in the open provider batches (None:
        the provider does not report it)."""
        if self.progress is None:
            return
        said = f"{done}/{total}" if done is not None else "not reported by the provider"
        self.progress.update(self.task, provider=f"provider: {said} in {batches} batch(es)")

    def bad_row(self, row: Any) -> None:
        self.console.print(f"[yellow]skipped line {row.line}:[/yellow] {row.reason}")

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/yellow]")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
