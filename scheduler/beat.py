"""Celery beat on redbeat, configured for datus-queue.

redbeat keeps the schedule in Redis and holds a lock there while it runs: a second `dq beat`
blocks on the lock as a hot standby and takes over when the holder stops renewing it (at once
when the holder stops cleanly, after ``DQ_BEAT_LOCK_TIMEOUT_S`` when it dies). Each firing is
written to the entry in Redis before the message is sent, so the new holder continues where the
old one stopped: a slot fires once — or, if the holder dies between the two, not at all (the
next slot comes; for a batch, its slot is claimed in the store, `tasks.maintenance.schedules`).

`Scheduler` adds two things to redbeat's:

- a scheduled batch's message carries its slot, the cron time it fired for, so every delivery
  of that message — a redelivery, a duplicate — names the same slot, and the store's claim on
  it runs the batch once;
- a schedule new to Redis fires first at its next slot (redbeat would fire a new entry at once,
  which for a nightly batch added at noon means a run at noon); of the slots missed while no
  beat ran, the latest still fires once, when a beat is back;
- it outlives Redis being away, at start too. redbeat lets a failed command end beat (a beat
  started while Redis was down exited at once: "beat raised exception ConnectionError"); here
  the beat waits for Redis — one line when it finds Redis gone, one when Redis is back — and goes
  on. One that finds its lock gone (it expired while Redis was away, or this process stalled past
  the lock timeout and the standby took over) sends nothing until it holds the lock again — it
  waits for it as a standby does.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import redis.exceptions
from celery import Celery
from redbeat import RedBeatScheduler
from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, REDBEAT_REDIS_KEY, get_redis

from datus.models.config import AgentConfig
from datus_queue.scheduler.schedule import RUN_SCHEDULE, beat_schedule
from datus_queue.tasks import keys
from datus_queue.tasks.maintenance.outages import Outage
from datus_queue.tasks.maintenance.schedules import latest_slot
from datus_queue.tasks.redis_connect import beat_client, where
from datus_queue.tasks.settings import Settings

__all__ = ["Scheduler", "configure"]

logger = logging.getLogger("datus_queue.scheduler.beat")
_REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)  # BusyLoadingError included


class Scheduler(RedBeatScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._redis = Outage(logger, "dq beat: Redis")  # before super(), which sets the schedule up in Redis
        super().__init__(*args, **kwargs)
        # made before beat_init, whose redbeat handler then blocks until the lock is ours
        logger.info("dq beat: taking the scheduler lock %s (while another dq beat holds it, this one waits as a "
                    "hot standby)", self.lock_key)

    def setup_schedule(self) -> None:
        """Write the schedule to Redis, waiting for Redis as long as it takes."""
        while True:
            try:
                self._setup_schedule()
                break
            except _REDIS_AWAY as exc:
                self._redis.failed(exc, "setting up the schedule")
                time.sleep(min(self.max_interval, 2.0))
        self._redis.ok()

    def _setup_schedule(self) -> None:
        super().setup_schedule()
        for name, definition in self.app.redbeat_conf.schedule.items():
            if definition.get("task") != RUN_SCHEDULE:
                continue
            entry = self.Entry.from_key(self.Entry.generate_key(self.app, name), app=self.app)
            if entry.last_run_at is None:
                entry.reschedule(self.app.now())

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self.lock_key and self.lock is None:  # lost, or Redis was down when beat started
                self._take_lock()
            interval = float(super().tick(*args, **kwargs))
        except redis.exceptions.LockError:
            logger.warning("dq beat: lost the scheduler lock %s (it expired: Redis was away, or this beat stalled); "
                           "sending nothing until it is ours again", self.lock_key)
            self.lock = None
            return 0.0
        except _REDIS_AWAY as exc:  # one line per outage; tried again every max_interval
            self._redis.failed(exc)
            return float(self.max_interval)
        self._redis.ok()
        return interval

    def _take_lock(self) -> None:
        """What redbeat does at beat start: block until the lock is ours."""
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)  # extend *to* the timeout, as redbeat
        lock.acquire()
        logger.info("dq beat: holds the scheduler lock %s again", self.lock_key)
        self.lock = lock

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task == RUN_SCHEDULE:  # entries are loaded afresh from Redis each tick: this copy is ours
            slot = latest_slot(entry.schedule, datetime.now(UTC))
            entry.kwargs = {**(entry.kwargs or {}), "slot": slot.isoformat()}
        return super().apply_async(entry, producer, advance, **kwargs)


def configure(app: Celery, settings: Settings, agent_config: AgentConfig) -> None:
    lock_timeout = settings.beat_lock_timeout_s
    app.conf.update(
        beat_schedule=beat_schedule(settings, agent_config),
        redbeat_redis_url=where(settings.redis_url),  # shown in beat's banner only: the client is ours (below)
        redbeat_redis_options={},  # not the broker's transport options
        redbeat_key_prefix=keys.BEAT_PREFIX,
        redbeat_lock_timeout=lock_timeout,
        # the beat wakes (and renews its lock) at least this often; a standby retries the lock as often
        beat_max_loop_interval=max(0.1, lock_timeout / 5),
    )
    # redbeat's client, made the one way every client is (TLS verified, Sentinel): redbeat uses
    # the client it finds on the app instead of reading the URL itself
    setattr(app, REDBEAT_REDIS_KEY, beat_client(settings))
