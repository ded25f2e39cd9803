"""Acting on dead letters: replay and purge (`dq dead ...`). The records are in the job store
(`tasks.store.dead_letters`).

A replay runs the job again from its row — the request the client submitted, validated again
against the current agent.yml — never from the message that died. That is what makes a
"fixed" job replayable: a job whose message was broken (an old client, a bad producer) runs
from its stored request; one that died of a worker bug or of its model's config runs with the
fixed code or config; one whose model is no longer configured is refused with the client's
error. The row is queued again as new (no runs, deliveries, re-sends or rate-limit retries and waits), counts the replay
(``replays``, ``replayed_at``), and its Redis keys start afresh (events, delivery counter).
A message that was not a job has no row and nothing to replay; purge removes it.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from datus_queue.tasks import keys
from datus_queue.tasks.client import InvalidJob, JobClient, JobNotFound, publish_job

__all__ = ["NotReplayable", "parse_age", "purge", "replay", "replay_all"]

logger = logging.getLogger("datus_queue.tasks.maintenance.dead_letters")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class NotReplayable(ValueError):
    """This dead letter cannot run again; the message says why and what to do."""


def replay(client: JobClient, dead_id: str) -> str:
    """Queue the dead letter's job again; its job id."""
    letter = client.store.dead_letter(dead_id)
    if letter is None:
        raise JobNotFound(dead_id, "dead letter")
    if letter.job_id is None or letter.status is None:
        raise NotReplayable(f"dead letter {dead_id} is a message that was not a job ({letter.reason}): there is "
                            f"nothing to run again; `dq dead purge {dead_id}` removes it")
    if not letter.replayable:
        raise NotReplayable(f"job {letter.job_id} is {letter.status.value} now; only dead or failed jobs are replayed")
    request = client.store.get_request(letter.job_id)
    if request is None:
        raise JobNotFound(letter.job_id)
    try:
        request, provider = client.validate(request)
    except InvalidJob as exc:
        raise InvalidJob(f"job {letter.job_id} cannot be replayed as it is: {exc}") from None
    reset = client.store.reset_for_replay(letter.job_id)
    if reset is None:
        raise NotReplayable(f"job {letter.job_id} changed meanwhile; see `dq status {letter.job_id}`")
    client.redis.delete(*keys.job_keys(letter.job_id))
    with client.app.producer_or_acquire() as producer:
        # if this fails, the row is queued: the sweeper sends it once it is overdue
        publish_job(client.app, producer, letter.job_id, request, provider)
    client.store.remove_dead_letter(dead_id)
    logger.info("replayed job %s (dead letter %s: %s)", letter.job_id, dead_id, letter.reason)
    return letter.job_id


def replay_all(client: JobClient) -> tuple[list[str], list[tuple[str, str]]]:
    """Replay every dead letter that is a job: ``(replayed job ids, [(dead id, why not)])``."""
    replayed: list[str] = []
    skipped: list[tuple[str, str]] = []
    for letter in client.store.dead_letters():
        try:
            replayed.append(replay(client, letter.dead_id))
        except (NotReplayable, InvalidJob, JobNotFound) as exc:
            skipped.append((letter.dead_id, str(exc)))
    return replayed, skipped


def purge(store: Any, older_than: timedelta | None = None, dead_ids: list[str] | None = None) -> int:
    """Delete records last seen more than ``older_than`` ago, and those named; how many."""
    removed = sum(store.remove_dead_letter(dead_id) for dead_id in dead_ids or [])
    if older_than is not None:
        removed += store.purge_dead_letters(datetime.now(UTC) - older_than)
    return removed


def parse_age(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w``."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"--older-than {text!r}: give a number and a unit, e.g. 30m, 12h, 7d, 2w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
