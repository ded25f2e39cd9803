"""Provider limits shared by every worker, in Redis: the job system's request limiter.

Every model a worker runs gets a `ModelLimiter` (``model.request_limiter``, the model layer's
hook in ``datus.models.limiter``), so every request a job makes — each attempt, each turn of
a tool run — goes through it. Budgets are per (provider, API-key fingerprint, model):
``rate_limits`` in agent.yml (requests, input and output tokens per minute, concurrency);
two keys have two budgets, every worker using one key shares one. The state lives in Redis
(``tasks.ratelimit_lua``: one Lua call per acquire and per release, on Redis time; the calls
of one loop turn share a pipeline, ``tasks.redis_batch``).

Before a request (`ModelLimiter.before`): reserve one request, the prompt's tokens (counted
offline, scaled by what the provider has been counting for this model) and ``max_tokens`` of
output, and a concurrency slot. The answer is go, or a wait:

- up to ``DQ_RATE_LIMIT_SHORT_WAIT_S`` (1 s): awaited here, on the event loop (but a delivery
  waits here at most five of those in all, so it never outlives the visibility timeout);
- longer: the job is handed back (`Deferred`): it goes back to the queue as a Celery retry
  with that countdown, holding a ticket — its place in its lane's waiting line — so it comes
  back when its turn is due, not to spin (a tool run comes back resuming from its
  checkpoints: no tool runs twice). A caller that may not leave (``JobWait.can_defer`` False,
  or no job at all) waits here instead, within its time budget;
- a concurrency slot is waited for here (it frees within a call), woken by this process's
  releases or by the first lease that runs out elsewhere, within the same allowance;
- a request larger than the whole per-minute budget fails at once (`RequestTooLargeError`).

After it (`ModelLimiter.after`): give back or charge the difference between the reserved and
the real tokens, free the slot; a 429 / 529 / overloaded answer sets a cooldown for the
key and model (its Retry-After, else a backoff that grows while they keep coming) that every
worker honours before its next request there; budget headers that say the provider's
``remaining`` is low set a pace (one request per refill interval) before a 429 comes.

Lanes: batch jobs (``batch_id``) wait in their own line, behind the interactive one; with
the broker priority of batch messages (``DQ_BATCH_PRIORITY``) an interactive job is neither
stuck behind a batch in the queue nor at the limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import os
import random
import socket
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from datus.models.config import RateLimits
from datus.models.errors import ModelError, RequestTooLargeError
from datus.models.limiter import PlannedRequest, RequestOutcome
from datus.models.rate_limit_headers import ProviderBudget
from datus.models.retry import is_rate_limited
from datus_queue.tasks import keys
from datus_queue.tasks.observability import metrics
from datus_queue.tasks.ratelimit_lua import ACQUIRE, COOLDOWN, GO, LATE, NO_SLOT, RELEASE, RENEW, TICKET, TOO_LARGE
from datus_queue.tasks.redis_batch import RedisBatch

__all__ = [
    "DeadlineExceeded",
    "Deferred",
    "JobWait",
    "ModelLimiter",
    "RateLimitWaitExceeded",
    "RedisLimiter",
    "current_job",
]

logger = logging.getLogger("datus_queue.tasks.ratelimit")

DEFAULT_OUTPUT_RESERVE = 1024  # output tokens reserved for a request with no max_tokens (reconciled after)
LOW_BUDGET = 0.1  # the provider's remaining below this share of its limit: pace requests
_SLOT_POLL_S = 0.25  # longest a slot waiter sleeps before asking Redis again (a release elsewhere)
_PAID_LEAD_S = 0.005  # a booked request asks Redis this long before its start (a round trip is well under)
_LATE_CHECKS = 3  # times a request may find itself late and book again before it goes late anyway
_SHORTEST_WINDOW_S = 1.0  # the shortest window providers document enforcing a limit over (tasks/ratelimit_lua.py)
_BUCKETS = {1: "requests_per_minute", 2: "input_tokens_per_minute", 3: "output_tokens_per_minute"}


# -- what a job tells the limiter, and what the limiter tells the job -----------------------------


@dataclass
class JobWait:
    """The running job, as its requests' limiter sees it (`current_job`)."""

    job_id: str
    lane: int = 0  # 0 interactive, 1 batch
    can_defer: bool = True  # False: it may not go back to the queue, long waits happen here
    ticket_us: int = 0  # the place in line this delivery came back with (used by its first request)
    budget_end: float = float("inf")  # epoch s: rate-limit waits must end by then
    deadline: float | None = None  # epoch s: the job's own deadline
    waited_s: float = 0.0  # waited in this delivery

    def take_ticket(self) -> int:
        ticket, self.ticket_us = self.ticket_us, 0
        return ticket


current_job: contextvars.ContextVar[JobWait | None] = contextvars.ContextVar("dq_current_job", default=None)


class Deferred(Exception):
    """The limiter hands the job back: retry it in ``wait_s`` (the job's Celery retry).
    ``rate_limited``: the wait is a provider's refusal (a cooldown or a 429 being waited out),
    which spends the job's time budget; otherwise it is a place in the line."""

    def __init__(self, wait_s: float, ticket_us: int, rate_limited: bool, what: str) -> None:
        super().__init__(f"waiting {wait_s:.2f}s for {what}")
        self.wait_s, self.ticket_us, self.rate_limited, self.what = wait_s, ticket_us, rate_limited, what


class RateLimitWaitExceeded(Exception):
    """The job has waited for rate limits as long as its budget allows."""


class DeadlineExceeded(Exception):
    """The job's own deadline comes before its turn."""


# -- the limiter ----------------------------------------------------------------------------------


class RedisLimiter:
    """One per worker process (`tasks.context.JobContext.limiter`): binds models to their
    budgets and keeps what is per event loop (the Redis pipeline, the slots this process
    holds and the local waiters for them)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        settings = context.settings
        self.short_wait_s = settings.rate_limit_short_wait_s
        self.in_process_s = 5 * settings.rate_limit_short_wait_s  # a delivery's waits here, in all
        self.burst_us = settings.rate_limit_burst_s * 1e6
        self.share = settings.rate_limit_share
        # later than this after its start a request books again: half the slack of the shortest window
        self.late_s = max(0.002, _SHORTEST_WINDOW_S * (1 - self.share) / self.share / 2)
        self.late_us = round(self.late_s * 1e6)
        self.lease_s = settings.rate_limit_slot_lease_s
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._slot_ids = itertools.count(1)
        self._slot_prefix = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"

    def for_model(self, model: Any, limits: RateLimits | None) -> ModelLimiter:
        return ModelLimiter(self, model.provider, model.key_fingerprint, model.model_name, limits or RateLimits())

    def loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            state = self._per_loop[loop] = _LoopState(RedisBatch.of(self.context.aredis), self)
        return state

    def next_slot_id(self) -> str:
        return f"{self._slot_prefix}:{next(self._slot_ids)}"


@dataclass
class _Permit:
    slot: str  # '' when the model has no max_concurrency
    input_tokens: int  # reserved
    output_tokens: int  # reserved
    counted_input: int = 0  # the offline count the input reservation was scaled from


class ModelLimiter:
    """The request limiter of one model object (`datus.models.limiter.RequestLimiter`)."""

    def __init__(self, owner: RedisLimiter, provider: str, fingerprint: str, model: str, limits: RateLimits) -> None:
        self.owner = owner
        self.limits = limits
        self.name = f"{provider}/{model}"
        self.provider, self.model = provider, model
        self.keys = [keys.ratelimit_state(provider, fingerprint, model), keys.ratelimit_slots(provider, fingerprint, model),
                     keys.ratelimit_input_log(provider, fingerprint, model)]
        self._numbers = [limits.requests_per_minute or 0, limits.input_tokens_per_minute or 0,
                         limits.output_tokens_per_minute or 0]
        # input tokens are also logged over the shortest window (one token a window at least), so
        # a mix of request sizes stays inside it too (tasks/ratelimit_lua.py)
        itpm = limits.input_tokens_per_minute or 0
        self._log_window_us = round(max(_SHORTEST_WINDOW_S, 60 / itpm) * 1e6) if itpm else 0
        self._rate_limited_in_a_row = 0  # this process's 429s on this key since its last answer
        # what the provider counts for a prompt over what was counted offline, when more (learnt from usage)
        self._input_scale = 1.0

    # -- before ---------------------------------------------------------------------------

    async def before(self, request: PlannedRequest) -> _Permit:
        limits, owner = self.limits, self.owner
        state = owner.loop_state()
        job = current_job.get()
        counted = request.input_tokens() if limits.input_tokens_per_minute else 0
        n_in = math.ceil(counted * self._input_scale)
        n_out = (request.max_output_tokens or DEFAULT_OUTPUT_RESERVE) if limits.output_tokens_per_minute else 0
        slot = owner.next_slot_id() if limits.max_concurrency else ""
        lane = job.lane if job is not None else 0
        ticket = job.take_ticket() if job is not None else 0
        paid = False
        booked = 0  # Redis µs: the start booked (paid)
        late_checks = _LATE_CHECKS  # a request late this many times goes anyway (a loop that is never on time)
        horizon_us = owner.short_wait_s * 1e6
        while True:
            args = [*self._numbers, limits.max_concurrency or 0, n_in, n_out, lane, booked if paid else ticket,
                    1 if paid else 0, horizon_us, owner.burst_us, slot, owner.lease_s * 1e6, owner.share,
                    owner.late_us if late_checks else -1, self._log_window_us]
            sent = time.monotonic()
            code, wait_us, ticket_us, detail = await state.batch.call(
                ACQUIRE, self.keys, args, orphan=self._orphan(slot, paid) if slot else None)
            received = time.monotonic()
            wait = wait_us / 1e6
            # granted (a slot too, if any): send at its start. Booked less than the paid lead ahead
            # with no slot to take, it goes too: the acquire "just before its start" would be sent
            # now, the same cooldown check again, one more round trip that a busy loop makes late
            # (saturated, a request took 6 acquires, most of them booking again after a late one)
            if code == GO and (paid or wait <= 0 or (wait <= _PAID_LEAD_S and not slot)):
                if wait > 0 and not paid:
                    metrics.rate_limit_wait(self.provider, self.model, wait, deferred=False)
                go_at = (sent + received) / 2 + wait  # the script ran between sent and received
                if go_at > received:
                    await self._sleep(job, go_at - received, record=False)
                if late_checks and time.monotonic() - go_at > owner.late_s:
                    # late: sent now it would crowd the next one's window; its slot is lost, book again
                    late_checks -= 1
                    paid, ticket = False, 0
                    if slot:
                        self._give_back(slot)
                    continue
                if slot:
                    state.held(self.keys[1], slot)
                return _Permit(slot, n_in, n_out, counted)
            if code == GO:  # booked ahead: the cooldown check and a slot just before it, then go at it
                paid, ticket, booked = True, 0, int(ticket_us)
                metrics.rate_limit_wait(self.provider, self.model, wait, deferred=False)
                await self._sleep(job, max(0.0, (sent + received) / 2 + wait - _PAID_LEAD_S - time.monotonic()),
                                  record=False)
            elif code == LATE:  # woke after its start: book again
                late_checks -= 1
                paid, ticket = False, 0
            elif code == NO_SLOT:
                if job is not None and job.can_defer and job.waited_s > owner.in_process_s:
                    raise self._defer(owner.short_wait_s * (1 + random.random()), 0, False, f"a slot of {self.name}")
                started = time.monotonic()
                await state.wait_for_slot(self.keys[1], lane, min(wait, _SLOT_POLL_S) if wait > 0 else _SLOT_POLL_S)
                if job is not None:
                    job.waited_s += time.monotonic() - started
            elif code == COOLDOWN:
                paid, ticket = False, 0  # a booking made before the cooldown is forfeit
                await self._wait(job, wait, 0, True, f"{self.name}'s cooldown", jitter=0.1)
            elif code == TICKET:
                ticket = int(ticket_us)
                # back half a short wait before the turn, to be booked at the ticket itself: one that
                # comes back after it (a Celery countdown, a busy loop) has its slot lost to the pace
                lead = min(wait, owner.short_wait_s) / 2
                await self._wait(job, wait - lead, ticket, False, f"{self.name}'s rate limit")
            elif code == TOO_LARGE:
                raise self._too_large(int(detail), n_in, n_out)
            else:  # pragma: no cover - the script answers one of the above
                raise RuntimeError(f"unexpected limiter answer {code}")

    async def wait(self, seconds: float, error: ModelError) -> None:
        """The model layer's wait before it retries ``error`` (a tool run's in-process retry):
        a long rate-limit wait hands the job back when it may go back to the queue."""
        if is_rate_limited(error):
            await self._wait(current_job.get(), seconds, 0, True, f"{self.name}'s rate limit ({type(error).__name__})")
        else:
            await asyncio.sleep(seconds)

    async def _wait(self, job: JobWait | None, wait: float, ticket: int, rate_limited: bool, what: str,
                    jitter: float = 0.0) -> None:
        """Wait here, or hand the job back (`Deferred`). ``jitter``: up to that share is added
        to a wait here, so the waiters of one cooldown do not all go at its last microsecond."""
        here = job is None or not job.can_defer or job.waited_s + wait <= self.owner.in_process_s
        if wait <= self.owner.short_wait_s and here:
            await self._sleep(job, wait * (1 + random.random() * jitter))
            return
        now = time.time()
        if job is not None:
            if job.deadline is not None and now + wait > job.deadline:
                raise DeadlineExceeded(f"waiting {wait:.1f}s for {what} would pass the job's deadline")
            if rate_limited and now + wait > job.budget_end:
                raise RateLimitWaitExceeded(f"still waiting for {what} when the job's rate-limit budget "
                                            "(DQ_RATE_LIMIT_MAX_WAIT_S) ran out")
            if job.can_defer:
                raise self._defer(wait * (1 + random.random() * jitter), ticket, rate_limited, what)
        await self._sleep(job, wait * (1 + random.random() * jitter))  # not a job, or one that may not leave

    async def _sleep(self, job: JobWait | None, seconds: float, record: bool = True) -> None:
        if job is not None:
            job.waited_s += seconds
        if record:
            metrics.rate_limit_wait(self.provider, self.model, seconds, deferred=False)
        await asyncio.sleep(seconds)

    def _defer(self, wait: float, ticket: int, rate_limited: bool, what: str) -> Deferred:
        metrics.rate_limit_wait(self.provider, self.model, wait, deferred=True)
        return Deferred(wait, ticket, rate_limited, what)

    def _too_large(self, bucket: int, n_in: int, n_out: int) -> RequestTooLargeError:
        name = _BUCKETS[bucket]
        limit = getattr(self.limits, name)
        size = {1: "1 request", 2: f"about {n_in} input tokens", 3: f"{n_out} output tokens (max_tokens)"}[bucket]
        fix = {1: "raise requests_per_minute", 2: "shorten the prompt or raise input_tokens_per_minute",
               3: "lower max_tokens or raise output_tokens_per_minute"}[bucket]
        provider, _, model = self.name.partition("/")
        return RequestTooLargeError(
            f"this request needs {size}, more than the whole {name} budget ({limit:g}) of {self.name} in "
            f"agent.yml: it can never be sent; {fix}", provider=provider, model=model)

    def _orphan(self, slot: str, paid: bool) -> Any:
        def give_back(reply: Any) -> None:  # the caller was cancelled after Redis granted it a slot
            if reply and int(reply[0]) == GO and (paid or float(reply[1]) <= 0):
                self._give_back(slot)
        return give_back

    def _give_back(self, slot: str) -> None:
        """Free a slot granted to a request that will not be sent (not awaited: any reply will do)."""
        self.owner.loop_state().batch.call(RELEASE, self.keys, [slot, *self._numbers, 0, 0, 0, 0, 0,
                                                                  self.owner.burst_us, self.owner.share])

    # -- after ----------------------------------------------------------------------------

    async def after(self, permit: _Permit, outcome: RequestOutcome) -> None:
        d_in = d_out = 0
        cooldown = 0.0
        if outcome.usage is not None:
            if self.limits.input_tokens_per_minute:
                d_in = outcome.usage.input_tokens - permit.input_tokens
                if permit.counted_input > 0 and outcome.usage.input_tokens > 0:
                    observed = outcome.usage.input_tokens / permit.counted_input
                    # only ever up: the offline count is already what the provider documents counting
                    # (at least characters / 4), so a smaller answer never shrinks the next reservation
                    self._input_scale = min(4.0, max(1.0, 0.8 * self._input_scale + 0.2 * observed))
            if self.limits.output_tokens_per_minute:
                d_out = outcome.usage.output_tokens - permit.output_tokens
            self._rate_limited_in_a_row = 0
        elif outcome.error is not None:
            d_in, d_out = -permit.input_tokens, -permit.output_tokens  # not processed: give them back
            if is_rate_limited(outcome.error):
                self._rate_limited_in_a_row += 1
                cooldown = outcome.error.retry_after or _backoff(self._rate_limited_in_a_row)
        pace, pace_for = _pace(outcome.budget, permit)
        state = self.owner.loop_state()
        if permit.slot:
            state.released(self.keys[1], permit.slot)
        if permit.slot or d_in or d_out or cooldown or pace:
            if cooldown:
                logger.info("%s: %s, cooling down for %.2fs", self.name, type(outcome.error).__name__, cooldown)
                metrics.cooldown_set(self.provider, self.model)
            await state.batch.call(RELEASE, self.keys, [permit.slot, *self._numbers, d_in, d_out,
                                                        round(cooldown * 1e6), round(pace * 1e6),
                                                        round(pace_for * 1e6), self.owner.burst_us,
                                                        self.owner.share])


def _backoff(times: int) -> float:
    """The cooldown after ``times`` 429s in a row without a Retry-After: 0.5 s doubling, up to 30 s."""
    return min(30.0, 0.5 * 2 ** (times - 1))


def _pace(budget: ProviderBudget | None, permit: _Permit) -> tuple[float, float]:
    """From the provider's budget headers: seconds per request to keep to, and for how long
    (0, 0 when every budget has room). A budget below `LOW_BUDGET` of its limit is spent at
    the rate it refills, so the fleet slows down before the provider says 429."""
    if budget is None:
        return 0.0, 0.0
    pace = until = 0.0
    for part, cost in ((budget.requests, 1), (budget.tokens, permit.input_tokens + permit.output_tokens),
                       (budget.input_tokens, permit.input_tokens), (budget.output_tokens, permit.output_tokens)):
        if part is None or part.limit is None or part.remaining is None or part.remaining >= LOW_BUDGET * part.limit:
            continue
        per_unit = part.refill_seconds_per_unit()
        if per_unit:
            pace = max(pace, per_unit * max(cost, 1))
            until = max(until, part.reset_s or 0.0)
    return pace, until


# -- per event loop: the pipeline, the slots held here, their waiters -------------------------------


@dataclass
class _LoopState:
    batch: RedisBatch
    owner: RedisLimiter
    slots: dict[str, set[str]] = field(default_factory=dict)  # slots key -> slot ids this process holds
    waiters: dict[str, deque[tuple[int, asyncio.Future[None]]]] = field(default_factory=dict)
    renewer: asyncio.Task[None] | None = None

    def held(self, key: str, slot: str) -> None:
        self.slots.setdefault(key, set()).add(slot)
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.get_running_loop().create_task(self._renew())

    def released(self, key: str, slot: str) -> None:
        self.slots.get(key, set()).discard(slot)
        waiting = self.waiters.get(key)
        while waiting:  # wake the first waiter still waiting (interactive ones are queued first)
            _, future = waiting.popleft()
            if not future.done():
                future.set_result(None)
                break

    async def wait_for_slot(self, key: str, lane: int, timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self.waiters.setdefault(key, deque())
        if lane == 0:  # interactive: ahead of the batch waiters
            position = next((i for i, (other, _) in enumerate(waiting) if other > 0), len(waiting))
            waiting.insert(position, (lane, future))
        else:
            waiting.append((lane, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):  # not woken: leave the queue
                waiting.remove((lane, future))

    async def _renew(self) -> None:
        """While this process holds slots: extend their leases every third of a lease, so a
        call longer than a lease keeps its slot and a dead worker's slots still run out."""
        lease_us, every = self.owner.lease_s * 1e6, self.owner.lease_s / 3
        loop = asyncio.get_running_loop()
        due = loop.time()
        while any(self.slots.values()):
            # on a fixed beat: a renewal given up on below has used its tick, so the next goes at
            # once — a tick's sleep after it would renew as the lease ran out (at a third, two thirds,
            # then a full lease)
            due = max(due + every, loop.time())
            await asyncio.sleep(due - loop.time())
            renewals = [self.batch.call(RENEW, [key], [lease_us, *slots]) for key, slots in self.slots.items() if slots]
            try:
                # a reply that does not come within a tick is given up on, so one lost reply (a
                # hung connection) costs one renewal, not every renewal after it
                await asyncio.wait_for(asyncio.gather(*renewals), every)
            except TimeoutError:
                logger.warning("renewing concurrency slots: no reply from Redis within %.1fs; trying again", every)
            except Exception as exc:  # noqa: BLE001 - try again next time; leases are long
                logger.warning("renewing concurrency slots failed: %s: %s", type(exc).__name__, exc)
