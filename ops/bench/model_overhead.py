"""Model-layer overhead: ``agenerate`` against a raw SDK call to the same fake server, in the
same run and the same event loop, plus the import time of ``datus.models``.

Both sides make N sequential calls with the same prompt to an in-process fake server (no
latency unless asked). Calls run in interleaved blocks (ours, raw, raw, ours, ...) after a
warm-up, so drift (CPU frequency, GC, the server warming up) falls on both sides alike. The
overhead is ours minus raw, at the median and at p99; the ratio is ours over raw.

    python ops/bench/model_overhead.py [--provider openai|deepseek|qwen] [--calls 2000]
                                       [--latency-ms 0] [--block 50] [--warmup 200]

Targets: overhead median < 1 ms; ``import datus.models`` < 0.3 s (median of 5 fresh
interpreters). Exit status 1 when a target is missed.

Adding a provider (Claude, Gemini): one ``Baseline`` in ``BASELINES`` whose ``raw`` opens that
provider's own SDK against the fake server's matching protocol and returns one call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from datus.configuration.agent_config import ModelConfig
from datus.models.base import LLMBaseModel
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

    model: str
    base_url: Callable[[FakeProviderServer], str]
    # (server, model) -> an async context yielding a coroutine function that makes one raw
    # SDK call with PROMPT, the SDK set up as the adapter sets it up (no retries of its own).
    raw: Callable[[FakeProviderServer, str], contextlib.AbstractAsyncContextManager[Call]]


@contextlib.asynccontextmanager
async def _openai_raw(server: FakeProviderServer, model: str) -> AsyncIterator[Call]:
    import openai

    client = openai.AsyncOpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0, timeout=120.0)
    messages = [{"role": "user", "content": PROMPT}]

    async def call() -> Any:
        response = await client.chat.completions.create(model=model, messages=messages)
        return response.choices[0].message.content

    try:
        yield call
    finally:
        await client.close()


def _openai_url(server: FakeProviderServer) -> str:
    return server.openai_base_url


BASELINES: dict[str, Baseline] = {
    "openai": Baseline("gpt-4o-mini", _openai_url, _openai_raw),
    "deepseek": Baseline("deepseek-chat", _openai_url, _openai_raw),
    "qwen": Baseline("qwen-plus", _openai_url, _openai_raw),
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
    config = ModelConfig(type=provider, model=baseline.model, api_key=KEY, base_url=baseline.base_url(server),
                         max_retries=0)
    model = LLMBaseModel.model_class(provider)(model_config=config)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=sorted(BASELINES), default="openai")
    parser.add_argument("--calls", "-n", type=int, default=2000, help="measured calls per side")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fake server latency per request")
    parser.add_argument("--block", type=int, default=50, help="calls per interleaved block")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls per side first")
    parser.add_argument("--import-runs", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with FakeProviderServer(latency_s=args.latency_ms / 1000) as server:
        ours, raw = asyncio.run(measure(args.provider, server, args.calls, args.block, args.warmup))
    imports = import_times(args.import_runs)

    med_ours, med_raw = statistics.median(ours), statistics.median(raw)
    p99_ours, p99_raw = percentile(ours, 99), percentile(raw, 99)
    overhead_med, overhead_p99 = med_ours - med_raw, p99_ours - p99_raw
    import_s = statistics.median(imports)
    ok_overhead, ok_import = overhead_med < TARGET_OVERHEAD_MS, import_s < TARGET_IMPORT_S

    model = BASELINES[args.provider].model
    print(f"model overhead: {args.provider} ({model}), {args.calls} calls per side, "
          f"server latency {args.latency_ms:g} ms, blocks of {args.block}, warm-up {args.warmup}")
    print(f"{'':24}{'median ms':>11}{'p99 ms':>11}")
    print(f"{'raw SDK call':24}{med_raw:>11.3f}{p99_raw:>11.3f}")
    print(f"{'agenerate':24}{med_ours:>11.3f}{p99_ours:>11.3f}")
    print(f"{'overhead (ours - raw)':24}{overhead_med:>11.3f}{overhead_p99:>11.3f}")
    print(f"{'ratio (ours / raw)':24}{med_ours / med_raw:>10.2f}x{p99_ours / p99_raw:>10.2f}x")
    print(f"{'import datus.models':24}{import_s:>10.3f}s  (median of {len(imports)}: "
          f"{', '.join(f'{t:.3f}' for t in imports)})")
    print(f"overhead median < {TARGET_OVERHEAD_MS:g} ms: {'PASS' if ok_overhead else 'FAIL'} ({overhead_med:.3f} ms)")
    print(f"import < {TARGET_IMPORT_S:g} s: {'PASS' if ok_import else 'FAIL'} ({import_s:.3f} s)")
    return 0 if ok_overhead and ok_import else 1


if __name__ == "__main__":
    sys.exit(main())
