"""Model-layer overhead: ``agenerate`` against a raw SDK call to the same fake server, in the
same run and the same event loop, plus the import time of ``datus.models``.

Both sides make N sequential calls with the same prompt to an in-process fake server (no
latency unless asked). Calls run in interleaved blocks (ours, raw, raw, ours, ...) after a
warm-up, so drift (CPU frequency, GC, the server warming up) falls on both sides alike. The
overhead is ours minus raw, at the median and at p99; the ratio is ours over raw.

    python ops/bench/model_overhead.py [--provider NAME|all] [--calls 2000]
                                       [--latency-ms 0] [--block 50] [--warmup 200]

NAME is openai, deepseek, qwen (OpenAI wire), claude (Anthropic Messages), claude-nocache
(the same with ``prompt_cache: off``) or gemini (generateContent, v1beta); ``all`` runs each in
turn, on a fresh fake server each, and prints one summary table.

What ours sends beyond the raw call: Claude, the prompt as a text block (raw: a plain string)
and a per-request timeout; with the default ``prompt_cache: auto`` the block also carries
``cache_control``, so ``claude`` is what users get and ``claude-nocache`` the closer match.
Gemini: an empty ``generationConfig`` and a per-request timeout in ``httpOptions``.

Targets: overhead median < 1 ms; ``import datus.models`` < 0.3 s (median of 5 fresh
interpreters). Exit status 1 when a target is missed.

Adding a provider: one ``Baseline`` in ``BASELINES`` whose ``raw`` opens that provider's own
SDK against the fake server's matching protocol and returns one call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from datus.models.base import LLMBaseModel
from datus.models.config import ModelConfig
from datus.testing.fake_server import FakeProviderServer

KEY = "sk-bench-not-a-real-key"
PROMPT = "Write SQL that counts the users who signed up in 2024."
TARGET_OVERHEAD_MS = 1.0
TARGET_IMPORT_S = 0.3
IMPORT_CODE = "import time; t=time.perf_counter(); import datus.models; print(time.perf_counter()-t)"

Call = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Baseline:
    """How to reach one provider through the fake server, ours and raw."""

    provider: str  # the ModelConfig type
    model: str
    base_url: Callable[[FakeProviderServer], str]
    # (server, model) -> an async context yielding a coroutine function that makes one raw
    # SDK call with PROMPT, the SDK set up as the adapter sets it up (no retries of its own).
    raw: Callable[[FakeProviderServer, str], contextlib.AbstractAsyncContextManager[Call]]
    settings: tuple[tuple[str, Any], ...] = ()  # extra ModelConfig fields for our side


@contextlib.asynccontextmanager
async def _openai_raw(server: FakeProviderServer, model: str) -> AsyncIterator[Call]:
    import openai

    from datus.models.http_clients import async_http_client

    # the HTTP stack the adapter uses (ModelConfig.http_client's default), so only our layer differs
    client = openai.AsyncOpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0, timeout=120.0,
                                http_client=async_http_client(openai, "aiohttp"))
    messages = [{"role": "user", "content": PROMPT}]

    async def call() -> Any:
        response = await client.chat.completions.create(model=model, messages=messages)
        return response.choices[0].message.content

    try:
        yield call
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _claude_raw(server: FakeProviderServer, model: str) -> AsyncIterator[Call]:
    import anthropic

    from datus.models.claude_model import DEFAULT_MAX_TOKENS
    from datus.models.http_clients import async_http_client

    client = anthropic.AsyncAnthropic(api_key=KEY, base_url=server.url, max_retries=0, timeout=120.0,
                                      http_client=async_http_client(anthropic, "aiohttp"))
    messages = [{"role": "user", "content": PROMPT}]

    async def call() -> Any:
        response = await client.messages.create(model=model, max_tokens=DEFAULT_MAX_TOKENS, messages=messages)
        return "".join(block.text for block in response.content if block.type == "text")

    try:
        yield call
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _gemini_raw(server: FakeProviderServer, model: str) -> AsyncIterator[Call]:
    from google import genai
    from google.genai import types

    # google-genai on aiohttp (installed with this package), as the adapter's default
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(  # kept alive: aio dies with it
        base_url=server.url, api_version="v1beta", timeout=120_000,
        retry_options=types.HttpRetryOptions(attempts=1)))

    async def call() -> Any:
        response = await client.aio.models.generate_content(model=model, contents=PROMPT)
        return response.text

    try:
        yield call
    finally:
        await client.aio.aclose()
        client.close()


def _openai_url(server: FakeProviderServer) -> str:
    return server.openai_base_url


def _root_url(server: FakeProviderServer) -> str:
    return server.url


BASELINES: dict[str, Baseline] = {
    "openai": Baseline("openai", "gpt-4o-mini", _openai_url, _openai_raw),
    "deepseek": Baseline("deepseek", "deepseek-chat", _openai_url, _openai_raw),
    "qwen": Baseline("qwen", "qwen-plus", _openai_url, _openai_raw),
    "claude": Baseline("claude", "claude-haiku-4-5", _root_url, _claude_raw),
    "claude-nocache": Baseline("claude", "claude-haiku-4-5", _root_url, _claude_raw, (("prompt_cache", "off"),)),
    "gemini": Baseline("gemini", "gemini-2.5-flash", _root_url, _gemini_raw),
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def timed(call: Call, n: int, out: list[float]) -> None:
    for _ in range(n):
        started = time.perf_counter_ns()
        await call()
        out.append((time.perf_counter_ns() - started) / 1e6)


async def measure(provider: str, server: FakeProviderServer, calls: int, block: int,
                  warmup: int) -> tuple[list[float], list[float]]:
    baseline = BASELINES[provider]
    config = ModelConfig(type=baseline.provider, model=baseline.model, api_key=KEY,
                         base_url=baseline.base_url(server), max_retries=0, **dict(baseline.settings))
    model = LLMBaseModel.model_class(baseline.provider)(model_config=config)

    async def ours() -> str:
        return await model.agenerate(PROMPT)

    ours_ms: list[float] = []
    raw_ms: list[float] = []
    async with baseline.raw(server, baseline.model) as raw:
        expected = await raw()
        if await ours() != expected:
            raise SystemExit(f"ours and raw disagree: {expected!r}")
        await timed(ours, warmup, [])
        await timed(raw, warmup, [])
        gc.collect()
        done, flip = 0, False
        while done < calls:
            n = min(block, calls - done)
            first, second = ((raw, raw_ms), (ours, ours_ms)) if flip else ((ours, ours_ms), (raw, raw_ms))
            await timed(first[0], n, first[1])
            await timed(second[0], n, second[1])
            done, flip = done + n, not flip
    await model.aclose()
    return ours_ms, raw_ms


def import_times(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-c", IMPORT_CODE], capture_output=True, text=True, check=True)
        times.append(float(result.stdout.strip()))
    return times


@dataclass(frozen=True)
class Result:
    provider: str
    med_raw: float
    p99_raw: float
    med_ours: float
    p99_ours: float

    @classmethod
    def of(cls, provider: str, ours: list[float], raw: list[float]) -> Result:
        return cls(provider, statistics.median(raw), percentile(raw, 99), statistics.median(ours),
                   percentile(ours, 99))

    @property
    def overhead_med(self) -> float:
        return self.med_ours - self.med_raw

    @property
    def ok(self) -> bool:
        return self.overhead_med < TARGET_OVERHEAD_MS


def print_detail(r: Result) -> None:
    print(f"{'':24}{'median ms':>11}{'p99 ms':>11}")
    print(f"{'raw SDK call':24}{r.med_raw:>11.3f}{r.p99_raw:>11.3f}")
    print(f"{'agenerate':24}{r.med_ours:>11.3f}{r.p99_ours:>11.3f}")
    print(f"{'overhead (ours - raw)':24}{r.overhead_med:>11.3f}{r.p99_ours - r.p99_raw:>11.3f}")
    print(f"{'ratio (ours / raw)':24}{r.med_ours / r.med_raw:>10.2f}x{r.p99_ours / r.p99_raw:>10.2f}x")


def print_summary(results: list[Result]) -> None:
    head = (f"{'provider':<16}{'raw med':>9}{'raw p99':>9}{'ours med':>10}{'ours p99':>10}"
            f"{'overhead':>10}{'ratio':>8}  target")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.provider:<16}{r.med_raw:>9.3f}{r.p99_raw:>9.3f}{r.med_ours:>10.3f}{r.p99_ours:>10.3f}"
              f"{r.overhead_med:>10.3f}{r.med_ours / r.med_raw:>7.2f}x  {'PASS' if r.ok else 'FAIL'}")
    print(f"(ms; overhead = ours - raw at the median, ratio = ours / raw median; "
          f"target: overhead median < {TARGET_OVERHEAD_MS:g} ms)")


def load_line() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3]) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return f"{os.cpu_count()} CPUs, load unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=[*BASELINES, "all"], default="openai")
    parser.add_argument("--calls", "-n", type=int, default=2000, help="measured calls per side")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fake server latency per request")
    parser.add_argument("--block", type=int, default=50, help="calls per interleaved block")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls per side first")
    parser.add_argument("--import-runs", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    providers = list(BASELINES) if args.provider == "all" else [args.provider]
    print(f"model overhead: {args.calls} calls per side, server latency {args.latency_ms:g} ms, "
          f"blocks of {args.block}, warm-up {args.warmup}; {load_line()} at start", flush=True)
    results = []
    for provider in providers:
        with FakeProviderServer(latency_s=args.latency_ms / 1000) as server:  # fresh per provider
            ours, raw = asyncio.run(measure(provider, server, args.calls, args.block, args.warmup))
        results.append(Result.of(provider, ours, raw))
    imports = import_times(args.import_runs)
    import_s = statistics.median(imports)
    ok_import = import_s < TARGET_IMPORT_S

    if len(results) == 1:
        print(f"{providers[0]} ({BASELINES[providers[0]].model})")
        print_detail(results[0])
    else:
        print_summary(results)
    print(f"{'import datus.models':24}{import_s:>10.3f}s  (median of {len(imports)}: "
          f"{', '.join(f'{t:.3f}' for t in imports)})  {'PASS' if ok_import else 'FAIL'} vs < {TARGET_IMPORT_S:g} s")
    failed = [r.provider for r in results if not r.ok]
    print(f"overhead median < {TARGET_OVERHEAD_MS:g} ms: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}; "
          f"{load_line()} at end")
    return 0 if not failed and ok_import else 1


if __name__ == "__main__":
    sys.exit(main())
