"""Provider limits across the fleet, end to end: several real ``dq worker`` processes share one
budget in Redis against the fake provider, which enforces the provider's side of it (429 with
Retry-After past its limit) and records what arrived when. The limiter's own logic is tested in
tests/tasks/test_ratelimit.py; the timing figures (achieved rate, acquire cost, throughput) are
in ops/bench/ratelimit.py."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml

from datus.models.config import AgentConfig
from datus.models.scripted import Fault
from datus.testing.fake_process import fake_server_process
from datus.testing.fake_server import FakeProviderServer
from datus.testing.limits import ProviderLimits
from datus_queue.tasks import keys
from datus_queue.tasks.client import InvalidJob, JobClient
from datus_queue.tasks.schemas import JobStatus
from tests.tasks.conftest import (
    KNOWN_KEY,
    JobEnv,
    StartWorker,
    Worker,
    generations,
    recorded_events,
    wait_for,
)

Configure = Callable[..., JobClient]
MODEL = "gpt-4o-mini"


@pytest.fixture
def configure(job_env: JobEnv) -> Iterator[Configure]:
    """``configure(models={"openai": {"rate_limits": {...}}}, allowed_models=[...])`` rewrites the
    test's agent.yml (before its workers start) and returns a client on it. A new model name
    starts as a copy of ``openai`` unless its fields give a ``type``."""
    from datus_queue.tasks.app import create_app

    made: list[tuple[JobClient, Any]] = []

    def apply(models: dict[str, dict[str, Any]] | None = None, **agent: Any) -> JobClient:
        config = yaml.safe_load(job_env.agent_yml.read_text(encoding="utf-8"))
        for name, fields in (models or {}).items():
            base = {} if "type" in fields else dict(config["agent"]["models"]["openai"])
            config["agent"]["models"].setdefault(name, base).update(fields)
        config["agent"].update(agent)
        job_env.agent_yml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        settings = job_env.settings()
        app = create_app(settings)
        client = JobClient(settings=settings, agent_config=AgentConfig.from_file(job_env.agent_yml), app=app)
        made.append((client, app))
        return client

    yield apply
    for client, app in made:
        client.close()
        client.store.close()
        app.close()


def start_fleet(worker: StartWorker, count: int, concurrency: int, **options: Any) -> list[Worker]:
    workers = [worker("openai", concurrency=concurrency, wait=False, **options) for _ in range(count)]
    for handle in workers:  # started side by side, then waited for
        handle.wait_ready()
    return workers


def warm_up(client: JobClient, workers: list[Worker]) -> None:
    """A job on every worker first: its first call imports the SDK and loads the tokenizer, which
    holds its event loop for a moment (calls granted meanwhile would then leave together)."""
    warmed: set[int] = set()
    for _ in range(10):
        jobs = client.submit_many([{"model": "openai", "prompt": f"warm-up {i}", "stream": False}
                                   for i in range(len(workers) * 4)])
        for job_id in jobs:
            assert client.result(job_id, timeout=60).status is JobStatus.SUCCEEDED
            warmed.update(ran_on(workers, job_id))
        if len(warmed) == len(workers):
            return
    raise AssertionError(f"only workers {sorted(warmed)} got a warm-up job")


def ran_on(workers: list[Worker], job_id: str) -> list[int]:
    """The indexes of the workers whose log shows they received the job."""
    return [i for i, handle in enumerate(workers) if f"[{job_id}] received" in handle.log()]


def state(client: JobClient, model: str = MODEL) -> dict[str, float]:
    from datus.models.base import LLMBaseModel

    fingerprint = LLMBaseModel.create_model(client.agent_config, "openai").key_fingerprint
    raw = client.redis.hgetall(keys.ratelimit_state("openai", fingerprint, model))
    return {name.decode(): float(value) for name, value in raw.items()}


def slots_key(client: JobClient) -> str:
    from datus.models.base import LLMBaseModel

    fingerprint = LLMBaseModel.create_model(client.agent_config, "openai").key_fingerprint
    return keys.ratelimit_slots("openai", fingerprint, MODEL)


# -- staying inside a limit the provider enforces ---------------------------------------------------


# a 400-character prompt: 100 tokens as the fake counts them (four characters a token)
PROMPT_TOKENS = 100
SENTENCE = "Which customers in Berlin placed more than two orders last year, and what did they spend? "


def sized_prompt(i: int) -> str:
    head = f"({i:03d}) "
    return head + (SENTENCE * 5)[: PROMPT_TOKENS * 4 - len(head)]


# the providers' documented shapes (datus/testing/limits.py), and the 2 s sliding windows of issue 18
SHAPES = {
    "openai-quantized-1s": lambda **limits: ProviderLimits.documented("openai", **limits),
    "claude-token-bucket-1s": lambda **limits: ProviderLimits.documented("claude", **limits),
    "sliding-2s": lambda **limits: ProviderLimits(**limits, window_s=2, enforcement="sliding_window"),
}


def tightest_window(url: str, shape: str, per_s: float, counted: int) -> str:
    """Where the provider saw the last ``counted`` arrivals (those under its limits) closest
    together: for a failure's message (how far the fleet's spread went past the slack its share
    leaves)."""
    window_s = 2.0 if shape == "sliding-2s" else 1.0
    arrivals = sorted(r["at"] for r in httpx.get(f"{url}/_fake/requests").json()["requests"]
                      if r["path"].endswith(("/completions", "/messages")))[-counted:]
    allowed = round(per_s * window_s)
    spans = [(arrivals[k + allowed] - arrivals[k], k) for k in range(len(arrivals) - allowed)]
    if not spans:
        return "fewer arrivals than a window allows"
    span, k = min(spans)
    return (f"{allowed + 1} arrivals within {span * 1000:.1f} ms (window {window_s * 1000:.0f} ms), from arrival "
            f"{k}; the gaps there (ms): {[round((b - a) * 1000, 1) for a, b in zip(arrivals[k:], arrivals[k + 1:k + 8])]}")


@pytest.fixture
def provider_process() -> Iterator[str]:
    """The fake provider in a process of its own: its clock is not stalled by this test process's
    threads (`datus.testing.fake_process`). Yields its URL."""
    with fake_server_process("--api-key", KNOWN_KEY) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "budget"), [("openai-quantized-1s", "requests"), ("claude-token-bucket-1s", "requests"),
                                               ("sliding-2s", "requests"), ("openai-quantized-1s", "input_tokens")])
def test_three_workers_share_one_budget_and_the_provider_never_says_429(
        shape: str, budget: str, configure: Configure, worker: StartWorker, provider_process: str) -> None:
    # default limiter settings: the burst and share a user gets. The fake counts a prompt's tokens as
    # characters / 4, as OpenAI estimates them for its token limits; the limiter reserves at least that
    if budget == "requests":
        limits: dict[str, float] = {"requests_per_minute": 1200}
    else:  # 60,000 tokens a minute: ten of these prompts a second
        limits = {"input_tokens_per_minute": 60_000}
    client = configure(models={"openai": {"rate_limits": limits, "base_url": f"{provider_process}/v1"}})
    workers = start_fleet(worker, 3, concurrency=20)
    warm_up(client, workers)
    # the provider: 429 past what it allows in any of its windows
    limited = httpx.post(f"{provider_process}/_fake/limits", json=dataclasses.asdict(SHAPES[shape](**limits)))
    assert limited.status_code == 200, limited.text
    jobs = client.submit_many([{"model": "openai", "prompt": sized_prompt(i), "stream": False} for i in range(120)])
    results = [client.result(job_id, timeout=180) for job_id in jobs]

    assert all(result.status is JobStatus.SUCCEEDED for result in results), {r.error for r in results}
    counts = httpx.get(f"{provider_process}/_fake/limits").json()
    # not one 429 from the provider; for token limits too, whatever the mix of reservations (each is at
    # least the provider's count; the limiter's input-token log keeps any second inside what it allows)
    prompts_per_s = (limits["requests_per_minute"] if budget == "requests"
                     else limits["input_tokens_per_minute"] / PROMPT_TOKENS) / 60
    assert (counts["admitted"], counts["limited"]) == (120, 0), (counts, tightest_window(
        provider_process, shape, prompts_per_s, counts["admitted"] + counts["limited"]))
    assert all(result.rate_limit_retries == 0 and result.attempts == 1 for result in results)
    # 60 slots against a provider that takes 20 a second: the limiter held jobs back, and gave them tickets
    assert sum(result.rate_limit_waits for result in results) > 0
    assert len({i for job_id in jobs for i in ran_on(workers, job_id)}) >= 2  # the fleet shared the budget
    if budget == "input_tokens":  # reserved before each call, then reconciled with what the provider counted
        assert {r.usage["input_tokens"] for r in results} == {100}


def test_a_cooldown_one_worker_set_is_honoured_by_the_others_before_their_next_request(
        configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    client = configure()
    workers = start_fleet(worker, 3, concurrency=2)
    fake.script.add(Fault("rate_limit", retry_after=3), match="cool: first")
    first = client.submit({"model": "openai", "prompt": "cool: first", "stream": False})
    until = wait_for(lambda: state(client).get("cd"), 20, "the cooldown in Redis") / 1e6  # Redis time, seconds
    others = [client.submit({"model": "openai", "prompt": f"cool: next {i}", "stream": False}) for i in range(8)]
    results = [client.result(job_id, timeout=60) for job_id in [first, *others]]

    assert all(result.status is JobStatus.SUCCEEDED for result in results), [r.error for r in results]
    limited, retried = generations(fake, "cool: first")
    assert limited.at < until <= retried.at  # the 429, then its own retry after the cooldown
    later = generations(fake, "cool: next")
    assert len(later) == len(others)
    assert all(request.at >= until for request in later), (until, [r.at for r in later])  # nobody hammered
    assert all(result.rate_limit_waits >= 1 for result in results[1:])  # they waited it out, off the workers
    first_worker = set(ran_on(workers, first))
    assert any(set(ran_on(workers, job_id)) - first_worker for job_id in others)  # on other workers too


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("settings", ["short", "defaults"])
def test_slots_of_a_worker_killed_holding_them_are_free_again_within_their_lease(
        settings: str, configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    from datus_queue.tasks.settings import Settings

    client = configure(models={"openai": {"rate_limits": {"max_concurrency": 3}}})
    if settings == "short":
        lease_s = 3.0
        # shortened so the test waits seconds, not DQ_RATE_LIMIT_SLOT_LEASE_S's 30 s: what is asserted (a
        # dead worker's slots end within their lease, nobody renews them) does not depend on its length.
        # The job leases are short too so that its jobs come back at the 6 s visibility timeout
        options: dict[str, Any] = {"env": {"DQ_RATE_LIMIT_SLOT_LEASE_S": "3", "DQ_LEASE_S": "2"},
                                   "visibility_timeout_s": 6}
    else:  # no DQ_* set: the default slot lease, and the jobs come back through the next worker's sweep
        lease_s, options = Settings.model_construct().rate_limit_slot_lease_s, {}
    holder = worker("openai", concurrency=8, **options)
    fake.hold()  # the calls get no answer: their slots stay taken
    jobs = [client.submit({"model": "openai", "prompt": f"slot-{i}", "stream": False}) for i in range(5)]
    slots = slots_key(client)
    wait_for(lambda: len(generations(fake, "slot-")) == 3, 20, "three calls in flight")
    assert client.redis.zcard(slots) == 3  # the semaphore is full; two jobs wait for a slot
    time.sleep(0.5)
    assert len(generations(fake, "slot-")) == 3
    killed_at = time_us(client)
    holder.kill()
    leases = client.redis.zrange(slots, 0, -1, withscores=True)
    assert len(leases) == 3 and all(score <= killed_at + lease_s * 1e6 for _, score in leases)  # none past its term
    # free again: every lease over (the next acquire drops them), with nobody left to renew them
    wait_for(lambda: all(score < time_us(client) for _, score in client.redis.zrange(slots, 0, -1, withscores=True)),
             lease_s + 15, "the dead worker's leases to run out")
    fake.release()
    worker("openai", concurrency=8, **options)
    results = [client.result(job_id, timeout=120) for job_id in jobs]
    assert all(result.status is JobStatus.SUCCEEDED for result in results), [r.error for r in results]
    wait_for(lambda: client.redis.zcard(slots) == 0, 10, "every slot given back")


def time_us(client: JobClient) -> float:
    seconds, micros = client.redis.time()
    return seconds * 1e6 + micros


# -- retries, budgets, countdowns ---------------------------------------------------------------------


def test_rate_limits_spend_a_time_budget_not_attempts_and_other_errors_keep_max_retries(
        configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    client = configure(models={"openai": {"max_retries": 1}})  # two attempts for errors that count
    worker("openai", concurrency=4, env={"DQ_RATE_LIMIT_MAX_WAIT_S": "4"})
    fake.script.add(Fault("rate_limit", retry_after=1), match="budget: 429", times=None)
    fake.script.add(Fault("status", status=500), match="budget: 500", times=None)
    limited = client.submit({"model": "openai", "prompt": "budget: 429", "stream": False})
    broken = client.submit({"model": "openai", "prompt": "budget: 500", "stream": False})
    limited_result, broken_result = client.result(limited, timeout=60), client.result(broken, timeout=60)

    assert limited_result.status is JobStatus.FAILED and limited_result.error.code == "model_rate_limit"
    assert "DQ_RATE_LIMIT_MAX_WAIT_S" in limited_result.error.message
    assert len(generations(fake, "budget: 429")) >= 3  # past max_retries: 429s spend the 4 s budget instead
    assert broken_result.status is JobStatus.FAILED and broken_result.error.code == "model_server_error"
    assert len(generations(fake, "budget: 500")) == 2  # max_retries: 1


def test_the_countdown_cap_with_the_default_settings_is_ten_minutes_inside_the_visibility_timeout() -> None:
    """The cap the test below sees in seconds, with the settings a user gets (no DQ_* set)."""
    from datus_queue.tasks.jobs import retry_ceiling
    from datus_queue.tasks.settings import Settings

    defaults = Settings.model_construct()  # every field at its default, whatever DQ_* this process has
    assert (defaults.max_retry_countdown_s, defaults.visibility_timeout_s) == (600, 3600)
    assert retry_ceiling(defaults) == 600 < defaults.visibility_timeout_s / 2


def test_a_countdown_past_the_visibility_margin_is_capped_and_the_job_still_succeeds(
        configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    client = configure()
    # a 4 s visibility timeout instead of an hour: the cap is half of it (retries may wait at most
    # 2 s at a time), so the test sees a capped countdown in seconds; the cap's arithmetic is the
    # same with the defaults (min(DQ_MAX_RETRY_COUNTDOWN_S 600 s, half of 3,600 s): 10 min)
    worker("openai", concurrency=4, visibility_timeout_s=4)
    fake.script.add(Fault("rate_limit", retry_after=5), match="far: ")
    job_id = client.submit({"model": "openai", "prompt": "far: retry after 5 s", "stream": False})
    result = client.result(job_id, timeout=60)

    assert result.status is JobStatus.SUCCEEDED, result.error
    first, second = generations(fake, "far: ")
    assert second.at - first.at >= 5  # Retry-After honoured (the cooldown), though each wait was capped
    waits = [event.step["output"]["countdown_s"] for event in recorded_events(client, job_id)
             if event.step["action_type"] in ("retry", "rate_limit_wait")]
    assert len(waits) >= 2 and max(waits) <= 2.0  # 5 s in capped pieces, none a reason to fail


# -- what a worker refuses before any call ------------------------------------------------------------


def test_only_allowed_models_are_accepted_at_submit_and_run_on_the_worker(
        configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    client = configure(models={"openai-small": {"rate_limits": {"output_tokens_per_minute": 1000}}},
                       allowed_models=["openai", "openai-small", "openai:gpt-4o-mini*"])
    with pytest.raises(InvalidJob, match=r"'openai:gpt-4o' is not allowed.*openai:gpt-4o-mini\*"):
        client.submit({"model": "openai:gpt-4o", "prompt": "x"})
    with pytest.raises(InvalidJob, match="'deepseek' is not allowed"):
        client.submit({"model": "deepseek", "prompt": "x"})  # configured, but not in the list
    # a provider:model takes its key and endpoint from the worker's environment
    running = worker("openai", concurrency=2, env={"OPENAI_API_KEY": KNOWN_KEY, "OPENAI_BASE_URL": fake.openai_base_url})
    pattern = client.submit({"model": "openai:gpt-4o-mini", "prompt": "allowed: by pattern", "stream": False})
    assert client.result(pattern, timeout=30).status is JobStatus.SUCCEEDED
    # sent around the client: the worker checks again, and makes no call
    around = client.store.create_job("job-around", {"model": "openai:gpt-4o", "prompt": "allowed: never"},
                                     "openai")[0]
    client.app.send_task("dq.generate", args=(around, {"provider": "openai", "request": {
        "model": "openai:gpt-4o", "prompt": "allowed: never"}}), task_id=around, queue="llm.openai")
    refused = client.result(around, timeout=30)
    assert refused.status is JobStatus.FAILED and refused.error.code == "model_not_allowed"
    assert "agent.allowed_models" in refused.error.message
    # bigger than the whole per-minute budget: fails at once, saying what to change, no call either
    too_big = client.submit({"model": "openai-small", "prompt": "allowed: too big", "options": {"max_tokens": 2000}})
    big = client.result(too_big, timeout=30)
    assert big.status is JobStatus.FAILED and big.error.code == "model_request_too_large" and big.attempts == 1
    assert "output_tokens_per_minute" in big.error.message and "max_tokens" in big.error.message
    assert generations(fake, "allowed: never") == [] and generations(fake, "allowed: too big") == []
    assert running.alive()


# -- fairness -----------------------------------------------------------------------------------------


def test_an_interactive_job_goes_before_a_queued_batch_and_a_batch_retry_keeps_its_priority(
        configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    client = configure(models={"openai-other": {"model": "gpt-4o"}})  # another budget: its cooldown is its own
    batch = client.submit_many([{"model": "openai-other" if i == 0 else "openai", "prompt": f"fair: batch {i}",
                                 "stream": False, "batch_id": "b-fair", "item_id": str(i)} for i in range(20)])
    interactive = client.submit({"model": "openai", "prompt": "fair: interactive", "stream": False})
    assert client.redis.llen("llm.openai") == 1  # priority 0: the queue itself
    assert client.redis.llen("llm.openai\x06\x166") == 20  # batch: the priority-6 list, popped after it
    fake.script.add(Fault("rate_limit", retry_after=30), match="fair: batch 0")  # a retry held for 30 s
    running = worker("openai", concurrency=1)
    results = [client.result(job_id, timeout=60) for job_id in [interactive, *batch[1:]]]
    assert all(result.status is JobStatus.SUCCEEDED for result in results)
    log = running.log()
    received = [found for found in re.findall(r"\[([0-9a-f]{32})\] received", log)]
    assert received[0] == interactive  # ahead of twenty batch jobs queued before it

    def held_retry() -> list[dict[str, Any]]:  # the worker holds the retry until its countdown: unacked
        unacked = [json.loads(raw)[0] for raw in client.redis.hvals("unacked")]
        return [m for m in unacked if m["headers"]["id"] == batch[0] and m["headers"].get("retries") == 1]

    [retry] = wait_for(held_retry, 20, "the batch job's retry, held for its countdown")
    assert retry["properties"]["priority"] == 6  # it stays in the batch lane
    assert retry["headers"]["dq_infra_retries"] == 0  # a model error: no infrastructure retry in a row
    client.cancel(batch[0])


# -- a storm of faults, workers killed ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_fault_mix_and_two_killed_workers_and_every_job_succeeds_with_default_settings(
        configure: Configure, worker: StartWorker, fake: FakeProviderServer) -> None:
    # default retry settings: no max_retries, no retry_* (the fixture's models set small ones)
    client = configure(models={"plain": {"type": "openai", "model": MODEL, "api_key": KNOWN_KEY,
                                         "base_url": fake.openai_base_url}})
    config = client.agent_config.models["plain"]
    assert (config.max_retries, config.retry_base_delay_s, config.timeout_s) == (6, 0.5, 120.0)
    for every, fault in ((4, Fault("rate_limit")), (7, Fault("status", status=500)),
                         (11, Fault("status", status=503))):
        fake.script.add(fault, every=every, times=None)
    # recovery settings at their defaults too: a 15 s lease, the workers' own sweep, an hour's visibility
    # timeout, no dq beat — the killed workers' jobs come back through their leases and the sweep
    workers = start_fleet(worker, 3, concurrency=50)
    total = 500
    jobs = client.submit_many([{"model": "plain", "prompt": f"mix-{i}", "stream": False} for i in range(total)])

    def finished() -> int:
        return sum(client.store.count_by_status()[s] for s in ("succeeded", "failed"))

    for victim in (0, 1):  # two SIGKILLs while jobs are in flight, each replaced
        target = finished() + 60
        wait_for(lambda: finished() >= target, 120, "progress before the kill")  # noqa: B023 - called at once
        workers[victim].kill()
        workers.append(worker("openai", concurrency=50))
    results = [client.result(job_id, timeout=240) for job_id in jobs]

    failed = [(r.job_id, r.error) for r in results if r.status is not JobStatus.SUCCEEDED]
    assert failed == [], failed[:5]
    assert len({request.body["messages"][0]["content"] for request in generations(fake, "mix-")}) == total
    assert sum(result.rate_limit_retries for result in results) > total / 10  # the 429s and 503s were retried
    # the killed workers' jobs came back (re-sent by the sweep once their leases ran out)
    assert sum(result.deliveries > 1 or result.resends > 0 for result in results) > 0
