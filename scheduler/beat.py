"""Celery beat on redbeat, configured for datus-queue.

redbeat keeps the schedule in Redis and holds a lock there while it runs: a second `dq beat`
blocks on the lock as a hot standby and takes over when the holder stops renewing it (at once
when the holder stops cleanly, after ``DQ_BEAT_LOCK_TIMEOUT_S`` when it dies). Each firing is
written to the entry in Redis before the message is sent, so the new holder continues where the
old one stopped: a slot fires once — or, if the holder dies between the two, not at all (the
next slot comes; for a batch, its slot is claimed in the store, `tasks.maintenance.schedules`).

`Scheduler` adds one thing to redbeat's: a scheduled batch's message carries its slot, the cron
time it fired for, so every delivery of that message — a redelivery, a duplicate — names the
same slot, and the store's claim on it runs the batch once.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from redbeat import RedBeatScheduler

from datus.configuration.agent_config import AgentConfig
from scheduler.schedule import RUN_SCHEDULE, beat_schedule
from tasks import keys
from tasks.maintenance.schedules import latest_slot
from tasks.settings import Settings

__all__ = ["Scheduler", "configure"]

logger = logging.getLogger("scheduler.beat")


class Scheduler(RedBeatScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # made before beat_init, whose redbeat handler then blocks until the lock is ours
        logger.info("dq beat: taking the scheduler lock %s (while another dq beat holds it, this one waits as a "
                    "hot standby)", self.lock_key)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task == RUN_SCHEDULE:  # entries are loaded afresh from Redis each tick: this copy is ours
            slot = latest_slot(entry.schedule, datetime.now(UTC))
            entry.kwargs = {**(entry.kwargs or {}), "slot": slot.isoformat()}
        return super().apply_async(entry, producer, advance, **kwargs)


def configure(app: Celery, settings: Settings, agent_config: AgentConfig) -> None:
    lock_timeout = settings.beat_lock_timeout_s
    app.conf.update(
        beat_schedule=beat_schedule(settings, agent_config),
        redbeat_redis_url=settings.redis_url,
        redbeat_redis_options={},  # not the broker's transport options
        redbeat_key_prefix=keys.BEAT_PREFIX,
        redbeat_lock_timeout=lock_timeout,
        # the beat wakes (and renews its lock) at least this often; a standby retries the lock as often
        beat_max_loop_interval=max(0.1, lock_timeout / 5),
    )
