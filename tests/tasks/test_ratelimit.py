"""The fleet's request limiter (tasks/ratelimit.py) on a real Redis, in this process: the
Lua answers (smooth buckets, tickets, lanes, slots, cooldowns, reconciliation) and the
limiter as the model layer's hook around real SDK calls to the fake provider. The worker
fleet's side is tests/tasks/test_ratelimit_fleet.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from datus.models.base import LLMBaseModel
from datus.models.config import AgentConfig, ModelConfig, RateLimits
from datus.models.errors import RateLimitError, RequestTooLargeError
from datus.models.limiter import PlannedRequest, RequestOutcome
from datus.models.rate_limit_headers import Budget, ProviderBudget
from datus.models.scripted import Fault
from datus.models.usage import Usage
from datus.testing.fake_server import FakeProviderServer
from datus.testing.limits import ProviderLimits
from datus_queue.tasks import keys
from datus_queue.tasks.context import JobContext
from datus_queue.tasks.ratelimit import Deferred, JobWait, ModelLimiter, current_job
from datus_queue.tasks.ratelimit_lua import ACQUIRE, GO, LATE, NO_SLOT, TICKET, TOO_LARGE
from datus_queue.tasks.settings import Settings
from tests.tasks.conftest import KNOWN_KEY, generations

MODEL = SimpleNamespace(provider="openai", key_fingerprint="fp0123456789abcd", model_name="gpt-4o-mini")


@pytest.fixture
async def context(dq_redis_url: str) -> AsyncIterator[JobContext]:
    from datus_queue.tasks.settings import Settings

    ctx = JobContext(Settings(redis_url=dq_redis_url, rate_limit_slot_lease_s=0.6), AgentConfig())
    yield ctx
    await ctx.aclose()


def limiter(ctx: JobContext, **limits: Any) -> ModelLimiter:
    return ctx.limiter.for_model(MODEL, RateLimits(**limits))


def planned(input_tokens: int = 10, max_tokens: int | None = 100) -> PlannedRequest:
    return PlannedRequest("openai", "gpt-4o-mini", max_tokens, lambda: input_tokens)


DEFAULTS = Settings()  # the burst and share a user gets


def acquire(r: redis.Redis, rpm: float = 0, itpm: float = 0, n_in: int = 0, lane: int = 0, ticket: int = 0,
            maxc: int = 0, slot: str = "", horizon_s: float = 1.0, paid: bool = False, late_us: int = 7600,
            burst_s: float = DEFAULTS.rate_limit_burst_s, share: float = DEFAULTS.rate_limit_share,
            log_s: float = 0) -> list[int]:
    """One ACQUIRE, as the limiter sends it, with the default burst and share;
    ``[code, wait_us, ticket_us, detail]`` (``paid``: ``ticket`` is the start booked; ``log_s``:
    the input-token log's window, 0 none)."""
    state, slots = keys.ratelimit_state("openai", "fp", "m"), keys.ratelimit_slots("openai", "fp", "m")
    log = [keys.ratelimit_input_log("openai", "fp", "m")] if log_s else []
    return [int(v) for v in r.eval(ACQUIRE, 2 + len(log), state, slots, *log, rpm, itpm, 0, maxc, n_in, 0, lane,
                                   ticket, 1 if paid else 0, horizon_s * 1e6, burst_s * 1e6, slot, 5e6,
                                   share, late_us, *([log_s * 1e6] if log else []))]


def heaviest_window(starts: list[tuple[int, int]], window_us: float) -> int:
    """The most input tokens that start in any window of ``window_us`` (open at its start, closed
    at its end, as the limiter counts): ``starts`` are (start µs, tokens)."""
    return max(sum(n for t, n in starts if last - window_us < t <= last) for last, _ in starts)


# -- the Lua answers ---------------------------------------------------------------------------------


def test_a_per_minute_limit_is_paced_at_its_share_one_request_at_a_time(dq_redis: redis.Redis) -> None:
    assert (DEFAULTS.rate_limit_burst_s, DEFAULTS.rate_limit_share) == (0.0, 0.985)
    answers = [acquire(dq_redis, rpm=600) for _ in range(40)]
    now = [a for a in answers if a[0] == GO and a[1] == 0]
    booked = [a for a in answers if a[0] == GO and a[1] > 0]
    ticketed = [a for a in answers if a[0] == TICKET]
    assert len(now) == 1  # no burst: a 1 s window of the provider never holds more than its share
    spacing = 60e6 / (600 * 0.985)  # 101.5 ms: 98.5 % of 600/min
    assert len(booked) == 9  # the rest of the next second is booked, one per 101.5 ms
    starts = [b[2] for b in booked]  # each told its start, in Redis time
    assert all(abs(b - a - spacing) < 1 for a, b in itertools.pairwise(starts)), starts
    assert len(ticketed) == 30  # beyond the short wait: places in line, as far apart
    places = [a[2] for a in ticketed]
    assert all(abs(b - a - spacing) < 1000 for a, b in itertools.pairwise(places))


def test_mixed_request_sizes_stay_inside_every_one_second_window(dq_redis: redis.Redis) -> None:
    # 600 input tokens a minute, enforced as 10 a second (small numbers, so every start is booked
    # ahead of Redis's clock, however slowly this test runs): nine small prompts and a big one.
    # Pacing alone lets the big one start right behind the small ones, 13 tokens in one second
    sizes = [1] * 9 + [4] + [1] * 5 + [7] + [3, 1, 9]
    paced = [(acquire(dq_redis, itpm=600, n_in=n, horizon_s=60)[2], n) for n in sizes]
    assert heaviest_window(paced, 1e6) > 10
    dq_redis.flushdb()
    # with the log (what the limiter sends), no window of the provider's second holds more than it allows,
    # even with the arrivals spread by up to the slack (the window stretched to 1 s / share)
    logged = [(acquire(dq_redis, itpm=600, n_in=n, horizon_s=60, log_s=1.0)[2], n) for n in sizes]
    assert heaviest_window(logged, 1e6 / DEFAULTS.rate_limit_share) <= 10
    # only a request that would overflow is held back; the small one behind the 4 is paced as before
    assert logged[10][0] - logged[9][0] == pytest.approx(4 * 60e6 / (600 * DEFAULTS.rate_limit_share), abs=2)


def test_the_old_one_second_burst_sends_a_seconds_worth_at_once(dq_redis: redis.Redis) -> None:
    # DQ_RATE_LIMIT_BURST_S=1 and a share of 1 (the defaults before issue 18): why a 1 s window broke
    assert sum(acquire(dq_redis, rpm=600, burst_s=1.0, share=1.0)[1] == 0 for _ in range(20)) == 10


def test_a_booked_request_is_late_past_its_start_and_books_again(dq_redis: redis.Redis) -> None:
    acquire(dq_redis, rpm=600)
    code, wait_us, start_us, _ = acquire(dq_redis, rpm=600)
    assert code == GO and wait_us > 0
    on_time = acquire(dq_redis, rpm=600, maxc=5, slot="a", paid=True, ticket=start_us)
    assert on_time[0] == GO and on_time[2] == start_us and on_time[1] > 0  # still this far before its start
    assert dq_redis.zcard(keys.ratelimit_slots("openai", "fp", "m")) == 1  # and its slot taken
    seconds, micros = dq_redis.time()
    past = seconds * 1_000_000 + micros - 8000  # a start 8 ms ago: later than the default 7.6 ms
    assert acquire(dq_redis, rpm=600, maxc=5, slot="b", paid=True, ticket=past)[0] == LATE
    assert acquire(dq_redis, rpm=600, maxc=5, slot="b", paid=True, ticket=past, late_us=-1)[0] == GO  # unchecked
    assert dq_redis.zcard(keys.ratelimit_slots("openai", "fp", "m")) == 2  # the late answer took no slot


def test_a_request_bigger_than_the_whole_budget_can_never_fit(dq_redis: redis.Redis) -> None:
    assert acquire(dq_redis, itpm=1000, n_in=1001)[::3] == [TOO_LARGE, 2]
    assert acquire(dq_redis, itpm=1000, n_in=900)[0] == GO  # bigger than a second's worth: waits for a full bucket
    assert acquire(dq_redis, itpm=1000, n_in=900)[0] == TICKET  # ... and then the next one waits its turn


def test_batch_requests_queue_behind_the_interactive_line_but_never_the_reverse(dq_redis: redis.Redis) -> None:
    for _ in range(20):  # fill the bucket and the short horizon
        acquire(dq_redis, rpm=600)
    batch = [acquire(dq_redis, rpm=600, lane=1) for _ in range(50)]
    assert {a[0] for a in batch} == {TICKET}
    interactive = acquire(dq_redis, rpm=600, lane=0)
    assert interactive[0] == TICKET
    assert interactive[2] < batch[1][2]  # not behind fifty batch tickets: only behind the bucket
    later_batch = acquire(dq_redis, rpm=600, lane=1)
    assert later_batch[2] > max(interactive[2], batch[-1][2])  # batch waits behind both lines


def test_a_ticket_holder_skips_the_line_when_its_turn_comes(dq_redis: redis.Redis) -> None:
    for _ in range(20):
        acquire(dq_redis, rpm=600)
    place = acquire(dq_redis, rpm=600, horizon_s=0.0)  # a ticket, as a job that went back to the queue
    assert place[0] == TICKET
    for _ in range(30):
        acquire(dq_redis, rpm=600, horizon_s=0.0)  # others queue up behind it
    deadline = time.monotonic() + 10
    while (answer := acquire(dq_redis, rpm=600, ticket=place[2]))[0] != GO:  # it comes back at its turn
        assert answer[2] == place[2], "a holder that comes back early keeps its place"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_concurrency_slots_are_a_semaphore_whose_slots_expire(dq_redis: redis.Redis) -> None:
    assert acquire(dq_redis, maxc=2, slot="a")[0] == GO
    assert acquire(dq_redis, maxc=2, slot="b")[0] == GO
    full = acquire(dq_redis, maxc=2, slot="c")
    assert full[0] == NO_SLOT and 0 < full[1] <= 5_000_000  # until the first lease ends
    slots = keys.ratelimit_slots("openai", "fp", "m")
    dq_redis.zadd(slots, {"a": 0})  # a's lease ran out (its worker died)
    assert acquire(dq_redis, maxc=2, slot="c")[0] == GO
    assert {m.decode() for m in dq_redis.zrange(slots, 0, -1)} == {"b", "c"}


# -- the limiter around requests -----------------------------------------------------------------------


async def test_tokens_are_reserved_then_reconciled_with_the_real_usage(context: JobContext,
                                                                       dq_redis: redis.Redis) -> None:
    bound = limiter(context, input_tokens_per_minute=60_000, output_tokens_per_minute=60_000)
    state = bound.keys[0]
    permit = await bound.before(planned(input_tokens=1000, max_tokens=500))
    reserved = {k.decode(): float(v) for k, v in dq_redis.hgetall(state).items()}
    await bound.after(permit, RequestOutcome(usage=Usage(input_tokens=400, output_tokens=50)))
    settled = {k.decode(): float(v) for k, v in dq_redis.hgetall(state).items()}
    # 1 ms per token: 600 input and 450 output tokens given back
    assert reserved["ti"] - settled["ti"] == pytest.approx(600_000, abs=20_000)
    assert reserved["to"] - settled["to"] == pytest.approx(450_000, abs=20_000)


async def test_too_large_is_a_permanent_error_that_says_what_to_change(context: JobContext) -> None:
    bound = limiter(context, output_tokens_per_minute=4000)
    with pytest.raises(RequestTooLargeError, match="max_tokens.*output_tokens_per_minute") as raised:
        await bound.before(planned(max_tokens=8000))
    assert not raised.value.retryable and raised.value.slug == "model_request_too_large"


async def test_a_429_cools_the_key_down_for_every_process_and_a_long_wait_hands_the_job_back(
        context: JobContext, dq_redis_url: str) -> None:
    bound = limiter(context)  # no limits configured: the cooldown still holds
    permit = await bound.before(planned())
    await bound.after(permit, RequestOutcome(error=RateLimitError("slow down", retry_after=5.0, status_code=429)))
    from datus_queue.tasks.settings import Settings

    other = JobContext(Settings(redis_url=dq_redis_url), AgentConfig())  # another worker process
    try:
        token = current_job.set(JobWait("job-1"))
        with pytest.raises(Deferred) as deferred:
            await other.limiter.for_model(MODEL, None).before(planned())
        current_job.reset(token)
        assert deferred.value.rate_limited and 4.0 < deferred.value.wait_s <= 5.6
        another_key = other.limiter.for_model(SimpleNamespace(**{**vars(MODEL), "key_fingerprint": "other"}), None)
        await another_key.after(await another_key.before(planned()), RequestOutcome())  # two keys, two budgets
    finally:
        await other.aclose()


async def test_a_job_that_may_not_leave_waits_in_the_worker_instead(context: JobContext) -> None:
    bound = limiter(context, requests_per_minute=30)  # one request every 2 s
    await bound.after(await bound.before(planned()), RequestOutcome())
    job = JobWait("job-2", can_defer=False)  # a caller that may not go back to the queue
    token = current_job.set(job)
    try:
        await bound.after(await bound.before(planned()), RequestOutcome())
    finally:
        current_job.reset(token)
    assert job.waited_s > 1.5  # it waited for its ticket here rather than raising Deferred


async def test_a_request_whose_loop_stalls_past_its_start_books_again_instead_of_crowding_the_next(
        context: JobContext, dq_redis: redis.Redis) -> None:
    bound = limiter(context, requests_per_minute=600)  # one per 101.5 ms at the default share
    spacing = 60e6 / (600 * DEFAULTS.rate_limit_share)
    await bound.after(await bound.before(planned()), RequestOutcome())
    first = float(dq_redis.hget(bound.keys[0], "tr")) - spacing  # when the first went, in Redis time
    second = asyncio.create_task(bound.before(planned()))
    await asyncio.sleep(0.02)  # booked one spacing after the first, sleeping until then
    assert float(dq_redis.hget(bound.keys[0], "tr")) == pytest.approx(first + 2 * spacing, abs=1)
    time.sleep(0.3)  # noqa: ASYNC251 - the loop is held (a blocking call elsewhere in the worker) past that start
    await bound.after(await second, RequestOutcome())
    # it did not go late, squeezed against whoever is booked next: its slot is lost, it booked again
    assert float(dq_redis.hget(bound.keys[0], "tr")) >= first + 0.3e6 + spacing


def _acquires(ctx: JobContext) -> list[bool]:
    """Every ACQUIRE the running loop's limiter sends from now on: whether it was the paid one
    (the second call of a booked request, just before its start)."""
    batch, sent = ctx.limiter.loop_state().batch, []
    call = batch.call

    def counting(script: str, keys: list[str], args: list[Any], orphan: Any = None) -> Any:
        if script == ACQUIRE:
            sent.append(args[8] == 1)
        return call(script, keys, args, orphan)

    batch.call = counting
    return sent


async def test_a_request_booked_within_the_paid_lead_goes_without_asking_again(dq_redis_url: str) -> None:
    # share 0.5 (changed): a request is late only 0.5 s after its start, so a loaded machine's
    # stalls do not make these book again, which would book further ahead: the test counts calls
    context = JobContext(Settings(redis_url=dq_redis_url, rate_limit_share=0.5), AgentConfig())
    try:
        near = limiter(context, requests_per_minute=60_000)  # one per 2 ms: the next is booked under 5 ms ahead
        sent = _acquires(context)
        await asyncio.gather(near.before(planned()), near.before(planned()))
        assert sent == [False, False]  # one call each, none the paid one
        far = limiter(context, requests_per_minute=600)  # one per 200 ms: booked that far, it asks again
        await asyncio.gather(far.before(planned()), far.before(planned()))
        assert sent[2:] == [False, False, True]  # the cooldown check just before its start
        slotted = limiter(context, requests_per_minute=60_000, max_concurrency=5)  # a slot is taken in that call
        sent.clear()
        permits = await asyncio.gather(slotted.before(planned()), slotted.before(planned()))
        assert sent == [False, False, True, True]  # booked behind the far one's start: each asks again
        for permit in permits:
            await slotted.after(permit, RequestOutcome())
    finally:
        await context.aclose()


async def test_slots_wait_for_a_release_in_this_process(context: JobContext, dq_redis: redis.Redis) -> None:
    bound = limiter(context, max_concurrency=1)
    first = await bound.before(planned())
    second = asyncio.create_task(bound.before(planned()))
    await asyncio.sleep(0.05)
    assert not second.done()
    await bound.after(first, RequestOutcome(usage=Usage()))
    permit = await asyncio.wait_for(second, 5)
    assert dq_redis.zcard(bound.keys[1]) == 1
    await bound.after(permit, RequestOutcome(usage=Usage()))
    assert dq_redis.zcard(bound.keys[1]) == 0


async def test_held_slots_are_renewed_while_their_call_runs(context: JobContext, dq_redis: redis.Redis) -> None:
    bound = limiter(context, max_concurrency=3)  # lease 0.6 s in this fixture
    permit = await bound.before(planned())
    first = dq_redis.zscore(bound.keys[1], permit.slot)
    await asyncio.sleep(1.0)  # longer than the lease
    assert dq_redis.zscore(bound.keys[1], permit.slot) > first  # still held, lease extended
    await bound.after(permit, RequestOutcome(usage=Usage()))
    assert dq_redis.zcard(bound.keys[1]) == 0


def lose_the_first_renewal(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> list[asyncio.Future[Any]]:
    """Make the first RENEW's reply never come (a connection that hangs); the list gets its future."""
    batch = ctx.limiter.loop_state().batch
    real_call, lost = batch.call, []

    def call(script: str, keys_: list[str], args: list[Any], orphan: Any = None) -> asyncio.Future[Any]:
        if not lost:
            lost.append(asyncio.get_running_loop().create_future())
            return lost[0]
        return real_call(script, keys_, args, orphan)

    monkeypatch.setattr(batch, "call", call)
    return lost


async def test_a_renewal_whose_reply_never_comes_does_not_stop_the_ones_after_it(
        context: JobContext, dq_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RENEW sent on a connection that hangs gets no reply: the renewer gives up on it after a
    tick and renews again, instead of waiting on it while every held lease runs out."""
    bound = limiter(context, max_concurrency=3)  # lease 0.6 s in this fixture: a tick of 0.2 s
    permit = await bound.before(planned())
    lost = lose_the_first_renewal(context, monkeypatch)
    first = dq_redis.zscore(bound.keys[1], permit.slot)
    await asyncio.sleep(1.0)  # longer than the lease
    assert lost and lost[0].cancelled()  # the lost one was given up on
    assert dq_redis.zscore(bound.keys[1], permit.slot) > first  # and the slot renewed after it
    await bound.after(permit, RequestOutcome(usage=Usage()))


@pytest.mark.slow
async def test_with_the_default_lease_a_lost_renewal_costs_one_tick_and_the_slot_never_lapses(
        dq_redis_url: str, dq_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the slot lease a user gets (30 s: a renewal every 10 s): the RENEW at 10 s
    gets no reply, is given up on at 20 s, and the next goes then, 10 s before the lease would
    run out — not a tick later, as the lease runs out."""
    ctx = JobContext(Settings(redis_url=dq_redis_url), AgentConfig())
    try:
        assert ctx.settings.rate_limit_slot_lease_s == 30
        bound = limiter(ctx, max_concurrency=3)
        permit = await bound.before(planned())
        lost = lose_the_first_renewal(ctx, monkeypatch)
        first = dq_redis.zscore(bound.keys[1], permit.slot)
        await asyncio.sleep(25)  # the lost renewal given up on at 20 s; the lease would end at 30 s
        assert lost and lost[0].cancelled()
        assert dq_redis.zscore(bound.keys[1], permit.slot) > first, "renewed at once after the lost reply"
        await bound.after(permit, RequestOutcome(usage=Usage()))
    finally:
        await ctx.aclose()


async def test_low_remaining_budget_headers_set_a_pace_before_any_429(context: JobContext,
                                                                      dq_redis: redis.Redis) -> None:
    bound = limiter(context)
    low = ProviderBudget(requests=Budget(limit=600, remaining=30, reset_s=57.0))  # refills 1 per 100 ms
    await bound.after(await bound.before(planned()), RequestOutcome(usage=Usage(), budget=low))
    state = {k.decode(): float(v) for k, v in dq_redis.hgetall(bound.keys[0]).items()}
    assert state["pace"] == pytest.approx(100_000, rel=0.01)
    answers = [acquire_state(dq_redis, bound) for _ in range(15)]
    assert [a[1] > 0 for a in answers[:2]] == [False, True]  # one at a time, 100 ms apart
    healthy = ProviderBudget(requests=Budget(limit=600, remaining=500, reset_s=10.0))
    before = dq_redis.hget(bound.keys[0], "pace")
    await bound.after(await bound.before(planned()), RequestOutcome(usage=Usage(), budget=healthy))
    assert dq_redis.hget(bound.keys[0], "pace") == before  # room again: nothing to send


def acquire_state(r: redis.Redis, bound: ModelLimiter) -> list[int]:
    return [int(v) for v in r.eval(ACQUIRE, 2, *bound.keys[:2], 0, 0, 0, 0, 0, 0, 0, 0, 0, 60e6, 0, "", 5e6,
                                   DEFAULTS.rate_limit_share, -1)]


async def test_scripts_come_back_after_redis_forgets_them(context: JobContext, dq_redis: redis.Redis) -> None:
    bound = limiter(context, requests_per_minute=6000)
    await bound.after(await bound.before(planned()), RequestOutcome())
    dq_redis.script_flush()
    permits = await asyncio.gather(*(bound.before(planned()) for _ in range(5)))  # one pipeline, NOSCRIPT
    assert len(permits) == 5


# -- the hook on the model layer's request path --------------------------------------------------------


class Recording:
    def __init__(self, inner: ModelLimiter) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Any]] = []

    async def before(self, request: PlannedRequest) -> Any:
        self.calls.append(("before", (request.input_tokens(), request.max_output_tokens)))
        return await self.inner.before(request)

    async def after(self, permit: Any, outcome: RequestOutcome) -> None:
        self.calls.append(("after", outcome))
        await self.inner.after(permit, outcome)

    async def wait(self, seconds: float, error: Any) -> None:
        self.calls.append(("wait", seconds))
        await self.inner.wait(seconds, error)


@pytest.mark.parametrize("provider", ["openai", "claude"])
async def test_every_attempt_goes_through_the_limiter_with_the_providers_budget(
        context: JobContext, fake: FakeProviderServer, provider: str) -> None:
    fake.set_limits(ProviderLimits(requests_per_minute=6000, window_s=10))
    base_url = fake.openai_base_url if provider == "openai" else fake.url
    model = LLMBaseModel.model_class(provider)(ModelConfig(
        type=provider, model="gpt-4o-mini" if provider == "openai" else "claude-sonnet-4-5", api_key=KNOWN_KEY,
        base_url=base_url, max_retries=2, retry_base_delay_s=0.01, max_tokens=64))
    recording = Recording(context.limiter.for_model(model, RateLimits(input_tokens_per_minute=100_000)))
    model.request_limiter = recording
    fake.script.add(Fault("status", status=500))
    assert (await model.acomplete("count the orders, please")).text == "echo: count the orders, please"
    async for _ in model.astream("and stream it"):
        pass
    kinds = [kind for kind, _ in recording.calls]
    assert kinds == ["before", "after", "wait", "before", "after", "before", "after"]
    tokens, max_tokens = recording.calls[0][1]
    assert 5 <= tokens <= 30 and max_tokens == 64
    failed, answered, streamed = (outcome for kind, outcome in recording.calls if kind == "after")
    assert failed.error is not None and failed.error.status_code == 500
    assert answered.usage.input_tokens > 0 and streamed.usage.input_tokens > 0
    for outcome in (failed, answered, streamed):  # the fake's budget headers, read at the adapter's boundary
        assert outcome.budget is not None and outcome.budget.requests.limit == 1000
    assert len(generations(fake)) == 3
    await model.aclose()


async def test_a_tool_run_asks_the_limiter_before_every_turn(context: JobContext, fake: FakeProviderServer) -> None:
    from datus.models.scripted import Reply, ScriptedToolCall

    fake.script.add(Reply(tool_calls=(ScriptedToolCall("count_rows", {"table": "orders"}),)), Reply(text="5 orders"))
    model = LLMBaseModel.model_class("openai")(ModelConfig(
        type="openai", model="gpt-4o-mini", api_key=KNOWN_KEY, base_url=fake.openai_base_url))
    recording = Recording(context.limiter.for_model(model, None))
    model.request_limiter = recording

    def count_rows(table: str) -> int:
        """Count a table's rows."""
        return 5

    result = await model.generate_with_tools("How many orders?", tools=[count_rows])
    assert result["content"] == "5 orders"
    assert [kind for kind, _ in recording.calls] == ["before", "after", "before", "after"]
    await model.aclose()
